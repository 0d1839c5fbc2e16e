"""``psp-zoo export``: write a checkpoint as ONNX, TorchScript or safetensors, optionally verified."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import PspZooError
from . import _options

FORMAT_NAMES = ("onnx", "torchscript", "safetensors")  # psp_zoo.deploy.export.FORMATS, read without torch


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export", help="write a checkpoint as ONNX (dynamic shapes), TorchScript or safetensors",
        description="Write the model (BN folded, fp32) as a file other runtimes load. ONNX and TorchScript "
                    "take a normalized NCHW float32 'input' and return 'logits' at the input's size; "
                    "by default one file serves any batch, height and width, pyramid pooling included. "
                    "safetensors writes the weights only, loadable with psp_zoo.load_checkpoint. "
                    "--verify compares the file's outputs with PyTorch on random inputs of several "
                    "sizes and exits 1 if they differ by more than 1e-4 (relative) or 0.01% of argmax.")
    _options.add_name_argument(parser)
    _options.add_checkpoint_option(parser)
    parser.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    parser.add_argument("--format", choices=FORMAT_NAMES, default="onnx",
                        help="default: onnx (needs pip install 'psp-zoo[onnx]')")
    parser.add_argument("--input-size", nargs=2, type=_options.int_at_least(1), metavar=("H", "W"), default=None,
                        help="example input traced (and the fixed size with --static); default: the "
                             "checkpoint's test crop")
    parser.add_argument("--static", action="store_true", help="ONNX graph fixed to 1 x 3 x H x W")
    parser.add_argument("--opset", type=_options.int_at_least(11), default=None, help="ONNX opset (default 17)")
    parser.add_argument("--plain-head", action="store_true",
                        help="ONNX: write the PSP head as the model computes it (the bottleneck conv over the "
                             "upsampled pyramid) instead of the default factorized head, the same logits "
                             "within rounding for about a fifth less arithmetic")
    parser.add_argument("--verify", action="store_true",
                        help="compare the written file with PyTorch; exit 1 on a mismatch")
    _options.add_fetch_options(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..deploy.export import check_format, export_file, export_model, verify_file

    if args.format != "onnx" and (args.static or args.opset is not None or args.plain_head):
        raise PspZooError(f"--static, --opset and --plain-head apply to --format onnx only, not {args.format}")
    # a bad opset or a missing extra is said before anything is downloaded
    check_format(args.format, dynamic=not args.static, opset=args.opset, plain_head=args.plain_head)
    _options.check_writable_folder(Path(args.out).parent, "--out", args.out)
    with _options.progress_messages(quiet=False):
        model, entry = export_model(args.name, checkpoint=args.checkpoint, fetch=_options.fetch_options(args))
    path = export_file(model, args.out, args.format, input_size=args.input_size, dynamic=not args.static,
                       opset=args.opset, entry=entry, plain_head=args.plain_head)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.format})", flush=True)
    if not args.verify:
        return 0
    report = verify_file(path, model, args.format, input_size=args.input_size, entry=entry)
    print(report.text(), flush=True)
    if not report.ok:
        print(f"psp-zoo export: error: {path} does not reproduce the PyTorch model's logits (see above); "
              f"do not deploy it", file=sys.stderr)
        return _options.EXIT_FAILED
    return 0
