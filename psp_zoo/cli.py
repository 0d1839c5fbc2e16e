"""``psp-zoo`` command line: argparse front end; every command is a thin call into the modules.

A user mistake (``PspZooError``) is printed as one line on stderr with exit code 2; a command
that tried several things and some failed exits 1 after doing the rest.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, List, Optional

from . import __version__
from .errors import PspZooError

EXIT_FAILED = 1  # the command ran, but some of its work failed
EXIT_USAGE = 2   # bad input: nothing was done


def _add_manifest_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", metavar="FILE", action="append", default=None,
                        help="user manifest adding or overriding entries (repeatable; "
                             "default: $PSP_ZOO_MANIFEST)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psp-zoo",
        description="Fetch, run and re-measure the published mmsegmentation PSPNet checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"psp-zoo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for register in COMMANDS:
        register(sub)
    return parser


def register_evaluate(sub) -> None:
    parser = sub.add_parser("evaluate", help="score one checkpoint on a validation set, as the reference",
                            description="Evaluate one manifest checkpoint (single-scale, or --ms-flip) "
                                        "and print aAcc, mIoU, mAcc and per-class IoU in percent.")
    parser.add_argument("model", help="manifest name, alias or weight file stem")
    parser.add_argument("--data-root", required=True, metavar="DIR",
                        help="the dataset folder or a folder containing it (e.g. data/)")
    parser.add_argument("--checkpoint", metavar="FILE", help="local weights file instead of the published one")
    parser.add_argument("--ms-flip", action="store_true", help="multi-scale + flip test (12 passes per image)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N images (sorted)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--workers", type=int, metavar="N", help="image decoding processes")
    parser.add_argument("--json", metavar="FILE", help="also write the full result as JSON")
    _add_manifest_option(parser)
    parser.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, write_result

    result = evaluate(args.model, args.data_root, ms_flip=args.ms_flip, limit=args.limit, device=args.device,
                      manifest=args.manifest, checkpoint=args.checkpoint, num_workers=args.workers)
    print(f"{result['model']} on {result['dataset']} ({result['num_images']} images, "
          f"{'ms+flip' if result['ms_flip'] else 'single-scale'}, {result['device']})")
    for name, iou in result["IoU"].items():
        print(f"  {name:<24} IoU {iou:6.2f}  Acc {result['Acc'][name]:6.2f}")
    print(f"aAcc {result['aAcc']:.2f}  mIoU {result['mIoU']:.2f}  mAcc {result['mAcc']:.2f}")
    if args.json:
        write_result(result, args.json)
    return 0


# Each entry adds one subcommand to the parser and sets ``func`` on its namespace.
COMMANDS: List[Callable] = [register_evaluate]


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PspZooError as exc:
        print(f"psp-zoo {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"psp-zoo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
