"""``psp-zoo train``: a checkpoint's published training recipe, on one process or under torchrun."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import _finetune, _options

# recipe fields settable by their own option (the rest: --set FIELD=VALUE)
_OVERRIDES = {
    "max_iters": (int, "iterations of the run (the intervals follow: max_iters / 10)"),
    "lr": (float, "base learning rate of the schedule"),
    "batch_size": (int, "images per process per step (published: 2 for Cityscapes, 4 elsewhere)"),
    "gpus": (int, "processes of the published run (4); the total batch is batch size x gpus"),
    "eval_interval": (int, "validate every N iterations"),
    "checkpoint_interval": (int, "write a checkpoint every N iterations"),
    "log_interval": (int, "a train line in the log every N iterations (published: 50)"),
    "weight_decay": (float, "weight decay of every parameter"),
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train a checkpoint's network with its published recipe (resumable, torchrun)",
        description="Train the network of a manifest entry with the recipe that produced the published "
                    "file (psp-zoo info NAME shows it): ImageNet backbone, crops, schedule, optimizer, "
                    "validation and a checkpoint every max_iters / 10 iterations. Writes iter_N.pth in "
                    "the published format, latest.pth / best.pth pointers and an mmseg .log.json into "
                    "--work-dir; rerunning into the same --work-dir resumes. Under torchrun "
                    "(torchrun --nproc_per_node N -m psp_zoo train ...) the processes share each batch "
                    "with synchronized BatchNorm. Ctrl-C saves a checkpoint and exits 130.")
    _options.add_name_argument(parser, optional=True)  # fine-tuning: --from SOURCE stands for it
    _options.add_data_root_option(parser)
    parser.add_argument("--work-dir", required=True, metavar="DIR", help="where checkpoints and the log go")
    _options.add_device_option(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the crops, flips and dropout (default 0)")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                        help="continue from --work-dir's latest.pth (default: when there is one); "
                             "--no-resume starts afresh")
    parser.add_argument("--init-from", metavar="FILE", help="start from this checkpoint's weights instead of "
                                                            "the ImageNet backbone")
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                        help="no ImageNet backbone: mmcv's initialization alone")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision on CUDA (default: the fp16 row's recipe only)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--float64", action="store_true",
                        help="train in float64: slow, free of float32 rounding (for exact comparisons)")
    _options.add_workers_option(parser)
    _add_recipe_options(parser)
    _options.add_fetch_options(parser)
    _finetune.add_finetune_options(parser)
    return parser


def _add_recipe_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("recipe overrides (default: the published recipe)")
    for field, (kind, text) in _OVERRIDES.items():
        group.add_argument(f"--{field.replace('_', '-')}", dest=field, type=kind, metavar="N" if kind is int else "X",
                           help=text)
    group.add_argument("--crop-size", nargs="+", type=int, metavar="N", help="H W, or one number for a square")
    group.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="any recipe field, e.g. --set optimizer=adamw --set steps=[600,800] (YAML values)")


def overrides(args: argparse.Namespace) -> dict:
    """The recipe fields the command line sets."""
    import yaml

    from ..errors import PspZooError

    values = {field: getattr(args, field) for field in _OVERRIDES if getattr(args, field) is not None}
    if args.crop_size:
        if len(args.crop_size) > 2:
            raise PspZooError(f"--crop-size takes H W or one number, got {' '.join(map(str, args.crop_size))}")
        values["crop_size"] = tuple(args.crop_size) if len(args.crop_size) == 2 else args.crop_size[0]
    for item in args.set:
        field, sep, text = item.partition("=")
        if not sep or not field.strip():
            raise PspZooError(f"--set {item}: expected FIELD=VALUE, e.g. --set optimizer=adamw")
        try:
            values[field.strip().replace("-", "_")] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise PspZooError(f"--set {item}: {text!r} is not a value (a number, a word, [a, b] or null)") from None
    return values


def run(args: argparse.Namespace) -> int:
    from ..training.loop import train

    _finetune.check_finetune_options(args)
    if args.source is not None:
        return _finetune.run_finetune(args, overrides(args), device=args.device, seed=args.seed, resume=args.resume,
                                      num_workers=args.num_workers, amp=args.amp, channels_last=args.channels_last,
                                      compile=args.compile)
    result = None
    with _options.progress_messages(quiet=False):
        result = train(args.name, data_root=args.data_root, work_dir=args.work_dir, device=args.device,
                       seed=args.seed, resume=args.resume, init_from=args.init_from, pretrained=args.pretrained,
                       num_workers=args.num_workers, amp=args.amp, channels_last=args.channels_last,
                       compile=args.compile, float64=args.float64, fetch=_options.fetch_options(args),
                       **overrides(args))
    if result.log is not None:  # process 0 of a torchrun job, or a run alone
        best = f", best mIoU {result.best_miou:.2f} ({Path(result.best).name})" if result.best_miou is not None else ""
        print(f"trained {result.iterations} iterations: {result.checkpoint}{best}; log {result.log}")
    sys.stdout.flush()
    return 0
