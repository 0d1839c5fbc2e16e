"""Every command in the README's Quick start runs as written (against a local checkpoint host), and
the fine-tuning walk-through of docs/finetune.md runs offline as written."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from psp_zoo.results.records import read_result
from psp_zoo.testing import write_mini_cityscapes

from helpers import REPO, tiny_checkpoint_path, tiny_info

QUICK_START_NAME = "pspnet_r50-d8_512x1024_40k_cityscapes"


def doc_section(page: str, title: str) -> str:
    """The section ``## title`` of the page ``page`` (a path from the repository's root)."""
    text = (REPO / page).read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def readme_section(title: str) -> str:
    return doc_section("README.md", title)


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


# --------------------------------------------------------------------------------------------
# the fine-tuning walk-through, offline


def _offline_env(tmp_path: Path) -> dict:
    """The user's shell: psp-zoo from this clone, no network (PSP_ZOO_OFFLINE), an empty cache of its own."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PSP_ZOO_")}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PSP_ZOO_OFFLINE": "1",
            "PSP_ZOO_HOME": str(tmp_path / "cache")}


def finetune_walk_through() -> list:
    """The bash blocks of docs/finetune.md's steps 1 to 4 in order, the one alternative that fetches a
    published checkpoint left out."""
    steps = [doc_section("docs/finetune.md", title) for title in ("1. ", "2. ", "3. ", "4. ")]
    blocks = [block for step in steps for block in code_blocks(step, "bash")]
    published = [block for block in blocks if re.search(r"--from pspnet_", block)]
    assert len(published) == 1
    return [block for block in blocks if block not in published]


def test_the_fine_tuning_walk_through_runs_offline_as_written(tmp_path):
    blocks = finetune_walk_through()
    assert [block.split()[:3] for block in blocks] == [["psp-zoo", "dataset", "example"],
                                                       ["psp-zoo", "dataset", "check"],
                                                       ["psp-zoo", "train", "--from"],
                                                       ["export", "PSP_ZOO_MANIFEST=work/shapes/model_index.yml",
                                                        "psp-zoo"]]
    folder, env = tmp_path / "user", _offline_env(tmp_path)
    folder.mkdir()
    outputs = []
    for block in blocks:  # each block as one shell script, as a user pastes it
        done = subprocess.run(["bash", "-ec", block], cwd=folder, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, f"{block}\n{done.stdout}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)
    assert (folder / "shapes" / "tiny_pspnet_r18-d8.pth").is_file()
    assert outputs[1].count("no problems found") == 2 and "64 pairs read" in outputs[1]
    entry = yaml.safe_load((folder / "work" / "shapes" / "model_index.yml").read_text())["models"][0]
    assert entry["name"] == "shapes_pspnet" and entry["weights"].startswith("file://")
    assert entry["finetuned_from"]["name"] == "shapes/tiny_pspnet_r18-d8.pth"
    assert (folder / "predictions" / "shape_000_labels.png").is_file() and (folder / "shapes.onnx").is_file()
    (results,) = (folder / "results" / "shapes_pspnet").glob("*.json")
    assert read_result(results).miou >= 85.0  # the example is learnt: the fine-tuned model works by name
    assert "shapes_pspnet" in outputs[3]
    # the fine-tuned file was read where it is: nothing was fetched or copied into the cache
    assert not list((tmp_path / "cache").rglob("*.pth"))
    # and a clone's .gitignore covers everything the walk-through wrote
    shutil.copyfile(REPO / ".gitignore", folder / ".gitignore")
    subprocess.run(["git", "init", "-q", str(folder)], check=True)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=folder,
                            capture_output=True, text=True, check=True)
    assert status.stdout.splitlines() == ["?? .gitignore"]


def test_the_install_section_says_how_to_install_torch_s_cpu_build_first():
    section = readme_section("Install")
    (block,) = code_blocks(section, "bash")
    assert block.strip() == "python -m pip install -e ."  # our own install command, as CI's
    prose = " ".join(section.split("```")[2].split())
    command = re.search(r"`((?:python -m )?pip install torch torchvision --index-url (\S+))`", prose)
    assert command and command.group(2) == "https://download.pytorch.org/whl/cpu"
    assert re.search(r"first install torch's CPU build .* then the above", prose)  # then the usual install
