"""Tables: the published layout exactly from the manifest, reproduced numbers beside it, README update, plot."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from psp_zoo import cli
from psp_zoo.errors import PspZooError
from psp_zoo.results.records import write_result
from psp_zoo.results.tables import MARKER_END, MARKER_START, build_tables, plot, render, update_readme

from helpers import REFERENCE, REPO, make_record

PUBLISHED = REFERENCE / "000_3f7e1852bf785c2c.txt"
R50 = "pspnet_r50-d8_512x1024_40k_cityscapes"
R101 = "pspnet_r101-d8_512x1024_40k_cityscapes"


def parse_markdown(text: str) -> dict:
    """{title: {"header": [...], "align": [...], "rows": [[...]]}}, cells stripped of padding."""
    tables, title = {}, None
    for line in text.splitlines():
        if line.startswith("### "):
            title = line[4:].strip()
            tables[title] = {"header": None, "align": None, "rows": []}
        elif line.startswith("|") and title:
            cells = [c.strip() for c in line.strip()[1:-1].split("|")]
            table = tables[title]
            if table["header"] is None:
                table["header"] = cells
            elif table["align"] is None:
                table["align"] = [re.sub("-+", "-", c) for c in cells]  # dash count is padding
            else:
                table["rows"].append(cells)
    return tables


def rows_by_method(text: str, title: str) -> dict:
    return {tuple(r[:4]): r for r in parse_markdown(text)[title]["rows"]}


def test_published_tables_are_reproduced_exactly():
    expected = parse_markdown(PUBLISHED.read_text())
    produced = parse_markdown(render(build_tables()))
    assert list(produced) == ["Cityscapes", "ADE20K", "Pascal VOC 2012 + Aug", "Pascal Context", "Pascal Context 59",
                              "COCO-Stuff 10k", "COCO-Stuff 164k", "LoveDA", "Potsdam", "Vaihingen", "iSAID",
                              "Dark Zurich", "Nighttime Driving"]
    # the v0.5 tables: same columns and alignment, every published row cell for cell, in its order
    for title, table in expected.items():
        assert (produced[title]["header"], produced[title]["align"]) == (table["header"], table["align"])
        rows = [row for row in produced[title]["rows"] if row in table["rows"]]
        assert rows == table["rows"], title
    # mmseg's checkpoints + cross-dataset rows + the PSPNet authors' six
    assert sum(len(t["rows"]) for t in produced.values()) == 54 + 6 + 6


def test_every_family_row_carries_the_tsv_numbers():
    import csv

    family = list(csv.DictReader((REFERENCE.parent / "pspnet_family.tsv").open(), delimiter="\t"))
    data = json.loads(render(build_tables(), "json"))
    shown = {(row["Checkpoint"], row["Dataset"]): row for table in data["tables"] for row in table["rows"]}
    checked = 0
    for line in family:
        if line["ckpt_url"] == "-" or not line["miou"] or line["miou"] == "-":
            continue
        matches = [row for row in shown.values() if row["model"] == line["ckpt_url"]
                   and row["mIoU"] == float(line["miou"])]
        assert len(matches) == 1, line["name_0x"]
        checked += 1
    assert checked == 60


def test_results_show_published_reproduced_and_difference():
    records = [make_record(R50, miou=0.778, ms_flip=None, fps=9.5, mem_gb=6.3),
               make_record(R101, miou=0.7851, fps=3.0, mem_gb=9.55)]
    text = render(build_tables(results=records))
    rows = parse_markdown(text)["Cityscapes"]["rows"]
    r50, r101, untouched = rows[0], rows[1], rows[2]
    assert r50[:4] == ["PSPNet [1]", "R-50-D8", "512x1024", "40000"]
    assert r50[4:8] == ["6.1 / 6.30 (+0.20)", "4.07 / 9.50 (+5.43)", "77.85 / 77.80 (-0.05)", "79.18 / -"]
    assert r101[6] == "78.34 / 78.51 (+0.17)" and r101[7] == "79.74 / 79.10 (-0.64)"
    assert untouched[:8] == ["PSPNet", "R-50-D8", "769x769", "40000", "6.9", "1.76", "78.26", "79.88"]
    assert "[1] NVIDIA H100 80GB HBM3 (cuda), fp32, torch 2.5.1, CUDA 12.4, cuDNN 90100, psp-zoo 0.1.0" in text
    published = parse_markdown(render(build_tables()))
    assert parse_markdown(text)["ADE20K"] == published["ADE20K"]  # no results, no change


def test_other_device_or_version_gets_its_own_labelled_row():
    records = [make_record(R50, miou=0.778),
               make_record(R50, miou=0.7786, device_kind="cpu", device_name="Intel Xeon", fps=0.5, mem_gb=9.0),
               make_record(R50, miou=0.7781, torch_version="1.5.0")]
    text = render(build_tables(results=records))
    rows = [r for r in parse_markdown(text)["Cityscapes"]["rows"] if r[1:4] == ["R-50-D8", "512x1024", "40000"]]
    assert [r[0] for r in rows] == ["PSPNet [1]", "PSPNet [2]", "PSPNet [3]"]
    by_label = {r[0]: r for r in rows}
    notes = dict(re.findall(r"^- (\[\d\]) (.*)$", text, flags=re.M))
    cpu_label = next(label for label, note in notes.items() if "(cpu)" in note)
    assert "cpu peak RSS" in notes[cpu_label] and "fps on CPU" in notes[cpu_label]
    assert by_label[f"PSPNet {cpu_label}"][5] == "4.07 / 0.50"  # not differenced against the V100
    assert by_label[f"PSPNet {cpu_label}"][6] == "77.85 / 77.86 (+0.01)"
    assert sum("torch 1.5.0" in n for n in notes.values()) == 1


def test_limited_and_failed_runs_are_said_so():
    records = [make_record(R50, count=50, limit=50), make_record(R101, status="failed")]
    text = render(build_tables(results=records))
    assert "only 50 of 500 images (--limit)" in text
    assert f"not reproduced: {R101} failed on NVIDIA H100 80GB HBM3: CUDA out of memory" in text


def test_results_outside_the_manifest_are_skipped_with_a_warning():
    with pytest.warns(UserWarning, match="not in the manifest"):
        tables = build_tables(results=[make_record("my_private_model")])
    assert not any(t.has_results for t in tables)


def test_user_manifest_entries_get_rows(tmp_path):
    manifest = tmp_path / "tiny.yml"
    manifest.write_text(textwrap.dedent("""\
        models:
          - name: tiny_pspnet_r50-d8
            dataset: cityscapes
            depth: 50
            crop_size: [64, 64]
            schedule: 10
            weights: http://127.0.0.1:1/tiny_pspnet_r50-d8_20261123_000000-5c6bb156.pth
            hash: "5c6bb156"
            model: {num_classes: 5, stem_channels: 8, base_channels: 8, channels: 16, aux_channels: 8}
            published: {mIoU: 50.0}
        """))
    text = render(build_tables(str(manifest), [make_record("tiny_pspnet_r50-d8", miou=0.5)]))
    row = parse_markdown(text)["Cityscapes"]["rows"][-1]
    assert row[:8] == ["PSPNet [1]", "R-50-D8", "64x64", "10", "- / 6.30", "- / 9.50", "50.00 / 50.00 (+0.00)",
                       "- / 79.10"]
    assert row[8] == "[model](http://127.0.0.1:1/tiny_pspnet_r50-d8_20261123_000000-5c6bb156.pth)"


def test_csv_and_json_carry_numbers_in_separate_columns():
    records = [make_record(R50, miou=0.778)]
    data = json.loads(render(build_tables(results=records), "json"))
    row = data["tables"][0]["rows"][0]
    assert (row["mIoU"], row["mIoU reproduced"]) == (77.85, pytest.approx(77.8))
    assert row["mIoU diff"] == pytest.approx(-0.05) and row["Label"] == "[1]"
    assert data["tables"][0]["rows"][1]["mIoU reproduced"] is None
    assert data["tables"][0]["environments"]["[1]"].startswith("NVIDIA H100")
    csv = render(build_tables(results=records), "csv").splitlines()
    assert len(csv) == 1 + 60 + 6 and "mIoU reproduced" in csv[0].split(",")
    with pytest.raises(PspZooError, match="md, csv or json"):
        render(build_tables(), "html")


def test_update_rewrites_only_the_marked_region(tmp_path):
    readme = tmp_path / "README.md"
    before = "# Title\r\n\r\nintro with CRLF\r\n\n" + MARKER_START + "\nold tables\n"
    after = MARKER_END + "\n\n## Later\ntrailing  spaces  \n"
    readme.write_bytes((before + after).encode())
    text = render(build_tables())
    update_readme(readme, text)
    content = readme.read_bytes().decode()
    assert content.startswith(before.split("old tables")[0]) and content.endswith(after)
    assert "old tables" not in content and "### Pascal Context" in content
    update_readme(readme, text)
    assert readme.read_bytes().decode() == content  # idempotent
    plain = tmp_path / "plain.md"
    plain.write_text("no markers here\n")
    with pytest.raises(PspZooError, match="psp-zoo:tables:start"):
        update_readme(plain, text)
    assert plain.read_text() == "no markers here\n"


def test_cli_reads_results_and_updates_a_file(tmp_path, capsys):
    results = tmp_path / "results"
    record = make_record(R50, miou=0.778)
    write_result(record, results / R50 / "cuda-nvidia-h100-80gb-hbm3.json")
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{MARKER_START}\n{MARKER_END}\nbottom\n")
    assert cli.main(["tables", "--results", str(results), "--update", str(readme)]) == 0
    assert "77.85 / 77.80 (-0.05)" in readme.read_text()
    assert cli.main(["tables", "--results", str(results), "--format", "csv", "--update", str(readme)]) == 2
    assert "--update writes Markdown" in capsys.readouterr().err


def test_cli_subprocess_reports_a_bad_results_file(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "results" / R50 / "cpu.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "psp_zoo", "tables", "--results", str(tmp_path / "results")],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 2
    assert "cpu.json" in run.stderr and "schema_version" in run.stderr and "Traceback" not in run.stderr
    bad.unlink()
    monkeypatch.chdir(tmp_path)  # ./results is the default; it holds nothing: the published tables
    assert cli.main(["tables"]) == 0
    assert parse_markdown(capsys.readouterr().out) == parse_markdown(render(build_tables()))


def test_plot_writes_a_png(tmp_path):
    records = [make_record(R50, miou=0.778),
               make_record(R50, device_kind="cpu", device_name="Intel Xeon", fps=0.4)]
    path = plot(records, tmp_path / "speed_accuracy.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    height, width = matplotlib.image.imread(path).shape[:2]
    assert (width, height) == (800, 550)


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(PspZooError, match=r"psp-zoo\[plot\]"):
        plot([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_readme_tables_are_the_generated_ones():
    readme = (REPO / "README.md").read_text()
    region = readme.split(MARKER_START)[1].split(MARKER_END)[0]
    assert region.strip() == render(build_tables()).strip(), "run `psp-zoo tables --update README.md`"


def test_cli_warnings_are_one_plain_line_each(tmp_path, capsys):
    from psp_zoo.cli import main
    from psp_zoo.results.records import write_result

    record = make_record(name="not_in_manifest")
    write_result(record, tmp_path / "results" / "not_in_manifest" / "cpu.json")
    assert main(["tables", "--results", str(tmp_path / "results"), "--plot", str(tmp_path / "p.png")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("psp-zoo tables: warning: ignoring ")


def test_an_onnx_result_is_its_own_labelled_row():
    import dataclasses

    onnx = dataclasses.replace(make_record(R50, miou=0.7781), optimizations=(),
                               backend={"backend": "onnxruntime", "version": "1.32.0",
                                        "providers": ["CPUExecutionProvider"]})
    text = render(build_tables(results=[make_record(R50, miou=0.778), onnx]))
    rows = [r for r in parse_markdown(text)["Cityscapes"]["rows"] if r[1:4] == ["R-50-D8", "512x1024", "40000"]]
    assert [r[0] for r in rows] == ["PSPNet [1]", "PSPNet [2]"]
    notes = dict(re.findall(r"^- (\[\d\]) (.*)$", text, flags=re.M))
    assert sum("onnxruntime 1.32.0 (CPUExecutionProvider)" in note for note in notes.values()) == 1


def test_protocol_fps_beside_the_published_one_and_the_fast_one_apart():
    import dataclasses

    from psp_zoo.results.records import Speed

    fast = Speed(fps=21.25, images_timed=195, warmup=5, device_kind="cuda", model="optimized")
    records = [dataclasses.replace(make_record(R50, fps=4.5), fast_speed=fast),
               dataclasses.replace(make_record(R101, fps=3.0), training_memory=None, fast_speed=None,
                                   failed_steps={"training_memory": "RuntimeError: CUDA out of memory",
                                                 "fast_speed": "RuntimeError: CUDA error"})]
    text = render(build_tables(results=records))
    table = parse_markdown(text)["Cityscapes"]
    assert table["header"][4:10] == ["Mem (GB)", "Inf time (fps)", "mIoU", "mIoU(ms+flip)", "psp-zoo fps", "download"]
    r50, r101, untouched = table["rows"][:3]
    assert r50[5] == "4.07 / 4.50 (+0.43)" and r50[8] == "21.25"
    assert r101[4] == "9.6 / failed" and r101[8] == "failed" and r101[6] == "78.34 / 77.80 (-0.54)"
    assert untouched[8] == "-"
    assert f"- not measured: {R101} [1]: training memory failed: RuntimeError: CUDA out of memory" in text
    assert "not reproduced" not in text  # its scores are shown
    frame = build_tables(results=records)[0].frame
    assert frame.loc[frame["Checkpoint"] == R50, "psp-zoo fps reproduced"].item() == 21.25
    assert parse_markdown(render(build_tables()))["Cityscapes"]["header"][8] == "download"  # no results: as published
