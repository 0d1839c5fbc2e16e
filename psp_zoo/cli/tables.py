"""``psp-zoo tables``: the published results tables, with reproduced numbers beside them."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from ..errors import PspZooError
from ..results.records import DEFAULT_RESULTS_DIR
from . import _options


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "tables", help="regenerate the published results tables, with reproduced numbers",
        description="Print one table per dataset in the published layout. With results "
                    "(written by `psp-zoo reproduce`), measured cells read "
                    "'published / reproduced (difference)' and each row names its device.")
    parser.add_argument("--results", metavar="DIR", default=None,
                        help=f"results folder (default: ./{DEFAULT_RESULTS_DIR} if it exists, "
                             f"else the published tables alone)")
    _options.add_manifest_option(parser)
    parser.add_argument("--format", choices=("md", "csv", "json"), default="md",
                        help="output format (default md; csv/json put numbers in separate columns)")
    parser.add_argument("--update", metavar="FILE",
                        help="rewrite the tables between the psp-zoo marker comments of FILE "
                             "(e.g. README.md) instead of printing them")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw mIoU against fps into FILE.png")
    return parser


def run(args: argparse.Namespace) -> int:
    from ..results.records import read_results
    from ..results.tables import build_tables, plot, render, update_readme

    if args.update and args.format != "md":
        raise PspZooError("--update writes Markdown; drop --format or use --format md")
    results_dir = args.results
    if results_dir is None and Path(DEFAULT_RESULTS_DIR).is_dir():
        results_dir = DEFAULT_RESULTS_DIR
    if args.plot:  # a plot that cannot be written is said before the tables are built
        _options.check_writable_folder(Path(args.plot).parent, "--plot", args.plot)
    results = read_results(results_dir) if results_dir is not None else []
    if results_dir is not None and not results:
        print(f"psp-zoo tables: warning: no results files in {results_dir}; showing the published tables alone",
              file=sys.stderr)
    text = render(build_tables(args.manifest, results), args.format)
    if args.update:
        update_readme(args.update, text)
        print(f"updated the tables in {args.update} ({len(results)} result file(s))")
    if args.plot:
        print(f"wrote {_plot_to(args.plot, lambda: plot(results, args.plot, manifest=args.manifest))}")
    if not args.update and not args.plot:
        sys.stdout.write(text)
    return 0


def _plot_to(requested: str, draw: Callable[[], Path]) -> Path:
    """Run ``draw``; a refused write names the file the user asked for, not a temporary one."""
    try:
        return draw()
    except OSError as exc:
        raise PspZooError(f"--plot {requested}: cannot write it: {exc.strerror or exc}; choose another "
                          f"file") from None
