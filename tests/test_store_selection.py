"""The store-selection diagnostic rebuilds exactly what the memory wrote (senri.evaluation.store_selection)."""

from __future__ import annotations

import pytest
import torch

from senri import SenriCache
from senri.evaluation.store_selection import attention_received, memory_writes, needle_ranks, store_selection
from tests.conftest import tiny_model


@pytest.mark.parametrize("update", ["linear", "delta"])
@pytest.mark.parametrize("overrides", [{}, {"num_sink_tokens": 2}, {"memory_qk_map": True}])
def test_the_rebuilt_memory_is_the_cache_and_its_first_chunk_is_recalled_from_nothing(update, overrides):
    model = tiny_model(memory_update=update, **overrides)
    if overrides.get("memory_qk_map"):  # away from the identity, so that the key map matters
        with torch.no_grad():
            key_map = model.model.layers[1].self_attn.memory_key_map
            key_map.add_(0.3 * torch.randn_like(key_map))
    ids = torch.randint(0, 97, (1, 45), generator=torch.Generator().manual_seed(4))
    writes = memory_writes(model, ids)
    cache = SenriCache(model.config, 1)
    with torch.no_grad():
        model(input_ids=ids, cache=cache)
    assert set(writes) == set(model.config.memory_layers)
    for i, w in writes.items():
        state = cache.layer_state(i)
        assert w["error"].shape == (model.config.num_key_value_heads, state.written_chunks * model.config.chunk_size)
        torch.testing.assert_close(w["M"], state.M, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w["z"], state.z, rtol=1e-5, atol=1e-6)
        sinks = overrides.get("num_sink_tokens", 0)
        assert bool(w["error"][:, :sinks].isnan().all()) and not bool(w["error"][:, sinks:].isnan().any())
        # Before the first write the memory is empty and reads nothing: the error is the value's norm.
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[i]  # layer i's input
            layer = model.model.layers[i]
            v = layer.self_attn.v_proj(layer.input_layernorm(hidden))
        C = model.config.chunk_size
        norms = v.view(1, 45, -1, model.config.head_dim).transpose(1, 2)[0].norm(dim=-1)  # (H, T)
        torch.testing.assert_close(w["error"][:, sinks:C], norms[:, sinks:C])
        later = w["error"].shape[1]  # after it, the memory does read something
        assert float((w["error"][:, C:] - norms[:, C:later]).abs().max()) > 1e-3
        torch.testing.assert_close(w["relative"][:, sinks:C], torch.ones_like(norms[:, sinks:C]))  # all of it missed
        torch.testing.assert_close(w["relative"][:, sinks:], w["error"][:, sinks:] / norms[:, sinks:later])
        assert bool(w["relative"][:, :sinks].isnan().all())


def test_needle_ranks_name_the_needles_best_token_among_the_written():
    error = torch.tensor([[0.1, 0.9, 0.5, float("nan"), 0.7, 0.2],
                          [0.8, 0.1, 0.2, float("nan"), 0.3, 0.9]])
    ranks = needle_ranks({3: error}, (1, 3))  # tokens 1 and 2
    assert ranks[3].tolist() == [0.0, 3.0]  # head 0: token 1 is the worst recalled; head 1: token 2 ranks 4th
    assert bool(needle_ranks({3: error}, (6, 9))[3].isnan().all())  # never written


def test_a_random_store_holds_a_needle_token_with_the_hypergeometric_probability():
    from math import comb

    from senri.evaluation.store_selection import _kept_by_chance

    for store, needle, written in ((64, 12, 1700), (256, 30, 1700), (5, 3, 10), (8, 3, 10)):
        exact = 1 - comb(written - needle, store) / comb(written, store)
        assert _kept_by_chance(store, needle, written) == pytest.approx(exact, rel=1e-9, abs=1e-12)


def test_attention_received_chunk_by_chunk_is_the_one_pass_attention_summed_per_key():
    model = tiny_model(num_sink_tokens=2)
    ids = torch.randint(0, 97, (1, 45), generator=torch.Generator().manual_seed(5))
    received = attention_received(model, ids)
    with torch.no_grad():
        weights = model(input_ids=ids, output_attentions=True).attentions[1][0].double()  # (Hq, T, T)
    H = model.config.num_key_value_heads
    expected = weights.sum(dim=1).view(H, -1, 45).sum(dim=1)
    torch.testing.assert_close(received[1], expected, rtol=1e-5, atol=1e-6)
    # Every query's weights sum to one over what it sees: the total received is the number of queries per key head.
    assert float(received[1].sum()) == pytest.approx(45 * model.config.num_attention_heads, rel=1e-5)


def test_store_selection_reports_every_score_beside_chance_and_refuses_others():
    from types import SimpleNamespace

    from senri.evaluation.store_selection import SCORES

    model = tiny_model()
    ids = torch.randint(0, 97, (60,), generator=torch.Generator().manual_seed(6)).tolist()
    case = SimpleNamespace(ids=ids, answer_start=55, needle=(10, 14))
    H = model.config.num_key_value_heads
    for score in SCORES:
        out = store_selection(model, [case], stores=(4, 16), score=score)
        assert out["pairs"] == H * len(model.config.memory_layers)
        assert 0 <= out["mean_rank"] < 32 and set(out["kept"]) == set(out["kept_by_chance"]) == {4, 16}
        for s in (4, 16):  # some head of a layer holds it at least as often as a given head does, by chance too
            assert out["kept_by_any_head"][s] >= out["kept"][s] - 1e-9
            p = out["kept_by_chance"][s]
            assert out["kept_by_any_head_by_chance"][s] == pytest.approx(1 - (1 - p) ** H)
    # The store as large as what was written keeps the needle, by any score and by chance.
    written = int((~memory_writes(model, torch.tensor([ids[:55]]))[1]["error"][0].isnan()).sum())
    whole = store_selection(model, [case], stores=(written,), score="relative")
    assert whole["kept"][written] == whole["kept_by_chance"][written] == 1.0
    with pytest.raises(ValueError, match="score must be one of recall, relative, attention, got 'random'"):
        store_selection(model, [case], score="random")
