"""Connections (issue 10, items 10-14): caps, timeouts on silence, replies when closing.

Real sockets from several loopback addresses (127.0.0.x stand for client addresses), real
clients (smtplib, http.client) and raw sockets for what no client does on purpose: silence,
an upload one line at a time, a request whose headers never end. Limits and timeouts are
small so that each test takes seconds; every wait polls with a deadline. The SIGTERM and
open-file tests run the relay as a process, as the pod does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import re
import resource
import select
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peers import relay_command
from relay.relaykit import (
    RelayEnv,
    RelayThread,
    credential,
    free_port,
    message,
    relay_settings,
    wait_for,
)
from txmail_relay.ingress.connections import client_key

LIMITS: dict[str, Any] = {
    "maxConnections": 5,
    "maxConnectionsPerAddress": 3,
    "maxHttpConnections": 5,
    "maxHttpConnectionsPerAddress": 3,
    "idleTimeout": 1.0,
    "tlsHandshakeTimeout": 5.0,
    "dataUploadTimeout": 4.0,
    "maxJunkCommands": 5,
    "httpHeaderTimeout": 1.0,
    "httpBodyTimeout": 1.0,
    "httpKeepaliveTimeout": 2.0,
}
# How long a test waits for something a 1 s timeout should do (a loaded 2-core machine).
SOON = 4.0


def start(env: RelayEnv, **limits: Any) -> RelayThread:
    return env.start(env.settings(overrides={"limits": {**LIMITS, **limits}}))


def smtp(port: int, source: str = "127.0.0.1") -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0))


def smtps(env: RelayEnv, port: int, source: str = "127.0.0.1") -> smtplib.SMTP_SSL:
    return smtplib.SMTP_SSL(
        "127.0.0.1",
        port,
        timeout=10,
        source_address=(source, 0),
        context=env.tls.client_context(),
    )


def logged_in(env: RelayEnv, port: int) -> smtplib.SMTP:
    client = smtp(port)
    client.ehlo("client.test")
    client.starttls(context=env.tls.client_context())
    client.ehlo("client.test")
    client.login(env.username, env.password)
    return client


def closed_within(sock: socket.socket, seconds: float) -> bytes:
    """Everything the server sends until it closes; fails if it is still open after that."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + seconds
    received = b""
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except (ConnectionResetError, ssl.SSLError):
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"still open after {seconds} s (received {received!r})")


def refused(call: Any) -> tuple[int, bytes]:
    with pytest.raises(smtplib.SMTPConnectError) as error:
        call()
    text = error.value.smtp_error
    return error.value.smtp_code, text if isinstance(text, bytes) else text.encode()


def http_get(port: int, path: str, source: str = "127.0.0.1") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def auth_plain(username: str, password: str) -> str:
    return "PLAIN " + base64.b64encode(f"\0{username}\0{password}".encode()).decode()


# -- item 10: connection caps, the reserve, the open-file limit --------------------------------


def test_connections_are_capped_per_address_and_overall(env: RelayEnv) -> None:
    relay = start(env, idleTimeout=60.0, httpHeaderTimeout=60.0)
    with contextlib.ExitStack() as held:
        # Both SMTP ports count towards the same per-address and overall caps.
        held.enter_context(smtp(relay.port))
        held.enter_context(smtp(relay.port))
        held.enter_context(smtps(env, relay.tls_port))
        code, text = refused(lambda: smtp(relay.port))
        assert (code, text[:6]) == (421, b"4.7.0 "), text
        assert b"from your address" in text
        code, text = refused(lambda: smtps(env, relay.tls_port))
        assert (code, text[:6]) == (421, b"4.7.0 "), text

        held.enter_context(smtp(relay.port, "127.0.0.2"))
        held.enter_context(smtp(relay.port, "127.0.0.2"))  # 5: the overall cap
        code, text = refused(lambda: smtp(relay.port, "127.0.0.3"))
        assert (code, text[:6]) == (421, b"4.3.2 "), text

        # The refused connection is closed right after its 421.
        with socket.create_connection(("127.0.0.1", relay.port), 10, ("127.0.0.4", 0)) as sock:
            assert closed_within(sock, SOON).startswith(b"421 4.3.2 ")

        # The reserve: probes and the API answer while SMTP is full.
        assert http_get(relay.metrics_port, "/healthz") == 200
        assert http_get(relay.api_port, "/marketing/v3/email/send-statuses/x") == 401

        assert relay.metric("txmail_relay_smtp_sessions") == 5
        assert relay.metric("txmail_relay_smtp_rejections_total", {"reason": "connections"}) >= 4
    # Slots are given back when connections close: a client from the first address again.
    wait_for(lambda: relay.metric("txmail_relay_smtp_sessions") == 0, SOON, "sessions to end")
    with logged_in(env, relay.port) as client:
        client.sendmail("app@example.com", ["user@dest.test"], message(1))


def test_ipv6_clients_are_counted_per_64_prefix() -> None:
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9")
    assert client_key("2001:db8:1:2::1") != client_key("2001:db8:1:3::1")
    assert client_key("::ffff:192.0.2.7") == client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("192.0.2.7") != client_key("192.0.2.8")
    assert client_key("not an address") == "not an address"


def _relay_process(
    env: RelayEnv, ports: dict[str, int], limits: dict[str, Any], *, nofile: tuple[int, int]
) -> subprocess.Popen[bytes]:
    settings = relay_settings(
        env.directory,
        env.tls,
        env.sink.port,
        credentials=[credential(env.username, env.password)],
        overrides={
            "listen": ports,
            "limits": limits,
            "logging": {"level": "INFO"},
        },
    )
    log = (env.directory / "relay.log").open("ab")

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

    process = subprocess.Popen(
        [*relay_command(), "--config", str(settings)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=limit_files,  # noqa: PLW1509 - only setrlimit, before exec
    )
    log.close()

    def listening() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"relay exited: {(env.directory / 'relay.log').read_text()}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", ports["submission"])) == 0

    wait_for(listening, 20, "the relay to listen")
    return process


@contextlib.contextmanager
def relay_process(
    env: RelayEnv, limits: dict[str, Any], *, nofile: tuple[int, int] = (20000, 20000)
) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, int]]]:
    names = ("submission", "submissions", "tracking", "api", "metrics")
    ports = {name: free_port() for name in names}
    process = _relay_process(env, ports, limits, nofile=nofile)
    try:
        yield process, ports
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def _soft_nofile(pid: int) -> int:
    text = Path(f"/proc/{pid}/limits").read_text()
    found = re.search(r"Max open files\s+(\d+)\s+(\d+)", text)
    assert found is not None, text
    return int(found.group(1))


def test_idle_connections_cannot_use_up_the_open_file_limit(env: RelayEnv) -> None:
    """1,124 idle connections against a 1,024 open-file limit locked out /healthz and real
    clients. Scaled down: a relay started with soft/hard 128/256 and 300 idle connections
    from one address."""
    limits = {"maxConnectionsPerAddress": 20, "reservedFiles": 64, "idleTimeout": 60.0}
    with relay_process(env, limits, nofile=(128, 256)) as (process, ports):
        flood = []
        try:
            for _ in range(300):
                sock = socket.create_connection(
                    ("127.0.0.1", ports["submission"]), 10, ("127.0.0.2", 0)
                )
                flood.append(sock)
            # Probes and real clients from another address get through.
            assert http_get(ports["metrics"], "/healthz") == 200
            with logged_in(env, ports["submission"]) as client:
                client.sendmail("app@example.com", ["user@dest.test"], message(1))
            greetings = []
            for sock in flood[:25]:
                sock.settimeout(10)
                greetings.append(sock.recv(200)[:9])
            assert greetings.count(b"220 relay") == 20
            assert greetings.count(b"421 4.7.0") == 5
            # The soft limit was raised to the hard one at start.
            assert _soft_nofile(process.pid) == 256
        finally:
            for sock in flood:
                sock.close()


# -- item 11: HTTP header and body timeouts, per-address caps -----------------------------------


def test_http_requests_that_never_end_are_cut(env: RelayEnv) -> None:
    relay = start(env)
    # Headers trickling in, one field every 0.2 s, never finished.
    with socket.create_connection(("127.0.0.1", relay.tracking_port), 10) as sock:
        sock.sendall(b"GET /o/x.gif HTTP/1.1\r\nHost: t.test\r\n")
        sock.settimeout(0.2)
        deadline = time.monotonic() + SOON
        reply = b""
        while time.monotonic() < deadline:
            try:
                sock.sendall(b"X-Slow: yes\r\n")
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if not chunk:
                break
            reply += chunk
        else:
            raise AssertionError("a request whose headers never end was not cut")
        assert reply.startswith(b"HTTP/1.1 408 "), reply
    # A connection that never sends anything.
    with socket.create_connection(("127.0.0.1", relay.tracking_port), 10) as sock:
        closed_within(sock, SOON)
    # A body that never arrives (the API port).
    with socket.create_connection(("127.0.0.1", relay.api_port), 10) as sock:
        sock.sendall(
            b"POST /marketing/v3/transactional/single-email/send HTTP/1.1\r\nHost: a\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n"
            b"Authorization: Bearer " + env.password.encode() + b'\r\n\r\n{"emailId"'
        )
        assert closed_within(sock, SOON).startswith(b"HTTP/1.1 408 ")
    # A keep-alive connection idle after a request is closed too.
    conn = http.client.HTTPConnection("127.0.0.1", relay.tracking_port, timeout=10)
    conn.request("GET", "/o/x.gif")
    assert conn.getresponse().read()
    assert conn.sock is not None
    closed_within(conn.sock, SOON + 2)
    conn.close()
    # A complete request still gets its answer.
    assert http_get(relay.tracking_port, "/o/x.gif") == 200


def test_http_connections_are_capped_per_address(env: RelayEnv) -> None:
    relay = start(env, httpHeaderTimeout=60.0, httpKeepaliveTimeout=60.0)
    with contextlib.ExitStack() as held:
        for _ in range(3):
            held.enter_context(socket.create_connection(("127.0.0.1", relay.tracking_port), 10))
        with socket.create_connection(("127.0.0.1", relay.tracking_port), 10) as sock:
            assert closed_within(sock, SOON).startswith(b"HTTP/1.1 429 ")
        assert http_get(relay.tracking_port, "/o/x.gif", "127.0.0.2") == 200
        # The metrics listener (probes) is not the tracking listener's budget.
        assert http_get(relay.metrics_port, "/healthz") == 200

    def served() -> bool:
        with contextlib.suppress(OSError):
            return http_get(relay.tracking_port, "/o/x.gif") == 200
        return False

    wait_for(served, SOON, "a free slot")


# -- item 12: DATA times out on silence, not on length ------------------------------------------


def _begin_data(client: smtplib.SMTP) -> None:
    assert client.docmd("MAIL FROM:<app@example.com>")[0] == 250
    assert client.docmd("RCPT TO:<user@dest.test>")[0] == 250
    assert client.docmd("DATA")[0] == 354
    client.send(b"From: app@example.com\r\nTo: user@dest.test\r\nSubject: slow\r\n\r\n")


def test_a_slow_upload_that_keeps_flowing_is_not_cut(env: RelayEnv) -> None:
    relay = start(env)  # idle timeout 1 s
    with logged_in(env, relay.port) as client:
        _begin_data(client)
        end = time.monotonic() + 3.0  # three idle timeouts
        line = 0
        while time.monotonic() < end:
            client.send(f"line {line}\r\n".encode())
            line += 1
            time.sleep(0.25)  # the pace of the upload (a real client's), not a wait for a result
        client.send(b"END-OF-MESSAGE slow\r\n.\r\n")
        assert client.getreply()[0] == 250
    [captured] = env.sink.wait(1)
    assert "line 10" in captured.content


def test_an_upload_that_stops_gets_421_after_the_idle_timeout(env: RelayEnv) -> None:
    relay = start(env)
    with logged_in(env, relay.port) as client:
        _begin_data(client)
        client.send(b"half a message\r\n")
        code, text = client.getreply()  # the client waits: silence
        assert (code, text[:6]) == (421, b"4.4.2 "), text
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()


def test_an_upload_longer_than_the_data_bound_gets_421(env: RelayEnv) -> None:
    relay = start(env, dataUploadTimeout=2.0)
    with logged_in(env, relay.port) as client:
        _begin_data(client)
        assert client.sock is not None
        deadline = time.monotonic() + 2.0 + SOON
        while not select.select([client.sock], [], [], 0.25)[0]:  # a line every 0.25 s
            assert time.monotonic() < deadline, "an endless upload was not cut"
            client.send(b"still coming\r\n")
        code, text = client.getreply()
        assert (code, text[:6]) == (421, b"4.4.2 "), text
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    assert env.sink.messages() == []


class SlowSpool:
    """The relay's spool behind a disk that takes 2 s per message (longer than idleTimeout)."""

    def __init__(self, spool: Any) -> None:
        self._spool = spool

    async def append(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(2.0)
        return await self._spool.append(*args, **kwargs)


def test_the_relays_own_work_is_not_the_clients_silence(env: RelayEnv) -> None:
    relay = start(env)  # idle timeout 1 s
    assert relay.relay is not None
    sends = relay.relay.sends
    relay.call(lambda: setattr(sends, "_spool", SlowSpool(sends._spool)))
    with logged_in(env, relay.port) as client:
        client.sendmail("app@example.com", ["user@dest.test"], message(1))  # no 421 meanwhile
    env.sink.wait(1)


def test_idle_sessions_are_told_before_they_are_closed(env: RelayEnv) -> None:
    relay = start(env)
    with socket.create_connection(("127.0.0.1", relay.port), 10) as sock:
        assert closed_within(sock, SOON).endswith(b"421 4.4.2 Idle timeout, closing connection\r\n")


# -- item 13: SIGTERM -------------------------------------------------------------------------


def _delivered(env: RelayEnv, subject: str) -> bool:
    return any(subject in m.content for m in env.sink.messages())


def test_sigterm_tells_sessions_and_lets_an_upload_finish(env: RelayEnv) -> None:
    limits = {"idleTimeout": 30.0}
    with relay_process(env, limits) as (process, ports):
        port = ports["submission"]
        # The idle one on the implicit-TLS port (the process runs uvloop when installed).
        idle = smtps(env, ports["submissions"])
        idle.login(env.username, env.password)
        with idle, logged_in(env, port) as uploading:
            _begin_data(uploading)
            uploading.send(b"first half\r\n")
            process.send_signal(signal.SIGTERM)
            code, text = idle.getreply()  # unsolicited: the relay is going away
            assert (code, text) == (421, b"4.3.2 Service shutting down")
            with pytest.raises(smtplib.SMTPServerDisconnected):
                idle.noop()
            # The upload in progress finishes and gets its 250, then the 421.
            uploading.send(b"second half\r\nEND-OF-MESSAGE sigterm\r\n.\r\n")
            assert uploading.getreply()[0] == 250
            assert uploading.getreply() == (421, b"4.3.2 Service shutting down")
            with pytest.raises(OSError):  # no longer listening
                socket.create_connection(("127.0.0.1", port), 2).close()
        assert process.wait(15) == 0
    if not _delivered(env, "Subject: slow"):  # spooled, delivered after a restart
        with relay_process(env, limits):
            wait_for(lambda: _delivered(env, "Subject: slow"), 15, "the message at the sink")


# -- item 14: TLS handshakes, commands without progress, AUTH blocks ----------------------------


def test_a_silent_connection_on_the_implicit_tls_port_lives_no_longer_than_the_idle_timeout(
    env: RelayEnv,
) -> None:
    relay = start(env)  # idle 1 s, TLS handshake 5 s: the shorter applies
    with socket.create_connection(("127.0.0.1", relay.tls_port), 10) as sock:
        closed_within(sock, SOON)
    # STARTTLS, then silence instead of a ClientHello.
    with socket.create_connection(("127.0.0.1", relay.port), 10) as sock:
        sock.settimeout(5)
        assert sock.recv(200).startswith(b"220 ")
        sock.sendall(b"EHLO c.test\r\n")
        wait_for(lambda: b"250 " in (reply := sock.recv(2000)) and reply, 5, "EHLO")
        sock.sendall(b"STARTTLS\r\n")
        assert sock.recv(200).startswith(b"220 ")
        closed_within(sock, SOON)


def test_commands_without_progress_are_limited(env: RelayEnv) -> None:
    relay = start(env, idleTimeout=30.0)
    with logged_in(env, relay.port) as client:
        code, text = client.docmd("HELP", "MAIL")  # aiosmtpd's syntax table still answers
        assert (code, text) == (250, b"Syntax: MAIL FROM: <address> [SP <mail-parameters>]")
        for _ in range(3):
            assert client.noop()[0] == 250
        client.sendmail("app@example.com", ["user@dest.test"], message(1))  # progress
        for _ in range(5):
            assert client.noop()[0] == 250
        code, text = client.noop()
        assert (code, text[:6]) == (421, b"4.7.0 "), text
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    # Refused commands count too (an address probed again and again).
    with logged_in(env, relay.port) as client:
        codes = [client.docmd("RCPT TO:<user@dest.test>")[0] for _ in range(6)]
        assert codes == [503] * 5 + [421]


def test_an_address_blocked_for_auth_failures_is_told_for_how_long(env: RelayEnv) -> None:
    relay = start(env, idleTimeout=30.0, ipAuthFailures=3, ipAuthWindow=30.0)
    client = smtp(relay.port)
    client.ehlo("client.test")
    client.starttls(context=env.tls.client_context())
    client.ehlo("client.test")
    for _ in range(3):
        assert client.docmd("AUTH", auth_plain(env.username, "wrong"))[0] == 535
    client.close()
    client = smtp(relay.port)
    client.ehlo("client.test")
    client.starttls(context=env.tls.client_context())
    client.ehlo("client.test")
    code, text = client.docmd("AUTH", auth_plain(env.username, env.password))
    assert code == 421
    found = re.fullmatch(
        rb"4\.7\.0 Too many failed logins from your address: every AUTH is refused, even "
        rb"with the right password, for (\d+) s",
        text,
    )
    assert found is not None, text
    assert 0 < int(found.group(1)) <= 30
    client.close()
