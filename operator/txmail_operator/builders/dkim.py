"""DKIM public records: the TXT data a sending domain publishes for each of its selectors.

Pure: keys are arguments (the reconciler generates or reads them), nothing here draws
randomness or reads the clock. The record format is RFC 6376 section 3.6.1 (``k=rsa``, ``p=`` the
base64 DER SubjectPublicKeyInfo) and RFC 8463 (``k=ed25519``, ``p=`` the base64 raw 32-byte
public key, not wrapped in a SubjectPublicKeyInfo).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from txmail_relay import contract as c

from ..api import GROUP
from ..api.dkim import DkimAlgorithm, DkimSpec
from .naming import Obj, RelayOwner, b64, owned_meta

# The algorithm names used everywhere in the operator (state, status, the relay contract).
RSA: Final = "rsa"
ED25519: Final = "ed25519"
ALGORITHMS: Final = (RSA, ED25519)

ED25519_KEY_LENGTH: Final = 32


@dataclass(frozen=True)
class DkimPublicRecord:
    """One DKIM key's DNS record: ``<selector>._domainkey.<domain>`` TXT ``value``.

    ``algorithm`` is ``"rsa"`` or ``"ed25519"``; ``value`` is the full TXT data
    (``"v=DKIM1; k=rsa; p=MIIB..."``), not yet split into 255-byte strings.
    """

    domain: str
    selector: str
    algorithm: str
    value: str

    @property
    def name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


def rsa_record_value(spki_der: bytes) -> str:
    """The TXT data for an RSA key given its DER SubjectPublicKeyInfo."""
    return f"v=DKIM1; k=rsa; p={base64.b64encode(spki_der).decode('ascii')}"


def ed25519_record_value(raw_public_key: bytes) -> str:
    """The TXT data for an Ed25519 key given its raw 32-byte public key (RFC 8463 3.2)."""
    if len(raw_public_key) != ED25519_KEY_LENGTH:
        raise ValueError(f"an Ed25519 public key has {ED25519_KEY_LENGTH} bytes")
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw_public_key).decode('ascii')}"


def public_record(
    domain: str, selector: str, algorithm: str, public_key: bytes
) -> DkimPublicRecord:
    """The record for ``public_key``: DER SubjectPublicKeyInfo (rsa) or raw 32 bytes (ed25519)."""
    if algorithm == RSA:
        value = rsa_record_value(public_key)
    elif algorithm == ED25519:
        value = ed25519_record_value(public_key)
    else:
        raise ValueError(f"unknown DKIM algorithm {algorithm!r} (expected one of {ALGORITHMS})")
    return DkimPublicRecord(
        domain=domain.lower(), selector=selector, algorithm=algorithm, value=value
    )


def public_key_bytes(algorithm: str, private_pem: bytes) -> bytes:
    """The public half of a PEM private key, in the form its record carries.

    Raises ValueError (naming no key material) when the PEM is not a key of ``algorithm``.
    """
    try:
        key = serialization.load_pem_private_key(private_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(f"not an unencrypted PEM private key ({algorithm})") from None
    if algorithm == RSA and isinstance(key, rsa.RSAPrivateKey):
        return key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    if algorithm == ED25519 and isinstance(key, ed25519.Ed25519PrivateKey):
        return key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    raise ValueError(f"the PEM private key is not an {algorithm} key")


def record_for_private_key(
    domain: str, selector: str, algorithm: str, private_pem: bytes
) -> DkimPublicRecord:
    """The record publishing the public half of ``private_pem``."""
    return public_record(domain, selector, algorithm, public_key_bytes(algorithm, private_pem))


# --- the keys of a DedicatedIP and their rotation (pure state transitions) ------------------

GENERATED: Final = "Generated"  # made by the operator
BROUGHT: Final = "Secret"  # brought by the user in a Secret (spec.dkim.keys)
SELECTOR_MAX: Final = 63
SELECTOR_PREFIX: Final = "txmail-"
STATE_ANNOTATION: Final = f"{GROUP}/dkim-state"
SECRET_KEY_MAX: Final = 253  # a Secret's data key

# At most this many retiring keys per domain (the oldest go first, early): a rotateAfterDays
# shorter than retireAfterDays would otherwise pile them up past status.domains[].dkim's
# limit (16) and the state annotation's (256 KiB over 100 domains).
MAX_RETIRING: Final = 8
# A key signing switched away from is kept (file and record) at least this long, whatever
# retireAfterDays says (0 too): the kubelet syncs a changed Secret into the relay pod within
# about a minute, and the relay keeps signing with the old key until the new file is there.
MIN_RETIRE: Final = timedelta(minutes=10)

CREATED: Final = "DKIMKeyCreated"
ROTATED: Final = "DKIMRotated"
RETIRED: Final = "DKIMKeyRetired"

_SERIAL = re.compile(r"-[0-9]{6}-([0-9]+)(?:-ed)?$")


@dataclass(frozen=True)
class KeyId:
    """One key of a domain as the state names it: no key material.

    ``fingerprint`` (a user's key only; public data: the sha256 of the public key its record
    carries) tells a different key brought under the same selector from the one in use; it
    is not part of the key's identity (equality, hashing).
    """

    selector: str
    algorithm: str  # RSA | ED25519
    fingerprint: str = field(default="", compare=False)


def fingerprint(public_key: bytes) -> str:
    """The fingerprint of a public key (its record's ``p=`` bytes): hex sha256."""
    return hashlib.sha256(public_key).hexdigest()


@dataclass(frozen=True)
class KeySet:
    """The keys that sign a domain's mail together (one, or RSA + Ed25519).

    ``generation`` is the spec.dkim.keyGeneration they were made for; ``since`` when they
    were made (a next set) or started signing (the active set).
    """

    keys: tuple[KeyId, ...]
    source: str
    generation: int
    since: datetime

    @property
    def selectors(self) -> list[str]:
        return [k.selector for k in self.keys]


@dataclass(frozen=True)
class RetiringKey:
    """A key that stopped signing at ``since``: kept (and listed) for retireAfterDays more,
    counted from then with the spec's current value."""

    key: KeyId
    since: datetime


@dataclass(frozen=True)
class DomainKeys:
    """A domain's keys: signing now, waiting for their record to verify, kept for a while."""

    active: KeySet | None = None
    next: KeySet | None = None
    retiring: tuple[RetiringKey, ...] = ()

    def all_keys(self) -> list[KeyId]:
        out = list(self.active.keys) if self.active else []
        out += [k for k in (self.next.keys if self.next else ()) if k not in out]
        out += [r.key for r in self.retiring if r.key not in out]
        return out

    def status(self, retire_after: timedelta) -> dict[str, object]:
        """The domain's ``status.domains[].dkim`` (DomainDkimStatus on the wire)."""
        retire_after = max(retire_after, MIN_RETIRE)
        out: dict[str, object] = {}
        if self.active is not None:
            out["active"] = self.active.selectors
            out["source"] = self.active.source
        if self.next is not None:
            out["next"] = self.next.selectors
        if self.retiring:
            out["retiring"] = [
                {"selector": r.key.selector, "retireAt": _stamp(r.since + retire_after)}
                for r in self.retiring[-MAX_RETIRING:]
            ]
        return out


@dataclass(frozen=True)
class DkimState:
    """The rotation state of a DedicatedIP's keys (kept in the key Secret's annotation).

    ``serial`` is the last number used in a generated selector: it only grows, so a selector
    is never made twice for a DedicatedIP (a key is never regenerated under a used selector).
    """

    serial: int = 0
    domains: tuple[tuple[str, DomainKeys], ...] = ()

    def domain(self, name: str) -> DomainKeys | None:
        return next((keys for domain, keys in self.domains if domain == name), None)

    def to_json(self) -> str:
        return json.dumps(
            {
                "serial": self.serial,
                "domains": {d: _domain_doc(k) for d, k in self.domains},
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> DkimState:
        """Raises ValueError on a document this module did not write."""
        try:
            doc = json.loads(text)
            domains = tuple(
                sorted((str(d), _domain_of(v)) for d, v in (doc.get("domains") or {}).items())
            )
            return cls(serial=int(doc.get("serial", 0)), domains=domains)
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"unreadable DKIM state: {type(exc).__name__}") from None

    def without(self, lost: Iterable[tuple[str, KeyId]]) -> DkimState:
        """The state without the key sets holding a key whose private half is gone (they
        cannot sign; the next step makes new keys, under new selectors)."""
        gone = set(lost)
        if not gone:
            return self
        out = []
        for domain, keys in self.domains:

            def ok(s: KeySet | None, domain: str = domain) -> KeySet | None:
                return s if s is None or not any((domain, k) in gone for k in s.keys) else None

            retiring = tuple(r for r in keys.retiring if (domain, r.key) not in gone)
            out.append((domain, DomainKeys(ok(keys.active), ok(keys.next), retiring)))
        return replace(self, domains=tuple(out))


@dataclass(frozen=True)
class Wanted:
    """What a domain's keys should be, from the spec: generated with these algorithms for this
    keyGeneration, or the user's ``keys`` (spec.dkim.keys, algorithms read from their PEM)."""

    source: str
    generation: int = 0
    algorithms: tuple[str, ...] = (RSA,)
    keys: tuple[KeyId, ...] = ()


@dataclass(frozen=True)
class DkimEvent:
    reason: str
    message: str


def _stamp(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def _key_doc(k: KeyId) -> dict[str, str]:
    doc = {"selector": k.selector, "algorithm": k.algorithm}
    if k.fingerprint:
        doc["fingerprint"] = k.fingerprint
    return doc


def _key_of(doc: dict[str, object]) -> KeyId:
    return KeyId(str(doc["selector"]), str(doc["algorithm"]), str(doc.get("fingerprint") or ""))


def _set_doc(s: KeySet | None) -> dict[str, object] | None:
    if s is None:
        return None
    return {
        "keys": [_key_doc(k) for k in s.keys],
        "source": s.source,
        "generation": s.generation,
        "since": _stamp(s.since),
    }


def _set_of(doc: dict[str, object] | None) -> KeySet | None:
    if doc is None:
        return None
    keys = doc["keys"]
    if not isinstance(keys, list):
        raise TypeError("keys")
    return KeySet(
        keys=tuple(_key_of(k) for k in keys),
        source=str(doc["source"]),
        generation=int(str(doc["generation"])),
        since=_time(str(doc["since"])),
    )


def _domain_doc(k: DomainKeys) -> dict[str, object]:
    return {
        "active": _set_doc(k.active),
        "next": _set_doc(k.next),
        "retiring": [{**_key_doc(r.key), "since": _stamp(r.since)} for r in k.retiring],
    }


def _domain_of(doc: dict[str, object]) -> DomainKeys:
    retiring = doc.get("retiring") or []
    if not isinstance(retiring, list):
        raise TypeError("retiring")
    return DomainKeys(
        active=_set_of(doc.get("active")),  # type: ignore[arg-type]
        next=_set_of(doc.get("next")),  # type: ignore[arg-type]
        retiring=tuple(RetiringKey(_key_of(r), _time(str(r["since"]))) for r in retiring),
    )


def generated_selector(ip: str, now: datetime, serial: int, algorithm: str) -> str:
    """``txmail-<ip>-<yyyymm>-<serial>`` (RSA) and the same with ``-ed`` (Ed25519).

    The DedicatedIP's name keeps two IPs that send for one domain apart (each has its own
    key, so its own selector); when the selector would pass 63 characters the name is cut
    and a hash of it appended.
    """
    suffix = f"-{now:%Y%m}-{serial}" + ("-ed" if algorithm == ED25519 else "")
    room = SELECTOR_MAX - len(SELECTOR_PREFIX) - len(suffix)
    name = ip
    if len(ip) > room:
        digest = hashlib.sha256(ip.encode()).hexdigest()[:6]
        name = ip[: room - len(digest) - 1].rstrip("-") + "-" + digest
    return SELECTOR_PREFIX + name + suffix


def selector_serial(selector: str) -> int:
    """The serial of a generated selector (0 for any other)."""
    match = _SERIAL.search(selector)
    return int(match.group(1)) if match and selector.startswith(SELECTOR_PREFIX) else 0


def key_file(domain: str, selector: str) -> str:
    """The key's file in the key Secret (and the relay's folder): ``<selector>.<domain>.pem``
    (a domain too long for a Secret key is replaced by a hash of it)."""
    name = f"{selector}.{domain}.pem"
    if len(name) <= SECRET_KEY_MAX:
        return name
    return f"{selector}.{hashlib.sha256(domain.encode()).hexdigest()[:32]}.pem"


def wanted_keys(
    spec: DkimSpec,
    domains: Iterable[str],
    byok_algorithms: Mapping[tuple[str, str], str],
    fingerprints: Mapping[tuple[str, str], str] | None = None,
) -> dict[str, Wanted | None]:
    """Each sending domain's :class:`Wanted` keys; None for a domain whose own keys
    (spec.dkim.keys) cannot all be read (``byok_algorithms`` has no entry for them): its
    keys are left as they are. ``fingerprints`` (by domain and selector) are those of the
    user's keys (:func:`fingerprint`)."""
    fingerprints = fingerprints or {}
    algorithms = (RSA, ED25519) if spec.algorithm is DkimAlgorithm.RSA_AND_ED25519 else (RSA,)
    out: dict[str, Wanted | None] = {}
    for domain in (d.lower() for d in domains):
        refs = [k for k in spec.keys or [] if k.domain.lower() == domain]
        if not refs:
            out[domain] = Wanted(GENERATED, spec.key_generation, algorithms)
            continue
        found = [byok_algorithms.get((domain, k.selector)) for k in refs]
        keys = tuple(
            KeyId(k.selector, alg, fingerprints.get((domain, k.selector), ""))
            for k, alg in zip(refs, found, strict=True)
            if alg
        )
        out[domain] = Wanted(BROUGHT, keys=keys) if len(keys) == len(refs) else None
    return out


def _stale(active: KeySet, wanted: Wanted, now: datetime, rotate_after: timedelta | None) -> bool:
    """Whether the signing keys are not what the spec wants (a rotation is due)."""
    if active.source != wanted.source:
        return True
    if wanted.source == BROUGHT:
        return set(active.keys) != set(wanted.keys)
    return (
        active.generation != wanted.generation
        or sorted(k.algorithm for k in active.keys) != sorted(wanted.algorithms)
        or (rotate_after is not None and now >= active.since + rotate_after)
    )


def _matches(keys: KeySet, wanted: Wanted) -> bool:
    """Whether a next key set is what the spec wants now."""
    if keys.source != wanted.source:
        return False
    if wanted.source == BROUGHT:
        return set(keys.keys) == set(wanted.keys)
    return keys.generation == wanted.generation and sorted(
        k.algorithm for k in keys.keys
    ) == sorted(wanted.algorithms)


def _describe(domain: str, keys: Iterable[KeyId]) -> str:
    return ", ".join(
        f"{k.selector} ({k.algorithm}, TXT {k.selector}._domainkey.{domain})" for k in keys
    )


@dataclass
class _Step:
    """One :func:`step`: its inputs, the serial it draws from and what happened."""

    ip: str
    now: datetime
    rotate_after: timedelta | None
    retire_after: timedelta
    verified: Callable[[str, str], bool]
    serial: int
    fresh: int | None = None  # the serial this step's new generated keys share
    events: list[DkimEvent] = field(default_factory=list)

    def say(self, reason: str, message: str) -> None:
        self.events.append(DkimEvent(reason, message))

    def due(self, active: KeySet) -> bool:
        return self.rotate_after is not None and self.now >= active.since + self.rotate_after

    def made(self, want: Wanted, reuse: KeySet | None) -> KeySet:
        """New keys for ``want``; those of ``reuse`` with an algorithm still wanted are kept."""
        if want.source == BROUGHT:
            return KeySet(want.keys, BROUGHT, want.generation, self.now)
        keys = []
        for algorithm in want.algorithms:
            key = next((k for k in reuse.keys if k.algorithm == algorithm), None) if reuse else None
            if key is None:
                if self.fresh is None:
                    self.serial += 1
                    self.fresh = self.serial
                key = KeyId(generated_selector(self.ip, self.now, self.fresh, algorithm), algorithm)
            keys.append(key)
        return KeySet(tuple(keys), GENERATED, want.generation, self.now)

    def domain(self, domain: str, current: DomainKeys, want: Wanted) -> DomainKeys:
        active, nxt, retiring = current.active, current.next, list(current.retiring)
        if active is None:
            active, nxt = self.made(want, None), None
            self.say(
                CREATED,
                f"DKIM key for {domain}: {_describe(domain, active.keys)}; it signs now, "
                "publish its record (status.dnsRecords)",
            )
        else:
            active, nxt, old = self.rotate(domain, active, nxt, want)
            retiring += old
        in_use = set(active.keys) | set(nxt.keys if nxt else ())
        kept: list[RetiringKey] = []
        for r in retiring:
            if r.key in in_use or any(r.key == k.key for k in kept):
                continue
            if r.since + self.keep <= self.now:
                self.say(
                    RETIRED,
                    f"DKIM key {r.key.selector} of {domain} retired: its record "
                    f"{r.key.selector}._domainkey.{domain} can be removed from DNS",
                )
                continue
            kept.append(r)
        kept.sort(key=lambda r: r.since)  # stable: the order they retired in
        for r in kept[: max(0, len(kept) - MAX_RETIRING)]:
            self.say(
                RETIRED,
                f"DKIM key {r.key.selector} of {domain} retired early: at most "
                f"{MAX_RETIRING} retiring keys are kept per domain (rotateAfterDays is "
                f"shorter than retireAfterDays); its record {r.key.selector}._domainkey."
                f"{domain} can be removed from DNS",
            )
        kept = kept[-MAX_RETIRING:]
        out = DomainKeys(active, nxt, tuple(kept))
        return _adopted(out, want.keys) if want.source == BROUGHT else out

    @property
    def keep(self) -> timedelta:
        """How long a key that stopped signing is kept: retireAfterDays, at least MIN_RETIRE."""
        return max(self.retire_after, MIN_RETIRE)

    def rotate(
        self, domain: str, active: KeySet, nxt: KeySet | None, want: Wanted
    ) -> tuple[KeySet, KeySet | None, list[RetiringKey]]:
        """The active and next keys after this step, and the keys that stopped signing."""
        stale = _stale(active, want, self.now, self.rotate_after)
        if nxt is not None and not (stale and _matches(nxt, want)):
            dropped = [k for k in nxt.keys if k not in active.keys]
            if dropped:
                self.say(
                    RETIRED,
                    f"DKIM key {', '.join(k.selector for k in dropped)} of {domain} dropped "
                    "before it signed (the spec changed): its record is no longer needed",
                )
            nxt = None
        if stale and nxt is None:
            only_algorithms = (
                want.source == GENERATED
                and active.source == GENERATED
                and active.generation == want.generation
                and not self.due(active)
            )
            nxt = self.made(want, active if only_algorithms else None)
            self.say(
                CREATED,
                f"next DKIM key for {domain}: "
                f"{_describe(domain, [k for k in nxt.keys if k not in active.keys])}; publish "
                "its record: signing switches to it once it verifies in DNS",
            )
        if nxt is None or not all(
            self.verified(domain, k.selector) for k in nxt.keys if k not in active.keys
        ):
            return active, nxt, []
        until = self.now + self.keep
        self.say(
            ROTATED,
            f"{domain} is signed with {', '.join(nxt.selectors)} now (was "
            f"{', '.join(active.selectors)}): the new record verified in DNS; the old one "
            f"stays listed until {_stamp(until)}",
        )
        old = [RetiringKey(k, self.now) for k in active.keys if k not in nxt.keys]
        return replace(nxt, since=self.now), None, old


def changed_keys(current: DomainKeys | None, want: Wanted | None) -> list[KeyId]:
    """The user's keys (``want``) that differ from the key the state has under the same
    selector: another key brought under a selector in use (a new secretRef, or new content in
    the user's Secret). Its record would change under the same name, so the first would sign
    before the DNS has it: refused (the domain keeps its keys), a rotation takes a new selector.
    """
    if current is None or want is None or want.source != BROUGHT:
        return []
    out = []
    for key in want.keys:
        for old in current.all_keys():
            if old.selector == key.selector and (
                old.algorithm != key.algorithm
                or (old.fingerprint and key.fingerprint and old.fingerprint != key.fingerprint)
            ):
                out.append(key)
                break
    return out


def _adopted(keys: DomainKeys, wanted: Iterable[KeyId]) -> DomainKeys:
    """``keys`` with the fingerprints of ``wanted`` where they had none (a state written
    before fingerprints were kept, or a key just made from ``wanted``)."""
    prints = {k: k.fingerprint for k in wanted if k.fingerprint}

    def fill(k: KeyId) -> KeyId:
        return replace(k, fingerprint=prints[k]) if not k.fingerprint and k in prints else k

    def fill_set(s: KeySet | None) -> KeySet | None:
        return None if s is None else replace(s, keys=tuple(fill(k) for k in s.keys))

    return DomainKeys(
        fill_set(keys.active),
        fill_set(keys.next),
        tuple(replace(r, key=fill(r.key)) for r in keys.retiring),
    )


def step(
    state: DkimState,
    wanted: Mapping[str, Wanted | None],
    *,
    ip: str,
    now: datetime,
    rotate_after: timedelta | None,
    retire_after: timedelta,
    verified: Callable[[str, str], bool],
) -> tuple[DkimState, list[DkimEvent]]:
    """One transition of a DedicatedIP's key state, and what happened (for Events).

    Per domain of ``wanted`` (the sending domains): a domain without keys gets them, signing
    at once (nothing signs its mail yet, so there is no gap to avoid). When the signing keys
    are not what the spec wants (keyGeneration raised, algorithm changed, rotateAfterDays
    passed since they started signing, other keys brought), a next set is made under new
    selectors; signing switches to it once ``verified(domain, selector)`` holds for each of
    its new keys (the DNS check); the keys it replaces stay listed until ``retire_after``
    (at least :data:`MIN_RETIRE`) has passed, then go; at most :data:`MAX_RETIRING` per
    domain, the oldest going first. A next set the spec no longer wants is dropped (it never
    signed). A domain no longer in ``wanted`` loses its keys; a domain wanted as None (its
    own keys cannot be read now) keeps its keys as they are, and so does a domain whose user
    brought another key under a selector in use (:func:`changed_keys`). Idempotent: the same
    inputs again give the same state and no events.
    """
    run = _Step(ip, now, rotate_after, retire_after, verified, state.serial)
    out: list[tuple[str, DomainKeys]] = []
    for domain in sorted({d for d, _ in state.domains} | set(wanted)):
        current = state.domain(domain) or DomainKeys()
        want = wanted.get(domain)
        if domain not in wanted:
            if current.all_keys():
                run.say(
                    RETIRED,
                    f"{domain} is no longer a sending domain: its DKIM keys "
                    f"{', '.join(k.selector for k in current.all_keys())} are deleted",
                )
        elif want is None or changed_keys(current, want):
            if current != DomainKeys():
                out.append((domain, current))
        else:
            out.append((domain, run.domain(domain, current, want)))
    return DkimState(serial=run.serial, domains=tuple(out)), run.events


def dkim_secret(owner: RelayOwner, files: Mapping[str, bytes], state: DkimState) -> Obj:
    """The relay's key Secret: one PEM private key per file, the rotation state beside."""
    meta = owned_meta(owner, c.dkim_secret_name(owner.name), "dkim")
    meta["annotations"] = {STATE_ANNOTATION: state.to_json()}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": meta,
        "data": {name: b64(files[name]) for name in sorted(files)},
    }


def signing_config(state: DkimState, domains: Iterable[str]) -> c.DkimConfig:
    """The relay's RelayConfig.dkim: each sending domain's active keys."""
    algorithms = {RSA: c.DkimAlgorithm.RSA_SHA256, ED25519: c.DkimAlgorithm.ED25519_SHA256}
    out = []
    for domain in (d.lower() for d in domains):
        keys = state.domain(domain)
        if keys is None or keys.active is None:
            continue
        out.append(
            c.DkimDomain(
                domain=domain,
                keys=[
                    c.DkimKey(
                        selector=k.selector,
                        algorithm=algorithms[k.algorithm],
                        key_file=key_file(domain, k.selector),
                    )
                    for k in keys.active.keys
                ],
            )
        )
    return c.DkimConfig(keys_dir=c.DKIM_KEYS_PATH, domains=out)
