"""The suppression API end to end: a relay in a thread with two tokens in two namespaces."""

from __future__ import annotations

import contextlib
import sqlite3
from typing import Any
from urllib.parse import quote

import pytest

from relay.relaykit import (
    B_USER,
    ORDER,
    OTHER,
    HttpReply,
    RelayEnv,
    RelayThread,
    api_send,
    basic,
    bearer,
    http,
    start_two_namespaces,
)
from txmail_relay.http.feedback import SUPPRESSIONS_PATH


@pytest.fixture
def relay(env: RelayEnv, b_password: str) -> RelayThread:
    return start_two_namespaces(env, b_password)


def _path(address: str) -> str:
    return f"{SUPPRESSIONS_PATH}/{quote(address, safe='@')}"


def _call(relay: RelayThread, method: str, path: str, auth: dict[str, str], **kw: Any) -> HttpReply:
    return http(relay.api_port, method, path, headers=auth, **kw)


def _error_field(reply: HttpReply) -> str:
    body = reply.json()
    assert body["status"] == "error"
    field: str = body["errors"][0]["in"]
    return field


def test_each_namespace_manages_its_own_list(
    env: RelayEnv, relay: RelayThread, b_password: str
) -> None:
    a, b = bearer(env.password), basic(B_USER, b_password)
    added = _call(relay, "PUT", _path("Ada@Dest.test"), a)
    assert added.status == 201
    view = added.json()
    assert view["address"] == "ada@dest.test" and view["suppressed"] is True
    assert view["sendResult"] == "BLOCKED_ADDRESS"
    [entry] = view["entries"]
    assert entry["reason"] == "MANUAL" and entry["enforced"] and not entry["relayWide"]
    assert entry["createdAt"].endswith("Z")
    again = _call(relay, "PUT", _path("ada@dest.test"), a, body={"reason": "MANUAL"})
    assert again.status == 200 and again.json()["entries"] == [entry]  # kept its first time

    # Isolation: B neither sees nor removes A's entry, and still sends to the address.
    assert _call(relay, "GET", _path("ada@dest.test"), a).json() == again.json()
    assert _call(relay, "GET", _path("ada@dest.test"), b).status == 404
    assert _call(relay, "GET", SUPPRESSIONS_PATH, b).json() == {"results": []}
    assert _call(relay, "DELETE", _path("ada@dest.test"), b).status == 404
    assert api_send(relay, b, OTHER, "ada@dest.test").status == 200

    # A manual entry is always enforced: the API and SMTP refuse it, naming the reason.
    refused = api_send(relay, a, ORDER, "ADA@dest.test")
    assert refused.status == 400
    assert refused.json()["sendResult"] == "BLOCKED_ADDRESS"
    assert _error_field(refused) == "message.to"
    with env.client(relay) as smtp:
        smtp.mail("app@example.com")
        code, text = smtp.rcpt("ada@dest.test")
        smtp.rset()
    assert code == 550 and "BLOCKED_ADDRESS" in text.decode()

    # Removed: sends go again.
    assert _call(relay, "DELETE", _path("ADA@dest.test"), a).status == 204
    assert _call(relay, "GET", _path("ada@dest.test"), a).status == 404
    assert _call(relay, "DELETE", _path("ada@dest.test"), a).status == 404
    assert api_send(relay, a, ORDER, "ada@dest.test").status == 200
    env.sink.wait(2)  # B's send and A's last one


def test_the_list_pages_by_address_and_filters_by_reason(
    env: RelayEnv, relay: RelayThread, b_password: str
) -> None:
    a = bearer(env.password)
    for name, reason in [("e", "MANUAL"), ("a", "HARD_BOUNCE"), ("c", "MANUAL")]:
        body = {"reason": reason}
        assert _call(relay, "PUT", _path(f"{name}@dest.test"), a, body=body).status == 201
    for name in ("d", "b"):
        assert _call(relay, "PUT", _path(f"{name}@dest.test"), a, raw=b"").status == 201
    # A second reason for one address: both entries, under the one address.
    spam = {"reason": "SPAM_REPORT"}
    assert _call(relay, "PUT", _path("c@dest.test"), a, body=spam).status == 201
    _call(relay, "PUT", _path("z@dest.test"), basic(B_USER, b_password))  # B's, not listed

    seen: list[dict[str, Any]] = []
    after = ""
    pages = 0
    while True:
        page = _call(relay, "GET", f"{SUPPRESSIONS_PATH}?limit=2&after={after}", a).json()
        pages += 1
        seen.extend(page["results"])
        if "paging" not in page:
            break
        after = page["paging"]["next"]["after"]
    assert pages == 3
    assert [r["address"] for r in seen] == [f"{n}@dest.test" for n in "abcde"]
    c = seen[2]
    assert [e["reason"] for e in c["entries"]] == ["MANUAL", "SPAM_REPORT"]
    # Automatic entries are recorded but not enforced unless the DedicatedIP opts in.
    assert [e["enforced"] for e in c["entries"]] == [True, False]
    assert seen[0]["suppressed"] is False and "sendResult" not in seen[0]

    bounced = _call(relay, "GET", f"{SUPPRESSIONS_PATH}?reason=HARD_BOUNCE", a).json()
    assert [r["address"] for r in bounced["results"]] == ["a@dest.test"]
    manual = _call(relay, "GET", f"{SUPPRESSIONS_PATH}?reason=MANUAL&limit=3", a).json()
    assert [r["address"] for r in manual["results"]] == [f"{n}@dest.test" for n in "bcd"]
    assert manual["paging"] == {"next": {"after": "d@dest.test"}}
    assert [e["reason"] for e in manual["results"][1]["entries"]] == ["MANUAL"]


def test_relay_wide_entries_apply_everywhere_and_cannot_be_removed(
    env: RelayEnv, relay: RelayThread, b_password: str
) -> None:
    assert relay.relay is not None
    # An entry recorded before suppression was per namespace (migration 6 carries them over
    # with namespace ""), written by a second connection as an older relay left it.
    with contextlib.closing(sqlite3.connect(relay.relay.records.path, timeout=10)) as db:
        db.execute("INSERT INTO suppressions VALUES ('', 'old@dest.test', 'MANUAL', 1.0)")
        db.commit()
    for auth in (bearer(env.password), basic(B_USER, b_password)):
        view = _call(relay, "GET", _path("old@dest.test"), auth).json()
        assert view["entries"][0]["relayWide"] is True
        assert view["entries"][0]["createdAt"] == "1970-01-01T00:00:01.000Z"
        refused = _call(relay, "DELETE", _path("old@dest.test"), auth)
        assert refused.status == 409 and _error_field(refused) == "address"
    assert api_send(relay, bearer(env.password), ORDER, "old@dest.test").status == 400
    # The namespace's own entry can go, but the relay-wide one still refuses sends: 200 with
    # what is left, not 204 (which would say the address is free again).
    a = bearer(env.password)
    with contextlib.closing(sqlite3.connect(relay.relay.records.path, timeout=10)) as db:
        db.execute("INSERT INTO suppressions VALUES ('', 'older@dest.test', 'MANUAL', 1.0)")
        db.commit()
    assert (
        _call(relay, "PUT", _path("older@dest.test"), a, raw=b'{"reason": "SPAM_REPORT"}').status
        == 201
    )
    left = _call(relay, "DELETE", _path("older@dest.test"), a)
    assert left.status == 200, left.body
    view = left.json()
    assert view["suppressed"] is True and view["sendResult"] == "BLOCKED_ADDRESS"
    assert [(e["reason"], e["relayWide"]) for e in view["entries"]] == [("MANUAL", True)]
    assert api_send(relay, a, ORDER, "older@dest.test").status == 400


def test_an_address_with_a_slash_is_reachable(env: RelayEnv, relay: RelayThread) -> None:
    """``/`` is valid in a local part (RFC 5321): URL-encoded in the path segment (%2F), the
    address is added, looked up, listed and removed like any other."""
    a = bearer(env.password)
    odd = "dept/sales@dest.test"
    assert _path(odd).endswith("/dept%2Fsales@dest.test")
    assert _call(relay, "PUT", _path(odd), a).status == 201
    view = _call(relay, "GET", _path(odd), a).json()
    assert view["address"] == odd and view["suppressed"] is True
    listed = _call(relay, "GET", SUPPRESSIONS_PATH, a).json()
    assert [r["address"] for r in listed["results"]] == [odd]
    assert _call(relay, "DELETE", _path(odd), a).status == 204
    assert _call(relay, "GET", _path(odd), a).status == 404


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("GET", _path("not-an-address"), None, "address"),
        ("PUT", _path("a@@dest.test"), None, "address"),
        ("DELETE", _path("x" * 250 + "@dest.test"), None, "address"),
        ("PUT", _path("a@dest.test"), b'{"reason": "NOPE"}', "reason"),
        ("PUT", _path("a@dest.test"), b'{"reason": 3}', "reason"),
        ("PUT", _path("a@dest.test"), b"{not json", "body"),
        ("PUT", _path("a@dest.test"), b'["MANUAL"]', "body"),
        ("PUT", _path("a@dest.test"), b'{"reason": "MANUAL", "note": 1}', "note"),
        ("PUT", _path("a@dest.test"), b"{" * 5000, "body"),
        ("GET", f"{SUPPRESSIONS_PATH}?limit=0", None, "limit"),
        ("GET", f"{SUPPRESSIONS_PATH}?limit=1001", None, "limit"),
        ("GET", f"{SUPPRESSIONS_PATH}?limit=ten", None, "limit"),
        ("GET", f"{SUPPRESSIONS_PATH}?reason=bounced", None, "reason"),
    ],
)
def test_bad_input_is_a_json_error_naming_the_field(
    env: RelayEnv, relay: RelayThread, method: str, path: str, body: bytes | None, field: str
) -> None:
    reply = _call(relay, method, path, bearer(env.password), raw=body)
    assert reply.status == 400
    assert reply.headers["content-type"].startswith("application/json")
    assert _error_field(reply) == field
    assert _call(relay, "GET", SUPPRESSIONS_PATH, bearer(env.password)).json() == {"results": []}


def test_every_route_needs_the_tokens_credentials(env: RelayEnv, relay: RelayThread) -> None:
    wrong = bearer("not-the-password")
    for method, path in [
        ("GET", SUPPRESSIONS_PATH),
        ("GET", _path("a@dest.test")),
        ("PUT", _path("a@dest.test")),
        ("DELETE", _path("a@dest.test")),
    ]:
        reply = _call(relay, method, path, wrong)
        assert reply.status == 401, (method, path)
        assert reply.json()["category"] == "INVALID_AUTHENTICATION"
    assert _call(relay, "GET", _path("a@dest.test"), bearer(env.password)).status == 404
