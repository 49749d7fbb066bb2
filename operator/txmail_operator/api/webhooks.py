"""SmtpToken spec.webhooks (subscriptions to the token's events) and status.webhooks.

Why on the SmtpToken and not a kind of its own: events are per token (every event names the
token that sent the mail), the token's relay is the one that has them, the signing key's Secret
sits next to the token's own app Secret in the app's namespace, and the delivery state lands
on the object the app owns (docs/feedback.md "Configuration").

The operator reads each signing key from its Secret and hands it to the relay in the token's
credential entry (the credentials shards are Secrets); it never shows up in a status, an
Event, a log line or an annotation.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from txmail_relay.contract import WebhookEventType

from .common import DNS_LABEL, DNS_SUBDOMAIN, Model, cel

# Each subscription is in the token's credential entry, in a credentials shard (a Secret, at
# most 1 MiB, shared by many tokens): 4 webhooks of 512-character URLs keep an entry small
# (docs/architecture.md "Size limits").
WEBHOOKS_MAX = 4
URL_MAX = 512
# Condition type on the SmtpToken: every subscription's signing key could be read.
WEBHOOKS_READY = "WebhooksReady"
# A host is required: a name (no userinfo, no brackets) or a bracketed IPv6 address, then an
# optional port. `https://:443/x` and `https://[bad/x` are refused here, not at the relay.
HTTP_URL = r"^https?://(\[[0-9a-fA-F:.]+\]|[^\s/?#@:\[\]]+)(:[0-9]{1,5})?([/?#]\S*)?$"
# http:// is refused unless the host is a cluster Service name, `<name>.<namespace>.svc` or
# `<name>.<namespace>.svc.cluster.local` (the path never leaves the cluster; the short form
# resolves under any cluster domain), or the subscription says insecureHTTP. Events carry
# recipients' addresses and the signature does not hide them. Anything after `.svc` but the
# default cluster domain (`http://a.svc.evil.example.com/`) is an outside host.
_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
CLUSTER_HTTP = rf"^http://{_LABEL}\.{_LABEL}\.svc(\.cluster\.local)?(:[0-9]{{1,5}})?([/?#]\S*)?$"
_HTTPS_OR_INTERNAL = (
    "self.url.startsWith('https://') || (has(self.insecureHTTP) && self.insecureHTTP) || "
    f"self.url.matches('{CLUSTER_HTTP.replace(chr(92), chr(92) * 2)}')"
)
HTTP_MESSAGE = (
    "url must be https://, or http:// to a cluster Service (<name>.<namespace>.svc), or set "
    "insecureHTTP: true"
)
DATA_KEY = r"^[-._a-zA-Z0-9]+$"  # a Secret's data key, as Kubernetes validates it


class WebhookSecretRef(Model):
    name: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)] = Field(
        description="A Secret in the token's namespace holding the signing key."
    )
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=DATA_KEY)] = Field(
        default="secret",
        description="The Secret's key whose value is a Standard Webhooks key, whsec_<base64 of "
        "24 to 64 random bytes> (for example: echo whsec_$(openssl rand -base64 32)).",
    )


class Webhook(Model):
    model_config = ConfigDict(
        json_schema_extra={"x-kubernetes-validations": [cel(_HTTPS_OR_INTERNAL, HTTP_MESSAGE)]}
    )

    name: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)] = Field(
        description="The subscription's name (a DNS label), unique among the token's "
        "webhooks: status.webhooks[] and the Events about it use it."
    )
    url: str = Field(
        max_length=URL_MAX,
        pattern=HTTP_URL,
        description="Where the events are POSTed, signed as Standard Webhooks do "
        "(webhook-id, webhook-timestamp, webhook-signature). https://; http:// only to a "
        "cluster Service (<name>.<namespace>.svc, or .svc.cluster.local) or with "
        "insecureHTTP. No user:password@ in it (it is shown in the token's spec): "
        "authenticate requests by their signature. At most 512 characters.",
    )
    insecure_http: bool = Field(
        default=False,
        alias="insecureHTTP",
        description="Allow an http:// URL outside the cluster (events travel in the clear).",
    )
    event_types: list[WebhookEventType] | None = Field(
        default=None,
        max_length=len(WebhookEventType),
        description="The event types to send: SENT, DELIVERED, DEFERRED, BOUNCE, SPAMREPORT, "
        "OPEN, CLICK, DROPPED (HubSpot's email-event names). Omitted or empty: all of them.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    secret_ref: WebhookSecretRef = Field(
        alias="secretRef",
        description="The signing key. A missing Secret or key leaves this webhook out "
        "(condition WebhooksReady says which), the token works on.",
    )

    @model_validator(mode="after")
    def _https_or_internal(self) -> Webhook:
        ok = (
            self.url.startswith("https://")
            or self.insecure_http
            or re.match(CLUSTER_HTTP, self.url) is not None
        )
        if not ok:
            raise ValueError(HTTP_MESSAGE)
        return self


WEBHOOKS_SCHEMA_EXTRA: dict[str, Any] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["name"],
}


def webhooks_field() -> Any:
    return Field(
        default=None,
        max_length=WEBHOOKS_MAX,
        description="Webhook subscriptions to this token's events (docs/feedback.md). A "
        "changed signing key in the Secret reaches the relay at the next periodic check "
        "(operator driftCheckInterval).",
        json_schema_extra=WEBHOOKS_SCHEMA_EXTRA,
    )


def _unique_names(webhooks: list[Webhook]) -> list[Webhook]:
    """The API server keys the list by name (list-map): the same check for pydantic."""
    names = [w.name for w in webhooks]
    if len(set(names)) != len(names):
        raise ValueError("webhooks: each name at most once")
    return webhooks


Webhooks = Annotated[list[Webhook], AfterValidator(_unique_names)]


class WebhookStatus(Model):
    """One subscription's delivery state, as the token's relay last reported it."""

    name: str = Field(max_length=63, description="The subscription (spec.webhooks[].name).")
    state: Literal["Healthy", "Failing"] = Field(
        default="Healthy",
        description="Healthy, or Failing: its deliveries fail and are being retried (with "
        "backoff, for at least 24 hours; events are kept in order until then).",
    )
    last_error: str | None = Field(
        default=None, max_length=1024, description="The last failed attempt's status or error."
    )
    last_success_at: datetime | None = Field(
        default=None, description="When a delivery last succeeded."
    )
    failing_since: datetime | None = Field(
        default=None, description="The first failure of the current run of failures."
    )
    backlog: int = Field(default=0, ge=0, description="Events waiting to be delivered.")
    dropped: int = Field(
        default=0, ge=0, description="Events given up on after retrying for the retry period."
    )


def webhooks_status_field() -> Any:
    return Field(
        default=None,
        max_length=WEBHOOKS_MAX,
        description="Each webhook subscription's delivery state, from the relay's last report.",
    )
