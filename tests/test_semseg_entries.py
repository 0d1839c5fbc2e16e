"""The PSPNet authors' six entries: their README's numbers, their test settings, files placed by hand
(`get` says where from and where to), the SHA-256 of the first file loaded recorded and watched."""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings

import pytest
import yaml

from psp_zoo import ManifestError, create_model, get_checkpoint, load_manifest
from psp_zoo.errors import DownloadError
from psp_zoo.hub import cache_state, download, first_sha256_record
from psp_zoo.results.tables import build_tables, render
from psp_zoo.testing import write_manifest, write_semseg_checkpoint

from helpers import REPO, run_cli

README = REPO / "tests" / "fixtures" / "semseg" / "README_performance.md"
DRIVE = "https://drive.google.com/open?id=15wx9vOM0euyizq-M1uINgN0_wjVRf9J3"
DATASETS = {"ADE20K": ("ade20k", "ade20k", 150), "PSACAL VOC 2012": ("voc2012", "voc12aug", 21),
            "Cityscapes": ("cityscapes", "cityscapes", 19)}
NAMES = [f"semseg_pspnet{d}_{s}" for s in ("ade20k", "voc2012", "cityscapes") for d in (50, 101)]


def _readme_rows():
    """{name: (dataset section, ss triple, ms triple)} read from the README's tables, fractions."""
    rows, section = {}, None
    for line in README.read_text().splitlines():
        heading = re.match(r"\d\. \*\*(.+?)\*\*:", line.strip())
        if heading:
            section = heading.group(1)
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.strip().startswith("| PSPNet"):
            depth = cells[0][len("PSPNet"):]
            triple = lambda c: tuple(float(v) for v in c.rstrip(".").split("/"))  # noqa: E731
            rows[f"semseg_pspnet{depth}_{DATASETS[section][0]}"] = (section, triple(cells[1]), triple(cells[2]))
    return rows


def test_six_entries_carry_all_twelve_readme_rows():
    rows = _readme_rows()
    assert sorted(rows) == sorted(NAMES)
    for name, (section, ss, ms) in rows.items():
        entry = get_checkpoint(name)
        p = entry.published
        assert (p.miou, p.macc, p.aacc) == pytest.approx(tuple(100 * v for v in ss)), name
        assert (p.miou_ms_flip, p.macc_ms_flip, p.aacc_ms_flip) == pytest.approx(tuple(100 * v for v in ms)), name
        assert (p.mem_gb, p.fps) == (None, None)  # not published by them
        assert entry.dataset == DATASETS[section][1] and entry.num_classes == DATASETS[section][2]
        assert entry.family == "semseg" and entry.by_hand and entry.url is None
        assert entry.download_page == DRIVE and entry.method == "PSPNet (semseg)"
        assert entry.backbone == f"R-{name.split('pspnet')[1].split('_')[0]}-D8"


@pytest.mark.parametrize("name", NAMES)
def test_their_test_settings_and_network(name):
    entry = get_checkpoint(name)
    city = "cityscapes" in name
    crop = (713, 713) if city else (473, 473)
    assert (entry.test.mode, entry.test.base_size, entry.test.crop_size) == ("semseg", 2048 if city else 512, crop)
    assert entry.test.align_corners and entry.test.stride is None and entry.crop_size == crop
    kwargs = entry.model_kwargs()
    assert (kwargs["stem_channels"], kwargs["contract_dilation"], kwargs["deep_stem"]) == (128, False, True)
    assert (kwargs["channels"], kwargs["aux_channels"], kwargs["align_corners"]) == (512, 256, True)
    # their config name (config/<dataset>/<dataset>_pspnet<depth>.yaml) finds the entry too
    dataset, depth = name.split("_")[2], name.split("_")[1]
    assert get_checkpoint(f"{dataset}_{depth}") is entry


def test_ade20k_uses_their_label_convention():
    """Their ADE20K lists hold 0..149 with 255 ignored (the 151 raw ids minus one, 0 = other): the
    ade20k dataset's reduce_zero_label, as for mmseg's rows."""
    entry = get_checkpoint("semseg_pspnet50_ade20k")
    assert entry.reduce_zero_label and entry.num_classes == 150
    assert load_manifest().datasets["ade20k"].ignore_index == 255


# --------------------------------------------------------------------------------------------
# the files: placed by hand


def test_get_says_where_to_download_and_where_to_put_it(tmp_path, capsys):
    cache = tmp_path / "cache"
    code, out, err = run_cli(capsys, "get", "semseg_pspnet101_cityscapes", "--cache-dir", cache)
    assert code == 1 and out == ""
    error, fix = err.strip().splitlines()  # what to do for this file, then the other ways, as get says them
    assert error.startswith("psp-zoo get: error: semseg_pspnet101_cityscapes: no download URL: download it by hand")
    assert DRIVE in error and error.endswith(f"save it as {cache / 'semseg_pspnet101_cityscapes.pth'}")
    assert fix.startswith("psp-zoo get: to fix: ") and "--checkpoint FILE" in fix and "sha256" in fix
    assert not cache.exists() or not any(cache.rglob("*"))  # nothing written
    with pytest.raises(DownloadError, match="download it by hand.*or pass checkpoint=FILE.*sha256") as caught:
        create_model("semseg_pspnet101_cityscapes", cache_dir=str(cache))
    assert DRIVE in str(caught.value) and str(cache / "semseg_pspnet101_cityscapes.pth") in str(caught.value)


def test_the_first_file_loaded_is_recorded_and_a_change_warned(tmp_path, capsys):
    cache = tmp_path / "cache"
    final = write_semseg_checkpoint(cache / "semseg_pspnet50_ade20k.pth", num_classes=150)
    digest = hashlib.sha256(final.read_bytes()).hexdigest()
    code, out, _ = run_cli(capsys, "get", "semseg_pspnet50_ade20k", "--cache-dir", cache)
    assert code == 0 and out.strip() == str(final)
    record = first_sha256_record(final)
    assert json.loads(record.read_text())["sha256"] == digest
    assert cache_state("semseg_pspnet50_ade20k", cache_dir=cache) == "cached"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same file again: no warning
        assert download("semseg_pspnet50_ade20k", cache_dir=cache) == final
        os.utime(final, ns=(1, 1))  # touched, same bytes: hashed again, still no warning
        assert download("semseg_pspnet50_ade20k", cache_dir=cache) == final
    write_semseg_checkpoint(final, num_classes=150, seed=1)  # another file under the same name
    new = hashlib.sha256(final.read_bytes()).hexdigest()
    with pytest.warns(UserWarning, match=f"changed since psp-zoo first loaded it.*{new}.*was {digest}") as caught:
        download("semseg_pspnet50_ade20k", cache_dir=cache)
    assert str(record) in str(caught[0].message)
    assert json.loads(record.read_text())["sha256"] == digest  # the first one stays recorded
    record.unlink()  # the user accepts the new file
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        download("semseg_pspnet50_ade20k", cache_dir=cache)
    assert json.loads(record.read_text())["sha256"] == new
    assert not list(record.parent.glob("*.tmp*"))  # written atomically, nothing left beside it


def test_a_by_hand_entry_with_a_sha256_checks_the_placed_file(tmp_path):
    cache = tmp_path / "cache"
    final = write_semseg_checkpoint(tmp_path / "theirs.pth", num_classes=21)
    digest = hashlib.sha256(final.read_bytes()).hexdigest()
    manifest = write_manifest(tmp_path / "m.yml", [{"name": "semseg_pspnet50_voc2012", "sha256": digest}])
    entry = get_checkpoint("semseg_pspnet50_voc2012", manifest=str(manifest))
    assert entry.filename == f"semseg_pspnet50_voc2012-{digest[:8]}.pth" and entry.by_hand
    placed = cache / entry.filename
    placed.parent.mkdir(parents=True)
    placed.write_bytes(final.read_bytes()[:-1] + b"x")
    with pytest.raises(DownloadError, match="not the file of semseg_pspnet50_voc2012"):
        download(entry, cache_dir=cache)
    placed.write_bytes(final.read_bytes())
    assert download(entry, cache_dir=cache) == placed


def test_a_user_entry_on_a_mirror_replaces_the_download_page(tmp_path):
    final = write_semseg_checkpoint(tmp_path / "theirs.pth", num_classes=19)
    digest = hashlib.sha256(final.read_bytes()).hexdigest()
    manifest = write_manifest(tmp_path / "m.yml", [{"name": "semseg_pspnet50_cityscapes",
                                                   "weights": final.as_uri(), "sha256": digest}])
    entry = get_checkpoint("semseg_pspnet50_cityscapes", manifest=str(manifest))
    assert not entry.by_hand and entry.download_page is None and entry.family == "semseg"
    assert download(entry, cache_dir=tmp_path / "cache").read_bytes() == final.read_bytes()


@pytest.mark.parametrize("change,field", [
    ({"weights": None, "download_page": None}, "weights"),
    ({"download_page": "drive.google.com/x"}, "download_page"),
    ({"weights": "https://example.com/x-0123abcd.pth"}, "weights"),
    ({"family": "caffe"}, "family"),
    ({"hash": "0123abcd"}, "hash"),
    ({"test": {"mode": "semseg", "crop_size": [473, 473]}}, "test.base_size"),
])
def test_broken_by_hand_entries_are_named(tmp_path, change, field):
    entry = {"name": "mine", "dataset": "ade20k", "depth": 50, "crop_size": [473, 473], "schedule": 1,
             "weights": None, "download_page": DRIVE, "family": "semseg", "published": {}}
    entry.update(change)
    path = tmp_path / "m.yml"
    path.write_text(yaml.safe_dump({"version": 1, "models": [{k: v for k, v in entry.items()
                                                              if not (k == "download_page" and v is None)}]}))
    with pytest.raises(ManifestError, match=re.escape(f"field '{field}'")):
        load_manifest(path)


# --------------------------------------------------------------------------------------------
# list, info, tables


def test_list_and_info_show_them_with_their_numbers(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "list", "--dataset", "voc12aug", "--format", "json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and rows["semseg_pspnet101_voc2012"]["mIoU"] == 79.07
    code, out, _ = run_cli(capsys, "info", "semseg_pspnet101_voc2012", "--format", "json",
                           "--cache-dir", tmp_path)
    info = json.loads(out)
    assert code == 0 and info["download_url"] is None and info["download_page"] == DRIVE
    assert info["published"]["macc"] == 86.36 and info["published"]["aacc_ms_flip"] == 95.5
    assert info["cache_path"] == str(tmp_path / "semseg_pspnet101_voc2012.pth") and info["cache_state"] == "missing"
    assert info["test"] == {"mode": "semseg", "img_scale": [2048, 512], "align_corners": True,
                            "crop_size": [473, 473], "base_size": 512}
    code, out, _ = run_cli(capsys, "info", "semseg_pspnet101_voc2012")
    assert "macc=86.36" in out and "family" in out and DRIVE in out


def test_tables_show_them_beside_mmsegs_rows():
    tables = {t.dataset: t for t in build_tables()}
    ade = render([tables["ade20k"]])
    lines = [line for line in ade.splitlines() if line.startswith("| PSPNet")]
    assert [line.startswith("| PSPNet (semseg)") for line in lines] == [False] * 4 + [True] * 2
    assert f"[model (by hand)]({DRIVE})" in lines[-1] and "41.89" in lines[-2] and "42.84" in lines[-2]
    data = json.loads(render([tables["cityscapes"]], "json"))["tables"][0]["rows"]
    theirs = next(r for r in data if r["Checkpoint"] == "semseg_pspnet50_cityscapes")
    accuracies = (theirs["mAcc"], theirs["aAcc"], theirs["mAcc(ms+flip)"], theirs["aAcc(ms+flip)"])
    assert accuracies == (84.31, 95.97, 84.86, 96.17)
    assert theirs["Method"] == "PSPNet (semseg)" and theirs["model"] is None and theirs["download_page"] == DRIVE
    mmseg = next(r for r in data if r["Checkpoint"] == "pspnet_r50-d8_512x1024_40k_cityscapes")
    assert mmseg["mAcc"] is None and mmseg["Method"] == "PSPNet"
    assert "mAcc" in render([tables["cityscapes"]], "csv").splitlines()[0].split(",")
