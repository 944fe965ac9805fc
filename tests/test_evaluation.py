"""Evaluators measure what they claim: NIAH finds visible needles only, PPL is exp(mean NLL), cases are independent."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

import senri.evaluation.harness as evaluation
from senri import convert_llama_to_senri
from senri.evaluation.harness import (
    REVERSAL_PAIRS, baseline_perplexity, load_records, niah_accuracy_table, perplexity, position_ppl, reversal_curse,
    run_niah, save_records, token_nlls,
)
from senri.tasks.niah import build_synthetic_tokenizer
from tests.conftest import tiny_model

TOKENIZER = build_synthetic_tokenizer()


class LookupOracle(torch.nn.Module):
    """A causal LM with perfect recall of what it can see (an ideal induction head).

    It predicts the token that followed the earliest earlier occurrence of the longest suffix (up to 8 tokens) of
    its visible history. The history lives in the DynamicCache the harness passes (token ids stored as a 1-head,
    1-dim key), so the oracle sees exactly what the cache carries; with ``window`` it sees only the last ``window``
    tokens, and a needle further back is provably out of its reach.
    """

    def __init__(self, vocab_size: int, window: int | None = None, max_suffix: int = 8):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the harness reads the device off a parameter
        self.vocab_size, self.window, self.max_suffix = vocab_size, window, max_suffix

    def forward(self, input_ids, cache, use_cache=True, logits_to_keep=0, **kwargs):
        ids = input_ids.to(torch.float64).view(1, 1, -1, 1)  # (B=1, heads=1, T, dim=1)
        history = cache.update(ids, ids, 0)[0].flatten().long().tolist()
        keep = logits_to_keep or input_ids.shape[1]
        logits = torch.zeros(1, keep, self.vocab_size)
        for row, end in enumerate(range(len(history) - keep + 1, len(history) + 1)):
            visible = history[max(0, end - self.window) : end] if self.window else history[:end]
            logits[0, row, self._recall(visible)] = 1.0
        return CausalLMOutputWithPast(logits=logits, cache=cache)

    def _recall(self, visible: list[int]) -> int:
        for n in range(min(self.max_suffix, len(visible) - 1), 0, -1):
            suffix = visible[-n:]
            for i in range(len(visible) - n):
                if visible[i : i + n] == suffix:
                    return visible[i + n]
        return TOKENIZER.pad_token_id


def tiny_llama(vocab_size: int = 97) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval()


def _accuracies(records) -> list[float]:
    return [r["accuracy"] for r in records]


@pytest.mark.parametrize("make_model", [tiny_model, tiny_llama], ids=["senri", "llama"])
def test_perplexity_is_exp_of_mean_nll_computed_independently(make_model):
    model = make_model()
    ids = torch.randint(0, 97, (1, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    expected = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    torch.testing.assert_close(token_nlls(model, ids, chunk_tokens=7), expected, rtol=1e-4, atol=1e-4)
    assert math.isclose(perplexity(model, ids, 16), math.exp(expected.mean().item()), rel_tol=1e-4)
    buckets = position_ppl(model, ids, bucket_size=50, chunk_tokens=16)
    assert buckets["positions"] == [0, 50, 100] and buckets["tokens"] == [49, 50, 50]
    assert math.isclose(buckets["ppl"][1], math.exp(expected[49:99].mean().item()), rel_tol=1e-4)


@pytest.mark.parametrize("template", ["passkey", "niah_words", "niah_numbers", "multikey"])
def test_niah_accuracy_is_one_for_a_model_that_sees_the_needle(template):
    oracle = LookupOracle(len(TOKENIZER))
    records = run_niah(oracle, TOKENIZER, [160, 320], [0.0, 0.5, 1.0], 1, templates=[template], chunk_tokens=37)
    assert _accuracies(records) == [1.0] * 6, [r["prediction"] for r in records]


@pytest.mark.parametrize("template", ["passkey", "niah_words"])
def test_niah_accuracy_is_zero_for_a_model_that_provably_cannot_see_the_needle(template):
    # The same oracle limited to its last 48 tokens: a needle right before the question is in sight, the others
    # are not (their values never occur in the haystack or the question, so they cannot be guessed from sight).
    windowed = LookupOracle(len(TOKENIZER), window=48)
    records = run_niah(windowed, TOKENIZER, [320], [0.0, 0.5, 1.0], 2, templates=[template], chunk_tokens=37)
    assert {r["depth"]: r["accuracy"] for r in records} == {0.0: 0.0, 0.5: 0.0, 1.0: 1.0}


def test_niah_cases_are_independent_a_leaked_cache_would_be_caught(monkeypatch):
    # The oracle recalls the EARLIEST match, so a cache carried over from the previous case answers that case's
    # needle instead: the harness must start every case from a new cache.
    oracle = LookupOracle(len(TOKENIZER))
    kwargs = dict(lengths=[160], depths=[0.3], num_samples=3, seed=2, templates=["passkey"])
    records = run_niah(oracle, TOKENIZER, **kwargs)
    assert _accuracies(records) == [1.0, 1.0, 1.0] and run_niah(oracle, TOKENIZER, **kwargs) == records
    shared = DynamicCache()
    monkeypatch.setattr(evaluation, "new_cache", lambda model, batch_size=1: shared)
    assert _accuracies(run_niah(oracle, TOKENIZER, **kwargs)) == [1.0, 0.0, 0.0]


def test_senri_memory_is_reset_between_cases():
    model = tiny_model(vocab_size=len(TOKENIZER))
    kwargs = dict(lengths=[96, 128], depths=[0.2], num_samples=2, seed=1, templates=["niah_words"])
    both = run_niah(model, TOKENIZER, **kwargs)
    alone = run_niah(model, TOKENIZER, **{**kwargs, "lengths": [128]})
    # The 128-token cases give the same predictions whether or not the 96-token cases ran before them.
    assert [r["prediction"] for r in both if r["length"] == 128] == [r["prediction"] for r in alone]
    assert {"model", "template", "length", "depth", "window", "sample", "needle", "answer", "prediction",
            "accuracy"} <= set(both[0])
    assert both[0]["window"] == 16 and both[0]["model"] == "SenriForCausalLM"
    table = niah_accuracy_table(both)
    assert len(table) == 2 and all(row["cases"] == 2 for row in table)


def test_streaming_the_prompt_in_pieces_does_not_change_predictions():
    # A plain transformers model through a DynamicCache (Senri's streaming invariance is tested in test_model).
    model = tiny_llama(vocab_size=len(TOKENIZER))
    kwargs = dict(lengths=[100], depths=[0.5], num_samples=2, templates=["passkey"])
    pieces = run_niah(model, TOKENIZER, chunk_tokens=13, **kwargs)
    assert [r["prediction"] for r in pieces] == [r["prediction"] for r in run_niah(model, TOKENIZER, chunk_tokens=100,
                                                                                   **kwargs)]


def test_answers_are_matched_exactly_and_multivalue_scores_the_fraction_found():
    found = evaluation._answers_found
    assert found(["71432"], " 7 1 4 3 2 . remember") == ["71432"]
    assert found(["71432"], " 714325") == [] and found(["71432"], " the pass key is 71432") == []
    assert found(["Amber"], " amber is the word") == ["Amber"]
    assert found(["1234567", "7654321", "1111111"], " 7654321 and 1234567 and 2") == ["1234567", "7654321"]


def test_reversal_pairs_are_distinct_fictional_facts():
    assert len(REVERSAL_PAIRS) >= 30
    assert len({subject for subject, _, _ in REVERSAL_PAIRS}) == len(REVERSAL_PAIRS)
    assert len({obj for _, _, obj in REVERSAL_PAIRS}) == len(REVERSAL_PAIRS)


def test_reversal_curse_and_records_roundtrip(tmp_path, smollm2):
    llama, tokenizer = smollm2
    result = reversal_curse(llama, tokenizer, pairs=REVERSAL_PAIRS[:2])
    assert result["forward_ppl"] > 1 and result["backward_ppl"] > 1 and len(result["pairs"]) == 2
    assert math.isclose(result["gap"], result["backward_ppl"] - result["forward_ppl"])
    assert math.isclose(result["ratio"], result["forward_ppl"] / result["backward_ppl"])
    path = save_records(tmp_path / "eval" / "reversal.json", result)
    assert load_records(path) == result
    with pytest.raises(TypeError):
        save_records(path, {"not json": object()})
    assert load_records(path) == result and [p.name for p in path.parent.iterdir()] == ["reversal.json"]


@pytest.mark.slow
def test_full_attention_smollm2_finds_the_passkey_at_2k(smollm2):
    llama, tokenizer = smollm2
    records = run_niah(llama, tokenizer, [2048], [0.1, 0.5, 0.9], 1, templates=["passkey"])
    assert sum(r["accuracy"] for r in records) / len(records) >= 0.9


@pytest.mark.slow
def test_converted_512_window_with_closed_memory_loses_early_needles_only(smollm2):
    # At 2K a needle at depth 0.1 lies ~1.6K tokens back (beyond the window), one at 0.95 ~150 back (inside it).
    llama, tokenizer = smollm2
    senri = convert_llama_to_senri(llama, sliding_window=512)
    records = run_niah(senri, tokenizer, [2048], [0.1, 0.95], 1, templates=["passkey"])
    assert {r["depth"]: r["accuracy"] for r in records} == {0.1: 0.0, 0.95: 1.0} and records[0]["window"] == 512


@pytest.mark.slow
def test_baseline_perplexity_equal_within_the_window(smollm2):
    llama, tokenizer = smollm2
    senri = convert_llama_to_senri(llama, sliding_window=512)
    ids = tokenizer("The old lighthouse keeper wrote in his log every night. " * 20, return_tensors="pt").input_ids[:, :128]
    result = baseline_perplexity(llama, senri, ids)
    assert math.isclose(result["base"], result["senri"], rel_tol=1e-3)
