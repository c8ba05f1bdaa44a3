"""What the ``caravan`` command says about a bad argument or environment variable: one line on stderr, exit 2,
as argparse does."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from control.ids import is_digits

__all__ = ["env_port", "port", "usage"]


def usage(message: str) -> NoReturn:
    """Bad input from the operator (an argument or an environment variable): exit 2, as argparse does."""
    print(f"caravan: {message}", file=sys.stderr)
    sys.exit(2)


def port(text: str) -> int:
    """An argparse type: a TCP port number."""
    number = int(text) if is_digits(text.strip()) else 0
    if not 1 <= number <= 65_535:
        raise argparse.ArgumentTypeError(f"not a port number (1-65535): {text!r}")
    return number


def env_port(variable: str, default: int) -> int:
    """The port an environment variable names, ``default`` when it is unset; bad usage when it names none."""
    try:
        return port(os.environ[variable]) if variable in os.environ else default
    except argparse.ArgumentTypeError as exc:
        usage(f"{variable}: {exc}")
