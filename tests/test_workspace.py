"""Notebook parameters are checked (a misspelt one is named, with what is valid), overrides reach the configuration,
and opening a run finds it where notebooks look for it and refuses one made with other settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from senri.training.config import ConfigManager
from senri.workspace.notebook import check_parameters, mount_drive, open_run, parse_overrides


def _parameter_cells(*sources: str) -> dict:
    """The globals of a notebook after its set-up cell, its parameters cell and papermill's injected cell."""
    namespace: dict = {"os": os, "Path": Path, "REPO": Path.cwd(), "_is_senri_repo": lambda p: True}
    namespace["_names_before_parameters"] = set(namespace)
    for source in sources:
        exec(source, namespace)
    return namespace


DECLARED = 'profile = "auto"\nrun_name = None\noverrides = {}\n'


def test_declared_parameters_pass_and_others_are_named():
    ok = _parameter_cells(DECLARED, '# Parameters\nprofile = "cpu-smoke"\nrun_name = "x"\n')
    check_parameters(ok, ok["_names_before_parameters"])
    ok = _parameter_cells(DECLARED + "import json\n_private = 1\n")  # imports and _names are not parameters
    check_parameters(ok, ok["_names_before_parameters"])
    # papermill -p max_step 30 (misspelt) and, edited in Jupyter's parameters cell, run_nme = "x" and seq_len = 512.
    bad = _parameter_cells(DECLARED + 'run_nme = "x"\nseq_len = 512\n', "# Parameters\nmax_step = 30\n")
    with pytest.raises(NameError) as error:
        check_parameters(bad, bad["_names_before_parameters"])
    message = str(error.value)
    assert message.startswith("unknown notebook parameters ['max_step', 'run_nme', 'seq_len']; this notebook's "
                              "parameters are ['profile', 'run_name', 'overrides']")
    assert "'run_nme': did you mean 'run_name'?" in message
    assert "'max_step': the config key 'training.max_steps' is set with overrides={'training.max_steps': ...}" in message
    assert "'seq_len': the config key 'training.seq_len'" in message


def test_overrides_parameter_accepts_a_dict_or_its_text():
    assert parse_overrides(None) == {} and parse_overrides("") == {}
    assert parse_overrides({"training.max_steps": 3}) == {"training.max_steps": 3}
    assert parse_overrides('{"training.max_steps": 3}') == {"training.max_steps": 3}  # papermill -p overrides '{...}'
    assert parse_overrides("training.max_steps: 3") == {"training.max_steps": 3}
    with pytest.raises(ValueError, match="parameter overrides must be a dict of dotted config keys.*got list"):
        parse_overrides("[1, 2]")
    with pytest.raises(ValueError, match="parameter overrides = '{a: ' is not a JSON/YAML mapping"):
        parse_overrides("{a: ")


def test_open_run_outside_colab_uses_drive_dir_as_drive(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SENRI_DRIVE_MOUNTPOINT", str(tmp_path / "no-drive"))
    assert mount_drive() is None  # not Colab, nothing mounted: nothing to do, no warning
    cfg = open_run("cpu-smoke", "exp1", {"experiment.drive_dir": str(tmp_path / "drive"),
                                         "experiment.run_dir": str(tmp_path / "local")})
    assert cfg.experiment.run_name == "exp1" and cfg.home_dir() == tmp_path / "drive"
    out = capsys.readouterr()
    assert f"run 'exp1' (profile cpu-smoke) lives on Drive: {tmp_path / 'drive'}" in out.out and not out.err
    local = open_run("cpu-smoke", None, json.dumps({"experiment.run_dir": str(tmp_path / "local")}))
    assert local.experiment.run_name == "cpu-smoke" and local.home_dir() == tmp_path / "local"
    with pytest.raises(ValueError, match="override 'max_stepz' is not a known key"):
        open_run("cpu-smoke", None, {"max_stepz": 3})
    with pytest.raises(ValueError, match="parameter run_name must be a string or None, got int 3"):
        open_run("cpu-smoke", 3)


def test_open_run_refuses_a_run_made_with_other_settings(tmp_path):
    overrides = {"experiment.run_dir": str(tmp_path / "local"), "experiment.drive_dir": str(tmp_path / "drive")}
    made = ConfigManager("cpu-smoke", {**overrides, "training.seq_len": 64})
    made.save(tmp_path / "drive" / "senri" / "config.yaml")  # 02 started this run on another runtime
    open_run("cpu-smoke", None, {**overrides, "training.seq_len": 64, "training.max_steps": 99})  # continuation
    with pytest.raises(ValueError, match=r"run 'cpu-smoke' \(.*drive/senri\) was made with other settings: "
                                         r"training.seq_len: 64 in the run, 128 now.*another name"):
        open_run("cpu-smoke", None, overrides)
