"""The manifest holds every published checkpoint with the table's numbers, and rejects bad input."""
from __future__ import annotations

import re
import textwrap

import pytest

import psp_zoo
from psp_zoo import ManifestError, UnknownModelError, get_checkpoint, list_models, load_manifest

from conftest import REFERENCE

TABLE = REFERENCE / "000_3f7e1852bf785c2c.txt"
DATASET_TITLES = {"Cityscapes": "cityscapes", "ADE20K": "ade20k",
                  "Pascal VOC 2012 + Aug": "voc12aug", "Pascal Context": "pascal_context"}


def _table_rows():
    """Parse the published README table independently of the manifest."""
    rows, dataset = [], None
    for line in TABLE.read_text().splitlines():
        if line.startswith("### "):
            dataset = DATASET_TITLES[line[4:].strip()]
        elif line.startswith("| PSPNet"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            url = re.search(r"\[model\]\((.*?)\)", line).group(1)
            log = re.search(r"\[log\]\((.*?)\)", line).group(1)
            num = lambda s: None if s == "-" else float(s)  # noqa: E731
            rows.append(dict(dataset=dataset, backbone=cells[1], crop=cells[2], schedule=int(cells[3]),
                             mem=num(cells[4]), fps=num(cells[5]), miou=num(cells[6]), ms=num(cells[7]),
                             url=url, log=log, name=url.split("/")[-2]))
    return rows


def test_manifest_holds_every_published_row_exactly():
    rows = _table_rows()
    assert len(rows) == 18
    assert list_models() == [r["name"] for r in rows]
    for row in rows:
        ckpt = get_checkpoint(row["name"])
        assert ckpt.dataset == row["dataset"]
        assert ckpt.backbone == row["backbone"]
        assert ckpt.depth == int(row["backbone"][2:-3])
        assert "x".join(map(str, ckpt.crop_size)) == row["crop"]
        assert ckpt.schedule == row["schedule"]
        assert ckpt.url == row["url"] and ckpt.log_url == row["log"]
        assert ckpt.url.endswith(f"-{ckpt.hash_prefix}.pth")
        p = ckpt.published
        assert (p.miou, p.miou_ms_flip, p.mem_gb, p.fps) == (row["miou"], row["ms"], row["mem"], row["fps"])


@pytest.mark.parametrize("name,mode,scale,crop,stride,align,classes,rzl", [
    ("pspnet_r50-d8_512x1024_40k_cityscapes", "whole", (2048, 1024), None, None, False, 19, False),
    ("pspnet_r101-d8_769x769_80k_cityscapes", "slide", (2049, 1025), (769, 769), (513, 513), True, 19, False),
    ("pspnet_r50-d8_512x512_160k_ade20k", "whole", (2048, 512), None, None, False, 150, True),
    ("pspnet_r101-d8_512x512_20k_voc12aug", "whole", (2048, 512), None, None, False, 21, False),
    ("pspnet_r101-d8_480x480_40k_pascal_context", "slide", (520, 520), (480, 480), (320, 320), False, 60, False),
])
def test_test_settings_follow_reference(name, mode, scale, crop, stride, align, classes, rzl):
    c = get_checkpoint(name)
    assert (c.test_mode, c.img_scale, c.test_crop_size, c.test_stride) == (mode, scale, crop, stride)
    assert (c.align_corners, c.num_classes, c.reduce_zero_label) == (align, classes, rzl)
    assert c.model_kwargs() == {"depth": c.depth, "num_classes": classes, "align_corners": align}


def test_aliases_and_file_stem_resolve_to_the_same_entry():
    name = "pspnet_r50-d8_512x1024_40k_cityscapes"
    entry = get_checkpoint(name)
    assert get_checkpoint("pspnet_r50-d8_4xb2-40k_cityscapes-512x1024") is entry
    assert get_checkpoint("pspnet_r50-d8_512x1024_40k_cityscapes_20200605_003338-2966598c") is entry
    assert get_checkpoint(entry.filename) is entry
    assert get_checkpoint("pspnet_r101-d8_4xb4-40k_pascal-context-480x480").dataset == "pascal_context"
    assert get_checkpoint("pspnet_r50-d8_4xb4-80k_ade20k-512x512").schedule == 80000


def test_checkpoint_records_are_frozen():
    entry = get_checkpoint("pspnet_r50-d8_512x1024_40k_cityscapes")
    with pytest.raises(AttributeError):
        entry.url = "http://elsewhere"


def test_list_models_filters():
    assert len(list_models(dataset="cityscapes")) == 8
    assert len(list_models(dataset="ade20k")) == 4
    assert list_models(dataset="pascal_context") == [
        "pspnet_r101-d8_480x480_40k_pascal_context", "pspnet_r101-d8_480x480_80k_pascal_context"]
    assert list_models(dataset="pascal_context_59") == []
    assert list_models(pattern="*r101*769*") == [
        "pspnet_r101-d8_769x769_40k_cityscapes", "pspnet_r101-d8_769x769_80k_cityscapes"]
    with pytest.raises(psp_zoo.PspZooError, match="unknown dataset 'kitti'.*cityscapes"):
        list_models(dataset="kitti")


def test_unknown_name_lists_closest_names():
    with pytest.raises(UnknownModelError) as info:
        get_checkpoint("pspnet_r50-d8_512x1024_40k_cityscape")
    assert "did you mean" in str(info.value)
    assert "pspnet_r50-d8_512x1024_40k_cityscapes" in str(info.value)
    with pytest.raises(UnknownModelError, match="pspnet_r50-d8_512x1024_40k_cityscapes"):
        get_checkpoint("pspnet_r50_cityscapes")


GOOD_ENTRY = """
models:
  - name: my_pspnet
    dataset: ade20k
    depth: 50
    crop_size: [512, 512]
    schedule: 1000
    weights: http://127.0.0.1:1/my_pspnet_20260101_000000-0123abcd.pth
    hash: "0123abcd"
    published: {mIoU: 40.0}
"""


def _write(tmp_path, text):
    path = tmp_path / "user.yml"
    path.write_text(textwrap.dedent(text))
    return path


def test_user_manifest_adds_and_overrides(tmp_path, monkeypatch):
    path = _write(tmp_path, GOOD_ENTRY + """
  - name: pspnet_r50-d8_512x1024_40k_cityscapes
    dataset: cityscapes
    depth: 50
    crop_size: [512, 1024]
    schedule: 40000
    weights: http://mirror.local/x/pspnet_r50-d8_512x1024_40k_cityscapes_20200605_003338-2966598c.pth
    hash: "2966598c"
    published: {}
    model: {num_classes: 5, base_channels: 8}
""")
    manifest = load_manifest(path)
    assert len(manifest) == 19
    assert manifest.get("my_pspnet").published.miou == 40.0
    override = manifest.get("pspnet_r50-d8_512x1024_40k_cityscapes")
    assert override.url.startswith("http://mirror.local/")
    assert override.model_kwargs()["num_classes"] == 5 and override.model_kwargs()["base_channels"] == 8
    monkeypatch.setenv("PSP_ZOO_MANIFEST", str(path))
    assert "my_pspnet" in list_models()
    assert get_checkpoint("my_pspnet").source == str(path)


@pytest.mark.parametrize("change,field", [
    (('hash: "0123abcd"', 'hash: "deadbeef"'), "hash"),
    (('hash: "0123abcd"', "hash: 0123ABCD"), "hash"),
    (("dataset: ade20k", "dataset: kitti"), "dataset"),
    (("depth: 50", "depth: 34"), "depth"),
    (("mIoU: 40.0", "mIoU: 140.0"), "published.mIoU"),
    (("mIoU: 40.0", "mIoU: fast"), "published.mIoU"),
    (("crop_size: [512, 512]", "crop_size: [512]"), "crop_size"),
    (("schedule: 1000", "schedule: -5"), "schedule"),
    (("schedule: 1000", "schedul: 1000"), "schedul"),
    (("-0123abcd.pth", ".pth"), "weights"),
])
def test_broken_manifest_names_entry_and_field(tmp_path, change, field):
    path = _write(tmp_path, GOOD_ENTRY.replace(*change))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert "my_pspnet" in message or "models[0]" in message
    assert f"field '{field}'" in message


def test_duplicate_names_and_aliases_are_rejected(tmp_path):
    with pytest.raises(ManifestError, match="duplicate name"):
        load_manifest(_write(tmp_path, GOOD_ENTRY + GOOD_ENTRY.replace("models:\n", "")))
    clash = GOOD_ENTRY.replace("    depth: 50", "    aliases: [pspnet_r50-d8_4xb2-40k_cityscapes-512x1024]\n    depth: 50")
    with pytest.raises(ManifestError, match="already names"):
        load_manifest(_write(tmp_path, clash))


def test_unreadable_manifest_is_reported(tmp_path):
    with pytest.raises(ManifestError, match="cannot read manifest"):
        load_manifest(tmp_path / "missing.yml")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(_write(tmp_path, "models: [unclosed"))


def test_binary_manifest_is_one_clear_error(tmp_path):
    path = tmp_path / "user.yml"
    path.write_bytes(b"\xff\xfe\x00models: []")  # e.g. saved as UTF-16, or the wrong file
    with pytest.raises(ManifestError, match="not UTF-8 text"):
        load_manifest(path)


def test_entry_that_is_not_a_mapping_is_named(tmp_path):
    with pytest.raises(ManifestError, match=r"models\[0\]: the entry itself: expected a mapping, got int"):
        load_manifest(_write(tmp_path, "models:\n  - 3\n"))
