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
from collections.abc import Sequence
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

from txmail_relay.contract import SendResult
from txmail_relay.mail.submission import PROPERTIES_HEADER, TEMPLATE_HEADER, Submission
from txmail_relay.sending.model import SendRequest
from txmail_relay.sending.policy import SendError, parse_email_id, property_refusal


def _json_object(text: str, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: arrays nested 50,000 deep
        raise SendError(SendResult.VALIDATION_FAILED, where, f"{where} is not valid JSON") from e
    if not isinstance(doc, dict):
        raise SendError(SendResult.VALIDATION_FAILED, where, f"{where} must be a JSON object")
    return doc


def _properties(doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = doc.get(key) or {}
    if not isinstance(value, dict):
        raise SendError(SendResult.VALIDATION_FAILED, f"{where}.{key}", f"{key} must be an object")
    refused = property_refusal(value, f"{where}.{key}")
    if refused is not None:
        raise refused
    return value


def _body_text(content: bytes) -> str:
    """The text body (JSON properties), when no header carries them: a body parse."""
    try:
        msg = BytesParser(policy=email.policy.default).parsebytes(content)
        if not isinstance(msg, EmailMessage):
            return ""
        part = msg.get_body(preferencelist=("plain",)) if msg.is_multipart() else msg
        text = "" if part is None else part.get_content()
    except Exception:  # the stdlib parser on hostile MIME (nesting, bad headers): no properties
        return ""
    return text if isinstance(text, str) else ""


def _visible(addresses: Sequence[str], lowered: dict[str, str]) -> list[str]:
    """The envelope recipients among header addresses, in header order, once each."""
    found = [lowered.get(a.lower()) for a in addresses]
    return list(dict.fromkeys(a for a in found if a is not None))


def template_request(submission: Submission) -> SendRequest:
    """The :class:`SendRequest` a submitted message describes; raises :class:`SendError`."""
    headers = submission.headers
    fields = headers.template
    if fields is None:
        raise ValueError("not a template send")
    email_id = parse_email_id(fields.email_id, TEMPLATE_HEADER)
    if fields.properties is not None:
        doc = _json_object(fields.properties, PROPERTIES_HEADER)
        where = PROPERTIES_HEADER
    else:
        text = _body_text(submission.content).strip()
        doc = _json_object(text, "body") if text.startswith("{") else {}
        where = "body"
    rcpts = list(dict.fromkeys(submission.recipients))
    lowered = {r.lower(): r for r in rcpts}
    to, cc = _visible(headers.to, lowered), _visible(headers.cc, lowered)
    cc = [a for a in cc if a not in to]
    if not to:
        to, cc = rcpts, []
    bcc = [r for r in rcpts if r not in to and r not in cc]
    return SendRequest(
        email_id=email_id,
        to=tuple(to),
        sender=headers.sender,
        send_id=fields.send_id,
        cc=tuple(cc),
        bcc=tuple(bcc),
        contact_properties=_properties(doc, "contactProperties", where),
        custom_properties=_properties(doc, "customProperties", where),
    )
