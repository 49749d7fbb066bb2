"""SmtpToken -> the app Secret (holds the password) and the relay's credential entry."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from urllib.parse import quote

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
) -> c.CredentialEntry:
    allowed = [d for d in (spec.allowed_from_domains or ip_domains) if d in ip_domains]
    return c.CredentialEntry(
        username=username,
        namespace=namespace,
        token=token,
        digests=digests,
        allowed_from_domains=allowed,
        create_contacts=spec.create_contacts,
        email_campaign_id=campaign_id,
        expires_at=spec.expires_at,
    )


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
