"""The notebooks' Jupytext pairs: each nbs/NN_name.py and its .ipynb agree, and no .ipynb holds outputs.

(The notebooks themselves are executed top to bottom by nbmake: pytest's addopts, nbs/conftest.py.)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
NOTEBOOKS = sorted(NBS.glob("[0-9][0-9]_*.ipynb"))
SYNC = "jupytext --sync nbs/*.py"  # the command that brings a pair back in step


def _cells(path: Path) -> list[tuple[str, str]]:
    """(cell type, source) of every cell, read through jupytext whatever the file's format."""
    return [(c.cell_type, c.source) for c in jupytext.read(path).cells]


def disagreement(ipynb: Path, py: Path) -> str | None:
    """None when the pair holds the same cells; else what differs first, and how to fix it."""
    if not py.exists():
        return f"{ipynb.name} has no paired source {py.name}: run `jupytext --set-formats ipynb,py:percent {ipynb}`"
    a, b = _cells(ipynb), _cells(py)
    for i, (ca, cb) in enumerate(zip(a, b)):
        if ca != cb:
            return (f"{ipynb.name} and {py.name} disagree at cell {i} ({ca[0]}: {ca[1][:60]!r} vs "
                    f"{cb[0]}: {cb[1][:60]!r}): run `{SYNC}` to re-sync them")
    if len(a) != len(b):
        return f"{ipynb.name} has {len(a)} cells, {py.name} {len(b)}: run `{SYNC}` to re-sync them"
    return None


def outputs_left(ipynb: Path) -> list[int]:
    """Indexes of code cells that hold outputs or an execution count."""
    nb = jupytext.read(ipynb)
    return [i for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]


def test_seven_notebooks_each_with_a_percent_source():
    assert [p.stem for p in NOTEBOOKS] == [
        "00_quickstart", "01_lr_finder", "02_lr_schedules", "03_transfer_learning", "04_optimizers",
        "05_recipe_flowers", "06_scrape_train_export"]
    sources = sorted(p for p in NBS.glob("*.py") if p.name != "conftest.py")
    assert [p.stem for p in sources] == [p.stem for p in NOTEBOOKS]
    for py in sources:
        assert "format_name: percent" in py.read_text()[:600], f"{py.name}: not a Jupytext percent file"
    assert 'formats = "ipynb,py:percent"' in (ROOT / "jupytext.toml").read_text()


@pytest.mark.parametrize("ipynb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_and_its_source_agree(ipynb):
    problem = disagreement(ipynb, ipynb.with_suffix(".py"))
    assert problem is None, problem


@pytest.mark.parametrize("ipynb", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(ipynb):
    cells = outputs_left(ipynb)
    assert not cells, (f"{ipynb.name}: code cells {cells} hold outputs; clear them "
                       f"(`jupytext --sync` writes none: `jupytext --to ipynb nbs/{ipynb.stem}.py`)")


def test_a_changed_source_is_caught_with_the_sync_command(tmp_path):
    """The check itself: an edit on one side of a pair fails, naming the command that fixes it."""
    ipynb = tmp_path / NOTEBOOKS[1].name
    shutil.copy(NOTEBOOKS[1], ipynb)
    py = ipynb.with_suffix(".py")
    text = NOTEBOOKS[1].with_suffix(".py").read_text()
    py.write_text(text)
    assert disagreement(ipynb, py) is None
    py.write_text(text.replace("NUM_IT = 30 if SMALL", "NUM_IT = 31 if SMALL", 1))
    assert f"run `{SYNC}`" in disagreement(ipynb, py) and "cell 1" in disagreement(ipynb, py)
    py.write_text(text + "\n# %%\nprint('one more cell')\n")
    assert "cells" in disagreement(ipynb, py)
    py.unlink()
    assert "no paired source" in disagreement(ipynb, py)


def test_outputs_are_caught(tmp_path):
    nb = jupytext.read(NOTEBOOKS[0])
    code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    nb.cells[code].outputs = [nbformat.v4.new_output("stream", name="stdout", text="hi\n")]
    jupytext.write(nb, tmp_path / "x.ipynb")
    assert outputs_left(tmp_path / "x.ipynb") == [code]


def test_pytest_collects_the_notebooks_not_their_sources():
    """nbmake runs each .ipynb once; the paired .py files are not collected as test modules."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly", "nbs"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    items = sorted(line for line in proc.stdout.splitlines() if line.startswith("nbs/"))
    assert items == [f"nbs/{p.name}::{p.name}" for p in NOTEBOOKS], proc.stdout


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed (pip install -e .[dev])")
def test_ruff_lints_the_notebook_sources_not_the_ipynb():
    proc = subprocess.run(["ruff", "check", "--show-files", "nbs"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    listed = {Path(line).name for line in proc.stdout.split()}
    assert {p.with_suffix(".py").name for p in NOTEBOOKS} <= listed, proc.stdout
    assert not {p.name for p in NOTEBOOKS} & listed  # linted once, through the source
