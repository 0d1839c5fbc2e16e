"""``psp-zoo dataset check``: a dataset folder read as training and evaluation will, every problem listed."""
from __future__ import annotations

import argparse
import sys

from . import _options

SPLIT_NAMES = ("train", "val")  # psp_zoo.datasets.check.SPLITS, read without importing numpy


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "dataset", help="check a dataset folder against its declaration",
        description="Work on a dataset declared in the manifest (built in, or a user manifest's datasets: "
                    "classes, palette, ignore index, folders and suffixes of each split).")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=type(parser),
                                    help="check: read every image and label of the dataset folder")
    actions.required = True
    check = actions.add_parser(
        "check", help="count, pair and read every image and label; list each problem; class frequencies",
        description="Read a dataset folder as training and evaluation will (the layout's folders, suffixes "
                    "and split files; OpenCV images, Pillow labels, reduce_zero_label) and report: the "
                    "number of images and labels, images without a label, labels without an image, label "
                    "values that are neither a class nor the ignore index, labels whose size differs from "
                    "their image's and unreadable files, each naming the file, then how often each class "
                    "occurs. Exits 1 when a problem was found, 2 when the folder or declaration is unusable.")
    check.add_argument("data_root", metavar="DIR", help="the dataset folder, or a folder that contains it")
    check.add_argument("--dataset", required=True, metavar="DATASET",
                       help="the dataset's key in the manifest (e.g. one a --manifest file declares)")
    check.add_argument("--split", choices=SPLIT_NAMES, default=None,
                       help="one split only (default: every split the dataset declares)")
    _options.add_manifest_option(check)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..datasets.check import check_dataset

    splits = None if args.split is None else [args.split]
    checks = check_dataset(args.dataset, args.data_root, splits, manifest=args.manifest)
    for check in checks:
        print(check.describe(), flush=True)
    problems = sum(len(check.problems()) for check in checks)
    if problems:
        print(f"psp-zoo dataset check: {problems} problem{'s' if problems != 1 else ''} found in "
              f"{args.dataset} under {args.data_root} (listed above)", file=sys.stderr)
        return _options.EXIT_FAILED
    return 0
