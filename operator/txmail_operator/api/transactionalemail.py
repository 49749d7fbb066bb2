"""TransactionalEmail: a Jinja2 template (subject, html, text) with an emailId for the API."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, ClassVar

from pydantic import ConfigDict, Field

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


class SubscriptionType(StrEnum):
    TRANSACTIONAL = "Transactional"


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


class TransactionalEmailStatus(Model):
    conditions: list[Condition] | None = conditions_field()
    email_id: int | None = Field(
        default=None,
        ge=1,
        le=2**53 - 1,
        description="The id to pass as emailId to the single-send API: stable and unique in "
        "the cluster.",
    )
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
