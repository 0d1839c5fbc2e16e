"""``psp-zoo`` command line: argparse front end; every command is a thin call into the modules.

A user mistake (``PspZooError``) is printed as one line on stderr with exit code 2; a command
that tried several things and some failed exits 1 after doing the rest.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator, List, NoReturn, Optional

from ._version import __version__
from .errors import PspZooError, one_line
from .records import DEFAULT_RESULTS_DIR

EXIT_FAILED = 1  # the command ran, but some of its work failed
EXIT_USAGE = 2   # bad input: nothing was done
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


def _add_speed_options(parser: argparse.ArgumentParser) -> None:
    """How the loaded model is prepared (psp_zoo.optimize); the default is the exact fp32 fast path."""
    from .options import PRECISIONS

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


def _speed_options(args: argparse.Namespace):
    from .options import SpeedOptions

    return SpeedOptions(precision=args.precision, compile=args.compile, fuse_bn=args.fuse_bn,
                        channels_last=args.channels_last, factorize_head=args.factorize_head,
                        winograd=args.winograd)


def _fetch_options(args: argparse.Namespace, quiet: Optional[bool] = None):
    from .options import FetchOptions

    return FetchOptions(manifest=args.manifest, cache_dir=args.cache_dir, mirror=getattr(args, "mirror", None),
                        offline=True if getattr(args, "offline", False) else None, quiet=quiet)


def _int_at_least(minimum: int) -> Callable[[str], int]:
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


def _port(text: str) -> int:
    """An argparse type: a TCP port number, 0 meaning any free port."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {text!r}")
    return value


# One helper per shared option, so every subcommand names, shows and explains it the same way.
MS_FLIP_COST = "about 13x the single-scale time: 12 model passes, most at larger scales"


def _add_name_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="checkpoint name, alias (mmseg 1.x config name) or weight file stem")


def _add_checkpoint_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", metavar="FILE", default=None,
                        help="load this local weights file instead of the published one")


def _add_data_root_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", required=True, metavar="DIR",
                        help="the dataset folder, or a folder that contains it")


def _add_workers_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-workers", type=_int_at_least(0), metavar="N",
                        help="image decoding processes (default: a few, 0 = decode in this process)")


def _add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", metavar="DEVICE", default=None,
                        help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def _add_manifest_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", metavar="FILE", action="append", default=None,
                        help="user manifest adding or overriding entries (repeatable; "
                             "default: $PSP_ZOO_MANIFEST)")


def _add_cache_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", metavar="DIR", default=None,
                        help="checkpoint cache (default: $PSP_ZOO_HOME, else torch.hub's checkpoints folder)")


def _add_mirror_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mirror", metavar="BASE", default=None,
                        help="base URL replacing https://download.openmmlab.com/ (default: $PSP_ZOO_MIRROR)")


def _add_offline_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--offline", action="store_true",
                        help="use only the cache, never the network (default: $PSP_ZOO_OFFLINE)")


def _add_fetch_options(parser: argparse.ArgumentParser) -> None:
    """Where checkpoint files come from: the manifest, a mirror, offline, the cache folder."""
    _add_manifest_option(parser)
    _add_mirror_option(parser)
    _add_offline_option(parser)
    _add_cache_dir_option(parser)


class _Parser(argparse.ArgumentParser):
    """argparse with a command-line mistake said on one stderr line (not the usage block), exit 2."""

    def error(self, message: str) -> "NoReturn":
        text = " ".join(str(message).split())
        self.exit(EXIT_USAGE, f"{self.prog}: error: {text} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
                                        "and print aAcc, mIoU, mAcc and per-class IoU and Acc in percent.")
    _add_name_argument(parser)
    _add_data_root_option(parser)
    parser.add_argument("--dataset", metavar="DATASET",
                        help="score on another dataset the checkpoint is published on (e.g. dark_zurich)")
    _add_checkpoint_option(parser)
    parser.add_argument("--ms-flip", action="store_true",
                        help=f"multi-scale + flip test instead of single-scale ({MS_FLIP_COST})")
    parser.add_argument("--onnx", metavar="FILE", default=None,
                        help="score this ONNX file (written by `psp-zoo export`) with onnxruntime instead of "
                             "the PyTorch model; needs pip install 'psp-zoo[onnx]'")
    parser.add_argument("--limit", type=_int_at_least(1), metavar="N", help="only the first N images (sorted)")
    _add_device_option(parser)
    _add_workers_option(parser)
    parser.add_argument("--json", metavar="FILE", help="also write the result record (the results-file format)")
    _add_fetch_options(parser)
    _add_speed_options(parser)
    parser.set_defaults(func=_run_evaluate)


def _check_writable_folder(folder: Path, option: str, given: str) -> None:
    """Refuse an output folder that cannot be created or written, before any work is done."""
    from .files import check_writable_folder

    try:
        check_writable_folder(folder, option)
    except PspZooError as exc:
        raise PspZooError(f"{option} {given}: {exc}") from None


def _run_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate
    from .records import write_result

    if args.json:  # an hour of evaluation must not end in a path typo
        _check_writable_folder(Path(args.json).parent, "--json", args.json)
    onnx = {"onnx": args.onnx} if args.onnx else {}  # the keyword only when used: older evaluate lacks it
    with _progress_messages(quiet=False):
        record = evaluate(args.name, args.data_root, dataset=args.dataset, ms_flip=args.ms_flip,
                          limit=args.limit, device=args.device, checkpoint=args.checkpoint,
                          num_workers=args.num_workers, fetch=_fetch_options(args), speed=_speed_options(args),
                          **onnx)
    print(f"{record.checkpoint} on {record.dataset} ({record.images.count} images, "
          f"{'ms+flip' if args.ms_flip else 'single-scale'}, {record.environment['device_name']})")
    sys.stdout.write(_per_class_text(record.metrics))
    if _undefined(record.metrics.aacc) and record.images.count > 0:
        print(f"psp-zoo evaluate: warning: no labelled pixel was scored in the {record.images.count} image(s): "
              f"every label is ignored (255) or outside the checkpoint's {len(record.metrics.per_class)} "
              f"classes, so aAcc and mIoU mean nothing; check the label files and --dataset", file=sys.stderr)
    if args.json:
        write_result(record, args.json)
    return 0


def _undefined(value: Optional[float]) -> bool:
    return value is None or value != value  # None in a record, NaN straight from the metrics


def _per_class_text(metrics, published=None) -> str:
    """Per-class IoU / Acc lines and the dataset-level scores, '-' for a class that never occurs."""
    number = lambda v: "     -" if v is None else f"{v:6.2f}"  # noqa: E731
    lines = [f"  {name:<24} IoU {number(v['IoU'])}  Acc {number(v['Acc'])}" for name, v in metrics.per_class.items()]
    lines.append(f"aAcc {number(metrics.aacc).strip()}  mIoU {number(metrics.miou).strip()}  "
                 f"mAcc {number(metrics.macc).strip()}")
    return "\n".join(lines) + "\n"


# Each entry adds one subcommand to the parser and sets ``func`` on its namespace.
COMMANDS: List[Callable] = [register_evaluate]


# --------------------------------------------------------------------------------------------
# checkpoint hub: list, info, get


# hub.cache_state's words as `list` shows them; corrupt and partial read the same as in `info`
_CACHED_WORDS = {"cached": "yes", "missing": "no", "corrupt": "corrupt", "partial": "partial"}


def _list_frame(args: argparse.Namespace):
    import pandas as pd

    from .hub import cache_state
    from .manifest import get_manifest

    manifest = get_manifest(args.manifest)
    names = manifest.list(dataset=args.dataset, pattern=args.pattern)
    if not names:
        wanted = " and ".join([f"dataset {args.dataset!r}"] * (args.dataset is not None)
                              + [f"pattern {args.pattern!r}"] * (args.pattern is not None))
        raise PspZooError(f"no checkpoint matches {wanted}; run `psp-zoo list` to see every name")
    rows = []
    for name in names:
        entry = manifest.get(name)
        dataset = args.dataset or entry.dataset  # a cross-dataset listing shows that dataset's numbers
        published = entry.published_on[dataset]
        shown = dataset if dataset == entry.dataset else f"{dataset} (trained on {entry.dataset})"
        rows.append({
            "name": entry.name, "dataset": shown, "backbone": entry.backbone,
            "crop": "x".join(map(str, entry.crop_size)), "schedule": entry.schedule,
            "mIoU": published.miou, "mIoU(ms+flip)": published.miou_ms_flip,
            "Mem (GB)": published.mem_gb, "Inf time (fps)": published.fps,
            "cache_state": cache_state(entry, cache_dir=args.cache_dir),
        })
    columns = ["name", "dataset", "backbone", "crop", "schedule", "mIoU", "mIoU(ms+flip)",
               "Mem (GB)", "Inf time (fps)", "cache_state"]
    return pd.DataFrame(rows, columns=columns)


def _cmd_list(args: argparse.Namespace) -> int:
    frame = _list_frame(args)
    if args.format == "json":
        print(frame.to_json(orient="records", indent=1))
    elif args.format == "csv":
        print(frame.to_csv(index=False), end="")
    else:
        from tabulate import tabulate

        shown = frame.astype(object).rename(columns={"cache_state": "cached"})
        shown["cached"] = shown["cached"].map(_CACHED_WORDS)
        shown = shown.where(shown.notna(), None)  # '-' like the published table
        print(tabulate(shown, headers="keys", tablefmt="github", showindex=False, missingval="-"))
    return 0


def _register_list(sub) -> None:
    parser = sub.add_parser(
        "list", help="the published checkpoints, their numbers and cache state",
        description="One row per checkpoint in the manifest: dataset, backbone, crop size, schedule, the "
                    "published mIoU, ms+flip mIoU, Mem (GB) and fps, and whether its file is cached "
                    "(yes, no, corrupt: wrong hash, partial: an interrupted download). "
                    "A --dataset or --pattern that selects nothing is an error.")
    parser.add_argument("--dataset", metavar="DATASET", help="only this dataset (cityscapes, ade20k, voc12aug, pascal_context, ...)")
    parser.add_argument("--pattern", help="only names matching this shell wildcard, e.g. '*r101*'")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table",
                        help="table: Markdown for reading (default); csv and json: for programs")
    _add_manifest_option(parser)
    _add_cache_dir_option(parser)
    parser.set_defaults(func=_cmd_list)


def _info_fields(args: argparse.Namespace) -> dict:
    from .hub import cache_state, cached_path, resolve_url
    from .manifest import get_checkpoint

    entry = get_checkpoint(args.name, manifest=args.manifest)
    fields = entry.as_dict()
    fields["test"] = {k: v for k, v in fields["test"].items() if v is not None}
    fields["arch"] = dict(entry.arch)
    fields.update(
        filename=entry.filename,
        download_url=resolve_url(entry.url, args.mirror),
        cache_path=str(cached_path(entry, cache_dir=args.cache_dir)),
        cache_state=cache_state(entry, cache_dir=args.cache_dir),
    )
    return fields


def _cmd_info(args: argparse.Namespace) -> int:
    fields = _info_fields(args)
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


def _register_info(sub) -> None:
    parser = sub.add_parser(
        "info", help="every field of one checkpoint, its cache path and state",
        description="Print every manifest field of one checkpoint (URLs, hashes, test settings, published "
                    "numbers, architecture), the download URL (on --mirror if given), the cache path and "
                    "the cache state: cached, missing, corrupt (wrong hash) or partial (an interrupted "
                    "download). Nothing is downloaded.")
    _add_name_argument(parser)
    parser.add_argument("--format", choices=("text", "json"), default="text",
                        help="text: one field a line (default); json: for programs")
    _add_fetch_options(parser)
    parser.set_defaults(func=_cmd_info)


def _selected_checkpoints(args: argparse.Namespace) -> list:
    """The entries ``get`` should fetch; every name is checked before anything is downloaded."""
    from .manifest import get_manifest

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


@contextlib.contextmanager
def _progress_messages(quiet: bool) -> Iterator[None]:
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


def _cmd_get(args: argparse.Namespace) -> int:
    from .hub import download

    entries = _selected_checkpoints(args)
    failed = 0
    with _progress_messages(args.quiet):
        for entry in entries:
            try:
                path = download(entry, **_fetch_options(args, quiet=args.quiet).download_kwargs())
            except PspZooError as exc:
                failed += 1
                print(f"psp-zoo get: error: {entry.name}: {error_text(exc)}", file=sys.stderr, flush=True)
                continue
            print(path, flush=True)
    return EXIT_FAILED if failed else 0


def _register_get(sub) -> None:
    parser = sub.add_parser(
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
    _add_fetch_options(parser)
    parser.set_defaults(func=_cmd_get)


COMMANDS += [_register_list, _register_info, _register_get]

def _register_tables(sub) -> None:
    parser = sub.add_parser(
        "tables", help="regenerate the published results tables, with reproduced numbers",
        description="Print the four dataset tables in the published layout. With results "
                    "(written by `psp-zoo reproduce`), measured cells read "
                    "'published / reproduced (difference)' and each row names its device.")
    parser.add_argument("--results", metavar="DIR", default=None,
                        help=f"results folder (default: ./{DEFAULT_RESULTS_DIR} if it exists, "
                             f"else the published tables alone)")
    _add_manifest_option(parser)
    parser.add_argument("--format", choices=("md", "csv", "json"), default="md",
                        help="output format (default md; csv/json put numbers in separate columns)")
    parser.add_argument("--update", metavar="FILE",
                        help="rewrite the tables between the psp-zoo marker comments of FILE "
                             "(e.g. README.md) instead of printing them")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw mIoU against fps into FILE.png")
    parser.set_defaults(func=_run_tables)


def _run_tables(args: argparse.Namespace) -> int:
    from .records import read_results
    from .tables import build_tables, plot, render, update_readme

    if args.update and args.format != "md":
        raise PspZooError("--update writes Markdown; drop --format or use --format md")
    results_dir = args.results
    if results_dir is None and Path(DEFAULT_RESULTS_DIR).is_dir():
        results_dir = DEFAULT_RESULTS_DIR
    if args.plot:  # a plot that cannot be written is said before the tables are built
        _check_writable_folder(Path(args.plot).parent, "--plot", args.plot)
    results = read_results(results_dir) if results_dir is not None else []
    if results_dir is not None and not results:
        print(f"psp-zoo tables: warning: no results files in {results_dir}; showing the published tables alone",
              file=sys.stderr)
    text = render(build_tables(args.manifest, results), args.format)
    if args.update:
        update_readme(args.update, text)
        print(f"updated the tables in {args.update} ({len(results)} result file(s))")
    if args.plot:
        print(f"wrote {_plot_to(args.plot, lambda: plot(results, args.plot, manifest=args.manifest))}")
    if not args.update and not args.plot:
        sys.stdout.write(text)
    return 0


def _plot_to(requested: str, draw: Callable[[], Path]) -> Path:
    """Run ``draw``; a refused write names the file the user asked for, not a temporary one."""
    try:
        return draw()
    except OSError as exc:
        raise PspZooError(f"--plot {requested}: cannot write it: {exc.strerror or exc}; choose another "
                          f"file") from None


COMMANDS.append(_register_tables)


def _register_show(sub) -> None:
    parser = sub.add_parser(
        "show", help="per-class IoU and Acc of one results file, beside the published mIoU",
        description="Print a results file (written by `psp-zoo reproduce` or `evaluate --json`): per-class "
                    "IoU and Acc in percent, single-scale and ms+flip side by side, then aAcc, mIoU and "
                    "mAcc, and the published mIoU beside the reproduced one where the manifest has the "
                    "checkpoint. The model zoo published no per-class numbers, so only the dataset-level "
                    "mIoU can be compared.")
    parser.add_argument("results_file", metavar="RESULTS.json", help="a results file")
    _add_manifest_option(parser)
    parser.set_defaults(func=_run_show)


def _run_show(args: argparse.Namespace) -> int:
    from .records import read_result

    record = read_result(args.results_file)
    passes = [(label, m) for label, m in (("single-scale", record.single_scale), ("ms+flip", record.ms_flip))
              if m is not None]
    if not passes:
        raise PspZooError(f"{args.results_file} holds no metrics (status {record.status}: "
                          f"{record.error or 'nothing was scored'})")
    print(f"{record.checkpoint} on {record.dataset} ({record.images.count} images, "
          f"{record.environment.get('device_name', record.device_kind)}, {record.precision}, {record.status})")
    sys.stdout.write(_show_table(passes))
    published = _published_mious(record.checkpoint, args.manifest)
    for label, metrics in passes:
        print(f"{label:<13} aAcc {_number(metrics.aacc)}  mIoU {_number(metrics.miou)}  "
              f"mAcc {_number(metrics.macc)}  published mIoU {_number(published.get(label))}")
    if not published:
        print(f"(no published numbers: {record.checkpoint} is not in the manifest)")
    return 0


def _number(value: Optional[float]) -> str:
    return "-" if _undefined(value) else f"{value:.2f}"


def _show_table(passes: list) -> str:
    """One row per class: IoU and Acc of each pass, '-' for a class absent from labels and predictions."""
    from tabulate import tabulate

    headers = ["class"] + [f"{what} {label}" for label, _ in passes for what in ("IoU", "Acc")]
    rows = [[name] + [_number(m.per_class.get(name, {}).get(what)) for _, m in passes for what in ("IoU", "Acc")]
            for name in passes[0][1].per_class]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True) + "\n"


def _published_mious(name: str, manifest) -> dict:
    from .errors import UnknownModelError
    from .manifest import get_checkpoint

    try:
        published = get_checkpoint(name, manifest=manifest).published
    except UnknownModelError:
        return {}
    return {"single-scale": published.miou, "ms+flip": published.miou_ms_flip}


COMMANDS.append(_register_show)


def _register_logs(sub) -> None:
    parser = sub.add_parser(
        "logs", help="a checkpoint's training log beside its published mIoU and Mem (GB)",
        description="Fetch the training log published with a checkpoint (cached beside the checkpoints), "
                    "print its last and best validation mIoU and its peak training memory next to the "
                    "results table's mIoU and Mem (GB), and optionally plot loss and mIoU against the "
                    "training iteration. Reads mmseg 0.x .log.json and 1.x scalars.json logs.")
    _add_name_argument(parser)
    parser.add_argument("--plot", metavar="FILE.png", help="also draw loss and mIoU against iteration into FILE.png")
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON")
    _add_fetch_options(parser)
    parser.set_defaults(func=_run_logs)


def _run_logs(args: argparse.Namespace) -> int:
    from .logs import check_plotting, compare_with_table, fetch_log, plot_log, read_log, render_comparison
    from .manifest import get_checkpoint

    entry = get_checkpoint(args.name, manifest=args.manifest)
    if args.plot:  # refuse a plot that cannot be drawn or written before fetching anything
        check_plotting()
        _check_writable_folder(Path(args.plot).parent, "--plot", args.plot)
    with _progress_messages(quiet=False):
        path = fetch_log(entry, cache_dir=args.cache_dir, mirror=args.mirror, offline=args.offline or None)
    log = read_log(path)
    report = compare_with_table(entry, log)
    if args.plot:
        report["plot"] = str(plot_log(log, args.plot, title=entry.name, published_miou=entry.published.miou))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        sys.stdout.write(render_comparison(report))
        if args.plot:
            print(f"wrote {report['plot']}")
    return 0


COMMANDS.append(_register_logs)


# --------------------------------------------------------------------------------------------
# predict and selftest


def _cmd_predict(args: argparse.Namespace) -> int:
    from .prediction import Predictor, expand_image_args, predict_files

    paths = expand_image_args(args.images, args.out)  # every argument is checked before work starts
    _check_writable_folder(Path(args.out), "--out", args.out)
    if args.format == "cityscapes":  # refused before a checkpoint is downloaded, not after
        _check_cityscapes_format(args)
    with _progress_messages(quiet=False):
        predictor = Predictor.create(args.name, ms_flip=args.ms_flip, device=args.device,
                                     checkpoint=args.checkpoint, fetch=_fetch_options(args),
                                     speed=_speed_options(args))
    _say_renamed(paths)
    failed = 0
    with _progress_messages(quiet=False):
        for path, outcome in predict_files(predictor, paths, args.out, args.format):
            if isinstance(outcome, PspZooError):
                failed += 1
                print(f"psp-zoo predict: error: {error_text(outcome)}", file=sys.stderr, flush=True)
            else:
                print(" ".join(map(str, outcome)), flush=True)
    return EXIT_FAILED if failed else 0


def _say_renamed(paths: list) -> None:
    """Name the output stem of every input whose own name collides with another input's."""
    from .prediction import output_stems

    for path, stem in zip(paths, output_stems(paths)):
        if stem != path.stem:
            print(f"psp-zoo predict: note: {path} is written as {stem}* (another input has the same name)",
                  file=sys.stderr, flush=True)


def _check_cityscapes_format(args: argparse.Namespace) -> None:
    from .manifest import get_checkpoint
    from .prediction import check_output_format

    entry = get_checkpoint(args.name, manifest=args.manifest)
    try:
        check_output_format("cityscapes", entry.dataset, entry.num_classes)
    except PspZooError as exc:
        raise PspZooError(f"--format cityscapes: {args.name}: {exc}") from None


def _register_predict(sub) -> None:
    from .visualize import IMAGE_EXTENSIONS, OUTPUT_FORMATS

    parser = sub.add_parser(
        "predict", help="segment images: palette PNG, overlay and legend per image",
        description="Segment images with a checkpoint through its own test pipeline (resize, whole or "
                    "sliding-window inference, align_corners). For each image writes <stem>_labels.png "
                    "(class ids as pixel values, in the dataset's palette), <stem>_overlay.png and "
                    "<stem>_legend.png, or <stem>.npy with --format npy, and prints the written paths. "
                    "An image that fails (unreadable, out of memory, ...) is reported on one line naming it "
                    "and the rest are done; the exit code is then 1.")
    _add_name_argument(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help=f"image files, folders (their {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} "
                             f"images) or quoted globs ('**' recurses)")
    parser.add_argument("--out", metavar="DIR", default="predictions", help="output folder (default: predictions)")
    parser.add_argument("--format", choices=OUTPUT_FORMATS, default="png",
                        help="png: labels, overlay and legend pictures; npy: raw H x W uint8 labels; "
                             "cityscapes: Cityscapes benchmark files, the official labelIds in a greyscale "
                             "PNG named like the image (<city>_<seq>_<frame>_leftImg8bit.png)")
    parser.add_argument("--ms-flip", action="store_true",
                        help=f"multi-scale + flip test-time augmentation ({MS_FLIP_COST})")
    _add_device_option(parser)
    _add_checkpoint_option(parser)
    _add_fetch_options(parser)
    _add_speed_options(parser)
    parser.set_defaults(func=_cmd_predict)


COMMANDS.append(_register_predict)


def _cmd_selftest(args: argparse.Namespace) -> int:
    from .selftest import run_selftest

    return EXIT_FAILED if run_selftest(keep=args.keep, port=args.port, device=args.device) else 0


def _register_selftest(sub) -> None:
    parser = sub.add_parser(
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
    parser.add_argument("--port", type=_port, default=0, help="port of the local server (default 0: any free port)")
    _add_device_option(parser)
    parser.set_defaults(func=_cmd_selftest)


COMMANDS.append(_register_selftest)

# --------------------------------------------------------------------------------------------
# reproduce


def _register_reproduce(sub) -> None:
    parser = sub.add_parser(
        "reproduce", help="re-evaluate and re-measure a dataset's checkpoints, write results files",
        description="For each checkpoint of the dataset: fetch, load, score single-scale and "
                    "ms+flip, measure fps and memory as published, write one results file per "
                    "checkpoint and device. Finished checkpoints are skipped and a killed run "
                    "resumes; under `torchrun --nproc_per_node N -m psp_zoo reproduce ...` the "
                    "images are shared out across the processes.")
    parser.add_argument("--dataset", metavar="DATASET", required=True, help="cityscapes, ade20k, voc12aug, pascal_context, ...")
    _add_data_root_option(parser)
    parser.add_argument("--models", metavar="PATTERN", help="only names matching this shell wildcard")
    parser.add_argument("--no-ms-flip", dest="ms_flip", action="store_false",
                        help=f"skip the multi-scale + flip evaluation ({MS_FLIP_COST})")
    parser.add_argument("--limit", type=_int_at_least(1), metavar="N",
                        help="only the first N images (sorted by name), for scores and speed")
    _add_device_option(parser)
    parser.add_argument("--results", metavar="DIR", default=DEFAULT_RESULTS_DIR,
                        help=f"results folder (default: ./{DEFAULT_RESULTS_DIR})")
    parser.add_argument("--force", action="store_true", help="redo checkpoints that have finished results")
    _add_workers_option(parser)
    parser.add_argument("--no-train-mem", dest="train_memory", action="store_false",
                        help="skip the training-memory step (slow on CPU for full-size models)")
    parser.add_argument("--speed-images", type=_int_at_least(1), metavar="N",
                        help="images timed for fps, warm-up included (default: 200 on CUDA as "
                             "published, 20 on CPU; --limit bounds it)")
    parser.add_argument("--speed-warmup", type=_int_at_least(0), default=5, metavar="N",
                        help="untimed warm-up images (default 5)")
    parser.add_argument("--save-every", type=_int_at_least(1), default=50, metavar="N",
                        help="save the evaluation state every N images, for resuming (default 50)")
    _add_fetch_options(parser)
    _add_speed_options(parser)
    parser.set_defaults(func=_run_reproduce)


def _run_reproduce(args: argparse.Namespace) -> int:
    from .reproduction import reproduce
    from .tables import summary

    with _progress_messages(quiet=False):
        report = reproduce(
            args.dataset, args.data_root, models=args.models, device=args.device,
            fetch=_fetch_options(args), speed=_speed_options(args),
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
        return EXIT_FAILED
    return 0


COMMANDS.append(_register_reproduce)


# --------------------------------------------------------------------------------------------
# export


def _register_export(sub) -> None:
    parser = sub.add_parser(
        "export", help="write a checkpoint as ONNX (dynamic shapes), TorchScript or safetensors",
        description="Write the model (BN folded, fp32) as a file other runtimes load. ONNX and TorchScript "
                    "take a normalized NCHW float32 'input' and return 'logits' at the input's size; "
                    "by default one file serves any batch, height and width, pyramid pooling included. "
                    "safetensors writes the weights only, loadable with psp_zoo.load_checkpoint. "
                    "--verify compares the file's outputs with PyTorch on random inputs of several "
                    "sizes and exits 1 if they differ by more than 1e-4 (relative) or 0.01% of argmax.")
    _add_name_argument(parser)
    _add_checkpoint_option(parser)
    parser.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    parser.add_argument("--format", choices=["onnx", "torchscript", "safetensors"], default="onnx",
                        help="default: onnx (needs pip install 'psp-zoo[onnx]')")
    parser.add_argument("--input-size", nargs=2, type=_int_at_least(1), metavar=("H", "W"), default=None,
                        help="example input traced (and the fixed size with --static); default: the "
                             "checkpoint's test crop")
    parser.add_argument("--static", action="store_true", help="ONNX graph fixed to 1 x 3 x H x W")
    parser.add_argument("--opset", type=_int_at_least(11), default=None, help="ONNX opset (default 17)")
    parser.add_argument("--verify", action="store_true",
                        help="compare the written file with PyTorch; exit 1 on a mismatch")
    _add_fetch_options(parser)
    parser.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from .export import check_format, export_file, export_model, verify_file

    check_format(args.format)  # a missing extra is said before anything is downloaded
    if args.format != "onnx" and (args.static or args.opset is not None):
        raise PspZooError(f"--static and --opset apply to --format onnx only, not {args.format}")
    _check_writable_folder(Path(args.out).parent, "--out", args.out)
    with _progress_messages(quiet=False):
        model, entry = export_model(args.name, checkpoint=args.checkpoint, manifest=args.manifest,
                                    cache_dir=args.cache_dir, mirror=args.mirror, offline=args.offline or None)
    path = export_file(model, args.out, args.format, input_size=args.input_size, dynamic=not args.static,
                       opset=args.opset, entry=entry)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.format})", flush=True)
    if not args.verify:
        return 0
    report = verify_file(path, model, args.format, input_size=args.input_size, entry=entry)
    print(report.text(), flush=True)
    if not report.ok:
        print(f"psp-zoo export: error: {path} does not reproduce the PyTorch model's logits (see above); "
              f"do not deploy it", file=sys.stderr)
        return EXIT_FAILED
    return 0


COMMANDS.append(_register_export)


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; Ctrl-C at any moment (the imports included) ends it with one line, exit 130."""
    command = []
    try:
        return _parse_and_run(argv, command)
    except KeyboardInterrupt:
        print(f"psp-zoo{''.join(' ' + c for c in command)}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _parse_and_run(argv: Optional[List[str]], command: List[str]) -> int:
    args = build_parser().parse_args(argv)
    command.append(args.command)  # known from here on, for the interrupted line
    shown = set()

    def show(message, *_args, **_kwargs) -> None:
        # a warning meant for the user reads like the errors, once, not like a Python source location
        if str(message) not in shown:
            shown.add(str(message))
            print(f"psp-zoo {args.command}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():  # restores the caller's warning display afterwards
        warnings.showwarning = show
        return _run(args)


def error_text(exc: PspZooError) -> str:
    """A library error as the CLI prints it: one line, with the command-line hint if it has one."""
    return one_line(exc)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except PspZooError as exc:
        print(f"psp-zoo {args.command}: error: {error_text(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # output piped into `head`: stop quietly (recipe from the signal docs)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except OSError as exc:  # the file system refused something (disk full, a file where a folder goes)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"psp-zoo {args.command}: error: {where}{exc.strerror or exc}; check the path, its permissions "
              f"and free space", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
