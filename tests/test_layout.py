"""The package's layout (docs/architecture.md): the library at the top of kvpack, the study, the
report and the workflow's plumbing in subpackages, imports flowing one way, no cycles, and
``import kvpack`` needing torch alone.

The rules below are the ones docs/architecture.md states; a test there checks the two agree.
"""

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kvpack"

# Which part of kvpack a module belongs to: the subpackage it sits in, or the library when it sits
# at the top of kvpack (ops, build, reference, torch_impl, and the cache and decode attention).
SUBPACKAGES = ("study", "report", "pipeline")
LIBRARY = "library"

# Which parts each part may import (besides itself). Read as arrows: report -> study -> library.
ALLOWED = {
    LIBRARY: set(),                   # the library imports nothing from the study, the report or the plumbing
    "study": {LIBRARY},               # measurements call the library; they never read tables or configs
    "report": {LIBRARY, "study"},     # tables read the measurements' record formats and metrics
    "pipeline": {LIBRARY, "study"},   # config checks variants; the runner drives the measurement jobs
}

# What `import kvpack` must not need: the study's, the report's and the workflow's dependencies.
HEAVY = ("pandas", "seaborn", "matplotlib", "snakemake", "papermill", "nbconvert", "jsonschema", "yaml",
         "transformers")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in SUBPACKAGES else LIBRARY


def imports_of(module: str) -> set[str]:
    """The kvpack modules ``module`` imports, at the top or inside a function (lazy imports count)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from kvpack.study import bench` imports the module kvpack.study.bench; `from .tables
            # import fmt` imports kvpack.report.tables.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t == "kvpack" or t.startswith("kvpack.")}
    found.discard(module)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_is_in_one_part_and_the_parts_exist():
    assert {part_of(m) for m in MODULES} == {LIBRARY, *SUBPACKAGES}
    for sub in SUBPACKAGES:
        assert (PACKAGE / sub / "__init__.py").exists()
    # The library's public face and the modules the README names stay at the top of kvpack.
    for m in ("kvpack", "kvpack.ops", "kvpack.build", "kvpack.reference", "kvpack.torch_impl"):
        assert m in MODULES and part_of(m) == LIBRARY


def test_every_import_resolves_to_a_module():
    for module, targets in GRAPH.items():
        unknown = {t for t in targets if t not in MODULES}
        assert not unknown, f"{module} imports {unknown}, which are not kvpack modules"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_one_way(module):
    part = part_of(module)
    wrong = sorted(t for t in GRAPH[module] if part_of(t) != part and part_of(t) not in ALLOWED[part])
    may = f"may import only {sorted(ALLOWED[part])}" if ALLOWED[part] else "may import nothing outside itself"
    assert not wrong, f"{module} ({part}) imports {wrong}; {part} {may} (docs/architecture.md)"


def test_no_import_cycles():
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(GRAPH[m]):
            if state.get(t) == "open":
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_the_rules_are_the_ones_docs_architecture_states():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for part, allowed in ALLOWED.items():
        line = f"| {part} | {', '.join(sorted(allowed)) or 'nothing'} |"
        assert line in doc, f"docs/architecture.md should have the row {line!r} (tests/test_layout.py ALLOWED)"
    for name in HEAVY:
        assert f"`{name}`" in doc


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)


def test_every_module_imports_alone():
    """Each module in a fresh interpreter of its own: no module works only because another ran first.
    (A few interpreters at a time: importing torch dominates.)"""

    def import_alone(module):
        r = _run(f"import {module}")
        return module, r.returncode, (r.stderr.strip().splitlines() or [""])[-1]

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        results = list(pool.map(import_alone, sorted(MODULES)))
    failed = {m: err for m, rc, err in results if rc != 0}
    assert not failed, f"modules that fail to import alone: {failed}"


def test_import_kvpack_needs_torch_alone():
    blocked = repr(HEAVY)
    code = f"""
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked}:
            raise ImportError(f"blocked for this test: {{name}}")
        return None

sys.meta_path.insert(0, Block())
import kvpack
print(sorted(m for m in sys.modules if m == "kvpack" or m.startswith("kvpack.")))
"""
    r = _run(code)
    assert r.returncode == 0, f"import kvpack needs more than torch:\n{r.stderr}"
    loaded = eval(r.stdout.strip().splitlines()[-1])
    assert all(part_of(m) == LIBRARY for m in loaded), f"import kvpack loads the study or report: {loaded}"


def test_the_block_works():
    """The blocking finder of the test above does block (else that test proves nothing)."""
    r = _run("import importlib.abc, sys\n"
             "class B(importlib.abc.MetaPathFinder):\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] == 'pandas': raise ImportError('blocked')\n"
             "sys.meta_path.insert(0, B())\n"
             "import kvpack.report.tables\n")
    assert r.returncode != 0 and "blocked" in r.stderr


def test_python_m_entry_points_answer_help():
    for module in ("kvpack.build", "kvpack.pipeline.runner", "kvpack.report.headline"):
        r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, check=False)
        assert r.returncode == 0 and "usage" in r.stdout, f"python -m {module} --help:\n{r.stderr}"
