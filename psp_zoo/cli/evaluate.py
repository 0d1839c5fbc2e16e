"""``psp-zoo evaluate``: score one checkpoint on a validation set, as the reference does."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import _options


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate", help="score one checkpoint on a validation set, as the reference",
        description="Evaluate one manifest checkpoint (single-scale, or --ms-flip) "
                    "and print aAcc, mIoU, mAcc and per-class IoU and Acc in percent.")
    _options.add_name_argument(parser)
    _options.add_data_root_option(parser)
    parser.add_argument("--dataset", metavar="DATASET",
                        help="score on another dataset the checkpoint is published on (e.g. dark_zurich)")
    _options.add_checkpoint_option(parser)
    parser.add_argument("--ms-flip", action="store_true",
                        help=f"multi-scale + flip test instead of single-scale ({_options.MS_FLIP_COST}; "
                             f"{_options.SEMSEG_MS})")
    parser.add_argument("--onnx", metavar="FILE", default=None,
                        help="score this ONNX file (written by `psp-zoo export`) with onnxruntime instead of "
                             "the PyTorch model; needs pip install 'psp-zoo[onnx]'")
    parser.add_argument("--threads", type=_options.int_at_least(1), metavar="N", default=None,
                        help="CPU threads for PyTorch and onnxruntime (default: torch's, from OMP_NUM_THREADS "
                             "or the core count)")
    parser.add_argument("--limit", type=_options.int_at_least(1), metavar="N",
                        help="only the first N images (sorted)")
    _options.add_device_option(parser)
    _options.add_workers_option(parser)
    parser.add_argument("--json", metavar="FILE", help="also write the result record (the results-file format)")
    _options.add_fetch_options(parser)
    _options.add_speed_options(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..evaluation.evaluator import evaluate
    from ..results.records import write_result
    from ..results.reports import describe_run, per_class_text, undefined

    if args.json:  # an hour of evaluation must not end in a path typo
        _options.check_writable_folder(Path(args.json).parent, "--json", args.json)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    with _options.progress_messages(quiet=False):
        record = evaluate(args.name, args.data_root, dataset=args.dataset, ms_flip=args.ms_flip,
                          limit=args.limit, device=args.device, checkpoint=args.checkpoint,
                          num_workers=args.num_workers, fetch=_options.fetch_options(args),
                          speed=_options.speed_options(args), onnx=args.onnx, threads=args.threads)
    print(describe_run(record))
    sys.stdout.write(per_class_text(record.metrics))
    if undefined(record.metrics.aacc) and record.images.count > 0:
        print(f"psp-zoo evaluate: warning: no labelled pixel was scored in the {record.images.count} image(s): "
              f"every label is ignored (255) or outside the checkpoint's {len(record.metrics.per_class)} "
              f"classes, so aAcc and mIoU mean nothing; check the label files and --dataset", file=sys.stderr)
    if args.json:
        write_result(record, args.json)
    return 0
