"""``psp-zoo get``: download and verify checkpoints, print each local path."""
from __future__ import annotations

import argparse
import sys

from ..errors import PspZooError, one_line
from . import _options


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "get", help="download and verify checkpoints; prints each local path",
        description="Download checkpoints into the cache (resuming an interrupted download), check each "
                    "against its SHA-256, and print each local path. Every name is checked before "
                    "anything is downloaded; a file that fails is reported on one line and the rest are "
                    "still fetched (exit code 1).")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="checkpoint names, aliases or shell wildcards")
    parser.add_argument("--dataset", metavar="DATASET", help="every checkpoint of this dataset")
    parser.add_argument("--all", action="store_true", help="every checkpoint in the manifest")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or messages, only paths and errors")
    _options.add_fetch_options(parser)
    return parser


def _selected_checkpoints(args: argparse.Namespace) -> list:
    """The entries to fetch; every name is checked before anything is downloaded."""
    from ..manifest.loading import get_manifest

    if sum((bool(args.names), args.dataset is not None, args.all)) != 1:
        raise PspZooError("give checkpoint names, --dataset D or --all (exactly one of them)")
    manifest = get_manifest(args.manifest)
    if args.all:
        return list(manifest)
    if args.dataset is not None:
        names = manifest.list(dataset=args.dataset)
        if not names:
            raise PspZooError(f"the manifest has no checkpoints for dataset {args.dataset!r}")
        return [manifest.get(n) for n in names]
    entries = []
    for name in args.names:
        matches = manifest.list(pattern=name) if any(c in name for c in "*?[") else [name]
        if not matches:
            raise PspZooError(f"no checkpoint name matches {name!r}; run `psp-zoo list` to see them")
        entries += [manifest.get(n) for n in matches]
    return list({e.name: e for e in entries}.values())


def run(args: argparse.Namespace) -> int:
    """Each path, or one short line per file that failed; what to do about failures is said once."""
    from ..errors import DownloadError
    from ..hub.cache import download

    entries = _selected_checkpoints(args)
    failed, advice = 0, {}
    with _options.progress_messages(args.quiet):
        for entry in entries:
            try:
                path = download(entry, **_options.fetch_options(args, quiet=args.quiet).download_kwargs())
            except PspZooError as exc:
                failed += 1
                if isinstance(exc, DownloadError) and exc.advice:
                    print(f"psp-zoo get: error: {entry.name}: {exc.summary}", file=sys.stderr, flush=True)
                    advice.setdefault(f"{exc.advice} ({exc.cli_hint})" if exc.cli_hint else exc.advice)
                else:
                    print(f"psp-zoo get: error: {entry.name}: {one_line(exc)}", file=sys.stderr, flush=True)
                continue
            print(path, flush=True)
    for text in advice:
        print(f"psp-zoo get: to fix: {text}", file=sys.stderr, flush=True)
    return _options.EXIT_FAILED if failed else 0
