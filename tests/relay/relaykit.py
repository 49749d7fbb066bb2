"""Relay fixtures: a CA and certificate, Postfix's smtp-sink as upstream, a relay in a thread.

Tests talk to the relay with real clients (smtplib, swaks) over real TLS; the relay runs
its own event loop in a thread, like aiosmtpd's Controller. Everything binds 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import secrets
import shutil
import signal
import smtplib
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from dns_server import DnsServer
from peers import Captured, Sink, TLSFiles, free_port, make_authority, relay_command, wait_for
from txmail_relay.app import Relay
from txmail_relay.config.file import FileConfigSource
from txmail_relay.contract import CredentialEntry, PasswordDigest, password_digest
from txmail_relay.http.api import SEND_PATH
from txmail_relay.settings import load_settings

# Shared peers and helpers, re-exported for the relay tests.
__all__ = ["Captured", "DnsServer", "Sink", "TLSFiles", "free_port", "make_authority", "wait_for"]

T = TypeVar("T")
HOSTNAME = "relay.test"
DOMAINS = ["example.com", "tenant-b.com"]


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_authority(tmp_path_factory.mktemp("tls"), "txmail test", HOSTNAME)


@pytest.fixture
def sink_factory() -> Iterator[Callable[..., Sink]]:
    sinks: list[Sink] = []

    def make(*options: str, host: str = "127.0.0.1") -> Sink:
        sink = Sink(*options, host=host)
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.stop()


@pytest.fixture
def sink(sink_factory: Callable[..., Sink]) -> Sink:
    return sink_factory()


# -- credentials and settings ------------------------------------------------------------------


def credential(
    username: str,
    password: str,
    *,
    domains: list[str] | None = None,
    expires_at: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> CredentialEntry:
    return CredentialEntry(
        username=username,
        namespace="apps",
        token=username,
        digests=[
            PasswordDigest(sha256=password_digest(password), generation=1, not_after=not_after)
        ],
        allowed_from_domains=domains if domains is not None else ["example.com"],
        email_campaign_id=1,
        expires_at=expires_at,
    )


def write_json(path: Path, doc: Any) -> None:
    """Atomic replace, as a mounted ConfigMap/Secret update would look."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)


def write_credentials(path: Path, entries: list[CredentialEntry]) -> None:
    write_json(path, [json.loads(e.to_json()) for e in entries])


def smarthost_relay(sink_port: int) -> dict[str, Any]:
    """The settings file's ``relay`` section: a relay on 127.0.0.1 for example.com that
    delivers everything, without TLS, to the smarthost on ``127.0.0.1:sink_port``."""
    return {
        "dedicatedIP": "127.0.0.1",
        "address": "127.0.0.1",
        "hostname": HOSTNAME,
        "domains": ["example.com"],
        "delivery": {
            "mode": "Smarthost",
            "smarthost": {"host": "127.0.0.1", "port": sink_port, "tls": "None"},
        },
    }


def relay_settings(
    directory: Path,
    tls: TLSFiles,
    upstream_port: int,
    *,
    credentials: list[CredentialEntry],
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a settings file (+ credentials file) for a relay delivering to a smarthost."""
    directory.mkdir(parents=True, exist_ok=True)
    write_credentials(directory / "credentials.json", credentials)
    doc: dict[str, Any] = {
        "relay": {
            "dedicatedIP": "127.0.0.1",
            "address": "127.0.0.1",
            "hostname": HOSTNAME,
            "domains": DOMAINS,
            "delivery": {
                "mode": "Smarthost",
                "smarthost": {"host": "127.0.0.1", "port": upstream_port, "tls": "None"},
            },
        },
        "credentialFiles": ["credentials.json"],
        "listen": {
            "host": "127.0.0.1",
            "submission": 0,
            "submissions": 0,
            "tracking": 0,
            "api": 0,
            "metrics": 0,
        },
        "tls": {"certFile": str(tls.cert_file), "keyFile": str(tls.key_file)},
        "spool": {"directory": "spool"},
        "limits": {"spoolMinFreeBytes": 0},
        "retry": {"minBackoff": 0.2, "maxBackoff": 1.0, "maxLifetime": 60.0},
        "outbound": {"concurrency": 8},
        # Tests click within milliseconds of delivery, as a gateway's scanner would (the
        # machine-click timing rule): off unless a test turns it on.
        "tracking": {"machineClickWindow": 0},
        "configPollInterval": 0.1,
        "shutdownGrace": 5.0,
        "logging": {"level": "DEBUG"},
    }
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = _merge(doc[key], value)
        else:
            doc[key] = value
    path = directory / "relay.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# -- the relay in a thread ---------------------------------------------------------------------


@dataclass
class RelayThread:
    """Runs a :class:`Relay` on its own event loop in a thread."""

    settings_path: Path
    relay_kwargs: dict[str, Any] = field(default_factory=dict)
    relay: Relay | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _thread: threading.Thread | None = None
    _error: BaseException | None = None

    def start(self, timeout: float = 15.0) -> RelayThread:
        started = threading.Event()

        async def main() -> None:
            settings = load_settings(self.settings_path)
            self.relay = Relay(
                settings,
                FileConfigSource(self.settings_path, settings.config_poll_interval),
                **self.relay_kwargs,
            )
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                await self.relay.start()
            finally:
                started.set()
            await self._stop.wait()
            await self.relay.stop()

        def run() -> None:
            try:
                asyncio.run(main())
            except BaseException as exc:  # reported by start()/stop()
                self._error = exc
                started.set()

        self._thread = threading.Thread(target=run, name="relay", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise AssertionError("relay did not start")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise AssertionError("relay did not stop")
        if self._error is not None:
            raise self._error

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the relay's loop and return its result."""
        assert self._loop is not None
        future: Any = asyncio.run_coroutine_threadsafe(_as_coroutine(fn), self._loop)
        return future.result(10)

    @property
    def port(self) -> int:
        assert self.relay is not None
        return self.relay.ports["submission"]

    @property
    def tls_port(self) -> int:
        assert self.relay is not None
        return self.relay.ports["submissions"]

    @property
    def tracking_port(self) -> int:
        """The public listener: open pixels and click redirects."""
        assert self.relay is not None
        return self.relay.ports["tracking"]

    @property
    def api_port(self) -> int:
        """The single-send API, send statuses and contacts."""
        assert self.relay is not None
        return self.relay.ports["api"]

    @property
    def metrics_port(self) -> int:
        """/metrics, /healthz, /readyz."""
        assert self.relay is not None
        return self.relay.ports["metrics"]

    @property
    def inbound_port(self) -> int:
        """The inbound listener (DSNs, ARF reports); on with :func:`return_path_overrides`."""
        assert self.relay is not None
        return self.relay.ports["inbound"]

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        assert self.relay is not None
        value = self.relay.registry.get_sample_value(name, labels or {})
        return value or 0.0


async def _as_coroutine(fn: Callable[[], Any]) -> Any:
    return fn()


@dataclass
class RelayEnv:
    directory: Path
    tls: TLSFiles
    sink: Sink
    password: str
    username: str = "app1"
    threads: list[RelayThread] = field(default_factory=list)

    def settings(self, *, upstream_port: int | None = None, **kwargs: Any) -> Path:
        """relay_settings for this env's directory and TLS files: delivering to
        ``upstream_port`` (this env's smtp-sink unless given), this env's user's credentials
        unless ``credentials`` is given."""
        kwargs.setdefault("credentials", [credential(self.username, self.password)])
        upstream = self.sink.port if upstream_port is None else upstream_port
        return relay_settings(self.directory, self.tls, upstream, **kwargs)

    def start(self, settings: Path | None = None, **relay_kwargs: Any) -> RelayThread:
        thread = RelayThread(settings or self.settings(), relay_kwargs).start()
        self.threads.append(thread)
        return thread

    def client(self, relay: RelayThread, *, login: bool = True) -> smtplib.SMTP:
        smtp = smtplib.SMTP("127.0.0.1", relay.port, timeout=10)
        smtp.ehlo("client.test")
        smtp.starttls(context=self.tls.client_context())
        smtp.ehlo("client.test")
        if login:
            smtp.login(self.username, self.password)
        return smtp


@pytest.fixture
def env(tmp_path: Path, tls_files: TLSFiles, sink: Sink) -> Iterator[RelayEnv]:
    environment = RelayEnv(tmp_path / "relay", tls_files, sink, secrets.token_urlsafe(32))
    yield environment
    for thread in environment.threads:
        thread.stop()


def message(seq: int | str, *, sender: str = "app@example.com", body: str = "hello") -> bytes:
    return (
        f"From: App <{sender}>\r\nTo: user@dest.test\r\nSubject: seq {seq}\r\n"
        f"Message-ID: <{seq}.{secrets.token_hex(4)}@example.com>\r\n\r\n"
        f"{body}\r\nEND-OF-MESSAGE {seq}\r\n"
    ).encode()


# -- the published stats file -------------------------------------------------------------------


def token_stats(env: RelayEnv) -> dict[str, Any]:
    """The env token's figures in the stats file (settings ``statsFile: stats.json``); empty
    until the relay first writes it."""
    path = env.directory / "stats.json"
    if not path.exists():
        return {}
    token: dict[str, Any] = json.loads(path.read_text())["tokens"].get(env.username, {})
    return token


def wait_token_stats(env: RelayEnv, **expected: Any) -> dict[str, Any]:
    """token_stats once every ``expected`` figure has its value."""

    def matching() -> dict[str, Any] | None:
        found = token_stats(env)
        return found if found and all(found.get(k) == v for k, v in expected.items()) else None

    result: dict[str, Any] = wait_for(matching, what=f"stats {expected} (last {token_stats(env)})")
    return result


# -- the relay as a real process (the SIGKILL tests) -------------------------------------------


def submission_only(port: int) -> dict[str, Any]:
    """``listen`` settings that open the submission port ``port`` and no other."""
    return {"submission": port, "submissions": None, "tracking": None, "api": None, "metrics": None}


def start_relay_process(
    settings: Path, port: int, log: Path, *, command: Sequence[str] | None = None
) -> subprocess.Popen[bytes]:
    """``txmail-relay --config settings`` as a process (its output appended to ``log``),
    returned once it listens on ``port``. ``command`` runs in place of ``txmail-relay``
    (the crash-point seam of tests/relay/crashpoint.py)."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            [*(relay_command() if command is None else command), "--config", str(settings)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def listening() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"relay exited early, see {log}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_for(listening, 20, "the relay to listen")
    except BaseException:
        kill_relay_process(process)  # never leave a half-started relay behind
        raise
    return process


def kill_relay_process(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL, as a crash or the OOM killer would, and reap it."""
    process.send_signal(signal.SIGKILL)
    process.wait(10)


RETURN_PATH_DOMAIN = "bounces.example.com"


def return_path_overrides(
    domain: str = RETURN_PATH_DOMAIN, *, local_part: str = "bounces"
) -> dict[str, Any]:
    """Settings overrides (``env.settings(overrides=...)``) that turn the VERP return path on
    and open the inbound listener on a free port (``RelayThread.inbound_port``)."""
    return {
        "relay": {"returnPath": {"domain": domain, "localPart": local_part}},
        "listen": {"inbound": 0},
    }


def verp(spool_id: str, domain: str = RETURN_PATH_DOMAIN, *, local_part: str = "bounces") -> str:
    """The envelope sender the relay uses for the message ``spool_id`` (and the inbound
    listener takes DSNs for): ``bounces+<spool id>@<domain>``."""
    return f"{local_part}+{spool_id}@{domain}"


def swaks_available() -> str:
    path = shutil.which("swaks")
    if path is None:
        raise AssertionError("swaks is required (apt-get install swaks)")
    return path


# -- a DNS server ------------------------------------------------------------------------------


@dataclass
class Recorder:
    """An OutcomeListener that keeps every event."""

    events: list[Any] = field(default_factory=list)

    def on_outcome(self, event: Any) -> None:
        self.events.append(event)

    def outcomes(self, recipient: str) -> list[str]:
        return [e.outcome.value for e in list(self.events) if e.recipient == recipient]


# -- templates and the HTTP API ----------------------------------------------------------------


def template_doc(
    email_id: int,
    *,
    namespace: str = "apps",
    subject: str = "Order {{ custom.order_id }}",
    html: str | None = "<p>Hi {{ contact.firstname }}</p>"
    '<p><a href="https://shop.example.com/o/{{ custom.order_id }}">order</a></p>',
    text: str | None = "Hi {{ contact.firstname }}, order {{ custom.order_id }}\n"
    "END-OF-MESSAGE {{ custom.order_id }}\n",
    sender: str = "shop@example.com",
    track: bool = False,
) -> dict[str, Any]:
    """A TemplateEntry document (JSON form) for the settings file."""
    doc: dict[str, Any] = {
        "emailId": email_id,
        "namespace": namespace,
        "name": f"email-{email_id}",
        "generation": 1,
        "from": {"name": "Shop", "address": sender},
        "subject": subject,
        "trackOpens": track,
        "trackClicks": track,
    }
    if html is not None:
        doc["html"] = html
    if text is not None:
        doc["text"] = text
    return doc


BROWSER = "Mozilla/5.0 (X11; Linux x86_64) txmail-tests"


@dataclass(frozen=True)
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    port: int,
    method: str,
    path: str,
    *,
    body: Any = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> HttpReply:
    """One request to the relay's HTTP port (no redirects followed)."""
    import http.client  # noqa: PLC0415

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        # A browser's user agent: a click without one is a machine's (tracking/machine.py).
        sent = {"User-Agent": BROWSER, **(headers or {})}
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        return HttpReply(
            response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        )
    finally:
        conn.close()


def bearer(password: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {password}"}


def basic(username: str, password: str) -> dict[str, str]:
    import base64  # noqa: PLC0415

    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


# -- two tokens in two namespaces (the HTTP API tests) -----------------------------------------

ORDER = 101  # a template of namespace "apps" (the env's token)
OTHER = 202  # a template of namespace "other" (B_USER's token)
B_USER = "app2"


@pytest.fixture
def b_password() -> str:
    """B_USER's password (namespace "other")."""
    return secrets.token_urlsafe(32)


def two_namespace_credentials(
    env: RelayEnv, b_password: str, *, b_domains: list[str] | None = None
) -> list[CredentialEntry]:
    """The env's token (namespace "apps") and B_USER's (namespace "other")."""
    return [
        credential(env.username, env.password),
        credential(B_USER, b_password, domains=b_domains).model_copy(update={"namespace": "other"}),
    ]


def start_two_namespaces(env: RelayEnv, b_password: str) -> RelayThread:
    """A relay with two_namespace_credentials and one template in each namespace."""
    templates = [template_doc(ORDER), template_doc(OTHER, namespace="other")]
    return env.start(
        env.settings(
            credentials=two_namespace_credentials(env, b_password),
            overrides={"templates": templates},
        )
    )


def send_request(to: str = "buyer@dest.test", **message: Any) -> dict[str, Any]:
    """A single-send API request body (HubSpot's shape) for template ORDER."""
    return {
        "emailId": ORDER,
        "message": {"to": to, **message},
        "contactProperties": {"firstname": "Ada"},
        "customProperties": {"order_id": "42"},
    }


def api_send(relay: RelayThread, auth: dict[str, str], email_id: int, to: str) -> HttpReply:
    """POST send_request(to), for template ``email_id``, to the single-send API."""
    doc = {**send_request(to), "emailId": email_id}
    return http(relay.api_port, "POST", SEND_PATH, body=doc, headers=auth)


def tracking_keys_file(directory: Path, *kids: int) -> Path:
    """A ``kid:hexkey`` file (the last key signs)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tracking.keys"
    path.write_text("".join(f"{kid}:{secrets.token_hex(32)}\n" for kid in kids or (1,)))
    return path


def parsed(captured: Captured) -> Any:
    """The captured message as an ``email.message.EmailMessage`` (smtp-sink's dump is split
    at our Received header)."""
    import email  # noqa: PLC0415
    import email.policy  # noqa: PLC0415

    return email.message_from_string(
        "Received: from " + captured.content, policy=email.policy.default
    )


def arf_report(to: str, original_message_id: str, rcpt: str) -> bytes:
    """An RFC 5965 feedback report (abuse) about ``original_message_id`` sent to ``rcpt``."""
    report = EmailMessage()
    report["From"] = "feedback@isp.test"
    report["To"] = to
    report["Subject"] = "FW: complaint"
    report["Message-ID"] = f"<{secrets.token_hex(8)}@isp.test>"
    report.set_content("This is an email abuse report.\n")
    report.make_mixed()
    # RFC 5965 layout: multipart/report; report-type=feedback-report.
    report.replace_header("Content-Type", 'multipart/report; report-type="feedback-report"')
    report.set_boundary("arf-boundary")
    fields = EmailMessage()
    fields.set_payload(
        "Feedback-Type: abuse\r\nUser-Agent: isp-fbl/1.0\r\nVersion: 1\r\n"
        f"Original-Rcpt-To: {rcpt}\r\n"
    )
    fields["Content-Type"] = "message/feedback-report"
    report.attach(fields)
    original = EmailMessage()
    original["From"] = "shop@example.com"
    original["To"] = rcpt
    original["Subject"] = "Order 42"
    original["Message-ID"] = original_message_id
    original.set_content("order\n")
    wrapper = EmailMessage()
    wrapper.set_content(original)
    report.attach(wrapper)
    return report.as_bytes()
