"""Templates the sandbox would refuse are TemplateValid=False when applied, not at first send."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from k8s.kit import GROUP, VERSION, Kit
from k8s.operator_process import wait_for

pytestmark = pytest.mark.k8s
EMAILS, IPS = "transactionalemails", "dedicatedips"


@pytest.fixture
def ip(kit: Kit) -> Iterator[str]:
    name = kit.dedicated_ip()
    yield name
    kit.objs.delete_cluster_custom_object(GROUP, VERSION, IPS, name)


def template_valid(kit: Kit, namespace: str, name: str) -> dict[str, str]:
    def probe() -> dict[str, str] | None:
        cond = kit.condition(EMAILS, namespace, name, "TemplateValid")
        return cond if cond and cond["status"] == "False" else None

    return wait_for(probe, 5, f"{name}: TemplateValid=False")


@pytest.mark.parametrize(
    ("part", "source", "where", "named"),
    [
        ("html", "<p>Hi\n{{ contact.__class__ }}</p>", "html line 2", "'__class__'"),
        ("text", "{{ ''.__class__.__mro__ }}", "text line 1", "'__class__'"),
        ("text", "Order {{ custom.x.__globals__ }}", "text line 1", "'__globals__'"),
        ("subject", "Hi {{ contact.name._private }}", "subject line 1", "'_private'"),
    ],
)
def test_a_sandbox_escape_is_invalid_at_apply_time_with_the_attribute_named(
    kit: Kit, ip: str, namespace: str, part: str, source: str, where: str, named: str
) -> None:
    kit.email(namespace, ip, "escape", **{part: source})
    cond = template_valid(kit, namespace, "escape")
    assert cond["reason"] == "TemplateInvalid"
    assert cond["message"].startswith(where), cond["message"]
    assert named in cond["message"], cond["message"]
    assert not kit.is_ready(EMAILS, namespace, "escape")
    body = kit.get(EMAILS, namespace, "escape") or {}
    assert kit.template(ip, body["status"]["emailId"]) is None  # never published to the relay


def test_deeply_nested_subject_is_a_clear_error_and_the_operator_carries_on(
    kit: Kit, ip: str, namespace: str
) -> None:
    deep = "{{ " + "(" * 400 + "1" + ")" * 400 + " }}"  # the CRD allows 998 characters
    kit.email(namespace, ip, "deep", subject=deep)
    cond = template_valid(kit, namespace, "deep")
    assert cond["message"] == "subject line 1: brackets nest more than 32 levels deep"
    kit.objs.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, EMAILS, "deep", {"spec": {"subject": "-" * 900 + "1"}}
    )  # plain text: fine
    wait_for(lambda: kit.is_ready(EMAILS, namespace, "deep"), 5, "deep: Ready once fixed")
    kit.objs.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, EMAILS, "deep", {"spec": {"subject": "{{ " + "-" * 900 + "1 }}"}}
    )  # nesting without brackets: the parser's own limit, reported the same way
    cond = template_valid(kit, namespace, "deep")
    assert "nests too deeply" in cond["message"], cond["message"]
