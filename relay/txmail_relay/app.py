"""The relay process: its parts composed by constructor injection, started and stopped.

Tests replace the seams: the config source, the spool's system calls, the delivery
transport and the TLS context; everything else is the production wiring.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from functools import partial

from aiohttp import web
from prometheus_client import CollectorRegistry

from txmail_relay.config.live import ConfigSource, LiveConfig
from txmail_relay.contract import WarmupConfig
from txmail_relay.delivery.dkim import DkimSigner
from txmail_relay.delivery.dsn import DsnNotifier
from txmail_relay.delivery.queue import DeliveryQueue
from txmail_relay.delivery.shaping import Clock, Shaper
from txmail_relay.delivery.transport import SmtpTransport, Transport
from txmail_relay.delivery.warmup import WarmupGate
from txmail_relay.http.api import SendApi, TokenAuth
from txmail_relay.http.apps import make_api_app, make_metrics_app, make_tracking_app
from txmail_relay.http.feedback import FeedbackApi
from txmail_relay.http.guard import HttpGuard, HttpLimits
from txmail_relay.ingress.auth import Authenticator, FailureLimiter
from txmail_relay.ingress.complaints import ComplaintHandler
from txmail_relay.ingress.connections import (
    ConnectionGate,
    open_files,
    raise_open_file_limit,
    share_descriptors,
)
from txmail_relay.ingress.inbound import InboundHandler, InboundProtocol, LiveReturnPath
from txmail_relay.ingress.smtp import SubmissionHandler, SubmissionProtocol
from txmail_relay.ingress.tls import server_context, watch_certificate
from txmail_relay.metrics import RelayMetrics
from txmail_relay.outcomes import OutcomeListener
from txmail_relay.records.records import Records
from txmail_relay.records.stats import (
    FileStatsPublisher,
    OutcomeRecorder,
    StatsLoop,
    StatsPublisher,
)
from txmail_relay.sending.composer import Composer
from txmail_relay.sending.service import SendService
from txmail_relay.settings import Settings
from txmail_relay.spool.segments import Spool, SpoolIO, SpoolLock
from txmail_relay.templates.policy import Templates
from txmail_relay.tracking.endpoints import KeyFile, TrackingEndpoints
from txmail_relay.tracking.machine import Policy
from txmail_relay.webhooks.manager import WebhookManager

log = logging.getLogger(__name__)

# Connections the metrics listener (probes, Prometheus) takes, within limits.reservedFiles.
METRICS_CONNECTIONS = 64


class Relay:
    def _owner(self, username: str) -> tuple[str, str] | None:
        """A username's (namespace, SmtpToken name) in the live configuration, if any."""
        config = self.store.current
        entry = config.credentials.get(username) if config is not None else None
        return None if entry is None else (entry.namespace, entry.token)

    def __init__(
        self,
        settings: Settings,
        source: ConfigSource,
        *,
        registry: CollectorRegistry | None = None,
        spool_io: SpoolIO | None = None,
        transport: Transport | None = None,
        tls_context: ssl.SSLContext | None = None,
        listeners: Sequence[OutcomeListener] = (),
        stats_publisher: StatsPublisher | None = None,
        templates: Templates | None = None,
        clock: Callable[[], float] = time.time,
        warmup_check_interval: float = 30.0,
        shaping_clock: Clock | None = None,
        webhook_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = RelayMetrics(self.registry)
        self.store = LiveConfig()
        self.spool_lock = SpoolLock(settings.spool.directory)
        # Mail with no namespace on its messages row is its token's (credential entry).
        self.records = Records(settings.spool.directory, owner=self._owner)
        self.records.observe_commits(self.metrics.records_batch.observe)
        self.tracking_keys = keys = KeyFile(settings.tracking_keys_file)
        self._source = source
        self.spool = Spool(
            settings.spool.directory,
            io=spool_io,
            segment_bytes=settings.spool.segment_bytes,
            min_free_bytes=settings.limits.spool_min_free_bytes,
            reserved=self.records.headroom,  # the records share the volume
            metrics=self.metrics,
        )
        # Per-destination shaping; ``shaping_clock`` (monotonic seconds, and sleeping) is the
        # tests' to move its rate limits.
        self.shaper = Shaper(self.store, clock=shaping_clock, metrics=self.metrics)
        self.transport = transport or SmtpTransport(
            self.store, settings.retry, settings.outbound, shaper=self.shaper
        )
        self.dkim = DkimSigner(self.store, self.metrics)
        # The warm-up day is read from ``clock`` (tests move it a day; nothing else uses it).
        self.warmup = WarmupGate(
            self._warmup_config,
            self.records.warmup,
            clock=clock,
            check_interval=warmup_check_interval,
        )
        self.metrics.track_warmup(
            self.warmup.budget_metric, self.warmup.sent_metric, self.warmup.deferred_metric
        )
        # Webhook deliveries; ``webhook_clock`` (wall seconds: backoff, the retry period) is
        # the tests' to move past a day.
        self.webhooks = WebhookManager(
            self.records, self.store, settings.webhooks, self.metrics, clock=webhook_clock
        )
        # One return path for the queue and the inbound listener: it remembers replaced ones.
        self.return_path = LiveReturnPath(self.store)
        self.queue = DeliveryQueue(
            self.spool,
            self.transport,
            settings.retry,
            concurrency=settings.outbound.concurrency,
            # The records before the spool's DONE and the listeners (the webhooks look for the
            # event); in the background, before the webhooks, when they cannot take it at once.
            listeners=[self.metrics, self.webhooks, *listeners],
            recorder=OutcomeRecorder(self.records),
            warmup=self.warmup,
            sign=self.dkim.sign,
            return_path=self.return_path.envelope_sender,  # VERP when configured
            # RFC 3464 DSNs to SMTP senders (RelayConfig.dsn), spooled like any message.
            on_failed=DsnNotifier(self.store, self.spool).notify,
        )
        self.spool.subscribe(self.queue.enqueue)
        self.metrics.track_queue(self.queue.depth, self.queue.oldest_age)
        composer = Composer(templates or Templates(), keys, self.metrics)
        self.sends = SendService(self.store, composer, self.spool, self.records, self.metrics)
        self.complaints = ComplaintHandler(self.records, self.metrics)
        self.handler = SubmissionHandler(
            self.store,
            self.spool,
            settings.limits,
            self.metrics,
            sends=self.sends,
            complaints=self.complaints,
            complaints_address=settings.complaints_address,
        )
        # The inbound listener: DSNs to the return path, ARF reports to the complaints address.
        self.inbound = InboundHandler(
            self.store,
            settings.limits,
            self.metrics,
            bounce=self.records.events.bounce,
            complaints=self.complaints,
            complaints_address=settings.complaints_address,
            return_path=self.return_path,
        )
        self._checker = Authenticator(self.store)
        self._limiter = FailureLimiter(
            settings.limits.ip_auth_failures, settings.limits.ip_auth_window
        )
        if stats_publisher is None and settings.stats_file is not None:
            stats_publisher = FileStatsPublisher(settings.stats_file)
        self.stats = StatsLoop(
            self.records,
            self.store,
            stats_publisher,
            settings.stats_interval,
            warmup=self.warmup.snapshot,
            destinations=self.shaper.paused,
            webhooks=self.webhooks.stats,
            retention=settings.records,  # the events log's age and size bounds
        )
        self.stats.register(self.registry)
        self._api = SendApi(
            TokenAuth(self._checker, self._limiter, self.metrics),
            self.sends,
            self.records,
            self.metrics,
            max_recipients=settings.limits.max_recipients,
            warmup=self.warmup,
        )
        # The suppression list and the events pull endpoint, beside the send API.
        self._feedback = FeedbackApi(
            TokenAuth(self._checker, self._limiter, self.metrics), self.records, self.store
        )
        self._tracking = TrackingEndpoints(
            keys,
            self.records,
            self.metrics,
            policy=Policy(click_window=settings.tracking.machine_click_window),
        )
        self._tls_context = tls_context
        self._servers: list[asyncio.base_events.Server] = []
        self._http_servers: list[asyncio.base_events.Server] = []
        self._sessions: set[SubmissionProtocol] = set()
        self._no_sessions = asyncio.Event()
        self._no_sessions.set()
        limits = settings.limits
        self._smtp_gate = ConnectionGate(limits.max_connections, limits.max_connections_per_address)
        self._inbound_gate = ConnectionGate(
            limits.max_connections, limits.max_connections_per_address
        )
        self._http_gates: dict[str, ConnectionGate] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.http: dict[str, web.AppRunner] = {}  # listener name -> its aiohttp runner
        self.ports: dict[str, int] = {}
        self._serving = False

    def _warmup_config(self) -> WarmupConfig | None:
        config = self.store.current
        return config.relay.warmup if config is not None else None

    async def _reclaim(self) -> None:
        """Now and then, old segments held only by long-deferred mail are rewritten."""
        spool = self.settings.spool
        while True:
            await asyncio.sleep(spool.reclaim_interval)
            try:
                await self.spool.reclaim(spool.reclaim_after)
            except Exception:  # a bug here must not stop the relay; the segments just stay
                log.exception("spool reclaim failed")

    def ready(self) -> bool:
        return self._serving and self.store.ready and self.spool.healthy

    async def start(self) -> None:
        """Recover the spool, wait for the first configuration, then listen.

        If it fails (a port in use), the tasks it started are cancelled and the records' writes
        already asked for finish and the records close, before the error goes up: left to
        the process's exit, they would fail on the closed records and log it.
        """
        try:
            await self._start()
        except BaseException:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks.clear()
            with contextlib.suppress(Exception):  # the error that stopped the start goes up
                await self.records.close()
            raise

    async def _start(self) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        self._size_gates()
        await self.spool_lock.acquire()  # the spool folder holds the SQLite records too
        await self.records.open()
        recovered = await asyncio.to_thread(self.spool.recover)
        for msg in recovered:
            self.queue.enqueue(msg)
        self.spool.start()
        self._tasks.append(loop.create_task(self._reclaim(), name="spool-reclaim"))
        await self._start_http()
        source = loop.create_task(self._source.run(self.store), name="config")
        self._tasks.append(source)
        if self.tracking_keys.path is not None:
            self._tasks.append(
                loop.create_task(
                    self.tracking_keys.watch(settings.config_poll_interval), name="tracking-keys"
                )
            )
        tls = self._tls_context
        if tls is None:
            tls = server_context(settings.tls.cert_file, settings.tls.key_file)
            self._tasks.append(
                loop.create_task(
                    watch_certificate(tls, settings.tls.cert_file, settings.tls.key_file),
                    name="tls-reload",
                )
            )
        ready = loop.create_task(self.store.wait_ready(), name="config-ready")
        await asyncio.wait({ready, source}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():  # the config source died before the first configuration
            ready.cancel()
            source.result()
            raise RuntimeError("the configuration source stopped before it was ready")
        # Today's count and what it already counted of the recovered mail, before that mail
        # is admitted.
        await self.warmup.load([msg.id for msg in recovered])
        await self.webhooks.start()  # subscriptions known before any new event is written
        self._tasks.append(loop.create_task(self.webhooks.run(), name="webhooks"))
        self.queue.start()
        self._tasks.append(loop.create_task(self.warmup.run(), name="warmup"))
        self._tasks.append(loop.create_task(self.stats.run(), name="stats"))
        for name, port, implicit in (
            ("submission", settings.listen.submission, False),
            ("submissions", settings.listen.submissions, True),
        ):
            if port is None:
                continue
            # No ssl= here: the protocol runs the implicit TLS handshake itself, after the
            # connection cap and under the handshake deadline.
            server = await loop.create_server(
                partial(self._protocol, tls, implicit=implicit),
                settings.listen.host,
                port,
            )
            self._servers.append(server)
            self.ports[name] = server.sockets[0].getsockname()[1]
        if settings.listen.inbound is not None:
            server = await loop.create_server(
                partial(self._inbound_protocol, tls), settings.listen.host, settings.listen.inbound
            )
            self._servers.append(server)
            self.ports["inbound"] = server.sockets[0].getsockname()[1]
        self._serving = True
        log.info("relay serving", extra={"ports": self.ports})

    def _size_gates(self) -> None:
        """Raise the open-file limit, then fit the connection caps in it (docs/relay.md
        "Limits"): SMTP and the tracking and API listeners share what the reserve leaves."""
        limits, listen = self.settings.limits, self.settings.listen
        caps: dict[str, int] = {}
        if listen.submission is not None or listen.submissions is not None:
            caps["smtp"] = limits.max_connections
        if listen.inbound is not None:
            caps["inbound"] = limits.max_connections
        for name in ("tracking", "api"):
            if getattr(listen, name) is not None:
                caps[name] = limits.max_http_connections
        fitted = share_descriptors(
            caps,
            file_limit=raise_open_file_limit(),
            reserved=limits.reserved_files,
            in_use=open_files(),
        )
        self._smtp_gate.limit = fitted.get("smtp", limits.max_connections)
        self._inbound_gate.limit = fitted.get("inbound", limits.max_connections)
        per_address = limits.max_http_connections_per_address
        self._http_gates = {
            name: ConnectionGate(fitted[name], per_address)
            for name in ("tracking", "api")
            if name in fitted
        }
        self._http_gates["metrics"] = ConnectionGate(METRICS_CONNECTIONS)

    async def _start_http(self) -> None:
        """The three HTTP listeners (each may be disabled with ``null``)."""
        listen, limits = self.settings.listen, self.settings.limits
        loop = asyncio.get_running_loop()
        deadlines = HttpLimits(limits.http_header_timeout, limits.http_body_timeout)
        apps: dict[str, tuple[int | None, Callable[..., web.Application]]] = {
            "metrics": (listen.metrics, partial(make_metrics_app, self.registry, self.ready)),
            "tracking": (listen.tracking, partial(make_tracking_app, [self._tracking.install])),
            "api": (
                listen.api,
                partial(
                    make_api_app,
                    [self._api.install, self._feedback.install],
                    client_max_size=self.settings.limits.max_message_size,
                ),
            ),
        }
        for name, (port, make) in apps.items():
            if port is None:
                continue
            guard = HttpGuard(self._http_gates[name], deadlines)
            runner = web.AppRunner(
                make(middlewares=[guard.middleware]),
                access_log=None,
                keepalive_timeout=limits.http_keepalive_timeout,
            )
            await runner.setup()
            self.http[name] = runner
            if runner.server is None:
                raise RuntimeError("aiohttp runner without a server after setup()")
            # Our own server instead of a web.TCPSite, so that each connection's protocol
            # is the guard's wrapper around aiohttp's.
            server = await loop.create_server(guard.protocol(runner.server), listen.host, port)
            self._http_servers.append(server)
            self.ports[name] = server.sockets[0].getsockname()[1]

    def _protocol(self, tls: ssl.SSLContext, *, implicit: bool) -> SubmissionProtocol:
        config = self.store.current
        return SubmissionProtocol(
            self.handler,
            checker=self._checker,
            limiter=self._limiter,
            metrics=self.metrics,
            limits=self.settings.limits,
            hostname=config.relay.hostname if config is not None else "localhost",
            tls_context=tls,
            implicit_tls=implicit,
            gate=self._smtp_gate,
            on_open=self._opened,
            on_close=self._closed,
        )

    def _inbound_protocol(self, tls: ssl.SSLContext) -> InboundProtocol:
        config = self.store.current
        return InboundProtocol(
            self.inbound,
            checker=self._checker,
            limiter=self._limiter,
            metrics=self.metrics,
            limits=self.settings.limits,
            hostname=config.relay.hostname if config is not None else "localhost",
            tls_context=tls,
            gate=self._inbound_gate,
            on_open=self._opened,
            on_close=self._closed,
        )

    def _opened(self, session: SubmissionProtocol) -> None:
        """Every accepted SMTP connection, refused ones and TLS handshakes included."""
        self._sessions.add(session)
        self._no_sessions.clear()

    def _closed(self, session: SubmissionProtocol) -> None:
        self._sessions.discard(session)
        if not self._sessions:
            self._no_sessions.set()

    async def stop(self) -> None:
        """Stop accepting; let uploads, spooling and deliveries finish within the grace period.

        Idle SMTP sessions get ``421 4.3.2 Service shutting down`` at once; a command in
        progress (an upload and its spooling) gets half of the grace period to finish and
        get its reply, then the 421. Whatever is still running afterwards is cancelled: a
        message that got its 250 is in the spool and is delivered after the restart.
        """
        grace = self.settings.shutdown_grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self._serving = False
        for server in self._servers:
            server.close()
        for session in list(self._sessions):
            session.shut_down()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_sessions.wait(), grace / 2)
        for session in list(self._sessions):
            session.abort()
        with contextlib.suppress(TimeoutError):  # cancelled spooling unwinds
            await asyncio.wait_for(self.handler.idle.wait(), 1.0)
        await self.queue.stop(max(0.0, deadline - loop.time()))
        self.dkim.close()
        await self.transport.close()
        await self.spool.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.webhooks.stop()
        for server in self._http_servers:
            server.close()
        for runner in self.http.values():
            await runner.cleanup()
        if self.store.ready:
            with contextlib.suppress(Exception):
                await self.stats.refresh()  # last figures out before exiting
        await self.records.close()
        self.spool_lock.release()
        log.info("relay stopped")
