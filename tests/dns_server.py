"""A real DNS server for the tests: Knot DNS (Debian's `knot`) on a loopback port.

Knot serves every zone the test names, authoritatively, over UDP and TCP. Records change while
it runs by RFC 2136 dynamic updates (dnspython's ``dns.update``), which Knot applies before it
answers, so a test can publish a record, break it and fix it while the code under test
resolves against it. Nothing is written back to zone files (``zonefile-sync: -1``).

``drop(name)`` puts a lossy path in front of the server for one name: the resolver address
then points at a small UDP forwarder that passes every query to Knot except those for dropped
names, which it swallows (a lookup that hangs, as behind a dead or filtered nameserver). The
answers that do come back are Knot's own.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.update

KNOTD = "/usr/sbin/knotd"
DEFAULT_ZONES = ("test", "example", "example.com", "example.org", "in-addr.arpa", "ip6.arpa")

Records = Mapping[str, Mapping[str, Sequence[str]]]


def txt(value: str) -> str:
    """``value`` as zone-file TXT data: quoted strings of at most 255 bytes each (RFC 7208 3.3,
    RFC 6376 3.6.2.2 for DKIM keys longer than one string)."""
    chunks = [value[i : i + 255] for i in range(0, len(value), 255)] or [""]
    return " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)


def ptr_name(address: str) -> str:
    """The reverse-lookup name of an IPv4 or IPv6 address."""
    import dns.reversename  # noqa: PLC0415

    return dns.reversename.from_address(address).to_text(omit_final_dot=True)


def _free_port(host: str) -> int:
    # Knot needs the same port free for UDP and TCP; try a few.
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port for the DNS server")


class DnsServer:
    """Knot DNS on ``host``: authoritative for ``zones``, seeded with ``records``.

    ``records`` maps a name to {type: [zone-file data, ...]}, for example
    ``{"mx.example.com": {"A": ["127.0.0.1"]}, "example.com": {"TXT": [txt("v=spf1 -all")]}}``.
    """

    def __init__(
        self,
        records: Records | None = None,
        *,
        zones: Iterable[str] = DEFAULT_ZONES,
        host: str = "127.0.0.1",
    ) -> None:
        if not Path(KNOTD).exists():
            raise RuntimeError(f"{KNOTD} is missing: `make setup` installs Debian's knot")
        self.host = host
        self.zones = sorted({z.strip(".").lower() for z in zones}, key=len, reverse=True)
        self._dir = Path(tempfile.mkdtemp(prefix="txmail-knot-"))
        self.port = _free_port(host)
        self._write_config()
        self._log = (self._dir / "knotd.log").open("wb")
        self._process = subprocess.Popen(
            [KNOTD, "--config", str(self._dir / "knot.conf")],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._proxy: _DroppingProxy | None = None
        try:
            self._wait_ready()
            if records:
                self.update(records)
        except BaseException:
            self.stop()
            raise

    # -- what the code under test is given ----------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port`` of the nameserver to resolve with (the lossy path once ``drop`` ran)."""
        if self._proxy is not None:
            return f"{self.host}:{self._proxy.port}"
        return f"{self.host}:{self.port}"

    def resolver(self) -> dns.resolver.Resolver:
        """A dnspython resolver that asks this server (and only it)."""
        resolver = dns.resolver.Resolver(configure=False)
        host, port = self.address.rsplit(":", 1)
        resolver.nameservers = [host]
        resolver.port = int(port)
        resolver.lifetime = 5.0
        return resolver

    def txt_lookup(self) -> Callable[..., bytes | None]:
        """dkimpy's key lookup (``dnsfunc(name, timeout=5)``), asking this server: the TXT
        record's strings joined, None when there is none."""
        import dkim  # noqa: PLC0415 - only the DKIM tests need dkimpy

        resolver = self.resolver()

        def lookup(name: bytes, timeout: int = 5) -> bytes | None:
            try:
                answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                return None
            except dns.exception.DNSException as e:
                raise dkim.DnsTimeoutError(str(e)) from e
            return b"".join(next(iter(answer)).strings)

        return lookup

    # -- changing records while it runs -------------------------------------------------------

    def set(self, name: str, rdtype: str, *values: str, ttl: int = 1) -> None:
        """Replace the ``rdtype`` records of ``name`` with ``values`` (none: delete them)."""
        zone, relative = self._split(name)
        update = dns.update.UpdateMessage(zone)
        if values:
            update.replace(relative, ttl, rdtype, *values)
        else:
            update.delete(relative, rdtype)
        self._send(update)

    def delete(self, name: str, rdtype: str | None = None) -> None:
        """Delete ``name``'s records of ``rdtype``, or all of them."""
        zone, relative = self._split(name)
        update = dns.update.UpdateMessage(zone)
        if rdtype is None:
            update.delete(relative)
        else:
            update.delete(relative, rdtype)
        self._send(update)

    def update(self, records: Records, *, ttl: int = 1) -> None:
        """``set`` every name and type of ``records``."""
        for name, types in records.items():
            for rdtype, values in types.items():
                self.set(name, rdtype, *values, ttl=ttl)

    def drop(self, name: str) -> None:
        """Swallow every query for ``name`` from now on (see the module docstring)."""
        if self._proxy is None:
            self._proxy = _DroppingProxy(self.host, (self.host, self.port))
        self._proxy.dropped.add(name.strip(".").lower())

    def stop(self) -> None:
        if self._proxy is not None:
            self._proxy.stop()
            self._proxy = None
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> DnsServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------------

    def _split(self, name: str) -> tuple[str, str]:
        fqdn = name.strip(".").lower()
        for zone in self.zones:
            if fqdn == zone or fqdn.endswith("." + zone):
                relative = fqdn[: -len(zone)].rstrip(".") or "@"
                return zone + ".", relative
        raise ValueError(f"{name!r} is in none of the test DNS server's zones {self.zones}")

    def _send(self, update: dns.update.UpdateMessage) -> None:
        response = dns.query.tcp(update, self.host, port=self.port, timeout=5)
        if response.rcode() != dns.rcode.NOERROR:
            raise RuntimeError(f"DNS update refused: {dns.rcode.to_text(response.rcode())}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 15
        query = dns.message.make_query(self.zones[-1] + ".", dns.rdatatype.SOA)
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"knotd exited: {self._log_text()}")
            try:
                response = dns.query.udp(query, self.host, port=self.port, timeout=0.2)
                if response.rcode() == dns.rcode.NOERROR and response.answer:
                    return
            except (OSError, dns.exception.Timeout):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"knotd did not answer within 15 s: {self._log_text()}")
            time.sleep(0.05)

    def _log_text(self) -> str:
        self._log.flush()
        return (self._dir / "knotd.log").read_text(errors="replace")[-2000:]

    def _write_config(self) -> None:
        zones_dir = self._dir / "zones"
        zones_dir.mkdir()
        (self._dir / "db").mkdir()
        zone_lines = []
        for zone in self.zones:
            (zones_dir / f"{zone}.zone").write_text(
                f"$ORIGIN {zone}.\n$TTL 1\n"
                f"@ SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 1\n"
                f"@ NS ns.{zone}.\n"
            )
            zone_lines.append(f"  - domain: {zone}.\n    acl: local-update\n")
        (self._dir / "knot.conf").write_text(
            "server:\n"
            f"    rundir: {self._dir}\n"
            f"    listen: {self.host}@{self.port}\n"
            "    udp-workers: 1\n"
            "    tcp-workers: 1\n"
            "    background-workers: 1\n"
            "log:\n"
            "  - target: stderr\n"
            "    any: warning\n"
            "database:\n"
            f"    storage: {self._dir / 'db'}\n"
            "acl:\n"
            "  - id: local-update\n"
            "    address: 127.0.0.0/8\n"
            "    action: update\n"
            "template:\n"
            "  - id: default\n"
            f"    storage: {zones_dir}\n"
            '    file: "%s.zone"\n'
            "    zonefile-sync: -1\n"
            "    zonefile-load: whole\n"
            "    journal-content: none\n"
            "    semantic-checks: off\n"
            "zone:\n" + "".join(zone_lines)
        )


class _DroppingProxy:
    """UDP forwarder to the real server that swallows queries for the ``dropped`` names."""

    def __init__(self, host: str, upstream: tuple[str, int]) -> None:
        self.dropped: set[str] = set()
        self._upstream = upstream
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, 0))
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                data, peer = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            try:
                query = dns.message.from_wire(data)
                name = query.question[0].name.to_text(omit_final_dot=True).lower()
            except Exception:  # not a query we can read: pass it on unchanged
                name = ""
            if name in self.dropped:
                continue
            threading.Thread(target=self._forward, args=(data, peer), daemon=True).start()

    def _forward(self, data: bytes, peer: tuple[str, int]) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as upstream:
            upstream.settimeout(5)
            upstream.sendto(data, self._upstream)
            try:
                answer, _ = upstream.recvfrom(65535)
            except TimeoutError:
                return
        self._sock.sendto(answer, peer)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(5)
        self._sock.close()
