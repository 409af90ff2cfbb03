"""Rule report: papermill executes reports/report.ipynb over the tables and figures, then nbconvert
writes it as HTML without code cells (the equivalent of `jupyter nbconvert --to html --no-input`).

The kernel is 'python3'. jupyter_client resolves it to this interpreter: the kernelspec that
ipykernel installs says `python`, which jupyter_client replaces by sys.executable, and where no
kernelspec is installed at all it falls back to ipykernel's own native spec (also sys.executable).
So the notebook runs with the venv/conda env that runs snakemake, activated or not.
"""

import sys
from pathlib import Path

KERNEL = "python3"


def check_kernel(kernel_name: str = KERNEL) -> str:
    """Where jupyter finds the kernel, and the command it will start (errors say how to fix it)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel:
        raise RuntimeError(f"no Jupyter kernel {kernel_name!r}: install ipykernel in this environment "
                           f"({sys.executable} -m pip install ipykernel)") from None
    return f"{spec.resource_dir}: {spec.argv}"


def run_notebook(template, out_ipynb, out_html, parameters: dict, cwd=None, kernel_name: str = KERNEL) -> None:
    """Execute ``template`` with ``parameters`` into ``out_ipynb`` (papermill), then write ``out_html``
    without code cells. Raises (papermill.PapermillExecutionError) if a cell fails."""
    import nbformat
    import papermill as pm
    from nbconvert import HTMLExporter

    out_ipynb, out_html = Path(out_ipynb), Path(out_html)
    out_ipynb.parent.mkdir(parents=True, exist_ok=True)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    print("kernel:", check_kernel(kernel_name), flush=True)
    pm.execute_notebook(str(template), str(out_ipynb), parameters=parameters, kernel_name=kernel_name,
                        cwd=str(cwd) if cwd else None, progress_bar=False, log_output=True)
    exporter = HTMLExporter()
    exporter.exclude_input = True          # --no-input: no code cells, no prompts
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    body, _ = exporter.from_notebook_node(nbformat.read(out_ipynb, as_version=4))
    out_html.write_text(body, encoding="utf-8")


def main(sm) -> None:
    tables_dir = Path(sm.input.tables[0]).parent.resolve()
    figures_dir = Path(sm.input.figures[0]).parent.resolve()
    parameters = {
        "tables_dir": str(tables_dir),
        "figures_dir": str(figures_dir),
        "device": str(sm.params.device),
        "title": str(sm.params.title),
        "paper_dir": str(Path(sm.params.paper_dir).resolve()),
        "skipped_notes": [str(n) for n in (sm.params.notes or [])],
    }
    run_notebook(sm.input.notebook, sm.output.notebook, sm.output.html, parameters,
                 cwd=Path(sm.input.notebook).resolve().parent.parent)


if "snakemake" in globals():  # run by snakemake; importable (tests) without it

    from kvpack.pipeline.jobs import log_to_file

    log_to_file(snakemake.log[0], "report")
    main(snakemake)
