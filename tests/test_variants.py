"""Memory maintenance and model presets: SVD cleaning, presets, Qwen2 conversion."""

from __future__ import annotations

import pytest
import torch

from senri import SenriCache
from tests.conftest import tiny_model


def _streamed_cache(model, T=120):
    cache = SenriCache(model.config, batch_size=2)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(0)),
              past_key_values=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99])
def test_svd_cleaning_keeps_the_requested_energy_with_the_smallest_rank(threshold):
    cache = _streamed_cache(tiny_model())
    before = cache.layers[1].state.M.clone()
    stats = cache.svd_clean(energy_threshold=threshold)[1]
    S = stats["singular_values"]
    energy = S.square().cumsum(-1) / S.square().sum(-1, keepdim=True)
    rank = stats["retained_rank"]
    assert (stats["energy_retained"] >= threshold - 1e-6).all()
    # one rank fewer would not have been enough
    below = torch.gather(energy, -1, (rank - 2).clamp(min=0)[..., None])[..., 0]
    assert ((rank == 1) | (below < threshold)).all()
    after = cache.layers[1].state.M
    assert (torch.linalg.matrix_rank(after) <= rank).all()
    # Eckart–Young: the error is exactly the dropped singular values' energy
    dropped = (S.square() * (torch.arange(S.shape[-1]) >= rank[..., None])).sum(-1)
    torch.testing.assert_close((before - after).square().sum((-1, -2)), dropped, rtol=1e-3, atol=1e-3)


def test_svd_cleaning_respects_max_rank_and_refuses_an_empty_memory():
    cache = _streamed_cache(tiny_model())
    stats = cache.svd_clean(energy_threshold=1.0, max_rank=2)[1]
    assert (stats["retained_rank"] == 2).all() and (stats["original_rank"] > 2).all()
    model = tiny_model()
    with pytest.raises(RuntimeError, match="layer 1: the memory is empty"):
        _streamed_cache(model, T=10).svd_clean()
    with pytest.raises(ValueError, match="energy_threshold must be in"):
        cache.svd_clean(energy_threshold=0.0)


def test_cleaned_state_still_streams_and_transfers():
    model = tiny_model()
    cache = _streamed_cache(model)
    cache.svd_clean(energy_threshold=0.8)
    restored = SenriCache.from_memory_state(model.config, cache.get_memory_state(include_window=True))
    nxt = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        a = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits
        b = model(input_ids=nxt, past_key_values=restored, use_cache=True).logits
    assert torch.equal(a, b)


def test_presets_describe_the_seed_models():
    from senri import SenriConfig

    smol = SenriConfig.smollm_135m()
    assert (smol.hidden_size, smol.num_hidden_layers, smol.num_attention_heads, smol.num_key_value_heads) == (576, 30, 9, 3)
    assert smol.memory_layers == [10, 20] and smol.vocab_size == 49152 and smol.sliding_window == 1024
    pythia = SenriConfig.pythia_70m()
    assert pythia.layer_types[0] == "memory_only" and (pythia.hidden_size, pythia.num_hidden_layers) == (512, 6)
    baseline = SenriConfig.full_attention_baseline(num_hidden_layers=4)
    assert baseline.layer_types == ["full_attention"] * 4 and baseline.memory_layers == []
    assert SenriConfig.japanese().vocab_size == 52000
    tiny_pythia = SenriConfig.pythia_70m(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                         num_key_value_heads=4, vocab_size=50, sliding_window=8, chunk_size=4)
    from senri import SenriForCausalLM

    model = SenriForCausalLM(tiny_pythia).eval()
    ids = torch.randint(0, 50, (1, 40))
    with torch.no_grad():
        one = model(input_ids=ids).logits
        cache = SenriCache(model.config, 1)
        parts = [model(input_ids=ids[:, s : s + 7], past_key_values=cache, use_cache=True).logits for s in range(0, 40, 7)]
    torch.testing.assert_close(torch.cat(parts, 1), one, rtol=0, atol=1e-5)


def test_qwen2_conversion_with_qkv_biases_equals_the_source_within_the_window():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from senri import convert_qwen2_to_senri

    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    for layer in qwen.model.layers:  # non-zero biases, so that a dropped bias would show
        torch.nn.init.normal_(layer.self_attn.q_proj.bias)
        torch.nn.init.normal_(layer.self_attn.k_proj.bias)
    senri = convert_qwen2_to_senri(qwen, sliding_window=16, chunk_size=4, layer_types=["memory", "sliding_attention"])
    assert senri.model.layers[0].self_attn.q_proj.bias is not None and senri.model.layers[0].self_attn.o_proj.bias is None
    ids = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(senri(input_ids=ids).logits, qwen(ids).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("update", ["delta", "linear"])
def test_alibi_model_streams_like_one_pass_and_transfers(update):
    model = tiny_model(use_alibi=True, alibi_scale=2.0, memory_update=update)
    ids = torch.randint(0, 97, (1, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        one = model(input_ids=ids).logits
        cache = SenriCache(model.config, 1)
        first = [model(input_ids=ids[:, s : s + 13], past_key_values=cache, use_cache=True).logits for s in range(0, 91, 13)]
        restored = SenriCache.from_memory_state(model.config, cache.get_memory_state(include_window=True))
        rest = model(input_ids=ids[:, 91:], past_key_values=restored, use_cache=True).logits
    torch.testing.assert_close(torch.cat(first + [rest], 1), one, rtol=0, atol=1e-5)
    plain = tiny_model(memory_update=update)
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=ids).logits[:, -1], one[:, -1])
