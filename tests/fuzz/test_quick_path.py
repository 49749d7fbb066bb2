"""Property: the relay's fast MAIL/RCPT address reader (ingress/smtp.py ``quick_getaddr``)
gives aiosmtpd's answer (its ``_getaddr``, the stdlib's RFC 5322 parser) wherever it answers,
and answers for the common ``<local@domain> PARAMS`` form the clients send."""

from __future__ import annotations

from typing import cast

from aiosmtpd.smtp import SMTP
from hypothesis import example, given
from hypothesis import strategies as st

from txmail_relay.ingress.smtp import quick_getaddr

ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
# Everything the stdlib parser treats specially, white space of several kinds, non-ASCII.
HOSTILE = ATEXT + ' .@<>()[]\\",:;\t\r\n\x0b\x0c\x00\x7f\xa0\u3000\u2028é\udcff=?'


class _NoLimit:
    local_part_limit = 0


def aiosmtpd_getaddr(arg: str) -> tuple[str | None, str | None]:
    """aiosmtpd's own reading (the relay treats any exception from it as malformed)."""
    try:
        return SMTP._getaddr(cast(SMTP, _NoLimit()), arg)
    except Exception:
        return None, None


atoms = st.text(alphabet=ATEXT, min_size=1, max_size=8)
local_parts = st.lists(atoms, min_size=1, max_size=4).map(".".join)
labels = st.text(alphabet="abcXYZ019-", min_size=1, max_size=8)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)
params = st.sampled_from(
    ["", " SIZE=2048", "  BODY=8BITMIME SIZE=1", "\tSIZE=1", "SIZE=1", " NOTIFY=NEVER", " "]
)
common = st.builds(lambda lp, d, p: f"<{lp}@{d}>{p}", local_parts, domains, params)
# The common form with hostile text spliced in somewhere, and wholly generated text.
spliced = st.builds(
    lambda path, at, junk: path[:at] + junk + path[at:],
    common,
    st.integers(min_value=0, max_value=40),
    st.text(alphabet=HOSTILE, max_size=6),
)
anything = st.one_of(common, spliced, st.text(alphabet=HOSTILE, max_size=40))


@given(anything)
@example("<a@b.c> (comment) SIZE=1")
@example("<=?utf-8?q?a?=@b.c>")
@example("<a..b@c.d>")
@example("<a@b.c>\xa0SIZE=1")
@example("<a@b.c> \x0bSIZE=1")
@example("<a@[127.0.0.1]>")
@example('<"a b"@c.d>')
@example("<@route:a@b.c>")
@example("<>")
def test_the_quick_path_agrees_with_aiosmtpd(arg: str) -> None:
    quick = quick_getaddr(arg)
    if quick is not None:
        assert quick == aiosmtpd_getaddr(arg)


# A local part starting "=?" is an encoded word to the stdlib parser: the quick path leaves it
# to aiosmtpd by design (the agreement test above has it as an example).
plain_common = common.filter(lambda arg: not arg.startswith("<=?"))


@given(plain_common)
def test_the_common_form_takes_the_quick_path(arg: str) -> None:
    quick = quick_getaddr(arg)
    assert quick is not None
    assert quick == aiosmtpd_getaddr(arg)
