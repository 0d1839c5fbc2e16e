"""``psp-zoo`` command line: argparse front end; every command is a thin call into the library.

One module per command, each with ``add_parser(subparsers)`` (returns its parser) and
``run(args)`` (returns the exit code); :data:`COMMANDS` lists them once, in the order of the
workflow, which is the order ``psp-zoo --help`` shows. Options several commands share live in
``_options.py``. A user mistake (``PspZooError``) is printed as one line on stderr with exit
code 2; a command that tried several things and some failed exits 1 after doing the rest.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import List, NoReturn, Optional

from .._version import __version__
from ..constants import OFFLINE_ENV, env_flag, torchrun_rank
from ..errors import PspZooError, one_line
from . import dataset, evaluate, export, get, info, logs, predict, reproduce, selftest, show, tables, train
from . import list as list_command  # the module is named after its command
from ._options import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE

__all__ = ["main", "build_parser", "COMMANDS"]

#: the command modules in the order of the workflow (the order of ``psp-zoo --help``)
COMMANDS = (list_command, info, get, dataset, predict, evaluate, reproduce, tables, show, train, logs, export,
            selftest)


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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for module in COMMANDS:
        command = module.add_parser(sub)
        command.set_defaults(run=module.run, parser=command)  # the parser: its mistakes are said in its name
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; Ctrl-C at any moment (the imports included) ends it with one line, exit 130."""
    command = []
    try:
        return _parse_and_run(argv, command)
    except KeyboardInterrupt:
        print(f"psp-zoo{''.join(' ' + c for c in command)}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _parse_and_run(argv: Optional[List[str]], command: List[str]) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # `psp-zoo list --datset x` is a mistake of `psp-zoo list`, not of `psp-zoo`
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    command.append(args.command)  # known from here on, for the interrupted line
    shown = set()

    def show_warning(message, *_args, **_kwargs) -> None:
        # a warning meant for the user reads like the errors, once, not like a Python source location
        if str(message) not in shown:
            shown.add(str(message))
            print(f"psp-zoo {args.command}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():  # restores the caller's warning display afterwards
        warnings.showwarning = show_warning
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        if hasattr(args, "offline"):  # a command that fetches reads $PSP_ZOO_OFFLINE: a bad value stops it first
            env_flag(OFFLINE_ENV)
        return int(args.run(args) or 0)
    except PspZooError as exc:
        if torchrun_rank() == 0:  # under torchrun every process fails alike: the first one says so
            print(f"psp-zoo {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # output piped into `head`: stop quietly (recipe from the signal docs)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except OSError as exc:  # the file system refused something (disk full, a file where a folder goes)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"psp-zoo {args.command}: error: {where}{exc.strerror or exc}; check the path, its permissions "
              f"and free space", file=sys.stderr)
        return EXIT_FAILED
