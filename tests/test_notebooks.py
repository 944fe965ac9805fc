"""Notebooks are committed as users should get them: no outputs, Colab GPU metadata, one `parameters` cell
(profile, run_name, overrides) followed by the cell that checks them and opens the run; no link leaves the repo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == ["01_model_test", "02_training", "03_evaluation", "04_analysis"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_and_parameterised(path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "stored outputs"
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    source = "".join(cells[tagged[0]]["source"])
    for line in ('profile = "auto"', "run_name = None", "overrides = {}"):
        assert line in source
    assert "colab.research.google.com" in "".join(cells[0]["source"])
    # Colab opens it on a GPU runtime.
    assert nb["metadata"]["accelerator"] == "GPU" and nb["metadata"]["colab"]["gpuType"] == "T4"
    # The cell after the parameters checks them and opens the named run (papermill injects its cell in between).
    assert "check_parameters(globals(), _names_before_parameters)" in "".join(cells[tagged[0] + 1]["source"])
    assert "cfg = open_run(profile, run_name, overrides)" in "".join(cells[tagged[0] + 1]["source"])


def test_every_notebook_has_the_same_set_up_cell():
    setups = {"".join(json.loads(p.read_text())["cells"][1]["source"]) for p in NOTEBOOKS}
    assert len(setups) == 1 and next(iter(setups)).startswith("# Set-up, safe to run again")


def test_no_link_leaves_the_repository():
    root = NOTEBOOKS[0].parent.parent
    for path in [root / "README.md", *NOTEBOOKS, *sorted((root / "docs").glob("*.md")), *sorted((root / "senri").glob("*.py"))]:
        assert "../shared" not in path.read_text(), path
