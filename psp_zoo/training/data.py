"""The batches a run reads from a dataset's training split (listed by ``datasets.readers.training_items``).

Batches are planned by iteration, not by process: ``BatchPlan`` says which file slot ``s`` of the
global batch of iteration ``t`` reads (a permutation of the files per epoch, seeded by the run's
seed, the incomplete last batch of an epoch dropped, as mmseg's ``drop_last=True``). A process takes
its slice of those slots, so the global batch of iteration ``t`` is the same whatever the number of
processes, and a run resumed at iteration ``t`` continues with exactly the batches an uninterrupted
run would have read: the data position is ``t`` itself. Each sample is transformed with its own
generator ``sample_rng(seed, t, s)`` (see ``pipeline``), in loader worker processes or in this one.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..datasets.readers import Item, SegmentationDataset, dataset_spec, default_num_workers, read_image, training_items
from ..errors import DatasetError, PspZooError
from .pipeline import TrainTransform, sample_rng

__all__ = ["BatchPlan", "TrainingSet", "TrainBatch", "batches", "IterationBatches", "train_loader"]

PathLike = Union[str, Path]


# ---------------------------------------------------------------------------------------------
# which file each slot of each global batch reads


class BatchPlan:
    """The files of every global batch: iteration ``t`` of epoch ``e = t // iterations_per_epoch``
    reads positions ``(t % iterations_per_epoch) * global_batch + s`` of epoch ``e``'s permutation."""

    def __init__(self, num_items: int, global_batch: int, seed: int):
        if global_batch < 1:
            raise PspZooError(f"the global batch must hold at least one image, got {global_batch}")
        if num_items < global_batch:
            raise DatasetError(f"the training set holds {num_items} images, fewer than one batch of "
                               f"{global_batch}: every batch would be dropped; use a smaller batch or more images")
        sample_rng(seed, 0, 0)  # the seed's check
        self.num_items, self.global_batch, self.seed = num_items, global_batch, int(seed)
        self.iterations_per_epoch = num_items // global_batch
        self._order: Tuple[int, Optional[np.ndarray]] = (-1, None)

    def epoch(self, iteration: int) -> int:
        """0-based pass over the files that ``iteration`` belongs to (mmseg logs ``epoch + 1``)."""
        return iteration // self.iterations_per_epoch

    def order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s permutation of the file indices (its own seed stream: ``spawn_key`` keeps
        it apart from every sample's ``sample_rng``)."""
        if self._order[0] != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch], spawn_key=(1,))))
            self._order = (epoch, rng.permutation(self.num_items))
        return self._order[1]

    def index(self, iteration: int, sample: int) -> int:
        """The file that slot ``sample`` of the global batch of ``iteration`` reads."""
        if not 0 <= sample < self.global_batch or iteration < 0:
            raise IndexError(f"no slot {sample} at iteration {iteration} (global batch {self.global_batch})")
        position = (iteration % self.iterations_per_epoch) * self.global_batch + sample
        return int(self.order(self.epoch(iteration))[position])


def batches(plan: BatchPlan, start_iteration: int = 0, *, world_size: int = 1, rank: int = 0,
            stop: Optional[int] = None) -> Iterator[List[Tuple[int, int]]]:
    """This process's ``(iteration, sample)`` keys, one list per iteration, from ``start_iteration`` to
    ``stop`` (excluded; None: forever): rank ``r`` of ``world_size`` reads the r-th of ``world_size``
    equal consecutive slices of the global batch (the trainer splits it into accumulation chunks)."""
    if not 0 <= rank < world_size or plan.global_batch % world_size:
        raise PspZooError(f"the global batch of {plan.global_batch} does not split into {world_size} equal "
                          f"slices for rank {rank}")
    per_rank = plan.global_batch // world_size
    iterations = itertools.count(start_iteration) if stop is None else range(start_iteration, stop)
    for iteration in iterations:
        yield [(iteration, sample) for sample in range(rank * per_rank, (rank + 1) * per_rank)]


class IterationBatches(torch.utils.data.Sampler):
    """``batches`` as a DataLoader ``batch_sampler``: it yields the keys ``TrainingSet`` reads."""

    def __init__(self, plan: BatchPlan, start_iteration: int = 0, **kwargs):
        self.plan, self.start_iteration, self.kwargs = plan, start_iteration, kwargs
        next(batches(plan, start_iteration, **{**kwargs, "stop": None}))  # the arguments' check

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        return batches(self.plan, self.start_iteration, **self.kwargs)

    def __len__(self) -> int:
        stop = self.kwargs.get("stop")
        if stop is None:
            raise TypeError("an endless run of batches has no length")
        return max(stop - self.start_iteration, 0)


# ---------------------------------------------------------------------------------------------
# the dataset: (iteration, sample) -> transformed image and label


class TrainingSet(torch.utils.data.Dataset):
    """The training split of ``dataset`` under ``data_root``, as the stream of global batches of a run.

    ``data[(t, s)]`` is slot ``s`` of the global batch of iteration ``t``: the file ``plan.index(t, s)``,
    decoded (image BGR by OpenCV, label by Pillow, Cityscapes labelIds mapped, ``reduce_zero_label``
    applied: the dataset's unless given) and transformed with ``sample_rng(seed, t, s)``: a float32
    3 x h x w tensor and an int64 h x w tensor.
    """

    def __init__(self, dataset: str, data_root: PathLike, transform: TrainTransform, *, seed: int,
                 global_batch: int, reduce_zero_label: Optional[bool] = None,
                 items: Optional[Sequence[Item]] = None, manifest=None):
        if reduce_zero_label is None:
            reduce_zero_label = dataset_spec(dataset, manifest).reduce_zero_label
        items = list(items) if items is not None else training_items(dataset, data_root, manifest=manifest)
        # the validation reader decodes and maps labels; its test-time resize is never used here
        self.reader = SegmentationDataset(dataset, data_root, img_scales=[(1, 1)], reduce_zero_label=reduce_zero_label,
                                          items=items, manifest=manifest)
        self.dataset, self.transform, self.seed = dataset, transform, int(seed)
        self.plan = BatchPlan(len(items), global_batch, seed)

    @property
    def items(self) -> List[Item]:
        return self.reader.items

    def __len__(self) -> int:
        return len(self.reader)

    def read(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """File ``index`` untransformed: BGR uint8 H x W x 3 image and uint8 H x W label."""
        item = self.reader.items[index]
        image = np.ascontiguousarray(read_image(item.image_path)[:, :, ::-1])  # RGB -> BGR, exactly
        label = self.reader.load_label(index)
        if label.shape != image.shape[:2]:
            raise DatasetError(f"label {item.label_path} is {label.shape[1]}x{label.shape[0]} but image "
                               f"{item.image_path} is {image.shape[1]}x{image.shape[0]}; they must match")
        return image, label

    def __getitem__(self, key: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        iteration, sample = key
        image, label = self.read(self.plan.index(iteration, sample))
        image, label = self.transform(image, label, sample_rng(self.seed, iteration, sample))
        return torch.from_numpy(image), torch.from_numpy(label)


# ---------------------------------------------------------------------------------------------
# loading in worker processes


@dataclass
class TrainBatch:
    """This process's part of the global batch of ``iteration``."""

    iteration: int
    epoch: int  # 0-based pass over the files
    samples: Tuple[int, ...]  # the global-batch slots these images fill
    images: torch.Tensor  # N x 3 x h x w float32, normalized RGB
    labels: torch.Tensor  # N x h x w int64, the dataset's ignore index where unlabelled or padded


@dataclass
class _Failure:
    message: str


class _Keyed(torch.utils.data.Dataset):
    """Returns each sample with its key, and a worker's PspZooError as a value to re-raise here in one line."""

    def __init__(self, data: TrainingSet):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: Tuple[int, int]):
        try:
            return key, self.data[key]
        except PspZooError as exc:
            return _Failure(str(exc))


def _collate(samples: list):
    failed = [s for s in samples if isinstance(s, _Failure)]
    if failed:
        return failed[0]
    keys = [key for key, _ in samples]
    return (keys, torch.stack([image for _, (image, _) in samples]),
            torch.stack([label for _, (_, label) in samples]))


def train_loader(data: TrainingSet, *, start_iteration: int = 0, stop: Optional[int] = None, world_size: int = 1,
                 rank: int = 0, num_workers: Optional[int] = None, pin_memory: bool = False) -> Iterator[TrainBatch]:
    """This process's batches from ``start_iteration`` (a resumed run passes its iteration) to ``stop``,
    decoded and transformed in ``num_workers`` processes (0: here). The same for any worker count."""
    sampler = IterationBatches(data.plan, start_iteration, world_size=world_size, rank=rank, stop=stop)
    workers = default_num_workers() if num_workers is None else num_workers
    # No OpenCV call in a worker's init (e.g. cv2.setNumThreads): a forked worker that reconfigures the
    # thread pool it inherited can deadlock; plain OpenCV calls in it are safe.
    # A private generator: by default a DataLoader draws its workers' base seed from torch's global
    # RNG, which would shift the model's dropout draws whenever a loader starts (e.g. on resume).
    private = torch.Generator().manual_seed(data.seed)
    loader = torch.utils.data.DataLoader(
        _Keyed(data), batch_sampler=sampler, num_workers=workers, collate_fn=_collate, pin_memory=pin_memory,
        prefetch_factor=2 if workers else None,
        generator=private)
    for batch in loader:
        if isinstance(batch, _Failure):
            raise DatasetError(batch.message)
        keys, images, labels = batch
        iteration = keys[0][0]
        yield TrainBatch(iteration, data.plan.epoch(iteration), tuple(sample for _, sample in keys), images, labels)
