"""DKIM keys of a DedicatedIP: the key Secret, its rotation state and the relay's signing keys.

The pure part (which keys, which selectors, when to switch) is :func:`builders.dkim.step`;
here it meets the world: the key Secret ``txmail-relay-<ip>-dkim`` (its data the private keys,
its annotation the rotation state), the user's own key Secrets, key generation with
``cryptography`` and the Events. reconcile_ip calls :func:`ensure_dkim` (keys for every
domain, the records to check) and, with the DNS check's verdict, :func:`rotate_dkim` (signing
switches to a next key once its record verifies).

Nothing here logs, raises or posts key material: problems name the Secret and its key only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from kubernetes_asyncio.client.exceptions import ApiException

from txmail_relay import contract as c

from ..api import DedicatedIPSpec
from ..api.dkim import BYOK_SECRET_KEY
from ..builders import RelayOwner
from ..builders import dkim as b
from .context import Context

Obj = dict[str, Any]
log = logging.getLogger(__name__)
RSA_BITS = 2048
RSA_MIN_BITS = 1024  # RFC 8301: verifiers refuse shorter keys
# Public halves by the digest of their private PEM: loading an RSA key checks it (~40 ms for
# 2048 bits), which is worth doing once per key, not on every reconcile of every domain, and
# never on the event loop: every parse and every new key runs in a thread (:func:`_warm`,
# :func:`_inspect`, :func:`_new_key`), the loop only reads these caches.
_PUBLIC: dict[str, bytes] = {}
_ALGORITHM: dict[str, tuple[str, bytes]] = {}  # a user's key: its kind and public half


@dataclass(frozen=True)
class DkimPlan:
    """Where a DedicatedIP's keys stand after this reconcile.

    ``active`` are the records of the keys that sign now (DNSVerified needs them);
    ``optional`` the listed ones it does not need: next keys waiting for their record, and
    retiring ones. ``signing`` is the relay's RelayConfig.dkim; ``secret`` the key Secret to
    mount (None when there is none); ``problem`` what keeps a domain from its wanted keys.
    """

    state: b.DkimState = field(default_factory=b.DkimState)
    active: list[b.DkimPublicRecord] = field(default_factory=list)
    optional: list[b.DkimPublicRecord] = field(default_factory=list)
    signing: c.DkimConfig = field(default_factory=c.DkimConfig)
    secret: str | None = None
    problem: str | None = None

    def status(self, spec: DedicatedIPSpec) -> dict[str, dict[str, object]]:
        """Each sending domain's ``status.domains[].dkim``, by domain (none without keys)."""
        retire_after = timedelta(days=spec.dkim.retire_after_days)
        out = {}
        for domain in (d.lower() for d in spec.domains):
            keys = self.state.domain(domain)
            if keys is not None and keys.all_keys():
                out[domain] = keys.status(retire_after)
        return out


@dataclass(frozen=True)
class _Brought:
    algorithm: str
    pem: bytes = field(repr=False)  # a private key: never in a repr (tracebacks, test output)
    fingerprint: str = ""


class _Files(dict[str, bytes]):
    """The key Secret's files (private keys) by name: its repr names the files only."""

    def __repr__(self) -> str:
        return f"<DKIM key files: {', '.join(sorted(self))}>"


def _public_key(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _digest(algorithm: str, pem: bytes) -> str:
    return hashlib.sha256(algorithm.encode() + b"\0" + pem).hexdigest()


def _new_key(algorithm: str) -> bytes:
    """A new private key (PEM), its public half cached (in a thread: RSA takes 50-200 ms)."""
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == b.ED25519:
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _PUBLIC[_digest(algorithm, pem)] = _public_key(key)
    return pem


def _warm(keys: list[tuple[str, bytes]]) -> None:
    """Parse the keys not parsed yet (in a thread, once per reconcile); an unusable one is
    left out (:func:`_usable` then says so)."""
    for algorithm, pem in keys:
        digest = _digest(algorithm, pem)
        if digest not in _PUBLIC:
            with contextlib.suppress(ValueError, TypeError, UnsupportedAlgorithm):
                _PUBLIC[digest] = b.public_key_bytes(algorithm, pem)


def _public(algorithm: str, pem: bytes) -> bytes:
    digest = _digest(algorithm, pem)
    found = _PUBLIC.get(digest)
    if found is None:  # not warmed (a caller's mistake): correct, if slow
        found = _PUBLIC[digest] = b.public_key_bytes(algorithm, pem)
    return found


def _usable(algorithm: str, pem: bytes | None) -> bool:
    """Whether a stored key file holds a key of ``algorithm`` (one edited by hand may not):
    after :func:`_warm`, which parsed it."""
    return pem is not None and _digest(algorithm, pem) in _PUBLIC


def _inspect(pem: bytes) -> tuple[str, bytes]:
    """A user's key: ``rsa`` or ``ed25519`` and its public half (cached; run in a thread);
    ValueError (naming no key material) for anything else."""
    digest = hashlib.sha256(pem).hexdigest()
    if digest not in _ALGORITHM:
        _ALGORITHM[digest] = _check_algorithm(pem)
    return _ALGORITHM[digest]


def _check_algorithm(pem: bytes) -> tuple[str, bytes]:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("is not an unencrypted PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < RSA_MIN_BITS:
            raise ValueError(f"is an RSA key of {key.key_size} bits (at least {RSA_MIN_BITS})")
        algorithm = b.RSA
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        algorithm = b.ED25519
    else:
        raise ValueError("is neither an RSA nor an Ed25519 private key")  # noqa: TRY004
    public = _public_key(key)
    _PUBLIC[_digest(algorithm, pem)] = public
    return algorithm, public


async def _brought_keys(
    ctx: Context, spec: DedicatedIPSpec
) -> tuple[dict[tuple[str, str], _Brought], list[str]]:
    """The user's keys (spec.dkim.keys) that can be read, and what is wrong with the others."""
    ns = ctx.settings.namespace
    found: dict[tuple[str, str], _Brought] = {}
    problems: list[str] = []
    per_domain: dict[str, list[str]] = {}
    for ref in spec.dkim.keys or []:
        name = ref.secret_ref.name
        where = f"DKIM key Secret {ns}/{name} (for {ref.domain}, selector {ref.selector})"
        secret = await ctx.cache.owned("Secret", name)
        if secret is None:
            problems.append(f"{where} does not exist")
            continue
        data = (secret.get("data") or {}).get(BYOK_SECRET_KEY)
        if not data:
            problems.append(f"{where} has no key '{BYOK_SECRET_KEY}'")
            continue
        pem = base64.b64decode(data)
        try:
            algorithm, public = await asyncio.to_thread(_inspect, pem)
        except ValueError as exc:
            problems.append(f"{where}: '{BYOK_SECRET_KEY}' {exc}")
            continue
        algorithms = per_domain.setdefault(ref.domain.lower(), [])
        if algorithm in algorithms:
            problems.append(f"{where}: {ref.domain} has two {algorithm} keys (one of each kind)")
            continue
        algorithms.append(algorithm)
        found[(ref.domain.lower(), ref.selector)] = _Brought(algorithm, pem, b.fingerprint(public))
    # A domain keeps its keys as they are until every one of its own keys can be read.
    for ref in spec.dkim.keys or []:
        if (ref.domain.lower(), ref.selector) not in found:
            found = {k: v for k, v in found.items() if k[0] != ref.domain.lower()}
    return found, problems


def _wanted(
    spec: DedicatedIPSpec, brought: Mapping[tuple[str, str], _Brought]
) -> dict[str, b.Wanted | None]:
    return b.wanted_keys(
        spec.dkim,
        spec.domains,
        {k: v.algorithm for k, v in brought.items()},
        {k: v.fingerprint for k, v in brought.items()},
    )


def _refused(
    ns: str, spec: DedicatedIPSpec, state: b.DkimState, wanted: Mapping[str, b.Wanted | None]
) -> tuple[set[str], list[str]]:
    """The domains whose user brought another key under a selector in use (step() leaves
    their keys as they are: the old key keeps signing), and what to tell the user."""
    refs = {(k.domain.lower(), k.selector): k.secret_ref.name for k in spec.dkim.keys or []}
    domains: set[str] = set()
    problems: list[str] = []
    for domain, want in wanted.items():
        for key in b.changed_keys(state.domain(domain), want):
            domains.add(domain)
            problems.append(
                f"the key in Secret {ns}/{refs.get((domain, key.selector), '?')} changed under "
                f"selector {key.selector} (for {domain}): use a new selector to rotate (its "
                "record would change under the same name before the DNS has it); "
                f"{domain} keeps signing with the key it had"
            )
    return domains, problems


def _last_signing(config_map: Obj | None) -> c.DkimConfig:
    """The signing keys of the RelayConfig last applied (empty when it cannot be read)."""
    text = ((config_map or {}).get("data") or {}).get(c.RELAY_CONFIG_KEY)
    if not text:
        return c.DkimConfig()
    try:
        return c.RelayConfig.model_validate_json(text).dkim
    except ValueError:
        return c.DkimConfig()


def _config_serial(signing: c.DkimConfig) -> int:
    return max([0, *(b.selector_serial(k.selector) for d in signing.domains for k in d.keys)])


def _stored_state(secret: Obj | None) -> b.DkimState:
    """The rotation state in the key Secret (ValueError when it is unreadable)."""
    annotations = ((secret or {}).get("metadata") or {}).get("annotations") or {}
    text = annotations.get(b.STATE_ANNOTATION)
    return b.DkimState() if not text else b.DkimState.from_json(text)


def _status_serial(body: Obj) -> int:
    """The highest serial the DedicatedIP's status names: should the key Secret (and the
    state in it) be deleted, new keys still never take a selector used before."""
    serial = 0
    for domain in (body.get("status") or {}).get("domains") or []:
        dkim = domain.get("dkim") or {}
        selectors = [*(dkim.get("active") or []), *(dkim.get("next") or [])]
        selectors += [r.get("selector", "") for r in dkim.get("retiring") or []]
        serial = max([serial, *(b.selector_serial(s) for s in selectors)])
    return serial


async def ensure_dkim(
    ctx: Context, owner: RelayOwner, body: Obj, spec: DedicatedIPSpec
) -> DkimPlan:
    """Keys for every sending domain, a next key where a rotation is due, retired keys gone;
    signing does not switch here (that waits for the DNS check: :func:`rotate_dkim`)."""
    return await _reconcile(ctx, owner, body, spec, lambda _domain, _selector: False)


async def rotate_dkim(
    ctx: Context,
    owner: RelayOwner,
    body: Obj,
    spec: DedicatedIPSpec,
    verified: Callable[[str, str], bool],
) -> DkimPlan:
    """:func:`ensure_dkim`, and signing switches to each next key whose record verifies
    (``verified(domain, selector)``: the DNS check, DnsReport.dkim_verified)."""
    return await _reconcile(ctx, owner, body, spec, verified)


async def _reconcile(
    ctx: Context,
    owner: RelayOwner,
    body: Obj,
    spec: DedicatedIPSpec,
    verified: Callable[[str, str], bool],
) -> DkimPlan:
    name = c.dkim_secret_name(owner.name)
    ns = ctx.settings.namespace
    secret = await ctx.cache.owned("Secret", name)
    last = _last_signing(await ctx.cache.owned("ConfigMap", c.relay_name(owner.name)))
    try:
        state = _stored_state(secret)
    except ValueError as exc:
        problem = (
            f"the DKIM key Secret {ns}/{name} has an annotation {b.STATE_ANNOTATION} the "
            f"operator cannot read ({exc}): restore it, or delete the Secret to make new keys "
            "(under selectors never used before); until then the relay signs as it did"
        )
        return DkimPlan(
            signing=last if spec.dkim.enabled else c.DkimConfig(), secret=name, problem=problem
        )
    if not spec.dkim.enabled:
        return DkimPlan(state=state, secret=name if secret is not None else None)
    files = _Files({k: base64.b64decode(v) for k, v in ((secret or {}).get("data") or {}).items()})
    brought, problems = await _brought_keys(ctx, spec)
    wanted = _wanted(spec, brought)
    refused, refusals = _refused(ns, spec, state, wanted)
    problems += refusals
    brought = {k: v for k, v in brought.items() if k[0] not in refused}  # the old file stays
    unparsed = [
        (key.algorithm, pem)
        for domain, keys in state.domains
        for key in keys.all_keys()
        if (pem := files.get(b.key_file(domain, key.selector))) is not None
        and _digest(key.algorithm, pem) not in _PUBLIC
    ]
    if unparsed:  # after a start: every stored key once, in one thread hop
        await asyncio.to_thread(_warm, unparsed)
    lost = [
        (domain, key)
        for domain, keys in state.domains
        for key in keys.all_keys()
        if (domain, key.selector) not in brought
        and not _usable(key.algorithm, files.get(b.key_file(domain, key.selector)))
    ]
    state = state.without(lost)
    # Selectors are never reused: the serial also counts those the status and the last
    # RelayConfig name (the key Secret, and its state, may have been deleted).
    serial = max(state.serial, _status_serial(body), _config_serial(last))
    state = replace(state, serial=serial)
    now = ctx.now()
    new_state, events = b.step(
        state,
        wanted,
        ip=owner.name,
        now=now,
        rotate_after=(
            timedelta(days=spec.dkim.rotate_after_days) if spec.dkim.rotate_after_days else None
        ),
        retire_after=timedelta(days=spec.dkim.retire_after_days),
        verified=verified,
    )
    new_files = await _key_files(new_state, files, brought)
    old_text = (((secret or {}).get("metadata") or {}).get("annotations") or {}).get(
        b.STATE_ANNOTATION
    )
    if secret is None or new_files != files or old_text != new_state.to_json():
        out = await ctx.kube.apply(b.dkim_secret(owner, new_files, new_state))
        # A file someone else wrote (kubectl edit) is theirs to the apply, which leaves it:
        # keys that are no longer wanted are removed explicitly.
        extra = sorted(set(out.get("data") or {}) - set(new_files))
        if extra:
            out = await ctx.kube.merge_patch(
                "v1", "Secret", ns, name, {"data": dict.fromkeys(extra)}
            )
        ctx.cache.put(out)
    for event in events:
        try:
            await ctx.kube.event(body, event.reason, event.message, now=now)
        except ApiException as exc:  # the status says it all the same; the keys are written
            log.warning("no DKIM Event for %s: %s", owner.name, exc.reason)
    return _plan(new_state, new_files, name, "; ".join(problems) or None)


async def _key_files(
    state: b.DkimState, files: Mapping[str, bytes], brought: Mapping[tuple[str, str], _Brought]
) -> dict[str, bytes]:
    """The key Secret's files for ``state``: kept, copied from the user's Secret, or new."""
    out = _Files()
    for domain, keys in state.domains:
        for key in keys.all_keys():
            file = b.key_file(domain, key.selector)
            own = brought.get((domain, key.selector))
            if own is not None:
                out[file] = own.pem  # the user's Secret is the truth: copied on every change
            elif file in files:
                out[file] = files[file]  # made once, never regenerated for this selector
            else:
                out[file] = await asyncio.to_thread(_new_key, key.algorithm)
    return out


def _plan(
    state: b.DkimState, files: Mapping[str, bytes], secret: str, problem: str | None
) -> DkimPlan:
    active: list[b.DkimPublicRecord] = []
    optional: list[b.DkimPublicRecord] = []
    for domain, keys in state.domains:
        signing = set(keys.active.keys) if keys.active else set()
        for key in keys.all_keys():
            pem = files.get(b.key_file(domain, key.selector))
            if pem is None:
                continue
            record = b.public_record(
                domain, key.selector, key.algorithm, _public(key.algorithm, pem)
            )
            (active if key in signing else optional).append(record)
    signing_config = b.signing_config(state, [d for d, _ in state.domains])
    return DkimPlan(state, active, optional, signing_config, secret, problem)


async def dkim_problem(ctx: Context, spec: DedicatedIPSpec, ip: str | None = None) -> str | None:
    """What is wrong with the user's own keys (spec.dkim.keys), or None (a status refresh):
    with ``ip``, also another key brought under a selector in use."""
    if not spec.dkim.enabled or not spec.dkim.keys:
        return None
    brought, problems = await _brought_keys(ctx, spec)
    if ip is not None:
        try:
            state = _stored_state(await ctx.cache.owned("Secret", c.dkim_secret_name(ip)))
        except ValueError:
            state = b.DkimState()
        problems += _refused(ctx.settings.namespace, spec, state, _wanted(spec, brought))[1]
    return "; ".join(problems) or None


async def dkim_domains_status(
    ctx: Context, ip: str, spec: DedicatedIPSpec, previous: Obj | None
) -> dict[str, dict[str, object]]:
    """Each domain's ``status.domains[].dkim`` from the stored state (no writes).

    Without the key Secret (deleted, or not made yet) or with its state unreadable, the
    ``previous`` status's selectors stay: they are what keeps new keys off the selectors used
    before (:func:`_status_serial`).
    """
    kept = {
        d["name"]: d["dkim"]
        for d in (previous or {}).get("domains") or []
        if d.get("name") and d.get("dkim")
    }
    secret = await ctx.cache.owned("Secret", c.dkim_secret_name(ip))
    if secret is None:
        return kept
    try:
        state = _stored_state(secret)
    except ValueError:
        return kept  # unreadable: what was known stays (and keeps its selectors from reuse)
    # enabled: false too: the keys are kept, and so are their selectors in the status.
    return DkimPlan(state=state).status(spec)


async def dkim_outdated(ctx: Context, ip: str, spec: DedicatedIPSpec) -> bool:
    """Whether one of the user's keys (spec.dkim.keys) is readable now but not in the key
    Secret as it is: it appeared or changed since the last reconcile (the status refresh
    then runs a full one; a user's Secret is not the operator's to watch for)."""
    if not spec.dkim.enabled or not spec.dkim.keys:
        return False
    secret = await ctx.cache.owned("Secret", c.dkim_secret_name(ip))
    try:
        state = _stored_state(secret)
    except ValueError:
        return False
    files = (secret or {}).get("data") or {}
    brought, _ = await _brought_keys(ctx, spec)
    refused, _ = _refused(ctx.settings.namespace, spec, state, _wanted(spec, brought))
    for (domain, selector), own in brought.items():
        if domain in refused:
            continue  # refused until the spec changes (dkim_problem says why)
        keys = state.domain(domain)
        if keys is None or selector not in {k.selector for k in keys.all_keys()}:
            return True
        stored = files.get(b.key_file(domain, selector))
        if stored is None or base64.b64decode(stored) != own.pem:
            return True
    return False
