"""Downloads against a real local server: verified, resumable, retried, cached, mirrored, offline."""
from __future__ import annotations

import hashlib
import shutil

import pytest
import torch

from psp_zoo import DownloadError, cache_state, cached_path, create_model, download, is_cached
from psp_zoo.hub import cache_dir

from conftest import tiny_checkpoint_path, tiny_info
from hub_server import OPENMMLAB, write_manifest

FAST = {"backoff": 0.001, "quiet": True}


def _leftovers(cache):
    """Files in the cache other than the lock (which may stay)."""
    return sorted(p.name for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


def test_download_verifies_and_places_the_file(hub_server, hub_manifest, hub_cache):
    path = download("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache, **FAST)
    assert path == hub_cache / tiny_checkpoint_path("r50").name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == tiny_info("r50")["sha256"]
    assert [r.status for r in hub_server.requests_for("r50")] == [200]
    assert not (hub_cache / ".psp-zoo" / (path.name + ".part")).exists()
    assert is_cached("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache)
    assert cached_path("tiny-r50-alias", manifest=hub_manifest, cache_dir=hub_cache) == path


def test_cache_hit_makes_no_request(hub_server, hub_manifest, hub_cache):
    first = download("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache, **FAST)
    again = download("tiny-r50-alias", manifest=hub_manifest, cache_dir=hub_cache, **FAST)
    assert again == first and len(hub_server.log) == 1


def test_a_file_fetched_by_torch_hub_is_reused_after_verification(hub_server, hub_manifest, monkeypatch):
    torch_cache = cache_dir()  # torch.hub.get_dir()/checkpoints under the test's TORCH_HOME
    assert torch_cache == cache_dir(None) and str(torch_cache).startswith(torch.hub.get_dir())
    torch_cache.mkdir(parents=True)
    shutil.copy(tiny_checkpoint_path("r101"), torch_cache)
    assert cache_state("tiny_r101", manifest=hub_manifest) == "cached"
    assert download("tiny_r101", manifest=hub_manifest, **FAST) == torch_cache / tiny_checkpoint_path("r101").name
    assert hub_server.log == []
    monkeypatch.setenv("PSP_ZOO_HOME", str(torch_cache / "elsewhere"))
    assert cache_state("tiny_r101", manifest=hub_manifest) == "missing"


def test_a_corrupt_cached_file_is_replaced(hub_server, hub_manifest, hub_cache):
    hub_cache.mkdir()
    target = hub_cache / tiny_checkpoint_path("r50").name
    target.write_bytes(b"not a checkpoint")
    assert cache_state("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache) == "corrupt"
    download("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache, **FAST)
    assert target.read_bytes() == tiny_checkpoint_path("r50").read_bytes()


def test_resume_after_a_dropped_connection_sends_fewer_bytes(hub_server, hub_manifest, hub_cache):
    size = tiny_checkpoint_path("r50").stat().st_size
    hub_server.script("r50", "drop:300000")
    with pytest.raises(DownloadError, match="run again to resume"):
        download("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache, retries=0, **FAST)
    assert cache_state("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache) == "partial"
    assert not (hub_cache / tiny_checkpoint_path("r50").name).exists()

    path = download("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache, retries=0, **FAST)
    first, second = hub_server.requests_for("r50")
    assert second.status == 206 and second.range.startswith("bytes=")
    resumed_at = int(second.range[len("bytes="):-1])
    assert 0 < resumed_at <= 300000 and second.sent == size - resumed_at < size
    assert path.read_bytes() == tiny_checkpoint_path("r50").read_bytes()


def test_retries_resume_within_one_call(hub_server, hub_manifest, hub_cache):
    hub_server.script("r101", "drop:200000", "drop:500000")
    path = download("tiny_r101", manifest=hub_manifest, cache_dir=hub_cache, retries=2, **FAST)
    requests = hub_server.requests_for("r101")
    assert [r.status for r in requests] == [200, 206, 206]
    assert sum(r.sent for r in requests) < 2 * path.stat().st_size
    assert hashlib.sha256(path.read_bytes()).hexdigest() == tiny_info("r101")["sha256"]


def test_a_server_ignoring_range_restarts_cleanly(hub_server, hub_manifest, hub_cache):
    hub_server.script("r50", "drop:100000", "ignore_range")
    path = download("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache, retries=1, **FAST)
    assert [r.status for r in hub_server.requests_for("r50")] == [200, 200]
    assert path.read_bytes() == tiny_checkpoint_path("r50").read_bytes()


def test_a_complete_part_file_is_finished_on_416(hub_server, hub_manifest, hub_cache):
    part = hub_cache / ".psp-zoo" / (tiny_checkpoint_path("r50").name + ".part")
    part.parent.mkdir(parents=True)
    shutil.copy(tiny_checkpoint_path("r50"), part)
    path = download("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache, **FAST)
    assert [r.status for r in hub_server.requests_for("r50")] == [416]
    assert path.read_bytes() == tiny_checkpoint_path("r50").read_bytes() and not part.exists()


def test_hash_mismatch_leaves_nothing_behind(hub_server, hub_manifest, hub_cache):
    hub_server.script("r50", "wrong")
    with pytest.raises(DownloadError) as info:
        download("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache, **FAST)
    wrong = hashlib.sha256(bytes(b ^ 0xFF for b in tiny_checkpoint_path("r50").read_bytes())).hexdigest()
    message = str(info.value)
    assert "SHA-256 mismatch" in message and tiny_info("r50")["sha256"] in message and wrong in message
    assert _leftovers(hub_cache) == []


def test_a_bad_resumed_part_is_fetched_again_from_scratch(hub_server, hub_manifest, hub_cache):
    part = hub_cache / ".psp-zoo" / (tiny_checkpoint_path("r50").name + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 1000)  # garbage left by something else
    path = download("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache, **FAST)
    assert [r.status for r in hub_server.requests_for("r50")] == [206, 200]
    assert path.read_bytes() == tiny_checkpoint_path("r50").read_bytes()


def test_503_is_retried_then_succeeds(hub_server, hub_manifest, hub_cache):
    hub_server.script("r50", "503", "503")
    download("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache, retries=3, **FAST)
    assert [r.status for r in hub_server.requests_for("r50")] == [503, 503, 200]


def test_retries_give_up_with_the_url(hub_server, hub_manifest, hub_cache):
    hub_server.script("r50", "503", "503", "503")
    with pytest.raises(DownloadError, match=r"after 2 attempts.*HTTP 503") as info:
        download("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache, retries=1, **FAST)
    assert hub_server.url("r50") in str(info.value)


@pytest.mark.parametrize("status", ["404", "403"])
def test_missing_file_fails_at_once_with_a_mirror_hint(hub_server, hub_manifest, hub_cache, status):
    hub_server.script("r50", status)
    with pytest.raises(DownloadError) as info:
        download("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache, retries=5, **FAST)
    message = str(info.value)
    assert hub_server.url("r50") in message and f"HTTP {status}" in message and "--mirror" in message
    assert len(hub_server.log) == 1 and _leftovers(hub_cache) == []


def test_offline_uses_only_the_cache(hub_server, hub_manifest, hub_cache, monkeypatch):
    with pytest.raises(DownloadError) as info:
        download("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache, offline=True)
    message = str(info.value)
    assert "offline" in message and str(hub_cache / tiny_checkpoint_path("r50").name) in message
    download("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache, **FAST)
    monkeypatch.setenv("PSP_ZOO_OFFLINE", "1")
    monkeypatch.setenv("PSP_ZOO_HOME", str(hub_cache))
    assert download("tiny_r50", manifest=hub_manifest).parent == hub_cache
    with pytest.raises(DownloadError, match="tiny_pspnet_r101.*is not in the cache"):
        download("tiny_r101", manifest=hub_manifest)
    assert len(hub_server.log) == 1


def test_mirror_replaces_the_openmmlab_host(hub_server, tmp_path, hub_cache, monkeypatch):
    manifest = write_manifest(tmp_path / "official.yml", OPENMMLAB)  # as the published zoo lists them
    download("tiny_r50", manifest=manifest, cache_dir=hub_cache, mirror=hub_server.base + "/", **FAST)
    monkeypatch.setenv("PSP_ZOO_MIRROR", hub_server.base)
    download("tiny_r101", manifest=manifest, cache_dir=hub_cache, **FAST)
    assert [r.path for r in hub_server.log] == [hub_server.path_of("r50"), hub_server.path_of("r101")]


def test_env_manifest_and_urls_are_accepted(hub_server, hub_manifest, hub_cache, monkeypatch):
    monkeypatch.setenv("PSP_ZOO_MANIFEST", str(hub_manifest))
    assert download("tiny_r101", cache_dir=hub_cache, **FAST).is_file()
    by_url = download(hub_server.url("r50"), cache_dir=hub_cache, **FAST)
    assert by_url.read_bytes() == tiny_checkpoint_path("r50").read_bytes()
    with pytest.raises(DownloadError, match="cannot verify"):
        download(hub_server.base + "/weights.pth", cache_dir=hub_cache)
    file_url = tiny_checkpoint_path("r101").as_uri()
    assert download(file_url, cache_dir=hub_cache / "second").read_bytes() == \
        tiny_checkpoint_path("r101").read_bytes()


def test_an_explicit_sha256_is_enforced(hub_server, hub_cache):
    with pytest.raises(DownloadError, match="expected 5c6bb156f"):
        download(hub_server.url("r50"), cache_dir=hub_cache, sha256="5c6bb156" + "f" * 56, **FAST)
    assert _leftovers(hub_cache) == []


def test_create_model_downloads_and_loads(hub_server, hub_manifest, hub_cache):
    model = create_model("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache, quiet=True)
    reference = torch.load(tiny_checkpoint_path("r50"), weights_only=True)["state_dict"]
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in reference.items())
    create_model("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache, offline=True)
    assert len(hub_server.log) == 1


def test_unwritable_cache_is_a_clear_error(hub_manifest, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DownloadError, match="cannot write to the cache.*PSP_ZOO_HOME"):
        download("tiny_r50", manifest=hub_manifest, cache_dir=blocker / "cache")


def test_a_cache_that_refuses_writes_is_a_download_error(hub_server, hub_manifest, hub_cache, monkeypatch):
    import builtins

    real_open = builtins.open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        if str(file).endswith(".part") and ("w" in mode or "a" in mode):
            raise OSError(28, "No space left on device", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_on_a_full_disk)
    with pytest.raises(DownloadError, match=r"\.part: No space left on device; free some space"):
        download("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache, **FAST)
    monkeypatch.undo()
    assert not cached_path("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache).exists()
