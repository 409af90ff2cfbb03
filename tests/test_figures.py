"""kvpack.report.figures and the report notebook, on SYNTHETIC tables (fake GPU rows labelled as test data)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from test_tables import CPU_GRID, GPU_GRID, PAPER_DIR, TEST_GPU, cpu_only_tables, cpu_plus_gpu_reference, write_run

from kvpack.report import assemble
from kvpack.report import claims as kc
from kvpack.report import figures as kf
from kvpack.report import tables as kt

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "reports" / "report.ipynb"
REPORT_SCRIPT = ROOT / "workflow" / "scripts" / "report.py"


def _check_outputs(png: Path, svg: Path):
    assert png.exists() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert svg.exists() and svg.stat().st_size > 1_000
    assert b"<svg" in svg.read_bytes()[:2000]


@pytest.mark.parametrize("name", list(kf.FIGURES))
def test_figures_cpu_only(tmp_path, name):
    t = cpu_only_tables(tmp_path / "data")
    png, svg = kf.make_figure(name, t, tmp_path / f"{name}.png", tmp_path / f"{name}.svg")
    _check_outputs(png, svg)
    if name in ("speedup", "peers"):  # panels that need a GPU say so instead of failing
        assert b"no GPU measurements" in svg.read_bytes()


@pytest.mark.parametrize("name", list(kf.FIGURES))
def test_figures_with_gpu_reference(tmp_path, name):
    t = cpu_plus_gpu_reference(tmp_path / "data")
    png, svg = kf.make_figure(name, t, tmp_path / f"{name}.png", tmp_path / f"{name}.svg")
    _check_outputs(png, svg)
    if name in ("time", "speedup", "roofline"):
        assert b"paper (their GPU)" in svg.read_bytes()
    if name in ("speedup", "peers"):
        assert b"no GPU measurements" not in svg.read_bytes()


@pytest.mark.parametrize("name", list(kf.FIGURES))
def test_figures_without_any_records(tmp_path, name):
    t = kt.Tables(paper=kt.paper_table(), paper_l2=kc.paper_l2_check(), memory=kt.memory_table([]))
    _check_outputs(*kf.make_figure(name, t, tmp_path / f"{name}.png"))


def test_figures_from_csv_roundtrip(tmp_path):
    b, a = write_run(tmp_path / "run", "test-cpu", False, CPU_GRID)
    ref = tmp_path / "reference" / "test-gpu"
    write_run(ref, "test-gpu", True, GPU_GRID)
    assemble.write_tables(b, a, [ref], PAPER_DIR, None, tmp_path / "tables")
    t = kt.read_tables(tmp_path / "tables")
    for name in kf.FIGURES:
        _check_outputs(*kf.make_figure(name, t, tmp_path / "fig" / f"{name}.png"))


def test_unknown_figure(tmp_path):
    with pytest.raises(ValueError, match="unknown figure"):
        kf.make_figure("nope", kt.Tables(), tmp_path / "x.png")


def test_notebook_template_has_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "tables_dir" in tagged[0].source
    assert nb.cells.index(tagged[0]) == 0
    # the committed notebook is what reports/make_notebook.py writes
    spec = importlib.util.spec_from_file_location("make_notebook", ROOT / "reports" / "make_notebook.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert [c.source for c in mod.build().cells] == [c.source for c in nb.cells]
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_notebook_executes_on_synthetic_tables(tmp_path):
    """papermill + nbconvert --no-input, in a subprocess whose PATH lacks this environment's bin/ (a
    not-activated venv): the 'python3' kernel must still resolve to this interpreter."""
    b, a = write_run(tmp_path / "run", "test-cpu", False, CPU_GRID)
    ref = tmp_path / "reference" / "test-gpu"
    write_run(ref, "test-gpu", True, GPU_GRID)
    tables_dir, figures_dir = tmp_path / "tables", tmp_path / "figures"
    assemble.write_tables(b, a, [ref], PAPER_DIR, [{"T": T, "D": D} for T, D in CPU_GRID], tables_dir)
    t = kt.read_tables(tables_dir)
    for name in kf.FIGURES:
        kf.make_figure(name, t, figures_dir / f"{name}.png")
    out_nb, out_html = tmp_path / "out" / "report.ipynb", tmp_path / "out" / "report.html"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('report_script', {str(REPORT_SCRIPT)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"m.run_notebook({str(NOTEBOOK)!r}, {str(out_nb)!r}, {str(out_html)!r}, "
        f"dict(tables_dir={str(tables_dir)!r}, figures_dir={str(figures_dir)!r}, device='test-cpu', "
        "skipped_notes=['TEST NOTE from the workflow']), cwd=" + repr(str(ROOT)) + ")\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/bin:/bin"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    html = out_html.read_text()
    for text in ("Summary", "Workloads", "Performance", "Speedups", "Accuracy", "Memory", "Claims",
                 "float32", "What was skipped", "Provenance", "TEST NOTE from the workflow",
                 "No CUDA GPU on this machine", "committed reference run on", TEST_GPU,
                 "reproduced", "paper_vectorized_vs_cpu", "paper_l2_error",
                 # the claims, judged per source, side by side
                 "claims judged on this run: test-cpu", "<th>this run: test-cpu</th>", "<th>reference: test-gpu</th>",
                 "reproduced on reference: test-gpu; needs a CUDA GPU on this run: test-cpu"):
        assert text in html, text
    assert html.count("<img") >= len(kf.FIGURES)
    assert "kt.read_tables" not in html  # --no-input: no code in the HTML
    nb = nbformat.read(out_nb, as_version=4)
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
