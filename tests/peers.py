"""Real peers and polling helpers shared by the tests and `make demo`.

Everything binds 127.0.0.0/8.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

T = TypeVar("T")
SMTP_SINK = "/usr/sbin/smtp-sink"


def wait_for(
    probe: Callable[[], T | None], timeout: float = 10.0, what: str = "", every: float = 0.02
) -> T:
    """Poll ``probe`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what or probe} (last: {value!r})"
            )
        time.sleep(every)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# -- smtp-sink ---------------------------------------------------------------------------------


@dataclass
class Captured:
    client_addr: str
    mail_from: str
    rcpts: list[str]
    content: str


_COMPLETE = re.compile(r"\nEND-OF-MESSAGE[^\n]*\n\n")


class Sink:
    """Postfix's smtp-sink capturing each transaction to a file (``-d``).

    smtp-sink writes a dump as the data arrives, so a test message ends with a line
    ``END-OF-MESSAGE <n>``: a dump that has it is complete.
    """

    def __init__(self, *options: str, host: str = "127.0.0.1", port: int | None = None) -> None:
        # Outside pytest's private tmp tree: as root, smtp-sink must run as another user.
        self.directory = Path(tempfile.mkdtemp(prefix="txmail-sink-"))
        self.directory.chmod(0o777)
        self.host = host
        self.port = port or free_port(host)  # one port on several addresses: MX tests
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self._log = (self.directory / "stderr.log").open("wb")
        self._process = subprocess.Popen(
            [
                SMTP_SINK,
                *user,
                *options,
                "-d",
                f"{self.directory}/dump/%Y%m%d%H%M%S.",
                f"{host}:{self.port}",
                "64",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        wait_for(self._listening, 10, "smtp-sink to listen")

    def _listening(self) -> bool:
        if self._process.poll() is not None:
            raise AssertionError("smtp-sink exited")
        with socket.socket() as s:
            return s.connect_ex((self.host, self.port)) == 0

    def messages(self) -> list[Captured]:
        """Completed transactions only (their body ends with an END-OF-MESSAGE line)."""
        found = []
        dump = self.directory / "dump"
        for path in sorted(dump.iterdir()) if dump.exists() else ():
            text = path.read_text(errors="replace")
            if not _COMPLETE.search(text):
                continue
            head, _, content = text.partition("\nReceived: from ")
            fields: dict[str, list[str]] = {}
            for line in head.splitlines():
                key, _, value = line.partition(": ")
                fields.setdefault(key, []).append(value)
            found.append(
                Captured(
                    client_addr=fields["X-Client-Addr"][0],
                    mail_from=fields["X-Mail-Args"][0],
                    rcpts=fields.get("X-Rcpt-Args", []),
                    content=content,
                )
            )
        return found

    def wait(self, count: int, timeout: float = 15.0) -> list[Captured]:
        return wait_for(
            lambda: m if len(m := self.messages()) >= count else None,
            timeout,
            f"{count} messages at smtp-sink",
        )

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(10)
        self._log.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def relay_command() -> list[str]:
    """The installed ``txmail-relay`` entry point of this venv (what the image runs)."""
    script = Path(sys.executable).with_name("txmail-relay")
    if not script.exists():
        raise AssertionError(f"{script} is missing: install the package (make .venv/.installed)")
    return [str(script)]


class RelayProcess:
    """``txmail-relay --config`` as a real process (standalone, or against a Kubernetes API)."""

    def __init__(self, settings: dict[str, object], workdir: Path) -> None:
        self.workdir = workdir
        self.config = workdir / "relay.yaml"
        self.config.write_text(yaml.safe_dump(settings))
        self.log = workdir / "relay.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait_port: tuple[str, int] | None = None, timeout: float = 20.0) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [*relay_command(), "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if wait_port is not None:

            def listening() -> bool:
                if self.process is not None and self.process.poll() is not None:
                    raise AssertionError(f"the relay exited:\n{self.output()[-3000:]}")
                with socket.socket() as s:
                    return s.connect_ex(wait_port) == 0

            try:
                wait_for(listening, timeout, "the relay to listen")
            except BaseException:
                self.stop()  # never leave a half-started relay behind
                raise

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def submit(
    address: tuple[str, int],
    app_secret: dict[str, str],
    message: bytes,
    sender: str,
    recipients: list[str],
    password: str | None = None,
) -> None:
    """Send like an app would: STARTTLS verifying the relay with the Secret's ca.crt, then AUTH.

    The relay's certificate names its Service (the Secret's ``host``); we connect to the
    loopback address it listens on and check the certificate against that name.
    """
    context = ssl.create_default_context(cadata=app_secret["ca.crt"])
    with smtplib.SMTP(address[0], address[1], timeout=15) as smtp:
        # smtplib's private name starttls() checks the certificate against (typeshed has none).
        smtp._host = app_secret["host"]  # type: ignore[attr-defined]
        smtp.starttls(context=context)
        smtp.login(app_secret["username"], password or app_secret["password"])
        smtp.sendmail(sender, recipients, message)


def auth_accepted(
    address: tuple[str, int], app_secret: dict[str, str], password: str | None = None
) -> bool:
    """Whether the relay accepts AUTH with these credentials now (nothing is sent)."""
    try:
        submit(address, app_secret, b"", "probe@example.com", [], password)
    except smtplib.SMTPAuthenticationError:
        return False
    except smtplib.SMTPRecipientsRefused:  # authenticated; no recipients given on purpose
        return True
    return True


# -- TLS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSFiles:
    """A test CA and a server certificate it signed (for the host name and 127.0.0.1)."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_authority(directory: Path, label: str, host: str = "upstream.test") -> TLSFiles:
    """A fresh CA (named after ``label``) and a certificate for ``host`` and 127.0.0.1."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{label} CA"))
        .issuer_name(_name(f"{label} CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(host))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TLSFiles(directory / "ca.crt", directory / "tls.crt", directory / "tls.key")
    files.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files
