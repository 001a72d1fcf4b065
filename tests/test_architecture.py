"""The map in docs/architecture.md, kept true: every module on it, no import cycle, no import upwards, and the
layering rules (train never imports solve, data never imports the model build, the light modules load no torch,
a technique is one file and one row)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest
from helpers import REPO

PACKAGE = REPO / "autotune"
MAP = REPO / "docs" / "architecture.md"


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def imports_of(path) -> set[str]:
    """The autotune modules `path` imports, at module level or inside functions (they run when called), not under
    `if TYPE_CHECKING:` (they never run)."""
    found: set[str] = set()
    stack: list[ast.AST] = [ast.parse(path.read_text(encoding="utf-8"))]
    while stack:
        node = stack.pop()
        if _type_checking(node):
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        stack.extend(ast.iter_child_nodes(node))
    return {m for m in found if m in MODULES}


GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}
# The package's door (docs/architecture.md): autotune/__init__.py imports the API only when one of its names is first
# used, never on import (test_the_package_door_is_lazy), so that edge is no import of floor 0.
API_DOOR = ("autotune", "autotune.api")
GRAPH[API_DOOR[0]] = GRAPH[API_DOOR[0]] - {API_DOOR[1]}


def floors() -> dict[str, int]:
    """Module -> floor, from the map's table (a folder stands for every module in it; a file named on its own wins
    over its folder)."""
    by_folder: dict[str, int] = {}
    by_file: dict[str, int] = {}
    for line in MAP.read_text(encoding="utf-8").splitlines():
        row = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if not row:
            continue
        for ref in re.findall(r"`([^`]+)`", row.group(2)):
            if ref.endswith("/"):
                by_folder[ref.rstrip("/").replace("/", ".")] = int(row.group(1))
            else:
                by_file[module_name(REPO / ref)] = int(row.group(1))
    out = {}
    for name in MODULES:
        if name in by_file:
            out[name] = by_file[name]
        else:
            folder = next((f for f in by_folder if name == f or name.startswith(f + ".")), None)
            if folder is not None:
                out[name] = by_folder[folder]
    return out


def closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in GRAPH[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_every_module_is_on_the_map():
    assert not sorted(set(MODULES) - set(floors())), "add these modules to docs/architecture.md's table"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of `graph` of more than one node: its import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_there_is_no_import_cycle():
    assert cycles(GRAPH) == []
    # and the check sees one where there is one (the profile importing the solver, as it once did):
    assert cycles({**GRAPH, "autotune.profile": GRAPH["autotune.profile"] | {"autotune.solve.record"}}) == [
        ["autotune.profile", "autotune.solve.record"]
    ]


def test_no_module_imports_from_a_floor_above_its_own():
    floor = floors()
    upward = sorted(
        f"{m} (floor {floor[m]}) imports {d} (floor {floor[d]})"
        for m, deps in GRAPH.items()
        for d in deps
        if floor[d] > floor[m]
    )
    assert upward == []


def test_the_map_would_catch_an_import_upwards(tmp_path):
    """The checks above can fail: the graph sees a function-level import, and the floors order it."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from autotune.solve.plan import solve\n", encoding="utf-8")
    assert imports_of(probe) == {"autotune.solve.plan"}
    guarded = tmp_path / "guarded.py"
    guarded.write_text("if TYPE_CHECKING:\n    from autotune.solve import plan\n", encoding="utf-8")
    assert imports_of(guarded) == set()
    assert floors()["autotune.solve.plan"] > floors()["autotune.profile"]


def test_the_package_door_is_lazy():
    """The door reaches the API and nothing else, and only when asked: `import autotune` loads neither autotune.api
    nor torch, and each API name is then the API's function, even after its namesake module was imported."""
    assert imports_of(MODULES[API_DOOR[0]]) == {API_DOOR[1]}
    code = (
        "import sys\n"
        "import autotune\n"
        "loaded = [m for m in ('autotune.api', 'torch', 'transformers') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "import autotune.solve, autotune.estimate, autotune.export\n"
        "from autotune import api, estimate, export, probe, solve, train\n"
        "assert (probe, estimate, solve, train, export) == (api.probe, api.estimate, api.solve, api.train, api.export)\n"
        "assert sorted(autotune.__all__) == sorted(['__version__', *autotune.API])\n"
        "from autotune.solve import plan, run_solve\n"
        "assert plan.__name__ == 'autotune.solve.plan' and callable(run_solve)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr


def test_train_never_imports_solve():
    reached = closure("autotune.runner")
    assert not [m for m in reached if m == "autotune.solve" or m.startswith("autotune.solve.")]
    assert "autotune.profile" in reached  # the contract is how train reads a profile


def test_data_never_imports_the_model_build():
    build = {"autotune.modeling", "autotune.step", "autotune.trial", "autotune.runner"}
    for name in MODULES:
        if name.startswith("autotune.data"):
            assert not closure(name) & build, name


LIGHT = (
    "autotune",
    "autotune.cli",
    "autotune.peers",
    "autotune.api",
    "autotune.config",
    "autotune.catalog",
    "autotune.hardware",
    "autotune.techniques",
    "autotune.estimate",
    "autotune.profile",
    "autotune.solve.search",
    "autotune.solve.plan",
    "autotune.batching",
    "autotune.measurement",
    "autotune.distributed",
)


def test_the_light_modules_load_no_torch():
    """`autotune probe`, `validate` and `estimate` answer without torch; the search knows no model."""
    code = (
        "import importlib, sys\n"
        f"for name in {LIGHT!r}:\n"
        "    importlib.import_module(name)\n"
        "    heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules]\n"
        "    assert not heavy, (name, heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr


def test_every_technique_file_has_a_row_and_every_row_a_file():
    from autotune.techniques import TECHNIQUES_TABLE, switch_function

    files = {p.stem for p in (PACKAGE / "techniques").glob("*.py") if p.stem != "__init__"}
    assert files == {t.module for t in TECHNIQUES_TABLE}
    assert len({t.key for t in TECHNIQUES_TABLE}) == len(TECHNIQUES_TABLE)  # one row each
    for t in TECHNIQUES_TABLE:
        assert (switch_function(t) is None) == (t.switch is None), t.key


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("autotune.techniques.")))
def test_a_technique_file_imports_no_other_technique_but_the_ones_it_builds_on(module):
    """Techniques stay apart: a technique file imports the table and, at most, what it computes with (the fused loss
    reads the 8-bit head a block at a time; the NF4 experts run the split LoRA's forward)."""
    others = {m for m in GRAPH[module] if m.startswith("autotune.techniques.")}
    assert others <= {"autotune.techniques.int8_head", "autotune.techniques.split_lora"}, others


def test_no_test_module_imports_another():
    """What tests share lives in tests/helpers/ and conftest.py, once."""
    tests = REPO / "tests"
    names = {p.stem for p in tests.glob("test_*.py")}
    offenders = []
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                offenders += [(path.name, a.name) for a in node.names if a.name in names]
            elif isinstance(node, ast.ImportFrom) and node.module in names:
                offenders.append((path.name, node.module))
    assert offenders == []


def test_the_checkpoint_folder_prefix_is_transformers_own():
    """run_files names checkpoint-N folders without importing transformers (export's and train's refusals answer in a
    third of a second); the Trainer writes them under its own prefix, which must be the same."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from autotune.run_files import CHECKPOINT_PREFIX

    assert CHECKPOINT_PREFIX == PREFIX_CHECKPOINT_DIR
