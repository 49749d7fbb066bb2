"""Prometheus metrics of one relay, registered in the registry passed in."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from txmail_relay.outcomes import Outcome, OutcomeEvent

PREFIX = "txmail_relay_"
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)
_SYNC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)


class RelayMetrics:
    """Every metric of the relay. Token labels are usernames of configured tokens only."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.accepted = Counter(
            f"{PREFIX}messages_accepted",
            "Messages accepted (250 after DATA), by token",
            ["token"],
            registry=registry,
        )
        self.recipients = Counter(
            f"{PREFIX}recipient_outcomes",
            "Per-recipient delivery outcomes (delivered, deferred, bounced, expired), by token",
            ["token", "outcome"],
            registry=registry,
        )
        self.auth_failures = Counter(
            f"{PREFIX}auth_failures", "Failed AUTH attempts", registry=registry
        )
        self.rejections = Counter(
            f"{PREFIX}smtp_rejections",
            "Commands rejected by policy or limits, by reason",
            ["reason"],
            registry=registry,
        )
        self.sessions = Gauge(
            f"{PREFIX}smtp_sessions", "Open SMTP submission connections", registry=registry
        )
        self.queue_depth = Gauge(
            f"{PREFIX}queue_depth", "Messages with undelivered recipients", registry=registry
        )
        self.queue_oldest_age = Gauge(
            f"{PREFIX}queue_oldest_age_seconds",
            "Age of the oldest message in the queue",
            registry=registry,
        )
        self.delivery_latency = Histogram(
            f"{PREFIX}delivery_latency_seconds",
            "Time from acceptance to delivery of a recipient",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.spool_sync = Histogram(
            f"{PREFIX}spool_sync_seconds",
            "Duration of one group commit (write + fdatasync of a batch)",
            buckets=_SYNC_BUCKETS,
            registry=registry,
        )
        self.spool_batch = Histogram(
            f"{PREFIX}spool_batch_records",
            "Records made durable by one group commit",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=registry,
        )
        self.records_batch = Histogram(
            f"{PREFIX}records_batch_writes",
            "Writes committed by one records transaction (one fsync of the WAL; the count is"
            " the records' commits)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=registry,
        )
        self.spool_errors = Counter(
            f"{PREFIX}spool_errors", "Failed group commits", registry=registry
        )
        self.spool_quarantined = Counter(
            f"{PREFIX}spool_quarantined",
            "Torn or corrupt spool entries moved to quarantine",
            registry=registry,
        )

        self.api_sends = Counter(
            f"{PREFIX}api_sends",
            "Single-send API requests of authenticated tokens, by sendResult",
            ["token", "result"],
            registry=registry,
        )
        self.template_sends = Counter(
            f"{PREFIX}smtp_template_sends",
            "SMTP template sends (X-Txmail-Email-Id), by result",
            ["token", "result"],
            registry=registry,
        )
        self.tracking_failures = Counter(
            f"{PREFIX}tracking_failures",
            "Messages sent untracked because link rewriting failed",
            registry=registry,
        )
        self.tracking_requests = Counter(
            f"{PREFIX}tracking_requests",
            "Requests to the tracking endpoints, by kind (open, click) and result",
            ["kind", "result"],
            registry=registry,
        )
        self.tracking_machine = Counter(
            f"{PREFIX}tracking_machine",
            "Valid opens and clicks judged a machine's (tracking/machine.py), by kind and rule",
            ["kind", "rule"],
            registry=registry,
        )
        self.tracking_dropped = Counter(
            f"{PREFIX}tracking_dropped",
            "Valid opens and clicks answered but not recorded (too many waiting for the"
            " records, or their write failed), by kind",
            ["kind"],
            registry=registry,
        )
        self.tracking_batch = Histogram(
            f"{PREFIX}tracking_batch_hits",
            "Opens and clicks recorded per records write (tracking/endpoints.py)",
            buckets=(1, 10, 50, 100, 250, 500, 1000),
            registry=registry,
        )
        self.dkim_signatures = Counter(
            f"{PREFIX}dkim_signatures",
            "DKIM signatures at delivery, by From domain and result (signed, already_signed: "
            "the app's own signature left alone, previous_key: the new key's file not there "
            "yet, key_unavailable, failed, unsignable: sent without it)",
            ["domain", "result"],
            registry=registry,
        )
        self.warmup_budget = Gauge(
            f"{PREFIX}warmup_budget",
            "Recipients today's warm-up budget allows (-1: no limit, warm-up off or done)",
            registry=registry,
        )
        self.warmup_sent = Gauge(
            f"{PREFIX}warmup_sent_today",
            "Recipients handed to delivery on the warm-up schedule's current day",
            registry=registry,
        )
        self.warmup_deferred = Gauge(
            f"{PREFIX}warmup_deferred",
            "Recipients held (spooled) for a later day's warm-up budget",
            registry=registry,
        )
        self.complaint_reports = Counter(
            f"{PREFIX}complaint_reports",
            "ARF feedback reports received, by result (recorded, unknown, invalid)",
            ["result"],
            registry=registry,
        )
        # The inbound listener (ingress/inbound.py): DSNs and ARF reports from outside.
        self.inbound_messages = Counter(
            f"{PREFIX}inbound_messages",
            "Messages the inbound listener took, by kind (dsn, bounce: not RFC 3464, arf, "
            "junk) and result (recorded, untied: nothing it names is ours, failed: 451)",
            ["kind", "result"],
            registry=registry,
        )
        self.inbound_bounces = Counter(
            f"{PREFIX}inbound_bounces",
            "Bounces recorded from inbound mail, by type (HARD, SOFT) and source (dsn, "
            "detector: flufl.bounce)",
            ["type", "source"],
            registry=registry,
        )
        self.inbound_refusals = Counter(
            f"{PREFIX}inbound_refusals",
            "Inbound RCPTs refused, by reason (recipient: not a return-path or complaints "
            "address, recipients: too many)",
            ["reason"],
            registry=registry,
        )
        # Per-destination shaping (delivery/shaping.py). The destination label is a named
        # destination (gmail, outlook, ..., smarthost, or one of spec.shaping.sites) or
        # "other" for every destination named only by its MX hosts (bounded labels).
        self.destinations_paused = Gauge(
            f"{PREFIX}destinations_paused",
            "Destinations paused now (a 421, or only 4xx several attempts in a row)",
            registry=registry,
        )
        self.destination_connections = Counter(
            f"{PREFIX}destination_connections",
            "Outbound connections opened, by destination",
            ["destination"],
            registry=registry,
        )
        self.destination_deliveries = Counter(
            f"{PREFIX}destination_deliveries",
            "Recipients delivered, by destination",
            ["destination"],
            registry=registry,
        )
        self.destination_throttle_waits = Counter(
            f"{PREFIX}destination_throttle_waits",
            "Messages that waited for their destination's rate limit, by destination",
            ["destination"],
            registry=registry,
        )

        # Webhook deliveries (webhooks/): per request and per event, no per-token labels
        # (a subscription's own figures are in the stats: SmtpToken status.webhooks).
        self.webhook_requests = Counter(
            f"{PREFIX}webhook_requests",
            "Webhook requests, by result (2xx, 3xx: not followed, 4xx, 5xx, timeout, "
            "connection, key: the signing key is unusable)",
            ["result"],
            registry=registry,
        )
        self.webhook_events = Counter(
            f"{PREFIX}webhook_events",
            "Events given to webhook receivers (delivered) or given up on (dropped)",
            ["result"],
            registry=registry,
        )
        self.webhook_latency = Histogram(
            f"{PREFIX}webhook_request_seconds",
            "Duration of one webhook request",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.webhook_subscriptions = Gauge(
            f"{PREFIX}webhook_subscriptions", "Webhook subscriptions configured", registry=registry
        )
        self.webhook_failing = Gauge(
            f"{PREFIX}webhook_failing", "Webhook subscriptions Failing now", registry=registry
        )
        self.webhook_backlog = Gauge(
            f"{PREFIX}webhook_backlog",
            "Events waiting for webhook delivery, all subscriptions (at the last stats refresh)",
            registry=registry,
        )

    def track_webhooks(
        self, subscriptions: Callable[[], float], failing: Callable[[], float]
    ) -> None:
        self.webhook_subscriptions.set_function(subscriptions)
        self.webhook_failing.set_function(failing)

    def track_warmup(
        self,
        budget: Callable[[], float],
        sent: Callable[[], float],
        deferred: Callable[[], float],
    ) -> None:
        """IP warm-up (delivery/warmup.py): today's budget (-1: no limit), recipients sent
        today and recipients held for a later day."""
        self.warmup_budget.set_function(budget)
        self.warmup_sent.set_function(sent)
        self.warmup_deferred.set_function(deferred)

    def track_paused_destinations(self, paused: Callable[[], float]) -> None:
        self.destinations_paused.set_function(paused)

    def track_queue(self, depth: Callable[[], float], oldest_age: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)
        self.queue_oldest_age.set_function(oldest_age)

    def on_outcome(self, event: OutcomeEvent) -> None:
        self.recipients.labels(event.username, event.outcome.value).inc()
        if event.outcome is Outcome.DELIVERED:
            self.delivery_latency.observe(max(0.0, event.at - event.received_at))
