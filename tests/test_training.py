"""Training: gates learn at their own rate, metrics are logged, a killed run resumes to the same losses,
the Drive mirror never exposes a partial checkpoint, two-process CPU DDP trains."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from senri.config import ConfigManager
from senri.training import (
    COMPLETE_MARKER, build_model, find_resume_checkpoint, mirror_checkpoint, model_runs, optimizer_param_groups, train,
)

REPO = Path(__file__).resolve().parent.parent


def _overrides(run_dir: Path, **extra) -> dict:
    return {"run_dir": str(run_dir), "data_cache_dir": str(run_dir.parent / "cache"), **extra}


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {json.loads(line)["step"]: json.loads(line)["loss"] for line in lines}


def test_gates_get_their_own_learning_rate_and_no_weight_decay():
    model, _ = build_model(ConfigManager("cpu-smoke"))
    groups = optimizer_param_groups(model, lr=1e-3, weight_decay=0.1, gate_lr_multiplier=50)
    gate_group = [g for g in groups if any(p is model.model.layers[0].self_attn.memory_gate for p in g["params"])]
    assert len(gate_group) == 1 and gate_group[0]["lr"] == 5e-2 and gate_group[0]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_trainable_memory_freezes_everything_but_the_memory_path():
    cfg = ConfigManager("cpu-smoke", overrides={"trainable": "memory"})
    model, _ = build_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.layers.0.self_attn.memory_gate" in trainable and "model.layers.0.self_attn.q_proj.weight" in trainable
    assert not any(n.startswith(("model.layers.1.", "model.embed_tokens", "lm_head")) for n in trainable)


def test_training_logs_metrics_and_moves_the_gates(tmp_path):
    summary = train(ConfigManager("cpu-smoke", overrides=_overrides(tmp_path / "run", max_steps=8, save_steps=4)))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all("loss" in r and "gate/0/mean" in r and "memory_norm/0" in r for r in records)
    assert any(abs(v - 0.5) > 1e-3 for v in summary["gates"]["0"])  # gates started at 0.5 and moved
    assert (tmp_path / "run" / "checkpoint-8" / COMPLETE_MARKER).exists()
    assert (tmp_path / "run" / "final" / "config.json").exists()


def _train_command(run_dir: Path, max_steps: int) -> list[str]:
    code = (
        "from senri.config import ConfigManager; from senri.training import train; "
        f"train(ConfigManager('cpu-smoke', overrides={_overrides(run_dir, max_steps=max_steps, save_steps=10)!r}))"
    )
    return [sys.executable, "-c", code]


@pytest.mark.slow
def test_run_killed_after_a_checkpoint_resumes_to_the_same_losses(tmp_path):
    steps = 40
    subprocess.run(_train_command(tmp_path / "straight", steps), check=True, cwd=REPO, capture_output=True)
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(_train_command(run_dir, steps), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / "checkpoint-10" / COMPLETE_MARKER).exists():
        assert process.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / "train_summary.json").exists()
    subprocess.run(_train_command(run_dir, steps), check=True, cwd=REPO, capture_output=True)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["resumed_from"] is not None
    straight, resumed = _losses(tmp_path / "straight"), _losses(run_dir)
    assert sorted(resumed) == sorted(straight) == list(range(1, steps + 1))
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), f"step {step}"


def test_drive_mirror_exposes_only_complete_checkpoints(tmp_path):
    local, drive = tmp_path / "run", tmp_path / "drive"
    for step in (10, 20, 30):
        checkpoint = local / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text("{}")
        (checkpoint / COMPLETE_MARKER).write_text(str(step))
        mirror_checkpoint(checkpoint, drive, keep=2)
    assert sorted(p.name for p in drive.iterdir()) == ["checkpoint-20", "checkpoint-30"]
    # An interrupted copy (temporary name) and a checkpoint without its marker are never resumed from.
    (drive / ".checkpoint-40.tmp-123").mkdir()
    (drive / "checkpoint-50").mkdir()
    (drive / "checkpoint-50" / "trainer_state.json").write_text("{}")
    for step in (10, 20, 30):
        import shutil

        shutil.rmtree(local / f"checkpoint-{step}")
    resumed = find_resume_checkpoint(local, drive)
    assert resumed == local / "checkpoint-30" and (resumed / COMPLETE_MARKER).exists()
    checkpoint = local / "checkpoint-60"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / COMPLETE_MARKER).write_text("60")
    mirror_checkpoint(checkpoint, drive, keep=2)
    assert not (drive / ".checkpoint-40.tmp-123").exists()  # leftovers cleaned on the next save


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_cpu_ddp_trains(tmp_path):
    run_dir = tmp_path / "ddp"
    code = (
        "from senri.config import ConfigManager; from senri.training import train; "
        f"train(ConfigManager('cpu-smoke', overrides={_overrides(run_dir, max_steps=6, save_steps=3)!r}))"
    )
    script = tmp_path / "ddp_train.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(_free_port()), str(script)], check=True, cwd=REPO, env=env, capture_output=True, timeout=300)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["global_step"] == 6
    assert (run_dir / "checkpoint-6" / COMPLETE_MARKER).exists()
    assert len(_losses(run_dir)) == 6
    state = json.loads((run_dir / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6


def test_model_runs_add_a_sliding_window_twin_of_the_same_size(tmp_path):
    cfg = ConfigManager("cpu-proof", overrides={"run_dir": str(tmp_path), "max_steps": 3})
    runs = model_runs(cfg)
    assert sorted(runs) == ["senri", "swa_only"]
    assert runs["swa_only"].model.layer_types == ["sliding_attention", "sliding_attention"]
    assert runs["senri"].training.max_steps == runs["swa_only"].training.max_steps == 3
    assert runs["swa_only"].experiment.run_dir == str(tmp_path / "swa_only")
    senri_model, _ = build_model(runs["senri"])
    twin_model, _ = build_model(runs["swa_only"])
    senri_size = sum(p.numel() for p in senri_model.parameters())
    twin_size = sum(p.numel() for p in twin_model.parameters())
    assert senri_size - twin_size == 4  # the four per-head gates
    assert list(model_runs(ConfigManager("t4"))) == ["senri"]
