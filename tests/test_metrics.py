"""The confusion-matrix accumulator against mmseg's metrics, merging and distributed reduction."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from psp_zoo import ConfusionMatrix

from helpers import FIXTURES


def _case():
    data = np.load(FIXTURES / "metrics_case.npz")
    expected = json.loads((FIXTURES / "metrics_case_expected.json").read_text())
    pairs = [(data[f"pred_{i}"], data[f"label_{i}"]) for i in range(3)]
    return pairs, expected


def _assert_close(values, expected, tol=1e-6):
    for value, want in zip(values, expected):
        assert (math.isnan(value) and math.isnan(want)) or abs(value - want) <= tol, (value, want)


def test_matches_reference_case():
    pairs, expected = _case()
    metric = ConfusionMatrix(expected["num_classes"], ignore_index=expected["ignore_index"])
    for pred, label in pairs:
        metric.update(pred, label)
    scores = metric.compute()
    for key in ("aAcc", "mIoU", "mAcc"):
        assert abs(scores[key] - expected[key]) <= 1e-6, key
    _assert_close(scores["IoU"], expected["IoU"])
    _assert_close(scores["Acc"], expected["Acc"])
    assert math.isnan(scores["Acc"][5]) and scores["IoU"][5] == 0.0
    assert metric.matrix.dtype == torch.int64


def test_merge_equals_one_accumulator_and_state_round_trips():
    pairs, expected = _case()
    whole, first, second = (ConfusionMatrix(6) for _ in range(3))
    for index, (pred, label) in enumerate(pairs):
        whole.update(torch.from_numpy(pred), torch.from_numpy(label))
        (first if index == 0 else second).update(pred, label)
    assert torch.equal((first + second).matrix, whole.matrix)
    first += second
    assert torch.equal(first.matrix, whole.matrix)
    restored = ConfusionMatrix.from_state_dict(whole.state_dict())
    assert torch.equal(restored.matrix, whole.matrix)
    with pytest.raises(ValueError):
        whole.merge(ConfusionMatrix(5))


def test_out_of_range_labels_count_only_as_predictions():
    # As the reference's histograms: label 5 (C=2) is no label, but its prediction counts.
    metric = ConfusionMatrix(2).update(np.array([0, 1, 1, 0, 0]), np.array([0, 0, 1, 5, 255]))
    scores = metric.compute()
    area = metric.areas()
    assert area["intersect"].tolist() == [1, 1]
    assert area["pred"].tolist() == [2, 2] and area["label"].tolist() == [2, 1]
    np.testing.assert_allclose(scores["IoU"], [1 / 3, 1 / 2])
    np.testing.assert_allclose(scores["Acc"], [1 / 2, 1.0])
    assert scores["aAcc"] == pytest.approx(2 / 3)


def test_absent_class_is_nan_and_skipped():
    scores = ConfusionMatrix(3).update([0, 0, 1], [0, 0, 1]).compute()
    assert math.isnan(scores["IoU"][2]) and math.isnan(scores["Acc"][2])
    assert scores["mIoU"] == 1.0 and scores["mAcc"] == 1.0
    empty = ConfusionMatrix(3).update([0], [255]).compute()
    assert math.isnan(empty["mIoU"]) and math.isnan(empty["aAcc"])


def test_bad_predictions_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        ConfusionMatrix(3).update([3], [0])
    with pytest.raises(ValueError, match="pixels"):
        ConfusionMatrix(3).update([0, 1], [0])


def _reduce_worker(rank: int, world: int, init_file: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    pairs, _ = _case()
    metric = ConfusionMatrix(6)
    for pred, label in pairs[rank::world]:
        metric.update(pred, label)
    metric.all_reduce()
    # by value: a tensor travels as a shared-memory handle that dies with this process, and the
    # parent may read the queue only after the worker has exited (a loaded machine)
    queue.put((rank, metric.matrix.numpy().copy()))
    dist.destroy_process_group()


def test_all_reduce_across_processes_equals_one_process(tmp_path):
    pairs, _ = _case()
    single = ConfusionMatrix(6)
    for pred, label in pairs:
        single.update(pred, label)
    assert torch.equal(single.copy().all_reduce().matrix, single.matrix)  # no process group: no-op
    context = mp.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_reduce_worker, args=(rank, 2, str(tmp_path / "init"), queue))
             for rank in range(2)]
    for proc in procs:
        proc.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert all(torch.equal(torch.from_numpy(results[rank]), single.matrix) for rank in (0, 1))
