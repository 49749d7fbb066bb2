"""Settings, configuration sources (files, Kubernetes parsing), limiter, backoff, HTTP.

The Kubernetes watches themselves are tested against an API server in
tests/k8s/test_relay_live.py (410 Gone, a broken edit, the first complete snapshot)."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.request
from pathlib import Path

import pytest

from relay.relaykit import RelayEnv, credential, write_credentials
from txmail_relay import contract as c
from txmail_relay.config.file import FileConfigSource
from txmail_relay.config.kube import (
    KubeState,
    parse_credentials_secret,
    parse_relay_config_map,
    parse_templates_config_map,
)
from txmail_relay.config.live import LiveConfig
from txmail_relay.contract import RELAY_CONFIG_KEY, RelayConfig
from txmail_relay.delivery.queue import backoff
from txmail_relay.ingress.auth import FailureLimiter
from txmail_relay.settings import RetrySettings, Settings, load_settings

RELAY = RelayConfig(
    dedicated_ip="203.0.113.7", address="203.0.113.7", hostname="mx.example.com", domains=["a.com"]
)


def test_settings_need_exactly_one_source(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("listen: {host: 127.0.0.1}\n")
    with pytest.raises(ValueError, match="required"):
        load_settings(path)
    path.write_text("kubernetes: {namespace: ns, dedicatedIP: 203.0.113.7}\n")
    settings = load_settings(path)
    assert settings.kubernetes is not None
    assert settings.retry.final_dot_timeout == 600
    assert settings.retry.max_lifetime == 5 * 86400
    path.write_text("relayFile: relay.json\nspool: {directory: spool}\nbogus: 1\n")
    with pytest.raises(ValueError, match="bogus"):
        load_settings(path)


def test_relative_paths_follow_the_settings_file(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("relayFile: relay.json\nspool: {directory: spool}\n")
    settings = load_settings(path)
    assert settings.relay_file == tmp_path / "relay.json"
    assert settings.spool.directory == tmp_path / "spool"


async def test_file_source_reloads_changed_credentials(tmp_path: Path) -> None:
    (tmp_path / "relay.json").write_text(RELAY.to_json())
    write_credentials(tmp_path / "creds.json", [credential("one", "pw")])
    path = tmp_path / "relay.yaml"
    path.write_text("relayFile: relay.json\ncredentialFiles: [creds.json]\n")
    store = LiveConfig()
    task = asyncio.create_task(FileConfigSource(path, poll_interval=0.02).run(store))
    try:
        first = await asyncio.wait_for(store.wait_ready(), 5)
        assert set(first.credentials) == {"one"}
        (tmp_path / "creds.json").write_text("{not json")  # a broken update is ignored
        await asyncio.sleep(0.1)
        assert store.current is not None
        assert set(store.current.credentials) == {"one"}
        write_credentials(tmp_path / "creds.json", [credential("two", "pw")])
        for _ in range(250):  # up to 5 s
            if store.current is not None and set(store.current.credentials) == {"two"}:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the new credentials file was not loaded within 5 s")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_kubernetes_documents_are_parsed() -> None:
    entry = credential("app1", "pw")
    secret = {
        "app1": base64.b64encode(entry.to_json().encode()).decode(),
        "broken": base64.b64encode(b"{}").decode(),
        "mismatch": base64.b64encode(entry.to_json().encode()).decode(),
    }
    assert set(parse_credentials_secret(secret)) == {"app1"}
    assert parse_credentials_secret(None) == {}
    assert parse_relay_config_map({RELAY_CONFIG_KEY: RELAY.to_json()}) == RELAY
    assert parse_relay_config_map({}) is None
    template = {
        "emailId": 7,
        "namespace": "apps",
        "name": "welcome",
        "generation": 1,
        "from": {"address": "a@a.com"},
        "subject": "Hi",
    }
    parsed = parse_templates_config_map({"7": json.dumps(template), "8": "nonsense"})
    assert list(parsed) == [7]


def test_snapshot_waits_for_every_shard() -> None:
    state = KubeState(relay=RELAY.model_copy(update={"credential_shards": 2, "template_shards": 1}))
    state.credentials[0] = {"a": credential("a", "pw")}
    state.templates[0] = {}
    assert state.snapshot() is None
    state.credentials[1] = {"b": credential("b", "pw")}
    snapshot = state.snapshot()
    assert snapshot is not None
    assert set(snapshot.credentials) == {"a", "b"}


def test_failure_limiter_window() -> None:
    now = [0.0]
    limiter = FailureLimiter(3, 60, clock=lambda: now[0])
    for _ in range(3):
        assert not limiter.blocked("192.0.2.1")
        limiter.record_failure("192.0.2.1")
    assert limiter.blocked("192.0.2.1")
    assert not limiter.blocked("192.0.2.2")
    now[0] = 61
    assert not limiter.blocked("192.0.2.1")


def test_backoff_doubles_up_to_the_maximum() -> None:
    retry = RetrySettings()
    assert [backoff(n, retry) for n in (1, 2, 3, 4, 5)] == [300, 600, 1200, 2400, 4000]


def test_http_endpoints(env: RelayEnv) -> None:
    relay = env.start()
    base = f"http://127.0.0.1:{relay.metrics_port}"
    with urllib.request.urlopen(f"{base}/healthz", timeout=5) as response:
        assert response.status == 200
    with urllib.request.urlopen(f"{base}/readyz", timeout=5) as response:
        assert response.status == 200
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
        text = response.read().decode()
    for name in (
        "txmail_relay_messages_accepted_total",
        "txmail_relay_auth_failures_total",
        "txmail_relay_queue_depth",
        "txmail_relay_queue_oldest_age_seconds",
        "txmail_relay_delivery_latency_seconds_bucket",
        "txmail_relay_spool_sync_seconds_bucket",
    ):
        assert name in text


def test_settings_defaults_match_the_contract_ports() -> None:
    settings = Settings.model_validate(
        {"kubernetes": {"namespace": "ns", "dedicatedIP": "203.0.113.7"}}
    )
    listen = settings.listen
    assert (listen.submission, listen.submissions) == (c.SUBMISSION_PORT, c.SUBMISSIONS_PORT)
    assert (listen.tracking, listen.api, listen.metrics) == (
        c.TRACKING_PORT,
        c.API_PORT,
        c.METRICS_PORT,
    )
    assert (c.TRACKING_PORT, c.API_PORT, c.METRICS_PORT) == (8080, 8081, 9090)


def test_json_log_lines_carry_structured_fields() -> None:
    import logging  # noqa: PLC0415

    from txmail_relay.logs import JsonFormatter, Redactor  # noqa: PLC0415

    record = logging.makeLogRecord(
        {"name": "txmail_relay.ingress.smtp", "msg": "message accepted", "msg_id": "abc123"}
    )
    doc = json.loads(JsonFormatter().format(record))
    assert (doc["message"], doc["msg_id"]) == ("message accepted", "abc123")
    data_line = logging.makeLogRecord({"name": "mail.log", "msg": "DATA readline: %s"})
    assert not Redactor().filter(data_line)
