"""Results files: schema round trip, strict reading, atomic writes, resumable partial state."""
from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch

from psp_zoo.environment import environment_info
from psp_zoo.errors import ResultsError
from psp_zoo.evaluation.resume import PartialState
from psp_zoo.results.records import MemoryUse, Speed, device_tag, read_result, read_results, result_path, write_result

from helpers import make_record


def test_record_round_trip_keeps_every_field(tmp_path):
    record = make_record()
    path = result_path(tmp_path, record.checkpoint, record.environment)
    assert path == tmp_path / record.checkpoint / "cuda-nvidia-h100-80gb-hbm3.json"
    write_result(record, path)
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1 and data["metrics"]["ms_flip"]["mIoU"] == pytest.approx(79.1)
    assert data["metrics"]["single_scale"]["per_class"]["rare"] == {"IoU": None, "Acc": None}
    assert read_result(path) == record


def test_result_path_names_device_and_precision(tmp_path):
    cpu = {"device_kind": "cpu", "device_name": "Intel Xeon"}
    assert device_tag(cpu) == "cpu-intel-xeon"
    assert result_path(tmp_path, "m", cpu, "fp16").name == "cpu-intel-xeon_fp16.json"


def test_two_cpu_models_write_two_results_files_and_tables_tell_them_apart(tmp_path):
    from psp_zoo.results.reports import show_text
    from psp_zoo.results.tables import build_tables, render

    records = [make_record(device_kind="cpu", device_name=name, miou=miou)
               for name, miou in (("AMD EPYC 7763 64-Core Processor", 0.70), ("Intel(R) Xeon(R) Gold 6338", 0.71))]
    paths = {write_result(r, result_path(tmp_path, r.checkpoint, r.environment)) for r in records}
    assert sorted(p.name for p in paths) == ["cpu-amd-epyc-7763-64-core-processor.json",
                                             "cpu-intel-r-xeon-r-gold-6338.json"]
    shown = render(build_tables(None, read_results(tmp_path)))
    assert "AMD EPYC 7763" in shown and "Intel(R) Xeon(R) Gold 6338" in shown
    assert "AMD EPYC 7763 64-Core Processor" in show_text(read_result(sorted(paths)[0])).splitlines()[0]


def test_environment_info_has_versions_and_no_hostname():
    env = environment_info("cpu")
    assert env["device_kind"] == "cpu" and env["torch"] == torch.__version__
    assert {"cuda", "cudnn", "python", "psp_zoo", "git_revision", "device_name"} <= set(env)
    host = socket.gethostname()
    if len(host) >= 4:
        assert host not in json.dumps(env)


def test_failed_write_leaves_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "m" / "cpu.json"
    write_result(make_record(miou=0.5), path)
    before = path.read_bytes()

    def crash(fd):
        raise OSError("disk full")  # after the new bytes went to the temporary file
    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        write_result(make_record(miou=0.7), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["cpu.json"]  # no temporary left behind


def test_read_results_rejects_a_bad_file_by_name(tmp_path):
    write_result(make_record(), tmp_path / "a" / "cpu.json")
    bad = tmp_path / "b" / "cpu.json"
    data = make_record().to_dict()
    data["speed"]["fps"] = "fast"
    bad.parent.mkdir()
    bad.write_text(json.dumps(data))
    with pytest.raises(ResultsError, match=r"b/cpu\.json: field 'speed\.fps'"):
        read_results(tmp_path)
    with pytest.warns(UserWarning, match="skipping"):
        assert len(read_results(tmp_path, strict=False)) == 1
    bad.write_text('{"schema_version": 1, "checkpoint": "x"')  # truncated by hand
    with pytest.raises(ResultsError, match="not valid JSON"):
        read_results(tmp_path)


def test_read_results_rejects_other_schema_versions_and_missing_dir(tmp_path):
    data = make_record().to_dict()
    data["schema_version"] = 99
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "cpu.json").write_text(json.dumps(data))
    with pytest.raises(ResultsError, match="schema_version"):
        read_results(tmp_path)
    with pytest.raises(ResultsError, match="does not exist"):
        read_results(tmp_path / "nowhere")


def test_partial_state_round_trip_and_guards(tmp_path):
    fingerprint = {"checkpoint": "m", "ms_flip": True, "images": 7}
    state = PartialState.for_result(tmp_path / "m" / "cpu.json", fingerprint, every=3)
    assert state.load() is None
    hist = {"intersect": torch.arange(5, dtype=torch.float64), "label": np.full(5, 7, dtype=np.int64)}
    assert not state.maybe_save(2, hist)
    assert state.maybe_save(3, hist)
    next_index, arrays = PartialState.for_result(tmp_path / "m" / "cpu.json", fingerprint).load()
    assert next_index == 3
    np.testing.assert_array_equal(arrays["intersect"], np.arange(5))
    assert arrays["label"].dtype == np.int64
    other = PartialState(state.path, {**fingerprint, "ms_flip": False})
    with pytest.warns(UserWarning, match="other settings"):
        assert other.load() is None
    state.clear()
    assert not state.path.exists() and state.load() is None


def test_atomic_write_keeps_permissions_not_the_temp_files_0600(tmp_path):
    from psp_zoo.files import atomic_write

    readme = tmp_path / "README.md"
    readme.write_text("old\n")
    readme.chmod(0o644)
    atomic_write(readme, "new\n")
    assert readme.read_text() == "new\n" and readme.stat().st_mode & 0o777 == 0o644
    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "fresh.json", "{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "fresh.json").stat().st_mode & 0o777 == 0o644


def test_protocol_and_fast_figures_and_failed_steps_round_trip(tmp_path):
    import dataclasses

    record = dataclasses.replace(
        make_record(), speed=Speed(fps=4.1, images_timed=195, warmup=5, device_kind="cuda", model="plain",
                                   precision="fp32", detail="one window per call"),
        fast_speed=Speed(fps=20.5, images_timed=195, warmup=5, device_kind="cuda", model="optimized",
                         precision="bf16"),
        fast_inference_memory=MemoryUse(gb=0.9, kind="cuda max_memory_allocated", detail="inference"),
        training_memory=None, failed_steps={"training_memory": "RuntimeError: CUDA out of memory"})
    path = write_result(record, tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert data["speed"]["model"] == "plain" and data["fast_speed"]["fps"] == 20.5
    assert data["failed_steps"] == {"training_memory": "RuntimeError: CUDA out of memory"}
    assert read_result(path) == record


def test_an_older_results_file_reads_its_one_speed_as_the_prepared_models(tmp_path):
    """Before the protocol fps was measured apart, the one fps was timed on the run's prepared model."""
    data = json.loads(make_record().to_json())
    for key in ("fast_speed", "failed_steps"):
        del data[key]
    del data["memory"]["fast_inference"]
    for key in ("model", "precision", "detail"):
        del data["speed"][key]
    data["optimizations"] = ["fuse_bn", "channels_last"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    record = read_result(tmp_path / "old.json")
    assert record.speed is None and record.inference_memory is None  # the protocol was not measured
    assert record.fast_speed.fps == 9.5 and record.fast_speed.model == "optimized"
    assert record.fast_inference_memory.gb == 1.5 and record.failed_steps == {}
    assert record.training_memory.gb == 6.3 and record.miou == pytest.approx(77.8)
