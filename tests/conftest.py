"""pytest fixtures shared by the test files (the rest they share is in helpers.py)."""
from __future__ import annotations

import os

import pytest
import torch

from psp_zoo.constants import ENVIRONMENT_VARIABLES


@pytest.fixture(autouse=True)
def _isolate_environment(monkeypatch, tmp_path_factory):
    """No test reads the user's manifest, cache or network settings."""
    for var in ENVIRONMENT_VARIABLES:
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
