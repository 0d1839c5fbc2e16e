"""``psp-zoo selftest``: check this installation end to end, offline."""
from __future__ import annotations

import argparse

from . import _options


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "selftest", help="check this installation end to end, offline",
        description="Prove the installation works without internet: print versions and devices, write a "
                    "tiny checkpoint in the published format, serve it from 127.0.0.1, download and verify "
                    "it into a temporary cache, evaluate it on a small dataset in the Cityscapes layout, "
                    "render a results table and a prediction. Each step prints ok or FAILED with the "
                    "reason; the exit code is 1 if any step did not pass. Your own caches, manifests "
                    "and results are never written.")
    parser.add_argument("--keep", metavar="DIR", default=None,
                        help="write everything into this new or empty folder and keep it (default: a "
                             "temporary folder, removed afterwards)")
    parser.add_argument("--port", type=_options.port, default=0,
                        help="port of the local server (default 0: any free port)")
    _options.add_device_option(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..selftest import run_selftest

    return _options.EXIT_FAILED if run_selftest(keep=args.keep, port=args.port, device=args.device) else 0
