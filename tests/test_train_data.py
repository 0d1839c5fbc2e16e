"""Training splits read from generated folder trees in each dataset's real layout (mmseg's data.train
paths, written out here, not derived from the manifest), and the batches of a run: the same samples
whatever the number of processes, accumulation steps and loader workers, and after a resume."""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from psp_zoo.datasets.readers import training_items
from psp_zoo.errors import DatasetError, PspZooError
from psp_zoo.training.data import BatchPlan, TrainingSet, batches, train_loader
from psp_zoo.training.pipeline import TrainTransform, sample_rng

# dataset -> (folder below the data root, [(image path, label path)] in mmseg's reading order,
#             decoys: files that are not training images, reduce_zero_label, palette labels)
CITY = ("leftImg8bit/train/{0}/{0}_000000_0000{1}_leftImg8bit.png",
        "gtFine/train/{0}/{0}_000000_0000{1}_gtFine_labelTrainIds.png")
LAYOUTS = {
    "cityscapes": ("data/cityscapes", [(CITY[0].format(c, n), CITY[1].format(c, n))
                                       for c, n in (("aachen", 19), ("aachen", 20), ("bochum", 13))],
                   ["leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png",
                    "leftImg8bit/train/aachen/aachen_000000_000019_gtFine_color.png"], False),
    "ade20k": ("ade/ADEChallengeData2016", [(f"images/training/ADE_train_0000000{i}.jpg",
                                             f"annotations/training/ADE_train_0000000{i}.png") for i in (1, 2, 3)],
               ["images/validation/ADE_val_00000001.jpg", "images/training/notes.txt"], True),
    "coco_stuff10k": ("coco_stuff10k", [(f"images/train2014/COCO_train2014_00000000007{i}.jpg",
                                         f"annotations/train2014/COCO_train2014_00000000007{i}_labelTrainIds.png")
                                        for i in (7, 8)], ["images/test2014/COCO_train2014_000000000001.jpg"], True),
    "coco_stuff164k": ("", [(f"images/train2017/00000000000{i}.jpg",
                             f"annotations/train2017/00000000000{i}_labelTrainIds.png") for i in (9, 5)],
                       ["images/val2017/000000000139.jpg"], False),
    "loveda": ("loveDA", [(f"img_dir/train/{i}.png", f"ann_dir/train/{i}.png") for i in (0, 1, 10)],
               ["img_dir/val/2522.png"], True),
    "potsdam": ("potsdam", [(f"img_dir/train/2_10_{i}_0_512_512.png", f"ann_dir/train/2_10_{i}_0_512_512.png")
                            for i in (0, 256)], ["img_dir/val/2_13_0_0_512_512.png"], True),
    "vaihingen": ("data/vaihingen", [(f"img_dir/train/area1_{i}_0_512_512.png",
                                      f"ann_dir/train/area1_{i}_0_512_512.png") for i in (0, 256)], [], True),
    "isaid": ("iSAID", [(f"img_dir/train/P000{i}_0_896_0_896.png",
                         f"ann_dir/train/P000{i}_0_896_0_896_instance_color_RGB.png") for i in (0, 1)],
              ["img_dir/val/P0003_0_896_0_896.png"], False),
}


def _pair(seed: int, h: int = 24, w: int = 32, classes: int = 6):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = rng.integers(0, classes, (h, w), dtype=np.uint8)
    label[0, :4] = 255
    return image, label


def _write(root: Path, image_path: str, label_path: str, seed: int, palette: bool = False):
    image, label = _pair(seed)
    for path in (root / image_path, root / label_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(root / image_path), image)
    stored = Image.fromarray(label, mode="L")
    if palette:  # VOC's label PNGs hold palette indices
        stored = stored.convert("P")
        stored.putpalette([(i * 37) % 256 for i in range(768)])
    stored.save(root / label_path)
    return label


def _reduced(label: np.ndarray) -> np.ndarray:
    return np.where(label == 0, 255, np.where(label == 255, 255, label.astype(np.int64) - 1)).astype(np.uint8)


def _check_reads(dataset: str, data_root: Path, folder: Path, pairs, labels, reduce_zero_label: bool):
    items = training_items(dataset, data_root)
    assert [(str(i.image_path.relative_to(folder)), str(i.label_path.relative_to(folder))) for i in items] == pairs
    transform = TrainTransform(crop_size=(24, 32), img_scale=(32, 24))
    data = TrainingSet(dataset, data_root, transform, seed=0, global_batch=1)
    for index, (image_path, _) in enumerate(pairs):
        image, label = data.read(index)
        assert np.array_equal(image, cv2.imread(str(folder / image_path), cv2.IMREAD_COLOR))  # BGR, as decoded
        assert np.array_equal(label, _reduced(labels[index]) if reduce_zero_label else labels[index])


@pytest.mark.parametrize("dataset", sorted(LAYOUTS))
def test_each_training_split_is_read_from_its_real_layout(tmp_path, dataset):
    location, pairs, decoys, reduce_zero_label = LAYOUTS[dataset]
    folder = tmp_path / location
    labels = [_write(folder, image, label, seed) for seed, (image, label) in enumerate(pairs)]
    for decoy in decoys:  # validation images, other files: not in the training split
        (folder / decoy).parent.mkdir(parents=True, exist_ok=True)
        (folder / decoy).write_bytes(cv2.imencode(".png", _pair(99)[0])[1].tobytes())
    order = sorted(range(len(pairs)), key=lambda i: pairs[i][0])  # listed by path, as mmcv's scandir + sort
    _check_reads(dataset, tmp_path, folder, [pairs[i] for i in order], [labels[i] for i in order], reduce_zero_label)


def test_voc_aug_reads_train_txt_then_aug_txt_from_their_own_label_folders(tmp_path):
    folder = tmp_path / "VOCdevkit" / "VOC2012"
    names = {"train": ["2007_000032", "2007_000039"], "aug": ["2008_000002", "2007_000033"]}
    labels, pairs = [], []
    for split, label_dir, palette in (("train", "SegmentationClass", True), ("aug", "SegmentationClassAug", False)):
        (folder / "ImageSets/Segmentation").mkdir(parents=True, exist_ok=True)
        (folder / f"ImageSets/Segmentation/{split}.txt").write_text("\n".join(names[split]) + "\n\n")
        for name in names[split]:
            pairs.append((f"JPEGImages/{name}.jpg", f"{label_dir}/{name}.png"))
            labels.append(_write(folder, *pairs[-1], seed=len(pairs), palette=palette))
    _write(folder, "JPEGImages/2007_000129.jpg", "SegmentationClass/2007_000129.png", 50, palette=True)
    (folder / "ImageSets/Segmentation/val.txt").write_text("2007_000129\n")
    _check_reads("voc12aug", tmp_path, folder, pairs, labels, False)


@pytest.mark.parametrize("dataset", ["pascal_context", "pascal_context_59"])
def test_pascal_context_reads_its_train_split_file(tmp_path, dataset):
    folder = tmp_path / "VOC2010"
    pairs = [(f"JPEGImages/2008_00000{i}.jpg", f"SegmentationClassContext/2008_00000{i}.png") for i in (8, 2)]
    labels = [_write(folder, image, label, seed) for seed, (image, label) in enumerate(pairs)]
    _write(folder, "JPEGImages/2008_000003.jpg", "SegmentationClassContext/2008_000003.png", 9)  # not listed
    (folder / "ImageSets/SegmentationContext").mkdir(parents=True)
    (folder / "ImageSets/SegmentationContext/train.txt").write_text("2008_000008\n2008_000002\n")
    _check_reads(dataset, tmp_path, folder, pairs, labels, dataset == "pascal_context_59")


def test_cityscapes_label_ids_are_mapped_when_train_ids_are_absent(tmp_path):
    image_path, label_path = CITY[0].format("aachen", 19), CITY[1].format("aachen", 19)
    ids_path = label_path.replace("_labelTrainIds", "_labelIds")
    _write(tmp_path, image_path, ids_path, 0)
    Image.fromarray(np.array([[7, 26, 0, 33] * 8] * 24, np.uint8), mode="L").save(tmp_path / ids_path)
    data = TrainingSet("cityscapes", tmp_path, TrainTransform(crop_size=(24, 32), img_scale=(32, 24)),
                       seed=0, global_batch=1)
    assert data.items[0].label_path == tmp_path / ids_path
    assert data.read(0)[1][0].tolist() == [0, 13, 255, 18] * 8


def _cityscapes(root: Path, count: int, size=(40, 56)) -> None:
    for i in range(count):
        image, label = _pair(i, *size, classes=4)
        folder = root / "leftImg8bit/train/city"
        folder.mkdir(parents=True, exist_ok=True)
        (root / "gtFine/train/city").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"city_{i:06d}_leftImg8bit.png"), image)
        Image.fromarray(label).save(root / f"gtFine/train/city/city_{i:06d}_gtFine_labelTrainIds.png")


def _training_set(root: Path, seed: int = 7, global_batch: int = 4) -> TrainingSet:
    transform = TrainTransform(crop_size=(24, 32), img_scale=(56, 40))
    return TrainingSet("cityscapes", root, transform, seed=seed, global_batch=global_batch)


def _run(data: TrainingSet, *, start=0, stop=4, world_size=1, num_workers=0):
    """{iteration: (slots, images, labels)} gathered over every rank, in slot order."""
    out = {}
    per_rank = data.plan.global_batch // world_size
    for rank in range(world_size):
        for batch in train_loader(data, start_iteration=start, stop=stop, world_size=world_size, rank=rank,
                                  num_workers=num_workers):
            assert batch.images.shape == (per_rank, 3, 24, 32) and batch.images.dtype == torch.float32
            assert batch.labels.shape == (per_rank, 24, 32) and batch.labels.dtype == torch.int64
            out.setdefault(batch.iteration, []).append(batch)
    return {t: (sum((b.samples for b in parts), ()), torch.cat([b.images for b in parts]),
                torch.cat([b.labels for b in parts])) for t, parts in out.items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[t][0] == b[t][0] and torch.equal(a[t][1], b[t][1])
                                        and torch.equal(a[t][2], b[t][2]) for t in a)


def test_the_global_batches_do_not_depend_on_processes_or_workers(tmp_path):
    _cityscapes(tmp_path, 9)
    data = _training_set(tmp_path)
    reference = _run(data)
    assert sorted(reference) == [0, 1, 2, 3] and all(reference[t][0] == (0, 1, 2, 3) for t in reference)
    assert _same(reference, _run(data, world_size=2))
    assert _same(reference, _run(data, world_size=4))
    assert _same(reference, _run(data, world_size=2, num_workers=2))
    resumed = _run(data, start=2)  # the data position of a resumed run is its iteration
    assert _same(resumed, {t: reference[t] for t in (2, 3)})
    again = _run(_training_set(tmp_path))
    assert _same(reference, again)  # same seed, same crops
    other = _run(_training_set(tmp_path, seed=8))
    assert not torch.equal(other[0][1], reference[0][1])


def test_loading_leaves_the_global_random_states_alone(tmp_path):
    """The model's own draws (dropout) must not depend on when or how often a loader starts."""
    _cityscapes(tmp_path, 5)
    data = _training_set(tmp_path, global_batch=2)
    torch.manual_seed(0)
    np.random.seed(0)
    before = torch.get_rng_state(), np.random.get_state()[1].copy()
    for workers in (0, 1):
        _run(data, stop=2, num_workers=workers)
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])


def test_a_sample_is_its_file_transformed_with_its_own_key(tmp_path):
    _cityscapes(tmp_path, 5)
    data = _training_set(tmp_path, global_batch=2)
    image, label = data[(3, 1)]
    raw = data.read(data.plan.index(3, 1))
    expected = data.transform(*raw, sample_rng(7, 3, 1))
    assert torch.equal(image, torch.from_numpy(expected[0])) and torch.equal(label, torch.from_numpy(expected[1]))
    assert set(label.unique().tolist()) <= {0, 1, 2, 3, 255}


def test_each_epoch_reads_a_permutation_and_drops_the_incomplete_batch():
    plan = BatchPlan(10, 4, seed=3)
    assert plan.iterations_per_epoch == 2
    epochs = [[plan.index(t, s) for t in range(2 * e, 2 * e + 2) for s in range(4)] for e in range(3)]
    for files in epochs:
        assert len(set(files)) == 8 and set(files) <= set(range(10))
    assert epochs[0] != epochs[1] and [plan.epoch(t) for t in range(5)] == [0, 0, 1, 1, 2]
    assert epochs[0] == [BatchPlan(10, 4, seed=3).index(t, s) for t in range(2) for s in range(4)]
    assert epochs[0] != [BatchPlan(10, 4, seed=4).index(t, s) for t in range(2) for s in range(4)]
    with pytest.raises(IndexError):
        plan.index(0, 4)
    # the shuffle has its own stream: not the draws of any sample (seed, iteration = epoch, sample 0)
    assert not np.array_equal(plan.order(1), sample_rng(3, 1, 0).permutation(10))


def test_ranks_take_consecutive_slices_of_the_global_batch():
    plan = BatchPlan(20, 8, seed=0)
    assert list(batches(plan, 5, world_size=2, rank=1, stop=7)) == [
        [(5, 4), (5, 5), (5, 6), (5, 7)], [(6, 4), (6, 5), (6, 6), (6, 7)]]
    with pytest.raises(PspZooError, match="global batch of 8 does not split into 3"):
        next(batches(plan, 0, world_size=3, rank=0))
    with pytest.raises(PspZooError, match="rank 2"):
        next(batches(plan, 0, world_size=2, rank=2))


def test_missing_or_unusable_training_data_is_named(tmp_path):
    with pytest.raises(DatasetError, match="dark_zurich declares no training split"):
        training_items("dark_zurich", tmp_path)
    with pytest.raises(DatasetError, match="no cityscapes training images under"):
        training_items("cityscapes", tmp_path)
    _cityscapes(tmp_path, 3)
    (tmp_path / "leftImg8bit/train/city/city_000009_leftImg8bit.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="has no label: expected .*city_000009_gtFine_labelTrainIds.png"):
        training_items("cityscapes", tmp_path)
    label = tmp_path / "gtFine/train/city/city_000009_gtFine_labelTrainIds.png"
    Image.fromarray(np.zeros((40, 56), np.uint8)).save(label)
    with pytest.raises(DatasetError, match="fewer than one batch of 5"):
        _training_set(tmp_path, global_batch=5)
    data = _training_set(tmp_path, global_batch=4)
    with pytest.raises(DatasetError, match="cannot read image .*city_000009_leftImg8bit.png") as raised:
        _run(data, stop=1, num_workers=1)  # decoded in a worker, raised here in one line
    assert "\n" not in str(raised.value)
    voc = tmp_path / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "SegmentationClass").mkdir()
    with pytest.raises(DatasetError, match="split file .*train.txt is missing"):
        training_items("voc12aug", voc)
    (voc / "ImageSets/Segmentation").mkdir(parents=True)
    (voc / "ImageSets/Segmentation/train.txt").write_text("2007_000032\n")
    with pytest.raises(DatasetError, match="2007_000032.jpg listed in .*train.txt is missing"):
        training_items("voc12aug", voc)


USER_DATASET = """
datasets:
  shapes:
    title: Shapes
    num_classes: 4
    img_scale: [56, 40]
    reduce_zero_label: false
    train_images_per_gpu: 2
    test: {mode: whole}
    layout:
      folders: ["", shapes]
      train: [{images: images/train, labels: labels/train}, {images: images/extra, split: extra.txt}]
      images: images/val
      labels: labels/val
      image_suffix: .png
      label_suffix: _mask.png
      split: val.txt
    classes: [a, b, c, d]
"""


def test_a_user_dataset_declares_its_training_split(tmp_path):
    manifest = tmp_path / "user.yml"
    manifest.write_text(USER_DATASET)
    folder = tmp_path / "shapes"
    pairs = [("images/train/x.png", "labels/train/x_mask.png"), ("images/extra/y.png", "labels/val/y_mask.png")]
    for seed, (image, label) in enumerate(pairs):
        _write(folder, image, label, seed)
    _write(folder, "images/extra/z.png", "labels/val/z_mask.png", 5)  # not in extra.txt
    (folder / "extra.txt").write_text("y\n")
    items = training_items("shapes", tmp_path, manifest=manifest)
    assert [(str(i.image_path.relative_to(folder)), str(i.label_path.relative_to(folder))) for i in items] == pairs


@pytest.mark.parametrize("train,field", [
    ("{folders: [other]}", "layout.train[0].folders"),
    ("[]", "layout.train"),
    ("[{images: ../up}]", "layout.images"),
    ("images/train", "layout.train"),
])
def test_a_bad_training_split_declaration_names_its_field(tmp_path, train, field):
    from psp_zoo.errors import ManifestError
    from psp_zoo.manifest.loading import load_manifest

    manifest = tmp_path / "user.yml"
    manifest.write_text(USER_DATASET.replace(
        "[{images: images/train, labels: labels/train}, {images: images/extra, split: extra.txt}]", train))
    with pytest.raises(ManifestError, match=f"field '{re.escape(field)}'"):
        load_manifest(manifest)


STARTS_WHILE_OPENCV_WORKS = """
import sys, threading
from pathlib import Path
import cv2, numpy as np
sys.path[:0] = [sys.argv[1], str(Path(sys.argv[1]).parent)]  # the tests, the checkout they test
from test_train_data import _cityscapes, _training_set
from psp_zoo.training.data import train_loader
root = Path(sys.argv[2])
_cityscapes(root, 4)
data = _training_set(root, global_batch=2)
big, stop = np.random.default_rng(0).integers(0, 256, (2000, 2000, 3), dtype=np.uint8), threading.Event()
def busy():
    while not stop.is_set():
        cv2.resize(big, (3000, 3000))  # OpenCV's thread pool is busy whenever a worker forks
thread = threading.Thread(target=busy)
thread.start()
for _ in range(30):  # the old worker init hung within 15 starts, most runs
    assert sum(1 for _ in train_loader(data, stop=1, num_workers=2)) == 1
stop.set()
thread.join()
print("ok")
"""


def test_workers_start_while_opencv_threads_are_busy(tmp_path):
    """A forked worker that reconfigured OpenCV's inherited thread pool could hang for ever."""
    import os
    import signal
    import subprocess
    import sys

    run = subprocess.Popen([sys.executable, "-c", STARTS_WHILE_OPENCV_WORKS, str(Path(__file__).parent), str(tmp_path)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = run.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)  # the hung workers too
        run.communicate()
        pytest.fail("starting loader workers hung (a forked worker deadlocked)")
    assert run.returncode == 0 and out.strip() == "ok", err[-2000:]
