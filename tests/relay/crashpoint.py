"""``txmail-relay`` that kills itself with SIGKILL at a chosen point of its first delivery:
the fault-injection seam of tests/relay/test_outcome_crash.py (a point that timing alone
would hardly ever hit). The relay's own code is unchanged; this wraps the spool's DONE write.

    python crashpoint.py {before-done|after-done} --config relay.yaml

``before-done``: as the spool is asked to cross the delivered recipients off (the records
have the outcomes already, the spool does not); ``after-done``: once it has (durable), before
anything else hears of the outcomes.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping

from txmail_relay.__main__ import main
from txmail_relay.outcomes import Outcome
from txmail_relay.spool.segments import Spool, SpooledMessage

POINTS = ("before-done", "after-done")


def install(point: str) -> None:
    record = Spool.record

    async def crashing(self: Spool, msg: SpooledMessage, outcomes: Mapping[int, Outcome]) -> bool:
        if point == "before-done":
            os.kill(os.getpid(), signal.SIGKILL)
        durable = await record(self, msg, outcomes)
        os.kill(os.getpid(), signal.SIGKILL)
        return durable  # never reached

    Spool.record = crashing  # type: ignore[method-assign]


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in POINTS:
        sys.exit(f"usage: crashpoint.py {{{'|'.join(POINTS)}}} --config FILE")
    install(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
