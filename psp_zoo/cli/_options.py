"""What several commands share: exit codes, option helpers (so every command names, shows and
explains an option the same way), the options objects built from them, and the progress log."""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..errors import PspZooError

EXIT_FAILED = 1  # the command ran, but some of its work failed
EXIT_USAGE = 2   # bad input: nothing was done
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT

MS_FLIP_COST = "about 13x the single-scale time: 12 model passes, most at larger scales"
#: What --ms-flip means for an entry on the PSPNet authors' protocol (test mode 'semseg').
SEMSEG_MS = "the PSPNet authors' checkpoints: their six scales 0.5-1.75, their single scale being flipped too"


# --------------------------------------------------------------------------------------------
# argparse types


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value
    return parse


def port(text: str) -> int:
    """An argparse type: a TCP port number, 0 meaning any free port."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {text!r}")
    return value


# --------------------------------------------------------------------------------------------
# shared options


def add_name_argument(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    """The checkpoint NAME positional; ``optional`` where another option can stand for it (train --from)."""
    parser.add_argument("name", nargs="?" if optional else None, default=None,
                        help="checkpoint name, alias (mmseg 1.x config name) or weight file stem")


def add_checkpoint_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", metavar="FILE", default=None,
                        help="load this local weights file instead of the published one")


def add_data_root_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", required=True, metavar="DIR",
                        help="the dataset folder, or a folder that contains it")


def add_workers_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-workers", type=int_at_least(0), metavar="N",
                        help="image decoding processes (default: a few, 0 = decode in this process)")


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", metavar="DEVICE", default=None,
                        help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def add_manifest_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", metavar="FILE", action="append", default=None,
                        help="user manifest adding or overriding entries (repeatable; "
                             "default: $PSP_ZOO_MANIFEST)")


def add_cache_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", metavar="DIR", default=None,
                        help="checkpoint cache (default: $PSP_ZOO_HOME, else torch.hub's checkpoints folder)")


def add_fetch_options(parser: argparse.ArgumentParser) -> None:
    """Where checkpoint files come from: the manifest, a mirror, offline, the cache folder."""
    add_manifest_option(parser)
    parser.add_argument("--mirror", metavar="BASE", default=None,
                        help="base URL replacing https://download.openmmlab.com/ (default: $PSP_ZOO_MIRROR)")
    parser.add_argument("--offline", action="store_true",
                        help="use only the cache, never the network (default: $PSP_ZOO_OFFLINE)")
    add_cache_dir_option(parser)


def fetch_options(args: argparse.Namespace, quiet: Optional[bool] = None):
    """The command's --manifest, --cache-dir, --mirror and --offline as one FetchOptions."""
    from ..hub.options import FetchOptions

    return FetchOptions(manifest=args.manifest, cache_dir=args.cache_dir, mirror=getattr(args, "mirror", None),
                        offline=True if getattr(args, "offline", False) else None, quiet=quiet)


def add_speed_options(parser: argparse.ArgumentParser) -> None:
    """How the loaded model is prepared (psp_zoo.optimize); the default is the exact fp32 fast path."""
    from ..hub.options import PRECISIONS

    group = parser.add_argument_group("inference speed (default: fp32 with BN folded into convs, "
                                      "factorized PSP head, Winograd 3x3 convs on the CPU, channels-last; "
                                      "within 1e-5 of the plain model, relative)")
    group.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                       help="bf16: CUDA or a CPU with native bf16; fp16: CUDA only. Not fp32 = not the "
                            "reference numerics; recorded in results")
    group.add_argument("--compile", action="store_true", help="torch.compile (inductor) the model")
    group.add_argument("--no-fuse-bn", dest="fuse_bn", action="store_false", help="keep BN layers separate")
    group.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                       help="run in the default NCHW memory format")
    group.add_argument("--no-factorize-head", dest="factorize_head", action="store_false",
                       help="convolve the upsampled pyramid as the reference does")
    group.add_argument("--no-winograd", dest="winograd", action="store_false",
                       help="direct 3x3 convs on the CPU instead of Winograd F(4x4, 3x3)")


def speed_options(args: argparse.Namespace):
    """The command's speed options as one SpeedOptions."""
    from ..hub.options import SpeedOptions

    return SpeedOptions(precision=args.precision, compile=args.compile, fuse_bn=args.fuse_bn,
                        channels_last=args.channels_last, factorize_head=args.factorize_head,
                        winograd=args.winograd)


# --------------------------------------------------------------------------------------------
# checks and messages


def check_writable_folder(folder: Path, option: str, given: str) -> None:
    """Refuse an output folder that cannot be created or written, before any work is done."""
    from ..files import check_writable_folder as check

    try:
        check(folder, option)
    except PspZooError as exc:
        raise PspZooError(f"{option} {given}: {exc}") from None


@contextlib.contextmanager
def main_process_messages() -> Iterator[None]:
    """psp_zoo's progress log on stderr from process 0 of a torchrun job (or a process alone); the other
    processes say nothing (their errors are process 0's too)."""
    from ..constants import torchrun_rank

    if torchrun_rank() == 0:
        with progress_messages(quiet=False):
            yield
        return
    logger = logging.getLogger("psp_zoo")
    previous, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = previous


@contextlib.contextmanager
def progress_messages(quiet: bool) -> Iterator[None]:
    """Show psp_zoo's progress log (retries, waiting on a lock) on stderr for this command."""
    logger = logging.getLogger("psp_zoo")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("psp-zoo: %(message)s"))
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
