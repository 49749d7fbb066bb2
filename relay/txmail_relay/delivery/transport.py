"""Outbound delivery: to a smarthost or to the recipients' MX hosts, over pooled connections.

:class:`SmtpTransport` maps each recipient to an outcome: 2xx after the final dot is
``delivered``, 5xx ``bounced``, and 4xx, timeouts and connection errors ``deferred`` (the
queue decides about retries and expiry). Connect-time failures move on to the next MX host;
a failure in the middle of a transaction does not, since the message may have arrived.

:meth:`SmtpTransport.destination` names where a recipient's mail goes for scheduling: the
queue runs at most ``Destination.concurrency`` attempts to one destination at once, so one
that hangs (a tarpit, an MX lookup without answer) holds only its share of the workers.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import random
import ssl
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import (
    COMMAND_INJECTION_REGEX,
    MAX_LINE_LENGTH,
    MAX_RESPONSE_LENGTH,
    PERIOD_REGEX,
    normalize_message_line_endings,
)
from aiosmtplib.response import SMTPResponse

from txmail_relay.config.live import LiveConfig
from txmail_relay.contract import DeliveryMode, RelayConfig, SmarthostConfig, SmarthostTLS
from txmail_relay.delivery.shaping import SMARTHOST, Shaper, SiteState
from txmail_relay.outcomes import Outcome
from txmail_relay.settings import OutboundSettings, RetrySettings

log = logging.getLogger(__name__)

MAX_MX_ADDRESSES = 5  # Postfix smtp_mx_address_limit

Sign = Callable[[bytes], Awaitable[bytes]]  # DKIM (delivery/dkim.py); never raises


@dataclass(frozen=True)
class RecipientResult:
    outcome: Outcome
    reply: str
    # False: nothing was sent because the destination is paused (shaping): the queue keeps
    # the mail without counting an attempt.
    attempted: bool = True
    # True: ``reply`` is the destination's own SMTP reply; False: the relay wrote it, as
    # there was no answer (refused, timed out, TLS failure, connection lost). Shaping pauses
    # on answers only (delivery/shaping.py).
    answered: bool = False


@dataclass(frozen=True)
class Destination:
    """Where a recipient's mail goes, as the queue schedules it: all attempts to one ``key``
    share its ``concurrency`` (at most that many in flight at once)."""

    key: str
    concurrency: int
    # Seconds before an attempt may start (a paused destination); not part of its identity.
    delay: float = field(default=0.0, compare=False)


class Transport(Protocol):
    def destination(self, recipient: str) -> Destination:
        """The destination of ``recipient`` under the current configuration."""

    async def deliver(
        self, mail_from: str, recipients: Sequence[str], body: bytes, *, sign: Sign | None = None
    ) -> list[RecipientResult]:
        """One attempt for ``recipients`` (of one destination); one result each, in order.
        ``sign`` (DKIM) is applied to ``body`` once, only if a transaction is about to carry
        it: not for an attempt sent back unattempted (``RecipientResult.attempted``)."""

    async def close(self) -> None: ...


class TLSMode(StrEnum):
    IMPLICIT = "implicit"
    STARTTLS = "starttls"
    OPPORTUNISTIC = "opportunistic"
    NONE = "none"


@dataclass(frozen=True)
class Route:
    """One way to reach a server; also the key of pooled connections."""

    host: str
    port: int
    tls: TLSMode
    verify: bool
    source: str | None
    helo: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def _result(code: int, message: str) -> RecipientResult:
    outcome = Outcome.BOUNCED if 500 <= code < 600 else Outcome.DEFERRED
    return RecipientResult(outcome, f"{code} {message}", answered=True)


async def _answered(
    client: aiosmtplib.SMTP,
    results: dict[str, RecipientResult],
    accepted: list[str],
    final: SMTPResponse,
) -> tuple[dict[str, RecipientResult], bool]:
    """The end of a transaction at its last reply (the final dot's, or a refused DATA's when
    not pipelined): at a 250 every ``accepted`` recipient is delivered, otherwise refused with
    that reply and the connection RSET. ``results`` (the refused RCPTs) with theirs added,
    and whether the connection can carry another message."""
    if final.code != 250:
        results.update(dict.fromkeys(accepted, _result(final.code, final.message)))
        return results, await _reset(client)
    reply = f"{final.code} {final.message}"
    delivered = RecipientResult(Outcome.DELIVERED, reply, answered=True)
    results.update(dict.fromkeys(accepted, delivered))
    return results, True


def _domain(recipient: str) -> str:
    return recipient.rpartition("@")[2].lower()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {exc.message}"
    return f"451 4.4.1 {type(exc).__name__}: {exc}"


# -- connection pool -------------------------------------------------------------------------


@dataclass(eq=False)
class Connection:
    route: Route
    client: aiosmtplib.SMTP
    reused: bool = False
    uses: int = 0
    idle_since: float = 0.0
    site: SiteState | None = None  # the destination whose connection count it holds


class DestinationPausedError(Exception):
    """The destination was paused while a connection waited for room under its limit."""


class ConnectionPool:
    """Idle connections per route, reused for up to ``max_uses`` transactions (or the
    destination's messages per connection). With a ``site``, a new connection waits for room
    under the destination's connection limit (idle or in use, on any of its routes; an idle
    one on another route is closed to make room)."""

    def __init__(
        self,
        connect: Callable[[Route], Awaitable[aiosmtplib.SMTP]],
        *,
        idle_timeout: float,
        max_uses: int,
        clock: Callable[[], float] = time.monotonic,
        shaper: Shaper | None = None,
    ) -> None:
        self._connect = connect
        self._idle_timeout = idle_timeout
        self._max_uses = max_uses
        self._clock = clock
        self._shaper = shaper
        self._idle: dict[Route, list[Connection]] = defaultdict(list)

    async def acquire(
        self, route: Route, *, fresh: bool = False, site: SiteState | None = None
    ) -> Connection:
        while True:
            self._prune()
            idle = self._idle.get(route)
            while idle and not fresh:
                conn = idle.pop()
                if conn.client.is_connected:
                    conn.reused = True
                    return conn
                self._close(conn)
            if site is None or self._shaper is None or site.has_room():
                break
            if not self._close_idle(site):
                await self._shaper.wait_for_room(site)
                if self._shaper.paused_for(site) > 0.0:  # paused while this one waited
                    raise DestinationPausedError(site.name)
        if site is not None and self._shaper is not None:
            self._shaper.opened(site)
        try:
            client = await self._connect(route)
        except BaseException:
            if site is not None and self._shaper is not None:
                self._shaper.closed(site)
            raise
        return Connection(route, client, site=site if self._shaper is not None else None)

    def release(self, conn: Connection, *, reusable: bool) -> None:
        conn.uses += 1
        max_uses = (conn.site.max_uses if conn.site else None) or self._max_uses
        if reusable and conn.uses < max_uses and conn.client.is_connected:
            conn.idle_since = self._clock()
            self._idle[conn.route].append(conn)
            if conn.site is not None and self._shaper is not None:
                self._shaper.notify(conn.site)  # a waiter may close it to make room
        else:
            self._close(conn)

    def discard(self, conn: Connection) -> None:
        self._close(conn)

    def _close(self, conn: Connection) -> None:
        conn.client.close()
        if conn.site is not None and self._shaper is not None:
            self._shaper.closed(conn.site)
        conn.site = None  # counted once

    def _close_idle(self, site: SiteState) -> bool:
        """Close one idle connection of ``site`` (on any route); whether there was one."""
        for route, conns in self._idle.items():
            for conn in conns:
                if conn.site is site:
                    conns.remove(conn)
                    if not conns:
                        del self._idle[route]
                    self._close(conn)
                    return True
        return False

    def _prune(self) -> None:
        horizon = self._clock() - self._idle_timeout
        for route in list(self._idle):
            keep = []
            for conn in self._idle[route]:
                if conn.idle_since > horizon:
                    keep.append(conn)
                else:
                    self._close(conn)
            if keep:
                self._idle[route] = keep
            else:
                del self._idle[route]

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                self._close(conn)
        self._idle.clear()


# -- MX resolution ---------------------------------------------------------------------------


class LookupFailedError(Exception):
    def __init__(self, reply: str, *, permanent: bool) -> None:
        super().__init__(reply)
        self.reply = reply
        self.permanent = permanent


def _nameserver(spec: str) -> dns.nameserver.Nameserver:
    """``ip``, ``ip:port``, ``[v6]:port`` or a bare IPv6 address."""
    host, port = spec, 53
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        port = int(rest.lstrip(":") or 53)
    elif spec.count(":") == 1:
        host, _, port_text = spec.partition(":")
        port = int(port_text)
    return dns.nameserver.Do53Nameserver(host, port)


class MxResolver:
    """MX lookup (RFC 5321 5.1): preference order, implicit MX, null MX; A/AAAA of each."""

    def __init__(self, nameservers: Sequence[str], lifetime: float = 10.0) -> None:
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [_nameserver(s) for s in nameservers]
        else:
            resolver = dns.asyncresolver.Resolver()
        resolver.lifetime = lifetime
        self._resolver = resolver

    async def addresses(self, domain: str) -> list[str]:
        return (await self.lookup(domain))[1]

    async def lookup(self, domain: str) -> tuple[list[str], list[str]]:
        """The MX hosts of ``domain`` (the destination is rolled up by them) and their
        addresses."""
        hosts = await self._mx_hosts(domain)
        found: list[str] = []
        temporary = False
        for host in hosts:
            for rdtype in ("A", "AAAA"):
                try:
                    answer = await self._resolver.resolve(host, rdtype)
                except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                    continue
                except dns.exception.DNSException:
                    temporary = True
                    continue
                found += [r.address for r in answer if r.address not in found]
        if not found:
            reason = "lookup failed" if temporary else "has no address"
            raise LookupFailedError(
                f"451 4.4.3 mail exchanger of {domain} {reason}", permanent=False
            )
        return hosts, found

    async def _mx_hosts(self, domain: str) -> list[str]:
        try:
            answer = await self._resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN as exc:
            raise LookupFailedError(
                f"550 5.1.2 domain {domain} does not exist", permanent=True
            ) from exc
        except dns.resolver.NoAnswer:
            return [domain]  # implicit MX
        except dns.exception.DNSException as exc:
            raise LookupFailedError(
                f"451 4.4.3 MX lookup for {domain} failed", permanent=False
            ) from exc
        records = list(answer)
        if len(records) == 1 and records[0].exchange.to_text() == ".":
            raise LookupFailedError(
                f"556 5.1.10 domain {domain} does not accept mail (null MX)", permanent=True
            )
        random.shuffle(records)  # RFC 5321 5.1: randomise equal preferences
        records.sort(key=lambda r: r.preference)
        return [r.exchange.to_text(omit_final_dot=True) for r in records]


# -- transport -------------------------------------------------------------------------------


class _StaleConnectionError(Exception):
    """The server closed a connection before MAIL, or answered MAIL with 421: nothing was
    sent. The argument, if any, is the server's reply."""


def _same_family(address: str, source: str | None) -> bool:
    if source is None:
        return True
    return ipaddress.ip_address(address).version == ipaddress.ip_address(source).version


def _mtime(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        return path.stat().st_mtime_ns
    except OSError:  # load_verify_locations says why
        return None


def _read_secret(directory: str | None, name: str) -> str | None:
    if directory is None:
        return None
    return (Path(directory) / name).read_text(encoding="utf-8").strip()


class SmtpTransport:
    """Delivers with aiosmtplib according to the current RelayConfig's ``delivery``."""

    def __init__(
        self,
        store: LiveConfig,
        retry: RetrySettings,
        outbound: OutboundSettings,
        *,
        resolver_factory: Callable[[Sequence[str]], MxResolver] = MxResolver,
        shaper: Shaper | None = None,
    ) -> None:
        self._store = store
        self.shaper = shaper or Shaper(store)
        self.shaper.max_backoff = retry.max_backoff
        self._retry = retry
        self._ca_file = outbound.ca_file
        self._concurrency = outbound.concurrency
        self._per_domain = min(
            outbound.concurrency,
            outbound.destination_concurrency or max(1, outbound.concurrency // 4),
        )
        self._resolver_factory = resolver_factory
        self._resolvers: dict[tuple[str, ...], MxResolver] = {}
        # verify -> (caFile's mtime when built, the context)
        self._tls_contexts: dict[bool, tuple[int | None, ssl.SSLContext]] = {}
        self._pool = ConnectionPool(
            self._connect,
            idle_timeout=outbound.pool_idle_timeout,
            max_uses=outbound.messages_per_connection,
            shaper=self.shaper,
        )

    async def close(self) -> None:
        self._pool.close()

    def destination(self, recipient: str) -> Destination:
        """The recipient's domain in Direct mode (as Postfix's queue manager schedules by
        next-hop domain): it is known before any DNS lookup, so a hanging MX lookup is held
        to the domain's share too, and it is how :meth:`deliver` groups a transaction. The
        smarthost, when all mail goes there, is one destination with all the workers: there
        is nothing to be fair to.

        Shaping (:mod:`.shaping`): once a lookup has told the domain's destination (its MX
        hosts rolled up), the domain is scheduled as that destination, within its connection
        limit (one while it is probed after a pause), and not before its pause ends."""
        config = self._store.current
        if config is None:
            return Destination("unconfigured", self._concurrency)
        delivery = config.relay.delivery
        shaper = self.shaper
        if delivery.mode is DeliveryMode.SMARTHOST and delivery.smarthost is not None:
            smarthost = delivery.smarthost
            key = f"smarthost {smarthost.host}:{smarthost.port}"
            if not shaper.enabled:
                return Destination(key, self._concurrency)
            site = shaper.smarthost()
            return Destination(key, _cap(site, self._concurrency), shaper.paused_for(site))
        domain = _domain(recipient)
        known = shaper.known(domain) if shaper.enabled else None
        if known is None:
            return Destination(f"domain {domain}", self._per_domain)
        # Every known destination (a named one, gmail, ..., or one named by its MX hosts) is
        # scheduled as one, so its many domains share one share of the workers and its
        # waiters are capped by the queue, not parked in workers (a probe in a tarpit holds
        # one worker). A domain not looked up yet keeps its own key: _deliver_group then
        # holds the destination to the same cap without waiting.
        return Destination(
            f"site {known.name}", _cap(known, self._per_domain), shaper.paused_for(known)
        )

    async def deliver(
        self, mail_from: str, recipients: Sequence[str], body: bytes, *, sign: Sign | None = None
    ) -> list[RecipientResult]:
        config = self._store.current
        if config is None:
            return [RecipientResult(Outcome.DEFERRED, "451 4.3.0 no configuration")] * len(
                recipients
            )
        relay = config.relay
        if relay.delivery.mode is DeliveryMode.SMARTHOST and relay.delivery.smarthost:
            groups = {"": list(recipients)}
        else:
            groups = defaultdict(list)
            for rcpt in recipients:
                groups[_domain(rcpt)].append(rcpt)
        merged: dict[str, RecipientResult] = {}
        claims: dict[SiteState, int] = {}  # this attempt's groups in flight per destination
        message = _Body(body, sign)  # signed once for all of this attempt's groups
        outcomes = await asyncio.gather(
            *(
                self._deliver_group(relay, domain, rcpts, mail_from, message, claims)
                for domain, rcpts in groups.items()
            )
        )
        for partial in outcomes:
            merged.update(partial)
        return [merged[r] for r in recipients]

    async def _deliver_group(
        self,
        relay: RelayConfig,
        domain: str,
        rcpts: list[str],
        mail_from: str,
        body: _Body,
        claims: dict[SiteState, int],
    ) -> dict[str, RecipientResult]:
        known = self.shaper.known(domain) if domain and self.shaper.enabled else None
        if known is not None and (reply := self._held(known, claims)):  # spare the lookup
            return _not_attempted(reply, rcpts)
        try:
            routes, site = await self._routes(relay, domain)
        except LookupFailedError as exc:
            outcome = Outcome.BOUNCED if exc.permanent else Outcome.DEFERRED
            return dict.fromkeys(rcpts, RecipientResult(outcome, exc.reply))
        except OSError as exc:  # unreadable smarthost credentials
            return dict.fromkeys(rcpts, RecipientResult(Outcome.DEFERRED, _describe(exc)))
        if site is None:
            return await self._via(routes, rcpts, mail_from, body)
        if reply := self._held(site, claims):  # not even a connection: the queue waits
            return _not_attempted(reply, rcpts)
        claims[site] = claims.get(site, 0) + 1
        if claims[site] == 1:
            site.attempts += 1
        try:
            await self.shaper.throttle(site)
            if self.shaper.paused_for(site) > 0.0:  # paused while it waited for the rate
                return _not_attempted(_paused(site), rcpts)
            try:
                results = await self._via(routes, rcpts, mail_from, body, site)
            except DestinationPausedError:
                return _not_attempted(_paused(site), rcpts)
        finally:
            claims[site] -= 1
            if not claims[site]:
                del claims[site]
                site.attempts -= 1
        self.shaper.record(
            site,
            [(r.outcome is Outcome.DELIVERED, r.reply, r.answered) for r in results.values()],
        )
        return results

    def _held(self, site: SiteState, claims: dict[SiteState, int]) -> str | None:
        """Why an attempt to ``site`` must not start now (None: it may): paused, or as many
        attempts in flight as the queue gives it (some scheduled under their domain before
        its lookup was known; this attempt's other domains there count as one). Never a
        wait: a worker does not sit behind a destination's probe or limit."""
        if self.shaper.paused_for(site) > 0.0:
            return _paused(site)
        if site in claims:
            return None
        share = self._concurrency if site.name == SMARTHOST else self._per_domain
        if site.attempts >= _cap(site, share):
            return f"451 4.4.5 destination {site.name} busy: {site.attempts} attempts in flight"
        return None

    async def _routes(
        self, relay: RelayConfig, domain: str
    ) -> tuple[list[Route], SiteState | None]:
        """The routes to try, and the destination they belong to (None: shaping is off)."""
        delivery = relay.delivery
        source = delivery.bind_address
        shaping = self.shaper.enabled
        if delivery.mode is DeliveryMode.SMARTHOST and delivery.smarthost is not None:
            route = self._smarthost_route(delivery.smarthost, source, relay.hostname)
            return [route], self.shaper.smarthost() if shaping else None
        key = tuple(delivery.resolver)
        resolver = self._resolvers.get(key)
        if resolver is None:
            resolver = self._resolvers[key] = self._resolver_factory(delivery.resolver)
        hosts, found = await resolver.lookup(domain)
        addresses = [a for a in found if _same_family(a, source)]
        routes = [
            Route(a, delivery.mx_port, TLSMode.OPPORTUNISTIC, False, source, relay.hostname)
            for a in addresses[:MAX_MX_ADDRESSES]
        ]
        return routes, self.shaper.site(domain, hosts) if shaping else None

    @staticmethod
    def _smarthost_route(smarthost: SmarthostConfig, source: str | None, helo: str) -> Route:
        tls = {
            SmarthostTLS.IMPLICIT: TLSMode.IMPLICIT,
            SmarthostTLS.STARTTLS: TLSMode.STARTTLS,
            SmarthostTLS.NONE: TLSMode.NONE,
        }[smarthost.tls]
        return Route(
            smarthost.host,
            smarthost.port,
            tls,
            smarthost.verify_tls,
            source,
            helo,
            _read_secret(smarthost.credentials_dir, "username"),
            _read_secret(smarthost.credentials_dir, "password"),
        )

    def _tls_context(self, route: Route) -> ssl.SSLContext | None:
        """One client context per kind (verifying or not) for every connection, built again
        when caFile changes (its mtime; nothing else it is built from changes while the relay
        runs): loading the system's trust store costs milliseconds, and without a context
        aiosmtplib builds one per connection in a thread."""
        if route.tls is TLSMode.NONE:
            return None
        ca_file = self._ca_file if route.verify else None
        mtime = _mtime(ca_file)
        built = self._tls_contexts.get(route.verify)
        if built is not None and built[0] == mtime:
            return built[1]
        if route.verify:
            # The default trust store plus caFile: create_default_context(cafile=...) would
            # load caFile *instead of* the system CAs.
            context = ssl.create_default_context()
            if ca_file:
                context.load_verify_locations(cafile=str(ca_file))
        else:  # what aiosmtplib builds for validate_certs=False
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        self._tls_contexts[route.verify] = (mtime, context)
        return context

    async def _connect(self, route: Route) -> aiosmtplib.SMTP:
        tls_context = self._tls_context(route)
        client = aiosmtplib.SMTP(
            hostname=route.host,
            port=route.port,
            local_hostname=route.helo,
            source_address=(route.source, 0) if route.source else None,
            timeout=self._retry.connect_timeout,
            use_tls=route.tls is TLSMode.IMPLICIT,
            start_tls={TLSMode.STARTTLS: True, TLSMode.NONE: False}.get(route.tls),
            validate_certs=route.verify,
            tls_context=tls_context,
            username=route.username,
            password=route.password,
        )
        await client.connect()
        if client.is_ehlo_or_helo_needed:
            await client.ehlo(timeout=self._retry.command_timeout)
        client.timeout = self._retry.command_timeout
        return client

    async def _via(
        self,
        routes: list[Route],
        rcpts: list[str],
        mail_from: str,
        body: _Body,
        site: SiteState | None = None,
    ) -> dict[str, RecipientResult]:
        last = "451 4.4.1 no mail exchanger reachable"
        answered = False  # whether ``last`` is a server's reply
        for route in routes:
            fresh = False
            while True:
                try:
                    conn = await self._pool.acquire(route, fresh=fresh, site=site)
                except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                    last = _describe(exc)
                    answered = isinstance(exc, aiosmtplib.SMTPResponseException)
                    if site is not None and last.startswith("421"):  # refuses connections
                        self.shaper.refused(site, last)
                    log.info("connection failed", extra={"host": route.host, "reply": last})
                    break
                try:
                    # Signed here, with a connection to carry it: not for a destination paused
                    # or busy (sent back unattempted) nor for one that cannot be reached.
                    signed = await body.get()
                except BaseException:
                    self._pool.discard(conn)
                    raise
                try:
                    results, reusable = await self._transaction(
                        conn.client, rcpts, mail_from, signed
                    )
                except _StaleConnectionError as exc:
                    self._pool.discard(conn)
                    if conn.reused and not fresh:
                        fresh = True
                        continue
                    last = str(exc) or "451 4.4.2 connection closed before MAIL"
                    answered = bool(str(exc))  # a 421 to MAIL, else the connection was lost
                    if site is not None and last.startswith("421"):  # 421 to a new one's MAIL
                        self.shaper.refused(site, last)
                    break
                except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                    self._pool.discard(conn)
                    reply = _describe(exc)
                    answered = isinstance(exc, aiosmtplib.SMTPResponseException)
                    result = RecipientResult(Outcome.DEFERRED, reply, answered=answered)
                    return dict.fromkeys(rcpts, result)
                except BaseException:
                    # Anything else goes up (the ValueError of an address aiosmtplib will not
                    # quote, a cancellation), and the connection, whatever state its
                    # transaction is in (MAIL sent, say), is closed: not pooled, and no longer
                    # counted against its destination's connection limit.
                    self._pool.discard(conn)
                    raise
                self._pool.release(conn, reusable=reusable)
                return results
        return dict.fromkeys(rcpts, RecipientResult(Outcome.DEFERRED, last, answered=answered))

    async def _transaction(
        self, client: aiosmtplib.SMTP, rcpts: list[str], mail_from: str, body: bytes
    ) -> tuple[dict[str, RecipientResult], bool]:
        """Returns the results and whether the connection can carry another message."""
        # An 8-bit body says so (RFC 6152) where the server offers 8BITMIME, so no hop converts
        # it to 7-bit (which would break its DKIM signature, RFC 6376 5.3). A server without
        # 8BITMIME gets the bytes as they are: RFC 6152 would have the client convert, but a
        # conversion after signing breaks the signature for certain (docs/deliverability.md).
        eight_bit = not body.isascii() and client.supports_extension("8bitmime")
        options = ["BODY=8BITMIME"] if eight_bit else []
        if client.supports_extension("pipelining"):
            return await self._pipelined(client, rcpts, mail_from, body, options)
        try:
            await client.mail(mail_from, options=options)
        except aiosmtplib.SMTPServerDisconnected as exc:
            raise _StaleConnectionError from exc
        except aiosmtplib.SMTPSenderRefused as exc:
            if exc.code == 421:  # the server is closing this connection (aiosmtplib closed it)
                raise _StaleConnectionError(f"{exc.code} {exc.message}") from exc
            return dict.fromkeys(rcpts, _result(exc.code, exc.message)), await _reset(client)
        results: dict[str, RecipientResult] = {}
        accepted = []
        for rcpt in rcpts:
            try:
                await client.rcpt(rcpt)
            except aiosmtplib.SMTPRecipientRefused as exc:
                results[rcpt] = _result(exc.code, exc.message)
            else:
                accepted.append(rcpt)
        if not accepted:
            return results, await _reset(client)
        try:
            response = await client.data(body, timeout=self._retry.final_dot_timeout)
        except aiosmtplib.SMTPDataError as exc:  # DATA or the final dot refused
            response = SMTPResponse(exc.code, exc.message)
        return await _answered(client, results, accepted, response)

    async def _pipelined(
        self,
        client: aiosmtplib.SMTP,
        rcpts: list[str],
        mail_from: str,
        body: bytes,
        options: list[str],
    ) -> tuple[dict[str, RecipientResult], bool]:
        """:meth:`_transaction` with PIPELINING (RFC 2920): MAIL, every RCPT and DATA in one
        write, their replies read in order, then the body after a 354; the same outcomes.

        Written here because aiosmtplib has no pipelining: its protocol takes one reply per
        command awaited and drops replies that arrive together (a second reply in its buffer
        or in the same loop iteration is lost, the read then times out). So the replies of the
        group and of the final dot are read by :class:`_Replies`, swapped in as the
        connection's protocol for the transaction; aiosmtplib keeps the connection (connect,
        STARTTLS, AUTH, EHLO), RSET and the body's encoding (its dot-stuffing and line-ending
        normalisation: one DATA upstream is one message, issue 7)."""
        commands = [b" ".join([b"MAIL FROM:" + _quoted(mail_from), *map(str.encode, options)])]
        commands += [b"RCPT TO:" + _quoted(rcpt) for rcpt in rcpts]
        commands.append(b"DATA")
        timeout = client.timeout
        results: dict[str, RecipientResult] = {}
        try:
            replies = _Replies(client)
        except aiosmtplib.SMTPServerDisconnected as exc:
            raise _StaleConnectionError from exc
        with replies:
            try:
                replies.write(b"\r\n".join(commands) + b"\r\n")
                mail = await replies.read(timeout)
            except aiosmtplib.SMTPServerDisconnected as exc:  # closed while it was pooled
                raise _StaleConnectionError from exc
            if mail.code == 421:  # the server is closing this connection
                client.close()
                raise _StaleConnectionError(f"{mail.code} {mail.message}")
            if mail.code != 250:
                # RFC 2920 3.1: every reply of the group is read before anything else is sent.
                refused = _result(mail.code, mail.message)
                reusable = await replies.drain(len(rcpts) + 1, timeout)
                if not reusable:
                    client.close()
                    return dict.fromkeys(rcpts, refused), False
                return dict.fromkeys(rcpts, refused), await self._after(client, replies)
            accepted = []
            for index, rcpt in enumerate(rcpts):
                answer = await replies.read(timeout)
                if answer.code in (250, 251):
                    accepted.append(rcpt)
                    continue
                results[rcpt] = _result(answer.code, answer.message)
                if answer.code == 421:  # closing: the rest will not be answered
                    results.update(dict.fromkeys([*accepted, *rcpts[index + 1 :]], results[rcpt]))
                    client.close()
                    return results, False
            data = await replies.read(timeout)
            if data.code == 354 and not accepted:
                # RFC 2920 3.1 wants 503 or 554 here; a server that waits for a body for no
                # recipient gets none: the connection is closed instead.
                client.close()
                return results, False
            if data.code != 354:
                results.update(dict.fromkeys(accepted, _result(data.code, data.message)))
                if data.code == 421:
                    client.close()
                    return results, False
                return results, await self._after(client, replies)
            replies.write(_encoded(body))
            final = await replies.read(self._retry.final_dot_timeout)
        return await _answered(client, results, accepted, final)

    @staticmethod
    async def _after(client: aiosmtplib.SMTP, replies: _Replies) -> bool:
        """RSET after a refused pipelined transaction, with aiosmtplib's protocol back."""
        replies.restore()
        return await _reset(client)


class _Body:
    """The message of one attempt, DKIM-signed the first time a transaction is about to carry
    it (once per attempt, whichever of its groups gets there first; the others share it)."""

    def __init__(self, raw: bytes, sign: Sign | None) -> None:
        self._raw = raw
        self._sign = sign
        self._signed: asyncio.Future[bytes] | None = None

    async def get(self) -> bytes:
        if self._sign is None:
            return self._raw
        if self._signed is None:
            self._signed = asyncio.ensure_future(self._sign(self._raw))
        # Shielded: one group cancelled (the relay stopping) does not cancel the others' copy.
        return await asyncio.shield(self._signed)


@functools.lru_cache(maxsize=4096)
def _quoted(address: str) -> bytes:
    """``<address>`` for MAIL or RCPT, as aiosmtplib's :meth:`~aiosmtplib.SMTP.mail` writes it,
    with the check its ``execute_command`` makes on every argument (no control character:
    ValueError, as there). Cached: its parse costs more than the rest of a command, and the
    same senders and recipients come again and again."""
    quoted = quote_address(address).encode("ascii")
    if COMMAND_INJECTION_REGEX.search(quoted):
        raise ValueError("Command arg contains a prohibited control character")
    return quoted


def _encoded(body: bytes) -> bytes:
    """The body as DATA carries it, as aiosmtplib's :meth:`~aiosmtplib.SMTP.data` writes it:
    lone CR and LF made CRLF, a CRLF at the end, dot-stuffed, then the final dot. Each step is
    skipped where it would change nothing (a spooled body has CRLF line ends already), which
    two scans tell for less than the substitutions cost."""
    crlf = body.count(b"\r\n")
    if not (body.count(b"\r") == crlf == body.count(b"\n") and body.endswith(b"\r\n")):
        body = normalize_message_line_endings(body)
    if body.startswith(b".") or b"\n." in body:
        body = PERIOD_REGEX.sub(b"..", body)
    return body + b".\r\n"


class _Replies(asyncio.Protocol):
    """The replies of a pipelined transaction (RFC 2920), in order, each parsed as aiosmtplib
    parses one. It is the connection's protocol from ``with`` to :meth:`restore` (or the end
    of the block), then aiosmtplib's again; a lost connection is passed on to aiosmtplib's,
    which closes its client. Why it exists: see :meth:`SmtpTransport._pipelined`."""

    def __init__(self, client: aiosmtplib.SMTP) -> None:
        if client.protocol is None or client.transport is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        self._client = client
        self._protocol = client.protocol
        self._transport = client.transport
        self._buffer = bytearray()
        self._replies: deque[SMTPResponse] = deque()
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._installed = False

    def __enter__(self) -> _Replies:
        self._transport.set_protocol(self)
        self._installed = True
        return self

    def __exit__(self, *_: object) -> None:
        self.restore()

    def restore(self) -> None:
        if self._installed:
            self._installed = False
            if not self._transport.is_closing():
                self._transport.set_protocol(self._protocol)

    def write(self, data: bytes) -> None:
        self._protocol.write(data)  # raises SMTPServerDisconnected once it is closing

    async def read(self, seconds: float | None) -> SMTPResponse:
        """The next reply; SMTPServerDisconnected or SMTPReadTimeoutError as aiosmtplib's
        (and the connection closed, as aiosmtplib closes it after either)."""
        while not self._replies:
            if self._error is not None:
                self._client.close()
                raise self._error
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            # A timer handle, not asyncio.timeout(): a tenth of the cost, on every reply.
            timer = None if seconds is None else loop.call_later(seconds, self._expire, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        return self._replies.popleft()

    def _expire(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            self._fail(aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response"))

    async def drain(self, count: int, seconds: float | None) -> bool:
        """Read ``count`` replies nobody needs (after a refused MAIL); whether the connection
        is still usable (none was a 421 or a 354, none was missing)."""
        try:
            for _ in range(count):
                if (await self.read(seconds)).code in (354, 421):
                    return False
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            return False
        return True

    # -- asyncio.Protocol --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._buffer.extend(data)
        try:
            while (reply := self._parse()) is not None:
                self._replies.append(reply)
        except aiosmtplib.SMTPResponseException as exc:
            self._fail(exc)
            return
        if len(self._buffer) > MAX_RESPONSE_LENGTH:
            self._fail(aiosmtplib.SMTPResponseException(-1, "Response too long"))
            return
        self._wake()

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._fail(lost)
        self._installed = False
        self._protocol.connection_lost(exc)  # aiosmtplib's client closes itself

    def pause_writing(self) -> None:
        self._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._protocol.resume_writing()

    def _fail(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _parse(self) -> SMTPResponse | None:
        """One whole reply off the buffer (None: not all of it is here yet), as aiosmtplib's
        ``SMTPProtocol._read_response_from_buffer`` reads it."""
        lines: list[bytes] = []
        offset = 0
        while (end := self._buffer.find(b"\n", offset)) != -1:
            line = bytes(self._buffer[offset : end + 1])
            if len(line) > MAX_LINE_LENGTH:
                raise aiosmtplib.SMTPResponseException(-1, "Response too long")
            try:
                code = int(line[:3])
            except ValueError:
                text = line.decode("utf-8", errors="ignore")
                raise aiosmtplib.SMTPResponseException(
                    -1, f"Malformed SMTP response line: {text}"
                ) from None
            offset = end + 1
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                del self._buffer[:offset]
                return SMTPResponse(code, b"\n".join(lines).decode("utf-8", "surrogateescape"))
        return None


def _paused(site: SiteState) -> str:
    return f"451 4.4.5 destination {site.name} paused after: {site.reason}"


def _not_attempted(reply: str, rcpts: list[str]) -> dict[str, RecipientResult]:
    return dict.fromkeys(rcpts, RecipientResult(Outcome.DEFERRED, reply, attempted=False))


def _cap(site: SiteState, share: int) -> int:
    """A destination's attempts in flight: its share, within its connection limit."""
    limit = site.connection_limit
    return share if limit is None else max(1, min(share, limit))


async def _reset(client: aiosmtplib.SMTP) -> bool:
    """RSET after a refused transaction; whether the connection is still usable."""
    try:
        await client.rset()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        return False
    return True
