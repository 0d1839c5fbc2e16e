"""The manifest holds every published checkpoint with the table's numbers, and rejects bad input."""
from __future__ import annotations

import hashlib
import re
import textwrap

import pytest

import psp_zoo
from psp_zoo import ManifestError, UnknownModelError, get_checkpoint, list_models, load_manifest

from helpers import REFERENCE, REPO

# a copy of the reference pspnet_family.tsv: every published row of mmseg's PSPNet page
FAMILY = REPO / "tests" / "fixtures" / "pspnet_family.tsv"
TABLE = REFERENCE / "000_3f7e1852bf785c2c.txt"  # the v0.5 README tables (the first 18 checkpoints)
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
    # the manifest now holds the whole family (54): the v0.5 rows are among them, in the table's order
    names = list_models()
    assert [n for n in names if n in {r["name"] for r in rows}] == [r["name"] for r in rows]
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


def _family_rows():
    """Parse the reference TSV independently of the manifest ('-' = not published)."""
    lines = FAMILY.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    num = lambda s: None if s == "-" else float(s)  # noqa: E731
    rows = []
    for line in lines[1:]:
        row = dict(zip(header, line.split("\t")))
        for key in ("mem_gb", "fps", "miou", "miou_msflip"):
            row[key] = num(row[key])
        rows.append(row)
    return rows


# Documented departures from the TSV, each checked against mmseg's configs and metafiles:
# mmseg 1.x's README and metafile give the R-50-D32 (V1c) checkpoint the V1b row's config name; its own
# 1.x config (same model as the 0.x config) is pspnet_r50-d32_4xb2-80k_cityscapes-512x1024.
ALIAS_FIXES = {"pspnet_r50-d32_512x1024_80k_cityscapes": "pspnet_r50-d32_4xb2-80k_cityscapes-512x1024"}
RSB_D8 = "pspnet_r50-d8_rsb-pretrain_512x1024_adamw_80k_cityscapes"
HOST = "https://download.openmmlab.com/mmsegmentation/v0.5/pspnet/"


def _dataset_keys():
    """Results-table section title -> dataset key, from the manifest's dataset declarations."""
    return {spec.title: key for key, spec in load_manifest().datasets.items()}


def _published(p):
    return (p.miou, p.miou_ms_flip, p.mem_gb, p.fps)


def test_manifest_equals_the_family_table_for_all_54_checkpoints():
    manifest, keys = load_manifest(), _dataset_keys()
    rows = [r for r in _family_rows() if keys[r["dataset"]] not in ("dark_zurich", "night_driving")]
    mmseg = [c.name for c in manifest if c.family == "mmseg"]
    assert len(rows) == len(mmseg) == 54
    assert mmseg == [r["name_0x"] for r in rows]  # mmseg's page order
    for row in rows:
        ckpt = manifest.get(row["name_0x"])
        assert ckpt.name == row["name_0x"]
        assert ckpt.aliases == (ALIAS_FIXES.get(ckpt.name, row["name_1x"]),)
        assert manifest.resolve(ckpt.aliases[0]) == (ckpt, ckpt.dataset)
        assert manifest.resolve(ckpt.file_stem) == (ckpt, ckpt.dataset)
        assert ckpt.dataset == keys[row["dataset"]]
        assert ckpt.backbone == row["backbone"]
        assert "x".join(map(str, ckpt.crop_size)) == row["crop"]
        assert ckpt.schedule == int(row["iters"])
        assert ckpt.url == row["ckpt_url"] and ckpt.log_url == row["log_url"]
        assert ckpt.url.endswith(f"-{ckpt.hash_prefix}.pth")
        assert _published(ckpt.published) == (row["miou"], row["miou_msflip"], row["mem_gb"], row["fps"])
        assert ckpt.published_on[ckpt.dataset] == ckpt.published and ckpt.datasets[0] == ckpt.dataset


def test_cross_dataset_rows_belong_to_the_cityscapes_checkpoints():
    manifest, keys = load_manifest(), _dataset_keys()
    cross = [r for r in _family_rows() if keys[r["dataset"]] in ("dark_zurich", "night_driving")]
    published = [r for r in cross if r["ckpt_url"]]
    assert len(published) == 6
    for row in published:
        dataset = keys[row["dataset"]]
        ckpt, resolved = manifest.resolve(row["name_0x"])
        assert (ckpt.dataset, ckpt.url, ckpt.log_url, resolved) == ("cityscapes", row["ckpt_url"], row["log_url"],
                                                                    dataset)
        assert manifest.resolve(row["name_1x"]) == (ckpt, dataset)
        assert manifest.get(row["name_0x"]) is ckpt
        assert ckpt.backbone == row["backbone"] and ckpt.schedule == int(row["iters"])
        assert _published(ckpt.published_on[dataset]) == (row["miou"], row["miou_msflip"], row["mem_gb"], row["fps"])
    # the three checkpoints the page evaluates at night, and only those
    carriers = ["pspnet_r50-d8_512x1024_40k_cityscapes", "pspnet_r101-d8_512x1024_40k_cityscapes",
                "pspnet_r101b-d8_512x1024_80k_cityscapes"]
    assert list_models(dataset="dark_zurich") == list_models(dataset="night_driving") == carriers
    assert [c.name for c in manifest if len(c.datasets) > 1] == carriers
    assert manifest.get(carriers[0]).datasets == ("cityscapes", "dark_zurich", "night_driving")
    # rows of configs without a published number (no checkpoint named) are not psp-zoo names
    for row in cross:
        if not row["ckpt_url"]:
            assert row["miou"] is None and row["name_0x"] not in manifest and row["name_1x"] not in manifest
    assert manifest.get("pspnet_r50-d8_512x1024_80k_cityscapes").datasets == ("cityscapes",)


def test_test_settings_per_evaluation_dataset():
    entry = get_checkpoint("pspnet_r101b-d8_512x1024_80k_cityscapes")
    assert entry.test_settings() == entry.test_settings("cityscapes") == entry.test
    dark = entry.test_settings("dark_zurich")
    assert (dark.mode, dark.img_scale, dark.align_corners) == ("whole", (1920, 1080), False)
    assert entry.test_settings("night_driving") == dark
    assert entry.published_on["night_driving"].miou == 22.25 and entry.published.miou == 79.69
    with pytest.raises(psp_zoo.PspZooError, match=r"no published results on dataset 'ade20k'.*"
                                                  r"published on: cityscapes, dark_zurich, night_driving"):
        entry.test_settings("ade20k")


def test_url_trap_rsb_checkpoint_lists_both_folders_in_order():
    entry = get_checkpoint(RSB_D8)
    row = next(r for r in _family_rows() if r["name_0x"] == RSB_D8)
    assert entry.urls == (
        HOST + f"{RSB_D8}/{RSB_D8}_20220315_123238-588c30be.pth",  # 0.x metafile
        HOST + f"pspnet_r50-d8_512x1024_80k_cityscapes/{RSB_D8}_20220315_123238-588c30be.pth",  # 1.x
    )
    assert entry.url == entry.urls[0] == row["ckpt_url"]
    assert {u.rsplit("/", 1)[1] for u in entry.urls} == {entry.filename}  # one file, one hash
    assert entry.log_url == row["log_url"] and "/pspnet_r50-d8_512x1024_80k_cityscapes/" in entry.log_url
    assert get_checkpoint(entry.file_stem) is entry
    assert all(len(c.urls) == 1 for c in load_manifest() if c.name != RSB_D8 and not c.by_hand)


def test_url_trap_hosts_and_log_names():
    manifest = load_manifest()
    for ckpt in (c for c in manifest if c.family == "mmseg"):
        assert all(u.startswith(HOST + ckpt.name + "/") or ckpt.name == RSB_D8 for u in ckpt.urls)
        assert ckpt.log_url.startswith(HOST)
    # mmseg 1.x's metafile has download.oz1z1penmmlab.com for this one
    assert manifest.get("pspnet_r101-d8_769x769_80k_cityscapes").url == (
        HOST + "pspnet_r101-d8_769x769_80k_cityscapes/"
               "pspnet_r101-d8_769x769_80k_cityscapes_20200606_225055-dba412fa.pth")
    # Pascal Context logs are named <config>-<date>_<time>.log.json, the weights <config>_<date>_<time>-<hash>
    for name in manifest.list(dataset="pascal_context") + manifest.list(dataset="pascal_context_59"):
        ckpt = manifest.get(name)
        assert re.fullmatch(re.escape(name) + r"-\d{8}_\d{6}\.log\.json", ckpt.log_url.rsplit("/", 1)[1])
        assert re.fullmatch(re.escape(name) + r"_\d{8}_\d{6}-[0-9a-f]{8}\.pth", ckpt.filename)


def test_r50_d32_keeps_its_own_1x_name():
    manifest = load_manifest()
    v1c = manifest.get("pspnet_r50-d32_512x1024_80k_cityscapes")
    v1b = manifest.get("pspnet_r50b-d32_512x1024_80k_cityscapes")
    assert manifest.get("pspnet_r50-d32_4xb2-80k_cityscapes-512x1024") is v1c
    assert manifest.get("pspnet_r50b-d32_4xb2-80k_cityscapes-512x1024") is v1b
    assert (v1c.deep_stem, v1b.deep_stem, v1c.output_stride, v1b.output_stride) == (True, False, 32, 32)


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
    # model_kwargs() now names the whole network (stem, output stride, head widths): the family has variants
    assert c.model_kwargs() == {"depth": c.depth, "num_classes": classes, "align_corners": align,
                                "deep_stem": True, "output_stride": 8, "channels": 512, "aux_channels": 256}


@pytest.mark.parametrize("backbone,depth,deep_stem,stride,channels", [
    ("R-18-D8", 18, True, 8, (128, 64)),
    ("R-18b-D8", 18, False, 8, (128, 64)),
    ("R-50-D8", 50, True, 8, (512, 256)),
    ("R-50b-D8", 50, False, 8, (512, 256)),
    ("R-50b-D8 rsb", 50, False, 8, (512, 256)),
    ("R-101b-D8", 101, False, 8, (512, 256)),
    ("R-50-D32", 50, True, 32, (512, 256)),
    ("R-50b-D32", 50, False, 32, (512, 256)),
    ("R-50b-D32 rsb", 50, False, 32, (512, 256)),
])
def test_backbone_names_the_network(backbone, depth, deep_stem, stride, channels):
    entries = [c for c in load_manifest() if c.backbone == backbone]
    assert entries
    for entry in entries:
        kwargs = entry.model_kwargs()
        assert (kwargs["depth"], kwargs["deep_stem"], kwargs["output_stride"]) == (depth, deep_stem, stride)
        assert (kwargs["channels"], kwargs["aux_channels"]) == channels
        assert (entry.depth, entry.deep_stem, entry.output_stride) == (depth, deep_stem, stride)


def test_model_kwargs_agree_with_the_model_and_build_it():
    from psp_zoo.model import PSPNet, backbone_kwargs

    built = set()
    for entry in load_manifest():
        kwargs = entry.model_kwargs()
        assert {k: kwargs[k] for k in backbone_kwargs(entry.backbone)} == backbone_kwargs(entry.backbone)
        variant = (entry.depth, entry.deep_stem, entry.output_stride)
        if variant not in built:  # every variant builds; narrow widths keep it quick
            built.add(variant)
            model = PSPNet(**{**kwargs, "stem_channels": 8, "base_channels": 8, "channels": 8, "aux_channels": 8})
            assert model.num_classes == entry.num_classes
    assert len(built) == 8


def test_aliases_and_file_stem_resolve_to_the_same_entry():
    name = "pspnet_r50-d8_512x1024_40k_cityscapes"
    entry = get_checkpoint(name)
    assert get_checkpoint("pspnet_r50-d8_512x1024_40k_dark") is entry  # its Dark Zurich row
    assert load_manifest().resolve("pspnet_r50-d8_4xb2-40k_cityscapes-512x1024_night-driving-1920x1080") == (
        entry, "night_driving")
    assert load_manifest().resolve(name) == (entry, "cityscapes")
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
    # counts follow the whole family now (was 8 Cityscapes and no Pascal Context 59 checkpoint)
    assert len(list_models(dataset="cityscapes")) == 21 + 2  # mmseg's and the PSPNet authors' two
    assert len(list_models(dataset="ade20k")) == 4 + 2
    assert list_models(dataset="pascal_context") == [
        "pspnet_r101-d8_480x480_40k_pascal_context", "pspnet_r101-d8_480x480_80k_pascal_context"]
    assert list_models(dataset="pascal_context_59") == [
        "pspnet_r101-d8_480x480_40k_pascal_context_59", "pspnet_r101-d8_480x480_80k_pascal_context_59"]
    assert list_models(pattern="*r101*769*") == [
        "pspnet_r101-d8_769x769_40k_cityscapes", "pspnet_r101-d8_769x769_80k_cityscapes",
        "pspnet_r101b-d8_769x769_80k_cityscapes"]
    assert list_models(pattern="*_dark") == list_models(dataset="dark_zurich")  # cross-row names match too
    keys = _dataset_keys()
    for key in set(load_manifest().datasets) - {"dark_zurich", "night_driving"}:
        mmseg = [n for n in list_models(dataset=key) if get_checkpoint(n).family == "mmseg"]
        assert mmseg == [r["name_0x"] for r in _family_rows() if keys[r["dataset"]] == key]
    with pytest.raises(psp_zoo.PspZooError, match="unknown dataset 'kitti'.*cityscapes"):
        list_models(dataset="kitti")


def test_unknown_name_lists_closest_names():
    with pytest.raises(UnknownModelError) as info:
        get_checkpoint("pspnet_r50-d8_512x1024_40k_cityscape")
    assert "did you mean" in str(info.value)
    assert "pspnet_r50-d8_512x1024_40k_cityscapes" in str(info.value)
    # the PSPNet authors' semseg_pspnet50_cityscapes is the closest now; mmseg's R-50 rows follow
    with pytest.raises(UnknownModelError, match=r"semseg_pspnet50_cityscapes.*pspnet_r50-d8_\w+_cityscapes"):
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
    assert len(manifest) == 54 + 6 + 1  # mmseg's, the PSPNet authors', the user's
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
    (("depth: 50", "backbone: R-34-D8"), "backbone"),
    (("depth: 50", "backbone: R-50-D16"), "backbone"),
    (("depth: 50", "backbone: [R-50-D8]"), "backbone"),
    (("depth: 50", "depth: 50\n    backbone: R-101b-D8"), "depth"),
    (("    depth: 50\n", ""), "backbone"),
    (("weights: http://127.0.0.1:1/my_pspnet_20260101_000000-0123abcd.pth",
      "weights: [http://127.0.0.1:1/my_pspnet_20260101_000000-0123abcd.pth, http://127.0.0.1:2/other-0123abcd.pth]"),
     "weights[1]"),
    (("weights: http://127.0.0.1:1/my_pspnet_20260101_000000-0123abcd.pth", "weights: []"), "weights"),
    (("weights: http://127.0.0.1:1/my_pspnet_20260101_000000-0123abcd.pth",
      "weights: [http://127.0.0.1:1/my_pspnet_20260101_000000-0123abcd.pth, 7]"), "weights[1]"),
    (("published: {mIoU: 40.0}", "published: {mIoU: 40.0}\n    published_on: {kitti: {published: {}}}"),
     "published_on.kitti"),
    (("published: {mIoU: 40.0}", "published: {mIoU: 40.0}\n    published_on: {ade20k: {published: {}}}"),
     "published_on.ade20k"),
    (("published: {mIoU: 40.0}", "published: {mIoU: 40.0}\n    published_on: {dark_zurich: {published: {}}}"),
     "published_on.dark_zurich"),  # 150 classes cannot be scored on a 19-class dataset
    (("published: {mIoU: 40.0}", "published: {mIoU: 40.0}\n    model: {num_classes: 19}\n"
                                 "    published_on: {dark_zurich: {aliases: [x]}}"),
     "published_on.dark_zurich.published"),
    (("published: {mIoU: 40.0}", "published: {mIoU: 40.0}\n    model: {num_classes: 19}\n"
                                 "    published_on: {dark_zurich: {published: {mIoU: 400}}}"),
     "published_on.dark_zurich.published.mIoU"),
    (("published: {mIoU: 40.0}", "published: {mIoU: 40.0}\n    model: {num_classes: 19}\n"
                                 "    published_on: {dark_zurich: {published: {}, alias: [x]}}"),
     "published_on.dark_zurich.alias"),
    (("published: {mIoU: 40.0}", "published: {mIoU: 40.0}\n    model: {num_classes: 19}\n"
                                 "    published_on: {dark_zurich: {published: {}, aliases: x}}"),
     "published_on.dark_zurich.aliases"),
    (("published: {mIoU: 40.0}", "published: {mIoU: 40.0}\n    published_on: [dark_zurich]"), "published_on"),
])
def test_broken_manifest_names_entry_and_field(tmp_path, change, field):
    path = _write(tmp_path, GOOD_ENTRY.replace(*change))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert "my_pspnet" in message or "models[0]" in message
    assert f"field '{field}'" in message


def test_user_entry_with_mirrors_and_a_cross_dataset_row(tmp_path):
    text = GOOD_ENTRY.replace("dataset: ade20k", "dataset: cityscapes").replace(
        "weights: http://127.0.0.1:1/my_pspnet_20260101_000000-0123abcd.pth",
        "weights:\n      - http://127.0.0.1:1/a/my_pspnet_20260101_000000-0123abcd.pth\n"
        "      - http://127.0.0.1:2/b/my_pspnet_20260101_000000-0123abcd.pth").replace(
        "    depth: 50\n", "    backbone: R-18b-D32\n") + """    published_on:
      night_driving:
        aliases: [my_pspnet_night]
        published: {mIoU: 12.5}
"""
    manifest = load_manifest(_write(tmp_path, text))
    entry = manifest.get("my_pspnet")
    assert entry.urls == ("http://127.0.0.1:1/a/my_pspnet_20260101_000000-0123abcd.pth",
                          "http://127.0.0.1:2/b/my_pspnet_20260101_000000-0123abcd.pth")
    assert entry.url == entry.urls[0] and entry.filename == "my_pspnet_20260101_000000-0123abcd.pth"
    assert entry.datasets == ("cityscapes", "night_driving")
    assert manifest.resolve("my_pspnet_night") == (entry, "night_driving")
    assert entry.published_on["night_driving"].miou == 12.5 and entry.published_on["night_driving"].fps is None
    assert "my_pspnet" in manifest.list(dataset="night_driving")
    assert entry.model_kwargs() == {"depth": 18, "deep_stem": False, "output_stride": 32, "num_classes": 19,
                                    "align_corners": False, "channels": 128, "aux_channels": 64}


def test_cross_dataset_names_must_be_unique(tmp_path):
    text = GOOD_ENTRY.replace("dataset: ade20k", "dataset: cityscapes") + """    published_on:
      dark_zurich:
        aliases: [pspnet_r50-d8_512x1024_40k_dark]
        published: {mIoU: 1.0}
"""
    with pytest.raises(ManifestError, match="'pspnet_r50-d8_512x1024_40k_dark' already names "
                                            "'pspnet_r50-d8_512x1024_40k_cityscapes' on dark_zurich"):
        load_manifest(_write(tmp_path, text))


def test_duplicate_names_and_aliases_are_rejected(tmp_path):
    with pytest.raises(ManifestError, match="duplicate name"):
        load_manifest(_write(tmp_path, GOOD_ENTRY + GOOD_ENTRY.replace("models:\n", "")))
    clash = GOOD_ENTRY.replace("    depth: 50",
                               "    aliases: [pspnet_r50-d8_4xb2-40k_cityscapes-512x1024]\n    depth: 50")
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


# --------------------------------------------------------------------------------------------
# dataset declarations

# (key, title, classes, img_scale, mode, reduce_zero_label, images, label_suffix) from mmseg 0.30.0's
# dataset configs and classes (docs/reference.md, "Test pipeline" and "The family")
DATASET_FACTS = [
    ("cityscapes", "Cityscapes", 19, (2048, 1024), "whole", False, "leftImg8bit/val", "_gtFine_labelTrainIds.png"),
    ("ade20k", "ADE20K", 150, (2048, 512), "whole", True, "images/validation", ".png"),
    ("voc12aug", "Pascal VOC 2012 + Aug", 21, (2048, 512), "whole", False, "JPEGImages", ".png"),
    ("pascal_context", "Pascal Context", 60, (520, 520), "slide", False, "JPEGImages", ".png"),
    ("pascal_context_59", "Pascal Context 59", 59, (520, 520), "slide", True, "JPEGImages", ".png"),
    ("coco_stuff10k", "COCO-Stuff 10k", 171, (2048, 512), "whole", True, "images/test2014", "_labelTrainIds.png"),
    ("coco_stuff164k", "COCO-Stuff 164k", 171, (2048, 512), "whole", False, "images/val2017", "_labelTrainIds.png"),
    ("loveda", "LoveDA", 7, (1024, 1024), "whole", True, "img_dir/val", ".png"),
    ("potsdam", "Potsdam", 6, (512, 512), "whole", True, "img_dir/val", ".png"),
    ("vaihingen", "Vaihingen", 6, (512, 512), "whole", True, "img_dir/val", ".png"),
    ("isaid", "iSAID", 16, (896, 896), "whole", False, "img_dir/val", "_instance_color_RGB.png"),
    ("dark_zurich", "Dark Zurich", 19, (1920, 1080), "whole", False, "rgb_anon/val/night/GOPR0356",
     "_gt_labelTrainIds.png"),
    ("night_driving", "Nighttime Driving", 19, (1920, 1080), "whole", False, "leftImg8bit/test/night",
     "_gtCoarse_labelTrainIds.png"),
]


def test_every_dataset_is_declared_once_with_its_facts():
    datasets = load_manifest().datasets
    assert psp_zoo.manifest.DATASETS == tuple(datasets) == tuple(f[0] for f in DATASET_FACTS)
    for key, title, classes, scale, mode, rzl, images, label_suffix in DATASET_FACTS:
        spec = datasets[key]
        assert (spec.key, spec.title, spec.num_classes, spec.img_scale, spec.test.img_scale) == (
            key, title, classes, scale, scale)
        assert (spec.test.mode, spec.reduce_zero_label, spec.ignore_index) == (mode, rzl, 255)
        assert (spec.layout.images, spec.layout.label_suffix) == (images, label_suffix)
        assert spec.layout.folders[0] == ""  # the data root may be the dataset folder itself
        assert len(spec.classes) == len(set(spec.classes)) == classes
        assert len(spec.palette) == classes
        assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in spec.palette)
    if_slide = datasets["pascal_context_59"].test
    assert (if_slide.crop_size, if_slide.stride) == ((480, 480), (320, 320))


def test_dataset_classes_are_mmsegs():
    datasets = load_manifest().datasets
    assert datasets["pascal_context_59"].classes[:3] == ("aeroplane", "bag", "bed")  # no background
    assert datasets["pascal_context"].classes[0] == "background"
    assert datasets["isaid"].classes[0] == "background" and datasets["isaid"].classes[-1] == "Harbor"
    assert datasets["loveda"].classes == ("background", "building", "road", "water", "barren", "forest",
                                          "agricultural")
    assert datasets["potsdam"].classes == datasets["vaihingen"].classes == (
        "impervious_surface", "building", "low_vegetation", "tree", "car", "clutter")
    assert datasets["coco_stuff164k"].classes[0] == "person" and datasets["coco_stuff164k"].classes[-1] == "wood"
    assert datasets["dark_zurich"].classes == datasets["night_driving"].classes == datasets["cityscapes"].classes
    assert datasets["isaid"].palette[-1] == (0, 100, 155)
    cityscapes = datasets["cityscapes"].layout
    assert (cityscapes.fallback_label_suffix, cityscapes.label_map) == ("_gtFine_labelIds.png",
                                                                        "cityscapes_label_ids")
    assert datasets["voc12aug"].layout.split == "ImageSets/Segmentation/val.txt"
    assert datasets["pascal_context_59"].layout == datasets["pascal_context"].layout


USER_DATASET = """
datasets:
  kitti_seg:
    title: KITTI semantics
    num_classes: 3
    img_scale: [1242, 375]
    reduce_zero_label: false
    train_images_per_gpu: 2
    test: {mode: whole}
    layout:
      folders: ["", kitti]
      images: image_2
      labels: semantic
      image_suffix: .png
      label_suffix: _sem.png
      split: val.txt
    classes: [road, car, sky]
models:
  - name: my_kitti_pspnet
    dataset: kitti_seg
    depth: 50
    crop_size: [375, 375]
    schedule: 1000
    weights: http://127.0.0.1:1/my_kitti_pspnet_20260101_000000-0123abcd.pth
    hash: "0123abcd"
    published: {mIoU: 40.0}
"""


def test_user_manifest_declares_a_dataset_with_its_layout(tmp_path):
    manifest = load_manifest(_write(tmp_path, USER_DATASET))
    spec = manifest.datasets["kitti_seg"]
    assert spec.title == "KITTI semantics" and spec.classes == ("road", "car", "sky")
    assert spec.layout == psp_zoo.manifest.Layout(("", "kitti"), "image_2", "semantic", ".png", "_sem.png",
                                                  split="val.txt")
    assert len(spec.palette) == 3 and spec.source == str(tmp_path / "user.yml")
    assert spec.test.img_scale == (1242, 375) and spec.ignore_index == 255
    assert manifest.list(dataset="kitti_seg") == ["my_kitti_pspnet"]
    assert manifest.get("my_kitti_pspnet").num_classes == 3
    assert "kitti_seg" not in psp_zoo.manifest.DATASETS  # the built-in keys stay the built-in ones


@pytest.mark.parametrize("change,field", [
    (("      images: image_2\n", ""), "layout.images"),
    (("images: image_2", "images: ../outside"), "layout.images"),
    (("images: image_2", "images: /abs/images"), "layout.images"),
    (('folders: ["", kitti]', "folders: []"), "layout.folders"),
    (('folders: ["", kitti]', 'folders: ["", ../kitti]'), "layout.folders[1]"),
    (("label_suffix: _sem.png", "label_suffix: ''"), "layout.label_suffix"),
    (("label_suffix: _sem.png", "label_suffix: sem/x.png"), "layout.label_suffix"),
    (("labels: semantic\n      image_suffix: .png\n      label_suffix: _sem.png",
      "labels: image_2\n      image_suffix: .png\n      label_suffix: .png"), "layout.label_suffix"),
    (("      split: val.txt\n", "      split: val.txt\n      label_map: cityscapes_label_ids\n"),
     "layout.fallback_label_suffix"),
    (("      split: val.txt\n", "      split: val.txt\n      fallback_label_suffix: _ids.png\n"),
     "layout.label_map"),
    (("      split: val.txt\n", "      split: val.txt\n      fallback_label_suffix: _ids.png\n"
                                 "      label_map: kitti_ids\n"), "layout.label_map"),
    (("      split: val.txt\n", "      split: val.txt\n      splitt: val.txt\n"), "layout.splitt"),
    (("    classes: [road, car, sky]\n", ""), "classes"),
    (("classes: [road, car, sky]", "classes: [road, car]"), "classes"),
    (("classes: [road, car, sky]", "classes: [road, car, sky]\n    palette: [[0, 0, 0]]"), "palette"),
    (("classes: [road, car, sky]", "classes: [road, car, sky]\n    palette: [[0, 0, 0], [1, 2], [3, 4, 5]]"),
     "palette"),
    (("classes: [road, car, sky]", "classes: [road, car, sky]\n    palette: [[0, 0, 0], [1, 2, 3], [3, 4, 256]]"),
     "palette"),
    (("    title: KITTI semantics\n", ""), "title"),
    (("reduce_zero_label: false", "reduce_zero_label: false\n    ignore_index: 1"), "ignore_index"),
    (("    layout:\n", "    old_layout:\n"), "old_layout"),
    (("    layout:\n", "    layout: here\n    test2:\n"), "test2"),
])
def test_broken_dataset_declaration_names_dataset_and_field(tmp_path, change, field):
    assert change[0] in USER_DATASET
    with pytest.raises(ManifestError) as info:
        load_manifest(_write(tmp_path, USER_DATASET.replace(*change)))
    message = str(info.value)
    assert "datasets.kitti_seg" in message and f"field '{field}'" in message, message
    assert "--" not in message  # library terms, no command-line flags


def test_builtin_dataset_class_count_is_checked_against_the_class_file(tmp_path):
    text = USER_DATASET.replace("kitti_seg", "loveda").replace("    classes: [road, car, sky]\n", "")
    with pytest.raises(ManifestError, match=r"datasets.loveda: field 'classes': dataset_classes.json lists 7 "):
        load_manifest(_write(tmp_path, text))
    spec = load_manifest(_write(tmp_path, text.replace("num_classes: 3", "num_classes: 7"))).datasets["loveda"]
    assert spec.classes[0] == "background" and spec.layout.images == "image_2"  # override replaces the layout


def test_layout_that_is_not_a_mapping_is_named(tmp_path):
    text = USER_DATASET.replace("    layout:\n", "    layout: here\n    unused:\n").replace("    unused:\n", "", 1)
    text = text[:text.index("    layout: here\n") + len("    layout: here\n")] + text[text.index("    classes:"):]
    with pytest.raises(ManifestError, match=r"datasets.kitti_seg: field 'layout': expected a mapping, got str"):
        load_manifest(_write(tmp_path, text))


def test_records_pickle_and_copy_for_worker_processes():
    import copy
    import pickle

    entry = get_checkpoint("pspnet_r101-d8_512x1024_40k_cityscapes")
    for clone in (pickle.loads(pickle.dumps(entry)), copy.deepcopy(entry)):
        assert clone == entry and hash(clone) == hash(entry)
        assert clone.published_on["dark_zurich"].miou == 10.16
        assert clone.test_settings("night_driving") == entry.test_settings("night_driving")
    with pytest.raises(TypeError):
        entry.published_on["ade20k"] = entry.published  # read-only


def test_as_dict_is_plain_json():
    import json

    fields = json.loads(json.dumps(get_checkpoint(RSB_D8).as_dict()))
    assert fields["url"] == fields["urls"][0] and len(fields["urls"]) == 2
    assert fields["backbone"] == "R-50b-D8 rsb" and fields["deep_stem"] is False
    night = json.loads(json.dumps(get_checkpoint("pspnet_r50-d8_512x1024_40k_cityscapes").as_dict()))
    assert night["published_on"]["night_driving"]["miou"] == 23.02
    assert night["dataset_aliases"]["dark_zurich"][0] == "pspnet_r50-d8_512x1024_40k_dark"
    assert night["test_settings"]["dark_zurich"]["img_scale"] == [1920, 1080]


# --------------------------------------------------------------------------------------------
# overriding a published entry, and a user's own weights file


PUBLISHED_NAME = "pspnet_r50-d8_512x1024_40k_cityscapes"


def test_an_override_changes_what_it_names_and_keeps_the_rest(tmp_path):
    path = _write(tmp_path, f"""
    models:
      - name: {PUBLISHED_NAME}
        weights: http://mirror.local/x/{PUBLISHED_NAME}_20200605_003338-2966598c.pth
        log: http://mirror.local/x/the.log.json
    """)
    builtin, user = load_manifest(), load_manifest(path)
    before, after = builtin.get(PUBLISHED_NAME), user.get(PUBLISHED_NAME)
    assert after.url.startswith("http://mirror.local/") and after.log_url == "http://mirror.local/x/the.log.json"
    assert after.source == str(path) and after.hash_prefix == before.hash_prefix
    # the rest stays: aliases, the Dark Zurich / Nighttime Driving rows and their names, the place in `list`
    assert after.aliases == before.aliases and after.aliases
    assert dict(after.published_on) == dict(before.published_on) and len(after.published_on) == 3
    assert after.dataset_aliases == before.dataset_aliases
    assert user.get("pspnet_r50-d8_512x1024_40k_dark").name == PUBLISHED_NAME
    assert user.names == builtin.names
    assert user.list(dataset="dark_zurich") == builtin.list(dataset="dark_zurich")


def test_an_override_with_new_weights_needs_their_hash(tmp_path):
    path = _write(tmp_path, f"""
    models:
      - name: {PUBLISHED_NAME}
        weights: http://mirror.local/x/mine-0123abcd.pth
    """)
    assert load_manifest(path).get(PUBLISHED_NAME).hash_prefix == "0123abcd"  # from the new file name
    path = _write(tmp_path, f"""
    models:
      - name: {PUBLISHED_NAME}
        weights: http://mirror.local/x/mine.pth
    """)
    with pytest.raises(ManifestError, match="weights.*rename the file so, or give the file's full 'sha256'"):
        load_manifest(path)


def test_a_weights_file_without_the_hash_in_its_name_is_named_by_its_sha256(tmp_path):
    digest = hashlib.sha256(b"my weights").hexdigest()
    path = _write(tmp_path, GOOD_ENTRY.replace("my_pspnet_20260101_000000-0123abcd.pth", "my_weights.pth")
                  .replace('hash: "0123abcd"', f"sha256: {digest}"))
    entry = load_manifest(path).get("my_pspnet")
    assert entry.hash_prefix == digest[:8] and entry.sha256 == digest
    assert entry.url.endswith("/my_weights.pth") and entry.filename == f"my_weights-{digest[:8]}.pth"
    with pytest.raises(ManifestError, match="'hash'"):  # a hash beside it must agree
        load_manifest(_write(tmp_path, path.read_text() + '    hash: "deadbeef"\n'))


def test_backbone_or_depth_one_of_them_is_required(tmp_path):
    with pytest.raises(ManifestError, match=r"'backbone': missing: .*R-50-D8.*or the depth"):
        load_manifest(_write(tmp_path, GOOD_ENTRY.replace("    depth: 50\n", "")))
    assert load_manifest(_write(tmp_path, GOOD_ENTRY)).get("my_pspnet").backbone == "R-50-D8"


def test_the_manifest_page_documents_every_entry_and_dataset_field(tmp_path):
    """docs/manifests.md names every field the loader reads, and its example entry loads."""
    from psp_zoo.manifest import entries, schema

    page = (REPO / "docs" / "manifests.md").read_text()
    fields = (schema.ENTRY_REQUIRED + sum(schema.ENTRY_EITHER, ()) + schema.ENTRY_OPTIONAL
              + schema.DATASET_REQUIRED + schema.DATASET_OPTIONAL + schema.LAYOUT_REQUIRED + schema.LAYOUT_OPTIONAL
              + entries.TEST_FIELDS + schema.ARCH_FIELDS)
    missing = [name for name in fields if f"`{name}`" not in page]
    assert missing == []
    example = page.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "my.yml"
    path.write_text(example)
    entry = load_manifest(path).get("my_pspnet")  # the example is a complete, loadable entry and dataset
    assert entry.dataset == "roads" and entry.filename == f"my_pspnet-{entry.sha256[:8]}.pth"
    assert load_manifest(path).datasets["roads"].classes == ("background", "road", "marking")


SEMSEG_TEST = "    test: {mode: semseg, base_size: 512, crop_size: [473, 473], align_corners: true}\n"


def test_semseg_test_mode_carries_base_size_and_crop(tmp_path):
    """The PSPNet authors' protocol: mode 'semseg' with base_size and crop_size, no stride."""
    entry = load_manifest(_write(tmp_path, GOOD_ENTRY + SEMSEG_TEST)).get("my_pspnet")
    assert (entry.test.mode, entry.test.base_size, entry.test.crop_size) == ("semseg", 512, (473, 473))
    assert entry.test.stride is None and entry.test.align_corners is True
    assert entry.as_dict()["test"]["base_size"] == 512
    # overrides are checked the same way, and other modes carry no base_size
    assert entry.test.with_overrides({"base_size": 2048}).base_size == 2048
    assert entry.test.with_overrides({"mode": "whole"}).base_size is None
    with pytest.raises(psp_zoo.PspZooError, match="semseg inference needs base_size"):
        get_checkpoint("pspnet_r50-d8_512x512_80k_ade20k").test.with_overrides({"mode": "semseg", "crop_size": (9, 9)})


@pytest.mark.parametrize("test_line,field,said", [
    (SEMSEG_TEST.replace("base_size: 512, ", ""), "test.base_size", "required when mode is 'semseg'"),
    (SEMSEG_TEST.replace("crop_size: [473, 473], ", ""), "test.crop_size", "required when mode is 'semseg'"),
    (SEMSEG_TEST.replace("base_size: 512", "base_size: 0"), "test.base_size", "expected a positive integer"),
    (SEMSEG_TEST.replace("base_size: 512", "base_size: 512, stride: [316, 316]"), "test.stride", "not used"),
    (SEMSEG_TEST.replace("mode: semseg", "mode: sliding"), "test.mode", "'whole', 'slide', 'semseg'"),
])
def test_semseg_test_mode_refuses_missing_or_wrong_fields(tmp_path, test_line, field, said):
    with pytest.raises(ManifestError, match=re.escape(f"field '{field}': ") + ".*" + re.escape(said)):
        load_manifest(_write(tmp_path, GOOD_ENTRY + test_line))
