"""``psp-zoo list``: the published checkpoints, their numbers and cache state."""
from __future__ import annotations

import argparse

from . import _options


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "list", help="the published checkpoints, their numbers and cache state",
        description="One row per checkpoint in the manifest: dataset, backbone, crop size, schedule, the "
                    "published mIoU, ms+flip mIoU, Mem (GB) and fps, and whether its file is cached "
                    "(cached, missing, corrupt: wrong hash, partial: an interrupted download). "
                    "A --dataset or --pattern that selects nothing is an error.")
    parser.add_argument("--dataset", metavar="DATASET",
                        help="only this dataset (cityscapes, ade20k, voc12aug, pascal_context, ...)")
    parser.add_argument("--pattern", help="only names matching this shell wildcard, e.g. '*r101*'")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table",
                        help="table: Markdown for reading (default); csv and json: for programs")
    _options.add_manifest_option(parser)
    _options.add_cache_dir_option(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..results.reports import checkpoint_frame, render_checkpoints

    frame = checkpoint_frame(args.manifest, dataset=args.dataset, pattern=args.pattern, cache_dir=args.cache_dir)
    print(render_checkpoints(frame, args.format), end="")
    return 0
