"""``psp-zoo info``: every field of one checkpoint, its cache path and state."""
from __future__ import annotations

import argparse
import json

from . import _options


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "info", help="every field of one checkpoint, its cache path and state",
        description="Print every manifest field of one checkpoint (URLs, hashes, test settings, published "
                    "numbers, architecture, the training recipe), the download URL (on --mirror if given), "
                    "the cache path and "
                    "the cache state: cached, missing, corrupt (wrong hash) or partial (an interrupted "
                    "download). Nothing is downloaded.")
    _options.add_name_argument(parser)
    parser.add_argument("--format", choices=("text", "json"), default="text",
                        help="text: one field a line (default); json: for programs")
    _options.add_fetch_options(parser)
    return parser


def _fields(args: argparse.Namespace) -> dict:
    from ..hub.cache import cache_state, cached_path, resolve_url
    from ..manifest.loading import get_checkpoint
    from ..training.recipe import recipe_from_entry

    entry = get_checkpoint(args.name, manifest=args.manifest)
    fields = entry.as_dict()
    fields["train"] = recipe_from_entry(entry, args.manifest).settings()
    fields["test"] = {k: v for k, v in fields["test"].items() if v is not None}
    fields["arch"] = dict(entry.arch)
    fields.update(
        filename=entry.filename,
        download_url=None if entry.by_hand else resolve_url(entry.url, args.mirror),
        cache_path=str(cached_path(entry, cache_dir=args.cache_dir)),
        cache_state=cache_state(entry, cache_dir=args.cache_dir),
    )
    return fields


def run(args: argparse.Namespace) -> int:
    fields = _fields(args)
    if args.format == "json":
        print(json.dumps(fields, indent=1))
        return 0
    width = max(map(len, fields))
    for key, value in fields.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        elif isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value)) or "-"
        print(f"{key:<{width}}  {'-' if value is None else value}")
    return 0
