"""DNS readiness: check a DedicatedIP's records (builders/dns_records.py) against real DNS.

Every record is looked up with dnspython's async resolver, against the nameservers the
operator is configured with (TXMAIL_DNS_NAMESERVERS, else the system's resolv.conf), each
lookup bounded by TXMAIL_DNS_TIMEOUT and at most CONCURRENCY at once. What "verifies" means
per purpose:

* PTR: the address's PTR names spec.hostname; Hostname: the hostname's A/AAAA holds the
  address (the two together are forward-confirmed reverse DNS);
* SPF and ReturnPathSPF: pyspf evaluates the domain's policy for the address and answers
  pass (includes, redirects and the 10-lookup limit are pyspf's: a permerror is a reason);
* DKIM: a TXT at the selector's name carries the same key (``k=`` and ``p=``; tags parsed,
  whitespace and string splits ignored);
* DMARC: a valid record applies to the domain: ``_dmarc.<domain>``, or, as DMARCbis walks the
  tree, one of its parents' (its ``p=``, or ``sp=`` when inherited, is reported);
* ReturnPathMX: one of the return-path domain's MX records names spec.hostname (any
  preference: the DSNs a receiver sends back reach the relay).

A report is kept per DedicatedIP (:class:`DnsChecks`) and re-made when its records change (a
spec change) or when spec.dns.checkIntervalSeconds have passed; a status refresh in between
reads the kept one. A lookup that fails (timeout, SERVFAIL) keeps the record's previous
definite result for a few checks, so one lost packet does not flap Ready.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import spf
from kubernetes_asyncio.client.exceptions import ApiException

from ..api import DedicatedIPSpec
from ..api.dns import DNS_VERIFIED, RecordPurpose, RecordResult, RecordType
from ..builders.dkim import DkimPublicRecord
from ..builders.dns_records import (
    EXTERNAL_DNS_API_VERSION,
    EXTERNAL_DNS_KIND,
    DnsRecord,
    dmarc_name,
    dns_endpoint,
    dns_endpoint_name,
    mx_host,
    mx_value,
    normalized_address,
    records_to_publish,
)
from ..builders.naming import Obj, RelayOwner
from ..kube import Kube
from ..settings import Settings, parse_nameservers

log = logging.getLogger(__name__)

CONCURRENCY = 16  # lookups of one operator at once
SPF_THREADS = 4  # SPF evaluations at once
# Consecutive failed lookups of a record that keep its previous definite result.
KEEP_FAILURES = 3
# pyspf's budget for all the lookups of one SPF evaluation, in per-lookup timeouts (RFC 7208
# 4.6.4 suggests 20 s in all).
SPF_BUDGET = 4
DMARC_POLICIES = ("none", "quarantine", "reject")

VERIFIED = "Verified"
LOOKUP_FAILED = "LookupFailed"
# How often the schedule looks for DedicatedIPs due a check, and how soon a check that did not
# finish (the reconcile returned early or failed) is tried again, at most.
DNS_TICK = 2.0
RETRY_AFTER = 30.0


# --- resolving ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What one lookup found: values (TXT strings joined), or none, or a failure."""

    values: tuple[str, ...] = ()
    failure: str | None = None  # a temporary error (timeout, SERVFAIL): nothing is known


def _configure(resolver: dns.resolver.BaseResolver, nameservers: Sequence[tuple[str, int]]) -> None:
    if nameservers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in nameservers]


class Resolver:
    """dnspython's async resolver on the configured nameservers, bounded in time and count."""

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]] = (),
        timeout: float = 5.0,
        concurrency: int = CONCURRENCY,
    ) -> None:
        self.nameservers, self.timeout = tuple(nameservers), timeout
        self._async = dns.asyncresolver.Resolver(configure=not nameservers)
        _configure(self._async, nameservers)
        self._async.timeout = min(timeout, 2.0)  # per try; lifetime bounds the lookup
        self._async.lifetime = timeout
        self._async.cache = None  # every check asks the server: the point is to see changes
        self._limit = asyncio.Semaphore(concurrency)
        # pyspf blocks: its evaluations run on threads of their own, a few at once.
        self._threads = ThreadPoolExecutor(SPF_THREADS, thread_name_prefix="txmail-spf")

    @classmethod
    def of(cls, settings: Settings) -> Resolver:
        """The resolver the operator's settings ask for (TXMAIL_DNS_NAMESERVERS, _TIMEOUT)."""
        servers = tuple(s for item in settings.dns_nameservers for s in parse_nameservers(item))
        return cls(servers, settings.dns_timeout)

    def sync(self) -> dns.resolver.Resolver:
        """A blocking resolver on the same nameservers (for pyspf, in a worker thread)."""
        resolver = dns.resolver.Resolver(configure=not self.nameservers)
        _configure(resolver, self.nameservers)
        resolver.timeout, resolver.lifetime = self._async.timeout, self.timeout
        return resolver

    async def lookup(self, name: str, rdtype: RecordType | str) -> Answer:
        kind = str(rdtype)
        try:
            async with self._limit:
                answer = await self._async.resolve(name, kind, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return Answer()
        except dns.resolver.LifetimeTimeout:
            return Answer(failure=f"no answer for {kind} {name} within {self.timeout:g} s")
        except dns.resolver.NoNameservers as exc:
            return Answer(failure=f"{kind} {name}: {_no_nameservers(exc)}")
        except dns.exception.DNSException as exc:
            return Answer(failure=f"{kind} {name}: {exc}")
        values: list[str] = []
        for rdata in answer:
            if kind == "TXT":
                values.append(b"".join(rdata.strings).decode("utf-8", "replace"))
            elif kind == "PTR":
                values.append(rdata.target.to_text(omit_final_dot=True).lower())
            elif kind == "MX":
                host = rdata.exchange.to_text(omit_final_dot=True).lower()
                values.append(f"{rdata.preference} {host}")
            else:
                values.append(rdata.to_text())
        return Answer(tuple(values))

    async def spf(self, address: str, domain: str, helo: str) -> tuple[str, str]:
        """pyspf's (result, explanation) for mail from ``address`` with ``domain``'s policy."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, self._spf, address, domain, helo)

    def _spf(self, address: str, domain: str, helo: str) -> tuple[str, str]:
        with _spf_resolver(self.sync()):
            query = spf.query(
                i=address,
                s=f"postmaster@{domain}",
                h=helo,
                timeout=self.timeout,
                querytime=self.timeout * SPF_BUDGET,
            )
            result, _code, explanation = query.check()
        return str(result), str(explanation)


def _no_nameservers(exc: dns.resolver.NoNameservers) -> str:
    errors = exc.kwargs.get("errors") or []
    for error in errors:  # (server, tcp, port, error or rcode-bearing answer)
        detail = error[3] if len(error) > 3 else error
        return f"the nameserver answered {detail}"
    return "no nameserver answered"


# pyspf resolves through its module-level function ``spf.DNSLookup(name, qtype, strict,
# timeout)``, which uses dnspython's default resolver (the system's resolv.conf) and offers no
# argument to pass another. So, by hand: a replacement installed once, which reads the resolver
# of the thread it runs on (set by _spf_resolver around one evaluation, in a worker thread) and
# otherwise calls pyspf's own function; no resolver is ever stored in pyspf's module. The body
# returns what pyspf's dnspython driver does (DNSLookup_dnspython), through that resolver.
_thread = threading.local()
_install_lock = threading.Lock()
_ORIGINAL_LOOKUP: Callable[..., Any] = spf.DNSLookup
_installed = False


def _lookup(name: str, qtype: str, strict: object = True, timeout: float = 30) -> list[Any]:
    resolver: dns.resolver.Resolver | None = getattr(_thread, "resolver", None)
    if resolver is None:  # not one of our evaluations: pyspf's own lookup
        return list(_ORIGINAL_LOOKUP(name, qtype, strict, timeout))
    out: list[Any] = []
    try:
        answers = resolver.resolve(name, qtype, lifetime=timeout, search=False)
    except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
        return out
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
        raise spf.TempError(f"DNS {exc}") from None
    except dns.exception.DNSException as exc:  # a bad name in someone's include (IDNA), ...
        raise spf.TempError(f"DNS lookup of {qtype} {name} failed ({type(exc).__name__})") from None
    for rdata in answers:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            out.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            out.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), rdata.strings))
    return out


class _spf_resolver:  # noqa: N801 - used as a context manager, reads like a function
    def __init__(self, resolver: dns.resolver.Resolver) -> None:
        self.resolver = resolver

    def __enter__(self) -> None:
        global _installed  # noqa: PLW0603 - set once, under the lock
        with _install_lock:
            if not _installed:
                spf.DNSLookup = _lookup
                _installed = True
        _thread.resolver = self.resolver

    def __exit__(self, *_: object) -> None:
        _thread.resolver = None


# --- checking ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordCheck:
    """One record's result: Verified, Missing, Wrong or Unknown, with a reason to act on."""

    record: DnsRecord
    result: RecordResult
    reason: str
    message: str = ""
    found: tuple[str, ...] = ()
    policy: str | None = None  # DMARC: the policy that applies
    failures: int = 0  # consecutive failed lookups (the result may be an earlier one's)

    @property
    def verified(self) -> bool:
        return self.result is RecordResult.VERIFIED

    def wire(self) -> dict[str, object]:
        out = self.record.wire()
        out["result"] = self.result.value
        if self.found and self.result is RecordResult.WRONG:
            out["found"] = [v[:4096] for v in self.found[:16]]
        if not self.verified and self.message:
            out["message"] = self.message[:2048]
        return out


@dataclass(frozen=True)
class DomainVerdict:
    name: str
    verified: bool
    reason: str
    message: str
    dmarc_policy: str | None

    def wire(self) -> dict[str, object]:
        out: dict[str, object] = {
            "name": self.name,
            "verified": self.verified,
            "reason": self.reason,
            "message": self.message,
        }
        if self.dmarc_policy is not None:
            out["dmarcPolicy"] = self.dmarc_policy
        return out


@dataclass(frozen=True)
class DnsReport:
    """The checks of one DedicatedIP's records, and what they add up to."""

    checks: tuple[RecordCheck, ...]
    domains: tuple[str, ...] = ()

    def check(self, name: str, purpose: RecordPurpose | None = None) -> RecordCheck | None:
        return next(
            (
                c
                for c in self.checks
                if c.record.name == name.lower() and purpose in (None, c.record.purpose)
            ),
            None,
        )

    def dkim_verified(self, domain: str, selector: str) -> bool:
        """Whether ``selector``'s record of ``domain`` is published with its key (rotation)."""
        name = f"{selector}._domainkey.{domain}".lower()
        found = self.check(name, RecordPurpose.DKIM)
        return found is not None and found.verified

    @property
    def problems(self) -> list[RecordCheck]:
        """Required records that do not verify: definite problems first, then failed lookups."""
        bad = [c for c in self.checks if c.record.required and not c.verified]
        return sorted(bad, key=lambda c: c.result is RecordResult.UNKNOWN)

    @property
    def verified(self) -> bool:
        return not self.problems

    def condition(self) -> tuple[bool, str, str]:
        """DNSVerified: (status, reason, message)."""
        problems = self.problems
        if not problems:
            required = [c for c in self.checks if c.record.required]
            names = ", ".join(self.domains)
            return (
                True,
                VERIFIED,
                f"all {len(required)} required DNS records verify (PTR and address of the "
                f"hostname; SPF, DKIM and DMARC of {names})",
            )
        first = problems[0]
        more = len(problems) - 1
        tail = f" ({more} more: see status.dnsRecords)" if more else ""
        return False, first.reason, first.message + tail

    def domain_verdicts(self) -> list[DomainVerdict]:
        out = []
        for domain in self.domains:
            mine = [c for c in self.checks if c.record.domain == domain]
            bad = sorted(
                (c for c in mine if c.record.required and not c.verified),
                key=lambda c: c.result is RecordResult.UNKNOWN,
            )
            dmarc = next((c for c in mine if c.record.purpose is RecordPurpose.DMARC), None)
            policy = dmarc.policy if dmarc is not None else None
            if bad:
                out.append(DomainVerdict(domain, False, bad[0].reason, bad[0].message, policy))
            else:
                kinds = sorted({c.record.purpose.value for c in mine if c.record.required})
                message = f"{', '.join(kinds)} of {domain} verify"
                out.append(DomainVerdict(domain, True, VERIFIED, message, policy))
        return out

    def records_status(self) -> list[dict[str, object]]:
        return [c.wire() for c in self.checks]

    def domains_status(self) -> list[dict[str, object]]:
        return [v.wire() for v in self.domain_verdicts()]


def unchecked(records: Sequence[DnsRecord], domains: Iterable[str]) -> DnsReport:
    """A report for records not looked up yet."""
    checks = tuple(
        RecordCheck(r, RecordResult.UNKNOWN, "NotCheckedYet", "not checked yet") for r in records
    )
    return DnsReport(checks, tuple(domains))


async def check_records(
    resolver: Resolver,
    records: Sequence[DnsRecord],
    *,
    address: str,
    hostname: str,
    domains: Iterable[str],
) -> DnsReport:
    """Look every record up (concurrently) and say whether each verifies."""
    checks = await asyncio.gather(
        *(_guarded(resolver, r, address=address, hostname=hostname) for r in records)
    )
    return DnsReport(tuple(checks), tuple(d.lower() for d in domains))


async def _guarded(
    resolver: Resolver, record: DnsRecord, *, address: str, hostname: str
) -> RecordCheck:
    """One record's check; whatever it raises is a failed lookup of that record (named by
    the exception's class only: a message could carry anything), never the reconcile's."""
    try:
        return await _check(resolver, record, address=address, hostname=hostname)
    except Exception as exc:  # any error of one lookup is that record's
        log.debug("DNS check of %s %s raised %s", record.type.value, record.name, type(exc))
        return _failed(record, f"{record.type.value} {record.name}: {type(exc).__name__}")


async def _check(
    resolver: Resolver, record: DnsRecord, *, address: str, hostname: str
) -> RecordCheck:
    if record.purpose is RecordPurpose.PTR:
        return await _check_ptr(resolver, record, address)
    if record.purpose is RecordPurpose.HOSTNAME:
        return await _check_hostname(resolver, record, address)
    if record.purpose in (RecordPurpose.SPF, RecordPurpose.RETURN_PATH_SPF):
        return await _check_spf(resolver, record, address, hostname)
    if record.purpose is RecordPurpose.DKIM:
        return await _check_dkim(resolver, record)
    if record.purpose is RecordPurpose.RETURN_PATH_MX:
        return await _check_mx(resolver, record)
    return await _check_dmarc(resolver, record)


def _failed(record: DnsRecord, failure: str) -> RecordCheck:
    message = f"the lookup failed ({failure}); it is tried again at the next check"
    return RecordCheck(record, RecordResult.UNKNOWN, LOOKUP_FAILED, message)


def _publish(record: DnsRecord) -> str:
    """How to publish ``record``, in a zone file's words."""
    if record.type is RecordType.TXT:
        data = " ".join(f'"{s}"' for s in record.strings)
        return f"publish {record.name} TXT {data}"
    return f"publish {record.type.value} {record.name} -> {record.value}"


async def _check_ptr(resolver: Resolver, record: DnsRecord, address: str) -> RecordCheck:
    answer = await resolver.lookup(record.name, RecordType.PTR)
    if answer.failure:
        return _failed(record, answer.failure)
    where = " (the address's provider publishes reverse DNS: set it there)"
    if record.value in answer.values:
        return RecordCheck(record, RecordResult.VERIFIED, VERIFIED)
    if not answer.values:
        message = f"{address} has no PTR record; {_publish(record)}{where}"
        return RecordCheck(record, RecordResult.MISSING, "PTRMissing", message)
    found = ", ".join(answer.values)
    message = f"the PTR of {address} is {found}; {_publish(record)}{where}"
    return RecordCheck(record, RecordResult.WRONG, "PTRMismatch", message, answer.values)


async def _check_hostname(resolver: Resolver, record: DnsRecord, address: str) -> RecordCheck:
    answer = await resolver.lookup(record.name, record.type)
    if answer.failure:
        return _failed(record, answer.failure)
    addresses = {str(ipaddress.ip_address(v)) for v in answer.values}
    if address in addresses:
        return RecordCheck(record, RecordResult.VERIFIED, VERIFIED)
    kind = record.type.value
    if not addresses:
        message = f"{record.name} has no {kind} record; {_publish(record)}"
        return RecordCheck(record, RecordResult.MISSING, "HostnameAddressMissing", message)
    message = (
        f"{record.name} resolves to {', '.join(sorted(addresses))}, not {address}; "
        f"{_publish(record)}"
    )
    return RecordCheck(
        record, RecordResult.WRONG, "HostnameAddressMismatch", message, tuple(sorted(addresses))
    )


def _mx_hint(record: DnsRecord) -> str:
    """The MX to publish in a zone file's words: ``bounces.example.com. MX 10 host.``."""
    return f"publish {record.name}. MX {record.value}."


def _mx(value: str) -> tuple[int, str]:
    """``<preference> <host>`` as (preference, host); a null MX's host is ``.``."""
    pref, _, host = value.partition(" ")
    host = host.strip().lower()
    return (int(pref) if pref.isdigit() else 65536), (host.rstrip(".") or ".")


async def _check_mx(resolver: Resolver, record: DnsRecord) -> RecordCheck:
    """The return-path domain's MX must name the relay's hostname as its most preferred
    exchange: a far MTA tries the lowest preference first, so a DSN sent to any other host at
    that preference (or a lower one) is not seen by the relay. A null MX (``0 .``, RFC 7505)
    says the domain takes no mail at all."""
    answer = await resolver.lookup(record.name, RecordType.MX)
    if answer.failure:
        return _failed(record, answer.failure)
    want = mx_host(record.value)
    found = sorted(_mx(v) for v in answer.values)
    listed = tuple(f"{p} {h}" for p, h in found)
    why = "DSNs sent to the return path must reach the relay"
    hint = f"{_mx_hint(record)} ({why})"
    if not found:
        message = f"the return-path domain {record.name} has no MX record; {hint}"
        return RecordCheck(record, RecordResult.MISSING, "ReturnPathMXMissing", message)
    if any(h == "." for _, h in found):
        message = (
            f"the return-path domain {record.name} publishes a null MX ('0 .': it accepts no "
            f"mail, RFC 7505); remove it and {hint}"
        )
        return RecordCheck(record, RecordResult.WRONG, "ReturnPathMXMismatch", message, listed)
    best = found[0][0]
    first = sorted({h for p, h in found if p == best})
    if first == [want]:
        return RecordCheck(record, RecordResult.VERIFIED, VERIFIED)
    mine = [p for p, h in found if h == want]
    if mine:
        others = ", ".join(f"{h} ({p})" for p, h in found if p <= mine[0] and h != want)
        message = (
            f"the MX of the return-path domain {record.name} lists {others} at the same or a "
            f"lower preference than {want} ({mine[0]}): far MTAs try those first and the "
            f"relay does not see the DSNs they take; give {want} the lowest preference alone, "
            f"or remove the others; {hint}"
        )
        return RecordCheck(record, RecordResult.WRONG, "ReturnPathMXNotPreferred", message, listed)
    hosts = ", ".join(sorted({h for _, h in found}))
    message = f"the MX of the return-path domain {record.name} is {hosts}, not {want}; {hint}"
    return RecordCheck(record, RecordResult.WRONG, "ReturnPathMXMismatch", message, listed)


def _spf_records(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(v for v in values if v.lower() == "v=spf1" or v.lower().startswith("v=spf1 "))


async def _check_spf(
    resolver: Resolver, record: DnsRecord, address: str, hostname: str
) -> RecordCheck:
    txt, (result, explanation) = await asyncio.gather(
        resolver.lookup(record.name, RecordType.TXT), resolver.spf(address, record.name, hostname)
    )
    return spf_verdict(record, address, txt, result, explanation)


def spf_verdict(
    record: DnsRecord, address: str, txt: Answer, result: str, explanation: str
) -> RecordCheck:
    """The SPF record's check from pyspf's (result, explanation) and the domain's own TXT
    lookup (``txt``: what to show as found; a failed one leaves nothing definite)."""
    domain = record.name
    found = _spf_records(txt.values)
    prefix = "ReturnPath" if record.purpose is RecordPurpose.RETURN_PATH_SPF else ""
    what = "the return-path domain " if prefix else ""
    if result == "pass":
        return RecordCheck(record, RecordResult.VERIFIED, VERIFIED)
    if result == "temperror":
        return _failed(record, f"SPF of {domain}: {explanation}")
    if txt.failure:  # what pyspf found is not known to be what is published: nothing definite
        return _failed(record, txt.failure)
    if result == "none" or not found:
        message = f"{what}{domain} has no SPF record; {_publish(record)}"
        return RecordCheck(record, RecordResult.MISSING, f"{prefix}SPFMissing", message)
    if result == "permerror":
        message = (
            f"the SPF record of {what}{domain} is invalid ({explanation}): receivers treat it "
            f"as no record; fix it so that it authorizes {address} (for example add "
            f"{_mechanism(address)} and remove includes past the 10-lookup limit)"
        )
        return RecordCheck(record, RecordResult.WRONG, f"{prefix}SPFPermError", message, found)
    message = (
        f"the SPF record of {what}{domain} does not authorize {address} (SPF {result}); add "
        f"{_mechanism(address)} to it, before its all"
    )
    return RecordCheck(record, RecordResult.WRONG, f"{prefix}SPFNotAuthorized", message, found)


def _mechanism(address: str) -> str:
    ip = ipaddress.ip_address(address)
    return f"{'ip4' if ip.version == 4 else 'ip6'}:{ip}"


def dkim_tags(value: str) -> dict[str, str]:
    """The tag=value pairs of a DKIM key record (RFC 6376 3.2): whitespace around tags and
    inside base64 values ignored, names lower-cased."""
    tags: dict[str, str] = {}
    for part in value.split(";"):
        name, sep, data = part.partition("=")
        if not sep:
            continue
        tags.setdefault(name.strip().lower(), "".join(data.split()))
    return tags


async def _check_dkim(resolver: Resolver, record: DnsRecord) -> RecordCheck:
    answer = await resolver.lookup(record.name, RecordType.TXT)
    if answer.failure:
        return _failed(record, answer.failure)
    want = dkim_tags(record.value)
    key = want.get("p", "")
    keys = [dkim_tags(v) for v in answer.values]
    for tags in keys:
        if (
            tags.get("v", "DKIM1") == "DKIM1"
            and tags.get("k", "rsa").lower() == want.get("k", "rsa").lower()
            and tags.get("p") == key
        ):
            return RecordCheck(record, RecordResult.VERIFIED, VERIFIED)
    if not answer.values:
        message = f"the DKIM record {record.name} is missing; {_publish(record)}"
        return RecordCheck(record, RecordResult.MISSING, "DKIMRecordMissing", message)
    message = (
        f"the DKIM record {record.name} does not carry this key (it holds "
        f"{'; '.join(_short_key(t) for t in keys)}); replace it: {_publish(record)}"
    )
    return RecordCheck(record, RecordResult.WRONG, "DKIMKeyMismatch", message, answer.values)


def _short_key(tags: dict[str, str]) -> str:
    key = tags.get("p")
    if key is None:
        return "no p= tag"
    if not key:
        return "an empty p= (a revoked key)"
    shown = key if len(key) <= 24 else f"{key[:12]}...{key[-8:]}"
    return f"k={tags.get('k', 'rsa')} p={shown}"


def dmarc_tags(value: str) -> dict[str, str] | None:
    """The tags of a DMARC record, or None when it is not one (RFC 7489 6.3: v=DMARC1 first)."""
    parts = [p.strip() for p in value.split(";") if p.strip()]
    if not parts or "".join(parts[0].split()).upper() != "V=DMARC1":
        return None
    tags: dict[str, str] = {}
    for part in parts[1:]:
        name, sep, data = part.partition("=")
        if sep:
            tags.setdefault(name.strip().lower(), data.strip())
    return tags


async def _check_dmarc(resolver: Resolver, record: DnsRecord) -> RecordCheck:
    domain = record.domain or record.name.removeprefix("_dmarc.")
    labels = domain.split(".")
    # DMARCbis's tree walk: the domain's own record, else its parents' (never the TLD's).
    for start in range(0, max(1, len(labels) - 1)):
        at = ".".join(labels[start:])
        answer = await resolver.lookup(dmarc_name(at), RecordType.TXT)
        if answer.failure:
            return _failed(record, answer.failure)
        parsed = [(v, dmarc_tags(v)) for v in answer.values]
        valid = [(v, t) for v, t in parsed if t is not None]
        if not valid:
            continue
        found = tuple(v for v, _ in valid)
        if len(valid) > 1:
            message = f"{dmarc_name(at)} has {len(valid)} DMARC records, so none applies: keep one"
            return RecordCheck(record, RecordResult.WRONG, "DMARCInvalid", message, found)
        tags = valid[0][1] or {}
        policy = tags.get("p", "").lower()
        if start:
            policy = tags.get("sp", "").lower() or policy
        if policy not in DMARC_POLICIES:
            message = (
                f"the DMARC record {dmarc_name(at)} has no valid policy (p=none, quarantine or "
                f"reject); {_publish(record)}"
            )
            return RecordCheck(record, RecordResult.WRONG, "DMARCInvalid", message, found)
        return RecordCheck(record, RecordResult.VERIFIED, VERIFIED, policy=policy)
    message = f"{domain} has no DMARC record; {_publish(record)}"
    return RecordCheck(record, RecordResult.MISSING, "DMARCMissing", message)


def written_report(
    records: Sequence[DnsRecord], written: Iterable[Mapping[str, Any]] | None
) -> DnsReport | None:
    """What status.dnsRecords recorded as verified, as a report for :func:`carried` (after a
    restart nothing is in memory: one failed lookup then keeps the written verdict too). Only
    Verified is seeded: a record's other reasons are not written, and a failed lookup of a
    record that did not verify changes nothing for Ready."""
    verified = {
        (str(w.get("name", "")).lower(), str(w.get("type")), "".join(map(str, w["value"])))
        for w in written or []
        if w.get("result") == RecordResult.VERIFIED.value and isinstance(w.get("value"), list)
    }
    checks = tuple(
        RecordCheck(r, RecordResult.VERIFIED, VERIFIED)
        for r in records
        if (r.name, r.type.value, "".join(r.strings)) in verified
    )
    return DnsReport(checks) if checks else None


def carried(previous: DnsReport | None, report: DnsReport) -> DnsReport:
    """``report`` with each failed lookup replaced by the record's previous definite result,
    for up to KEEP_FAILURES checks in a row."""
    if previous is None:
        return report
    before = {(c.record.name, c.record.type, c.record.value): c for c in previous.checks}
    out = []
    for new in report.checks:
        old = before.get((new.record.name, new.record.type, new.record.value))
        if new.reason == LOOKUP_FAILED and old is not None and old.reason != "NotCheckedYet":
            failures = old.failures + 1
            if old.reason != LOOKUP_FAILED and failures <= KEEP_FAILURES:
                new = replace(old, record=new.record, failures=failures)  # noqa: PLW2901
            else:
                new = replace(new, failures=failures)  # noqa: PLW2901
        out.append(new)
    return replace(report, checks=tuple(out))


# --- per DedicatedIP -----------------------------------------------------------------------------


@dataclass
class _Kept:
    key: tuple[object, ...]
    report: DnsReport
    at: float


@dataclass
class DnsChecks:
    """The last report of each DedicatedIP, re-made when its records change or it is due."""

    resolver: Resolver
    clock: Callable[[], float] = time.monotonic
    _kept: dict[str, _Kept] = field(default_factory=dict)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    # The DNSVerified status and reason last announced with an Event, per DedicatedIP.
    announced: dict[str, tuple[bool, str]] = field(default_factory=dict)
    # spec.dns.externalDNS: the DNSEndpoint applied for which report, per DedicatedIP; the
    # ones whose leftover endpoint was deleted once; why an endpoint could not be written.
    endpoints: dict[str, tuple[Obj, DnsReport]] = field(default_factory=dict)
    cleaned: set[str] = field(default_factory=set)
    notes: dict[str, str] = field(default_factory=dict)

    # When a check of each DedicatedIP was last started (by the schedule or a reconcile).
    _tried: dict[str, float] = field(default_factory=dict)

    def stale(self, name: str, interval: float) -> bool:
        """Whether ``name`` is due a check (the schedule's test): ``interval`` seconds after
        its last report; when the last attempt made none (the reconcile returned early or
        failed), min(interval, RETRY_AFTER) after that attempt, never at every tick."""
        now, kept, tried = self.clock(), self._kept.get(name), self._tried.get(name)
        if tried is not None and (kept is None or kept.at < tried):
            return now - tried >= min(interval, RETRY_AFTER)
        return kept is None or now - kept.at >= interval

    def seen(self, name: str) -> bool:
        """Whether a check of ``name`` was started or made by this process."""
        return name in self._tried or name in self._kept

    def attempted(self, name: str) -> None:
        """A check of ``name`` is under way (queued): :meth:`stale` waits from now."""
        self._tried[name] = self.clock()

    @staticmethod
    def _key(
        records: Sequence[DnsRecord], address: str, hostname: str, domains: Sequence[str]
    ) -> tuple[object, ...]:
        # What the results depend on: the records (the sending domains' SPF, DKIM keys and
        # DMARC, the return path's SPF), the address and the hostname; not the rest of the spec.
        return (address, hostname, tuple(d.lower() for d in domains), *records)

    def kept(self, name: str) -> DnsReport | None:
        """The last report of ``name`` (no lookup)."""
        kept = self._kept.get(name)
        return kept.report if kept is not None else None

    async def report(
        self,
        name: str,
        records: Sequence[DnsRecord],
        *,
        address: str,
        hostname: str,
        domains: Sequence[str],
        interval: float,
        written: Iterable[Mapping[str, Any]] | None = None,
    ) -> tuple[DnsReport, DnsReport | None]:
        """The report of ``name`` (re-made if due: other records, address, hostname or
        domains, or ``interval`` passed) and the one before it when it was re-made.
        ``written`` is status.dnsRecords: before this process's first check, what it
        recorded as verified is carried over one failed lookup (:func:`written_report`)."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            kept = self._kept.get(name)
            key = self._key(records, address, hostname, domains)
            if kept is not None and kept.key == key and self.clock() - kept.at < interval:
                return kept.report, None
            self.attempted(name)
            fresh = await check_records(
                self.resolver, records, address=address, hostname=hostname, domains=domains
            )
            previous = kept.report if kept is not None else written_report(records, written)
            report = carried(previous, fresh)
            self._kept[name] = _Kept(key, report, self.clock())
            return report, previous

    def forget(self, name: str) -> None:
        self._kept.pop(name, None)
        self._tried.pop(name, None)
        self._locks.pop(name, None)
        self.announced.pop(name, None)
        self.endpoints.pop(name, None)
        self.cleaned.discard(name)
        self.notes.pop(name, None)


class DnsSchedule:
    """The periodic DNS re-check of every DedicatedIP: one task of the operator (not a kopf
    timer per object, which logs each run and is a handler call per IP every tick). Every
    DNS_TICK it asks :meth:`DnsChecks.stale` of each IP (``ips()``: name and
    spec.dns.checkIntervalSeconds) and hands the due ones to ``run`` (a full reconcile, queued:
    a DKIM rotation waits for its record), recording the attempt first, so an IP whose
    reconcile returns early or fails waits RETRY_AFTER rather than being queued every tick.
    An IP it has not seen before is left to its create or resume handler's check."""

    def __init__(
        self,
        checks: DnsChecks,
        ips: Callable[[], Iterable[tuple[str, float]]],
        run: Callable[[str], object],
        tick: float = DNS_TICK,
    ) -> None:
        self.checks, self.ips, self.run, self.tick = checks, ips, run, tick
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="dns-schedule")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def due(self) -> list[str]:
        """Queue the check of every IP that is due one; the names queued."""
        out = []
        for name, interval in self.ips():
            if not self.checks.seen(name):
                # New to this process: its create or resume handler is checking it now; the
                # schedule steps in only if that makes no report (RETRY_AFTER from now).
                self.checks.attempted(name)
                continue
            if self.checks.stale(name, interval):
                self.checks.attempted(name)
                self.run(name)
                out.append(name)
        return out

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            try:
                self.due()
            except Exception:  # never let the schedule die; the next tick tries again
                log.exception("the DNS check schedule failed")


# --- what reconcile_ip calls ---------------------------------------------------------------------


def records_of(
    spec: DedicatedIPSpec,
    dkim: Iterable[DkimPublicRecord] = (),
    dkim_optional: Iterable[DkimPublicRecord] = (),
) -> list[DnsRecord]:
    return records_to_publish(spec, dkim, dkim_optional)


async def check_dns(
    checks: DnsChecks,
    name: str,
    spec: DedicatedIPSpec,
    dkim: Iterable[DkimPublicRecord] = (),
    dkim_optional: Iterable[DkimPublicRecord] = (),
    *,
    written: Iterable[Mapping[str, Any]] | None = None,
) -> DnsReport:
    """The DNS report of DedicatedIP ``name``: the kept one, or a new check when the records
    changed (a spec change, a new DKIM key) or spec.dns.checkIntervalSeconds have passed.
    ``written``: the object's status.dnsRecords (seeds the first check after a restart).

    ``dkim`` are the keys that sign now, ``dkim_optional`` those listed but not required (a
    next key before the switch, a retired one); ``report.dkim_verified`` answers for both.
    """
    records = records_of(spec, dkim, dkim_optional)
    report, _ = await checks.report(
        name,
        records,
        address=normalized_address(spec.address),
        hostname=spec.hostname.lower(),
        domains=spec.domains,
        interval=spec.dns.check_interval_seconds,
        written=written,
    )
    return report


def return_path_verified(
    spec: DedicatedIPSpec, report: DnsReport | None, *, unknown: bool = False
) -> bool:
    """Whether the return-path domain's MX (naming spec.hostname as it is now) verified in
    ``report``: the relay's VERP return path goes live only then (builders.relay_config).
    A failed lookup (Unknown, once the kept verdict ran out) answers ``unknown``: the state
    as it was, so the operator's own DNS trouble does not switch the return path off."""
    domain = spec.dns.return_path_domain
    if domain is None or report is None:
        return False
    found = report.check(domain, RecordPurpose.RETURN_PATH_MX)
    if found is None or found.record.value != mx_value(spec.hostname):
        return False
    if found.result is RecordResult.UNKNOWN:
        return unknown
    return found.verified


def kept_dns(checks: DnsChecks, name: str, spec: DedicatedIPSpec) -> DnsReport:
    """The last report of ``name`` without resolving (a status refresh), or an unchecked one."""
    return checks.kept(name) or unchecked(records_of(spec), spec.domains)


def _unchecked(report: DnsReport) -> bool:
    return bool(report.checks) and all(c.reason == "NotCheckedYet" for c in report.checks)


def dns_verified(
    report: DnsReport, previous: list[dict[str, Any]] | None = None, note: str | None = None
) -> tuple[bool, str, str]:
    """DNSVerified's (status, reason, message), with ``note`` (external-dns) after it. Before
    this process checked (a status refresh right after a restart) the condition written
    before stays: Ready does not flap."""
    if note:
        ok, reason, message = dns_verified(report, previous)
        return ok, reason, f"{message}; {note}" if note not in message else message
    if _unchecked(report):
        old = next((c for c in previous or [] if c.get("type") == DNS_VERIFIED), None)
        if old is not None:
            return old.get("status") == "True", str(old["reason"]), str(old.get("message", ""))
        return False, "NotCheckedYet", "the DNS records are checked shortly"
    return report.condition()


def dns_status(report: DnsReport, previous: dict[str, Any] | None = None) -> dict[str, object]:
    """status.dnsRecords and status.domains (before a check: as written before, if any)."""
    have = previous or {}
    if _unchecked(report) and have.get("dnsRecords"):
        domains = [dict(d) for d in have.get("domains") or []]  # copies: others add to them
        return {"dnsRecords": have["dnsRecords"], "domains": domains}
    return {"dnsRecords": report.records_status(), "domains": report.domains_status()}


def announcement(
    checks: DnsChecks, name: str, previous: list[dict[str, Any]] | None, ok: bool, reason: str
) -> bool:
    """Whether DNSVerified's new status and reason are news to announce with an Event: they
    differ from what was last announced (or, after a restart, from the condition written)."""
    if reason == "NotCheckedYet":
        return False
    if name in checks.announced:
        before: tuple[bool, str] | None = checks.announced[name]
    else:
        old = next((c for c in previous or [] if c.get("type") == DNS_VERIFIED), None)
        known = old is not None and old.get("reason") != "NotCheckedYet"
        before = (old.get("status") == "True", str(old.get("reason"))) if old and known else None
    checks.announced[name] = (ok, reason)
    return before != (ok, reason)


EXTERNAL_DNS_UNAVAILABLE = (
    "spec.dns.externalDNS: the DNSEndpoint kind ({api}) {why}: install external-dns with its "
    "CRD source (--source=crd), or set spec.dns.externalDNS to false"
)


EXTERNAL_DNS_FAILED = (
    "spec.dns.externalDNS: the DNSEndpoint {endpoint} could not be written (HTTP {status} "
    "{reason}); it is tried again at the next check"
)


async def sync_external_dns(
    kube: Kube, checks: DnsChecks, owner: RelayOwner, spec: DedicatedIPSpec, report: DnsReport
) -> None:
    """spec.dns.externalDNS: the IP's DNSEndpoint for external-dns (its hostname and DKIM
    records), applied once per DNS check; deleted when the option is turned off. A cluster
    without the DNSEndpoint kind is noted in DNSVerified's message, nothing fails."""
    name = owner.name
    if spec.dns.external_dns:
        desired = dns_endpoint(owner, [c.record for c in report.checks])
        applied = checks.endpoints.get(name)
        if applied is not None and applied[0] == desired and applied[1] is report:
            return
        try:
            await kube.apply(desired)
        except ApiException as exc:  # said in DNSVerified's message; the relay is unaffected
            if exc.status in (403, 404):
                why = (
                    "is not installed"
                    if exc.status == 404
                    else "may not be written by the operator"
                )
                note = EXTERNAL_DNS_UNAVAILABLE.format(api=EXTERNAL_DNS_API_VERSION, why=why)
            else:
                note = EXTERNAL_DNS_FAILED.format(
                    endpoint=dns_endpoint_name(name), status=exc.status, reason=exc.reason
                )
            checks.notes[name] = note
            checks.endpoints.pop(name, None)
            return
        checks.notes.pop(name, None)
        checks.endpoints[name] = (desired, report)
        checks.cleaned.discard(name)
        return
    checks.notes.pop(name, None)
    if name in checks.cleaned:
        return
    try:  # once per process, or after it was on: a leftover endpoint goes
        await kube.delete(
            EXTERNAL_DNS_API_VERSION, EXTERNAL_DNS_KIND, owner.namespace, dns_endpoint_name(name)
        )
    except ApiException as exc:  # the kind is not installed, or not ours to delete: nothing to do
        log.debug("no DNSEndpoint of %s deleted: %s", name, exc.reason)
    checks.endpoints.pop(name, None)
    checks.cleaned.add(name)
