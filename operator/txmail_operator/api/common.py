"""Types shared by the three kinds: the base model, references, selectors and conditions."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "txmail.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# RFC 1123 DNS names and labels, as Kubernetes validates them.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A sending domain or EHLO hostname: a fully qualified name of at least two labels.
DOMAIN = r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.)+[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"
# A Go-style duration as Kubernetes writes them: 0s, 90s, 10m, 1h30m, 1.5h.
DURATION = r"^(0|([0-9]+(\.[0-9]+)?(ms|s|m|h))+)$"
# An addr-spec: strict enough to reject typos and header injection, loose enough for IDNs.
EMAIL = r"^[^\s@<>()\[\],;:\"\\]{1,64}@[^\s@<>()\[\],;:\"\\]{1,255}$"

Cel = dict[str, Any]


def cel(rule: str, message: str, reason: str | None = None, field: str | None = None) -> Cel:
    """A CEL ``x-kubernetes-validations`` rule for ``json_schema_extra``."""
    out: Cel = {"rule": rule, "message": message}
    if reason:
        out["reason"] = reason
    if field:
        out["fieldPath"] = field
    return out


def immutable(what: str) -> dict[str, Any]:
    return {"x-kubernetes-validations": [cel("self == oldSelf", f"{what} is immutable")]}


class Model(BaseModel):
    """Base of every API model: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_enum_values=False,
    )

    def wire(self) -> dict[str, Any]:
        """The object as the API server stores it (camelCase, no nulls)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class LocalObjectReference(Model):
    name: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)] = Field(
        description="Name of the referenced object."
    )


class DedicatedIPReference(Model):
    name: Annotated[str, Field(min_length=1, max_length=50, pattern=DNS_LABEL)] = Field(
        description="Name of the DedicatedIP (cluster-scoped) whose relay sends this mail."
    )


class LabelSelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class LabelSelectorRequirement(Model):
    key: str = Field(max_length=317, description="The label key the selector applies to.")
    operator: LabelSelectorOperator = Field(
        description="How the key relates to the values: In, NotIn, Exists or DoesNotExist."
    )
    values: list[Annotated[str, Field(max_length=63)]] | None = Field(
        default=None,
        max_length=64,
        description="Values for In and NotIn; must be empty for Exists and DoesNotExist.",
    )


class LabelSelector(Model):
    """A standard Kubernetes label selector. An empty selector matches every namespace."""

    match_labels: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        default=None,
        max_length=32,
        description="Namespaces must carry all of these labels with these values.",
    )
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        default=None,
        max_length=16,
        description="Namespaces must satisfy all of these label requirements.",
    )

    def matches(self, labels: dict[str, str]) -> bool:
        for key, value in (self.match_labels or {}).items():
            if labels.get(key) != value:
                return False
        for req in self.match_expressions or []:
            present, values = req.key in labels, req.values or []
            if req.operator is LabelSelectorOperator.IN and labels.get(req.key) not in values:
                return False
            if (
                req.operator is LabelSelectorOperator.NOT_IN
                and present
                and labels[req.key] in values
            ):
                return False
            if req.operator is LabelSelectorOperator.EXISTS and not present:
                return False
            if req.operator is LabelSelectorOperator.DOES_NOT_EXIST and present:
                return False
        return True


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(Model):
    """A metav1.Condition: the latest observation of one aspect of the object's state."""

    type: str = Field(
        max_length=316,
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
        r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
        description="Which aspect this condition describes, for example Ready.",
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="A CamelCase word that says why the condition is in its status.",
    )
    message: str = Field(
        default="",
        max_length=32768,
        description="What a person should know about the condition, in a sentence.",
    )
    last_transition_time: datetime = Field(
        description="When the status last changed from one value to another."
    )
    observed_generation: int | None = Field(
        default=None,
        ge=0,
        description="The metadata.generation this condition was computed from.",
    )


CONDITIONS_SCHEMA_EXTRA: dict[str, Any] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}


def conditions_field() -> Any:
    return Field(
        default=None,
        max_length=16,
        description="The latest observations of the object's state (Ready and friends).",
        json_schema_extra=CONDITIONS_SCHEMA_EXTRA,
    )


def observed_generation_field() -> Any:
    return Field(
        default=None,
        ge=0,
        description="The metadata.generation the operator last reconciled.",
    )
