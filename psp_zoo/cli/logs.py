"""``psp-zoo logs``: a checkpoint's published training log beside its published numbers."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import _options


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "logs", help="a checkpoint's training log beside its published mIoU and Mem (GB)",
        description="Fetch the training log published with a checkpoint (cached beside the checkpoints), "
                    "print its last and best validation mIoU and its peak training memory next to the "
                    "results table's mIoU and Mem (GB), and optionally plot loss and mIoU against the "
                    "training iteration. Reads mmseg 0.x .log.json and 1.x scalars.json logs.")
    _options.add_name_argument(parser)
    parser.add_argument("--log", metavar="PATH", nargs="+", action="extend",
                        help="a run's own log to hold against the table, drawn over the published log: its work "
                             "dir (every .log.json in it), or one or more .log.json files (a resumed run writes "
                             "one per launch; --log A B and --log A --log B both read A and B, as one run in "
                             "time order)")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw loss and mIoU against iteration into FILE.png")
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON")
    _options.add_fetch_options(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..manifest.loading import get_checkpoint
    from ..results.published_logs import (
        check_plotting,
        compare_with_table,
        plot_log,
        read_log,
        read_logs,
        render_comparison,
    )

    entry = get_checkpoint(args.name, manifest=args.manifest)
    if args.plot:  # refuse a plot that cannot be drawn or written before fetching anything
        check_plotting()
        _options.check_writable_folder(Path(args.plot).parent, "--plot", args.plot)
    schedule = _published_schedule(entry)
    log, published = (read_logs(args.log), _published_log(args, entry)) if args.log else (
        read_log(_fetched(args, entry), **schedule), None)
    report = compare_with_table(entry, log)
    if args.plot:
        report["plot"] = str(plot_log(log, args.plot, title=entry.name, published_miou=entry.published.miou,
                                      reference=published))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        sys.stdout.write(render_comparison(report))
        if args.plot:
            print(f"wrote {report['plot']}")
    return 0


def _fetched(args: argparse.Namespace, entry) -> Path:
    from ..results.published_logs import fetch_log

    with _options.progress_messages(quiet=False):
        return fetch_log(entry, fetch=_options.fetch_options(args))


def _published_log(args: argparse.Namespace, entry):
    """The published run's log to draw beneath a run's own, or None (said) where it cannot be had."""
    from ..errors import PspZooError
    from ..results.published_logs import read_log

    if not args.plot or entry.log_url is None:
        return None
    try:
        return read_log(_fetched(args, entry), **_published_schedule(entry))
    except PspZooError as exc:
        print(f"psp-zoo logs: warning: the published log is not drawn: {exc}", file=sys.stderr)
        return None


def _published_schedule(entry) -> dict:
    """The published run's schedule, which places the validations of an mmseg 0.x log that does not
    carry its config: mmseg's configs validate every max_iters / 10 iterations."""
    from ..training.recipe import default_interval

    return {"eval_interval": default_interval(entry.schedule), "max_iters": entry.schedule} if entry.schedule else {}
