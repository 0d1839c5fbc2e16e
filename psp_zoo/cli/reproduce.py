"""``psp-zoo reproduce``: re-evaluate and re-measure a dataset's checkpoints into results files."""
from __future__ import annotations

import argparse
import sys

from ..constants import MIN_SPEED_IMAGES
from ..results.records import DEFAULT_RESULTS_DIR
from . import _options


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "reproduce", help="re-evaluate and re-measure a dataset's checkpoints, write results files",
        description="For each checkpoint of the dataset: fetch, load, score single-scale and "
                    "ms+flip, measure fps and memory as published (the model as loaded, one sliding "
                    "window per call, TF32 off) and psp-zoo's own fps apart, write one results file per "
                    "checkpoint and device; a measuring step that fails keeps the scores and is retried "
                    "by the next run. Finished checkpoints are skipped and a killed run "
                    "resumes; under `torchrun --nproc_per_node N -m psp_zoo reproduce ...` the "
                    "images are shared out across the processes.")
    parser.add_argument("--dataset", metavar="DATASET", required=True,
                        help="cityscapes, ade20k, voc12aug, pascal_context, ...")
    _options.add_data_root_option(parser)
    parser.add_argument("--models", metavar="PATTERN", help="only names matching this shell wildcard")
    parser.add_argument("--no-ms-flip", dest="ms_flip", action="store_false",
                        help=f"skip the multi-scale + flip evaluation ({_options.MS_FLIP_COST})")
    parser.add_argument("--limit", type=_options.int_at_least(1), metavar="N",
                        help="only the first N images (sorted by name), for scores and speed")
    _options.add_device_option(parser)
    parser.add_argument("--results", metavar="DIR", default=DEFAULT_RESULTS_DIR,
                        help=f"results folder (default: ./{DEFAULT_RESULTS_DIR})")
    parser.add_argument("--force", action="store_true", help="redo checkpoints that have finished results")
    _options.add_workers_option(parser)
    parser.add_argument("--no-train-mem", dest="train_memory", action="store_false",
                        help="skip the training-memory step (slow on CPU for full-size models)")
    parser.add_argument("--speed-images", type=_options.int_at_least(MIN_SPEED_IMAGES), metavar="N",
                        help="images timed for fps, warm-up included (default: 200 on CUDA as "
                             "published, 20 on CPU; --limit bounds it)")
    parser.add_argument("--speed-warmup", type=_options.int_at_least(0), default=5, metavar="N",
                        help="untimed warm-up images (default 5)")
    parser.add_argument("--save-every", type=_options.int_at_least(1), default=50, metavar="N",
                        help="save the evaluation state every N images, for resuming (default 50)")
    _options.add_fetch_options(parser)
    _options.add_speed_options(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..evaluation.reproduction import reproduce
    from ..results.tables import summary

    with _options.progress_messages(quiet=False):
        report = reproduce(
            args.dataset, args.data_root, models=args.models, device=args.device,
            fetch=_options.fetch_options(args), speed=_options.speed_options(args),
            ms_flip=args.ms_flip, limit=args.limit, results_dir=args.results, force=args.force,
            num_workers=args.num_workers, speed_images=args.speed_images, speed_warmup=args.speed_warmup,
            train_memory=args.train_memory, save_every=args.save_every)
    if report.rank == 0:
        sys.stdout.write(summary(report.records, args.manifest))
        done = len(report.records) - len(report.failed)
        print(f"\n{done} of {len(report.records) + len(report.busy)} checkpoint(s) reproduced "
              f"({len(report.skipped)} already done, {len(report.busy)} busy in another run); "
              f"results in {args.results}", flush=True)
    if report.failed or report.busy:
        what = [f"failed: {', '.join(report.failed)}"] * bool(report.failed)
        what += [f"busy in another run: {', '.join(report.busy)}"] * bool(report.busy)
        print(f"psp-zoo reproduce: {'; '.join(what)}", file=sys.stderr)
        return _options.EXIT_FAILED
    return 0
