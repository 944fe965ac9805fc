"""Phase A (layer-local attention transfer) and shipped trained memories, on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from senri.evaluation.real_model import gates_closed
from senri.model.trained import load_trained_memory, save_trained_memory
from senri.training.transfer import (
    TransferSettings, build_student, run_transfer, teacher_targets, transfer_parameters,
)

WINDOW, CHUNK, SINKS = 16, 4, 2


def _base(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval()


def _student(base):
    return build_student(base, [1, 2], sliding_window=WINDOW, chunk_size=CHUNK, num_sink_tokens=SINKS)


CORPUS = torch.randint(0, 64, (4000,), generator=torch.Generator().manual_seed(1)).tolist()


def _settings(**overrides) -> TransferSettings:
    fields = dict(steps=6, seq_len=96, learning_rate=3e-2, gate_learning_rate=3e-2, passkey_share=0.0, save_steps=2,
                  log_steps=1)
    return TransferSettings(**{**fields, **overrides})


def test_teacher_targets_are_the_full_attention_output_and_far_mass_is_what_the_window_misses():
    base = _base()
    ids = torch.tensor([CORPUS[:80]])
    targets = teacher_targets(base, ids, [1, 2], WINDOW, CHUNK, SINKS)
    hidden, output, mass, far_output = targets[2]
    assert output.shape == (1, 80, 4, 8) and mass.shape == (1, 80, 4)
    # Queries whose window still covers every non-sink key have nothing far away.
    assert mass[0, : WINDOW + CHUNK].abs().max() == 0
    assert (mass[0, 2 * WINDOW :] > 0).all() and (mass <= 1 + 1e-6).all()
    # The captured output is the layer's full causal attention on the captured input (before o_proj).
    attention = base.model.layers[2].self_attn
    cos, sin = base.model.rotary_emb(hidden, torch.arange(80)[None])
    with torch.no_grad():
        expected, _ = attention(hidden, position_embeddings=(cos, sin), attention_mask=None)
    torch.testing.assert_close(attention.o_proj(output.flatten(2)), expected, rtol=1e-5, atol=1e-6)
    # The far-only output is the attention renormalised over the keys before the window (sinks excluded).
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    t, head = 70, 3
    q = attention.q_proj(hidden).view(1, 80, 4, 8).transpose(1, 2)
    k = attention.k_proj(hidden).view(1, 80, 2, 8).transpose(1, 2)
    v = attention.v_proj(hidden).view(1, 80, 2, 8).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    far_keys = range(SINKS, (t // CHUNK - WINDOW // CHUNK) * CHUNK)
    scores = torch.stack([q[0, head, t] @ k[0, head // 2, s] for s in far_keys]) * 8**-0.5
    naive = (scores.softmax(0)[:, None] * v[0, head // 2, list(far_keys)]).sum(0)
    torch.testing.assert_close(far_output[0, t, head], naive.detach(), rtol=1e-4, atol=1e-5)


def test_closed_gates_give_the_window_only_output_and_transfer_trains_only_memory_parameters(tmp_path):
    base = _base()
    student = _student(base)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    run_transfer(base, student, None, CORPUS, _settings(), tmp_path)
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(transfer_parameters(student))
    assert any(n.endswith("memory_gate") for n in changed) and any(n.endswith("memory_key_map") for n in changed)
    # Gates moved off zero (they receive a gradient at exactly 0).
    assert all(float(g.max()) > 0 for g in student.memory_gate_values().values())
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 7))


def test_transfer_loss_goes_down():
    base = _base()
    student = _student(base)
    settings = _settings(steps=40, save_steps=40, log_steps=1)
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        run_transfer(base, student, None, CORPUS[:200] * 20, settings, directory)  # one repeated text
        losses = [json.loads(line)["loss"] for line in open(f"{directory}/metrics.jsonl")]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_transfer_resumes_exactly_after_an_interruption(tmp_path):
    base = _base()
    whole = _student(base)
    run_transfer(base, whole, None, CORPUS, _settings(steps=6), tmp_path / "whole")
    # A run stopped after 4 steps and restarted to 6 ends exactly where the uninterrupted run ended.
    part = _student(base)
    run_transfer(base, part, None, CORPUS, _settings(steps=4), tmp_path / "part")
    resumed = _student(base)
    run_transfer(base, resumed, None, CORPUS, _settings(steps=6), tmp_path / "part")  # a longer run continues
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_trained_memory_round_trips_bit_exact_and_refuses_another_base(tmp_path):
    base = _base()
    student = _student(base)
    with torch.no_grad():
        for p in transfer_parameters(student).values():
            p.add_(0.01 * torch.randn_like(p))
    save_trained_memory(student, base, tmp_path, "tiny-random", {"recipe": "test"})
    loaded = load_trained_memory(base, tmp_path)
    for name, p in transfer_parameters(student).items():
        assert torch.equal(dict(loaded.named_parameters())[name], p), name
    ids = torch.tensor([CORPUS[:100]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, student.eval()(input_ids=ids).logits, rtol=0, atol=0)
        with gates_closed(loaded):  # gates closed: exactly the converted base model
            closed = loaded(input_ids=ids).logits
        plain = build_student(base, [1, 2], sliding_window=WINDOW, chunk_size=CHUNK, num_sink_tokens=SINKS)
        torch.testing.assert_close(closed, plain(input_ids=ids).logits, rtol=0, atol=0)
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["settings"]["num_sink_tokens"] == SINKS and card["recipe"] == "test"
    with pytest.raises(ValueError, match="another base checkpoint"):
        load_trained_memory(_base(seed=1), tmp_path)


@pytest.mark.slow
def test_the_cpu_real_profile_trains_through_senri_training_like_any_run(tmp_path):
    """`training.recipe: transfer` goes through senri.training.recipes.train (02_training): a Trainer-shaped summary,
    gate values in metrics.jsonl, the whole model in final/, the trained memory in trained_memory/, all on Drive."""
    from senri.training.config import ConfigManager
    from senri.model.trained import read_card
    from senri.training.loop import is_complete
    from senri.training.recipes import train

    cfg = ConfigManager("cpu-real", {"training.max_steps": 2, "training.seq_len": 384, "training.save_steps": 1,
                                     "training.logging_steps": 1, "experiment.run_dir": str(tmp_path / "run"),
                                     "experiment.drive_dir": str(tmp_path / "drive")})
    summary = train(cfg)
    assert summary["global_step"] == 2 and summary["final_loss"] > 0
    assert set(summary["gates"]) == {str(i) for i in range(4, 24)}
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and "gate/20/mean" in records[-1]
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert read_card(tmp_path / "run" / "trained_memory")["recipe"]["steps"] == 2
    # The checkpoints are mirrored to the (stand-in) Drive at every save, and the results are published there.
    drive = tmp_path / "drive"
    assert is_complete(drive / "checkpoint-2")
    assert (drive / "train_summary.json").is_file() and (drive / "final" / "config.json").is_file()
