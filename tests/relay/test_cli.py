"""``txmail-relay`` as a user runs it: the installed entry point, in a subprocess.

Bad input is one line on stderr naming the file and the problem, exit status 2, never a
traceback. In file mode a broken live edit is logged and the last good configuration keeps
serving until the next valid edit, which takes effect without a restart.
"""

from __future__ import annotations

import importlib.metadata
import secrets
import socket
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from peers import RelayProcess, Sink, TLSFiles, auth_accepted, free_port, relay_command, submit
from peers import wait_for as wait
from relay.relaykit import HOSTNAME, smarthost_relay, submission_only
from txmail_relay.contract import CredentialEntry, PasswordDigest, password_digest
from txmail_relay.records.records import DB_NAME


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*relay_command(), *args], capture_output=True, text=True, timeout=30, check=False
    )


def test_help_and_version() -> None:
    helped = run("--help")
    assert helped.returncode == 0, helped.stderr
    assert "--config" in helped.stdout and "--version" in helped.stdout
    versioned = run("--version")
    assert versioned.returncode == 0, versioned.stderr
    assert versioned.stdout.strip() == f"txmail-relay {importlib.metadata.version('txmail')}"


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_missing_arguments_are_one_line() -> None:
    line = _one_line_error(run())
    assert line == "txmail-relay: the following arguments are required: --config (see --help)"


SECRET = "s3cr3t-" + "x" * 20  # appears in the broken files; must never be echoed


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        (
            "yaml-syntax",
            f"relayFile: relay.json\nlisten:\n  host: {SECRET}: 1\n",
            "line 3: mapping values are not allowed here",
        ),
        (
            "unknown-key",
            f"relayFile: relay.json\nlisten: {{htp: 8080}}\nnote: {SECRET}\n",
            "listen.htp: unknown key; note: unknown key",
        ),
        (
            "wrong-type",
            "relayFile: relay.json\nlisten: {tracking: eighty}\n",
            "listen.tracking: Input should be a valid integer",
        ),
        ("not-a-mapping", "- relayFile\n", "expected a mapping of settings at the top level"),
        ("no-source", "listen: {tracking: 8080}\n", "one of relay, relayFile or kubernetes"),
        ("bad-log-level", "relayFile: relay.json\nlogging: {level: LOUD}\n", "logging.level:"),
    ],
)
def test_bad_settings_file_is_one_line(
    tmp_path: Path, name: str, content: str, problem: str
) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(content)
    line = _one_line_error(run("--config", str(path)))
    assert line.startswith(f"txmail-relay: {path}: {problem}"), line
    assert SECRET not in line


def test_missing_settings_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    line = _one_line_error(run("--config", str(path)))
    assert line == f"txmail-relay: {path}: cannot read: No such file or directory"


def test_broken_documents_named_by_the_settings_are_one_line(tmp_path: Path) -> None:
    """File mode loads the JSON files the settings name before it starts."""
    (tmp_path / "relay.json").write_text('{"kind": "RelayConfig",\n "dedicatedIP": }\n')
    path = tmp_path / "relay.yaml"
    path.write_text("relayFile: relay.json\n")
    line = _one_line_error(run("--config", str(path)))
    assert line.startswith(f"txmail-relay: {tmp_path / 'relay.json'}: line 2: "), line
    (tmp_path / "relay.json").write_text('{"kind": "RelayConfig"}')
    line = _one_line_error(run("--config", str(path)))
    assert "dedicatedIP: required key missing" in line, line


# -- live edits in file mode -------------------------------------------------------------------


def _entry(username: str, password: str) -> dict[str, Any]:
    entry = CredentialEntry(
        username=username,
        namespace="apps",
        token=username,
        digests=[PasswordDigest(sha256=password_digest(password), generation=1)],
        allowed_from_domains=["example.com"],
        email_campaign_id=1,
    )
    doc: dict[str, Any] = entry.model_dump(mode="json", by_alias=True, exclude_none=True)
    return doc


def _settings(port: int, sink: Sink, tls: TLSFiles, credentials: list[dict[str, Any]]) -> str:
    doc = {
        "relay": smarthost_relay(sink.port),
        "credentials": credentials,
        "listen": {"host": "127.0.0.1", **submission_only(port)},
        "tls": {"certFile": str(tls.cert_file), "keyFile": str(tls.key_file)},
        "spool": {"directory": "spool"},
        "limits": {"spoolMinFreeBytes": 0},
        "retry": {"minBackoff": 0.2, "maxBackoff": 1.0, "maxLifetime": 60.0},
        "configPollInterval": 0.1,
        "shutdownGrace": 5.0,
    }
    return yaml.safe_dump(doc, sort_keys=False)


def _replace(path: Path, text: str) -> None:
    """Atomic, as an editor or a ConfigMap update would leave it."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    tmp.replace(path)


def test_a_broken_live_edit_keeps_the_last_good_config_until_fixed(
    tmp_path: Path, tls_files: TLSFiles, sink: Sink
) -> None:
    port = free_port()
    first, second = "p" + secrets.token_urlsafe(24), "p" + secrets.token_urlsafe(24)
    good = _settings(port, sink, tls_files, [_entry("app1", first)])
    relay = RelayProcess(yaml.safe_load(good), tmp_path)
    relay.start(wait_port=("127.0.0.1", port))
    try:
        app = {"ca.crt": tls_files.ca_file.read_text(), "host": HOSTNAME, "username": "app1"}
        address = ("127.0.0.1", port)

        def mail(seq: int) -> bytes:
            return (
                f"From: app@example.com\r\nTo: user@dest.test\r\nSubject: {seq}\r\n\r\n"
                f"edit {seq}\r\nEND-OF-MESSAGE {seq}\r\n"
            ).encode()

        submit(address, app, mail(1), "app@example.com", ["user@dest.test"], first)
        sink.wait(1)

        # 1. A YAML syntax error: logged once, in one line naming the file and the line.
        lines = good.splitlines()
        broken = [*lines[:3], "  oops: [unclosed", *lines[3:]]
        _replace(relay.config, "\n".join(broken) + "\n")
        error = wait(
            lambda: next(
                (x for x in relay.output().splitlines() if "configuration not loaded" in x), None
            ),
            10,
            "the YAML error logged",
        )
        assert f"{relay.config}: line 5: " in error, error  # the line after the bad one
        submit(address, app, mail(2), "app@example.com", ["user@dest.test"], first)
        sink.wait(2)  # the old configuration still serves

        # 2. Valid YAML, invalid document: logged too, still serving.
        _replace(relay.config, good.replace("submissions: null", "submissions: many"))
        wait(
            lambda: "listen.submissions: Input should be a valid integer" in relay.output(),
            10,
            "the invalid document logged",
        )
        assert auth_accepted(address, app, first)

        # 3. A valid edit that changes the credentials takes effect without a restart.
        _replace(relay.config, _settings(port, sink, tls_files, [_entry("app2", second)]))
        second_app = {**app, "username": "app2"}
        wait(lambda: auth_accepted(address, second_app, second), 10, "the fixed edit applied")
        assert not auth_accepted(address, app, first)
        submit(address, second_app, mail(3), "app@example.com", ["user@dest.test"], second)
        sink.wait(3)
        assert relay.process is not None and relay.process.poll() is None

        output = relay.output()
        assert "Traceback" not in output
        for secret in (first, second, password_digest(first), password_digest(second)):
            assert secret not in output
    finally:
        relay.stop()


def test_a_port_in_use_is_one_line(tmp_path: Path, tls_files: TLSFiles, sink: Sink) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = tmp_path / "relay.yaml"
        path.write_text(_settings(port, sink, tls_files, [_entry("app1", "pw")]))
        result = run("--config", str(path))
    assert result.returncode == 1, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("txmail-relay: cannot start: ") and str(port) in last, last
    assert "Traceback" not in result.stderr


def test_records_of_a_newer_relay_are_one_line(
    tmp_path: Path, tls_files: TLSFiles, sink: Sink
) -> None:
    """A rollback to an older relay refuses the newer schema and says so, touching nothing."""
    spool = tmp_path / "spool"
    spool.mkdir()
    database = spool / DB_NAME
    with sqlite3.connect(database) as db:
        db.execute("PRAGMA user_version = 999")
    doc = yaml.safe_load(_settings(free_port(), sink, tls_files, [_entry("app1", "pw")]))
    doc["spool"]["directory"] = str(spool)
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = run("--config", str(path))
    assert result.returncode == 1, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("txmail-relay: cannot start: ") and "999" in last, last
    assert "Traceback" not in result.stderr
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (999,)


def test_a_missing_certificate_is_one_line(tmp_path: Path, tls_files: TLSFiles, sink: Sink) -> None:
    absent = TLSFiles(tls_files.ca_file, tmp_path / "absent.crt", tls_files.key_file)
    path = tmp_path / "relay.yaml"
    path.write_text(_settings(free_port(), sink, absent, [_entry("app1", "pw")]))
    result = run("--config", str(path))
    assert result.returncode == 1, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"txmail-relay: cannot start: TLS certificate {absent.cert_file}"), last
    assert last.endswith("No such file or directory"), last
    assert "Traceback" not in result.stderr


def test_a_second_relay_on_the_same_spool_waits_for_the_first(
    tmp_path: Path, tls_files: TLSFiles, sink: Sink
) -> None:
    """As when a relay pod deleted by hand is replaced while it still shuts down, on one
    ReadWriteOnce spool volume: the new relay neither recovers nor listens until the old one
    has stopped."""
    relays: list[RelayProcess] = []
    ports = []
    for name in ("old", "new"):
        port = free_port()
        doc = yaml.safe_load(_settings(port, sink, tls_files, [_entry("app1", "pw")]))
        doc["spool"]["directory"] = str(tmp_path / "spool")
        (tmp_path / name).mkdir()
        relays.append(RelayProcess(doc, tmp_path / name))
        ports.append(port)
    old, new = relays
    old.start(wait_port=("127.0.0.1", ports[0]))
    try:
        new.start()
        wait(
            lambda: "spool is in use by another relay" in new.output(),
            20,
            "the second relay to say it waits",
        )
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", ports[1])) != 0, "the second relay must not listen"
        old.stop()
        wait(lambda: _listens(ports[1]), 20, "the second relay to take over the spool")
        # Log lines are written in batches, within 0.1 s: wait for it, as for the port.
        wait(lambda: "spool lock acquired" in new.output(), 10, "the takeover's log line")
    finally:
        old.stop()
        new.stop()


def _listens(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
