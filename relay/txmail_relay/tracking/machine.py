"""Machine opens and clicks: a pure classifier over what a tracking endpoint knows.

Link scanners of mail security gateways, link-preview fetchers and prefetching privacy
proxies request the pixel and the click links of a message without a person behind them.
Their hits are still answered as anyone's (a scanner must see normal behaviour) and still
recorded, as events with ``filteredEvent: true``, but they are not counted as opens or
clicks in the stats (docs/feedback.md, "Machine opens and clicks").

Conservative by design: a false "machine" hides a person's engagement, a missed one only
leaves the figures as they were before this existed. So only signals that a person's mail
client or browser does not produce are used:

* **A user agent that names a scanner or a prefetcher** (:data:`SCANNERS`). Each entry says
  where it comes from. Generic crawler lists (crawler-user-agents, crawlerdetect) were not
  used: they are about web crawlers and also match HTTP libraries (``Python-urllib``,
  ``curl``) that an app's own scripts use, and they do not cover mail gateways.
* **Apple Mail Privacy Protection** on the pixel: with MPP on, Apple's proxies fetch every
  remote image of a message soon after it lands in the mailbox, whether or not it is read
  (SocketLabs, "Identifying Apple MPP opens"; Bird's MPP guide), with a bare
  ``Mozilla/5.0`` user agent; Apple Mail itself sends a full WebKit user agent when it
  loads images on a device. So an open whose user agent is exactly ``Mozilla/5.0`` is a
  machine open.
* **HEAD**: a browser following a link, and a mail client loading an image, send GET; link
  checkers send HEAD (Apple Mail's background URL check is a HEAD, per the field guide
  below). aiohttp routes HEAD to the GET handlers.
* **A click with no user agent**: every browser sends one; SafeLinks often leaks an empty
  one (check.live-direct-marketing.online, "Bot clicks from security scanners: a field
  guide", which this module calls "the field guide"). An open without one is left alone
  (not a signal we found a source for).
* **A click within seconds of delivery** (:attr:`Policy.click_window`, from the later of the
  message's spooling and its delivery): gateways scan links during or right after delivery;
  "humans are not that fast" (the field guide: clicks within 5 s of delivery are scanner
  noise). The window is 2 s by default, well inside that, since a person waiting for a
  sign-in link can be quick; settings ``tracking.machineClickWindow``, 0 turns it off.
* **A burst of links**: several different links of one message clicked within the same
  second (:attr:`Policy.burst_links` distinct links within :attr:`Policy.burst_window`):
  scanners click every link at once (the field guide; Marketo's "click on all links ... before
  delivering"). Three, not two: a person can middle-click two links into tabs within a
  second.

Not machine: **GoogleImageProxy** (``via ggpht.com GoogleImageProxy``) and Yahoo's
``YahooMailProxy`` fetch images when the person opens the message, on their behalf
(googlesystem.blogspot.com, "More About Gmail's Proxy": "images are only loaded when you open
a message"), so such an open is a person's open seen through a proxy; it is counted.
``MicrosoftPreview``/``BingPreview`` are not in that class: they fetch to build previews.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final


class HitKind(StrEnum):
    OPEN = "open"
    CLICK = "click"


@dataclass(frozen=True)
class Policy:
    """The tunable part (``click_window`` comes from the settings)."""

    click_window: float = 2.0  # seconds after delivery; 0: the timing rule is off
    burst_window: float = 1.0  # seconds
    burst_links: int = 3  # distinct links of one message within burst_window


@dataclass(frozen=True)
class Hit:
    """One request to ``/o`` or ``/c`` and what the relay knows about its message."""

    kind: HitKind
    method: str
    user_agent: str | None
    at: float  # seconds since the epoch, the relay's clock
    delivered_at: float | None = None  # the later of spooled and delivered, if known
    link: int = 0  # the link's index in its message (clicks)
    # Other clicks of the same message near ``at``: (time, link index), for the burst rule.
    nearby: Sequence[tuple[float, int]] = ()


@dataclass(frozen=True)
class Verdict:
    machine: bool
    reason: str | None = None  # short, for logs: what made it a machine's
    rule: str | None = None  # which rule: one of RULES (a metric label)


RULES: Final = ("user-agent", "privacy-proxy", "head", "no-user-agent", "after-delivery", "burst")


HUMAN: Final = Verdict(False)

# (name for the reason, pattern, source). Matched case-insensitively anywhere in the user
# agent, as whole words where a short token could occur inside another word.
SCANNERS: Final[tuple[tuple[str, re.Pattern[str], str], ...]] = tuple(
    (name, re.compile(pattern, re.IGNORECASE), source)
    for name, pattern, source in (
        (
            "BingPreview",
            r"BingPreview",
            "Bing's page snapshots, used by Outlook and Microsoft Defender SafeLinks previews "
            "(matomo-org/device-detector#5128)",
        ),
        (
            "MicrosoftPreview",
            r"MicrosoftPreview",
            "BingPreview's successor (aka.ms/MicrosoftPreview; monperrus/crawler-user-agents)",
        ),
        ("Barracuda", r"Barracuda", "Barracuda Link Protection (the field guide)"),
        ("Proofpoint", r"Proofpoint", "Proofpoint URL Defense (the field guide)"),
        ("Mimecast", r"Mimecast", "Mimecast URL Protect, when it names itself"),
        (
            "Cisco Secure Email",
            r"CiscoSecureEmail|IronPort",
            "Cisco Secure Email / IronPort (the field guide)",
        ),
        ("Trend Micro", r"\bTMES\b|Trend ?Micro", "Trend Micro Email Security (the field guide)"),
        ("FortiMail", r"FortiMail|FortiGuard", "Fortinet's mail gateway (the field guide)"),
        (
            "HeadlessChrome",
            r"HeadlessChrome",
            "headless browsers of URL sandboxes; a person's Chrome never says it",
        ),
    )
)

# Apple Mail Privacy Protection's image fetches (see the module docstring).
MPP_USER_AGENT: Final = "Mozilla/5.0"


# Remembered per user agent (a few browsers make most hits; nine searches each were most of
# the cost of recording a hit), for at most 1,024 of them (each at most 512 characters).
@functools.lru_cache(maxsize=1024)
def scanner(user_agent: str) -> str | None:
    """The scanner ``user_agent`` names (a :data:`SCANNERS` name), or None."""
    for name, pattern, _source in SCANNERS:
        if pattern.search(user_agent):
            return name
    return None


def _burst(hit: Hit, policy: Policy) -> bool:
    """Whether ``hit`` is one of ``burst_links`` distinct links clicked within a window."""
    if policy.burst_links < 2 or not hit.nearby:
        return False
    clicks = sorted([*hit.nearby, (hit.at, hit.link)])
    for start, _ in clicks:
        if not hit.at - policy.burst_window <= start <= hit.at:
            continue
        links = {link for at, link in clicks if start <= at <= start + policy.burst_window}
        if len(links) >= policy.burst_links:
            return True
    return False


def classify(hit: Hit, policy: Policy = Policy()) -> Verdict:
    """Whether ``hit`` is a machine's, and why. Total: never raises on any field value."""
    user_agent = (hit.user_agent or "").strip()
    if hit.method.upper() == "HEAD":
        return Verdict(True, "HEAD request", "head")
    named = scanner(user_agent) if user_agent else None
    if named is not None:
        return Verdict(True, f"user agent: {named}", "user-agent")
    if hit.kind is HitKind.OPEN:
        if user_agent == MPP_USER_AGENT:
            return Verdict(True, "Apple Mail Privacy Protection", "privacy-proxy")
        return HUMAN
    if not user_agent:
        return Verdict(True, "no user agent", "no-user-agent")
    if (
        policy.click_window > 0
        and hit.delivered_at is not None
        and hit.at - hit.delivered_at < policy.click_window
    ):
        return Verdict(True, "clicked within seconds of delivery", "after-delivery")
    if _burst(hit, policy):
        return Verdict(True, "several links clicked at once", "burst")
    return HUMAN
