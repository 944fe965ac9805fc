"""The retrieval probe (issue 10): held-out needles beyond the window, the memory read's weight on the needle, the
learned/failed verdict and take-off step of a run, and the per-step metrics a passkey training run logs."""

from __future__ import annotations

import json

import pytest
import torch

from senri.workspace import plots
from senri.evaluation.analysis import passkey_probe, retrieval_probe, seed_outcomes, takeoff_step
from senri.training.config import ConfigManager
from senri.tasks.niah import build_synthetic_tokenizer
from senri.training.recipes import build_model
from senri.training.recipes import train
from tests.conftest import tiny_model

WINDOW, CHUNK = 16, 4


@pytest.fixture(scope="module")
def tokenizer():
    return build_synthetic_tokenizer()


def test_probe_needles_lie_beyond_the_window_and_hold_the_answer(tokenizer):
    probe = passkey_probe(tokenizer, seq_len=96, num_samples=6, seed=0, window=WINDOW, chunk_size=CHUNK)
    ids, pos, answer, value = probe["input_ids"], probe["answer_pos"], probe["answer"], probe["value_pos"]
    assert ids.shape == (6, 96) and bool((pos == 95 - 1).all())  # the answer (one word) is the last token
    rows = torch.arange(6)
    assert torch.equal(ids[rows, pos + 1], answer) and torch.equal(ids[rows, value], answer)
    assert bool((pos - value > WINDOW + CHUNK).all())  # only the memory reaches it
    assert not torch.equal(probe["input_ids"], passkey_probe(tokenizer, 96, 6, 1, WINDOW, CHUNK)["input_ids"])


def test_a_memory_that_cannot_tell_keys_apart_reads_a_uniform_average(tokenizer):
    probe = passkey_probe(tokenizer, seq_len=96, num_samples=4, seed=0, window=WINDOW, chunk_size=CHUNK)
    model = tiny_model(vocab_size=len(tokenizer), layer_types=["memory", "sliding_attention"], num_hidden_layers=2)
    stats = retrieval_probe(model, probe)
    lifts = {k: v for k, v in stats.items() if k.startswith("probe/needle_lift/0/")}
    assert len(lifts) == 4 and any(abs(v - 1.0) > 1e-3 for v in lifts.values())  # random keys: not uniform
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.q_proj.weight.zero_()
        attn.k_proj.weight.zero_()  # φ(q)·φ(k) is the same for every token: weight 1/N on the needle
    stats = retrieval_probe(model, probe)
    assert all(stats[k] == pytest.approx(1.0, abs=1e-4) for k in lifts)
    assert 0.0 <= stats["probe/acc"] <= 1.0 and stats["probe/answer_loss"] > 0
    assert {f"probe/memory_acc/0/{h}" for h in range(4)} <= set(stats)


def test_a_memory_keyed_on_the_needle_returns_it(tokenizer):
    """Keys that single out the answer words (and queries that look for them) make the read the needle's value."""
    probe = passkey_probe(tokenizer, seq_len=96, num_samples=8, seed=0, window=WINDOW, chunk_size=CHUNK)
    model = tiny_model(vocab_size=len(tokenizer), layer_types=["memory", "sliding_attention"], num_hidden_layers=2,
                       memory_update="linear")
    candidates = torch.unique(probe["answer"])
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = -20.0  # feature 0 carries "is an answer word": large for them, very negative for the rest
        emb[candidates, 0] = 20.0
        attn.q_proj.weight.zero_()
        attn.q_proj.bias is None or attn.q_proj.bias.zero_()
        attn.k_proj.weight.zero_()
        attn.k_proj.weight[:, 0] = 1.0  # every key coordinate follows feature 0: φ(k) ≈ 0 for the haystack
    stats = retrieval_probe(model, probe, candidates)
    assert min(v for k, v in stats.items() if k.startswith("probe/needle_lift/0/")) > 10
    assert max(v for k, v in stats.items() if k.startswith("probe/memory_acc/0/")) == 1.0


def test_takeoff_and_outcome():
    records = [{"step": 25, "probe/acc": 0.0}, {"step": 50, "probe/acc": 0.4}, {"step": 75, "probe/acc": 0.9}]
    assert takeoff_step(records) == 75 and takeoff_step(records, level=0.3) == 50 and takeoff_step(records[:2]) is None
    by_seed = {"senri": {"1": {"64": 0.1, "512": 0.95, "4096": 0.85}, "2": {"64": 1.0, "512": 1.0, "4096": 0.5}}}
    assert seed_outcomes(by_seed, window=64) == {"senri": {1: True, 2: False}}  # 1x does not count, 64x does
    fig = plots.training_dynamics({"a": records, "b": records}, {"a": True, "b": False})
    assert len(fig.axes) == len(plots.DYNAMICS_PANELS)
    assert plots.seed_table({"senri": by_seed["senri"]}, window=64).axes


def test_a_passkey_run_logs_retrieval_gates_per_head_and_memory_norms(tmp_path):
    torch.set_num_threads(1)
    cfg = ConfigManager("cpu-proof", overrides={
        "run_dir": str(tmp_path), "max_steps": 2, "logging_steps": 1, "per_device_batch_size": 2,
        "num_train_samples": 8, "train_twin": False,
    })
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    keys = set(records[-1])
    assert {"probe/acc", "probe/answer_loss", "memory_norm/0", "gate/0/head3"} <= keys
    assert {f"probe/needle_lift/0/{h}" for h in range(4)} <= keys
    model, _ = build_model(cfg)
    assert len(model.memory_gate_values()[0]) == 4


def test_proof_seeds_trains_senri_and_its_twin_per_seed_and_the_study_draws_them(tmp_path):
    from senri.workspace.experiments import proof_seeds, seed_study

    torch.set_num_threads(1)
    cfg = ConfigManager("cpu-proof", overrides={
        "run_dir": str(tmp_path), "max_steps": 2, "logging_steps": 1, "per_device_batch_size": 2,
        "num_train_samples": 8, "experiment.niah_lengths": [64, 512], "experiment.niah_depths": [0.5],
        "experiment.niah_samples": 1, "experiment.ppl_seq_len": 128,
    })
    result = proof_seeds(cfg, [3, 4])
    assert set(result["by_seed"]) == {"senri", "swa_only"} and set(result["by_seed"]["senri"]) == {3, 4}
    assert result["summary"]["swa_only"]["runs"][3]["gates"] == {}  # the twin has no memory
    assert result["summary"]["senri"]["runs"][3]["gates"]["layer_0"]
    assert (tmp_path / "variants" / "swa_only" / "seed-4" / "final").is_dir()
    study = seed_study(cfg)
    assert set(study["outcomes"]["senri"]) == {3, 4}
    assert study["takeoff"]["swa_only"] == {3: None, 4: None}  # 2 steps: nothing retrieved yet
    assert {"seed_table", "dynamics_senri", "dynamics_swa_only"} <= set(study["figures"])
    assert all(p.stat().st_size > 1000 for p in study["figures"].values())
