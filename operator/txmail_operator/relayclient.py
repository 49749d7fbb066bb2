"""The operator's client for a relay's single-send API, used for TransactionalEmail spec.send.

The operator is one more client of the HubSpot-compatible API: rendering, spooling,
idempotency by sendId and stats are the relay's, exactly as for apps.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

SEND_PATH = "/marketing/v3/transactional/single-email/send"


class RelayUnavailable(Exception):  # noqa: N818 - reads as a state, like ConnectionRefused
    """The relay could not be reached or failed (retry later)."""


@dataclass(frozen=True)
class SendReply:
    status: int
    send_result: str | None
    message: str


class RelayClient:
    def __init__(self, timeout: float = 30.0) -> None:
        self.timeout = timeout

    def send(self, base_url: str, password: str, payload: dict[str, Any]) -> SendReply:
        request = urllib.request.Request(  # noqa: S310 - http(s) URL validated by the CRD
            base_url.rstrip("/") + SEND_PATH,
            data=json.dumps(payload).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {password}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                body = json.loads(response.read() or b"{}")
                return SendReply(response.status, body.get("sendResult"), "")
        except urllib.error.HTTPError as exc:
            try:
                body = json.loads(exc.read() or b"{}")
            except ValueError:
                body = {}
            return SendReply(exc.code, body.get("sendResult"), str(body.get("message", "")))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise RelayUnavailable(f"{base_url}: {type(exc).__name__}") from None
