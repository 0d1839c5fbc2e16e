"""``psp-zoo train --from SOURCE --dataset DATASET``: the fine-tuning options of the train command.

``add_finetune_options(parser)`` adds them to the train command's parser; ``run_finetune(args,
overrides, options)`` runs when ``--from`` is given, with the recipe overrides (``--max-iters``,
``--lr``, ``--crop-size``, ``--batch-size``, ``--set``, ...) and the run options
(``psp_zoo.training.loop.RunOptions``: ``--resume``, ``--num-workers``, ``--float64``, ...) that
the train command built, the same ones a run without ``--from`` gets.
"""
from __future__ import annotations

import argparse
from typing import Any, Mapping

from ..errors import PspZooError
from . import _options


def add_finetune_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "fine-tuning (start from a trained checkpoint, on a dataset of your own; the result joins the zoo "
        "as an entry of WORK_DIR/model_index.yml)")
    group.add_argument("--from", dest="source", metavar="SOURCE", default=None,
                       help="start from this checkpoint: a manifest name (fetched) or a local .pth file; "
                            "classifier convs re-initialized when the class count differs")
    group.add_argument("--dataset", metavar="DATASET", default=None,
                       help="with --from: the dataset to fine-tune on (e.g. one a --manifest file declares)")
    group.add_argument("--name", dest="new_name", metavar="NAME", default=None,
                       help="with --from: the new entry's name (default: SOURCE_finetuned_DATASET)")
    group.add_argument("--freeze-backbone", action="store_true",
                       help="with --from: keep the backbone's weights and BatchNorm statistics as they start; "
                            "train the heads only")


def check_finetune_options(args: argparse.Namespace) -> None:
    """``--dataset``, ``--name`` and ``--freeze-backbone`` belong to ``--from``, which replaces NAME,
    ``--init-from`` and the ImageNet backbone."""
    if args.source is None:
        given = [flag for flag, value in (("--dataset", args.dataset), ("--name", args.new_name),
                                          ("--freeze-backbone", args.freeze_backbone)) if value]
        if given:
            raise PspZooError(f"{given[0]} applies to fine-tuning: give --from SOURCE too")
        if args.name is None:
            raise PspZooError("give NAME (the entry whose published recipe to run), or --from SOURCE --dataset "
                              "DATASET to fine-tune SOURCE on your dataset")
        return
    clash = [flag for flag, value in (("NAME", args.name), ("--init-from", args.init_from),
                                      ("--no-pretrained", args.no_pretrained)) if value]
    if clash:
        raise PspZooError(f"{clash[0]} does not go with --from: the run starts from SOURCE's weights")
    if args.dataset is None:
        raise PspZooError("--from needs --dataset: the dataset to fine-tune on")


def run_finetune(args: argparse.Namespace, overrides: Mapping[str, Any], options: Any) -> int:
    from ..constants import torchrun_rank
    from ..training.finetune import finetune

    with _options.main_process_messages():
        result = finetune(args.source, dataset=args.dataset, data_root=args.data_root, work_dir=args.work_dir,
                          name=args.new_name, freeze_backbone=args.freeze_backbone, options=options, **overrides)
    if torchrun_rank() != 0:  # process 0 alone reports
        return 0
    if result.run.already_finished:
        print(f"{result.name}: already trained ({result.run.iterations} iterations); nothing to do", flush=True)
    miou = "not measured" if result.miou is None else f"{result.miou:.2f} mIoU on {args.dataset} val"
    print(f"{result.name}: {result.weights} ({miou})", flush=True)
    print(f"use it by name: psp-zoo evaluate {result.name} --manifest {result.manifest} --data-root "
          f"{args.data_root}", flush=True)
    return 0
