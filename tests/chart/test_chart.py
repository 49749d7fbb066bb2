"""charts/txmail rendered by the real Helm: lint, schema, golden output, RBAC and contracts.

The rendered output of each values file in tests/chart/values/ is pinned in tests/chart/golden/
(without the CRDs, which test_crds_generated.py pins). Regenerate after an intended change with
``TXMAIL_UPDATE_GOLDEN=1 pytest tests/chart`` and review the diff like code.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from chart.helm import CHART, NAMESPACE, VALUES, Obj, kinds, objects, render, run, template_args
from project import CRDS
from txmail_operator.reconcile.metrics import RESULTS, Metrics
from txmail_operator.settings import Settings
from txmail_relay import contract as c
from txmail_relay.metrics import RelayMetrics

GOLDEN = Path(__file__).parent / "golden"
RENDERED = ["defaults", "everything", "watch-namespaces"]
REJECTED = {
    "typo-top-level": "at '': additional properties 'replicaCont' not allowed",
    "typo-nested": "at '/operator': additional properties 'logFromat' not allowed",
    "bad-enum": "at '/operator/logFormat': value must be one of 'json', 'plain'",
}
FORBIDDEN_VERBS = {"escalate", "bind", "impersonate", "*"}
ROLE_KINDS = ("ClusterRole", "Role")


def values(name: str) -> Path:
    return VALUES / f"{name}.yaml"


def test_every_values_file_is_covered() -> None:
    assert {p.stem for p in VALUES.glob("*.yaml")} == set(RENDERED) | set(REJECTED)


@pytest.mark.parametrize("name", RENDERED)
def test_lint_strict(name: str) -> None:
    out = run("lint", "--strict", str(CHART), "--namespace", NAMESPACE, f"--values={values(name)}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("name", RENDERED)
def test_rendered_output_is_pinned(name: str) -> None:
    docs = [d for d in yaml.safe_load_all(render([values(name)])) if d]
    rendered = yaml.safe_dump_all(
        [d for d in docs if d["kind"] != "CustomResourceDefinition"], sort_keys=False, width=100
    )
    path = GOLDEN / f"{name}.yaml"
    if os.environ.get("TXMAIL_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(rendered)
    assert rendered == path.read_text(), f"{path} differs: TXMAIL_UPDATE_GOLDEN=1 to regenerate"


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_schema_rejects_bad_values(name: str) -> None:
    """A typo fails `helm install` with Helm's own message naming the key."""
    out = run(*template_args([values(name)]))
    assert out.returncode != 0
    assert "values don't meet the specifications of the schema" in out.stderr
    assert REJECTED[name] in out.stderr, out.stderr
    lint = run("lint", "--strict", str(CHART), f"--values={values(name)}")
    assert lint.returncode != 0
    assert REJECTED[name] in lint.stdout + lint.stderr


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("image.digest=latest", "at '/image/digest'"),
        ("operator.statsInterval=0", "at '/operator/statsInterval'"),
        ("operator.healthPort=70000", "at '/operator/healthPort'"),
        ("operator.watchNamespaces[0]=Not_A_Namespace", "at '/operator/watchNamespaces/0'"),
        ("networkPolicy.dns.podSelector.matchLabel.k8s-app=kube-dns", "'matchLabel' not allowed"),
        ("ingress.hosts[0].dedicatedIP=demo", "missing property 'host'"),
    ],
)
def test_schema_checks_types_and_ranges(setting: str, message: str) -> None:
    out = run(*template_args(sets=[setting]))
    assert out.returncode != 0
    assert message in out.stderr, out.stderr


def _object_nodes(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            found.append((path, node))
        for key, value in node.items():
            found += _object_nodes(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _object_nodes(value, f"{path}[{i}]")
    return found


def test_schema_is_closed_at_every_level() -> None:
    """Every object in values.schema.json says what may be in it: no free-form keys, except
    the three parts of a Kubernetes Affinity, which the API server validates."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_ = [
        path
        for path, node in _object_nodes(schema)
        if "additionalProperties" not in node
        and not path.startswith("/properties/affinity/properties/")
    ]
    assert open_ == []
    values_file = yaml.safe_load((CHART / "values.yaml").read_text())
    # every key values.yaml documents is one the schema knows (and the defaults pass it)
    assert set(values_file) == set(schema["properties"])


def _rules(objs: list[Obj]) -> list[tuple[Obj, Obj]]:
    return [(o, r) for o in objs if o["kind"] in ROLE_KINDS for r in o.get("rules", [])]


@pytest.mark.parametrize("name", RENDERED)
def test_rbac_has_no_wildcards_or_privilege_verbs(name: str) -> None:
    for role, rule in _rules(objects([values(name)])):
        where = f"{role['kind']} {role['metadata']['name']}: {rule}"
        for field in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert "*" not in rule.get(field, []), where
        assert not FORBIDDEN_VERBS & set(rule["verbs"]), where
        assert "nonResourceURLs" not in rule, where


@pytest.mark.parametrize("name", RENDERED)
def test_secrets_are_never_listed_outside_the_operator_namespace(name: str) -> None:
    """No ClusterRole, and no Role in an app namespace, lists or watches Secrets."""
    for role, rule in _rules(objects([values(name)])):
        if "secrets" not in rule["resources"]:
            continue
        if role["kind"] == "Role" and role["metadata"]["namespace"] == NAMESPACE:
            continue
        assert set(rule["verbs"]) == {"create", "get", "patch", "update", "delete"}, rule


@pytest.mark.parametrize("name", RENDERED)
def test_app_namespaces_grant_reads_by_name_only(name: str) -> None:
    """Outside its namespace the operator lists and watches only txmail's kinds and namespaces
    (kopf), and CRDs: everything else it reads or writes by name."""
    listed = {"smtptokens", "transactionalemails", "dedicatedips", "namespaces"}
    listed.add("customresourcedefinitions")
    for role, rule in _rules(objects([values(name)])):
        if role["kind"] == "Role" and role["metadata"]["namespace"] == NAMESPACE:
            continue
        if {"list", "watch"} & set(rule["verbs"]):
            assert set(rule["resources"]) <= listed, rule
        if "configmaps" in rule["resources"]:
            assert rule["verbs"] == ["get"], rule


def test_watch_namespaces_moves_namespaced_rights_into_roles() -> None:
    objs = objects([values("watch-namespaces")])
    (cluster_role,) = kinds(objs, "ClusterRole")
    cluster_resources = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert cluster_resources == {
        "customresourcedefinitions",
        "namespaces",
        "dedicatedips",
        "dedicatedips/status",
    }
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]) for r in kinds(objs, "Role")}
    assert roles == {
        (NAMESPACE, "txmail-operator"),
        ("shop", "txmail-operator-apps"),
        ("billing", "txmail-operator-apps"),
        ("default", "txmail-operator-events"),
    }
    bindings = kinds(objs, "RoleBinding") + kinds(objs, "ClusterRoleBinding")
    assert len(bindings) == 5
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "txmail-operator", "namespace": NAMESPACE}
        ]
    env = _env(objs)
    assert env["TXMAIL_WATCH_NAMESPACES"] == "shop,billing"


def _deployment(objs: list[Obj]) -> Obj:
    (deployment,) = kinds(objs, "Deployment")
    return deployment


def _env(objs: list[Obj]) -> dict[str, str]:
    (container,) = _deployment(objs)["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", "") for e in container["env"]}


def test_operator_deployment_defaults() -> None:
    objs = objects()
    deployment = _deployment(objs)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/txmail/txmail:0.1.0"  # the chart's appVersion
    assert container["command"] == ["txmail-operator"]
    assert pod["serviceAccountName"] == "txmail-operator"
    env = _env(objs)
    assert env["TXMAIL_NAMESPACE"] == NAMESPACE
    assert env["TXMAIL_RELAY_IMAGE"] == container["image"]
    assert env["TXMAIL_LOG_FORMAT"] == "json"
    assert env["MALLOC_ARENA_MAX"] == "2"  # the operator's RSS (docs/performance.md)
    assert env["TXMAIL_WATCH_NAMESPACES"] == ""
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": int(env["TXMAIL_HEALTH_PORT"]), "metrics": 9090}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_settings_added_later_may_be_absent() -> None:
    """``helm upgrade --reuse-values`` from a release older than a setting has no value for
    it (null here removes the chart's default, as the old release's values lack it)."""
    env = _env(objects(sets=["operator.dnsNameservers=null", "operator.dnsTimeout=null"]))
    assert (env["TXMAIL_DNS_NAMESERVERS"], env["TXMAIL_DNS_TIMEOUT"]) == ("", "5")
    settings = Settings.from_env({k: v for k, v in env.items() if k.startswith("TXMAIL_")})
    assert (settings.dns_nameservers, settings.dns_timeout) == ((), 5.0)


def test_operator_pod_meets_pod_security_restricted() -> None:
    pod = _deployment(objects())["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]


@pytest.mark.parametrize(
    ("sets", "image"),
    [
        ([], "ghcr.io/txmail/txmail:0.1.0"),
        (["image.tag=0.1.0-rc1"], "ghcr.io/txmail/txmail:0.1.0-rc1"),
        (
            ["image.tag=ignored", f"image.digest=sha256:{'ab' * 32}"],
            f"ghcr.io/txmail/txmail@sha256:{'ab' * 32}",
        ),
    ],
)
def test_image_reference(sets: list[str], image: str) -> None:
    objs = objects(sets=sets)
    (container,) = _deployment(objs)["spec"]["template"]["spec"]["containers"]
    assert container["image"] == image
    assert _env(objs)["TXMAIL_RELAY_IMAGE"] == image  # the relays run the same image


def test_extra_env_follows_the_chart_settings() -> None:
    (container,) = _deployment(objects([values("everything")]))["spec"]["template"]["spec"][
        "containers"
    ]
    names = [e["name"] for e in container["env"]]
    assert names[-2:] == ["HTTPS_PROXY", "NODE_NAME"]
    assert names[0] == "TXMAIL_NAMESPACE"


def test_crds_are_the_generated_ones_and_kept_by_default() -> None:
    crds = {o["metadata"]["name"]: o for o in kinds(objects(), "CustomResourceDefinition")}
    files = [yaml.safe_load(p.read_text()) for p in sorted(CRDS.glob("*.yaml"))]
    assert set(crds) == {f["metadata"]["name"] for f in files}
    for generated in files:
        chart = crds[generated["metadata"]["name"]]
        assert chart["spec"] == generated["spec"]  # the Jinja2 examples survive the escaping
        assert chart["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert chart["metadata"]["labels"]["app.kubernetes.io/part-of"] == "txmail"


def test_crds_gating() -> None:
    assert kinds(objects(sets=["crds.enabled=false"]), "CustomResourceDefinition") == []
    for crd in kinds(objects(sets=["crds.keep=false"]), "CustomResourceDefinition"):
        assert "annotations" not in crd["metadata"]


def test_optional_parts_are_off_by_default() -> None:
    got = {o["kind"] for o in objects()}
    assert got == {
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
    }
    everything = {o["kind"] for o in objects([values("everything")])}
    assert everything - got == {
        "ServiceMonitor",
        "PrometheusRule",
        "ConfigMap",
        "NetworkPolicy",
        "Ingress",
    }


def test_network_policies_match_the_relay_contract(tmp_path: Path) -> None:
    """Selectors and ports are the ones the operator's relay pods really have."""
    objs = objects([values("everything")])
    policies = {p["metadata"]["name"]: p["spec"] for p in kinds(objs, "NetworkPolicy")}
    relay = policies["txmail-relays"]
    assert relay["podSelector"] == {
        "matchLabels": {c.LABEL_NAME: c.RELAY_APP_NAME, c.LABEL_MANAGED_BY: c.MANAGED_BY}
    }
    ingress_ports = {p["port"] for rule in relay["ingress"] for p in rule["ports"]}
    assert ingress_ports == {
        c.SUBMISSION_PORT,
        c.SUBMISSIONS_PORT,
        c.API_PORT,
        c.TRACKING_PORT,
        c.METRICS_PORT,
        c.INBOUND_PORT,
    }
    # DSNs and ARF reports come from the outside world's MTAs: the inbound port from anywhere.
    inbound_rule = next(
        r for r in relay["ingress"] if r["ports"] == [{"protocol": "TCP", "port": c.INBOUND_PORT}]
    )
    assert "from" not in inbound_rule
    tracking_rule = next(
        r for r in relay["ingress"] if r["ports"] == [{"protocol": "TCP", "port": c.TRACKING_PORT}]
    )
    assert tracking_rule["from"][0]["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}
    }
    egress_ports = {p["port"] for rule in relay["egress"] for p in rule["ports"]}
    assert {25, 587, 465, 53, 443} <= egress_ports
    # Webhook receivers (networkPolicy.webhookEgressPorts, HTTPS by default): any address but
    # link-local ones (a cloud's metadata service), and the cluster's pods.
    webhooks: Obj = {
        "to": [
            {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]}},
            {"ipBlock": {"cidr": "::/0", "except": ["fe80::/10"]}},
            {"namespaceSelector": {}},
        ],
        "ports": [{"protocol": "TCP", "port": 443}],
    }
    assert webhooks in relay["egress"]
    # A release from before the setting (helm upgrade --reuse-values: the key is absent, null
    # here removes it) keeps the default, so webhooks do not silently stop.
    older = objects([values("everything")], sets=["networkPolicy.webhookEgressPorts=null"])
    assert webhooks in _relay_policy(older)["egress"]
    # An explicit [] turns it off.
    empty = tmp_path / "no-webhooks.yaml"
    empty.write_text("networkPolicy: {webhookEgressPorts: []}\n")
    off = objects([values("everything"), empty])
    assert webhooks["to"][0] not in [
        peer for r in _relay_policy(off)["egress"] for peer in r.get("to", [])
    ]
    operator = policies["txmail-operator"]
    operator_egress = {p["port"] for rule in operator["egress"] for p in rule["ports"]}
    assert operator_egress == {443, c.API_PORT, 53}


def _relay_policy(objs: list[Obj]) -> Obj:
    spec: Obj = next(
        p for p in kinds(objs, "NetworkPolicy") if p["metadata"]["name"] == "txmail-relays"
    )["spec"]
    return spec


def test_ingress_routes_only_to_the_tracking_port() -> None:
    (ingress,) = kinds(objects([values("everything")]), "Ingress")
    backends = [
        path["backend"]["service"]
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    ]
    assert backends == [
        {"name": c.relay_name("mta1"), "port": {"name": "tracking"}},
        {"name": c.relay_name("mta2"), "port": {"name": "tracking"}},
    ]
    assert ingress["spec"]["tls"] == [
        {"hosts": ["track.example.com"], "secretName": "track-example-com"}
    ]


def test_ingress_needs_hosts() -> None:
    out = run(*template_args(sets=["ingress.enabled=true"]))
    assert out.returncode != 0
    assert "ingress.hosts must list at least one" in out.stderr


def test_alerts_use_the_relays_real_metric_names() -> None:
    """Every txmail_relay_* series an alert or the dashboard reads is one the relay exports."""
    registry = CollectorRegistry()
    RelayMetrics(registry)
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    exported = {m.name + s for m in registry.collect() for s in suffixes[m.type]}
    objs = objects([values("everything")])
    (rule,) = kinds(objs, "PrometheusRule")
    (dashboard,) = kinds(objs, "ConfigMap")
    text = json.dumps(rule) + dashboard["data"]["txmail.json"]
    used = set(re.findall(r"txmail_relay_[a-z_]+", text))
    assert used, "no relay metric in the alerts"
    assert used <= exported, used - exported
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts == {
        "TxmailRelayDown",
        "TxmailRelayQueueStuck",
        "TxmailRelayBounceRateHigh",
        "TxmailRelayComplaintRateHigh",
        "TxmailOperatorReconcileErrors",
        "TxmailOperatorDown",
    }


def test_alerts_use_the_operators_real_metric_names() -> None:
    """txmail_operator_* series and result values are the ones the operator exports."""
    metrics = Metrics()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    exported = {m.name + s for m in metrics.registry.collect() for s in suffixes[m.type]}
    objs = objects([values("everything")])
    (rule,) = kinds(objs, "PrometheusRule")
    (dashboard,) = kinds(objs, "ConfigMap")
    text = json.dumps(rule) + dashboard["data"]["txmail.json"]
    used = set(re.findall(r"txmail_operator_[a-z_]+", text))
    assert used == exported - {
        "txmail_operator_reconcile_duration_seconds_sum",
        "txmail_operator_reconcile_duration_seconds_count",
    }
    (expr,) = [
        r["expr"]
        for g in rule["spec"]["groups"]
        for r in g["rules"]
        if r["alert"] == "TxmailOperatorReconcileErrors"
    ]
    counted = re.search(r'result=~"([^"]+)"', expr)
    assert counted is not None
    assert set(counted.group(1).split("|")) == set(RESULTS) - {"ok", "temporary_error"}


@pytest.mark.parametrize("name", RENDERED)
def test_the_operator_accepts_the_rendered_settings(name: str) -> None:
    """The TXMAIL_* variables the chart sets parse with the operator's own settings model."""
    objs = objects([values(name)])
    env = {k: v for k, v in _env(objs).items() if k.startswith("TXMAIL_")}
    settings = Settings.from_env(env)
    assert settings.namespace == NAMESPACE
    assert settings.relay_image == env["TXMAIL_RELAY_IMAGE"]
    chart_values = yaml.safe_load(values(name).read_text()) or {}
    assert list(settings.watch_namespaces) == chart_values.get("operator", {}).get(
        "watchNamespaces", []
    )
