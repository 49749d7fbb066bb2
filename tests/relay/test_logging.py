"""The relay process's log at INFO and DEBUG: one line per accepted message with its fields,
aiosmtpd's per-command lines only at DEBUG, lines out while it runs (batched) and the last
ones kept at a normal stop, never a password or a body."""

from __future__ import annotations

import base64
import json
import secrets
import signal
import smtplib
from pathlib import Path
from typing import Any

import pytest

from relay.relaykit import (
    RelayEnv,
    free_port,
    kill_relay_process,
    message,
    start_relay_process,
    submission_only,
    wait_for,
)


def _records(log: Path) -> list[dict[str, Any]]:
    """The JSON log lines of the relay (anything else on its output is left out)."""
    found = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


def _run(env: RelayEnv, level: str, count: int, body: str) -> tuple[Path, list[dict[str, Any]]]:
    """Submit ``count`` messages in one session to a relay process logging at ``level``,
    wait for their "message accepted" lines while it runs, stop it with SIGTERM; its log."""
    port = free_port()
    settings = env.settings(
        overrides={"logging": {"level": level, "json": True}, "listen": submission_only(port)},
    )
    log = env.directory / f"relay-{level}.log"
    process = start_relay_process(settings, port, log)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.ehlo("client.test")
            smtp.starttls(context=env.tls.client_context())
            smtp.login(env.username, env.password)
            for seq in range(count):
                smtp.sendmail("app@example.com", ["user@dest.test"], message(seq, body=body))

        def accepted() -> list[dict[str, Any]] | None:
            found = [r for r in _records(log) if r["message"] == "message accepted"]
            return found if len(found) == count else None

        # Batched lines still come out while the relay runs, not only at its stop.
        lines = wait_for(accepted, 10, f"{count} 'message accepted' lines in {log}")
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            kill_relay_process(process)
    return log, lines


@pytest.mark.slow
def test_info_logs_one_line_per_message_and_the_stop(env: RelayEnv) -> None:
    body = "BODY-" + secrets.token_hex(8)
    log, accepted = _run(env, "INFO", 3, body)
    assert len({r["msg_id"] for r in accepted}) == 3
    for record in accepted:
        assert record["level"] == "INFO"
        assert record["token"] == env.username
        assert record["recipients"] == 1
        assert record["size"] > 0
    records = _records(log)
    assert not [r for r in records if r["logger"] == "mail.log"], "aiosmtpd's lines are off"
    # A normal stop writes the last lines out (they were waiting in the handler's buffer).
    assert records[-1]["message"] == "relay stopped", records[-3:]
    text = log.read_text()
    assert body not in text and env.password not in text


@pytest.mark.slow
def test_debug_logs_aiosmtpd_commands_but_no_secrets(env: RelayEnv) -> None:
    body = "BODY-" + secrets.token_hex(8)
    log, _ = _run(env, "DEBUG", 1, body)
    commands = [r for r in _records(log) if r["logger"] == "mail.log"]
    assert any("mail from:" in r["message"].lower() for r in commands), commands[:5]
    text = log.read_text()
    plain = base64.b64encode(f"\0{env.username}\0{env.password}".encode()).decode()
    for secret in (body, env.password, plain):
        assert secret not in text
