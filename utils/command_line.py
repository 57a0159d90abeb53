"""Pieces every command line shares: argparse value types, the settings part of ``--help``, a free port.

The error-to-exit-code edge itself is :func:`error_handler.run_command` (with ``fail`` and
``exit_code_for``); the exit codes are the ``EXIT_*`` constants of ``error_handler``.
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Iterable
from pathlib import Path

from config import CONFIG_DIR, Settings, env_name


def command_parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """The parser of a command with an epilog of its own layout (exit codes, settings): ``prog`` as
    the user types it; description and epilog printed as written (argparse would re-wrap them)."""
    return argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number greater than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return value


def non_empty_text(text: str) -> str:
    """argparse type: text with its runs of white space folded to one space (none at either end),
    not empty: a label or an id typed with a stray space or newline is still the same one."""
    value = " ".join(text.split())
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def _default_text(name: str) -> str:
    default = Settings.model_fields[name].default
    project = CONFIG_DIR.parent
    if isinstance(default, Path) and default.is_absolute() and default.is_relative_to(project):
        default = default.relative_to(project)
    return str(default)


def settings_epilog(*, exclude: Iterable[str] = (), exclude_prefixes: tuple[str, ...] = ()) -> str:
    """``--help`` lines for the settings a command reads from the environment but has no flag for,
    generated from the settings' own descriptions and defaults (so a new setting shows up by itself)."""
    skipped = set(exclude)
    names = [n for n in Settings.model_fields if n not in skipped and not n.startswith(exclude_prefixes)]
    width = max((len(env_name(n)) for n in names), default=0)
    lines = ["other settings (environment or .env):"]
    for name in names:
        description = Settings.model_fields[name].description or ""
        lines.append(f"  {env_name(name):<{width}}  {description} [default: {_default_text(name)}]")
    return "\n".join(lines)


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that nothing listens on right now (bound, read, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
