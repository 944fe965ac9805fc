"""Training: gates learn at their own rate and move, metrics are logged per step, a run SIGKILLed after a checkpoint
resumes to the same losses, the Drive mirror never exposes a partial checkpoint, two-process CPU DDP trains."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from senri.training.config import ConfigManager, model_runs
from senri.training.loop import (
    COMPLETE_MARKER, GATE_GROUP, find_resume_checkpoint, is_complete, make_optimizer_param_groups, mark_complete,
    mirror_checkpoint, prune_checkpoints,
)
from senri.training.recipes import build_model, train

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent
ENTRY = REPO / "tests" / "training_run.py"
# Tiny and fast: 16 samples of 64 tokens (window 32 + chunks of 8, so memory is written), 8 steps per epoch.
SMALL = {"seq_len": 64, "per_device_batch_size": 2, "num_train_samples": 16}


def _overrides(run_dir: Path, **extra) -> dict:
    return {"run_dir": str(run_dir), "data_cache_dir": str(run_dir.parent / "cache"), **SMALL, **extra}


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> dict[int, float]:
    records = _records(run_dir)
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_gates_get_their_own_learning_rate_and_no_weight_decay():
    model, _ = build_model(ConfigManager("cpu-smoke"))
    groups = make_optimizer_param_groups(model, lr=1e-3, weight_decay=0.1, gate_lr_multiplier=50)
    gate = model.model.layers[0].self_attn.memory_gate
    (gate_group,) = [g for g in groups if any(p is gate for p in g["params"])]
    assert gate_group["name"] == GATE_GROUP and gate_group["lr"] == pytest.approx(5e-2)
    assert gate_group["weight_decay"] == 0.0
    norm = model.model.layers[0].input_layernorm.weight
    assert [g["weight_decay"] for g in groups if any(p is norm for p in g["params"])] == [0.0]
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    assert [(g["lr"], g["weight_decay"]) for g in groups if any(p is q_proj for p in g["params"])] == [(1e-3, 0.1)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_trainable_memory_freezes_everything_but_the_memory_path():
    model, _ = build_model(ConfigManager("cpu-smoke", overrides={"trainable": "memory"}))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"model.layers.0.self_attn.memory_gate", "model.layers.0.self_attn.q_proj.weight"} <= trainable
    assert not any(n.startswith(("model.layers.1.", "model.embed_tokens", "lm_head", "model.norm")) for n in trainable)
    groups = make_optimizer_param_groups(model, lr=1e-3, weight_decay=0.1, gate_lr_multiplier=10)
    assert sum(len(g["params"]) for g in groups) == len(trainable)


def test_training_logs_metrics_moves_the_gates_and_resumes_from_drive(tmp_path):
    run_dir, drive = tmp_path / "run", tmp_path / "drive"
    settings = dict(save_steps=4, save_total_limit=1, logging_steps=3, drive_dir=str(drive), memory_gate_init=0.0)
    summary = train(ConfigManager("cpu-smoke", overrides=_overrides(run_dir, max_steps=8, **settings)))
    records = _records(run_dir)
    assert [r["step"] for r in records] == [3, 6, 8]  # every logging step, and the last one
    assert all({"loss", "learning_rate", "gate_learning_rate", "gate/0/mean", "gate/0/min", "gate/0/max",
                "memory_norm/0"} <= set(r) for r in records)
    assert records[0]["gate_learning_rate"] == pytest.approx(records[0]["learning_rate"] * 10)
    assert records[-1]["memory_norm/0"] > 0  # the probe (64 tokens) is longer than the window: memory is written
    assert max(abs(v) for v in summary["gates"]["0"]) > 1e-3, "gates started at 0 and must move"
    assert summary["global_step"] == 8 and summary["losses"][-1] == [8, records[-1]["loss"]]
    assert json.loads((run_dir / "train_summary.json").read_text())["global_step"] == 8
    assert (run_dir / "config.yaml").exists() and (run_dir / "final" / "config.json").exists()
    # Local and Drive keep the last save_total_limit (1) checkpoints, each complete.
    assert [p.name for p in run_dir.glob("checkpoint-*")] == ["checkpoint-8"]
    assert sorted(p.name for p in drive.glob("checkpoint-*")) == ["checkpoint-8"] and is_complete(drive / "checkpoint-8")
    assert {"final", "metrics.jsonl", "config.yaml", "train_summary.json"} <= {p.name for p in drive.iterdir()}
    # A fresh machine (local run directory lost) resumes from the Drive copy, metrics history included.
    shutil.rmtree(run_dir)
    summary = train(ConfigManager("cpu-smoke", overrides=_overrides(run_dir, max_steps=11, **settings)))
    assert summary["resumed_from"] == str(run_dir / "checkpoint-8") and summary["global_step"] == 11
    assert [r["step"] for r in _records(run_dir)] == [3, 6, 8, 9, 11]
    assert sorted(p.name for p in drive.glob("checkpoint-*")) == ["checkpoint-11"]
    assert json.loads((drive / "train_summary.json").read_text())["global_step"] == 11


def _fake_checkpoint(directory: Path, step: int, complete: bool = True) -> Path:
    checkpoint = directory / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (checkpoint / "model.safetensors").write_bytes(bytes(1000))
    if complete:
        mark_complete(checkpoint)
    return checkpoint


def test_drive_mirror_exposes_only_complete_checkpoints(tmp_path):
    local, drive = tmp_path / "run", tmp_path / "drive"
    for step in (10, 20, 30):
        mirror_checkpoint(_fake_checkpoint(local, step), drive, keep=2)
    assert sorted(p.name for p in drive.iterdir()) == ["checkpoint-20", "checkpoint-30"]
    assert all(is_complete(p) for p in drive.iterdir())
    # Interrupted copies: a temporary name, a checkpoint without its manifest, and one whose file was cut short.
    (drive / ".checkpoint-40.tmp-123").mkdir()
    _fake_checkpoint(drive, 50, complete=False)
    shutil.copytree(drive / "checkpoint-30", drive / "checkpoint-60")
    (drive / "checkpoint-60" / "model.safetensors").write_bytes(bytes(10))
    shutil.rmtree(local)
    resumed = find_resume_checkpoint(local, drive)
    assert resumed == local / "checkpoint-30" and is_complete(resumed)  # copied back from Drive
    assert not list(local.glob(".*")), "no temporary copy is left behind"
    mirror_checkpoint(_fake_checkpoint(local, 70), drive, keep=2)
    assert sorted(p.name for p in drive.iterdir()) == ["checkpoint-30", "checkpoint-70"]  # leftovers cleaned


def test_a_save_cut_short_is_not_resumed_from(tmp_path):
    _fake_checkpoint(tmp_path, 10)
    (_fake_checkpoint(tmp_path, 20) / "model.safetensors").unlink()  # a deletion cut short: manifest still there
    _fake_checkpoint(tmp_path, 30, complete=False)
    assert find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    # Incomplete checkpoints newer than the one resumed from are removed (Trainer would write into them).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10"]


def test_pruning_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (10, 20, 30):
        _fake_checkpoint(tmp_path, step)
    (_fake_checkpoint(tmp_path, 25) / "model.safetensors").unlink()
    (tmp_path / ".checkpoint-40.deleting-123").mkdir()
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-20", "checkpoint-30"]


@pytest.fixture(scope="module")
def tiny_base(smollm2, tmp_path_factory) -> Path:
    """A 4-layer random Llama with SmolLM2's tokenizer, saved as a base checkpoint for the real-model recipes."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm2[1]), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    directory = tmp_path_factory.mktemp("tiny-base")
    LlamaForCausalLM(config).save_pretrained(directory)
    smollm2[1].save_pretrained(directory)
    return directory


def _recipe_overrides(recipe: str, base: Path) -> tuple[str, dict]:
    """(profile, overrides): each recipe on a tiny model; phase A and B start from ``base``."""
    if recipe == "lm":
        return "cpu-smoke", SMALL
    model = {"base_model": str(base), "sliding_window": 32, "chunk_size": 8, "num_sink_tokens": 2, "logging_steps": 1,
             "layer_types": ["sliding_attention", "memory", "memory", "sliding_attention"]}
    if recipe == "transfer":
        return "cpu-real", {**model, "seq_len": 96, "per_device_batch_size": 1, "transfer_passkey_share": 0.5}
    return "real-finetune", {**model, "finetune_init": None, "per_device_batch_size": 2, "finetune_eval_steps": 5,
                             "finetune_curriculum": [[0.0, 96], [0.5, 128]]}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["lm", "transfer", "finetune"])
def test_run_killed_after_a_checkpoint_resumes_to_the_same_losses(recipe, tiny_base, tmp_path):
    # 20 steps (the language model's over 2.5 epochs); checkpoint-10 (in the LM's second epoch); the run is killed at
    # step 13, so its log lines 11-12 must be dropped on resume. The uninterrupted run trains in this process
    # meanwhile. Every recipe goes through the one loop.
    profile, settings = _recipe_overrides(recipe, tiny_base)
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    overrides = lambda run_dir: {**_overrides(run_dir, max_steps=20, save_steps=10), **settings}  # noqa: E731
    command = [sys.executable, str(ENTRY), json.dumps(overrides(killed_dir)), profile]
    killed = subprocess.Popen(command, cwd=REPO, env={**_env(), "SENRI_TEST_PAUSE_AT_STEP": "13"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    train(ConfigManager(profile, overrides=overrides(straight_dir)))
    deadline = time.time() + 240
    while not (killed_dir / "paused-13").exists():
        assert killed.poll() is None, killed.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the run did not reach step 13"
        time.sleep(0.05)
    assert is_complete(killed_dir / "checkpoint-10") and [r["step"] for r in _records(killed_dir)][-1] == 12
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (killed_dir / "train_summary.json").exists()
    rerun = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr.decode()[-3000:]
    summary = json.loads((killed_dir / "train_summary.json").read_text())
    assert summary["resumed_from"] == str(killed_dir / "checkpoint-10")
    straight_losses, resumed_losses = _losses(straight_dir), _losses(killed_dir)
    assert sorted(resumed_losses) == sorted(straight_losses) == list(range(1, 21))
    for step, loss in straight_losses.items():
        assert resumed_losses[step] == pytest.approx(loss, abs=1e-6), f"step {step}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_cpu_ddp_trains(tmp_path):
    run_dir = tmp_path / "ddp"
    (tmp_path / "cache").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(ENTRY), json.dumps(_overrides(run_dir, max_steps=4, save_steps=2))],
        cwd=REPO, env=_env(), capture_output=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["global_step"] == 4 and [step for step, _ in summary["losses"]] == [1, 2, 3, 4]
    assert sorted(_losses(run_dir)) == [1, 2, 3, 4]  # logged once, by the main process
    state = json.loads((run_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["train_batch_size"] == 2
    manifest = json.loads((run_dir / "checkpoint-4" / COMPLETE_MARKER).read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "model.safetensors"} <= set(manifest)
    assert is_complete(run_dir / "checkpoint-4")


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
    drive = tmp_path / "drive"
    runs = model_runs(ConfigManager("cpu-smoke", overrides={"run_dir": str(tmp_path), "drive_dir": str(drive)}))
    assert {name: c.resolve_drive_dir() for name, c in runs.items()} == {n: drive / n for n in ("senri", "swa_only")}


def test_a_finished_run_is_not_trained_further_when_run_again(tmp_path):
    """Re-running a finished run (a notebook executed twice) returns it as it is; a run cut off after its last
    checkpoint but before its final save is finished from that checkpoint, without another step."""
    run_dir = tmp_path / "run"
    cfg = ConfigManager("cpu-smoke", overrides=_overrides(run_dir, max_steps=4, save_steps=2))
    first = train(cfg)
    again = train(cfg)
    assert again == json.loads(json.dumps(first)) and again["global_step"] == 4
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    final_weights = (run_dir / "final" / "model.safetensors").read_bytes()
    shutil.rmtree(run_dir / "final")
    (run_dir / "train_summary.json").unlink()
    finished = train(cfg)
    assert finished["global_step"] == 4 and finished["resumed_from"] == str(run_dir / "checkpoint-4")
    assert not (run_dir / "checkpoint-5").exists() and max(_losses(run_dir)) == 4
    assert (run_dir / "final" / "model.safetensors").read_bytes() == final_weights


def test_a_failed_drive_copy_warns_and_the_next_save_copies_again(tmp_path, capfd):
    """Drive unreachable at the first save (its folder cannot be made): training goes on, warned once per failed
    copy; once Drive is back, the next save copies its checkpoint and the end of training the results."""
    run_dir, blocked = tmp_path / "run", tmp_path / "drive"
    blocked.write_text("not a folder")  # every copy into drive/... fails with an OSError, like a dropped mount

    class DriveComesBack(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):  # runs after CheckpointCallback's copy attempt
            if state.global_step == 2:
                blocked.unlink()
            return control

    cfg = ConfigManager("cpu-smoke", overrides=_overrides(run_dir, max_steps=4, save_steps=2, save_total_limit=1,
                                                         drive_dir=str(blocked / "run")))
    summary = train(cfg, callbacks=[DriveComesBack()])
    err = capfd.readouterr().err
    assert summary["global_step"] == 4
    assert err.count("WARNING: checkpoint-2 was not copied to") == 1 and "training goes on" in err
    assert "WARNING: checkpoint-4" not in err
    drive = blocked / "run"
    assert sorted(p.name for p in drive.glob("checkpoint-*")) == ["checkpoint-4"] and is_complete(drive / "checkpoint-4")
    assert {"final", "metrics.jsonl", "config.yaml", "train_summary.json"} <= {p.name for p in drive.iterdir()}
    assert not list(drive.glob(".*")), "no temporary copy is left behind"


def test_a_run_finished_on_another_runtime_is_read_from_drive(tmp_path):
    run_dir, drive = tmp_path / "run", tmp_path / "drive"
    cfg = ConfigManager("cpu-smoke", overrides=_overrides(run_dir, max_steps=2, save_steps=2, drive_dir=str(drive)))
    first = train(cfg)
    shutil.rmtree(run_dir)  # a new runtime: nothing on its disk
    again = train(cfg)
    assert again == json.loads((drive / "train_summary.json").read_text()) == json.loads(json.dumps(first))
    assert not run_dir.exists(), "nothing was trained or copied back"


def test_a_run_continued_with_other_settings_is_refused_naming_them(tmp_path):
    run_dir = tmp_path / "run"
    train(ConfigManager("cpu-smoke", overrides=_overrides(run_dir, max_steps=2, save_steps=2)))
    other = ConfigManager("cpu-smoke", overrides=_overrides(run_dir, max_steps=2, save_steps=2, seq_len=48,
                                                            learning_rate=1e-3))
    with pytest.raises(ValueError, match="training.learning_rate: 0.003 in the run, 0.001 now; training.seq_len: 64 "
                                         "in the run, 48 now.*another name"):
        train(other)
    longer = train(ConfigManager("cpu-smoke", overrides=_overrides(run_dir, max_steps=3, save_steps=2, logging_steps=2)))
    assert longer["global_step"] == 3 and longer["resumed_from"] == str(run_dir / "checkpoint-2")
