"""``psp-zoo predict``: segment images into palette PNGs, overlays and legends (or npy, Cityscapes files)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import PspZooError, one_line
from . import _options


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..prediction.pictures import IMAGE_EXTENSIONS, OUTPUT_FORMATS

    parser = subparsers.add_parser(
        "predict", help="segment images: palette PNG, overlay and legend per image",
        description="Segment images with a checkpoint through its own test pipeline (resize, whole or "
                    "sliding-window inference, align_corners). For each image writes <stem>_labels.png "
                    "(class ids as pixel values, in the dataset's palette), <stem>_overlay.png and "
                    "<stem>_legend.png, or <stem>.npy with --format npy, and prints the written paths. "
                    "An image that fails (unreadable, out of memory, ...) is reported on one line naming it "
                    "and the rest are done; the exit code is then 1.")
    _options.add_name_argument(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help=f"image files, folders (their {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} "
                             f"images) or quoted globs ('**' recurses)")
    parser.add_argument("--out", metavar="DIR", default="predictions", help="output folder (default: predictions)")
    parser.add_argument("--format", choices=OUTPUT_FORMATS, default="png",
                        help="png: labels, overlay and legend pictures; npy: raw H x W uint8 labels; "
                             "cityscapes: Cityscapes benchmark files, the official labelIds in a greyscale "
                             "PNG named like the image (<city>_<seq>_<frame>_leftImg8bit.png)")
    parser.add_argument("--ms-flip", action="store_true",
                        help=f"multi-scale + flip test-time augmentation "
                             f"({_options.MS_FLIP_COST}; {_options.SEMSEG_MS})")
    _options.add_device_option(parser)
    _options.add_checkpoint_option(parser)
    _options.add_fetch_options(parser)
    _options.add_speed_options(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..prediction.predictor import Predictor, expand_image_args, predict_files

    paths = expand_image_args(args.images, args.out)  # every argument is checked before work starts
    _options.check_writable_folder(Path(args.out), "--out", args.out)
    if args.format == "cityscapes":  # refused before a checkpoint is downloaded, not after
        _check_cityscapes_format(args)
    with _options.progress_messages(quiet=False):
        predictor = Predictor.create(args.name, ms_flip=args.ms_flip, device=args.device,
                                     checkpoint=args.checkpoint, fetch=_options.fetch_options(args),
                                     speed=_options.speed_options(args))
    _say_renamed(paths)
    failed = 0
    with _options.progress_messages(quiet=False):
        for path, outcome in predict_files(predictor, paths, args.out, args.format):
            if isinstance(outcome, PspZooError):
                failed += 1
                print(f"psp-zoo predict: error: {one_line(outcome)}", file=sys.stderr, flush=True)
            else:
                print(" ".join(map(str, outcome)), flush=True)
    return _options.EXIT_FAILED if failed else 0


def _say_renamed(paths: list) -> None:
    """Name the output stem of every input whose own name collides with another input's."""
    from ..prediction.predictor import output_stems

    for path, stem in zip(paths, output_stems(paths)):
        if stem != path.stem:
            print(f"psp-zoo predict: note: {path} is written as {stem}* (another input has the same name)",
                  file=sys.stderr, flush=True)


def _check_cityscapes_format(args: argparse.Namespace) -> None:
    from ..manifest.loading import get_checkpoint
    from ..prediction.predictor import check_output_format

    entry = get_checkpoint(args.name, manifest=args.manifest)
    try:
        check_output_format("cityscapes", entry.dataset, entry.num_classes)
    except PspZooError as exc:
        raise PspZooError(f"--format cityscapes: {args.name}: {exc}") from None
