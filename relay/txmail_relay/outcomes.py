"""Per-recipient delivery outcomes, and the hook other components subscribe to."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class Outcome(StrEnum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    EXPIRED = "expired"

    @property
    def final(self) -> bool:
        return self is not Outcome.DEFERRED


@dataclass(frozen=True)
class OutcomeEvent:
    message_id: str
    username: str
    recipient: str
    outcome: Outcome
    reply: str
    attempts: int
    received_at: float
    at: float


class OutcomeListener(Protocol):
    def on_outcome(self, event: OutcomeEvent) -> None:
        """Called once per recipient per attempt; must not block."""
