"""Builders are pure: fixed inputs give the objects pinned in tests/unit/golden/.

Regenerate after an intended change with ``TXMAIL_UPDATE_GOLDEN=1 pytest tests/unit`` and
review the diff like code.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from pydantic import ValidationError

from project import CRDS
from txmail_operator import builders
from txmail_operator.api import DedicatedIPSpec, SmtpTokenSpec, TransactionalEmailSpec
from txmail_operator.api.dedicatedip import uses_inbound
from txmail_operator.builders import dkim
from txmail_relay import contract as c
from txmail_relay.settings import Settings, load_settings

GOLDEN = Path(__file__).parent / "golden"
IP_UID = "00000000-0000-4000-8000-000000000001"
TOKEN_UID = "00000000-0000-4000-8000-000000000002"
NS = "txmail-system"
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
OWNER = builders.RelayOwner("demo", IP_UID, NS)


def sample_spec(kind: str) -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((CRDS / "samples" / f"{kind}.yaml").read_text())["spec"]
    return spec


def ip_spec(**overrides: Any) -> DedicatedIPSpec:
    return DedicatedIPSpec.model_validate({**sample_spec("dedicatedip"), **overrides})


TRACKING_KEY = bytes(range(32))  # fixed: builders take key material as an argument


def dkim_keys(spec: DedicatedIPSpec) -> tuple[dkim.DkimState, dict[str, bytes]]:
    """The first keys of every domain, at NOW; the key files are placeholders (fixed bytes)."""
    state, _ = dkim.step(
        dkim.DkimState(),
        dkim.wanted_keys(spec.dkim, spec.domains, {}),
        ip="demo",
        now=NOW,
        rotate_after=None,
        retire_after=dt.timedelta(days=spec.dkim.retire_after_days),
        verified=lambda _domain, _selector: False,
    )
    files = {
        dkim.key_file(domain, key.selector): f"key of {key.selector} {domain}\n".encode()
        for domain, keys in state.domains
        for key in keys.all_keys()
    }
    return state, files


def relay_objects(spec: DedicatedIPSpec) -> list[dict[str, Any]]:
    keys = dkim_keys(spec) if spec.dkim.enabled else None
    signing = dkim.signing_config(keys[0], spec.domains) if keys else None
    config = builders.relay_config("demo", spec, dkim=signing)
    tracking = c.tracking_secret_name("demo") if spec.tracking.base_url else None
    objects = [
        builders.relay_service_account(OWNER),
        builders.relay_role(OWNER),
        builders.relay_role_binding(OWNER),
        builders.relay_config_map(
            OWNER,
            config,
            tracking_keys=tracking is not None,
            limits=spec.relay.limits,
            inbound=uses_inbound(spec),  # as the reconciler passes it
        ),
        builders.credential_shard(OWNER, 0),
        builders.template_shard(OWNER, 0),
        builders.stats_config_map(OWNER),
        builders.relay_service(OWNER, spec),
        builders.relay_deployment(
            OWNER,
            spec,
            "txmail-relay:1.0",
            c.tls_secret_name("demo"),
            tracking,
            c.dkim_secret_name("demo") if keys else None,
        ),
    ]
    if keys is not None:
        objects.append(dkim.dkim_secret(OWNER, keys[1], keys[0]))
    claim = builders.relay_spool_claim(OWNER, spec)
    if tracking is not None:
        objects.append(builders.relay_tracking_secret(OWNER, TRACKING_KEY))
    return [*objects, *([claim] if claim else [])]


def token_objects() -> list[dict[str, Any]]:
    spec = SmtpTokenSpec.model_validate(sample_spec("smtptoken"))
    username = builders.username_for(TOKEN_UID)
    secret = builders.app_secret(
        "shop", TOKEN_UID, "shop", spec, username, "p@ss/word+1", "relay.example", 587, b"CA\n"
    )
    digest = c.PasswordDigest(sha256=c.password_digest("p@ss/word+1"), generation=1)
    entry = builders.credential_entry(
        "shop", "shop", spec, ["example.com", "mail.example.com"], username, [digest], 42
    )
    return [secret, {"credentialEntry": entry.model_dump(mode="json", by_alias=True)}]


def email_objects() -> list[dict[str, Any]]:
    spec = TransactionalEmailSpec.model_validate(sample_spec("transactionalemail"))
    entry = builders.template_entry("order-confirmation", "shop", 3, spec, 123456789)
    return [{"templateEntry": entry.model_dump(mode="json", by_alias=True)}]


CASES = {
    "relay-smarthost": lambda: relay_objects(ip_spec()),
    "relay-hostnetwork-pvc": lambda: relay_objects(
        ip_spec(
            delivery={"mode": "Direct"},
            egress={"mode": "HostNetwork", "nodeSelector": {"txmail.dev/ip": "127.0.0.2"}},
            relay={
                "spool": {"persistentVolumeClaim": {"size": "20Gi", "storageClassName": "fast"}},
                "resources": {"requests": {"cpu": "100m"}, "limits": {"memory": "512Mi"}},
            },
        )
    ),
    "relay-tracking-suppression": lambda: relay_objects(
        ip_spec(
            tracking={"baseURL": "https://t.example.com"},
            feedback={"complaintsAddress": "fbl@mail.example.com"},
            suppression={"complaints": True, "bounces": True},
            relay={"limits": {"maxHttpConnectionsPerAddress": 2000}},
        )
    ),
    "smtptoken": token_objects,
    "transactionalemail": email_objects,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_builders_match_golden_files(case: str) -> None:
    built = yaml.safe_dump_all(CASES[case](), sort_keys=True)
    path = GOLDEN / f"{case}.yaml"
    if os.environ.get("TXMAIL_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(built)
    assert built == path.read_text(), f"{path} differs: TXMAIL_UPDATE_GOLDEN=1 to regenerate"
    assert yaml.safe_dump_all(CASES[case](), sort_keys=True) == built, "builders must be pure"


def test_relay_settings_parse_with_the_relays_own_model() -> None:
    """The settings file the operator mounts is one the relay accepts."""
    settings = Settings.model_validate(yaml.safe_load(builders.relay_settings(OWNER)))
    assert settings.kubernetes is not None
    assert settings.kubernetes.dedicated_ip == "demo"
    assert settings.kubernetes.namespace == NS
    assert str(settings.spool.directory) == builders.SPOOL_PATH
    assert str(settings.tls.cert_file) == f"{builders.TLS_PATH}/tls.crt"


@pytest.mark.parametrize("tracking_keys", [False, True])
def test_relay_settings_file_is_the_relays_own_model_serialised(
    tmp_path: Path, tracking_keys: bool
) -> None:
    """The operator fills the model the relay's loader parses (one class, in the contract) and
    writes it serialised: the relay reads back exactly what was filled."""
    assert Settings is c.RelaySettings
    path = tmp_path / builders.SETTINGS_KEY
    path.write_text(builders.relay_settings(OWNER, tracking_keys=tracking_keys))
    filled = builders.relay_settings_model(OWNER, tracking_keys=tracking_keys)
    assert load_settings(path) == filled
    assert ("trackingKeysFile" in path.read_text()) is tracking_keys
    config_map = builders.relay_config_map(OWNER, builders.relay_config("demo", ip_spec()))
    assert config_map["data"][builders.SETTINGS_KEY] == builders.relay_settings(OWNER)


def test_relay_limits_reach_the_relay_and_roll_its_pod(tmp_path: Path) -> None:
    """spec.relay.limits sets those caps in the settings file the relay loads (the others keep
    the relay's defaults), and a change of them changes the pod template, so the relay, which
    reads its settings at start, restarts with them; without limits nothing is added."""
    spec = ip_spec(relay={"limits": {"maxHttpConnectionsPerAddress": 2000}})
    config_map = builders.relay_config_map(
        OWNER, builders.relay_config("demo", spec), limits=spec.relay.limits
    )
    path = tmp_path / builders.SETTINGS_KEY
    path.write_text(config_map["data"][builders.SETTINGS_KEY])
    loaded = load_settings(path).limits
    assert loaded.max_http_connections_per_address == 2000
    assert loaded.max_connections_per_address == c.LimitSettings().max_connections_per_address

    def template(spec: DedicatedIPSpec) -> dict[str, Any]:
        meta: dict[str, Any] = builders.relay_deployment(OWNER, spec, "img", "tls")["spec"][
            "template"
        ]["metadata"]
        return meta

    raised = ip_spec(relay={"limits": {"maxHttpConnectionsPerAddress": 4000}})
    assert template(spec)["annotations"] != template(raised)["annotations"]
    assert "annotations" not in template(ip_spec())
    assert "annotations" not in template(ip_spec(relay={"limits": {}}))


def test_relay_retry_reaches_the_relay_and_rolls_its_pod(tmp_path: Path) -> None:
    """spec.relay.retry sets the retry schedule the relay loads (unset fields keep its
    defaults) and rolls the pod when it changes; a minimum above the maximum is refused."""
    spec = ip_spec(relay={"retry": {"minBackoffSeconds": 20, "maxLifetimeSeconds": 3600}})
    config_map = builders.relay_config_map(
        OWNER, builders.relay_config("demo", spec), retry=spec.relay.retry
    )
    path = tmp_path / builders.SETTINGS_KEY
    path.write_text(config_map["data"][builders.SETTINGS_KEY])
    loaded = load_settings(path).retry
    assert (loaded.min_backoff, loaded.max_lifetime) == (20.0, 3600.0)
    assert loaded.max_backoff == c.RetrySettings().max_backoff

    def annotations(spec: DedicatedIPSpec) -> dict[str, str]:
        meta = builders.relay_deployment(OWNER, spec, "img", "tls")["spec"]["template"]
        return dict(meta["metadata"].get("annotations", {}))

    longer = ip_spec(relay={"retry": {"minBackoffSeconds": 60, "maxLifetimeSeconds": 3600}})
    assert annotations(spec) != annotations(longer)
    assert annotations(ip_spec()) == {}
    with pytest.raises(ValidationError, match="minBackoffSeconds must not exceed"):
        ip_spec(relay={"retry": {"minBackoffSeconds": 600, "maxBackoffSeconds": 60}})


def test_relay_listeners_ports_probes_and_service_agree() -> None:
    """What the relay listens on (its mounted settings), what the pod declares and probes, and
    what the Service exposes are the same named ports; 'tracking' is the public HTTP one,
    'smtp-in' (port 25, only with a return path or a complaints address) the one the outside
    world's MTAs send DSNs and ARF reports to."""
    spec = ip_spec(dns={"returnPathDomain": "bounces.example.net"})
    listen = Settings.model_validate(
        yaml.safe_load(builders.relay_settings(OWNER, inbound=True))
    ).listen
    listening = {
        "submission": listen.submission,
        "submissions": listen.submissions,
        "tracking": listen.tracking,
        "api": listen.api,
        "metrics": listen.metrics,
        "smtp-in": listen.inbound,
    }
    assert listen.inbound == c.INBOUND_PORT
    [container] = builders.relay_deployment(OWNER, spec, "img", "tls")["spec"]["template"]["spec"][
        "containers"
    ]
    assert container["command"] == ["txmail-relay"]  # one image, two programs, no entrypoint
    assert container["args"][0] == "--config"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == listening
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    service = builders.relay_service(OWNER, spec)["spec"]["ports"]
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service} == {
        "submission": (c.SERVICE_SUBMISSION_PORT, "submission"),
        "submissions": (c.SERVICE_SUBMISSIONS_PORT, "submissions"),
        "tracking": (c.SERVICE_TRACKING_PORT, "tracking"),
        "api": (c.SERVICE_API_PORT, "api"),
        "metrics": (c.SERVICE_METRICS_PORT, "metrics"),
        "smtp-in": (c.SERVICE_INBOUND_PORT, "smtp-in"),
    }
    assert c.SERVICE_INBOUND_PORT == 25
    assert (c.SERVICE_TRACKING_PORT, c.SERVICE_API_PORT, c.SERVICE_METRICS_PORT) == (80, 8081, 9090)
    host = builders.smtp_host("demo", NS, "cluster.local")
    assert builders.relay_api_url("demo", NS, "cluster.local", spec) == f"http://{host}:8081"
    custom = ip_spec(
        relay={"ports": {"tracking": 8000, "api": 9443, "metrics": 9100}},
        feedback={"complaintsAddress": "abuse@example.com"},  # ARF reports: smtp-in too
    )
    ports = {p["name"]: p["port"] for p in builders.relay_service(OWNER, custom)["spec"]["ports"]}
    assert ports == {
        "submission": 587, "submissions": 465, "tracking": 8000, "api": 9443, "metrics": 9100,
        "smtp-in": 25,
    }  # fmt: skip
    moved = ip_spec(
        relay={"ports": {"inbound": 2525}}, dns={"returnPathDomain": "bounces.example.net"}
    )
    [smtp_in] = [
        p for p in builders.relay_service(OWNER, moved)["spec"]["ports"] if p["name"] == "smtp-in"
    ]
    assert (smtp_in["port"], smtp_in["targetPort"]) == (2525, "smtp-in")
    assert builders.relay_api_url("demo", NS, "cluster.local", custom) == f"http://{host}:9443"


def test_without_a_return_path_or_complaints_address_no_inbound_listener_runs() -> None:
    """Nothing would reach it: a HostNetwork relay would hold the node's port 2525 for
    nothing. The reconciler passes uses_inbound(spec) to the settings file."""
    spec = ip_spec(egress={"mode": "HostNetwork"})
    assert not uses_inbound(spec)
    assert (
        Settings.model_validate(yaml.safe_load(builders.relay_settings(OWNER))).listen.inbound
        is None
    )
    [container] = builders.relay_deployment(OWNER, spec, "img", "tls")["spec"]["template"]["spec"][
        "containers"
    ]
    assert "smtp-in" not in [p["name"] for p in container["ports"]]
    assert c.INBOUND_PORT not in [p["containerPort"] for p in container["ports"]]
    service = builders.relay_service(OWNER, spec)["spec"]["ports"]
    assert [p["name"] for p in service] == [
        "submission",
        "submissions",
        "tracking",
        "api",
        "metrics",
    ]
    # submission on port 25 is then fine: no smtp-in to collide with
    assert builders.relay_service(OWNER, ip_spec(relay={"ports": {"submission": 25}}))
    assert uses_inbound(ip_spec(feedback={"complaintsAddress": "abuse@example.com"}))
    assert uses_inbound(ip_spec(dns={"returnPathDomain": "bounces.example.net"}))


@pytest.mark.parametrize(
    "fields",
    [
        {"relay": {"ports": {"submission": 25}}, "dns": {"returnPathDomain": "b.example.net"}},
        {"relay": {"ports": {"api": 9090}}},  # metrics' port
        {"relay": {"ports": {"inbound": 465}}, "feedback": {"complaintsAddress": "a@example.com"}},
    ],
)
def test_two_relay_ports_alike_are_refused_as_the_crd_refuses_them(fields: dict[str, Any]) -> None:
    """Two Service ports alike would make the relay's Service invalid (it could no longer be
    applied): the model refuses it with the CEL rule's message (tests/k8s)."""
    with pytest.raises(ValueError, match=r"relay\.ports must be distinct"):
        ip_spec(**fields)


def test_tracking_keys_reach_the_relay_as_a_mounted_file_it_can_load(tmp_path: Path) -> None:
    """Secret key -> mounted file -> settings.yaml path: the relay loads the key it was given."""
    from txmail_relay.tracking.endpoints import load_keys  # noqa: PLC0415

    secret = builders.relay_tracking_secret(OWNER, TRACKING_KEY)
    assert secret["metadata"]["name"] == c.tracking_secret_name("demo")
    assert list(secret["data"]) == [c.TRACKING_KEYS_KEY]
    keys_file = tmp_path / c.TRACKING_KEYS_KEY
    keys_file.write_bytes(base64.b64decode(secret["data"][c.TRACKING_KEYS_KEY]))
    keys = load_keys(keys_file)
    assert keys.current == 1
    token = keys.sign_open(b"e" * 16)
    # A rotation as docs/relay.md describes it: append a line with a higher kid.
    keys_file.write_text(keys_file.read_text() + builders.tracking_keys_line(2, b"\x02" * 32))
    rotated = load_keys(keys_file)
    assert rotated.current == 2 and rotated.verify_open(token) == b"e" * 16

    settings = Settings.model_validate(
        yaml.safe_load(builders.relay_settings(OWNER, tracking_keys=True))
    )
    assert str(settings.tracking_keys_file) == f"{builders.TRACKING_PATH}/{c.TRACKING_KEYS_KEY}"
    untracked_settings = yaml.safe_load(builders.relay_settings(OWNER))
    assert Settings.model_validate(untracked_settings).tracking_keys_file is None

    spec = ip_spec(tracking={"baseURL": "https://t.example.com"})
    pod = builders.relay_deployment(OWNER, spec, "img", "tls", c.tracking_secret_name("demo"))[
        "spec"
    ]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "tracking"]
    assert volume["secret"]["secretName"] == c.tracking_secret_name("demo")
    [mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "tracking"]
    assert mount["mountPath"] == builders.TRACKING_PATH and "subPath" not in mount
    untracked = builders.relay_deployment(OWNER, spec, "img", "tls")
    assert "tracking" not in str(untracked["spec"]["template"]["spec"]["volumes"])


def test_feedback_and_suppression_reach_the_relay_config() -> None:
    config = builders.relay_config("demo", ip_spec())
    assert config.feedback.complaints_address is None
    assert not config.suppression.complaints and not config.suppression.bounces
    config = builders.relay_config(
        "demo",
        ip_spec(feedback={"complaintsAddress": "fbl@example.com"}, suppression={"bounces": True}),
    )
    assert config.feedback.complaints_address == "fbl@example.com"
    assert config.suppression.bounces and not config.suppression.complaints
    assert c.RelayConfig.model_validate_json(config.to_json()) == config


def test_the_return_path_and_the_dsn_policy_reach_the_relay_config() -> None:
    """spec.dns.returnPathDomain turns the VERP return path on (off without it);
    spec.bounces.notifySender is the relay's DSN policy (OnRequest by default)."""
    off = builders.relay_config("demo", ip_spec())
    assert off.return_path.domain is None
    assert off.dsn.notify is c.DsnPolicy.ON_REQUEST
    returning = ip_spec(
        dns={"returnPathDomain": "bounces.example.net"}, bounces={"notifySender": "Never"}
    )
    # Off until the return-path MX verified (reconcile/dns.py return_path_verified): DSNs
    # to bounces+<id>@ would go nowhere before.
    assert builders.relay_config("demo", returning).return_path.domain is None
    on = builders.relay_config("demo", returning, return_path_verified=True)
    assert on.return_path.domain == "bounces.example.net"
    unchecked = ip_spec(dns={"returnPathDomain": "bounces.example.net", "requireVerified": False})
    assert builders.relay_config("demo", unchecked).return_path.domain == "bounces.example.net"
    assert on.return_path.local_part == "bounces"
    assert on.dsn.notify is c.DsnPolicy.NEVER
    assert c.RelayConfig.model_validate_json(on.to_json()) == on
    always = builders.relay_config("demo", ip_spec(bounces={"notifySender": "Always"}))
    assert always.dsn.notify is c.DsnPolicy.ALWAYS
    with pytest.raises(ValueError, match="notifySender"):
        ip_spec(bounces={"notifySender": "Sometimes"})


def test_relay_config_round_trips_through_the_contract() -> None:
    config = builders.relay_config("demo", ip_spec())
    assert c.RelayConfig.model_validate_json(config.to_json()) == config
    assert config.delivery.smarthost is not None
    assert config.delivery.smarthost.port == 2525
    assert config.delivery.bind_address is None
    host_net = builders.relay_config("demo", ip_spec(egress={"mode": "HostNetwork"}))
    assert host_net.delivery.bind_address == "127.0.0.2"


def test_url_escapes_credentials() -> None:
    spec = SmtpTokenSpec.model_validate(sample_spec("smtptoken"))
    secret = builders.app_secret(
        "shop", TOKEN_UID, "shop", spec, "u:1", "p@ss/w:rd", "h", 587, None
    )
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    parts = urlsplit(data["url"])
    assert (unquote(parts.username or ""), unquote(parts.password or "")) == ("u:1", "p@ss/w:rd")
    assert (parts.hostname, parts.port) == ("h", 587)
    assert "ca.crt" not in data


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0),
        ("0s", 0),
        ("90s", 90),
        ("10m", 600),
        ("1h30m", 5400),
        ("1.5h", 5400),
        ("250ms", 0.25),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert builders.parse_duration(text) == dt.timedelta(seconds=seconds)


def test_rotation_keeps_old_digests_only_for_the_grace_period() -> None:
    old = c.PasswordDigest(sha256="a" * 64, generation=1)
    new = c.PasswordDigest(sha256="b" * 64, generation=2)
    assert builders.rotated_digests([old], new, NOW, dt.timedelta(0)) == [new]
    kept = builders.rotated_digests([old], new, NOW, dt.timedelta(minutes=10))
    assert [d.generation for d in kept] == [2, 1]
    assert kept[1].not_after == NOW + dt.timedelta(minutes=10)
    # A later reconcile (same generation) neither extends nor drops the grace period early.
    again = builders.rotated_digests(
        kept, new, NOW + dt.timedelta(minutes=5), dt.timedelta(minutes=10)
    )
    assert again[1].not_after == NOW + dt.timedelta(minutes=10)
    after = builders.rotated_digests(
        kept, new, NOW + dt.timedelta(minutes=11), dt.timedelta(minutes=10)
    )
    assert after == [new]


def test_stable_ids_are_positive_below_2_53_and_stable() -> None:
    ids = {builders.stable_id(f"uid-{i}") for i in range(2000)}
    assert len(ids) == 2000
    assert all(1 <= i < 2**53 for i in ids)
    assert builders.stable_id("x") == builders.stable_id("x") != builders.stable_id("x", 1)


def test_relay_owner_comes_from_the_dedicated_ip_and_owns_every_relay_object() -> None:
    body = {"metadata": {"name": "demo", "uid": IP_UID}, "spec": sample_spec("dedicatedip")}
    assert builders.RelayOwner.of(body, NS) == OWNER
    for obj in relay_objects(ip_spec(tracking={"baseURL": "https://t.example.com"})):
        meta = obj["metadata"]
        assert meta["namespace"] == NS
        assert [(o["kind"], o["name"], o["uid"]) for o in meta["ownerReferences"]] == [
            ("DedicatedIP", "demo", IP_UID)
        ]


def test_status_patch_names_only_what_changed_or_nothing() -> None:
    current = {"tokens": 2, "conditions": [{"type": "Ready"}], "kopf": {"x": 1}}
    assert builders.status_patch(current, {"tokens": 2, "conditions": [{"type": "Ready"}]}) is None
    assert builders.status_patch(current, {"tokens": 3, "emails": 0}) == {"tokens": 3, "emails": 0}
    assert builders.status_patch(None, {"tokens": 0}) == {"tokens": 0}


@pytest.mark.parametrize("text", ["", "10", "1x", "h", "1.2.3s", "-5s", "1h 30m"])
def test_parse_duration_refuses_what_the_crd_pattern_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="is not like 90s"):
        builders.parse_duration(text)


def test_app_secret_carries_any_ca_file_as_given() -> None:
    """A user's certificate Secret may hold a CA that is not UTF-8 (DER): built, not raised."""
    spec = SmtpTokenSpec.model_validate(sample_spec("smtptoken"))
    der = b"\x30\x82\x01\xff"
    secret = builders.app_secret("shop", TOKEN_UID, "shop", spec, "u", "p", "h", 587, der)
    assert base64.b64decode(secret["data"]["ca.crt"]) == der
