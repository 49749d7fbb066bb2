"""What the relay benchmarks share: their command lines' parser and argument types, and the
relay's settings and credentials file for a relay that delivers to a local smarthost (a
smtp-sink). The benchmarks put tests/ on ``sys.path`` before importing this module."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from relay.relaykit import credential


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``PROG: message (see --help)``)."""

    def error(self, message: str) -> NoReturn:
        """One line, not the usage block."""
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def at_least(low: int) -> Callable[[str], int]:
    """An argument type: a whole number of at least ``low``."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not at least {low}")
        return value

    return convert


def write_credentials(path: Path, user: str, password: str) -> None:
    """A credentials file (``credentialFiles``) with one entry: ``user`` and ``password``."""
    path.write_text(json.dumps([json.loads(credential(user, password).to_json())]))
