"""Evaluators measure what they claim: NIAH finds visible needles only, PPL is exp(mean NLL), cases are independent."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from senri import convert_llama_to_senri
from senri.evaluation import (
    baseline_perplexity, load_records, niah_accuracy_table, perplexity, position_ppl, reversal_curse, run_niah,
    save_records, token_nlls,
)
from senri.niah import build_synthetic_tokenizer
from tests.conftest import tiny_model


def test_perplexity_is_exp_of_mean_nll_computed_independently():
    model = tiny_model()
    ids = torch.randint(0, 97, (1, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    expected = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    torch.testing.assert_close(token_nlls(model, ids, chunk_tokens=7), expected, rtol=1e-4, atol=1e-4)
    assert math.isclose(perplexity(model, ids, 16), math.exp(expected.mean().item()), rel_tol=1e-4)
    buckets = position_ppl(model, ids, bucket_size=50, chunk_tokens=16)
    assert buckets["positions"] == [0, 50, 100] and buckets["tokens"] == [49, 50, 50]
    assert math.isclose(buckets["ppl"][1], math.exp(expected[49:99].mean().item()), rel_tol=1e-4)


def test_niah_cases_are_independent_memory_is_reset_between_cases():
    tokenizer = build_synthetic_tokenizer()
    model = tiny_model(vocab_size=len(tokenizer))
    kwargs = dict(lengths=[96, 128], depths=[0.2], num_samples=2, seed=1, templates=["niah_words"])
    forward = run_niah(model, tokenizer, **kwargs)
    single = run_niah(model, tokenizer, **{**kwargs, "lengths": [128]})
    # The 128-token cases give the same predictions whether or not the 96-token cases ran before them.
    assert [r["prediction"] for r in forward if r["length"] == 128] == [r["prediction"] for r in single]
    assert {"model", "length", "depth", "window", "accuracy", "answer", "prediction"} <= set(forward[0])
    table = niah_accuracy_table(forward)
    assert len(table) == 2 and all(row["cases"] == 2 for row in table)


def test_reversal_curse_and_records_roundtrip(tmp_path, smollm2):
    llama, tokenizer = smollm2
    result = reversal_curse(llama, tokenizer, pairs=[("Velmora Quint", "the inventor of", "the tidal clock")])
    assert result["forward_ppl"] > 1 and result["backward_ppl"] > 1
    assert math.isclose(result["gap"], result["backward_ppl"] / result["forward_ppl"])
    path = save_records(tmp_path / "eval" / "reversal.json", result)
    assert load_records(path) == result


@pytest.mark.slow
def test_full_attention_smollm2_finds_the_passkey_at_2k(smollm2):
    llama, tokenizer = smollm2
    records = run_niah(llama, tokenizer, [2048], [0.1, 0.5, 0.9], 1, templates=["passkey"])
    assert sum(r["accuracy"] for r in records) / len(records) >= 0.9


@pytest.mark.slow
def test_converted_512_window_with_closed_memory_loses_early_needles(smollm2):
    llama, tokenizer = smollm2
    senri = convert_llama_to_senri(llama, sliding_window=512)
    records = run_niah(senri, tokenizer, [2048], [0.05, 0.25], 1, templates=["passkey"])
    assert all(r["accuracy"] == 0.0 for r in records) and records[0]["window"] == 512


@pytest.mark.slow
def test_baseline_perplexity_equal_within_the_window(smollm2):
    llama, tokenizer = smollm2
    senri = convert_llama_to_senri(llama, sliding_window=512)
    ids = tokenizer("The old lighthouse keeper wrote in his log every night. " * 20, return_tensors="pt").input_ids[:, :200]
    result = baseline_perplexity(llama, senri, ids)
    assert math.isclose(result["base"], result["senri"], rel_tol=1e-3)
