"""A simulated Colab session: each runtime is a fresh clone of the repository (nothing on its local disk) whose
kernel has a stand-in ``google.colab`` imported, as Colab has; its ``drive.mount`` links ``MyDrive`` to one
temporary folder that outlives the runtimes. The notebooks run unchanged under papermill.

* runtime 1 runs 02 on cpu-smoke and dies (SIGKILL) after its first checkpoint reached Drive;
* runtime 2 runs 02 again, resumes from Drive and ends with the per-step losses of an uninterrupted run; the same
  run name with other settings is refused, naming them;
* runtime 3 runs 03 then 04, which find 02's model, metrics and figures on Drive and retrain nothing;
* the set-up cell runs twice; a declined Drive mount leaves the run local with a one-line warning; a misspelt
  papermill parameter fails the run, naming it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from senri.training.config import ConfigManager
from senri.training.config import model_runs
from senri.training.loop import is_complete
from senri.training.recipes import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

REPO = Path(__file__).resolve().parent.parent
RUN = "colab-sim"
# cpu-smoke, smaller: 32 samples of 64 tokens (window 32 + chunks of 8: the memory is written), 8 steps per epoch;
# the first checkpoint is at step 4, and 16 more steps give the test time to kill the runtime before the end.
OVERRIDES = {"training.max_steps": 20, "training.save_steps": 4, "training.seq_len": 64,
             "experiment.num_train_samples": 32, "experiment.compare_real_model": False}
PARAMETERS = ["-p", "profile", "cpu-smoke", "-p", "run_name", RUN]

STANDIN = {
    "google/colab/__init__.py": '"""Stand-in for Colab\'s google.colab (tests/test_colab.py)."""\n',
    "google/colab/drive.py": '''"""Stand-in for google.colab.drive: mount() links <mountpoint>/MyDrive to $STANDIN_MYDRIVE, or raises as Colab
does when the user declines ($STANDIN_DRIVE=decline)."""
import os
from pathlib import Path


class MessageError(RuntimeError):
    pass


def mount(mountpoint, force_remount=False, timeout_ms=120000, readonly=False):
    if os.environ.get("STANDIN_DRIVE") == "decline":
        raise MessageError("Error: credential propagation was unsuccessful")
    link = Path(mountpoint) / "MyDrive"
    if link.exists():
        print("Drive already mounted at", mountpoint)
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.environ["STANDIN_MYDRIVE"], target_is_directory=True)
    print("Mounted at", mountpoint)
''',
    # A Colab kernel has google.colab imported before the first cell runs.
    "sitecustomize.py": "import google.colab  # noqa: F401\n",
}


@pytest.fixture
def colab(tmp_path):
    """(stand-in directory, MyDrive): what every runtime of the session shares."""
    if not (Path(sys.prefix) / ".setup-stamp").exists():
        # Without make setup's stamp the set-up cell, seeing Colab, would pip-install the requirements here.
        pytest.skip("needs the venv of `make setup` (its .setup-stamp)")
    standin = tmp_path / "standin"
    for name, text in STANDIN.items():
        (standin / name).parent.mkdir(parents=True, exist_ok=True)
        (standin / name).write_text(text)
    (tmp_path / "MyDrive").mkdir()
    return standin, tmp_path / "MyDrive"


def new_runtime(tmp_path: Path, name: str) -> Path:
    """A runtime's /content with a fresh clone of this repository in content/senri (as the set-up cell makes in
    Colab); tracked files changed in the working tree are carried over, so the working tree is what is tested."""
    content = tmp_path / name / "content"
    clone = content / "senri"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source, target = REPO / name, clone / name
        if not source.is_file():
            target.unlink(missing_ok=True)  # deleted in the working tree
        elif not target.is_file() or source.read_bytes() != target.read_bytes():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return content


def _env(standin: Path, mydrive: Path, content: Path, drive: str = "accept") -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(standin), "STANDIN_MYDRIVE": str(mydrive), "STANDIN_DRIVE": drive,
            "SENRI_DRIVE_MOUNTPOINT": str(content / "drive"), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
            "HF_HUB_OFFLINE": "1"}


def papermill(notebook: Path, content: Path, env: dict, *params: str, overrides: dict | None = None,
              background: bool = False):
    """Run ``notebook`` as Colab would: kernel started in /content (the runtime's content folder)."""
    out = content.parent / f"{notebook.stem}-{time.monotonic_ns()}.ipynb"
    command = [sys.executable, "-m", "papermill", "-k", "python3", str(notebook), str(out), "--cwd", str(content),
               *params]
    if overrides is not None:
        command += ["-y", json.dumps({"overrides": overrides})]
    if background:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=420)
    result.output = out
    return result


def _outputs(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))


def _kill_runtime(process: subprocess.Popen) -> None:
    """SIGKILL papermill and its kernel (which runs in a session of its own), as a runtime that dies."""
    victims = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for victim in reversed(victims):
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)
    process.wait()


def _losses(path: Path) -> dict[int, float]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records}


def test_a_colab_session_across_three_runtimes(tmp_path, colab):
    standin, mydrive = colab
    home = mydrive / "senri" / RUN
    notebooks = lambda content: content / "senri" / "notebooks"  # noqa: E731

    # Runtime 1: 02 trains until its first checkpoint is on Drive; then the runtime dies.
    rt1 = new_runtime(tmp_path, "runtime1")
    first = home / "senri" / "checkpoint-4"
    process = papermill(notebooks(rt1) / "02_training.ipynb", rt1, _env(standin, mydrive, rt1), *PARAMETERS,
                        overrides=OVERRIDES, background=True)
    deadline = time.time() + 300
    while not is_complete(first):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "runtime 1 wrote no checkpoint to Drive"
        time.sleep(0.02)
    _kill_runtime(process)
    assert (home / "senri" / "config.yaml").is_file(), "the run's identity is on Drive from its start"
    assert not (home / "senri" / "train_summary.json").exists(), "runtime 1 finished before it was killed"

    # Runtime 2: a new clone, nothing local; 02 resumes from Drive and finishes.
    rt2 = new_runtime(tmp_path, "runtime2")
    assert not (rt2 / "senri" / "runs").exists()
    env2 = _env(standin, mydrive, rt2)
    result = papermill(notebooks(rt2) / "02_training.ipynb", rt2, env2, *PARAMETERS, overrides=OVERRIDES)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"lives on Drive: {home.resolve()}" in _outputs(result.output)
    summary = json.loads((home / "senri" / "train_summary.json").read_text())
    assert summary["resumed_from"].startswith(f"runs/{RUN}/senri/checkpoint-"), summary["resumed_from"]
    assert summary["global_step"] == 20
    for name in ("senri", "swa_only"):  # final model, metrics, identity and summary all on Drive
        assert {"final", "metrics.jsonl", "config.yaml", "train_summary.json"} <= {p.name for p in (home / name).iterdir()}
    assert (home / "figures" / "loss_curves.png").stat().st_size > 0
    # The same losses, step by step, as one uninterrupted run of the same settings on this machine.
    straight = ConfigManager("cpu-smoke", {**OVERRIDES, "experiment.run_name": RUN,
                                           "experiment.run_dir": str(tmp_path / "straight"),
                                           "experiment.data_cache_dir": str(tmp_path / "straight-cache")})
    for name, run_cfg in model_runs(straight).items():
        assert run_cfg.resolve_drive_dir() is None
        train(run_cfg)
        expected, resumed = _losses(Path(run_cfg.experiment.run_dir) / "metrics.jsonl"), _losses(home / name / "metrics.jsonl")
        assert sorted(resumed) == sorted(expected) == list(range(1, 21)), name
        for step, loss in expected.items():
            assert resumed[step] == pytest.approx(loss, abs=1e-6), f"{name} step {step}"

    # The same run name with settings that shape another model or data is refused before anything runs.
    result = papermill(notebooks(rt2) / "02_training.ipynb", rt2, env2, *PARAMETERS,
                       overrides={**OVERRIDES, "training.seq_len": 32})
    assert result.returncode != 0
    assert "training.seq_len: 64 in the run, 32 now" in result.stderr and "start a new run under another name" in result.stderr

    # Runtime 3: another new clone; 03 then 04 read everything from Drive and train nothing of 02's again.
    rt3 = new_runtime(tmp_path, "runtime3")
    final = (home / "senri" / "final" / "model.safetensors").stat().st_mtime_ns
    env3 = _env(standin, mydrive, rt3)
    for notebook in ("03_evaluation", "04_analysis"):
        result = papermill(notebooks(rt3) / f"{notebook}.ipynb", rt3, env3, *PARAMETERS, overrides=OVERRIDES)
        assert result.returncode == 0, f"{notebook}: {result.stderr[-4000:]}"
    assert {"niah.json", "ppl_by_position.json", "memory_stats.json", "variants.json"} <= {p.name for p in (home / "eval").iterdir()}
    assert {"loss_curves.png", "gate_values.png", "niah_heatmap.png", "variant_accuracy.png"} <= {p.name for p in (home / "figures").iterdir()}
    assert (home / "senri" / "final" / "model.safetensors").stat().st_mtime_ns == final
    local3 = rt3 / "senri" / "runs" / RUN
    assert not (local3 / "senri").exists() and not (local3 / "swa_only").exists(), "02's models were trained again"


def test_setup_cell_twice_and_a_declined_drive_mount(tmp_path, colab):
    """The set-up cell, run twice from /content, ends in the clone each time; with Drive declined, the run is local
    and one warning line says so."""
    standin, mydrive = colab
    content = new_runtime(tmp_path, "runtime")
    source = nbformat.read(content / "senri" / "notebooks" / "04_analysis.ipynb", as_version=4)
    setup, parameters, open_run = source.cells[1:4]
    assert "parameters" in parameters.metadata.tags and "open_run(" in open_run.source
    probe = nbformat.v4.new_code_cell(
        "import json, senri\n"
        "print('PROBE', json.dumps({'cwd': os.getcwd(), 'repo': str(REPO), 'senri': senri.__file__, "
        "'home': str(cfg.home_dir().resolve()), 'drive': str(cfg.resolve_drive_dir())}))")
    nb = nbformat.v4.new_notebook(cells=[setup, setup, parameters, open_run, probe], metadata=source.metadata)
    path = content / "probe.ipynb"
    nbformat.write(nb, path)
    result = papermill(path, content, _env(standin, mydrive, content, drive="decline"), *PARAMETERS)
    assert result.returncode == 0, result.stderr[-4000:]
    text = _outputs(result.output)
    probe = json.loads(text.split("PROBE ", 1)[1].splitlines()[0])
    clone = content / "senri"
    assert probe["cwd"] == probe["repo"] == str(clone.resolve())
    assert probe["senri"] == str(clone.resolve() / "senri" / "__init__.py")
    assert probe["drive"] == "None" and probe["home"] == str(clone.resolve() / "runs" / RUN)
    warnings = [line for line in text.splitlines() if line.startswith("WARNING: Google Drive is not mounted")]
    assert len(warnings) == 1 and "MessageError" in warnings[0], text
    assert not any(mydrive.iterdir())


def test_a_misspelt_papermill_parameter_fails_naming_it(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "papermill", "-k", "python3", str(REPO / "notebooks" / "04_analysis.ipynb"),
         str(tmp_path / "out.ipynb"), "--cwd", str(REPO / "notebooks"), "-p", "profile", "cpu-smoke",
         "-p", "max_step", "30"],
        env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert ("unknown notebook parameter ['max_step']; this notebook's parameters are ['profile', 'run_name', "
            "'overrides']") in result.stderr
    assert "'max_step': the config key 'training.max_steps' is set with overrides=" in result.stderr
