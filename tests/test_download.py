"""Downloads against a real local server: verified, resumable, retried, cached, mirrored, offline."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
import shutil
import socket
from pathlib import Path

import pytest
import torch

from psp_zoo import DownloadError, cache_state, cached_path, create_model, download, is_cached
from psp_zoo.hub.cache import cache_dir, forget_failed_hosts
from psp_zoo.manifest.loading import Checkpoint, get_checkpoint

from helpers import tiny_checkpoint_path, tiny_info
from hub_server import ALT_DIR, OPENMMLAB, write_manifest

FAST = {"backoff": 0.001, "quiet": True}
fetching = importlib.import_module("psp_zoo.hub.fetching")  # where the backoff waits are made


@pytest.fixture(autouse=True)
def _no_hosts_remembered_as_down():
    """A host found down by one test (a closed port may be reused later) must not fail another test."""
    forget_failed_hosts()
    yield
    forget_failed_hosts()


@pytest.fixture
def sleeps(monkeypatch):
    """The backoff waits download() would have made (none are actually made)."""
    waited = []
    monkeypatch.setattr(fetching.time, "sleep", waited.append)
    return waited


@pytest.fixture
def lookups(monkeypatch):
    """Host names looked up by connections; names under .invalid fail here, as a resolver answers them,
    so no DNS query leaves the machine."""
    real, asked = socket.getaddrinfo, []

    def getaddrinfo(host, *args, **kwargs):
        asked.append(host)
        if str(host).endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _assert_library_advice(message: str, cache: Path, tag: str) -> None:
    assert "PSP_ZOO_MIRROR" in message and "offline=True" in message and "PSP_ZOO_OFFLINE" in message
    assert str(cache / tiny_checkpoint_path(tag).name) in message
    assert "--" not in message  # no command-line flags in a library message


def _published_twice(entry: Checkpoint, second_url: str) -> Checkpoint:
    """``entry`` as a manifest record listing the file at its own URL, then at ``second_url``."""
    return dataclasses.replace(entry, urls=(entry.url, second_url))


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


def test_503_is_retried_then_succeeds(hub_server, hub_manifest, hub_cache, sleeps, caplog):
    hub_server.script("r50", "503", "503")
    with caplog.at_level(logging.INFO, logger="psp_zoo"):
        download("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache, retries=3, backoff=1.0, quiet=True)
    assert [r.status for r in hub_server.requests_for("r50")] == [503, 503, 200]
    assert sleeps == [1.0, 2.0]
    retry_lines = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retry_lines) == 2 and all("answered HTTP 503 (Service Unavailable)" in line for line in retry_lines)


def test_a_read_timeout_is_retried_and_resumed(hub_server, hub_manifest, hub_cache, sleeps, caplog):
    hub_server.script("r50", "stall:100000")
    with caplog.at_level(logging.INFO, logger="psp_zoo"):
        path = download("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache, retries=2, timeout=0.5, quiet=True)
    assert [r.status for r in hub_server.requests_for("r50")] == [200, 206]
    assert len(sleeps) == 1 and any("no data for 0.5 s; retrying" in r.getMessage() for r in caplog.records)
    assert path.read_bytes() == tiny_checkpoint_path("r50").read_bytes()


def test_retries_give_up_with_the_url(hub_server, hub_manifest, hub_cache):
    hub_server.script("r50", "503", "503", "503")
    with pytest.raises(DownloadError, match=r"after 2 attempts.*HTTP 503") as info:
        download("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache, retries=1, **FAST)
    assert hub_server.url("r50") in str(info.value)


@pytest.mark.parametrize("status", ["404", "403", "410"])
def test_missing_file_fails_at_once_with_a_mirror_hint(hub_server, hub_manifest, hub_cache, status, sleeps):
    hub_server.script("r50", status)
    with pytest.raises(DownloadError) as info:
        download("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache, retries=5, **FAST)
    message = str(info.value)
    assert hub_server.url("r50") in message and f"HTTP {status}" in message
    _assert_library_advice(message, hub_cache, "r50")
    assert len(hub_server.log) == 1 and _leftovers(hub_cache) == [] and sleeps == []
    # a missing file says nothing about the host: the next file is asked for
    download("tiny_r101", manifest=hub_manifest, cache_dir=hub_cache, **FAST)


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


# --------------------------------------------------------------------------------------------
# network failures: fail fast, say why, do not ask a dead host again


def test_a_refused_connection_fails_at_once_naming_the_cause(hub_server, tmp_path, hub_cache, sleeps, lookups):
    port = _closed_port()
    dead = f"http://127.0.0.1:{port}"
    manifest = write_manifest(tmp_path / "dead.yml", dead)
    with pytest.raises(DownloadError) as info:  # default retries and backoff
        download("tiny_r50", manifest=manifest, cache_dir=hub_cache, quiet=True)
    message = str(info.value)
    assert f"connection to 127.0.0.1:{port} refused" in message and dead + "/" in message
    _assert_library_advice(message, hub_cache, "r50")
    assert sleeps == [] and lookups == ["127.0.0.1"]  # one connection attempt, no backoff

    with pytest.raises(DownloadError) as info:  # the next file of the same command
        download("tiny_r101", manifest=manifest, cache_dir=hub_cache, quiet=True)
    assert f"connection to 127.0.0.1:{port} refused" in str(info.value) and "not tried again" in str(info.value)
    assert lookups == ["127.0.0.1"] and sleeps == []
    _assert_library_advice(str(info.value), hub_cache, "r101")
    # another port on the same machine is another host
    assert download("tiny_r50", manifest=write_manifest(tmp_path / "live.yml", hub_server.base),
                    cache_dir=hub_cache, quiet=True).is_file()
    assert _leftovers(hub_cache) != [] and not (hub_cache / tiny_checkpoint_path("r101").name).exists()


def test_an_unresolvable_host_fails_at_once_naming_the_cause(tmp_path, hub_cache, sleeps, lookups):
    manifest = write_manifest(tmp_path / "official.yml", OPENMMLAB)
    mirror = "https://zoo-mirror.psp-zoo.invalid/"
    with pytest.raises(DownloadError) as info:
        download("tiny_r50", manifest=manifest, cache_dir=hub_cache, mirror=mirror, quiet=True)
    message = str(info.value)
    assert "host zoo-mirror.psp-zoo.invalid could not be resolved (no network or DNS)" in message
    assert mirror + "mmsegmentation/v0.5/pspnet/tiny/" + tiny_checkpoint_path("r50").name in message
    _assert_library_advice(message, hub_cache, "r50")
    assert sleeps == [] and lookups == ["zoo-mirror.psp-zoo.invalid"]

    with pytest.raises(DownloadError, match="could not be resolved.*not tried again"):
        download("tiny_r101", manifest=manifest, cache_dir=hub_cache, mirror=mirror, quiet=True)
    assert lookups == ["zoo-mirror.psp-zoo.invalid"]
    forget_failed_hosts()  # e.g. once the network is back: asked again
    with pytest.raises(DownloadError, match="could not be resolved"):
        download("tiny_r101", manifest=manifest, cache_dir=hub_cache, mirror=mirror, quiet=True)
    assert lookups == ["zoo-mirror.psp-zoo.invalid"] * 2 and sleeps == []


def test_retries_that_run_out_name_the_cause(hub_server, hub_manifest, hub_cache, sleeps):
    hub_server.script("r50", "drop:200000", "drop:200000")
    with pytest.raises(DownloadError) as info:
        download("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache, retries=1, backoff=1.0, quiet=True)
    message = str(info.value)
    assert "gave up after 2 attempts" in message and "connection dropped mid-file" in message
    assert "run again to resume" in message and "--" not in message and sleeps == [1.0]


# --------------------------------------------------------------------------------------------
# one file published at several URLs


def test_a_404_on_the_first_url_moves_to_the_second(hub_server, hub_manifest, hub_cache):
    second = hub_server.also_publish("r50")
    first = hub_server.url("r50")
    text = hub_manifest.read_text()
    assert text.count(f"weights: {first}\n") == 1
    hub_manifest.write_text(text.replace(f"weights: {first}\n", f"weights: [{first}, {second}]\n"))
    entry = get_checkpoint("tiny_r50", manifest=hub_manifest)
    assert entry.urls == (first, second)
    hub_server.script("r50", "404")
    path = download("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache, **FAST)
    assert [r.status for r in hub_server.requests_for("r50")] == [404]
    assert [r.status for r in hub_server.requests_for("r50", ALT_DIR)] == [200]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == tiny_info("r50")["sha256"]
    assert cache_state(entry, cache_dir=hub_cache) == "cached"


def test_the_hash_is_checked_on_whichever_url_served_the_file(hub_server, hub_manifest, hub_cache):
    second = hub_server.also_publish("r50")
    entry = _published_twice(get_checkpoint("tiny_r50", manifest=hub_manifest), second)
    hub_server.script("r50", "410")
    hub_server.script("r50", "wrong", folder=ALT_DIR)
    with pytest.raises(DownloadError) as info:
        download(entry, cache_dir=hub_cache, **FAST)
    message = str(info.value)
    assert "from any of 2 URLs" in message and hub_server.url("r50") in message and second in message
    assert "HTTP 410" in message and "SHA-256 mismatch" in message and tiny_info("r50")["sha256"] in message
    _assert_library_advice(message, hub_cache, "r50")
    assert _leftovers(hub_cache) == []

    hub_server.script("r50", "wrong")  # a bad copy at the first URL: the second serves a good one
    assert download(entry, cache_dir=hub_cache, **FAST).read_bytes() == tiny_checkpoint_path("r50").read_bytes()


def test_a_dead_first_host_moves_to_the_second(hub_server, hub_manifest, hub_cache, sleeps, lookups):
    entry = get_checkpoint("tiny_r50", manifest=hub_manifest)
    dead_url = entry.url.replace(hub_server.base, "http://zoo.psp-zoo.invalid")
    entry = dataclasses.replace(entry, urls=(dead_url, hub_server.url("r50")))
    assert download(entry, cache_dir=hub_cache, quiet=True).is_file()
    assert lookups == ["zoo.psp-zoo.invalid", "127.0.0.1"] and sleeps == []


def test_a_file_without_a_hash_fails_fast_too(hub_server, tmp_path, sleeps, lookups):
    from psp_zoo.hub.cache import fetch_file

    port = _closed_port()
    final = tmp_path / "logs" / "train.log.json"
    with pytest.raises(DownloadError) as info:
        fetch_file(f"http://127.0.0.1:{port}/train.log.json", final, quiet=True)
    message = str(info.value)
    assert f"connection to 127.0.0.1:{port} refused" in message and str(final) in message and "--" not in message
    assert sleeps == [] and lookups == ["127.0.0.1"] and not final.exists()
    with pytest.raises(DownloadError, match="not tried again"):
        fetch_file(f"http://127.0.0.1:{port}/other.log.json", tmp_path / "other.json", quiet=True)
    assert lookups == ["127.0.0.1"]
    hub_server.script("r50", "404")
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch_file(hub_server.url("r50"), final, quiet=True)
    assert [p.name for p in final.parent.rglob("*") if p.is_file() and not p.name.endswith(".lock")] == []


def test_an_offline_setting_that_is_neither_on_nor_off_is_an_error(monkeypatch, tmp_path, capsys):
    from psp_zoo.cli import main

    monkeypatch.setenv("PSP_ZOO_OFFLINE", "banana")
    with pytest.raises(DownloadError, match="PSP_ZOO_OFFLINE='banana' is neither on"):
        download("http://127.0.0.1:9/x_20200101_000000-12345678.pth", cache_dir=tmp_path)
    assert main(["get", "pspnet_r50-d8_512x1024_40k_cityscapes", "--cache-dir", str(tmp_path)]) != 0
    assert "PSP_ZOO_OFFLINE='banana'" in capsys.readouterr().err
    monkeypatch.setenv("PSP_ZOO_OFFLINE", "off")  # the usual spellings of off still mean online
    forget_failed_hosts()
    with pytest.raises(DownloadError, match="refused"):
        download("http://127.0.0.1:9/x_20200101_000000-12345678.pth", cache_dir=tmp_path, retries=0)


def test_a_hash_mismatch_advises_what_works_and_following_it_works(hub_server, hub_manifest, hub_cache, tmp_path):
    """Offline would refuse the served file as well, so the advice is the mirror or a user manifest
    entry with the file's own sha256; that entry then downloads and verifies it."""
    hub_server.script("r50", "wrong")
    with pytest.raises(DownloadError) as info:
        download("tiny_r50", manifest=hub_manifest, cache_dir=hub_cache, **FAST)
    message = str(info.value)
    assert "offline" not in message.lower() and "PSP_ZOO_MIRROR" in message
    assert "user manifest entry with its sha256" in message and "PSP_ZOO_MANIFEST" in message
    assert info.value.cli_hint == "on the command line: --mirror BASE, or --manifest FILE"
    served = bytes(b ^ 0xFF for b in tiny_checkpoint_path("r50").read_bytes())  # what the host serves
    digest = hashlib.sha256(served).hexdigest()
    old = tiny_info("r50")["sha256"]
    text = hub_manifest.read_text().replace(tiny_checkpoint_path("r50").name, "my_copy.pth")
    mine = tmp_path / "mine.yml"
    mine.write_text(text.replace(old, digest).replace(f'hash: "{old[:8]}"', f'hash: "{digest[:8]}"'))
    hub_server.files[hub_server.path_of("r50").replace(tiny_checkpoint_path("r50").name, "my_copy.pth")] = served
    path = download("tiny_r50", manifest=mine, cache_dir=hub_cache, **FAST)
    assert path.read_bytes() == served and path.name == f"my_copy-{digest[:8]}.pth"


# --------------------------------------------------------------------------------------------
# a local file (a file:// URL, as a fine-tuned run's entry names its checkpoint) is used where it is


@pytest.fixture
def local_entry(tmp_path):
    """A user manifest whose entry's weights are a file:// URL into a run's work dir, as zoo_entry writes it."""
    from psp_zoo.testing import manifest_entry
    from psp_zoo.testing import write_manifest as write_user_manifest

    weights = tmp_path / "work" / tiny_checkpoint_path("r50").name
    weights.parent.mkdir()
    shutil.copyfile(tiny_checkpoint_path("r50"), weights)
    arch = {k: v for k, v in tiny_info("r50")["config"].items() if k not in ("depth", "num_classes")}
    entry = manifest_entry(weights, weights.resolve().as_uri(), num_classes=5, arch=arch,
                           test={"mode": "whole", "img_scale": [64, 32]})
    return weights, write_user_manifest(tmp_path / "manifest.yml", [entry]), entry["name"]


def test_a_local_file_is_used_where_it_is_never_copied(local_entry, tmp_path, caplog):
    weights, manifest, name = local_entry
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="psp_zoo"):
        assert download(name, manifest=manifest, cache_dir=cache) == weights
        assert download(name, manifest=manifest, cache_dir=cache, offline=True) == weights
        assert download(weights.as_uri(), cache_dir=cache) == weights
    assert not any("downloading" in record.getMessage() for record in caplog.records)
    assert not cache.exists()  # nothing copied, no housekeeping either
    assert not (weights.parent / ".psp-zoo").exists()  # and nothing written beside the user's file
    assert cached_path(name, manifest=manifest, cache_dir=cache) == weights
    assert cache_state(name, manifest=manifest, cache_dir=cache) == "cached"


def test_a_local_file_whose_hash_changed_is_refused_and_not_copied(local_entry, tmp_path):
    weights, manifest, name = local_entry
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    assert cache_state(name, manifest=manifest, cache_dir=cache) == "corrupt"
    with pytest.raises(DownloadError, match="SHA-256 mismatch"):
        download(name, manifest=manifest, cache_dir=cache, **FAST)
    assert list(cache.glob("*.pth")) == [] and _leftovers(cache) == []


def test_evaluate_by_name_uses_the_local_file_in_place(local_entry, tmp_path, capsys):
    from psp_zoo.cli import main
    from psp_zoo.testing import write_mini_cityscapes

    weights, manifest, name = local_entry
    write_mini_cityscapes(tmp_path / "data", num_images=1, size=(32, 64), num_classes=5)
    cache = tmp_path / "cache"
    code = main(["evaluate", name, "--data-root", str(tmp_path / "data"), "--manifest", str(manifest),
                 "--cache-dir", str(cache), "--device", "cpu", "--num-workers", "0"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "downloading" not in err and "mIoU" in out
    assert not cache.exists()
