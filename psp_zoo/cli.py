"""``psp-zoo`` command line: argparse front end; every command is a thin call into the modules.

A user mistake (``PspZooError``) is printed as one line on stderr with exit code 2; a command
that tried several things and some failed exits 1 after doing the rest.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, List, Optional

from . import __version__
from .errors import PspZooError

EXIT_FAILED = 1  # the command ran, but some of its work failed
EXIT_USAGE = 2   # bad input: nothing was done


def _add_manifest_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", metavar="FILE", action="append", default=None,
                        help="user manifest adding or overriding entries (repeatable; "
                             "default: $PSP_ZOO_MANIFEST)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psp-zoo",
        description="Fetch, run and re-measure the published mmsegmentation PSPNet checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"psp-zoo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for register in COMMANDS:
        register(sub)
    return parser


# Each entry adds one subcommand to the parser and sets ``func`` on its namespace.
COMMANDS: List[Callable] = []


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PspZooError as exc:
        print(f"psp-zoo {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"psp-zoo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
