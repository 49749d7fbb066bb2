"""SMTP template sends: a submitted message that names a TransactionalEmail.

A message with ``X-Txmail-Email-Id: <emailId>`` is not relayed as it is: the template is
rendered with the properties of ``X-Txmail-Properties`` (JSON
``{"contactProperties": {...}, "customProperties": {...}}``) or, without that header, of a
JSON body of the same shape, and the rendered message is sent instead (the submitted
headers, including these two, are not kept). Recipients: ``To``/``Cc`` header addresses
that are envelope recipients stay visible, every other envelope recipient is Bcc; when no
``To`` address is an envelope recipient, every envelope recipient is a ``To``. The
submitted ``From`` (already checked against the sender policy) replaces the template's.
An optional ``X-Txmail-Send-Id`` is carried as the send id (for logs; SMTP sends are not
deduplicated).
"""

from __future__ import annotations

import email.policy
import json
import re
from email.message import EmailMessage
from email.parser import BytesHeaderParser, BytesParser
from email.utils import getaddresses
from typing import Any

from txmail_relay.sending.service import SendError, SendRequest

TEMPLATE_HEADER = "X-Txmail-Email-Id"
PROPERTIES_HEADER = "X-Txmail-Properties"
_HEADER_END = re.compile(rb"\r?\n\r?\n")


def parse_headers(content: bytes) -> EmailMessage:
    match = _HEADER_END.search(content)
    head = content[: match.start()] if match else content
    return BytesHeaderParser(policy=email.policy.default).parsebytes(head)


def _json_object(text: str, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise SendError("VALIDATION_FAILED", where, f"{where} is not valid JSON") from e
    if not isinstance(doc, dict):
        raise SendError("VALIDATION_FAILED", where, f"{where} must be a JSON object")
    return doc


def _properties(doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = doc.get(key) or {}
    if not isinstance(value, dict):
        raise SendError("VALIDATION_FAILED", f"{where}.{key}", f"{key} must be an object")
    return value


def _body_text(content: bytes) -> str:
    msg = BytesParser(policy=email.policy.default).parsebytes(content)
    if not isinstance(msg, EmailMessage):
        return ""
    part = msg.get_body(preferencelist=("plain",)) if msg.is_multipart() else msg
    if part is None:
        return ""
    try:
        text = part.get_content()
    except (LookupError, ValueError):
        return ""
    return text if isinstance(text, str) else ""


def template_request(content: bytes, envelope_rcpts: list[str]) -> SendRequest:
    """The :class:`SendRequest` a submitted message describes; raises :class:`SendError`."""
    headers = parse_headers(content)
    raw_id = str(headers.get(TEMPLATE_HEADER) or "").strip()
    if not raw_id.isdigit() or int(raw_id) <= 0:
        raise SendError("VALIDATION_FAILED", TEMPLATE_HEADER, "emailId must be a positive integer")
    props_header = headers.get(PROPERTIES_HEADER)
    if props_header is not None:
        doc = _json_object(str(props_header), PROPERTIES_HEADER)
        where = PROPERTIES_HEADER
    else:
        text = _body_text(content).strip()
        doc = _json_object(text, "body") if text.startswith("{") else {}
        where = "body"
    rcpts = list(dict.fromkeys(envelope_rcpts))
    lowered = {r.lower(): r for r in rcpts}

    def visible(name: str) -> list[str]:
        values = [str(v) for v in headers.get_all(name) or []]
        found = [lowered.get(a.lower()) for _, a in getaddresses(values)]
        return list(dict.fromkeys(a for a in found if a is not None))

    to, cc = visible("To"), visible("Cc")
    cc = [a for a in cc if a not in to]
    if not to:
        to, cc = rcpts, []
    bcc = [r for r in rcpts if r not in to and r not in cc]
    send_id = str(headers.get("X-Txmail-Send-Id") or "").strip() or None
    return SendRequest(
        email_id=int(raw_id),
        to=tuple(to),
        sender=str(headers.get("From") or "") or None,
        send_id=send_id,
        cc=tuple(cc),
        bcc=tuple(bcc),
        contact_properties=_properties(doc, "contactProperties", where),
        custom_properties=_properties(doc, "customProperties", where),
    )
