"""Link rewriting for open and click tracking: HTML and MIME, with tokens from :mod:`.tokens`.

Rewriting (T3, T7, T8): only absolute http(s) ``href``\\ s of ``<a>``/``<area>`` are
rewritten; ``mailto:``, ``tel:``, relative, ``#anchor``, ``javascript:`` and unsubscribe
links, and links marked ``data-txmail-track="false"``, are left alone. The rest of the
document is kept byte for byte: ``html.parser`` finds the tags (so links in comments,
``<script>`` and ``<style>`` are skipped) and only the ``href`` value is replaced.
:func:`rewrite_message` rewrites decoded ``text/html`` parts and re-encodes them with lines
of at most 998 octets; on any error it returns the original message and the error, so
tracking never fails a delivery.
"""

from __future__ import annotations

import copy
import html as htmllib
import re
from dataclasses import dataclass
from email.message import EmailMessage, Message
from html.parser import HTMLParser
from typing import Final, TypeGuard
from urllib.parse import urlsplit

from txmail_relay.mail.compose import POLICY, to_bytes
from txmail_relay.tracking.tokens import URL_CONTROLS, TrackingKeys, trackable_url

OPT_OUT_ATTRIBUTE: Final = "data-txmail-track"  # ="false" leaves the link alone

# --- HTML -------------------------------------------------------------------------------------

_TAG_NAME = re.compile(r"([a-zA-Z][^\t\n\r\f />\x00]*)(?:\s|/(?!>))*")
_ATTR = re.compile(
    r"((?<=['\"\s/])[^\s/>][^\s/=>]*)(\s*=+\s*('[^']*'|\"[^\"]*\"|(?!['\"])[^>\s]*))?(?:\s|/(?!>))*"
)


@dataclass(frozen=True)
class TrackedLink:
    index: int
    url: str


class _Scanner(HTMLParser):
    """Collects ``<a>``/``<area>`` start tags and the last ``</body>`` with their offsets."""

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", source)]
        self.links: list[tuple[int, str, list[tuple[str, str | None]]]] = []
        self.body_end: int | None = None

    def _offset(self) -> int:
        line, column = self.getpos()
        return self._line_starts[line - 1] + column

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        raw = self.get_starttag_text()
        if tag in {"a", "area"} and raw is not None:
            self.links.append((self._offset(), raw, attrs))

    def handle_endtag(self, tag: str) -> None:
        if tag == "body":
            self.body_end = self._offset()


def _href_span(raw: str, attrs: list[tuple[str, str | None]]) -> tuple[int, int] | None:
    """Span of the first ``href`` value in the raw tag text, if our reading matches the
    parser's (otherwise the tag is left alone)."""
    m = _TAG_NAME.match(raw, 1)
    if m is None:
        return None
    found: list[tuple[str, str | None, tuple[int, int] | None]] = []
    k = m.end()
    while k < len(raw):
        a = _ATTR.match(raw, k)
        if a is None or a.end() == k:
            break
        value = a.group(3)
        if value is not None and value[:1] in {"'", '"'}:
            value = value[1:-1]
        if value:
            value = htmllib.unescape(value)
        found.append((a.group(1).lower(), value if a.group(2) else None, a.span(3)))
        k = a.end()
    if [(n, v) for n, v, _ in found] != attrs:
        return None
    for name, value, span in found:
        if name == "href":
            return span if value is not None else None
    return None


def _base(base_url: str) -> str:
    parts = urlsplit(base_url)
    if parts.scheme not in {"http", "https"} or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"invalid tracking base URL {base_url!r}")
    if URL_CONTROLS.search(base_url) or not base_url.isascii():
        raise ValueError(f"invalid tracking base URL {base_url!r}")
    return base_url.rstrip("/")


def open_pixel(base_url: str, keys: TrackingKeys, event_id: bytes) -> str:
    src = f"{_base(base_url)}/o/{keys.sign_open(event_id)}.gif"
    return f'<img src="{htmllib.escape(src)}" width="1" height="1" alt="" style="display:none">'


def rewrite_html(
    html: str,
    base_url: str,
    keys: TrackingKeys,
    event_id: bytes,
    *,
    clicks: bool = True,
    opens: bool = True,
    first_index: int = 0,
) -> tuple[str, list[TrackedLink]]:
    """Rewrite trackable links to ``<base>/c/<token>`` and add the open pixel; returns the
    new HTML and the tracked links. Raises ``ValueError`` for a bad base URL or HTML that
    ``html.parser`` refuses (:func:`rewrite_message` turns that into an untracked send)."""
    base = _base(base_url)
    scanner = _Scanner(html)
    try:
        scanner.feed(html)
        scanner.close()
    except AssertionError as e:  # html.parser's way of refusing some markup (``<![x``)
        raise ValueError(f"cannot parse the HTML: {e}") from e
    edits: list[tuple[int, int, str]] = []
    links: list[TrackedLink] = []
    for offset, raw, attrs in scanner.links if clicks else []:
        if html[offset : offset + len(raw)] != raw:
            continue
        values = dict(reversed(attrs))  # the first occurrence of a name wins, as in browsers
        if (values.get(OPT_OUT_ATTRIBUTE) or "").strip().lower() == "false":
            continue
        span = _href_span(raw, attrs)
        url = trackable_url(values.get("href") or "")
        if span is None or url is None:
            continue
        index = first_index + len(links)
        token = keys.sign_click(event_id, index, url)
        new_value = '"' + htmllib.escape(f"{base}/c/{token}", quote=True) + '"'
        edits.append((offset + span[0], offset + span[1], new_value))
        links.append(TrackedLink(index, url))
    if opens:
        at = scanner.body_end if scanner.body_end is not None else len(html)
        edits.append((at, at, open_pixel(base, keys, event_id)))
    out: list[str] = []
    pos = 0
    for start, end, text in sorted(edits):
        out.append(html[pos:start])
        out.append(text)
        pos = end
    out.append(html[pos:])
    return "".join(out), links


# --- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewriteResult:
    message: EmailMessage
    links: tuple[TrackedLink, ...]
    error: str | None = None  # set when tracking failed: ``message`` is then the original

    @property
    def failed(self) -> bool:
        return self.error is not None


def _set_html(part: EmailMessage, html: str) -> None:
    fresh = EmailMessage(policy=POLICY)
    fresh.set_content(html, subtype="html", charset="utf-8")
    cte = fresh["Content-Transfer-Encoding"]
    if "Content-Transfer-Encoding" in part:
        part.replace_header("Content-Transfer-Encoding", cte)
    else:
        part["Content-Transfer-Encoding"] = cte
    part.set_param("charset", "utf-8")
    part.set_payload(fresh.get_payload())


def _is_html_body(part: Message) -> TypeGuard[EmailMessage]:
    if not isinstance(part, EmailMessage):
        raise TypeError("parse messages with an email.policy.EmailPolicy, not compat32")
    return part.get_content_type() == "text/html" and not part.is_attachment()


def rewrite_message(
    msg: EmailMessage,
    base_url: str,
    keys: TrackingKeys,
    event_id: bytes,
    *,
    clicks: bool = True,
    opens: bool = True,
) -> RewriteResult:
    """Track the ``text/html`` parts of a copy of ``msg``; never raises (T8)."""
    if not (clicks or opens):
        return RewriteResult(msg, ())
    try:
        tracked = copy.deepcopy(msg)
        links: list[TrackedLink] = []
        pixel = opens
        for part in tracked.walk():
            if not _is_html_body(part):
                continue
            html, found = rewrite_html(
                part.get_content(),
                base_url,
                keys,
                event_id,
                clicks=clicks,
                opens=pixel,
                first_index=len(links),
            )
            _set_html(part, html)
            links.extend(found)
            pixel = False  # one pixel per message
        to_bytes(tracked)  # lines <= 998 and headers still safe, or fall back
    except Exception as e:  # any failure: deliver untracked
        return RewriteResult(msg, (), f"{type(e).__name__}: {e}")
    return RewriteResult(tracked, tuple(links))
