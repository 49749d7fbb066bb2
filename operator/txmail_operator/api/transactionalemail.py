"""TransactionalEmail: a Jinja2 template (subject, html, text) with an emailId for the API."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar

from pydantic import ConfigDict, Field

from txmail_relay.contract import SubscriptionType

from .common import (
    EMAIL,
    Condition,
    DedicatedIPReference,
    Model,
    cel,
    conditions_field,
    observed_generation_field,
)

EmailAddress = Annotated[str, Field(max_length=320, pattern=EMAIL)]


class Sender(Model):
    name: str | None = Field(
        default=None,
        max_length=256,
        pattern=r"^[^\r\n]*$",
        description="Display name shown to the recipient.",
    )
    address: EmailAddress = Field(
        description="Sender address; its domain must be one of the DedicatedIP's domains."
    )


class EmailTracking(Model):
    opens: bool = Field(
        default=False,
        description="Add an open pixel (needs spec.tracking.baseURL on the DedicatedIP).",
    )
    clicks: bool = Field(
        default=False,
        description="Rewrite absolute http(s) links to count clicks (needs spec.tracking.baseURL "
        "on the DedicatedIP).",
    )


class Recipient(Model):
    address: EmailAddress = Field(description="Recipient address.")
    contact_properties: dict[str, Annotated[str, Field(max_length=4096)]] | None = Field(
        default=None,
        max_length=64,
        description="Values for {{ contact.* }} in the template, for this recipient.",
    )


class ConfigMapKeyReference(Model):
    name: str = Field(max_length=253, description="ConfigMap in this namespace.")
    key: str = Field(
        max_length=253,
        description="Key holding CSV: a header row with 'email' and contact property names, "
        "then one recipient per row.",
    )


class SendPhase(StrEnum):
    SCHEDULED = "Scheduled"
    SENDING = "Sending"
    COMPLETE = "Complete"
    CANCELED = "Canceled"
    FAILED = "Failed"


class OneOffSend(Model):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "has(self.recipients) != has(self.recipientsFrom)",
                    "set exactly one of send.recipients and send.recipientsFrom",
                ),
                cel(
                    "!has(oldSelf.sendGeneration) || !has(self.sendGeneration) || "
                    "self.sendGeneration >= oldSelf.sendGeneration",
                    "send.sendGeneration can only be raised: raising it sends again",
                ),
            ]
        }
    )

    recipients: list[Recipient] | None = Field(
        default=None, max_length=1000, description="Who receives the one-off send."
    )
    recipients_from: ConfigMapKeyReference | None = Field(
        default=None, description="A CSV list of recipients in a ConfigMap, for large sends."
    )
    custom_properties: dict[str, Annotated[str, Field(max_length=4096)]] | None = Field(
        default=None, max_length=64, description="Values for {{ custom.* }}, for every recipient."
    )
    at: datetime | None = Field(
        default=None, description="When to send (RFC 3339). Omitted: as soon as the email is Ready."
    )
    suspend: bool = Field(
        default=False, description="Hold the send; setting it before or while sending cancels."
    )
    send_generation: int = Field(
        default=1,
        ge=1,
        le=2**31 - 1,
        description="Raise it to send again after the send completed or was canceled; "
        "changing recipients or content alone never resends.",
    )


class TransactionalEmailSpec(Model):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "has(self.html) || has(self.text)",
                    "at least one of html and text is required",
                )
            ]
        }
    )

    dedicated_ip_ref: DedicatedIPReference = Field(
        alias="dedicatedIPRef", description="The DedicatedIP that sends this email."
    )
    sender: Sender = Field(alias="from", description="The From header of every message.")
    reply_to: list[EmailAddress] | None = Field(
        default=None, max_length=10, description="Reply-To addresses."
    )
    subject: str = Field(
        min_length=1,
        max_length=998,
        description="Subject line: a Jinja2 template; line breaks are removed when rendered.",
    )
    html: str | None = Field(
        default=None,
        max_length=262144,
        description="HTML body: a Jinja2 template with {{ contact.firstname }}-style contact "
        "properties and {{ custom.order_id }}-style custom properties, autoescaped.",
    )
    text: str | None = Field(
        default=None,
        max_length=131072,
        description="Plain-text body: a Jinja2 template with the same tokens as html.",
    )
    subscription_type: SubscriptionType = Field(
        default=SubscriptionType.TRANSACTIONAL,
        description="Transactional: sent regardless of the recipient's marketing subscriptions.",
    )
    tracking: EmailTracking = Field(
        default_factory=EmailTracking, description="Open and click tracking for this email."
    )
    send: OneOffSend | None = Field(
        default=None,
        description="A one-off or scheduled send of this email to a list of recipients, made "
        "by the operator through the relay (idempotent per recipient).",
    )


class SendStatus(Model):
    phase: SendPhase = Field(description="Scheduled, Sending, Complete, Canceled or Failed.")
    generation: int = Field(ge=1, description="The send.sendGeneration this status is about.")
    total: int = Field(default=0, ge=0, description="Recipients in the send.")
    accepted: int = Field(default=0, ge=0, description="Recipients the relay accepted.")
    failed: int = Field(default=0, ge=0, description="Recipients the relay refused.")
    message: str | None = Field(
        default=None, max_length=4096, description="Why recipients failed, or what is awaited."
    )
    started_at: datetime | None = Field(default=None, description="When sending began.")
    completed_at: datetime | None = Field(default=None, description="When sending ended.")


class TransactionalEmailStatus(Model):
    conditions: list[Condition] | None = conditions_field()
    email_id: int | None = Field(
        default=None,
        ge=1,
        le=2**53 - 1,
        description="The id to pass as emailId to the single-send API: stable and unique in "
        "the cluster.",
    )
    send: SendStatus | None = Field(default=None, description="Progress of spec.send.")
    observed_generation: int | None = observed_generation_field()


class TransactionalEmail(Model):
    """An email template kept in Git and sent with the single-send API or SMTP."""

    KIND: ClassVar[str] = "TransactionalEmail"
    PLURAL: ClassVar[str] = "transactionalemails"
    SCOPE: ClassVar[str] = "Namespaced"
    SHORT_NAMES: ClassVar[list[str]] = ["temail"]
    PRINTER_COLUMNS: ClassVar[list[dict[str, Any]]] = [
        {"name": "EmailId", "type": "integer", "jsonPath": ".status.emailId"},
        {"name": "DedicatedIP", "type": "string", "jsonPath": ".spec.dedicatedIPRef.name"},
        {
            "name": "Ready",
            "type": "string",
            "jsonPath": ".status.conditions[?(@.type=='Ready')].status",
        },
        {
            "name": "Reason",
            "type": "string",
            "jsonPath": ".status.conditions[?(@.type=='Ready')].reason",
            "priority": 1,
        },
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    NAME_MAX: ClassVar[int] = 63

    spec: TransactionalEmailSpec = Field(description="The template and who sends it.")
    status: TransactionalEmailStatus | None = Field(
        default=None, description="Whether the template is valid, and its emailId."
    )
