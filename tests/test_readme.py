"""Every command in the README's Quick start runs as written (against a local checkpoint host)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from psp_zoo.testing import write_mini_cityscapes

from helpers import REPO, tiny_checkpoint_path, tiny_info

QUICK_START_NAME = "pspnet_r50-d8_512x1024_40k_cityscapes"


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"## {title}")
    return text[start:text.index("\n## ", start + 1)]


def quick_start() -> str:
    return readme_section("Quick start")


def code_blocks(section: str, language: str) -> list:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def test_the_readme_test_commands_are_what_ci_runs():
    (block,) = code_blocks(readme_section("Tests"), "bash")
    assert block.strip().splitlines() == ["python -m pip install -e '.[test]'", "python -m ruff check .",
                                          "python -m pytest -q"]
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == block.strip().splitlines()


def test_the_readme_is_a_readme_and_links_every_docs_page():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) < 250
    assert text.index("## Quick start") < text.index("## Tests")  # using psp-zoo first, its test suite later
    pages = sorted(p.name for p in (REPO / "docs").glob("*.md"))
    assert {"commands.md", "datasets.md", "performance.md", "export.md", "manifests.md", "reference.md"} <= set(pages)
    assert [name for name in pages if f"(docs/{name})" not in text] == []


def test_load_checkpoint_examples_pass_a_path_that_works_from_anywhere():
    """A bare weight file name only resolves from inside the cache: the examples pass the path
    download() returns (the Quick start's Python block runs it as written, below)."""
    texts = [(REPO / "README.md").read_text(), *(p.read_text() for p in (REPO / "docs").glob("*.md"))]
    bare = [call for text in texts for call in re.findall(r"load_checkpoint\([^)]*\)", text)
            if re.search(r"""["'][^"'/]+\.(pth|safetensors)["']""", call)]
    assert bare == []
    assert "psp_zoo.load_checkpoint(model, path)" in code_blocks(quick_start(), "python")[0]


def _override_manifest(path: Path, hub_server) -> Path:
    """The Quick start's checkpoint name, served as the tiny r50 fixture by ``hub_server``."""
    info = tiny_info("r50")
    arch = ", ".join(f"{k}: {v}" for k, v in info["config"].items() if k != "depth")
    path.write_text(f"""models:
  - name: {QUICK_START_NAME}
    dataset: cityscapes
    depth: 50
    crop_size: [64, 64]
    schedule: 40000
    weights: {hub_server.url('r50')}
    hash: "{info['sha256'][:8]}"
    sha256: "{info['sha256']}"
    published: {{mIoU: 77.85, mIoU(ms+flip): 79.18, Mem (GB): 6.1, Inf time (fps): 4.07}}
    test: {{img_scale: [96, 48]}}
    model: {{{arch}}}
""")
    return path


@pytest.fixture
def user_folder(tmp_path, hub_server):
    """A clone's root as the Quick start expects it: demo.png, data/cityscapes, hubconf.py."""
    folder = tmp_path / "clone"
    folder.mkdir()
    (folder / "hubconf.py").symlink_to(REPO / "hubconf.py")
    rng = np.random.default_rng(0)
    cv2.imwrite(str(folder / "demo.png"), rng.integers(0, 255, (48, 80, 3), dtype=np.uint8))
    write_mini_cityscapes(folder / "data" / "cityscapes", num_images=2, size=(40, 64), num_classes=5)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PSP_ZOO_HOME": str(tmp_path / "cache"),
           "PSP_ZOO_MANIFEST": str(_override_manifest(tmp_path / "manifest.yml", hub_server))}
    return folder, env


def test_quick_start_commands_run_as_written(user_folder):
    folder, env = user_folder
    commands = code_blocks(quick_start(), "bash")[0].strip().splitlines()
    assert [c.split()[1] for c in commands] == ["list", "get", "predict", "reproduce", "tables", "selftest"]
    outputs = {}
    for command in commands:
        done = subprocess.run(command, shell=True, cwd=folder, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        outputs[command.split()[1]] = done.stdout
    assert QUICK_START_NAME in outputs["list"]
    cached = Path(outputs["get"].strip())
    fixture = tiny_checkpoint_path("r50")
    assert cached.name == fixture.name and cached.read_bytes() == fixture.read_bytes()
    for suffix in ("labels", "overlay", "legend"):
        assert (folder / "predictions" / f"demo_{suffix}.png").is_file()
    assert len(list((folder / "results" / QUICK_START_NAME).glob("cpu-*.json"))) == 1  # named by the CPU model
    assert "77.85 / " in outputs["tables"]  # the published mIoU beside a reproduced one


def test_quick_start_python_runs_as_written(user_folder):
    folder, env = user_folder
    (source,) = code_blocks(quick_start(), "python")
    done = subprocess.run([sys.executable, "-c", source], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Published(miou=77.85" in done.stdout
