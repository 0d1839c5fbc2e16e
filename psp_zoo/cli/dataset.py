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
                                    help="check: read every image and label of the dataset folder; example: "
                                         "write the fine-tuning walk-through's example")
    actions.required = True
    check = actions.add_parser(
        "check", help="count, pair and read every image and label; list each problem; class frequencies",
        description="Read a dataset folder as training and evaluation will (the layout's folders, suffixes "
                    "and split files; OpenCV images, Pillow labels, reduce_zero_label) and report: the "
                    "number of images and labels, images without a label, labels without an image, label "
                    "values that are neither a class nor the ignore index, labels whose size differs from "
                    "their image's and unreadable files, each naming the file, then how often each class "
                    "occurs. The declaration is checked whole, its train: block as train reads it. Exits 1 when a "
                    "problem was found, 2 when the folder or declaration is unusable. train finds the same "
                    "problems before its first iteration and refuses to start.")
    check.add_argument("data_root", metavar="DIR", help="the dataset folder, or a folder that contains it")
    check.add_argument("--dataset", required=True, metavar="DATASET",
                       help="the dataset's key in the manifest (e.g. one a --manifest file declares)")
    check.add_argument("--split", choices=SPLIT_NAMES, default=None,
                       help="one split only (default: every split the dataset declares)")
    _options.add_manifest_option(check)
    example = actions.add_parser(
        "example", help="write the fine-tuning walk-through's example dataset, declaration and starting checkpoint",
        description="Write the example of docs/finetune.md into a new or empty folder DIR, offline: 96x96 "
                    "pictures of discs and squares with their masks (DIR/images, DIR/masks; 3 classes), the "
                    "dataset's declaration DIR/shapes.yml (a user manifest, key 'shapes') and "
                    "DIR/tiny_pspnet_r18-d8.pth, a 5-class tiny-width R-18-D8 in the published file format to "
                    "fine-tune from (train --from DIR/tiny_pspnet_r18-d8.pth) where no published checkpoint "
                    "can be downloaded.")
    example.add_argument("folder", metavar="DIR", help="a new or empty folder")
    example.add_argument("--train-images", type=_options.int_at_least(1), default=64, metavar="N",
                         help="training images (default 64; 8 validation images)")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.action == "example":
        return _example(args)
    from ..datasets.check import check_dataset
    from ..datasets.readers import dataset_spec
    from ..training.recipe import check_dataset_train

    check_dataset_train(dataset_spec(args.dataset, args.manifest))  # the whole declaration, as train reads it
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


def _example(args: argparse.Namespace) -> int:
    from ..testing import write_example

    written = write_example(args.folder, train=args.train_images)
    print(f"wrote {written['dataset'] / 'images'}, {written['dataset'] / 'masks'}, the declaration "
          f"{written['manifest']} and the starting checkpoint {written['checkpoint']}")
    return 0
