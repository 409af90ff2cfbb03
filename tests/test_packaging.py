"""environment.yml (conda) and pyproject.toml list the same dependencies; CI runs the README's command."""

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r): r.replace(" ", "") for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {_name(r): r.replace(" ", "") for r in pip if not r.startswith("-e")}
    assert listed == wanted


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- test-command -->\n```[a-z]*\n(.+?)\n```\n<!-- /test-command -->", readme, re.DOTALL)
    assert block, "README.md must show the test command between <!-- test-command --> markers"
    assert "pytest" in block.group(1)
    assert "<!-- test-command -->" in (ROOT / ".ci" / "run").read_text()
    assert "snakemake --cores all" in readme
