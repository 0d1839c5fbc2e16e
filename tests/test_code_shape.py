"""The shape of psp_zoo's code: imports follow the pipeline (no cycle, not even through an import
inside a function), functions stay short, and the command line starts without torch."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

from helpers import REPO

PACKAGE = REPO / "psp_zoo"
MAX_FUNCTION_LINES = 50
# Named exceptions, each with its own limit: a loop that reads top to bottom on one screen beats one
# scattered over helpers to meet the line count (torchvision's train_one_epoch, nanoGPT's train.py).
LONGER_FUNCTIONS = {"psp_zoo/training/loop.py:_run": 70}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _internal_imports(path: Path) -> Set[str]:
    """Every psp_zoo module ``path`` imports, at the top or inside a function (not TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    checking = [node for node in ast.walk(tree) if isinstance(node, ast.If)
                and getattr(node.test, "id", None) == "TYPE_CHECKING"]
    skipped = {id(n) for block in checking for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
            names = [f"{target}.{alias.name}" for alias in node.names]
            modules = {name for name in names if (PACKAGE / Path(*name.split(".")[1:])).with_suffix(".py").exists()}
            found.update(modules)
            if len(modules) < len(names):  # `from . import a_module` imports that module, not the package's names
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "psp_zoo" or name.startswith("psp_zoo.")}


def _graph() -> Dict[str, Set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {i for i in _internal_imports(path) if i in modules and i != name}
            for name, path in modules.items()}


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_no_import_cycle_inside_the_package():
    graph = _graph()
    assert "psp_zoo.results.records" in graph["psp_zoo.evaluation.evaluator"]
    # no module imports the package back (psp_zoo/__init__ is the public face, nothing else)
    back = sorted(name for name, imports in graph.items() if "psp_zoo" in imports and name != "psp_zoo")
    assert back == []
    assert _cycle(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_no_function_longer_than_50_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > LONGER_FUNCTIONS.get(f"{path.relative_to(REPO).as_posix()}:{node.name}",
                                                 MAX_FUNCTION_LINES):
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert long == []


def test_the_command_line_starts_without_torch():
    code = ("import sys\nfrom psp_zoo.cli import main\n"
            "for argv in (['--help'], ['list'], ['info', 'pspnet_r50-d8_512x1024_40k_cityscapes'], ['tables']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch imported' if 'torch' in sys.modules or 'torchvision' in sys.modules else 'no torch')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(REPO)}, timeout=120)
    assert run.stdout.strip().endswith("no torch"), run.stdout[-500:] + run.stderr[-2000:]


def test_the_tests_need_nothing_beside_the_clone():
    """A plain clone runs its tests: every reference file lives in tests/fixtures/ and checks out."""
    import hashlib
    import json

    from helpers import FIXTURES

    for info in json.loads((FIXTURES / "index.json").read_text()).values():
        data = (FIXTURES / info["checkpoint"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"]
    beside = ("..", "/", "shared")  # the folder a developer's checkout has beside it, a user's has not
    outside = [str(path.relative_to(REPO)) for path in sorted((REPO / "tests").rglob("*.py"))
               if "".join(beside) in path.read_text() or 'parent / "' + beside[2] in path.read_text()]
    assert outside == []


def _private_imports(source: str, module: str) -> List[str]:
    """``from psp_zoo.x import _name`` in ``module``: another module's private name (a private module of
    the importer's own package, ``cli/_options.py`` in ``cli/``, is the package's to share)."""
    package = module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom) or not (node.level or (node.module or "").startswith("psp_zoo")):
            continue
        base = package.split(".")
        base = base[: len(base) - node.level + 1] if node.level else []
        target = ".".join(base + (node.module.split(".") if node.module else []))
        for alias in node.names:
            sibling = (PACKAGE.parent / Path(*package.split("."), alias.name)).with_suffix(".py")
            own_module = target == package and sibling.exists()
            if alias.name.startswith("_") and not alias.name.endswith("__") and not own_module:
                found.append(f"{module}: {target}.{alias.name}")
    return found


def test_no_module_imports_another_modules_private_name():
    """What modules share is public in the module that owns it; a leading underscore stays in its module."""
    found = [f for path in sorted(PACKAGE.rglob("*.py"))
             for f in _private_imports(path.read_text(encoding="utf-8"), _module_name(path))]
    assert found == []


def test_the_private_import_check_catches_one():
    source = ("from ..datasets.readers import SEE_README, _files_below\nfrom . import _options\n"
              "from .._version import __version__\n")
    assert _private_imports(source, "psp_zoo.cli.dataset") == [
        "psp_zoo.cli.dataset: psp_zoo.datasets.readers._files_below"]
    assert _private_imports("from .readers import _label_for\n", "psp_zoo.datasets.check") == [
        "psp_zoo.datasets.check: psp_zoo.datasets.readers._label_for"]


#: A fact the code relies on -> a pattern that only its one home in psp_zoo/ writes (tests pin the values
#: on their own, as they should); the test material's patterns count tests/ too.
ONE_HOME = {
    "the ignore index": r"^IGNORE_INDEX\s*=|ignore_index: int = \d",
    "the ResNet depth table": r"\b3, 4, 23, 3\b|\b18, 50,? (or )?101\b|\{2: 18\b",
    "the checkpoint / validation interval (a tenth of the run)": r"// 10\)",
    "the recipe's identity fields": r"\"name\", \"dataset\", \"num_classes\"",
}
ONE_HOME_WITH_TESTS = {
    "a test HTTP server's thread": r"serve_forever",
    "a generated shape": r"cv2\.circle\(",
}


def _homes(files: Dict[str, str], facts: Dict[str, str]) -> Dict[str, List[str]]:
    """fact -> the lines of ``files`` (name -> text) that write it, where it is written more than once."""
    found = {fact: [f"{name}:{number}" for name, text in files.items()
                    for number, line in enumerate(text.splitlines(), 1) if re.search(pattern, line)]
             for fact, pattern in facts.items()}
    return {fact: lines for fact, lines in found.items() if len(lines) > 1}


def test_each_fact_has_one_home():
    code = {str(path.relative_to(REPO)): path.read_text(encoding="utf-8") for path in PACKAGE.rglob("*.py")}
    tests = {str(path.relative_to(REPO)): path.read_text(encoding="utf-8") for path in (REPO / "tests").glob("*.py")
             if path.name != Path(__file__).name}
    assert _homes(code, ONE_HOME) == {}
    assert _homes({**code, **tests}, ONE_HOME_WITH_TESTS) == {}


def test_the_one_home_check_catches_a_second_copy():
    files = {"a.py": "IGNORE_INDEX = 255\n", "b.py": "def loss(x, ignore_index: int = 255):\n    pass\n"}
    assert _homes(files, ONE_HOME) == {"the ignore index": ["a.py:1", "b.py:1"]}


# --------------------------------------------------------------------------------------------
# the documented order


def _documented_layers() -> Dict[str, int]:
    """docs/ARCHITECTURE.md's package table: package ('model/') or plain module ('errors.py') -> its row, top first."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table = text.split("## Packages in pipeline order", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    layers = {}
    for index, row in enumerate(rows):
        first = row.split("|")[1]
        for name in re.findall(r"`([A-Za-z_]+(?:\.py|/))`", first):
            layers[name] = index
    return layers


def _layer_key(module: str) -> str:
    """psp_zoo.cli.get -> 'cli/', psp_zoo.errors -> 'errors.py'."""
    parts = module.split(".")[1:]
    return f"{parts[0]}/" if (PACKAGE / parts[0]).is_dir() else f"{parts[0]}.py"


def test_every_module_is_in_the_documented_order_and_imports_only_upward():
    layers = _documented_layers()
    graph = _graph()
    modules = [name for name in graph if name != "psp_zoo"]  # the public face imports lazily, by name
    unlisted = sorted({_layer_key(m) for m in modules} - set(layers))
    assert unlisted == [], f"add these to the table in docs/ARCHITECTURE.md: {unlisted}"
    assert _downward(graph, layers) == [], "imports against the documented order (docs/ARCHITECTURE.md)"
    gone = sorted(set(layers) - {_layer_key(m) for m in modules})
    assert gone == [], f"the table lists modules that do not exist: {gone}"


def _downward(graph: Dict[str, Set[str]], layers: Dict[str, int]) -> List[str]:
    return sorted(f"{m} -> {i}" for m in graph if m != "psp_zoo" for i in graph[m]
                  if i != "psp_zoo" and layers[_layer_key(i)] > layers[_layer_key(m)])


def test_the_top_level_holds_at_most_twelve_plain_modules():
    """The rest of psp_zoo lives in packages by role (docs/ARCHITECTURE.md)."""
    plain = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(plain) <= 12, plain


def test_the_order_check_catches_an_import_against_it():
    layers = _documented_layers()
    assert layers["errors.py"] < layers["manifest/"] < layers["hub/"] < layers["cli/"]
    wrong = {"psp_zoo.evaluation.scoring": {"psp_zoo.training.loop", "psp_zoo.evaluation.metrics"},
             "psp_zoo.cli.get": {"psp_zoo.hub.cache"}}
    assert _downward(wrong, layers) == ["psp_zoo.evaluation.scoring -> psp_zoo.training.loop"]


def test_the_code_cites_only_documents_in_the_repository():
    """Facts the code relies on are in docs/reference.md; a file name the code cites must exist."""
    cited = set()
    for path in [*PACKAGE.rglob("*.py"), PACKAGE / "manifest" / "model_index.yml", *(REPO / "tests").glob("*.py"),
                 *(REPO / "benchmarks").glob("*.py")]:
        cited.update((path.relative_to(REPO), name) for name in re.findall(r"[\w./-]*\b[A-Za-z_]+\.md\b",
                                                                             path.read_text(encoding="utf-8")))
    documents = {(where, name) for where, name in cited if name.startswith("docs/") or Path(name).stem.isupper()}
    missing = sorted(f"{where}: {name}" for where, name in documents
                     if not (REPO / name).is_file() and not (REPO / "docs" / Path(name).name).is_file()
                     and not (REPO / where).parent.joinpath(name).is_file())
    assert missing == []


def test_test_files_share_through_helpers_only():
    """tests/helpers.py is the one shared module; conftest.py holds fixtures; no test file imports another."""
    offenders = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in getattr(node, "names", [])]
            if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                    n and (n == "conftest" or n.startswith("test_")) for n in names):
                offenders.append(path.name)
    assert offenders == []
    conftest = ast.parse((REPO / "tests" / "conftest.py").read_text(encoding="utf-8"))
    plain = [n.name for n in conftest.body if isinstance(n, ast.FunctionDef)
             and not any("fixture" in ast.unparse(d) for d in n.decorator_list)]
    assert plain == []
