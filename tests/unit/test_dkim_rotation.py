"""DKIM keys of a DedicatedIP: the records, the selectors and the rotation's state transitions.

The rotation is a pure function (state, wanted keys, now, DNS verdict) -> state, events; the
clock is an argument, so "seven days later" is a value, never a sleep.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from txmail_operator import builders
from txmail_operator.api import DedicatedIPSpec
from txmail_operator.api.dkim import DkimAlgorithm, DkimSpec, DomainDkimStatus
from txmail_operator.builders import dkim as b
from txmail_operator.builders.naming import RelayOwner
from txmail_operator.reconcile import dkim as glue
from txmail_relay import contract as c

T0 = dt.datetime(2026, 12, 1, 12, 0, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
WEEK = dt.timedelta(days=7)
IP = "mta1"
DOMAINS = ["example.com", "example.org"]


def never(_domain: str, _selector: str) -> bool:
    return False


def always(_domain: str, _selector: str) -> bool:
    return True


def only(*selectors: str) -> Callable[[str, str], bool]:
    return lambda _domain, selector: selector in selectors


def wanted(
    spec: DkimSpec | None = None,
    domains: list[str] = DOMAINS,
    byok: dict[tuple[str, str], str] | None = None,
) -> dict[str, b.Wanted | None]:
    return b.wanted_keys(spec or DkimSpec(), domains, byok or {})


def run(
    state: b.DkimState,
    want: dict[str, b.Wanted | None],
    now: dt.datetime,
    verified: Callable[[str, str], bool] = never,
    rotate_after: dt.timedelta | None = None,
    retire_after: dt.timedelta = WEEK,
) -> tuple[b.DkimState, list[b.DkimEvent]]:
    new, events = b.step(
        state,
        want,
        ip=IP,
        now=now,
        rotate_after=rotate_after,
        retire_after=retire_after,
        verified=verified,
    )
    # Idempotent: the same inputs on the result change nothing and say nothing.
    again, more = b.step(
        new,
        want,
        ip=IP,
        now=now,
        rotate_after=rotate_after,
        retire_after=retire_after,
        verified=verified,
    )
    assert (again, more) == (new, [])
    # What is stored survives the round trip through the Secret's annotation.
    assert b.DkimState.from_json(new.to_json()) == new
    return new, events


def keys_of(state: b.DkimState, domain: str = "example.com") -> b.DomainKeys:
    keys = state.domain(domain)
    assert keys is not None
    return keys


def reasons(events: list[b.DkimEvent]) -> list[str]:
    return [e.reason for e in events]


# --- records ------------------------------------------------------------------------------


def test_an_rsa_record_carries_the_subject_public_key_info() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    record = b.record_for_private_key("Example.COM", "s1", b.RSA, pem)
    assert record.name == "s1._domainkey.example.com"
    assert record.value.startswith("v=DKIM1; k=rsa; p=")
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert record.value.endswith(base64.b64encode(spki).decode())
    # dkimpy (what receivers run) reads the record: a message it signs verifies against it.
    message = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
    signature = dkimpy.sign(message, b"s1", b"example.com", pem, include_headers=[b"from"])
    assert dkimpy.verify(signature + message, dnsfunc=lambda *_a, **_k: record.value.encode())


def test_an_ed25519_record_carries_the_raw_key() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    record = b.record_for_private_key("example.com", "s1-ed", b.ED25519, pem)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert record.value == f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    seed = base64.b64encode(key.private_bytes_raw())
    message = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
    signature = dkimpy.sign(
        message,
        b"s1-ed",
        b"example.com",
        seed,
        signature_algorithm=b"ed25519-sha256",
        include_headers=[b"from"],
    )
    assert dkimpy.verify(signature + message, dnsfunc=lambda *_a, **_k: record.value.encode())


def test_a_key_of_the_wrong_kind_is_refused_without_its_bytes() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ValueError, match="not an rsa key") as info:
        b.public_key_bytes(b.RSA, pem)
    assert pem.decode().splitlines()[1] not in str(info.value)
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        b.public_key_bytes(b.RSA, b"-----BEGIN PRIVATE KEY-----\nnonsense\n")
    with pytest.raises(ValueError, match="32 bytes"):
        b.ed25519_record_value(b"short")


# --- selectors ----------------------------------------------------------------------------


def test_selectors_name_the_ip_the_month_and_a_serial() -> None:
    assert b.generated_selector("mta1", T0, 3, b.RSA) == "txmail-mta1-202612-3"
    assert b.generated_selector("mta1", T0, 3, b.ED25519) == "txmail-mta1-202612-3-ed"
    assert b.selector_serial("txmail-mta1-202612-3-ed") == 3
    assert b.selector_serial("mine") == 0
    long_ip = "a" * 50
    selector = b.generated_selector(long_ip, T0, 12345, b.ED25519)
    assert len(selector) <= 63 and selector.endswith("-202612-12345-ed")
    # Two long names that share a prefix still get distinct selectors.
    other = b.generated_selector("a" * 49 + "b", T0, 12345, b.ED25519)
    assert other != selector and len(other) <= 63


def test_key_files_are_unique_per_domain_and_selector_and_fit_a_secret_key() -> None:
    assert b.key_file("example.com", "s1") == "s1.example.com.pem"
    assert b.key_file("example.com", "s1") != b.key_file("example.org", "s1")
    long_domain = ".".join(["a" * 60] * 4) + ".com"
    name = b.key_file(long_domain, "s" * 63)
    assert len(name) <= 253
    # The names are what the relay's contract accepts as a key file.
    c.DkimKey(selector="s1", key_file=name)


# --- the first keys -----------------------------------------------------------------------


def test_each_domain_gets_a_key_that_signs_at_once() -> None:
    state, events = run(b.DkimState(), wanted(), T0)
    for domain in DOMAINS:
        keys = keys_of(state, domain)
        assert keys.active is not None and keys.next is None
        assert keys.active.selectors == ["txmail-mta1-202612-1"]
        assert keys.active.source == b.GENERATED
    assert reasons(events) == [b.CREATED, b.CREATED]
    config = b.signing_config(state, DOMAINS)
    assert [d.domain for d in config.domains] == DOMAINS
    (key,) = config.keys_for("example.com")
    assert key.selector == "txmail-mta1-202612-1"
    assert key.algorithm is c.DkimAlgorithm.RSA_SHA256
    assert key.key_file == "txmail-mta1-202612-1.example.com.pem"
    assert config.keys_dir == c.DKIM_KEYS_PATH


def test_dual_signing_makes_an_rsa_and_an_ed25519_key() -> None:
    state, _ = run(b.DkimState(), wanted(DkimSpec(algorithm=DkimAlgorithm.RSA_AND_ED25519)), T0)
    active = keys_of(state).active
    assert active is not None
    assert [(k.selector, k.algorithm) for k in active.keys] == [
        ("txmail-mta1-202612-1", b.RSA),
        ("txmail-mta1-202612-1-ed", b.ED25519),
    ]
    algorithms = [k.algorithm for k in b.signing_config(state, DOMAINS).keys_for("example.org")]
    assert algorithms == [c.DkimAlgorithm.RSA_SHA256, c.DkimAlgorithm.ED25519_SHA256]


# --- rotation -----------------------------------------------------------------------------


def test_a_key_generation_bump_signs_with_the_next_key_only_once_it_verifies() -> None:
    state, _ = run(b.DkimState(), wanted(), T0)
    bumped = wanted(DkimSpec(key_generation=1))

    state, events = run(state, bumped, T0 + DAY)
    keys = keys_of(state)
    assert keys.active is not None and keys.active.selectors == ["txmail-mta1-202612-1"]
    assert keys.next is not None and keys.next.selectors == ["txmail-mta1-202612-2"]
    assert reasons(events) == [b.CREATED, b.CREATED]
    assert "txmail-mta1-202612-2._domainkey.example.com" in events[0].message
    # Signing has not moved: the next record is not in DNS yet.
    assert b.signing_config(state, DOMAINS).keys_for("example.com")[0].selector.endswith("-1")

    # Only example.com's record verifies: only example.com switches.
    def com_only(domain: str, selector: str) -> bool:
        return domain == "example.com" and selector.endswith("-2")

    state, events = run(state, bumped, T0 + 2 * DAY, verified=com_only)
    assert reasons(events) == [b.ROTATED]
    com, org = keys_of(state), keys_of(state, "example.org")
    assert com.active is not None and com.active.selectors == ["txmail-mta1-202612-2"]
    assert com.active.since == T0 + 2 * DAY
    assert com.next is None
    assert com.retiring == (b.RetiringKey(b.KeyId("txmail-mta1-202612-1", b.RSA), T0 + 2 * DAY),)
    assert org.next is not None and org.active is not None
    assert org.active.selectors == ["txmail-mta1-202612-1"]
    assert b.signing_config(state, DOMAINS).keys_for("example.com")[0].selector.endswith("-2")

    # The old key stays listed for retireAfterDays, then goes.
    state, events = run(state, bumped, T0 + 9 * DAY - dt.timedelta(seconds=1), com_only)
    assert events == [] and keys_of(state).retiring
    state, events = run(state, bumped, T0 + 9 * DAY, com_only)
    assert reasons(events) == [b.RETIRED]
    assert keys_of(state).retiring == ()
    assert "txmail-mta1-202612-1._domainkey.example.com can be removed" in events[0].message


def test_two_bumps_before_the_record_verifies_replace_the_waiting_key() -> None:
    state, _ = run(b.DkimState(), wanted(domains=["example.com"]), T0)
    state, _ = run(state, wanted(DkimSpec(key_generation=1), ["example.com"]), T0 + DAY)
    state, events = run(state, wanted(DkimSpec(key_generation=2), ["example.com"]), T0 + 2 * DAY)
    keys = keys_of(state)
    assert keys.next is not None and keys.next.selectors == ["txmail-mta1-202612-3"]
    assert keys.next.generation == 2
    assert reasons(events) == [b.RETIRED, b.CREATED]  # -2 never signed: dropped
    assert "txmail-mta1-202612-2" in events[0].message


def test_selectors_are_never_reused_even_for_a_domain_added_again() -> None:
    state, _ = run(b.DkimState(), wanted(domains=["example.com"]), T0)
    state, events = run(state, wanted(domains=[]), T0)
    assert state.domain("example.com") is None and reasons(events) == [b.RETIRED]
    state, _ = run(state, wanted(domains=["example.com"]), T0)
    active = keys_of(state).active
    assert active is not None and active.selectors == ["txmail-mta1-202612-2"]


def test_a_scheduled_rotation_counts_from_when_the_key_started_signing() -> None:
    state, _ = run(b.DkimState(), wanted(domains=["example.com"]), T0)
    state, events = run(state, wanted(domains=["example.com"]), T0 + 29 * DAY, never, 30 * DAY)
    assert events == [] and keys_of(state).next is None
    later = T0 + 30 * DAY
    state, events = run(state, wanted(domains=["example.com"]), later, never, 30 * DAY)
    keys = keys_of(state)
    assert keys.next is not None and keys.next.selectors == ["txmail-mta1-202612-2"]
    assert reasons(events) == [b.CREATED]
    switch = later + DAY
    state, events = run(state, wanted(domains=["example.com"]), switch, always, 30 * DAY)
    assert reasons(events) == [b.ROTATED]
    # The new key's schedule starts at the switch: no rotation right after it.
    state, events = run(state, wanted(domains=["example.com"]), switch + 29 * DAY, always, 30 * DAY)
    assert keys_of(state).next is None and reasons(events) == [b.RETIRED]


def test_adding_ed25519_keeps_the_rsa_key_and_waits_for_the_new_record() -> None:
    state, _ = run(b.DkimState(), wanted(domains=["example.com"]), T0)
    dual = wanted(DkimSpec(algorithm=DkimAlgorithm.RSA_AND_ED25519), ["example.com"])
    state, events = run(state, dual, T0 + DAY)
    keys = keys_of(state)
    assert keys.next is not None
    assert keys.next.selectors == ["txmail-mta1-202612-1", "txmail-mta1-202612-2-ed"]
    assert "txmail-mta1-202612-1 " not in events[0].message  # only the new key is announced
    # The RSA record is in DNS already; the switch waits for the Ed25519 one only.
    state, events = run(state, dual, T0 + 2 * DAY, only("txmail-mta1-202612-2-ed"))
    keys = keys_of(state)
    assert reasons(events) == [b.ROTATED]
    assert keys.active is not None and len(keys.active.keys) == 2 and keys.retiring == ()


def test_reverting_the_algorithm_before_the_switch_drops_the_waiting_key() -> None:
    state, _ = run(b.DkimState(), wanted(domains=["example.com"]), T0)
    state, _ = run(
        state, wanted(DkimSpec(algorithm=DkimAlgorithm.RSA_AND_ED25519), ["example.com"]), T0
    )
    state, events = run(state, wanted(domains=["example.com"]), T0 + DAY, always)
    keys = keys_of(state)
    assert keys.next is None and reasons(events) == [b.RETIRED]
    assert keys.active is not None and keys.active.selectors == ["txmail-mta1-202612-1"]


def test_retire_after_zero_keeps_the_old_key_a_few_minutes_after_the_switch() -> None:
    # The relay keeps signing with the old key until the kubelet has synced the new key
    # file into its pod: the old file and record must outlive the apply that switches.
    state, _ = run(b.DkimState(), wanted(domains=["example.com"]), T0)
    bumped = wanted(DkimSpec(key_generation=1), ["example.com"])
    state, _ = run(state, bumped, T0)
    state, events = run(state, bumped, T0, always, retire_after=dt.timedelta(0))
    assert reasons(events) == [b.ROTATED]
    assert [r.key.selector for r in keys_of(state).retiring] == ["txmail-mta1-202612-1"]
    assert keys_of(state).status(dt.timedelta(0))["retiring"] == [
        {"selector": "txmail-mta1-202612-1", "retireAt": "2026-12-01T12:10:00Z"}
    ]
    later = T0 + b.MIN_RETIRE
    state, events = run(state, bumped, later, always, retire_after=dt.timedelta(0))
    assert reasons(events) == [b.RETIRED] and keys_of(state).retiring == ()


def test_daily_rotations_keep_the_retiring_keys_within_the_status_limit() -> None:
    # rotateAfterDays 1 with retireAfterDays 30 and dual signing: two keys retire a day.
    spec = DkimSpec(algorithm=DkimAlgorithm.RSA_AND_ED25519)
    want = wanted(spec, ["example.com"])
    state, _ = run(b.DkimState(), want, T0)
    retired: list[b.DkimEvent] = []
    for day in range(1, 21):
        at = T0 + day * DAY
        state, _ = run(state, want, at, never, DAY, 30 * DAY)  # the next key is made
        state, events = run(state, want, at, always, DAY, 30 * DAY)  # and switched to
        retired += [e for e in events if e.reason == b.RETIRED]
    keys = keys_of(state)
    assert len(keys.retiring) == b.MAX_RETIRING
    # The newest stay, the oldest went early, each said so.
    assert keys.retiring[-1].since == T0 + 20 * DAY
    assert len(retired) == 2 * 20 - b.MAX_RETIRING
    assert all("retired early" in e.message for e in retired)
    status = keys.status(30 * DAY)
    DomainDkimStatus.model_validate(status)  # within its maxItems (16), as the API server checks


def test_the_state_of_a_hundred_domains_fits_an_annotation() -> None:
    long_ip = "a" * 40
    spec = DkimSpec(algorithm=DkimAlgorithm.RSA_AND_ED25519)
    domains = [f"d{n:03}.{'x' * 50}.example.com" for n in range(100)]
    want = b.wanted_keys(spec, domains, {})
    state = b.DkimState()
    for day in range(20):
        at = T0 + day * DAY
        state, _ = b.step(
            state,
            want,
            ip=long_ip,
            now=at,
            rotate_after=DAY,
            retire_after=30 * DAY,
            verified=never,
        )
        state, _ = b.step(
            state,
            want,
            ip=long_ip,
            now=at,
            rotate_after=DAY,
            retire_after=30 * DAY,
            verified=always,
        )
    state, _ = b.step(  # and a next set waiting
        state,
        want,
        ip=long_ip,
        now=T0 + 21 * DAY,
        rotate_after=DAY,
        retire_after=30 * DAY,
        verified=never,
    )
    assert len(state.to_json().encode()) < 200 * 1024  # the limit is 256 KiB for them all


def test_a_shorter_retirement_applies_to_a_key_already_retiring() -> None:
    state, _ = run(b.DkimState(), wanted(domains=["example.com"]), T0)
    bumped = wanted(DkimSpec(key_generation=1), ["example.com"])
    state, _ = run(state, bumped, T0)
    state, _ = run(state, bumped, T0 + DAY, always)  # switched: the old key retires in 7 days
    assert keys_of(state).status(WEEK)["retiring"] == [
        {"selector": "txmail-mta1-202612-1", "retireAt": "2026-12-09T12:00:00Z"}
    ]
    state, events = run(state, bumped, T0 + 3 * DAY, always, retire_after=2 * DAY)
    assert reasons(events) == [b.RETIRED] and keys_of(state).retiring == ()


# --- bring your own key -------------------------------------------------------------------


def byok_spec(*entries: tuple[str, str]) -> DkimSpec:
    return DkimSpec.model_validate(
        {"keys": [{"domain": d, "selector": s, "secretRef": {"name": "mine"}} for d, s in entries]}
    )


def test_a_brought_key_signs_its_domain_and_the_others_get_generated_ones() -> None:
    spec = byok_spec(("example.com", "brand2026"))
    state, _ = run(b.DkimState(), wanted(spec, byok={("example.com", "brand2026"): b.RSA}), T0)
    com, org = keys_of(state), keys_of(state, "example.org")
    assert com.active is not None and com.active.source == b.BROUGHT
    assert com.active.selectors == ["brand2026"]
    assert org.active is not None and org.active.source == b.GENERATED
    assert com.status(WEEK) == {"active": ["brand2026"], "source": "Secret"}


def test_a_brought_key_that_cannot_be_read_leaves_the_domain_as_it_was() -> None:
    state, _ = run(b.DkimState(), wanted(), T0)
    spec = byok_spec(("example.com", "brand2026"))
    want = wanted(spec)  # the Secret is not readable: no algorithm known
    assert want["example.com"] is None
    new, events = run(state, want, T0 + DAY, always)
    assert new.domain("example.com") == state.domain("example.com") and events == []


def test_switching_to_a_brought_key_is_a_rotation_like_any_other() -> None:
    state, _ = run(b.DkimState(), wanted(domains=["example.com"]), T0)
    spec = byok_spec(("example.com", "brand2026"))
    want = wanted(spec, ["example.com"], {("example.com", "brand2026"): b.RSA})
    state, events = run(state, want, T0 + DAY)
    keys = keys_of(state)
    assert keys.next is not None and keys.next.selectors == ["brand2026"]
    state, events = run(state, want, T0 + 2 * DAY, only("brand2026"))
    assert reasons(events) == [b.ROTATED]
    keys = keys_of(state)
    assert keys.active is not None and keys.active.selectors == ["brand2026"]
    assert [r.key.selector for r in keys.retiring] == ["txmail-mta1-202612-1"]
    assert keys.status(WEEK) == {
        "active": ["brand2026"],
        "source": "Secret",
        "retiring": [{"selector": "txmail-mta1-202612-1", "retireAt": "2026-12-10T12:00:00Z"}],
    }


def test_another_key_under_a_selector_in_use_is_refused_and_the_old_one_keeps_signing() -> None:
    spec = byok_spec(("example.com", "brand2026"))
    first = b.wanted_keys(
        spec,
        ["example.com"],
        {("example.com", "brand2026"): b.RSA},
        {("example.com", "brand2026"): "aa" * 32},
    )
    state, _ = run(b.DkimState(), first, T0)
    stored = b.DkimState.from_json(state.to_json())
    active = keys_of(stored).active
    assert active is not None and active.keys[0].fingerprint == "aa" * 32
    # The user's Secret now holds another key (or secretRef names another Secret).
    other = b.wanted_keys(
        spec,
        ["example.com"],
        {("example.com", "brand2026"): b.RSA},
        {("example.com", "brand2026"): "bb" * 32},
    )
    assert b.changed_keys(stored.domain("example.com"), other["example.com"]) == [
        b.KeyId("brand2026", b.RSA)
    ]
    new, events = run(stored, other, T0 + DAY, always)
    assert new == stored and events == []
    assert keys_of(new).active.keys[0].fingerprint == "aa" * 32  # type: ignore[union-attr]
    assert b.signing_config(new, ["example.com"]) == b.signing_config(state, ["example.com"])
    # Under a new selector it is a rotation: it signs once its record verifies.
    spec = byok_spec(("example.com", "brand2027"))
    renamed = b.wanted_keys(
        spec,
        ["example.com"],
        {("example.com", "brand2027"): b.RSA},
        {("example.com", "brand2027"): "bb" * 32},
    )
    assert b.changed_keys(stored.domain("example.com"), renamed["example.com"]) == []
    new, _ = run(stored, renamed, T0 + DAY)
    assert keys_of(new).next is not None


def test_a_state_without_fingerprints_adopts_the_brought_keys_one() -> None:
    spec = byok_spec(("example.com", "brand2026"))
    state, _ = run(
        b.DkimState(), wanted(spec, ["example.com"], {("example.com", "brand2026"): b.RSA}), T0
    )
    now = b.wanted_keys(
        spec,
        ["example.com"],
        {("example.com", "brand2026"): b.RSA},
        {("example.com", "brand2026"): "cc" * 32},
    )
    new, events = run(state, now, T0 + DAY)
    assert events == []
    assert keys_of(new).active.keys[0].fingerprint == "cc" * 32  # type: ignore[union-attr]
    assert '"fingerprint":"' + "cc" * 32 in new.to_json()


# --- what is stored -----------------------------------------------------------------------


def test_lost_key_material_is_replaced_under_a_new_selector() -> None:
    state, _ = run(b.DkimState(), wanted(domains=["example.com"]), T0)
    lost = state.without([("example.com", b.KeyId("txmail-mta1-202612-1", b.RSA))])
    state, events = run(lost, wanted(domains=["example.com"]), T0 + DAY)
    active = keys_of(state).active
    assert active is not None and active.selectors == ["txmail-mta1-202612-2"]
    assert reasons(events) == [b.CREATED]


def test_an_unreadable_state_is_an_error_naming_no_content() -> None:
    for text in ("{", '{"domains": {"example.com": {"active": {"keys": 3}}}}', "[]"):
        with pytest.raises(ValueError, match="unreadable DKIM state"):
            b.DkimState.from_json(text)


def test_the_key_secret_holds_the_keys_and_the_state_names_no_key() -> None:
    state, _ = run(b.DkimState(), wanted(domains=["example.com"]), T0)
    owner = RelayOwner("mta1", "00000000-0000-4000-8000-000000000001", "txmail-system")
    pem = b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n"
    secret = b.dkim_secret(owner, {"txmail-mta1-202612-1.example.com.pem": pem}, state)
    assert secret["metadata"]["name"] == c.dkim_secret_name("mta1") == "txmail-relay-mta1-dkim"
    assert secret["metadata"]["ownerReferences"][0]["kind"] == "DedicatedIP"
    assert base64.b64decode(secret["data"]["txmail-mta1-202612-1.example.com.pem"]) == pem
    annotation = secret["metadata"]["annotations"][b.STATE_ANNOTATION]
    assert b.DkimState.from_json(annotation) == state
    assert "PRIVATE" not in annotation and "MC4CAQ" not in annotation


def test_the_relay_pod_mounts_the_whole_key_secret_and_its_config_names_the_active_keys() -> None:
    spec = DedicatedIPSpec.model_validate(
        {"address": "127.0.0.2", "hostname": "mta1.example.com", "domains": DOMAINS}
    )
    owner = RelayOwner("mta1", "00000000-0000-4000-8000-000000000001", "txmail-system")
    secret = c.dkim_secret_name("mta1")
    pod = builders.relay_deployment(owner, spec, "img", "tls", None, secret)["spec"]["template"][
        "spec"
    ]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "dkim"]
    # The whole Secret as a folder (no items, no subPath): the kubelet swaps in new keys.
    assert volume["secret"] == {"secretName": secret, "defaultMode": 0o440}
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "dkim"]
    assert mount == {"name": "dkim", "mountPath": c.DKIM_KEYS_PATH, "readOnly": True}
    no_dkim = builders.relay_deployment(owner, spec, "img", "tls")["spec"]["template"]["spec"]
    assert all(v["name"] != "dkim" for v in no_dkim["volumes"])

    state, _ = run(b.DkimState(), wanted(), T0)
    config = builders.relay_config("mta1", spec, dkim=b.signing_config(state, DOMAINS))
    parsed = c.RelayConfig.model_validate_json(config.to_json())
    assert [k.key_file for k in parsed.dkim.keys_for("example.org")] == [
        "txmail-mta1-202612-1.example.org.pem"
    ]


# --- the glue's keys: off the event loop, never in a repr ---------------------------------


def test_key_files_and_brought_keys_never_show_their_bytes_in_a_repr() -> None:
    pem = glue._new_key(b.ED25519)
    body = pem.decode().splitlines()[1]
    brought = glue._Brought(b.ED25519, pem, "ab" * 32)
    files = glue._Files({"s1.example.com.pem": pem})
    for shown in (repr(brought), repr(files), str(files), repr([files, brought])):
        assert body not in shown and "PRIVATE KEY" not in shown
    assert "s1.example.com.pem" in repr(files)
    assert files == {"s1.example.com.pem": pem}  # still a plain mapping of the bytes


def test_public_halves_come_from_the_cache_filled_in_a_thread() -> None:
    # A new key (made in a thread) and a stored one (parsed by _warm, in a thread) are not
    # parsed again on the event loop: _plan and _usable only read the cache.
    made = glue._new_key(b.RSA)
    assert glue._digest(b.RSA, made) in glue._PUBLIC
    stored = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert not glue._usable(b.ED25519, stored)  # not parsed yet: nothing parses it here
    glue._warm([(b.ED25519, stored), (b.RSA, b"not a key")])
    assert glue._usable(b.ED25519, stored) and not glue._usable(b.RSA, b"not a key")
    key = serialization.load_pem_private_key(stored, password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert glue._public(b.ED25519, stored) == raw


def test_the_last_relay_config_keeps_signing_and_its_selectors_from_reuse() -> None:
    spec = DedicatedIPSpec.model_validate(
        {"address": "127.0.0.2", "hostname": "mta1.example.com", "domains": DOMAINS}
    )
    owner = RelayOwner("mta1", "00000000-0000-4000-8000-000000000001", "txmail-system")
    state, _ = run(b.DkimState(), wanted(), T0)
    state, _ = run(state, wanted(DkimSpec(key_generation=1)), T0, always)
    signing = b.signing_config(state, DOMAINS)
    config_map = builders.relay_config_map(owner, builders.relay_config("mta1", spec, dkim=signing))
    assert glue._last_signing(config_map) == signing
    assert glue._config_serial(signing) == 2
    assert glue._last_signing(None) == c.DkimConfig()
    assert glue._last_signing({"data": {c.RELAY_CONFIG_KEY: "{"}}) == c.DkimConfig()
    # And the status' selectors: retiring ones count too.
    dkim = keys_of(state).status(WEEK)
    assert "retiring" in dkim
    assert (
        glue._status_serial({"status": {"domains": [{"name": "example.com", "dkim": dkim}]}}) == 2
    )
