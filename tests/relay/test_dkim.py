"""DKIM signing: what reaches the upstream verifies with dkimpy against a real DNS server.

Each message goes through the real relay (SMTP submission or the single-send API) to Postfix's
smtp-sink; the test then reads it as the sink received it and asks dkimpy's verifier, whose
key lookups go through dnspython to the Knot server of tests/dns_server.py, where the test
published the public keys (``<selector>._domainkey.example.com`` TXT). Keys are generated
here with ``cryptography``; the relay reads them from files, as from a mounted Secret.
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiosmtplib.protocol
import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from pydantic import ValidationError

from dns_server import txt
from peers import Captured, free_port
from relay.relaykit import (
    DnsServer,
    RelayEnv,
    RelayThread,
    bearer,
    http,
    parsed,
    template_doc,
    tracking_keys_file,
    wait_for,
)
from txmail_relay.contract import DKIM_KEYS_PATH, DkimAlgorithm, DkimConfig
from txmail_relay.delivery.dkim import PROCESS_SIGNING_BYTES, KeyStore, sign_message
from txmail_relay.http.api import SEND_PATH
from txmail_relay.mail.dkim import (
    DkimKeyError,
    SigningKey,
    canonical,
    crlf,
    dkimpy_from_fields,
    from_domain,
    load_private_key,
)

DOMAIN = "example.com"
BASE = "https://t.example.com"
TRACKED = 31
METRIC = "txmail_relay_dkim_signatures_total"


# -- keys and DNS ------------------------------------------------------------------------------


class Key:
    """A DKIM key pair: the private key file's bytes and the TXT record of the public key."""

    def __init__(self, algorithm: str, *, seed_format: bool = False) -> None:
        self.algorithm = algorithm
        pem = serialization.Encoding.PEM
        pkcs8 = serialization.PrivateFormat.PKCS8
        if algorithm == "rsa-sha256":
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.file = private.private_bytes(pem, pkcs8, serialization.NoEncryption())
            der = private.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            self.record = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
        else:
            ed = ed25519.Ed25519PrivateKey.generate()
            if seed_format:  # dkimpy's dknewkey.py format: the base64 seed
                self.file = base64.b64encode(ed.private_bytes_raw()) + b"\n"
            else:
                self.file = ed.private_bytes(pem, pkcs8, serialization.NoEncryption())
            raw = ed.public_key().public_bytes_raw()
            self.record = f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"


@pytest.fixture(scope="module")
def rsa_keys() -> list[Key]:
    return [Key("rsa-sha256") for _ in range(3)]


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


def publish(server: DnsServer, selector: str, key: Key) -> None:
    server.set(f"{selector}._domainkey.{DOMAIN}", "TXT", txt(key.record))


def signing_relay(env: RelayEnv, server: DnsServer, key: Key) -> RelayThread:
    """A relay signing DOMAIN with ``key`` under selector s1, whose record ``server``
    publishes."""
    publish(server, "s1", key)
    return env.start(settings(env, dkim_config(env.directory / "dkim", ("s1", key))))


def dnsfunc(server: DnsServer) -> Callable[..., bytes | None]:
    return server.txt_lookup()


# -- what the upstream received, and its signatures -----------------------------------------------


def raw(captured: Captured) -> bytes:
    """The message as smtp-sink received it (its own Received header on top: not signed)."""
    return ("Received: from " + captured.content).encode()


def signatures(message: bytes) -> list[dict[bytes, bytes]]:
    """The tags of every DKIM-Signature, top to bottom."""
    found = []
    for name, value in dkim.DKIM(message).headers:
        if name.lower() == b"dkim-signature":
            found.append(dkim.util.parse_tag_value(value))
    return found


def verify_all(message: bytes, server: DnsServer) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature (none: ``[]``)."""
    lookup = dnsfunc(server)
    verdicts = []
    for idx in range(len(signatures(message))):
        try:
            verdicts.append(bool(dkim.DKIM(message).verify(idx=idx, dnsfunc=lookup)))
        except dkim.DKIMException:  # what dkim.verify() turns into False
            verdicts.append(False)
    return verdicts


def signed_headers(sig: dict[bytes, bytes]) -> list[str]:
    return [h.strip().decode() for h in sig[b"h"].split(b":")]


# -- the relay -----------------------------------------------------------------------------------


def dkim_config(keys_dir: Path, *keys: tuple[str, Key], domain: str = DOMAIN) -> dict[str, Any]:
    """The RelayConfig ``dkim`` block for ``keys`` ((selector, key)), writing their files."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for selector, key in keys:
        name = f"{domain}.{selector}.key"
        (keys_dir / name).write_bytes(key.file)
        entries.append({"selector": selector, "algorithm": key.algorithm, "keyFile": name})
    return {"keysDir": str(keys_dir), "domains": [{"domain": domain, "keys": entries}]}


def settings(env: RelayEnv, dkim_block: dict[str, Any] | None, **relay: Any) -> Path:
    keys = tracking_keys_file(env.directory, 1)
    doc: dict[str, Any] = {"tracking": {"baseURL": BASE}, **relay}
    if dkim_block is not None:
        doc["dkim"] = dkim_block
    return env.settings(
        overrides={
            "relay": doc,
            "trackingKeysFile": str(keys),
            "templates": [template_doc(TRACKED, track=True)],
        }
    )


def plain(n: int, **headers: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "App <app@example.com>"
    msg["To"] = "ada@dest.test"
    msg["Subject"] = f"plain {n}"
    msg["Date"] = formatdate()
    msg["Message-ID"] = f"<dkim-{n}.{secrets.token_hex(4)}@example.com>"
    for key, value in headers.items():
        msg[key.replace("_", "-")] = value
    msg.set_content(f"Hello  there,\t trailing spaces   \n\nEND-OF-MESSAGE {n}\n")
    return msg


def html(n: int, *, text_cte: str = "7bit", html_cte: str = "quoted-printable") -> EmailMessage:
    """Text and HTML alternatives; the text part ends with the sink's END-OF-MESSAGE line."""
    msg = EmailMessage()
    msg["From"] = "Shop <shop@example.com>"
    msg["To"] = "ada@dest.test"
    msg["Subject"] = f"order {n}"
    msg["Date"] = formatdate()
    msg["Message-ID"] = f"<dkim-html-{n}.{secrets.token_hex(4)}@example.com>"
    msg["Reply-To"] = "help@example.com"
    msg["List-Unsubscribe"] = "<https://shop.example.com/unsub>"
    msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg.set_content(
        f"Order {n}: https://shop.example.com/o/{n}\nEND-OF-MESSAGE {n}\n", cte=text_cte
    )
    long_line = "Déjà vu, a line long enough for soft line breaks in quoted-printable. " * 4
    msg.add_alternative(
        f'<p>{long_line}</p><p>Order {n}: <a href="https://shop.example.com/o/{n}">see it</a></p>',
        subtype="html",
        cte=html_cte,
    )
    return msg


def submit(env: RelayEnv, relay: RelayThread, msg: EmailMessage | bytes) -> None:
    with env.client(relay) as smtp:
        if isinstance(msg, bytes):
            smtp.sendmail("app@example.com", ["ada@dest.test"], msg)
        else:
            smtp.send_message(msg, to_addrs=["ada@dest.test"])


def arrived(env: RelayEnv, n: int | str) -> Captured:
    """The message whose END-OF-MESSAGE line says ``n``, once the sink completed it."""
    marker = f"\nEND-OF-MESSAGE {n}\n"
    return wait_for(
        lambda: next((m for m in env.sink.messages() if marker in m.content), None),
        15,
        f"message {n} at smtp-sink",
    )


def received(env: RelayEnv, n: int | str) -> bytes:
    return raw(arrived(env, n))


# -- tests ---------------------------------------------------------------------------------------


def test_plain_mail_is_signed_and_verifies(
    env: RelayEnv, dns_server: DnsServer, rsa_keys: list[Key]
) -> None:
    relay = signing_relay(env, dns_server, rsa_keys[0])
    submit(env, relay, plain(1, Cc="cat@dest.test"))
    delivered = received(env, 1)

    assert verify_all(delivered, dns_server) == [True]
    [sig] = signatures(delivered)
    assert (sig[b"d"], sig[b"s"], sig[b"a"], sig[b"c"]) == (
        b"example.com",
        b"s1",
        b"rsa-sha256",
        b"relaxed/relaxed",
    )
    signed = signed_headers(sig)
    assert signed.count("from") == 2  # oversigned: a second From breaks the signature
    for name in ("to", "cc", "subject", "date", "message-id", "mime-version", "content-type"):
        assert name in signed
    assert "received" not in signed and "reply-to" not in signed  # absent: not signed

    # The check is real: a changed body, or a second From added later, no longer verifies.
    assert verify_all(delivered.replace(b"Hello", b"Hallo"), dns_server) == [False]
    spoofed = delivered.replace(b"From: App", b"From: Boss <boss@example.com>\nFrom: App", 1)
    assert verify_all(spoofed, dns_server) == [False]
    assert relay.metric(METRIC, {"domain": DOMAIN, "result": "signed"}) == 1


def test_tracked_html_in_quoted_printable_and_base64_verifies(
    env: RelayEnv, dns_server: DnsServer, rsa_keys: list[Key]
) -> None:
    relay = signing_relay(env, dns_server, rsa_keys[0])
    cases = [
        html(1, html_cte="quoted-printable"),
        html(2, text_cte="quoted-printable", html_cte="base64"),
    ]
    for n, msg in enumerate(cases):
        submit(env, relay, msg)
        delivered = received(env, n + 1)
        assert verify_all(delivered, dns_server) == [True], n
        body = parsed(arrived(env, n + 1)).get_body(("html",))
        assert body is not None
        content = body.get_content()
        assert f"{BASE}/c/" in content and f"{BASE}/o/" in content  # links were rewritten
        signed = signed_headers(signatures(delivered)[0])
        for name in ("reply-to", "list-unsubscribe", "list-unsubscribe-post"):
            assert name in signed
        assert "content-transfer-encoding" not in signed  # multipart: none on top


def test_base64_attachment_verifies(
    env: RelayEnv, dns_server: DnsServer, rsa_keys: list[Key]
) -> None:
    relay = signing_relay(env, dns_server, rsa_keys[0])
    encoded = base64.encodebytes(bytes(range(256)) * 8).decode()
    content = (
        "From: App <app@example.com>\nTo: ada@dest.test\nSubject: attachment\n"
        "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n--b\n"
        "Content-Type: text/plain\n\nsee the attachment\n--b\n"
        "Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
        f"{encoded}\n--b--\nEND-OF-MESSAGE 1\n"
    ).encode()
    submit(env, relay, content.replace(b"\n", b"\r\n"))
    assert verify_all(received(env, 1), dns_server) == [True]


def test_api_send_is_signed(env: RelayEnv, dns_server: DnsServer, rsa_keys: list[Key]) -> None:
    relay = signing_relay(env, dns_server, rsa_keys[0])
    reply = http(
        relay.api_port,
        "POST",
        SEND_PATH,
        body={
            "emailId": TRACKED,
            "message": {"to": "ada@dest.test"},
            "contactProperties": {"firstname": "Ada"},
            "customProperties": {"order_id": "42"},
        },
        headers=bearer(env.password),
    )
    assert reply.status == 200, reply.body
    delivered = received(env, 42)
    assert f"{BASE}/c/".encode() in delivered or b"=\n" in delivered  # tracked (maybe QP)
    assert verify_all(delivered, dns_server) == [True]
    assert signatures(delivered)[0][b"d"] == b"example.com"


def test_dual_rsa_and_ed25519_signatures_both_verify(
    env: RelayEnv, dns_server: DnsServer, rsa_keys: list[Key]
) -> None:
    ed = Key("ed25519-sha256")
    ed_seed = Key("ed25519-sha256", seed_format=True)  # dkimpy's own key file format
    publish(dns_server, "dual-r", rsa_keys[1])
    publish(dns_server, "dual-e", ed)
    publish(dns_server, "dual-s", ed_seed)
    keys_dir = env.directory / "dkim"
    relay = env.start(settings(env, dkim_config(keys_dir, ("dual-r", rsa_keys[1]), ("dual-e", ed))))
    submit(env, relay, html(1))
    delivered = received(env, 1)
    sigs = signatures(delivered)
    assert sorted((s[b"a"], s[b"s"]) for s in sigs) == [
        (b"ed25519-sha256", b"dual-e"),
        (b"rsa-sha256", b"dual-r"),
    ]
    assert verify_all(delivered, dns_server) == [True, True]

    # The seed format signs too (switch the Ed25519 key while the relay runs).
    settings(env, dkim_config(keys_dir, ("dual-r", rsa_keys[1]), ("dual-s", ed_seed)))
    wait_for(lambda: _selectors_configured(relay) == {"dual-r", "dual-s"}, what="the new config")
    submit(env, relay, plain(2))
    delivered = received(env, 2)
    assert sorted(s[b"s"] for s in signatures(delivered)) == [b"dual-r", b"dual-s"]
    assert verify_all(delivered, dns_server) == [True, True]


def _selectors_configured(relay: RelayThread) -> set[str]:
    assert relay.relay is not None
    config = relay.relay.store.current
    if config is None:
        return set()
    return {k.selector for d in config.relay.dkim.domains for k in d.keys}


def test_rotation_switches_the_selector_for_new_and_queued_mail(
    env: RelayEnv, dns_server: DnsServer, rsa_keys: list[Key]
) -> None:
    old, new = rsa_keys[0], rsa_keys[2]
    publish(dns_server, "txmail-202611", old)
    publish(dns_server, "txmail-202612", new)  # the next record is published first
    keys_dir = env.directory / "dkim"
    relay = env.start(settings(env, dkim_config(keys_dir, ("txmail-202611", old))))
    submit(env, relay, plain(1))
    before = received(env, 1)
    assert [s[b"s"] for s in signatures(before)] == [b"txmail-202611"]

    # Upstream unreachable: the next message waits in the queue, accepted and unsigned.
    closed = {"delivery": {"smarthost": {"port": free_port()}}}
    settings(env, dkim_config(keys_dir, ("txmail-202611", old)), **closed)
    wait_for(lambda: _smarthost_port(relay) != env.sink.port, what="the closed upstream")
    submit(env, relay, plain(2))
    wait_for(lambda: relay.relay is not None and relay.relay.queue.depth() == 1, what="queued")

    # The switch (what the operator does once the next record verifies), and the upstream back.
    settings(env, dkim_config(keys_dir, ("txmail-202612", new)))
    wait_for(lambda: _selectors_configured(relay) == {"txmail-202612"}, what="the switch")
    queued = received(env, 2)
    submit(env, relay, plain(3))
    fresh = received(env, 3)
    for message in (queued, fresh):
        assert [s[b"s"] for s in signatures(message)] == [b"txmail-202612"]
        assert verify_all(message, dns_server) == [True]
    # Mail signed before the switch still verifies while the old record stays listed.
    assert verify_all(before, dns_server) == [True]


def _smarthost_port(relay: RelayThread) -> int | None:
    assert relay.relay is not None
    config = relay.relay.store.current
    if config is None or config.relay.delivery.smarthost is None:
        return None
    return config.relay.delivery.smarthost.port


def test_mail_the_app_signed_for_the_domain_is_left_alone(
    env: RelayEnv, dns_server: DnsServer, rsa_keys: list[Key]
) -> None:
    app_key = Key("rsa-sha256")
    publish(dns_server, "app", app_key)
    relay = signing_relay(env, dns_server, rsa_keys[0])

    def app_signed(n: int, domain: str) -> bytes:
        content = html(n).as_bytes().replace(b"\n", b"\r\n")
        header: bytes = dkim.sign(
            content,
            b"app",
            domain.encode(),
            app_key.file,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[b"from", b"to", b"subject"],
        )
        return header + content

    submit(env, relay, app_signed(1, DOMAIN))
    delivered = received(env, 1)
    assert [s[b"s"] for s in signatures(delivered)] == [b"app"]  # not re-signed, not tracked
    assert verify_all(delivered, dns_server) == [True]
    assert f"{BASE}/c/".encode() not in delivered
    assert relay.metric(METRIC, {"domain": DOMAIN, "result": "already_signed"}) == 1

    # A signature for another domain (e.g. an ESP's) does not stand in for ours.
    submit(env, relay, app_signed(2, "esp.example.org"))
    delivered = received(env, 2)
    assert sorted((s[b"d"], s[b"s"]) for s in signatures(delivered)) == [
        (b"esp.example.org", b"app"),
        (b"example.com", b"s1"),
    ]
    domains = [s[b"d"] for s in signatures(delivered)]
    verdicts = dict(zip(domains, verify_all(delivered, dns_server), strict=True))
    assert verdicts[b"example.com"] is True


def test_a_broken_key_file_still_delivers_unsigned(
    env: RelayEnv,
    dns_server: DnsServer,
    rsa_keys: list[Key],
    caplog: pytest.LogCaptureFixture,
) -> None:
    ed = Key("ed25519-sha256")
    publish(dns_server, "s1", rsa_keys[0])
    publish(dns_server, "e1", ed)
    keys_dir = env.directory / "dkim"
    block = dkim_config(keys_dir, ("s1", rsa_keys[0]))
    rsa_file = keys_dir / block["domains"][0]["keys"][0]["keyFile"]
    secret = secrets.token_hex(24)
    rsa_file.write_text(f"-----BEGIN PRIVATE KEY-----\n{secret}\n-----END PRIVATE KEY-----\n")
    relay = env.start(settings(env, block))
    for n in (1, 2):
        submit(env, relay, plain(n))
    unsigned = [received(env, 1), received(env, 2)]
    for message in unsigned:
        assert signatures(message) == []
        assert dkim.verify(message, dnsfunc=dnsfunc(dns_server)) is False  # what a receiver sees
    assert relay.metric(METRIC, {"domain": DOMAIN, "result": "key_unavailable"}) == 2
    assert caplog.text.count("DKIM key not usable") == 1  # once per state of the file
    assert secret not in caplog.text

    # Dual signing with one key missing: the other still signs.
    dual = dkim_config(keys_dir, ("e1", ed))
    dual["domains"][0]["keys"].insert(0, block["domains"][0]["keys"][0])
    missing = {"selector": "gone", "algorithm": "rsa-sha256", "keyFile": "missing.pem"}
    dual["domains"][0]["keys"][0] = missing
    settings(env, dual)
    wait_for(lambda: _selectors_configured(relay) == {"gone", "e1"}, what="the dual config")
    submit(env, relay, plain(3))
    delivered = received(env, 3)
    assert [s[b"s"] for s in signatures(delivered)] == [b"e1"]
    assert verify_all(delivered, dns_server) == [True]

    # The file repaired (as a Secret update lands): signed again, no restart.
    settings(env, block)
    wait_for(lambda: _selectors_configured(relay) == {"s1"}, what="the single key again")
    tmp = rsa_file.with_suffix(".new")
    tmp.write_bytes(rsa_keys[0].file)
    tmp.replace(rsa_file)
    submit(env, relay, plain(4))
    delivered = received(env, 4)
    assert verify_all(delivered, dns_server) == [True]
    assert rsa_keys[0].file.decode().splitlines()[1] not in caplog.text


def test_without_a_key_for_the_domain_mail_goes_unsigned(
    env: RelayEnv, dns_server: DnsServer, rsa_keys: list[Key]
) -> None:
    """The control: no dkim block, no signature, and dkimpy says so."""
    relay = env.start(settings(env, None))
    submit(env, relay, plain(1))
    delivered = received(env, 1)
    assert signatures(delivered) == []
    assert dkim.verify(delivered, dnsfunc=dnsfunc(dns_server)) is False
    assert relay.metric(METRIC, {"domain": DOMAIN, "result": "signed"}) == 0


def test_no_trace_of_key_material_in_the_spool(
    env: RelayEnv, dns_server: DnsServer, rsa_keys: list[Key]
) -> None:
    """Signing happens at delivery: the spooled copy stays as accepted (no signature)."""
    publish(dns_server, "s1", rsa_keys[0])
    spool = env.directory / "spool"
    relay = env.start(
        settings(
            env,
            dkim_config(env.directory / "dkim", ("s1", rsa_keys[0])),
            delivery={"smarthost": {"port": free_port()}},
        )
    )
    submit(env, relay, plain(1))
    wait_for(lambda: relay.relay is not None and relay.relay.queue.depth() == 1, what="queued")
    spooled = b"".join(p.read_bytes() for p in spool.rglob("*") if p.is_file())
    assert b"END-OF-MESSAGE 1" in spooled
    assert b"DKIM-Signature" not in spooled
    assert not re.search(rb"BEGIN (RSA )?PRIVATE KEY", spooled)


def _signed_from(message: bytes) -> list[bytes]:
    """The From fields dkimpy reads in ``message`` (what ``h=from`` covers)."""
    return [v for name, v in dkim.DKIM(message).headers if name.lower() == b"from"]


def test_obsolete_field_names_with_a_space_before_the_colon_are_signed_too(
    env: RelayEnv, dns_server: DnsServer, rsa_keys: list[Key]
) -> None:
    """``From :`` (RFC 5322 4.5, obsolete): dkimpy reads it as an mbox ``From `` line and
    would sign no From at all; the relay writes it ``From:`` and signs that."""
    relay = signing_relay(env, dns_server, rsa_keys[0])
    content = (
        b"From : App <app@example.com>\r\nTo: ada@dest.test\r\nSubject : obsolete\r\n"
        b"Message-ID: <obs-1@example.com>\r\n\r\nHello\r\nEND-OF-MESSAGE 1\r\n"
    )
    submit(env, relay, content)
    delivered = received(env, 1)
    assert verify_all(delivered, dns_server) == [True]
    assert b"\nFrom: App <app@example.com>\n" in delivered  # as it was signed
    assert b"\nSubject: obsolete\n" in delivered
    assert _signed_from(delivered) == [b" App <app@example.com>\r\n"]
    # The signature covers that From: another author no longer verifies.
    spoofed = delivered.replace(b"From: App <app@", b"From: Boss <boss@", 1)
    assert verify_all(spoofed, dns_server) == [False]
    assert relay.metric(METRIC, {"domain": DOMAIN, "result": "signed"}) == 1


def test_from_with_several_mailboxes_is_signed_only_at_one_domain(
    env: RelayEnv, dns_server: DnsServer, rsa_keys: list[Key]
) -> None:
    relay = signing_relay(env, dns_server, rsa_keys[0])
    several = plain(1, Sender="app@example.com")
    several.replace_header("From", "App <app@example.com>, Ops <ops@example.com>")
    submit(env, relay, several)
    assert verify_all(received(env, 1), dns_server) == [True]
    assert relay.metric(METRIC, {"domain": DOMAIN, "result": "signed"}) == 1
    # Mailboxes at two domains (the relay's From policy refuses that anyway): which key?
    # None: unsigned.
    assert from_domain(b"From: a@example.com, b@example.org\r\n\r\n") is None
    assert from_domain(b"From: a@example.com\r\nFrom: b@example.com\r\n\r\n") is None


def test_dot_lines_and_8bit_bodies_verify(
    env: RelayEnv, dns_server: DnsServer, rsa_keys: list[Key]
) -> None:
    """Lines starting with '.' are dot-stuffed on the wire and unstuffed by the receiver;
    an 8-bit body goes with BODY=8BITMIME (smtp-sink offers it), unchanged."""
    relay = signing_relay(env, dns_server, rsa_keys[0])
    dots = plain(1)
    dots.set_content(".hidden\n..two\n.\nEND-OF-MESSAGE 1\n")
    submit(env, relay, dots)
    eight = plain(2)
    eight.set_content("Grüße, déjà vu: 日本語\nEND-OF-MESSAGE 2\n", cte="8bit")
    submit(env, relay, eight.as_bytes())
    delivered = received(env, 1)
    assert b"\n.hidden\n..two\n.\n" in delivered
    assert verify_all(delivered, dns_server) == [True]
    captured = arrived(env, 2)
    delivered = raw(captured)
    assert "Grüße, déjà vu: 日本語".encode() in delivered
    assert verify_all(delivered, dns_server) == [True]
    assert "BODY=8BITMIME" in captured.mail_from  # smtp-sink's X-Mail-Args
    assert "BODY=8BITMIME" not in arrived(env, 1).mail_from  # 7-bit: no parameter


def test_a_new_key_whose_file_is_not_there_yet_signs_with_the_previous_key(
    env: RelayEnv, dns_server: DnsServer, rsa_keys: list[Key], caplog: pytest.LogCaptureFixture
) -> None:
    """The ConfigMap names the next key before the kubelet has synced the Secret volume."""
    old, new = rsa_keys[0], rsa_keys[2]
    publish(dns_server, "old", old)
    publish(dns_server, "new", new)
    keys_dir = env.directory / "dkim"
    relay = env.start(settings(env, dkim_config(keys_dir, ("old", old))))
    submit(env, relay, plain(1))
    assert [s[b"s"] for s in signatures(received(env, 1))] == [b"old"]

    new_block = dkim_config(keys_dir, ("new", new))
    new_file = keys_dir / new_block["domains"][0]["keys"][0]["keyFile"]
    new_file.unlink()  # not synced yet
    settings(env, new_block)
    wait_for(lambda: _selectors_configured(relay) == {"new"}, what="the new selector")
    for n in (2, 3):
        submit(env, relay, plain(n))
        delivered = received(env, n)
        assert [s[b"s"] for s in signatures(delivered)] == [b"old"]
        assert verify_all(delivered, dns_server) == [True]
    assert relay.metric(METRIC, {"domain": DOMAIN, "result": "previous_key"}) == 2
    assert relay.metric(METRIC, {"domain": DOMAIN, "result": "key_unavailable"}) == 0
    assert caplog.text.count("signing with the previous key") == 1

    tmp = new_file.with_suffix(".tmp")  # the file appears (as the kubelet swaps it in)
    tmp.write_bytes(new.file)
    tmp.replace(new_file)
    submit(env, relay, plain(4))
    delivered = received(env, 4)
    assert [s[b"s"] for s in signatures(delivered)] == [b"new"]
    assert verify_all(delivered, dns_server) == [True]


def test_big_messages_are_signed_in_a_worker_process(
    env: RelayEnv, dns_server: DnsServer, rsa_keys: list[Key]
) -> None:
    relay = signing_relay(env, dns_server, rsa_keys[0])
    big = plain(1)
    line = "a line of a big report, long enough to count for something at all\n"
    big.set_content(line * (2 * PROCESS_SIGNING_BYTES // len(line)) + "END-OF-MESSAGE 1\n")
    submit(env, relay, big)
    delivered = received(env, 1)
    assert len(delivered) > 2 * PROCESS_SIGNING_BYTES
    assert verify_all(delivered, dns_server) == [True]
    assert relay.relay is not None
    assert relay.relay.dkim._processes is not None  # it went the process way


# -- the key files and the contract (pure) ------------------------------------------------------


def test_line_endings_agree_with_aiosmtplib() -> None:
    """The copy in mail/dkim.py (aiosmtplib.protocol's LINE_ENDINGS_REGEX is not public API)
    must make the same bytes as aiosmtplib sends, or signatures break."""
    samples = [
        b"a\r\nb\nc\rd\r\r\ne\n\rf\r",
        b"\r\r\n\n\r\n\r",
        b"From: x\n\nbody\r\n.\r\n",
        bytes(range(256)) * 3,
    ]
    for sample in samples:
        assert crlf(sample) == aiosmtplib.protocol.LINE_ENDINGS_REGEX.sub(b"\r\n", sample)


def test_dkimpy_sees_the_from_that_is_signed() -> None:
    assert dkimpy_from_fields(canonical(b"From : a@example.com\nTo: b\n\nbody\n")) == 1
    assert dkimpy_from_fields(b"From a@example.com\r\nTo: b\r\n\r\n") == 0  # mbox line
    assert dkimpy_from_fields(b"To: b\r\nbad line\r\n\r\n") is None
    assert (
        canonical(b"A : 1\n B : folded\n\nC : body\n") == b"A: 1\r\n B : folded\r\n\r\nC : body\r\n"
    )
    assert sign_message(b"To: b@example.com\r\n\r\nbody\r\n", "example.com", []) is None


def test_a_header_section_opening_with_a_continuation_line_is_unsignable() -> None:
    # Found by tests/fuzz/test_deliverability.py: from_domain reads the From, but dkimpy's
    # parser raised IndexError on the leading folded line (sign_message raised: logged as a
    # signing bug); it is unsignable, counted and sent as it is.
    message = b" From:\r\nFrom: a@example.com\r\n\r\nbody\r\n"
    assert from_domain(message) == "example.com"
    assert dkimpy_from_fields(canonical(message)) is None
    assert sign_message(message, "example.com", []) is None


def test_no_key_material_in_reprs(rsa_keys: list[Key], tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(rsa_keys[0].file)
    store = KeyStore()
    private = store.get(path, DkimAlgorithm.RSA_SHA256)
    assert isinstance(private, bytes)
    body = [line for line in private.decode().splitlines() if "-----" not in line]
    texts = [repr(store), str(store), repr(store._keys), str(list(store._keys.values()))]
    texts.append(repr(SigningKey("s1", DkimAlgorithm.RSA_SHA256, private)))
    for text in texts:
        for line in body[:3] + body[-2:]:
            assert line not in text


def test_key_files_load_in_the_documented_formats(rsa_keys: list[Key]) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pkcs1 = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    for data in (rsa_keys[0].file, pkcs1):
        assert load_private_key(data, DkimAlgorithm.RSA_SHA256).startswith(
            b"-----BEGIN RSA PRIVATE KEY-----"
        )
    for ed in (Key("ed25519-sha256"), Key("ed25519-sha256", seed_format=True)):
        seed = base64.b64decode(load_private_key(ed.file, DkimAlgorithm.ED25519_SHA256))
        assert len(seed) == 32


def test_unusable_key_files_say_why_without_their_content(rsa_keys: list[Key]) -> None:
    encrypted = rsa_keys[0].file
    encrypted = serialization.load_pem_private_key(encrypted, None).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    ed = Key("ed25519-sha256")
    secret = secrets.token_hex(16)
    cases = [
        (f"-----BEGIN PRIVATE KEY-----\n{secret}\n-----END PRIVATE KEY-----\n".encode(), "rsa"),
        (secret.encode(), "ed"),
        (base64.b64encode(secret.encode()[:20]), "ed"),
        (encrypted, "rsa"),
        (ed.file, "rsa"),  # an Ed25519 key where RSA is configured
        (rsa_keys[0].file, "ed"),
    ]
    for data, kind in cases:
        algorithm = DkimAlgorithm.RSA_SHA256 if kind == "rsa" else DkimAlgorithm.ED25519_SHA256
        with pytest.raises(DkimKeyError) as caught:
            load_private_key(data, algorithm)
        assert secret not in str(caught.value)
        assert data.decode(errors="replace").strip() not in str(caught.value)


def test_the_contract_refuses_ambiguous_dkim_configs() -> None:
    key = {"selector": "s1", "keyFile": "k.pem"}
    ed = {"selector": "e1", "algorithm": "ed25519-sha256", "keyFile": "e.key"}
    ok = DkimConfig.model_validate({"domains": [{"domain": "Example.COM.", "keys": [key, ed]}]})
    assert [k.selector for k in ok.keys_for("example.com")] == ["s1", "e1"]
    assert ok.keys_dir == DKIM_KEYS_PATH
    bad: list[dict[str, Any]] = [
        {"domains": [{"domain": "example.com", "keys": [key, {**key, "selector": "s2"}]}]},
        {"domains": [{"domain": "example.com", "keys": []}]},
        {"domains": [{"domain": "a.test", "keys": [key]}, {"domain": "A.test", "keys": [key]}]},
        {"domains": [{"domain": "a.test", "keys": [{**key, "keyFile": "../etc/passwd"}]}]},
        {"domains": [{"domain": "a.test", "keys": [{**key, "selector": "bad selector"}]}]},
        {"domains": [{"domain": "a.test", "keys": [{**key, "algorithm": "rsa-sha1"}]}]},
    ]
    for doc in bad:
        with pytest.raises(ValidationError):
            DkimConfig.model_validate(doc)
