"""The documents the operator writes and the relay reads: the only thing the two share.

One DedicatedIP ``<ip>`` becomes, in the operator's namespace:

* ConfigMap ``txmail-relay-<ip>``, key ``relay.json``: a :class:`RelayConfig`.
* Secrets ``txmail-relay-<ip>-credentials-<k>`` for ``k`` in ``0..CREDENTIAL_SHARDS-1``: each
  data key is a token username, each value a JSON :class:`CredentialEntry`. A token lives in
  shard :func:`shard_of` ``(username)``. Sharding keeps every object well under the 1 MiB
  limit at 5,000+ tokens (an entry is ~300 bytes, so 8 shards hold ~25,000 tokens), and the
  fixed names let the relay's Role grant ``get``/``watch`` by ``resourceNames`` only.
* ConfigMaps ``txmail-relay-<ip>-templates-<k>``: each data key is an ``emailId`` and each
  value a JSON :class:`TemplateEntry`.

The operator adds or removes single keys with merge patches, so concurrent reconciles of
different tokens never overwrite each other. The relay watches each object by name, so a
change reaches it within seconds. The relay never sees a password: only the SHA-256 digest
of a 256-bit random password, compared in constant time (see :func:`password_digest`).
The same documents can be read from files (``txmail-relay --config``) for standalone runs.

The relay's settings file (``txmail-relay --config``, :class:`RelaySettings`) is one of these
documents too: the operator fills the model and writes it, serialised, into the ConfigMap
``txmail-relay-<ip>`` (key ``settings.yaml``); the relay parses the same model.

The enumerations both sides use are defined here once: the delivery modes of a DedicatedIP,
a template's subscription type, and the HubSpot ``sendResult`` values of the relay's API.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import re
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

API_GROUP = "txmail.dev"
API_VERSION = "v1alpha1"
CREDENTIAL_SHARDS = 8
TEMPLATE_SHARDS = 8
RELAY_CONFIG_KEY = "relay.json"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_COMPONENT = "app.kubernetes.io/component"
RELAY_APP_NAME = "txmail-relay"
MANAGED_BY = "txmail"

# Container ports of the relay; the Service maps 587, 465 and 80 onto the first three so the
# pod needs no privilege to bind. Three HTTP listeners keep what is public apart: tracking
# (open pixels and click redirects, meant to sit behind an Ingress) serves nothing else, the
# single-send API (authenticated) and metrics/health have ports of their own.
SUBMISSION_PORT = 2587
SUBMISSIONS_PORT = 2465
TRACKING_PORT = 8080
API_PORT = 8081
METRICS_PORT = 9090
# The inbound listener (DSNs and ARF reports from the outside world to the return path and the
# complaints address; docs/feedback.md "Return path and bounces"): port 25 on the Service.
INBOUND_PORT = 2525
SERVICE_INBOUND_PORT = 25
SERVICE_SUBMISSION_PORT = 587
SERVICE_SUBMISSIONS_PORT = 465
SERVICE_TRACKING_PORT = 80
SERVICE_API_PORT = 8081
SERVICE_METRICS_PORT = 9090


def relay_name(ip: str) -> str:
    """Name of the relay's Deployment, Service, ServiceAccount, Role and ConfigMap."""
    return f"txmail-relay-{ip}"


def credentials_secret_name(ip: str, shard: int) -> str:
    return f"{relay_name(ip)}-credentials-{shard}"


def templates_config_map_name(ip: str, shard: int) -> str:
    return f"{relay_name(ip)}-templates-{shard}"


def scheduler_secret_name(ip: str) -> str:
    """The Secret holding the operator's scheduler credential for this relay."""
    return f"{relay_name(ip)}-scheduler"


SCHEDULER_USERNAME_PREFIX = "txmail-scheduler-"


def tls_secret_name(ip: str) -> str:
    """The Secret the operator generates when the DedicatedIP names no certificate."""
    return f"{relay_name(ip)}-tls"


TRACKING_KEYS_KEY = "keys"


def tracking_secret_name(ip: str) -> str:
    """The Secret with the relay's tracking keys (key :data:`TRACKING_KEYS_KEY`).

    ``kid:hexkey`` lines (``#`` comments allowed): the last line signs, every line verifies.
    The operator creates it with one random key when the DedicatedIP has a tracking base URL
    and never changes it afterwards; a person rotates by adding a line with a higher kid.
    """
    return f"{relay_name(ip)}-tracking"


def dkim_secret_name(ip: str) -> str:
    """The Secret with the DKIM private keys of the DedicatedIP's domains (operator-made).

    One key per file, named by :attr:`DkimKey.key_file`; mounted as a folder at
    :data:`DKIM_KEYS_PATH`. Its annotation ``txmail.dev/dkim-state`` holds the rotation state
    (selectors and times only). Bring-your-own keys are copied in from the user's Secrets.
    """
    return f"{relay_name(ip)}-dkim"


def shard_of(key: str, shards: int) -> int:
    """Stable shard of a username or emailId: the same on every run and every platform."""
    return hashlib.sha256(key.encode()).digest()[0] % shards


def password_digest(password: str) -> str:
    """Digest stored for a password: hex SHA-256.

    Passwords are 256-bit random values (``secrets.token_urlsafe(32)``), so a fast hash is
    safe (no dictionary to try) and keeps AUTH cheap, as for API keys.
    """
    return hashlib.sha256(password.encode()).hexdigest()


def digest_matches(password: str, digest: str) -> bool:
    return hmac.compare_digest(password_digest(password), digest)


class _Doc(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)


class PasswordDigest(_Doc):
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    generation: int = Field(description="The SmtpToken passwordGeneration that issued it.")
    not_after: datetime | None = Field(
        default=None,
        alias="notAfter",
        description="End of a rotation grace period; None while the password is current.",
    )

    def valid_at(self, now: datetime) -> bool:
        return self.not_after is None or now < self.not_after


class WebhookEventType(StrEnum):
    """The event types a webhook subscription may ask for (the relay's events log types,
    HubSpot's email-event names; ``records.model.EventType`` has the same values)."""

    SENT = "SENT"
    DELIVERED = "DELIVERED"
    DEFERRED = "DEFERRED"
    BOUNCE = "BOUNCE"
    SPAMREPORT = "SPAMREPORT"
    OPEN = "OPEN"
    CLICK = "CLICK"
    DROPPED = "DROPPED"


WEBHOOK_SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
WEBHOOK_KEY_BYTES = (24, 64)  # what the Standard Webhooks spec asks of a symmetric key


def webhook_key_bytes(secret: str) -> bytes:
    """The key of a Standard Webhooks secret ``whsec_<base64>`` (the prefix is optional, as
    for the ``standardwebhooks`` library). Raises ValueError without quoting the secret."""
    text = secret.strip().removeprefix(WEBHOOK_SECRET_PREFIX)
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the signing key is not base64 (whsec_<base64>)") from None
    low, high = WEBHOOK_KEY_BYTES
    if not low <= len(key) <= high:
        raise ValueError(f"the signing key must be {low} to {high} bytes (whsec_<base64>)")
    return key


class WebhookEndpoint(_Doc):
    """A webhook subscription of one SmtpToken (its ``spec.webhooks[]``), as its relay sees
    it: the operator resolves ``secretRef`` into :attr:`secret`.

    The relay POSTs the token's events to :attr:`url`, signed as Standard Webhooks do
    (docs/feedback.md "Webhooks"). The secret never appears in a repr, a log line or an
    error: it is a ``SecretStr`` (shown as ``**********``) and only the JSON form of the
    entry (what the operator writes into the credentials Secret) carries its value.
    """

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$",
        description="Unique among the token's webhooks (a DNS label).",
    )
    url: str = Field(max_length=2048, description="http(s) URL the events are POSTed to.")
    event_types: list[WebhookEventType] = Field(
        default_factory=list, alias="eventTypes", description="Empty: every event type."
    )
    secret: SecretStr = Field(
        repr=False, description="The signing key, whsec_<base64 of 24 to 64 bytes>."
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value

    def key(self) -> bytes:
        """The signing key; ValueError (not quoting it) when it is not a Standard Webhooks
        key. Not a validator on purpose: pydantic quotes the input of a failed field in its
        error when the model is nested (a CredentialEntry), and one unusable key must not
        invalidate the token's whole entry (its SMTP AUTH): the relay reports that webhook
        as Failing instead. The operator checks with :func:`webhook_key_bytes` first."""
        return webhook_key_bytes(self.secret.get_secret_value())

    @field_serializer("secret", when_used="json")
    def _reveal(self, value: SecretStr) -> str:
        # The JSON form is the credentials Secret's value: the relay must read the key back.
        return value.get_secret_value()


class CredentialEntry(_Doc):
    """One SmtpToken as its relay sees it (never the password itself)."""

    username: str
    namespace: str
    token: str = Field(description="Name of the SmtpToken.")
    digests: list[PasswordDigest]
    allowed_from_domains: list[str] = Field(alias="allowedFromDomains")
    create_contacts: bool = Field(default=False, alias="createContacts")
    email_campaign_id: int = Field(alias="emailCampaignId")
    expires_at: datetime | None = Field(default=None, alias="expiresAt")
    scheduler: bool = Field(
        default=False,
        description="The operator's own credential for TransactionalEmail spec.send: may send "
        "every template published to this relay, whatever its namespace.",
    )
    webhooks: list[WebhookEndpoint] = Field(
        default_factory=list, description="The token's webhook subscriptions (unique names)."
    )

    @field_validator("webhooks")
    @classmethod
    def _unique_webhooks(cls, value: list[WebhookEndpoint]) -> list[WebhookEndpoint]:
        names = [w.name for w in value]
        if len(set(names)) != len(names):
            raise ValueError("webhook names must be unique")
        return value

    def accepts(self, password: str, now: datetime) -> bool:
        """Constant-time check of a password against every digest valid at ``now``."""
        if self.expires_at is not None and now >= self.expires_at:
            return False
        candidate = password_digest(password)
        ok = False
        for d in self.digests:
            # Compare against all digests so timing does not reveal which one matched.
            ok |= hmac.compare_digest(candidate, d.sha256) and d.valid_at(now)
        return ok

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)


class DeliveryMode(StrEnum):
    DIRECT = "Direct"
    SMARTHOST = "Smarthost"


class SmarthostTLS(StrEnum):
    STARTTLS = "StartTLS"
    IMPLICIT = "Implicit"
    NONE = "None"


class SmarthostConfig(_Doc):
    host: str
    port: int = 587
    tls: SmarthostTLS = SmarthostTLS.STARTTLS
    verify_tls: bool = Field(default=True, alias="verifyTLS")
    credentials_dir: str | None = Field(
        default=None,
        alias="credentialsDir",
        description="Folder holding 'username' and 'password' files (a mounted Secret).",
    )


class DeliveryConfig(_Doc):
    mode: DeliveryMode = DeliveryMode.DIRECT
    smarthost: SmarthostConfig | None = None
    resolver: list[str] = Field(
        default_factory=list,
        description="DNS servers for MX lookups (ip or ip:port); empty uses the system's.",
    )
    bind_address: str | None = Field(
        default=None,
        alias="bindAddress",
        description="Source address of every outbound connection (egress mode HostNetwork).",
    )
    mx_port: int = Field(default=25, alias="mxPort")


class TrackingConfig(_Doc):
    base_url: str | None = Field(default=None, alias="baseURL")


class FeedbackConfig(_Doc):
    complaints_address: str | None = Field(
        default=None,
        alias="complaintsAddress",
        description="Recipient that takes ARF feedback reports over authenticated submission.",
    )


class ReturnPathConfig(_Doc):
    """The envelope sender (return path) of delivery attempts: VERP per message.

    With a ``domain``, each attempt's MAIL FROM is ``<localPart>+<spool id>@<domain>`` (the
    header From stays the app's), so a DSN sent back later names the message it is about; the
    domain's MX points at the relay's inbound listener. Without one, the app's sender as is.
    """

    domain: str | None = Field(
        default=None, description="Return-path domain (its MX: the relay); None: off."
    )
    local_part: str = Field(
        default="bounces",
        alias="localPart",
        min_length=1,
        max_length=32,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Local part before the '+<id>' tag.",
    )

    @field_validator("domain")
    @classmethod
    def _lower_domain(cls, value: str | None) -> str | None:
        if value is None:
            return None
        domain = value.strip().rstrip(".").lower()
        return domain or None


class SuppressionConfig(_Doc):
    """Which recipients the relay refuses new mail to (both off: transactional mail goes out)."""

    complaints: bool = Field(default=False, description="Recipients who complained.")
    bounces: bool = Field(default=False, description="Recipients whose mail hard-bounced.")


class DsnPolicy(StrEnum):
    """When the relay sends the original sender a delivery status notification (RFC 3464) on
    giving up on a recipient (a 5xx reply, or the queue lifetime reached).

    ``OnRequest``: as RFC 3461 asks: when RCPT TO had ``NOTIFY=FAILURE`` (alone or with
    others), or no NOTIFY at all (RFC 3461 §5.1: then the MTA chooses; the relay reads it as
    FAILURE, never DELAY); never for ``NOTIFY=NEVER``. ``Always``: for every failed recipient of
    an SMTP submission, NOTIFY=NEVER included. ``Never``: none. API and template sends never get
    one (their send status and events say what happened); a message sent with the null reverse
    path ``<>`` (a DSN itself) never does.
    """

    ON_REQUEST = "OnRequest"
    ALWAYS = "Always"
    NEVER = "Never"


class DsnConfig(_Doc):
    """Delivery status notifications the relay itself sends (docs/feedback.md)."""

    notify: DsnPolicy = Field(
        default=DsnPolicy.ON_REQUEST,
        description="OnRequest (the sender's NOTIFY), Always or Never.",
    )


#: Where the relay pod mounts the DKIM private keys (one folder, e.g. a projected volume of the
#: operator's generated key Secrets and any bring-your-own Secrets); :attr:`DkimConfig.keys_dir`.
DKIM_KEYS_PATH = "/etc/txmail/dkim"

_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"


class DkimAlgorithm(StrEnum):
    """A DKIM signing algorithm (the signature's ``a=``, RFC 6376 and RFC 8463)."""

    RSA_SHA256 = "rsa-sha256"
    ED25519_SHA256 = "ed25519-sha256"


class DkimKey(_Doc):
    """One active signing key of a domain: the relay signs with it, the DNS has its record.

    ``keyFile`` is a file name inside :attr:`DkimConfig.keys_dir` holding the private key,
    unencrypted, in one of these formats (the relay checks it with ``cryptography``):

    * ``rsa-sha256``: PEM, PKCS#8 (``-----BEGIN PRIVATE KEY-----``, what
      ``cryptography``'s ``private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())``
      and ``openssl genpkey -algorithm rsa`` write) or PKCS#1 (``-----BEGIN RSA PRIVATE
      KEY-----``, what ``dknewkey.py`` writes). At least 1024 bits (RFC 8301); 2048 is the
      operator's default.
    * ``ed25519-sha256``: PEM PKCS#8 (``-----BEGIN PRIVATE KEY-----``, as above or
      ``openssl genpkey -algorithm ed25519``), or dkimpy's own format (``dknewkey.py --ktype
      ed25519``): the 32-byte private seed (``private_bytes_raw()``), base64, one line.

    The DNS record of the key is ``<selector>._domainkey.<domain>`` TXT ``v=DKIM1; k=rsa;
    p=<base64 DER SubjectPublicKeyInfo>`` (RSA) or ``v=DKIM1; k=ed25519; p=<base64 of the
    32-byte raw public key>`` (Ed25519, RFC 8463 section 4.2).
    """

    selector: Annotated[str, Field(max_length=253, pattern=rf"^{_DNS_LABEL}(?:\.{_DNS_LABEL})*$")]
    algorithm: DkimAlgorithm = DkimAlgorithm.RSA_SHA256
    key_file: Annotated[str, Field(alias="keyFile", pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")]


class DkimDomain(_Doc):
    """The signing keys of one header-From domain: one, or two for dual signing (RFC 8463:
    one ``rsa-sha256`` and one ``ed25519-sha256`` key, two DKIM-Signature headers)."""

    domain: str = Field(description="Signs mail whose header From address is at this domain.")
    keys: Annotated[list[DkimKey], Field(min_length=1, max_length=2)]

    @field_validator("domain")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().rstrip(".").lower()

    @model_validator(mode="after")
    def _one_per_algorithm(self) -> DkimDomain:
        algorithms = [k.algorithm for k in self.keys]
        if len(set(algorithms)) != len(algorithms):
            raise ValueError(f"{self.domain}: at most one key per algorithm")
        return self


class DkimConfig(_Doc):
    """DKIM signing (docs/deliverability.md "Signing"): the active keys per From domain.

    The relay signs each message at delivery time (so a change here, e.g. a rotation that
    switches the selector, applies to mail already queued) with every key of its header From
    domain, unless the message already has a DKIM-Signature with ``d=`` that domain. A domain
    not listed is sent unsigned. Key files are re-read when they change; one that cannot be
    read sends the mail unsigned (logged, counted), never holds it.
    """

    keys_dir: str = Field(
        default=DKIM_KEYS_PATH,
        alias="keysDir",
        description="Folder of the key files (the mounted Secret(s)); keyFile is inside it.",
    )
    domains: list[DkimDomain] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_domains(self) -> DkimConfig:
        names = [d.domain for d in self.domains]
        if len(set(names)) != len(names):
            raise ValueError("each domain at most once")
        return self

    def keys_for(self, domain: str) -> list[DkimKey]:
        """The keys that sign mail from ``domain`` (none: unsigned)."""
        wanted = domain.rstrip(".").lower()
        return next((list(d.keys) for d in self.domains if d.domain == wanted), [])


WARMUP_DAY_SECONDS = 86400.0


class WarmupConfig(_Doc):
    """IP warm-up (docs/deliverability.md "Warm-up"): a daily budget of recipients.

    Day 1 is the 24 hours from ``startedAt`` (the moment the operator first saw the IP Ready),
    day ``n`` the ``n``-th such period; its budget is ``dailyVolumes[n-1]``. Past the last
    day the schedule is done and there is no limit. Before the operator has recorded the start
    (``startedAt`` absent) the relay counts against day 1. Off (``enabled`` false) is no limit.
    The math is here so that the operator's status and the relay's gate agree.
    """

    enabled: bool = False
    daily_volumes: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list,
        alias="dailyVolumes",
        description="Recipients per day, day 1 first (the operator resolves the standard "
        "schedule into this list).",
    )
    started_at: datetime | None = Field(default=None, alias="startedAt")

    @field_validator("started_at")
    @classmethod
    def _utc_if_naive(cls, value: datetime | None) -> datetime | None:
        # A hand-written startedAt without an offset is read as UTC (the day math subtracts
        # it from an aware "now", which a naive datetime cannot be).
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    @property
    def active(self) -> bool:
        return self.enabled and bool(self.daily_volumes)

    def day(self, now: datetime) -> int:
        """The schedule's day at ``now``, 1-based (1 before the start is known or reached)."""
        if self.started_at is None:
            return 1
        elapsed = (now - self.started_at).total_seconds()
        return max(0, int(elapsed // WARMUP_DAY_SECONDS)) + 1

    def day_start(self, day: int) -> datetime | None:
        """When ``day`` starts (None while the start is not known)."""
        if self.started_at is None:
            return None
        return self.started_at + timedelta(seconds=(day - 1) * WARMUP_DAY_SECONDS)

    def budget(self, day: int) -> int | None:
        """Recipients allowed on ``day``; None: no limit (off, or the schedule is done)."""
        if not self.active or day > len(self.daily_volumes):
            return None
        return self.daily_volumes[max(1, day) - 1]

    def done(self, now: datetime) -> bool:
        """The schedule's last day is over (full volume from now on)."""
        return (
            self.active and self.started_at is not None and self.day(now) > len(self.daily_volumes)
        )

    def percentage(self, now: datetime) -> int:
        """Days of the schedule completed, in percent (SES's WarmupPercentage is the same
        idea): 0 on day 1, 100 once done."""
        if not self.active:
            return 0
        total = len(self.daily_volumes)
        completed = min(total, self.day(now) - 1) if self.started_at is not None else 0
        return (100 * completed) // total


# A positive number of messages per second, minute or hour: zero ("0/s", "0.0/h") is refused
# here (and so by the API server, whose CRD carries this pattern) as by rate_per_second.
SHAPING_RATE = r"^([0-9]*[1-9][0-9]*(\.[0-9]+)?|[0-9]+\.[0-9]*[1-9][0-9]*)/(s|min|h)$"
_RATE_TEXT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*/\s*(s|min|h)\s*$")
_RATE_PER = {"s": 1.0, "min": 60.0, "h": 3600.0}


def rate_per_second(text: str) -> float:
    """``"N/s"``, ``"N/min"`` or ``"N/h"`` as messages per second (positive and finite)."""
    match = _RATE_TEXT.match(text)
    if match is None:
        raise ValueError(f"rate {text!r} is not N/s, N/min or N/h")
    count = float(match.group(1))
    if not 0.0 < count < math.inf:
        raise ValueError(f"rate {text!r} must be positive")
    return count / _RATE_PER[match.group(2)]


class ShapingLimits(_Doc):
    """Limits of one destination (docs/deliverability.md "Per-destination shaping"); an unset
    field keeps the built-in value."""

    connections: int | None = Field(
        default=None, ge=1, description="Connections open to the destination at once."
    )
    messages_per_connection: int | None = Field(
        default=None,
        ge=1,
        alias="messagesPerConnection",
        description="Messages one connection carries before it is closed.",
    )
    rate: str | None = Field(
        default=None,
        pattern=SHAPING_RATE,
        description="Messages per second, minute or hour: 'N/s', 'N/min', 'N/h'.",
    )
    burst: int | None = Field(
        default=None, ge=1, description="Messages that may go at once after a quiet spell."
    )

    @field_validator("rate")
    @classmethod
    def _positive_rate(cls, value: str | None) -> str | None:
        if value is not None:
            rate_per_second(value)  # a ValueError is pydantic's validation error
        return value


class ShapingSite(ShapingLimits):
    """A destination: the recipient domains whose MX hosts match one of ``mx`` (or a built-in
    destination of the same ``name``, whose limits the set fields override)."""

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")
    mx: list[str] = Field(
        default_factory=list,
        description="MX host patterns ('*.google.com'); empty keeps the built-in ones.",
    )


class ShapingPause(_Doc):
    """When a destination is paused, and for how long."""

    after_failures: int = Field(
        default=5,
        ge=1,
        alias="afterFailures",
        description="Answered attempts in a row that got only 4xx replies: then a pause "
        "(a 421 to a new connection pauses at once; a connection that fails is no answer and "
        "does not count).",
    )
    initial_seconds: float = Field(default=60.0, gt=0, alias="initialSeconds")
    max_seconds: float = Field(default=3600.0, gt=0, alias="maxSeconds")


class ShapingConfig(_Doc):
    """Per-destination shaping: overrides of the relay's built-in defaults."""

    enabled: bool = True
    default: ShapingLimits = Field(
        default_factory=ShapingLimits,
        description="Limits of destinations that match no pattern.",
    )
    sites: list[ShapingSite] = Field(default_factory=list)
    pause: ShapingPause = Field(default_factory=ShapingPause)


class RelayConfig(_Doc):
    """What the relay of one DedicatedIP needs to know: written to ``relay.json``."""

    kind: Literal["RelayConfig"] = "RelayConfig"
    dedicated_ip: str = Field(alias="dedicatedIP")
    address: str
    hostname: str
    domains: list[str]
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    return_path: ReturnPathConfig = Field(default_factory=ReturnPathConfig, alias="returnPath")
    suppression: SuppressionConfig = Field(default_factory=SuppressionConfig)
    dsn: DsnConfig = Field(default_factory=DsnConfig)
    dkim: DkimConfig = Field(default_factory=DkimConfig)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    shaping: ShapingConfig = Field(default_factory=ShapingConfig)
    credential_shards: int = Field(default=CREDENTIAL_SHARDS, alias="credentialShards")
    template_shards: int = Field(default=TEMPLATE_SHARDS, alias="templateShards")

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=2, sort_keys=True)


class SubscriptionType(StrEnum):
    TRANSACTIONAL = "Transactional"


class SendState(StrEnum):
    """HubSpot's send ``status``: where one send is in its life."""

    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    CANCELED = "CANCELED"
    COMPLETE = "COMPLETE"


class SendResult(StrEnum):
    """HubSpot's ``sendResult``: the outcome of one send, as the relay's API reports it."""

    SENT = "SENT"
    QUEUED = "QUEUED"
    IDEMPOTENT_IGNORE = "IDEMPOTENT_IGNORE"
    UNDELIVERABLE = "UNDELIVERABLE"
    THROTTLED = "THROTTLED"
    INVALID_TO_ADDRESS = "INVALID_TO_ADDRESS"
    INVALID_FROM_ADDRESS = "INVALID_FROM_ADDRESS"
    MISSING_TEMPLATE_PROPERTIES = "MISSING_TEMPLATE_PROPERTIES"
    TEMPLATE_RENDER_EXCEPTION = "TEMPLATE_RENDER_EXCEPTION"
    MISSING_CONTENT = "MISSING_CONTENT"
    VALIDATION_FAILED = "VALIDATION_FAILED"
    TOO_MANY_RECIPIENTS = "TOO_MANY_RECIPIENTS"
    PREVIOUS_SPAM = "PREVIOUS_SPAM"
    PREVIOUSLY_BOUNCED = "PREVIOUSLY_BOUNCED"
    BLOCKED_ADDRESS = "BLOCKED_ADDRESS"  # suppressed by hand (a MANUAL entry)


class Sender(_Doc):
    name: str | None = None
    address: str


class TemplateEntry(_Doc):
    """One valid TransactionalEmail, published to its DedicatedIP's relay."""

    email_id: int = Field(alias="emailId")
    namespace: str
    name: str
    generation: int
    sender: Sender = Field(alias="from")
    reply_to: list[str] = Field(default_factory=list, alias="replyTo")
    subject: str
    html: str | None = None
    text: str | None = None
    subscription_type: SubscriptionType = Field(
        default=SubscriptionType.TRANSACTIONAL, alias="subscriptionType"
    )
    track_opens: bool = Field(default=False, alias="trackOpens")
    track_clicks: bool = Field(default=False, alias="trackClicks")

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)


# -- stats published by the relay, copied into SmtpToken.status.stats by the operator -------

STATS_KEY = "stats.json"


def stats_config_map_name(ip: str) -> str:
    """ConfigMap the relay patches with its :class:`RelayStats` (key :data:`STATS_KEY`).

    The operator creates it and grants the relay ``get``/``patch`` on exactly this name.
    """
    return f"{relay_name(ip)}-stats"


class TokenStats(_Doc):
    """What one token's mail did, as ``SmtpToken.status.stats`` shows it."""

    sent: int = 0
    delivered: int = 0
    bounced: int = Field(
        default=0, description="Hard bounces: a 5xx, a hard DSN, the queue lifetime reached."
    )
    soft_bounces: int = Field(
        default=0, alias="softBounces", description="Asynchronous DSNs that were not hard."
    )
    opens: int = 0
    clicks: int = 0
    machine_opens: int = Field(
        default=0,
        alias="machineOpens",
        description="Opens by a machine (a scanner, a prefetching proxy): not in opens.",
    )
    machine_clicks: int = Field(
        default=0, alias="machineClicks", description="Clicks by a machine: not in clicks."
    )
    dropped: int = Field(default=0, description="Sends refused before spooling (suppressed).")
    unique_opens: int = Field(default=0, alias="uniqueOpens")
    unique_clicks: int = Field(default=0, alias="uniqueClicks")
    complaints: int = 0
    open_rate: float = Field(default=0.0, alias="openRate", description="uniqueOpens/delivered")
    click_rate: float = Field(default=0.0, alias="clickRate", description="uniqueClicks/delivered")
    last_sent_at: datetime | None = Field(default=None, alias="lastSentAt")
    contacts: int = 0


class WarmupStats(_Doc):
    """The relay's warm-up figures (``DedicatedIP.status.warmup`` copies budget and sent)."""

    day: int = Field(description="The schedule's day the figures are for (1-based).")
    budget: int | None = Field(
        default=None, description="Recipients allowed that day; None: no limit."
    )
    sent: int = Field(default=0, description="Recipients handed to delivery that day.")
    deferred: int = Field(default=0, description="Recipients held for a later day's budget.")


class PausedDestination(_Doc):
    """A destination the relay does not connect to until ``until`` (it answered 421, or
    only 4xx several times in a row); its mail stays queued."""

    name: str
    until: datetime
    reason: str = Field(description="The reply that paused it.")


class WebhookStats(_Doc):
    """One webhook subscription as ``SmtpToken.status.webhooks[]`` shows it."""

    name: str
    state: Literal["Healthy", "Failing"] = "Healthy"
    last_error: str | None = Field(
        default=None,
        alias="lastError",
        description="The last failed attempt: status code or error and a short reason.",
    )
    last_success_at: datetime | None = Field(default=None, alias="lastSuccessAt")
    failing_since: datetime | None = Field(
        default=None, alias="failingSince", description="First failure of the current run."
    )
    backlog: int = Field(default=0, description="Events waiting to be delivered.")
    dropped: int = Field(
        default=0, description="Events given up on (their batch failed for retryFor)."
    )


class RelayStats(_Doc):
    """The whole document under :data:`STATS_KEY`: stats per token username."""

    tokens: dict[str, TokenStats] = Field(default_factory=dict)
    warmup: WarmupStats | None = Field(
        default=None, description="Warm-up figures; absent when warm-up is off."
    )
    destinations: list[PausedDestination] = Field(
        default_factory=list, description="Destinations paused now (shaping), soonest end first."
    )
    webhooks: dict[str, list[WebhookStats]] = Field(
        default_factory=dict, description="Webhook subscriptions per token username."
    )
    updated_at: datetime = Field(alias="updatedAt")

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)


# -- the relay's settings file: written by the operator, read by ``txmail-relay --config`` ----

MIB = 1024 * 1024


class _Settings(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class ListenSettings(_Settings):
    host: str = "0.0.0.0"  # noqa: S104 - the container listens on its pod address
    submission: int | None = Field(default=SUBMISSION_PORT, description="STARTTLS port")
    submissions: int | None = Field(default=SUBMISSIONS_PORT, description="Implicit TLS port")
    tracking: int | None = Field(
        default=TRACKING_PORT, description="Public: open pixels and click redirects only"
    )
    api: int | None = Field(
        default=API_PORT, description="The single-send API, send statuses, contacts (auth)"
    )
    metrics: int | None = Field(default=METRICS_PORT, description="/metrics, /healthz, /readyz")
    inbound: int | None = Field(
        default=None,
        description="Inbound SMTP (no AUTH): DSNs and ARF reports to the return path and the "
        "complaints address; off unless set (the operator sets INBOUND_PORT)",
    )


class TLSSettings(_Settings):
    cert_file: Path = Path("/etc/txmail/tls/tls.crt")
    key_file: Path = Path("/etc/txmail/tls/tls.key")


class LimitSettings(_Settings):
    max_message_size: int = Field(default=10_240_000, description="SIZE; Postfix's default")
    max_inbound_message_size: int = Field(
        default=MIB,
        ge=64 * 1024,
        description="SIZE of the inbound listener (DSNs, ARF reports): 552 past it",
    )
    max_recipients: int = Field(default=100, ge=100, description="RFC 5321 4.5.3.1.8")
    idle_timeout: float = 300.0
    max_auth_failures: int = Field(default=5, ge=3, description="Per connection (RFC 4954)")
    ip_auth_failures: int = Field(default=20, description="Per client IP within the window")
    ip_auth_window: float = 60.0
    data_timeout: float = Field(default=120.0, description="Spooling longer than this: 451")
    spool_min_free_bytes: int = Field(default=64 * MIB, description="452 below this")
    # Connections (docs/relay.md "Limits"): caps, the descriptor reserve and timeouts.
    max_connections: int = Field(default=1000, ge=1, description="SMTP, both ports: 421 past it")
    max_connections_per_address: int = Field(
        default=50, ge=1, description="SMTP connections from one address (IPv6: one /64)"
    )
    max_http_connections: int = Field(default=1000, ge=1, description="Tracking and API, each")
    max_http_connections_per_address: int = Field(
        default=200, ge=1, description="Tracking and API, each: 429 past it"
    )
    reserved_files: int = Field(
        default=256, ge=0, description="Descriptors the caps leave for probes, delivery, files"
    )
    tls_handshake_timeout: float = Field(default=10.0, gt=0, description="At most idleTimeout")
    data_upload_timeout: float = Field(
        default=1800.0, gt=0, description="A whole DATA upload (354 to the dot): 421 past it"
    )
    max_junk_commands: int = Field(
        default=100, ge=1, description="Commands without progress (no message accepted): 421"
    )
    http_header_timeout: float = Field(default=10.0, gt=0, description="Request line + headers")
    http_body_timeout: float = Field(default=60.0, gt=0, description="A request body, whole")
    http_keepalive_timeout: float = Field(default=75.0, gt=0, description="Idle between requests")


class RetrySettings(_Settings):
    """RFC 5321 4.5.4.1 / Postfix defaults; tests shrink them to seconds."""

    min_backoff: float = 300.0
    max_backoff: float = 4000.0
    max_lifetime: float = 5 * 86400.0
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    final_dot_timeout: float = Field(default=600.0, description="RFC 5321 4.5.3.2.6")


class WebhookSettings(_Settings):
    """Webhook deliveries (docs/feedback.md "Webhooks"); tests shrink the times."""

    min_backoff: float = Field(default=10.0, gt=0, description="First retry's backoff cap")
    max_backoff: float = Field(default=1800.0, gt=0, description="Backoff cap (full jitter)")
    retry_for: float = Field(
        default=86400.0,
        gt=0,
        description="A batch is retried this long from its first attempt, then dropped",
    )
    timeout: float = Field(default=15.0, gt=0, description="One request, connect to response")
    max_batch: int = Field(default=100, ge=1, le=1000, description="Events per request")
    failing_after_failures: int = Field(default=3, ge=1, description="In a row: Failing")
    failing_after: float = Field(
        default=600.0, gt=0, description="Seconds failing in a row: Failing"
    )
    poll_interval: float = Field(
        default=1.0, gt=0, description="New events are looked for at least this often"
    )


class TrackingSettings(_Settings):
    """Machine opens and clicks (docs/feedback.md "Machine opens and clicks")."""

    machine_click_window: float = Field(
        default=2.0,
        ge=0,
        description="A click sooner than this many seconds after its message was spooled or "
        "delivered is a machine's (a gateway's link scanner); 0: off",
    )


class OutboundSettings(_Settings):
    concurrency: int = Field(default=32, ge=1, description="Messages delivered in parallel")
    destination_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="Attempts in parallel to one recipient domain (Direct); default a quarter "
        "of concurrency. A smarthost, the only destination, gets all of concurrency.",
    )
    pool_idle_timeout: float = 30.0
    messages_per_connection: int = 100
    ca_file: Path | None = Field(default=None, description="Extra CA to verify smarthosts")


class SpoolSettings(_Settings):
    directory: Path = Path("/var/spool/txmail")
    segment_bytes: int = 64 * MIB
    # Reclaim (docs/relay.md "Spool"): an old segment whose live messages were all received
    # more than reclaimAfter seconds ago has them copied into the current one, then goes.
    reclaim_after: float = Field(default=3600.0, gt=0)
    reclaim_interval: float = Field(default=300.0, gt=0)


class RecordsSettings(_Settings):
    """The records' events log (docs/relay.md "Full disk"): pruned oldest first at every stats
    refresh when past either bound, so it cannot grow until the spool volume is full."""

    events_retention: float = Field(
        default=30 * 86400.0,
        gt=0,
        description="Seconds an event is kept (the events API's window; webhooks retry 24 h)",
    )
    max_events: int = Field(
        default=2_000_000,
        ge=1000,
        description="Events kept at most (about 300 bytes each on the volume, indexes "
        "included): the oldest beyond it are deleted",
    )


class LogSettings(_Settings):
    json_format: bool = Field(default=False, alias="json")
    level: str = "INFO"

    @field_validator("level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in logging.getLevelNamesMapping():
            raise ValueError(f"unknown log level {value!r} (DEBUG, INFO, WARNING, ERROR)")
        return level


class KubernetesSettings(_Settings):
    namespace: str
    dedicated_ip: str = Field(alias="dedicatedIP")
    kubeconfig: Path | None = None


class RelaySettings(_Settings):
    """The whole settings file of one relay (``txmail-relay --config``).

    Where the dynamic documents come from: ``kubernetes`` (the objects above, watched by
    name) or ``relay``/``relayFile`` plus credentials and templates (standalone runs).
    """

    relay: RelayConfig | None = None
    relay_file: Path | None = None
    credentials: list[CredentialEntry] = Field(default_factory=list)
    credential_files: list[Path] = Field(default_factory=list)
    templates: list[TemplateEntry] = Field(default_factory=list)
    template_files: list[Path] = Field(default_factory=list)
    kubernetes: KubernetesSettings | None = None

    listen: ListenSettings = Field(default_factory=ListenSettings)
    tls: TLSSettings = Field(default_factory=TLSSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    outbound: OutboundSettings = Field(default_factory=OutboundSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    records: RecordsSettings = Field(default_factory=RecordsSettings)
    logging: LogSettings = Field(default_factory=LogSettings)
    shutdown_grace: float = 20.0
    config_poll_interval: float = 1.0
    stats_interval: float = Field(default=30.0, gt=0, description="Stats publishing period")
    stats_file: Path | None = Field(
        default=None, description="Write stats JSON here (standalone) instead of a ConfigMap"
    )
    tracking_keys_file: Path | None = Field(
        default=None,
        description="'kid:hexkey' lines (e.g. a mounted Secret); last signs; re-read on change",
    )
    complaints_address: str | None = Field(
        default=None,
        description="Recipient that takes ARF reports; RelayConfig feedback.complaintsAddress "
        "wins when set",
    )

    @model_validator(mode="after")
    def _one_source(self) -> RelaySettings:
        inline = self.relay is not None or self.relay_file is not None
        if self.kubernetes is not None and inline:
            raise ValueError("set either kubernetes or relay/relayFile, not both")
        if self.kubernetes is None and not inline:
            raise ValueError("one of relay, relayFile or kubernetes is required")
        if self.relay is not None and self.relay_file is not None:
            raise ValueError("set either relay or relayFile, not both")
        return self

    def to_document(self) -> dict[str, object]:
        """The settings as a settings file holds them: what was set, camelCase, JSON types."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)
