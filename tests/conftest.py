"""Shared test fixtures: the reference files kept in tests/fixtures/ and the two tiny checkpoints."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# copies of the reference implementation's outputs (see tests/fixtures/mmseg/README.md): a plain
# clone runs its tests without anything beside it
FIXTURES = REPO / "tests" / "fixtures" / "mmseg"
REFERENCE = REPO / "tests" / "fixtures" / "reference"  # the published tables and family facts
TINY = ("r50", "r101")


def tiny_info(tag: str) -> dict:
    """index.json's record for a tiny fixture: checkpoint file name, sha256 and PSPNet config."""
    return json.loads((FIXTURES / "index.json").read_text())[tag]


def tiny_checkpoint_path(tag: str) -> Path:
    return FIXTURES / tiny_info(tag)["checkpoint"]


def write_tiny_ade_manifest(path: Path, test: str) -> Path:
    """A user manifest serving the tiny r50 fixture as an ADE20K entry (``test``: its YAML test settings)."""
    info = tiny_info("r50")
    path.write_text(
        "models:\n"
        "  - name: tiny_pspnet_r50-d8_ade20k\n"
        "    dataset: ade20k\n    depth: 50\n    crop_size: [64, 64]\n    schedule: 1\n"
        f"    weights: http://127.0.0.1:1/{info['checkpoint']}\n"
        f"    hash: \"{info['sha256'][:8]}\"\n"
        "    published: {}\n"
        f"    test: {test}\n"
        "    model: {num_classes: 5, stem_channels: 8, base_channels: 8, channels: 16, aux_channels: 8}\n")
    return path


def tiny_model(tag: str, align_corners: bool = False):
    from psp_zoo import PSPNet, load_checkpoint

    model = PSPNet(align_corners=align_corners, **tiny_info(tag)["config"]).eval()
    load_checkpoint(model, tiny_checkpoint_path(tag))
    return model


def tiny_expected(tag: str, align_corners: bool) -> dict:
    data = torch.load(FIXTURES / f"tiny_pspnet_{tag}-d8_expected.pt", weights_only=True)
    return data[f"align_corners_{align_corners}"]


@pytest.fixture(autouse=True)
def _isolate_environment(monkeypatch, tmp_path_factory):
    """No test reads the user's manifest, cache or network settings."""
    for var in ("PSP_ZOO_MANIFEST", "PSP_ZOO_HOME", "PSP_ZOO_MIRROR", "PSP_ZOO_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
    # the local test servers must be reached directly even where a proxy is configured
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY", ""), "127.0.0.1", "localhost"]))
    monkeypatch.setenv("NO_PROXY", no_proxy)
    monkeypatch.setenv("no_proxy", no_proxy)


@pytest.fixture
def hub_server():
    """A checkpoint host on 127.0.0.1 serving the tiny fixtures (see hub_server.py)."""
    from hub_server import CheckpointServer

    server = CheckpointServer()
    yield server
    server.close()


@pytest.fixture
def hub_manifest(hub_server, tmp_path):
    """A user manifest whose entries tiny_r50 / tiny_r101 are hosted by ``hub_server``."""
    from hub_server import write_manifest

    return write_manifest(tmp_path / "tiny_manifest.yml", hub_server.base)


@pytest.fixture
def hub_cache(tmp_path):
    return tmp_path / "cache"


@pytest.fixture
def single_thread():
    """torch on one thread: on a machine whose few cores are shared, its thread pool can spend
    far longer waiting than computing (a tiny model's forward went from 3 ms to 800 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
