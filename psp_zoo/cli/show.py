"""``psp-zoo show``: one results file, per class, beside the published mIoU."""
from __future__ import annotations

import argparse
import sys

from . import _options


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "show", help="per-class IoU and Acc of one results file, beside the published mIoU",
        description="Print a results file (written by `psp-zoo reproduce` or `evaluate --json`): per-class "
                    "IoU and Acc in percent, single-scale and ms+flip side by side, then aAcc, mIoU and "
                    "mAcc, and the published mIoU beside the reproduced one where the manifest has the "
                    "checkpoint. The model zoo published no per-class numbers, so only the dataset-level "
                    "mIoU can be compared.")
    parser.add_argument("results_file", metavar="RESULTS.json", help="a results file")
    _options.add_manifest_option(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..results.records import read_result
    from ..results.reports import show_text

    sys.stdout.write(show_text(read_result(args.results_file), args.manifest))
    return 0
