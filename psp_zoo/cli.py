"""``psp-zoo`` command line: argparse front end; every command is a thin call into the modules.

A user mistake (``PspZooError``) is printed as one line on stderr with exit code 2; a command
that tried several things and some failed exits 1 after doing the rest.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, List, Optional

from . import __version__
from .errors import PspZooError
from .results import DEFAULT_RESULTS_DIR

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


def _register_tables(sub) -> None:
    parser = sub.add_parser(
        "tables", help="regenerate the published results tables, with reproduced numbers",
        description="Print the four dataset tables in the published layout. With results "
                    "(written by `psp-zoo reproduce`), measured cells read "
                    "'published / reproduced (difference)' and each row names its device.")
    parser.add_argument("--results", metavar="DIR", default=None,
                        help=f"results folder (default: ./{DEFAULT_RESULTS_DIR} if it exists, "
                             f"else the published tables alone)")
    _add_manifest_option(parser)
    parser.add_argument("--format", choices=("md", "csv", "json"), default="md",
                        help="output format (default md; csv/json put numbers in separate columns)")
    parser.add_argument("--update", metavar="FILE",
                        help="rewrite the tables between the psp-zoo marker comments of FILE "
                             "(e.g. README.md) instead of printing them")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw mIoU against fps into FILE.png")
    parser.set_defaults(func=_run_tables)


def _run_tables(args: argparse.Namespace) -> int:
    from .results import read_results
    from .tables import build_tables, plot, render, update_readme

    if args.update and args.format != "md":
        raise PspZooError("--update writes Markdown; drop --format or use --format md")
    results_dir = args.results
    if results_dir is None and Path(DEFAULT_RESULTS_DIR).is_dir():
        results_dir = DEFAULT_RESULTS_DIR
    results = read_results(results_dir) if results_dir is not None else []
    text = render(build_tables(args.manifest, results), args.format)
    if args.update:
        update_readme(args.update, text)
        print(f"updated the tables in {args.update} ({len(results)} result file(s))")
    if args.plot:
        print(f"wrote {plot(results, args.plot, manifest=args.manifest)}")
    if not args.update and not args.plot:
        sys.stdout.write(text)
    return 0


COMMANDS.append(_register_tables)


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
