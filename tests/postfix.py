"""A real outside MTA for the tests: a private Postfix instance (Debian's) on loopback.

Why Postfix: the feedback loop needs a far MTA that accepts mail and bounces or defers it
LATER, asynchronously, with the DSNs (RFC 3464) a real MTA writes. Postfix is the MTA most
mail meets; its bounce daemon writes those DSNs. Nothing here imitates it.

One instance per fixture, beside (never instead of) the stock one: its own configuration
directory with a main.cf and master.cf written here, its own queue_directory and
data_directory in a fresh directory, started with ``postfix -c DIR start-fg``. As root,
``postfix -c DIR`` needs nothing in the stock /etc/postfix/main.cf: ``alternate_config_directories``
only matters to the set-gid commands (postdrop, postqueue) run by other users, and
``multi_instance_directories``/``postmulti`` are for instances that ``postfix start`` of the
stock instance should start too, which these must not. Debian's chroot set-up
(/usr/lib/postfix/configure-instance.sh) runs only from its systemd units, so every service in
our master.cf runs unchrooted. The stock instance is never started or touched.

``start-fg`` keeps the master(8) daemon a child of the process we start (``master -s`` under
postfix-script's shell), so teardown sends it SIGTERM (what ``postfix abort`` does: master
passes it to its process group) and waits for that process itself: no pid file polling, no
zombies left to a PID 1 that may not reap them. Logs go to a file through postlogd
(``maillog_file``, Postfix >= 3.4): there is no syslog here.

Behaviour (see ``_main_cf`` for each setting's reason):

- ``known@bounce.test`` is a virtual mailbox (a maildir, ``delivered()`` reads it); any other
  ``@bounce.test`` address is ACCEPTED at RCPT, then bounced by virtual(8) (5.1.1 user
  unknown): an asynchronous RFC 3464 DSN to the envelope sender.
- ``@defer.test`` is accepted and deferred by the ``retry`` transport (error(8) in defer mode)
  on every attempt: a "delayed" DSN after ``delay_warning`` seconds, then a "failed" DSN when
  ``lifetime`` is reached; the queue is scanned every second so both come within seconds.
- ``routes`` maps a domain to a ``(host, port)``: mail to it (the DSNs to a return-path domain)
  goes there by SMTP (transport_maps), nowhere else. ``route()`` changes one while it runs.
- Any other domain is refused at RCPT (554 relay access denied).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from peers import free_port, wait_for

POSTFIX = "/usr/sbin/postfix"
BOUNCE_DOMAIN = "bounce.test"
DEFER_DOMAIN = "defer.test"
KNOWN_USER = "known"
HOSTNAME = "mx.bounce.test"

# The master.cf services every private instance runs (master.cf(5) columns: service type
# private unpriv chroot wakeup maxproc command); chroot off everywhere, since Debian's chroot
# is prepared by its systemd units only, which never run for these instances.
MASTER_CF_SERVICES = (
    "cleanup   unix  n       -       n       -       0       cleanup",
    "qmgr      unix  n       -       n       300     1       qmgr",
    "rewrite   unix  -       -       n       -       -       trivial-rewrite",
    "bounce    unix  -       -       n       -       0       bounce",
    "defer     unix  -       -       n       -       0       bounce",
    "trace     unix  -       -       n       -       0       bounce",
    "verify    unix  -       -       n       -       1       verify",
    "proxymap  unix  -       -       n       -       -       proxymap",
    "smtp      unix  -       -       n       -       -       smtp",
    "relay     unix  -       -       n       -       -       smtp",
    "showq     unix  n       -       n       -       -       showq",
    "error     unix  -       -       n       -       -       error",
    "retry     unix  -       -       n       -       -       error",
    "discard   unix  -       -       n       -       -       discard",
    "anvil     unix  -       -       n       -       1       anvil",
    "scache    unix  -       -       n       -       1       scache",
    "postlog   unix-dgram n  -       n       -       1       postlogd",
)


def master_cf(smtpd: str, written_by: str, extra: Sequence[str] = ()) -> str:
    """A private instance's master.cf: smtpd(8) listening on ``smtpd`` (``host:port``),
    MASTER_CF_SERVICES and the ``extra`` service lines (master.cf's order does not matter)."""
    lines = [
        f"# Written by {written_by}. Chroot off everywhere (Debian's chroot is prepared by its",
        "# systemd units only, which never run for this instance).",
        "# service type  private unpriv  chroot  wakeup  maxproc command",
        f"{smtpd} inet n - n - - smtpd",
        *MASTER_CF_SERVICES,
        *extra,
    ]
    return "\n".join(lines) + "\n"


# virtual(8) delivers to the maildirs of delivered().
_VIRTUAL_SERVICE = "virtual   unix  -       n       n       -       -       virtual"


class Postfix:
    """A private Postfix on ``127.0.0.1:<port>``; see the module docstring.

    ``delay_warning`` and ``lifetime`` are seconds (Postfix's time units). Use as a context
    manager or call ``stop()``; ``log()`` is the instance's maillog.
    """

    def __init__(
        self,
        routes: Mapping[str, tuple[str, int]] | None = None,
        *,
        delay_warning: int = 2,
        lifetime: int = 8,
    ) -> None:
        if not Path(POSTFIX).exists():
            raise RuntimeError(f"{POSTFIX} is missing: `make setup` installs Debian's postfix")
        if os.geteuid() != 0:
            raise RuntimeError("a private Postfix instance needs root (postfix(1) is root-only)")
        # Outside pytest's tmp tree (0700 as root): virtual(8) writes the maildir as `nobody`.
        self.directory = Path(tempfile.mkdtemp(prefix="txmail-postfix-"))
        self.directory.chmod(0o755)
        self.config_dir = self.directory / "etc"
        self.queue_dir = self.directory / "queue"
        self.data_dir = self.directory / "data"
        self.mail_dir = self.directory / "mail"
        self.maillog = self.directory / "log" / "maillog"
        for d in (self.config_dir, self.queue_dir, self.maillog.parent):
            d.mkdir()
        nobody = pwd.getpwnam("nobody")
        self._nobody = (nobody.pw_uid, nobody.pw_gid)
        self.mail_dir.mkdir()
        os.chown(self.mail_dir, *self._nobody)
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.routes = dict(routes or {})
        self.delay_warning = delay_warning
        self.lifetime = lifetime
        self._write_config()
        self._out = (self.directory / "log" / "postfix.out").open("wb")
        self._process: subprocess.Popen[bytes] | None = None
        started = time.monotonic()
        _RUNNING.add(self)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started

    # -- what a test uses ---------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def send(self, sender: str, recipients: list[str], message: bytes) -> None:
        """Submit over SMTP as any outside client would (smtplib, no TLS)."""
        with smtplib.SMTP(self.host, self.port, timeout=10) as smtp:
            smtp.sendmail(sender, recipients, message)

    def route(self, domain: str, host: str, port: int) -> None:
        """Send mail for ``domain`` to ``host:port`` from now on (transport map + reload)."""
        self.routes[domain] = (host, port)
        self._write_config()
        self._postfix("reload")

    def delivered(self, user: str = KNOWN_USER) -> list[EmailMessage]:
        """Messages in ``user@bounce.test``'s maildir (new/), oldest first."""
        new = self.mail_dir / BOUNCE_DOMAIN / user / "new"
        paths = sorted(new.iterdir(), key=lambda p: p.stat().st_mtime) if new.exists() else []
        found: list[EmailMessage] = []
        for path in paths:
            msg = message_from_bytes(path.read_bytes(), policy=policy.default)
            assert isinstance(msg, EmailMessage)
            found.append(msg)
        return found

    def log(self) -> str:
        """The maillog (postlogd), plus what postfix(1) printed before logging started."""
        parts = []
        for path in (self.directory / "log" / "postfix.out", self.maillog):
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    def wait_log(self, text: str, timeout: float = 20.0) -> str:
        """Poll the maillog until a line contains ``text``; that line."""

        def line() -> str | None:
            return next((x for x in self.log().splitlines() if text in x), None)

        try:
            return wait_for(line, timeout, f"{text!r} in the Postfix log")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- Postfix log ---\n{self.log()[-4000:]}") from None

    def queue_ids(self) -> list[str]:
        """Queue IDs of messages still queued (any queue), without postqueue's set-gid path."""
        found = []
        for name in ("incoming", "active", "deferred", "hold", "maildrop"):
            base = self.queue_dir / name
            if base.exists():
                found += [p.name for p in base.rglob("*") if p.is_file()]
        return sorted(found)

    def stop(self) -> None:
        """SIGTERM to master(8) (it passes it to its process group), wait for it, then for
        every process still working in our queue directory; the directory is removed."""
        _RUNNING.discard(self)
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            pid = self._master_pid()
            if pid is not None:
                _signal(pid, signal.SIGTERM)
            else:  # still in postfix-script's checks
                process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                if pid is not None:
                    _signal(-pid, signal.SIGKILL)
                process.kill()
                process.wait(10)
        try:
            wait_for(lambda: not self._processes_here(), 10, "Postfix processes to exit")
        finally:
            self._out.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Postfix:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------------

    def _start(self) -> None:
        self._make_directories()
        self._process = subprocess.Popen(
            [POSTFIX, "-c", str(self.config_dir), "start-fg"],
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # our Ctrl-C is not master's; stop() ends it
        )
        wait_for(self._banner, 20, "the Postfix smtpd banner", every=0.05)

    def _make_directories(self) -> None:
        """The queue and data directories, with the owners and modes postfix-files lists.

        ``postfix check`` creates them (post-install runs postconf dozens of times: 0.4 s),
        so the first instance of a test process does it and keeps a copy; later ones copy that
        (``cp -a`` keeps owners; nothing in them names a path), and ``quick-start`` tells
        start-fg to skip its own checks (postfix-script): a start is then 0.07 s.
        """
        global _TEMPLATE  # noqa: PLW0603 - one per test process, removed at exit
        if _TEMPLATE is None:
            self._postfix("check")
            template = Path(tempfile.mkdtemp(prefix="txmail-postfix-template-"))
            _cp_a(self.queue_dir, template / "queue")
            _cp_a(self.data_dir, template / "data")
            atexit.register(shutil.rmtree, template, True)
            _TEMPLATE = template
        else:
            self.queue_dir.rmdir()
            _cp_a(_TEMPLATE / "queue", self.queue_dir)
            _cp_a(_TEMPLATE / "data", self.data_dir)
        (self.queue_dir / "quick-start").touch()

    def _banner(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise AssertionError(f"postfix start-fg exited:\n{self.log()[-4000:]}")
        try:
            with smtplib.SMTP(self.host, self.port, timeout=5) as smtp:
                code, _ = smtp.noop()
                return code == 250
        except (OSError, smtplib.SMTPException):
            return False

    def _postfix(self, command: str) -> None:
        result = subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), command],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"postfix {command} failed ({result.returncode}):\n"
                f"{result.stdout.decode(errors='replace')}{result.stderr.decode(errors='replace')}"
                f"\n--- Postfix log ---\n{self.log()[-4000:]}"
            )

    def _master_pid(self) -> int | None:
        path = self.queue_dir / "pid" / "master.pid"
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _processes_here(self) -> list[int]:
        """Live processes whose working directory is our queue directory (Postfix daemons
        chdir there); a zombie has no readable cwd and does not count."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cwd = str((entry / "cwd").readlink())
            except OSError:
                continue
            if cwd == str(self.queue_dir):
                found.append(int(entry.name))
        return found

    def _write_config(self) -> None:
        transport = [f"{DEFER_DOMAIN} retry:4.2.0 mailbox temporarily unavailable (test)"]
        transport += [f"{d} smtp:[{h}]:{p}" for d, (h, p) in sorted(self.routes.items())]
        (self.config_dir / "transport").write_text("\n".join(transport) + "\n")
        (self.config_dir / "vmailbox").write_text(
            f"{KNOWN_USER}@{BOUNCE_DOMAIN} {BOUNCE_DOMAIN}/{KNOWN_USER}/\n"
        )
        (self.config_dir / "master.cf").write_text(
            master_cf(f"{self.host}:{self.port}", "tests/postfix.py", [_VIRTUAL_SERVICE])
        )
        (self.config_dir / "main.cf").write_text(self._main_cf())
        # Postfix reads main.cf and texthash tables with load_file(), which waits in 0.3 s
        # steps until a file is 2 s old (so that it is not read while an editor writes it):
        # 2 s per start. Ours are complete, so they are dated 10 s ago.
        past = time.time() - 10
        for name in ("transport", "vmailbox", "master.cf", "main.cf"):
            os.utime(self.config_dir / name, (past, past))

    def _instance_main_cf(self) -> str:
        """The main.cf lines that make this a private instance: its own directories and log,
        Debian's accounts, loopback IPv4 only (also BenchPostfix's)."""
        return f"""\
# Today's defaults (no backwards-compatibility warnings in the log).
compatibility_level = 3.6
# This instance's own directories; the stock /var/spool/postfix is never used.
queue_directory = {self.queue_dir}
data_directory = {self.data_dir}
# Debian's accounts (postfix-files sets owners from these).
mail_owner = postfix
setgid_group = postdrop

# No syslog here: postlogd writes this file (the prefix must be allowed explicitly).
maillog_file = {self.maillog}
maillog_file_prefixes = {self.maillog.parent}

# Loopback only, IPv4: the smtpd in master.cf binds {self.host}:{self.port}, and nothing else
# listens (no port 25, no pickup: nothing is submitted with sendmail).
inet_interfaces = {self.host}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
"""

    def _main_cf(self) -> str:
        c = self.config_dir
        uid, gid = self._nobody
        return f"""\
# Written by tests/postfix.py: a private test instance. Each setting says why.

{self._instance_main_cf()}
# Names in the DSNs it writes (Reporting-MTA) and in its HELO.
myhostname = {HOSTNAME}
mydomain = {BOUNCE_DOMAIN}
myorigin = $myhostname
# No local(8) delivery, no aliases (nothing reads /etc/aliases).
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
# The relay and smtplib are remote clients to this MTA: their headers are left as they are
# (the default rewrites and completes those of clients on inet_interfaces, i.e. all of ours).
local_header_rewrite_clients =
# Nobody is notified of errors (a DSN that cannot be delivered is dropped, not sent to a
# postmaster nobody reads).
notify_classes =
biff = no

# bounce.test: a virtual mailbox domain with one known user (a maildir written as nobody).
virtual_mailbox_domains = {BOUNCE_DOMAIN}
virtual_mailbox_maps = texthash:{c}/vmailbox
virtual_mailbox_base = {self.mail_dir}
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
# Unknown users are ACCEPTED at RCPT, so virtual(8) bounces them after the fact: an
# asynchronous DSN, which is what the test is about (a 550 at RCPT would be synchronous).
smtpd_reject_unlisted_recipient = no

# defer.test is relayed (so accepted) and transport_maps sends it to the retry transport:
# error(8) in defer mode, deferring every attempt without any network.
relay_domains = {DEFER_DOMAIN}
relay_recipient_maps =
# Everything else is refused at RCPT: only our own domains come in.
smtpd_relay_restrictions = reject_unauth_destination
# defer.test's route and the return-path domains' routes (the DSNs' next hop).
transport_maps = texthash:{c}/transport
# No fast-flush service runs (not in master.cf).
fast_flush_domains =

# Deferred mail within seconds instead of hours: the queue is scanned every second and a
# deferred message retried after 1-2 s; a "delayed" DSN once it is {self.delay_warning} s old;
# given up ("failed" DSN) at {self.lifetime} s. The same lifetime for DSNs themselves (sender <>).
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
delay_warning_time = {self.delay_warning}s
maximal_queue_lifetime = {self.lifetime}s
bounce_queue_lifetime = {self.lifetime}s

# No DNS at all: routes are [ip]:port, clients are not looked up (no resolver delays).
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
# Plain SMTP both ways: the peers on loopback are test listeners.
smtp_tls_security_level = none
smtpd_tls_security_level = none
"""


_TEMPLATE: Path | None = None
# Instances not stopped yet: stopped when the test process exits (master runs in a session
# of its own, so it would outlive an interrupted pytest otherwise).
_RUNNING: set[Postfix] = set()


@atexit.register
def _stop_all() -> None:
    for instance in list(_RUNNING):
        instance.stop()


def _cp_a(source: Path, target: Path) -> None:
    subprocess.run(["cp", "-a", str(source), str(target)], check=True)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def dsn_parts(msg: EmailMessage) -> tuple[dict[str, str], list[dict[str, str]]]:
    """An RFC 3464 report's per-message and per-recipient fields (lower-case names), read
    with the stdlib email package (message/delivery-status is a list of header blocks)."""
    assert msg.get_content_type() == "multipart/report", msg.get_content_type()
    for part in msg.walk():
        if part.get_content_type() == "message/delivery-status":
            blocks = part.get_payload()
            assert isinstance(blocks, list)
            fields = [
                {k.lower(): str(v) for k, v in b.items()} for b in blocks if not isinstance(b, str)
            ]
            return fields[0], fields[1:]
    raise AssertionError("no message/delivery-status part")


@pytest.fixture
def postfix_factory() -> Iterator[Callable[..., Postfix]]:
    """Start Postfix instances (``Postfix(...)`` arguments); each is stopped at teardown,
    after its maillog is printed (pytest shows a test's captured output when it failed)."""
    started: list[Postfix] = []

    def make(*args: Any, **kwargs: Any) -> Postfix:
        instance = Postfix(*args, **kwargs)
        started.append(instance)
        return instance

    yield make
    for instance in started:
        print(
            f"--- Postfix {instance.port} maillog (started in {instance.start_seconds:.2f} s) ---"
        )
        print(instance.log())
        instance.stop()
