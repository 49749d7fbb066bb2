"""The feedback API on the api listener: the suppression list and the events pull endpoint.

Authenticated like the send API (:class:`~txmail_relay.http.api.TokenAuth`: the SmtpToken's
password, Bearer or Basic) and limited to the token's namespace: a token sees and changes
only its namespace's suppression entries (and sees the relay-wide ones recorded before
suppression was per namespace, which it cannot remove), and only its namespace's events.
Errors are the send API's JSON error body, naming the field (``errors[0].in``).

* ``GET /txmail/v1/suppressions?reason=&after=&limit=``: HubSpot-style paging
  (``{results, paging: {next: {after}}}``), by address.
* ``GET|PUT|DELETE /txmail/v1/suppressions/{address}``: look up, add (body
  ``{"reason": "MANUAL"}``, optional), remove.
* ``GET /email/public/v1/events?eventType=&recipient=&statusId=&startTimestamp=
  &endTimestamp=&excludeFilteredEvents=&offset=&limit=``: HubSpot's legacy events API shape
  (``{hasMore, offset, events}``), oldest first; ``offset`` is the cursor to pass back;
  both timestamps are inclusive.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from txmail_relay.config.live import LiveConfig
from txmail_relay.contract import CredentialEntry
from txmail_relay.http.api import RETRY_AFTER_STORAGE, TokenAuth, error_response, iso
from txmail_relay.mail.addresses import is_smtp_address
from txmail_relay.records.database import RecordsFullError
from txmail_relay.records.model import EventType, Suppression
from txmail_relay.records.records import Records
from txmail_relay.records.suppressions import SuppressionEntry
from txmail_relay.sending.policy import SUPPRESSED_RESULTS, suppression_reasons

SUPPRESSIONS_PATH = "/txmail/v1/suppressions"
SUPPRESSION_PATH = "/txmail/v1/suppressions/{address}"
EVENTS_PATH = "/email/public/v1/events"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_ADDRESS = 254  # RFC 5321's path limit, less the brackets
MAX_BODY = 4096


class _Invalid(Exception):  # noqa: N818 - internal signal, not an error class
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _invalid(e: _Invalid) -> web.Response:
    return error_response(400, "VALIDATION_ERROR", e.message, field=e.field)


def _full() -> web.Response:
    """The records' volume is full: the relay's fault, retry later (as the send API)."""
    return error_response(
        503,
        "RATE_LIMITS",
        "insufficient storage, try later",
        headers={"Retry-After": RETRY_AFTER_STORAGE},
    )


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:
        raise _Invalid("limit", f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


def _reason(value: Any, field: str) -> Suppression:
    try:
        return Suppression(value)
    except ValueError:
        names = ", ".join(r.value for r in Suppression)
        raise _Invalid(field, f"{field} must be one of {names}") from None


def _address(value: str, field: str = "address") -> str:
    if len(value) > MAX_ADDRESS or not is_smtp_address(value):
        raise _Invalid(field, f"{field} must be an email address (local@domain)")
    return value.lower()


def _millis(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 15:
        raise _Invalid(name, f"{name} must be milliseconds since the epoch")
    return int(raw)


def _flag(request: web.Request, name: str) -> bool:
    raw = request.query.get(name)
    if raw is None or raw.lower() == "false":
        return False
    if raw.lower() == "true":
        return True
    raise _Invalid(name, f"{name} must be true or false")


def _offset(request: web.Request) -> int:
    raw = request.query.get("offset") or "0"
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise _Invalid("offset", "offset must be the offset of an earlier answer")
    return int(raw)


def _types(request: web.Request) -> list[EventType]:
    found: list[EventType] = []
    for raw in request.query.getall("eventType", []):
        for name in raw.split(","):
            try:
                found.append(EventType(name.strip().upper()))
            except ValueError:
                names = ", ".join(t.value for t in EventType)
                raise _Invalid("eventType", f"eventType must be one of {names}") from None
    return found


class FeedbackApi:
    def __init__(
        self,
        auth: TokenAuth,
        records: Records,
        config: LiveConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._auth = auth
        self._records = records
        self._config = config
        self._clock = clock

    def install(self, app: web.Application) -> None:
        app.router.add_get(SUPPRESSIONS_PATH, self.list_suppressions)
        app.router.add_get(SUPPRESSION_PATH, self.get_suppression)
        app.router.add_put(SUPPRESSION_PATH, self.put_suppression)
        app.router.add_delete(SUPPRESSION_PATH, self.delete_suppression)
        app.router.add_get(EVENTS_PATH, self.events)

    # -- suppressions ----------------------------------------------------------------------

    def _view(self, address: str, entries: Sequence[SuppressionEntry]) -> dict[str, Any]:
        """One address: each entry that applies in the namespace, whether it is enforced
        (automatic entries only when the DedicatedIP opts in) and what a send answers."""
        enforced = set(suppression_reasons(self._config.current))
        shown = [
            {
                "reason": e.reason.value,
                "createdAt": iso(e.at),
                "enforced": e.reason in enforced,
                "relayWide": e.relay_wide,
            }
            for e in entries
        ]
        first = next(
            (e.reason for e in sorted(entries, key=lambda e: e.reason) if e.reason in enforced),
            None,
        )
        view: dict[str, Any] = {"address": address, "suppressed": first is not None}
        if first is not None:
            view["sendResult"] = SUPPRESSED_RESULTS[first].value
        view["entries"] = shown
        return view

    async def list_suppressions(self, request: web.Request) -> web.Response:
        entry = self._auth.authenticate(request)
        if isinstance(entry, web.Response):
            return entry
        try:
            limit = _limit(request)
            raw = request.query.get("reason")
            reasons = [_reason(raw, "reason")] if raw is not None else []
            after = request.query.get("after", "")
        except _Invalid as e:
            return _invalid(e)
        page = await self._records.suppressions.page(
            entry.namespace, reasons=reasons, after=after, limit=limit + 1
        )
        body: dict[str, Any] = {"results": [self._view(a, es) for a, es in page[:limit]]}
        if len(page) > limit:
            body["paging"] = {"next": {"after": page[limit - 1][0]}}
        return web.json_response(body)

    def _one_address(self, request: web.Request) -> tuple[CredentialEntry, str] | web.Response:
        """The token and the path's address of a ``/suppressions/{address}`` request, or the
        refusal (401 without the token's credentials, 400 naming the address)."""
        entry = self._auth.authenticate(request)
        if isinstance(entry, web.Response):
            return entry
        try:
            return entry, _address(request.match_info["address"])
        except _Invalid as e:
            return _invalid(e)

    async def get_suppression(self, request: web.Request) -> web.Response:
        found = self._one_address(request)
        if isinstance(found, web.Response):
            return found
        entry, address = found
        entries = await self._records.suppressions.get(entry.namespace, address)
        if not entries:
            return error_response(404, "OBJECT_NOT_FOUND", "this address is not suppressed")
        return web.json_response(self._view(address, entries))

    async def put_suppression(self, request: web.Request) -> web.Response:
        found = self._one_address(request)
        if isinstance(found, web.Response):
            return found
        entry, address = found
        try:
            reason = await self._body_reason(request)
        except _Invalid as e:
            return _invalid(e)
        try:
            created = await self._records.suppressions.put(
                entry.namespace, address, reason, self._clock()
            )
        except RecordsFullError:
            return _full()
        entries = await self._records.suppressions.get(entry.namespace, address)
        return web.json_response(self._view(address, entries), status=201 if created else 200)

    async def _body_reason(self, request: web.Request) -> Suppression:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise _Invalid("body", f"the body must be at most {MAX_BODY} bytes")
        raw = await request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            raise _Invalid("body", f"the body must be at most {MAX_BODY} bytes")
        if not raw.strip():
            return Suppression.MANUAL
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            raise _Invalid("body", "the body is not valid JSON") from None
        if not isinstance(doc, dict):
            raise _Invalid("body", "the body must be a JSON object")
        unknown = sorted(set(doc) - {"reason"})
        if unknown:
            raise _Invalid(unknown[0], f"unknown field {unknown[0]}")
        return _reason(doc.get("reason", Suppression.MANUAL.value), "reason")

    async def delete_suppression(self, request: web.Request) -> web.Response:
        found = self._one_address(request)
        if isinstance(found, web.Response):
            return found
        entry, address = found
        try:
            removed = await self._records.suppressions.remove(entry.namespace, address)
        except RecordsFullError:
            return _full()
        if removed:
            # The namespace's own entries are gone; a relay-wide one may still apply: then
            # 200 with what is left (``suppressed`` says whether a send is still refused).
            left = await self._records.suppressions.get(entry.namespace, address)
            if left:
                return web.json_response(self._view(address, left))
            return web.Response(status=204)
        if await self._records.suppressions.get(entry.namespace, address):
            return error_response(
                409,
                "CONFLICT",
                "this address is suppressed relay-wide (recorded before suppression was per "
                "namespace); the relay's operator can remove it, a token cannot",
                field="address",
                code="RELAY_WIDE",
            )
        return error_response(404, "OBJECT_NOT_FOUND", "this address is not suppressed")

    # -- events ----------------------------------------------------------------------------

    async def events(self, request: web.Request) -> web.Response:
        entry = self._auth.authenticate(request)
        if isinstance(entry, web.Response):
            return entry
        try:
            limit = _limit(request)
            types = _types(request)
            offset = _offset(request)
            recipient = request.query.get("recipient")
            if recipient is not None:
                recipient = _address(recipient, "recipient")
            status_id = request.query.get("statusId") or None
            start = _millis(request, "startTimestamp")
            end = _millis(request, "endTimestamp")
            exclude_filtered = _flag(request, "excludeFilteredEvents")
        except _Invalid as e:
            return _invalid(e)
        # HubSpot's bounds, in its milliseconds (an event's ``created`` is floored to them):
        # startTimestamp at or after, endTimestamp at or before (inclusive).
        found, scanned = await self._records.events.search(
            entry.namespace,
            after=offset,
            types=types,
            recipient=recipient,
            status_id=status_id,
            start=None if start is None else start / 1000,
            end=None if end is None else (end + 1) / 1000,
            machine=not exclude_filtered,
            limit=limit + 1,
        )
        shown = found[:limit]
        more = len(found) > limit
        # No more: the offset is where the scan stopped (the newest event when it began), so
        # the next poll scans only what is newer, however little of it matched.
        return web.json_response(
            {
                "hasMore": more,
                "offset": str(shown[-1].seq if more else scanned),
                "events": [e.view() for e in shown],
            }
        )
