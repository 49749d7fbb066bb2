"""SmtpToken -> the app Secret (holds the password) and the relay's credential entry."""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import quote

from pydantic import SecretStr

from txmail_relay import contract as c

from ..api import GROUP, SmtpTokenSpec
from .naming import Obj, b64, owner_reference

PASSWORD_GENERATION_ANNOTATION = f"{GROUP}/password-generation"
TOKEN_LABEL = f"{GROUP}/smtptoken"
SECRET_TYPE = f"{GROUP}/smtp-credentials"


def username_for(token_uid: str) -> str:
    """Stable, unique in the cluster (object uids are), derived from no secret."""
    return "txm-" + token_uid.replace("-", "")


def app_secret_name(token: str, spec: SmtpTokenSpec) -> str:
    return spec.secret_name or f"{token}-smtp"


def app_secret(
    token: str,
    token_uid: str,
    namespace: str,
    spec: SmtpTokenSpec,
    username: str,
    password: str,
    host: str,
    port: int,
    ca_pem: bytes | None,
) -> Obj:
    """The Secret an app reads (envFrom or a volume): everything it needs to send mail."""
    template = spec.secret_template
    labels = {
        **(template.labels if template and template.labels else {}),
        c.LABEL_MANAGED_BY: c.MANAGED_BY,
        TOKEN_LABEL: token,
    }
    annotations = {
        **(template.annotations if template and template.annotations else {}),
        PASSWORD_GENERATION_ANNOTATION: str(spec.password_generation),
    }
    url = f"smtp://{quote(username, safe='')}:{quote(password, safe='')}@{host}:{port}"
    string_data = {
        "host": host,
        "port": str(port),
        "username": username,
        "password": password,
        "tls": "starttls",
        "url": url,
    }
    data = {k: b64(v.encode()) for k, v in string_data.items()}
    if ca_pem is not None:
        data["ca.crt"] = b64(ca_pem)  # as given: a user's CA file need not be UTF-8
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": SECRET_TYPE,
        "metadata": {
            "name": app_secret_name(token, spec),
            "namespace": namespace,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner_reference("SmtpToken", token, token_uid)],
        },
        "data": data,
    }


def credential_entry(
    token: str,
    namespace: str,
    spec: SmtpTokenSpec,
    ip_domains: list[str],
    username: str,
    digests: list[c.PasswordDigest],
    campaign_id: int,
    webhooks: Sequence[c.WebhookEndpoint] = (),
) -> c.CredentialEntry:
    """``webhooks``: the subscriptions whose key could be read (:func:`webhook_endpoints`)."""
    allowed = [d for d in (spec.allowed_from_domains or ip_domains) if d in ip_domains]
    return c.CredentialEntry(
        webhooks=list(webhooks),
        username=username,
        namespace=namespace,
        token=token,
        digests=digests,
        allowed_from_domains=allowed,
        create_contacts=spec.create_contacts,
        email_campaign_id=campaign_id,
        expires_at=spec.expires_at,
    )


@dataclass(frozen=True)
class WebhookProblem:
    """Why a subscription was left out of the credential entry: a reason and a sentence that
    name the Secret and key, never their value."""

    webhook: str
    reason: str
    message: str


def webhook_secret_names(spec: SmtpTokenSpec) -> list[str]:
    """The Secrets (in the token's namespace) the token's webhooks read, each once."""
    return sorted({w.secret_ref.name for w in spec.webhooks or []})


def webhook_endpoints(
    namespace: str,
    spec: SmtpTokenSpec,
    secrets: Mapping[str, Obj | None],
    *,
    unreadable: Mapping[str, str] | None = None,
    previous: Sequence[c.WebhookEndpoint] = (),
) -> tuple[list[c.WebhookEndpoint], list[WebhookProblem]]:
    """The relay's view of the token's webhooks, with each key read from ``secrets`` (name ->
    the Secret as the API returned it, None: it does not exist), and the subscriptions left
    out with why. A key is checked as the relay will use it (:func:`c.webhook_key_bytes`), so
    a webhook that is listed can sign; nothing here quotes a key.

    ``unreadable``: Secrets whose read failed for a passing reason (name -> why, an HTTP
    status or error class): a webhook naming one keeps the key of its endpoint in
    ``previous`` (the token's current credential entry) with the spec's URL and types, or is
    left out when it had none; either way a WebhookSecretUnreadable problem says so."""
    endpoints: list[c.WebhookEndpoint] = []
    problems: list[WebhookProblem] = []
    kept = {e.name: e for e in previous}
    for hook in spec.webhooks or []:
        ref = hook.secret_ref
        where = f"Secret {namespace}/{ref.name}"
        why = (unreadable or {}).get(ref.name)
        if why is not None:
            old = kept.get(hook.name)
            outcome = (
                "the relay keeps signing with the key it has"
                if old is not None
                else "the webhook is left out until then"
            )
            problems.append(
                WebhookProblem(
                    hook.name,
                    "WebhookSecretUnreadable",
                    f"webhook {hook.name}: {where} could not be read ({why}); it is read "
                    f"again at the next check; {outcome}",
                )
            )
            if old is not None:
                endpoints.append(
                    old.model_copy(
                        update={"url": hook.url, "event_types": list(hook.event_types or [])}
                    )
                )
            continue
        fix = (
            f"put a Standard Webhooks signing key (whsec_<base64 of 24 to 64 random bytes>) "
            f"under key {ref.key!r}; the webhook is left out until then"
        )
        secret = secrets.get(ref.name)
        if secret is None:
            problems.append(
                WebhookProblem(
                    hook.name,
                    "WebhookSecretMissing",
                    f"webhook {hook.name}: {where} does not exist: create it and {fix}",
                )
            )
            continue
        raw = (secret.get("data") or {}).get(ref.key)
        if not raw:
            problems.append(
                WebhookProblem(
                    hook.name,
                    "WebhookSecretKeyMissing",
                    f"webhook {hook.name}: {where} has no key {ref.key!r}: {fix}",
                )
            )
            continue
        try:
            text = base64.b64decode(raw).decode("utf-8").strip()
            c.webhook_key_bytes(text)
        except (ValueError, UnicodeDecodeError) as exc:
            # webhook_key_bytes's messages name no part of the key; anything else (a
            # validation error may quote its input) is named by its class only.
            why = str(exc) if type(exc) is ValueError else type(exc).__name__
            problems.append(
                WebhookProblem(
                    hook.name,
                    "WebhookSecretInvalid",
                    f"webhook {hook.name}: key {ref.key!r} of {where} is not a usable signing "
                    f"key ({why}): {fix}",
                )
            )
            continue
        try:  # the key is fine: what fails here is the URL (the spec's pattern lets few by)
            endpoint = c.WebhookEndpoint(
                name=hook.name,
                url=hook.url,
                event_types=list(hook.event_types or []),
                secret=SecretStr(text),
            )
        except ValueError:  # a ValidationError quotes its input: name the URL, not the error
            problems.append(
                WebhookProblem(
                    hook.name,
                    "WebhookURLInvalid",
                    f"webhook {hook.name}: url {hook.url!r} is not an http:// or https:// URL "
                    f"with a host: fix spec.webhooks[].url; the webhook is left out until then",
                )
            )
            continue
        endpoints.append(endpoint)
    return endpoints, problems


def webhooks_condition(
    spec: SmtpTokenSpec, problems: Sequence[WebhookProblem]
) -> tuple[bool, str, str] | None:
    """The token's WebhooksReady condition (status, reason, message); None without webhooks."""
    hooks = spec.webhooks or []
    if not hooks:
        return None
    if problems:
        first = problems[0]
        return False, first.reason, "; ".join(p.message for p in problems)
    names = ", ".join(w.name for w in hooks)
    return True, "WebhooksConfigured", f"the relay signs and sends events to: {names}"


def rotated_digests(
    previous: list[c.PasswordDigest], new: c.PasswordDigest, now: datetime, grace: timedelta
) -> list[c.PasswordDigest]:
    """The digests valid after a reset: the new one, plus the old ones during the grace period."""
    kept = [new]
    if grace > timedelta(0):
        for old in previous:
            if old.generation < new.generation and old.valid_at(now):
                end = old.not_after or now + grace
                kept.append(old.model_copy(update={"not_after": min(end, now + grace)}))
    return kept


_DURATION = re.compile(r"0|(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h))+")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> timedelta:
    """A Go-style duration (0, 0s, 90s, 10m, 1h30m, 1.5h, 250ms), as the CRD pattern allows.

    Every text that pattern (``api.common.DURATION``) admits parses, so a validated
    SmtpTokenSpec never fails here; any other text is a ValueError that names it.
    """
    if not _DURATION.fullmatch(text):
        raise ValueError(f"duration {text!r} is not like 90s, 10m or 1h30m")
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))
    return timedelta(seconds=seconds)
