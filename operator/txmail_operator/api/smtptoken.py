"""SmtpToken: SMTP credentials for one app, delivered as a Secret in the app's namespace."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar

from pydantic import ConfigDict, Field

from .common import (
    DNS_SUBDOMAIN,
    DOMAIN,
    DURATION,
    Condition,
    DedicatedIPReference,
    Model,
    cel,
    conditions_field,
    immutable,
    observed_generation_field,
)
from .webhooks import Webhooks, WebhookStatus, webhooks_field, webhooks_status_field


class SecretTemplate(Model):
    labels: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        default=None, max_length=32, description="Labels copied onto the app Secret."
    )
    annotations: dict[str, Annotated[str, Field(max_length=4096)]] | None = Field(
        default=None,
        max_length=32,
        description="Annotations copied onto the app Secret (for example for a reloader).",
    )


class SmtpTokenSpec(Model):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(oldSelf.passwordGeneration) || !has(self.passwordGeneration) || "
                    "self.passwordGeneration >= oldSelf.passwordGeneration",
                    "passwordGeneration can only be raised: raising it resets the password",
                )
            ]
        }
    )

    dedicated_ip_ref: DedicatedIPReference = Field(
        alias="dedicatedIPRef",
        description="The DedicatedIP whose relay accepts these credentials. Immutable.",
        json_schema_extra=immutable("dedicatedIPRef"),
    )
    campaign_name: str | None = Field(
        default=None,
        max_length=256,
        description="Display name of the token (HubSpot's campaign name); the object's name "
        "when omitted.",
    )
    create_contacts: bool = Field(
        default=False,
        description="Record every new recipient of mail sent with this token as a contact.",
    )
    secret_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="Name of the Secret written in this namespace with host, port, username, "
        "password, tls, url and ca.crt; '<name>-smtp' when omitted. Immutable.",
        json_schema_extra=immutable("secretName"),
    )
    secret_template: SecretTemplate | None = Field(
        default=None, description="Labels and annotations for the app Secret."
    )
    allowed_from_domains: list[Annotated[str, Field(max_length=253, pattern=DOMAIN)]] | None = (
        Field(
            default=None,
            max_length=100,
            description="Domains this token may send from: a subset of the DedicatedIP's "
            "domains. All of the IP's domains when omitted.",
            json_schema_extra={"x-kubernetes-list-type": "set"},
        )
    )
    password_generation: int = Field(
        default=1,
        ge=1,
        le=2**31 - 1,
        description="Raise it by one to reset the password: the app Secret gets a new password "
        "and the old one stops working (after rotationGracePeriod).",
    )
    rotation_grace_period: str = Field(
        default="0s",
        max_length=32,
        pattern=DURATION,
        description="How long the previous password keeps working after a reset, for "
        "zero-downtime rollouts (for example 10m). 0s ends it at once.",
    )
    expires_at: datetime | None = Field(
        default=None,
        description="When the credentials stop working (RFC 3339). Tokens never expire when "
        "omitted.",
    )
    webhooks: Webhooks | None = webhooks_field()


class TokenStats(Model):
    """What this token's mail did, as its relay counts it (refreshed every statsInterval)."""

    sent: int = Field(default=0, ge=0, description="Messages accepted for delivery.")
    delivered: int = Field(default=0, ge=0, description="Recipients the next hop accepted.")
    bounced: int = Field(
        default=0,
        ge=0,
        description="Hard bounces: recipients refused permanently (a 5xx, a hard DSN, the "
        "queue lifetime reached).",
    )
    soft_bounces: int = Field(
        default=0, ge=0, description="Asynchronous DSNs that were not hard (soft bounces)."
    )
    opens: int = Field(default=0, ge=0, description="Open-pixel loads, repeats included.")
    clicks: int = Field(default=0, ge=0, description="Tracked link clicks, repeats included.")
    machine_opens: int = Field(
        default=0,
        ge=0,
        description="Opens by a machine (a link scanner, a prefetching proxy): not in opens.",
    )
    machine_clicks: int = Field(default=0, ge=0, description="Clicks by a machine: not in clicks.")
    dropped: int = Field(
        default=0, ge=0, description="Sends refused before spooling (a suppressed address)."
    )
    unique_opens: int = Field(default=0, ge=0, description="Messages opened at least once.")
    unique_clicks: int = Field(default=0, ge=0, description="Messages clicked at least once.")
    complaints: int = Field(default=0, ge=0, description="Spam complaints (ARF reports).")
    open_rate: float = Field(default=0.0, ge=0, description="uniqueOpens / delivered.")
    click_rate: float = Field(default=0.0, ge=0, description="uniqueClicks / delivered.")
    last_sent_at: datetime | None = Field(default=None, description="When mail was last sent.")
    contacts: int = Field(
        default=0, ge=0, description="Contacts recorded for this token (createContacts)."
    )
    updated_at: datetime | None = Field(
        default=None, description="When the relay last reported these figures."
    )


class SmtpTokenStatus(Model):
    conditions: list[Condition] | None = conditions_field()
    username: str | None = Field(
        default=None, max_length=64, description="SMTP username: unique in the cluster."
    )
    secret_name: str | None = Field(
        default=None, max_length=253, description="The app Secret holding the credentials."
    )
    password_generation: int | None = Field(
        default=None, ge=0, description="The passwordGeneration whose password is in effect."
    )
    email_campaign_id: int | None = Field(
        default=None,
        ge=1,
        description="Stable numeric id of the token, as HubSpot reports emailCampaignId.",
    )
    created_at: datetime | None = Field(default=None, description="When the token was issued.")
    stats: TokenStats | None = Field(
        default=None, description="Sent, delivered, bounced, opens, clicks and rates."
    )
    webhooks: list[WebhookStatus] | None = webhooks_status_field()
    observed_generation: int | None = observed_generation_field()


class SmtpToken(Model):
    """SMTP credentials for one app, scoped to one DedicatedIP."""

    KIND: ClassVar[str] = "SmtpToken"
    PLURAL: ClassVar[str] = "smtptokens"
    SCOPE: ClassVar[str] = "Namespaced"
    SHORT_NAMES: ClassVar[list[str]] = ["smtpt"]
    PRINTER_COLUMNS: ClassVar[list[dict[str, Any]]] = [
        {"name": "DedicatedIP", "type": "string", "jsonPath": ".spec.dedicatedIPRef.name"},
        {"name": "Username", "type": "string", "jsonPath": ".status.username"},
        {"name": "Secret", "type": "string", "jsonPath": ".status.secretName"},
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
    NAME_MAX: ClassVar[int] = 63  # used as a label value on the app Secret

    spec: SmtpTokenSpec = Field(description="Which IP the credentials are for, and their policy.")
    status: SmtpTokenStatus | None = Field(
        default=None, description="The issued username and the state of the credentials."
    )
