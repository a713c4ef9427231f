"""Command-line interface: a thin layer over the library.

Every command module registers on :data:`rsitr.cli._app.app`. Errors derived from
:class:`rsitr.errors.RsitrError` (and bad-input ``OSError`` raised at the edges) become one
line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from rsitr.cli import data, index, protocol, quickstart, serve, synth, train  # noqa: F401  (register commands)
from rsitr.cli._app import app
from rsitr.errors import RsitrError


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` and return the exit code (0 ok, 2 bad input or usage)."""
    try:
        rc = app(args=list(argv) if argv is not None else None, standalone_mode=False)
    except click.exceptions.Exit as e:
        return int(e.exit_code or 0)
    except click.ClickException as e:
        e.show()
        return 2
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except (RsitrError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return rc if isinstance(rc, int) else 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())


__all__ = ["app", "main", "run"]
