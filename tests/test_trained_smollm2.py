"""The shipped trained memory for SmolLM2 (senri/trained/smollm2-window256): it loads, matches its card, and its
recorded short cases reproduce; the demo's core comparison runs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from senri import SenriForCausalLM, load_local_smollm2
from senri.demo import recall_table
from senri.evaluation.diagnostics import teacher_forced_passkey
from senri.evaluation.real_model import depths_beyond_window, gates_closed, passkey_cases
from senri.model.trained import SMOLLM2_WINDOW256, load_trained_memory, load_trained_smollm2, read_card

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shipped():
    return load_trained_smollm2()


def test_shipped_memory_matches_its_card(shipped):
    model, _ = shipped
    card = read_card()
    for name, value in card["settings"].items():
        assert getattr(model.config, name) == value, name
    assert model.config.memory_layers == list(range(4, 24)) and model.config.num_sink_tokens == 4
    params = dict(model.named_parameters())
    assert set(card["parameters"]) == {n for n in params if n.endswith(("memory_gate", "memory_query_map",
                                                                         "memory_key_map"))}
    assert any(float(g.max()) > 0 for g in model.memory_gate_values().values())  # trained: gates moved off 0


def test_shipped_memory_reproduces_its_recorded_cases_and_closed_gates_lose_the_key(shipped):
    """The card records, per case, what the trained model and its gates-closed twin found on pass keys 1-3
    windows back (4x the window); both are measured again here."""
    model, tokenizer = shipped
    check = read_card()["check"]
    cases = passkey_cases(tokenizer, check["length"], len(check["trained"]), seed=check["seed"],
                          depths=depths_beyond_window(check["length"], 256, 64))
    assert teacher_forced_passkey(model, cases) == check["trained"]
    with gates_closed(model):
        closed = teacher_forced_passkey(model, cases)
    assert closed == check["gates closed"] and not any(closed)


def test_shipped_lora_is_merged_into_the_layers_from_the_first_memory_layer_on(shipped):
    """Phase B's adapters (q/k/v/o of layers 4-29) are merged on load: those weights differ from the base, the
    layers below are the base's exactly, and nothing of peft remains in the model."""
    model, _ = shipped
    llama, _ = load_local_smollm2()
    card = read_card()
    assert card["lora"]["layers_to_transform"] == list(range(4, 30))
    for index in (0, 3, 4, 20, 29):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            ours = getattr(model.model.layers[index].self_attn, proj).weight
            theirs = getattr(llama.model.layers[index].self_attn, proj).weight
            assert torch.equal(ours, theirs) == (index < 4), (index, proj)
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_shipped_memory_survives_save_pretrained_bit_exact(shipped, tmp_path):
    model, _ = shipped
    model.save_pretrained(tmp_path)
    again = SenriForCausalLM.from_pretrained(tmp_path)
    own = dict(model.named_parameters())
    for name, p in again.named_parameters():
        if name.endswith(("memory_gate", "memory_query_map", "memory_key_map")):
            assert torch.equal(p, own[name]), name


def test_a_memory_that_does_not_fit_its_model_is_refused(tmp_path):
    llama, _ = load_local_smollm2()
    broken = tmp_path / "broken"
    shutil.copytree(SMOLLM2_WINDOW256, broken)
    card = json.loads((broken / "card.json").read_text())
    card["settings"]["layer_types"] = ["sliding_attention"] * 30  # no memory layers: the parameters fit nowhere
    (broken / "card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="does not match its model"):
        load_trained_memory(llama, broken)


def test_demo_core_compares_memory_gates_closed_and_base_on_a_short_case(shipped):
    model, tokenizer = shipped
    llama, _ = load_local_smollm2()
    rows = recall_table(model, llama, tokenizer, lengths=(1024,), cases=1)
    models = ["Senri, trained memory", "Senri, gates closed", "base, full attention"]
    assert [(r["task"], r["model"]) for r in rows] == [(t, m) for t in ("pass key", "fact in prose") for m in models]
    facts = [r for r in rows if r["task"] == "fact in prose"]
    assert all(r["key_tokens_back"] > 256 + 64 for r in facts) and not facts[1]["correct"]  # beyond the closed window
    by_model = {r["model"]: r for r in rows if r["task"] == "pass key"}
    assert all(r["key_tokens_back"] > 256 + 64 for r in rows)  # the key is beyond the window
    assert by_model["base, full attention"]["correct"]  # the ceiling finds it,
    assert not by_model["Senri, gates closed"]["correct"]  # the window alone cannot,
    assert by_model["Senri, trained memory"]["correct"]  # the trained memory does.


def test_the_demo_headline_reads_the_cards_measured_grid(tmp_path):
    """The headline figure and summary show what the card measured (20 pass keys per context, three models)."""
    from senri.demo import headline_figure, measured_passkey, summary_text

    card = read_card()
    table = measured_passkey(card)
    assert set(table) == {"trained", "gates closed", "base"}
    assert all(set(by_length) == {1024, 2048, 4096, 8192} for by_length in table.values())
    assert table["trained"][2048] == (20, 20) and table["gates closed"][2048] == (0, 20)
    growth = [{"model": m, "context": c, "cache_mib": 1.0, "ms_per_token": 1.0}
              for m in ("Senri", "Llama KV cache") for c in (256, 4096)]
    headline_figure(card, growth, 256).savefig(tmp_path / "headline.png")
    rows = [{"task": "pass key", "model": "Senri, trained memory", "context": 2048, "window": 256,
             "key_tokens_back": 1500, "key": "12345", "answer": "12345.", "correct": True}]
    text = summary_text(rows, growth, card, tmp_path, 1.0)
    assert "8×: 20/20" in text and "Senri, gates closed" in text
