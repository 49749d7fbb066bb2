"""The txmail.dev/v1alpha1 API: pydantic models that are the single source of truth for the CRDs."""

from .common import API_VERSION, GROUP, VERSION, Condition, ConditionStatus, LabelSelector
from .dedicatedip import DedicatedIP, DedicatedIPSpec, DedicatedIPStatus
from .smtptoken import SmtpToken, SmtpTokenSpec, SmtpTokenStatus
from .transactionalemail import TransactionalEmail, TransactionalEmailSpec, TransactionalEmailStatus

KINDS = (DedicatedIP, SmtpToken, TransactionalEmail)

__all__ = [
    "API_VERSION",
    "GROUP",
    "KINDS",
    "VERSION",
    "Condition",
    "ConditionStatus",
    "DedicatedIP",
    "DedicatedIPSpec",
    "DedicatedIPStatus",
    "LabelSelector",
    "SmtpToken",
    "SmtpTokenSpec",
    "SmtpTokenStatus",
    "TransactionalEmail",
    "TransactionalEmailSpec",
    "TransactionalEmailStatus",
]
