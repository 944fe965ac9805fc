"""The placement diagnostics: pass-key cases, the retrieval-head scan and the perfect-memory ceiling."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from senri import SenriConfig, load_local_smollm2
from senri.evaluation.diagnostics import (
    memory_state_bytes, passkey_cases, placement_ceiling, placement_layer_types, retrieval_head_scan,
    teacher_forced_passkey,
)
from senri.tasks.niah import PASSKEY_FILLER
from senri.evaluation.real_model import depths_beyond_window


@pytest.fixture(scope="module")
def tokenizer():
    return load_local_smollm2()[1]


def test_passkey_cases_use_the_classic_filler_and_put_the_needle_where_asked(tokenizer):
    cases = passkey_cases(tokenizer, 1024, 6, seed=3, depths=depths_beyond_window(1024, 256, 64))
    for case in cases:
        assert case.answer_start <= 1024
        text = tokenizer.decode(case.ids[: case.answer_start])
        assert "The grass is green. The sky is blue." in text and text.endswith("What is the pass key? The pass key is")
        needle = tokenizer.decode(case.ids[case.needle[0] : case.needle[1]])
        assert needle.strip() == f"The pass key is {case.key}. Remember it. {case.key} is the pass key."
        assert tokenizer.decode(case.ids[case.answer_start :]).strip() == case.key
        assert case.answer_start - case.needle[1] > 256 + 64  # beyond every window when the question is asked
    assert cases == passkey_cases(tokenizer, 1024, 6, seed=3, depths=depths_beyond_window(1024, 256, 64))
    assert len({c.key for c in cases}) == 6
    assert PASSKEY_FILLER.startswith("The grass is green.")


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval()


def test_retrieval_head_scan_equals_the_eager_attention_weights_on_the_needle(tokenizer):
    llama = _tiny_llama()
    cases = passkey_cases(tokenizer, 200, 2, seed=1)
    scan = retrieval_head_scan(llama, cases)
    assert scan.shape == (3, 4) and (scan >= 0).all() and (scan <= 1).all()
    llama.set_attn_implementation("eager")
    expected = torch.zeros(3, 4)
    for case in cases:
        with torch.no_grad():
            out = llama(input_ids=torch.tensor([case.ids[: case.answer_start]]), output_attentions=True)
        for layer, weights in enumerate(out.attentions):  # (1, heads, T, T)
            expected[layer] += weights[0, :, -1, case.needle[0] : case.needle[1]].sum(-1) / len(cases)
    torch.testing.assert_close(scan, expected, rtol=1e-4, atol=1e-5)


def test_placement_ceiling_with_every_layer_full_is_the_base_model(tokenizer):
    llama = _tiny_llama()
    cases = passkey_cases(tokenizer, 300, 3, seed=2)
    records = placement_ceiling(llama, tokenizer, {"all": [0, 1, 2], "none": []}, [300], 3, sliding_window=64,
                                chunk_size=32, seed=2)
    by_name = {r["placement"]: r for r in records}
    assert by_name["all"]["passkey"] == sum(teacher_forced_passkey(llama, cases)) / 3
    assert by_name["all"]["memory_state_bytes"] == 3 * 2 * (8 * 8 + 8) * 4
    assert placement_layer_types(3, [2]) == ["sliding_attention", "sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="placement layers \\[5\\] are out of range"):
        placement_layer_types(3, [5])
    assert memory_state_bytes(SenriConfig.smollm_135m(), 20) == 20 * 3 * (64 * 64 + 64) * 4
