"""
The documentation site builds with `mkdocs build --strict` (mkdocs.yml: Material, mkdocstrings' API reference), and
its hooks do what they say: repository files linked from a page are published, a missing one fails the build.

Needs the `docs` extra (part of `dev`); skipped, saying so, where it is not installed.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
DOCS_PACKAGES = {
    "mkdocs": "mkdocs",
    "material": "mkdocs-material",
    "mkdocstrings": "mkdocstrings",
    "mkdocstrings_handlers.python": "mkdocstrings-python",
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is missing
        return False


MISSING = [package for module, package in DOCS_PACKAGES.items() if not _installed(module)]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"the docs tools are not installed ({', '.join(MISSING)}): pip install -e '.[docs]'"
)


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "-d", str(site)]
    return subprocess.run(command, cwd=config.parent, env=env, capture_output=True, text=True)


def test_site_builds_strict(tmp_path):
    result = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    site = tmp_path / "site"
    # Every page of docs/ is in the site, and the API reference was generated from the docstrings.
    for page in sorted((ROOT / "docs").glob("*.md")):
        name = "index.html" if page.stem == "index" else f"{page.stem}/index.html"
        assert (site / name).is_file(), name
    trainers = (site / "api" / "trainers" / "index.html").read_text(encoding="utf-8")
    assert "DiffusionGRPOTrainer" in trainers and "reward_funcs" in trainers
    # The Hugging Face-style parameter lists are read as parameters, not shown as a code block.
    configs = (site / "api" / "configs" / "index.html").read_text(encoding="utf-8")
    assert "num_generations (int)" not in configs and "Parameters:</p>" not in configs


def write_project(root: Path, page: str) -> Path:
    """A one-page MkDocs project in `root/repo`, with this repository's link hook, and a file outside its docs/."""
    repo = root / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "tools").mkdir()
    (repo / "tools" / "run.py").write_text("print('hello')\n")
    (repo / "docs" / "index.md").write_text(page)
    hook = ROOT / "docs" / "hooks" / "repository_files.py"
    config = repo / "mkdocs.yml"
    config.write_text(f"site_name: t\nhooks:\n  - {hook}\n")
    return config


def test_linked_repository_files_are_published(tmp_path):
    page = "# Page\n\n[the script](../tools/run.py), `[in code](../tools/gone.py)`\n\n![plot](../results/plot.png)\n"
    config = write_project(tmp_path, page)
    result = mkdocs_build(config, tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "repository" / "tools" / "run.py").read_text() == "print('hello')\n"
    html = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert 'href="repository/tools/run.py"' in html
    # A benchmark output that this checkout lacks becomes a note naming it.
    assert "results/plot.png" in html and "<img" not in html


def test_a_missing_repository_file_fails_the_strict_build(tmp_path):
    config = write_project(tmp_path, "# Page\n\n[gone](../tools/gone.py)\n")
    result = mkdocs_build(config, tmp_path / "site")
    assert result.returncode != 0
    assert "links to the repository file tools/gone.py, which does not exist" in result.stdout + result.stderr
