"""Streams of any length: positions stay in the base model's trained range (docs/DESIGN.md, "Positions stay in the
trained range"). Attention sinks are seen at a bounded RoPE distance, and RoPE angles are exact at any position."""

from __future__ import annotations

import warnings

import pytest
import torch

from senri import SenriCache, SenriConfig
from senri.model.modeling_senri import (
    SenriRotaryEmbedding, explicit_local_attention, flex_local_attention, local_attention, sink_shift,
)
from tests.conftest import tiny_config, tiny_model


@pytest.mark.parametrize("q_start,T,window_chunks,earlier",
                         [(0, 37, 2, 0), (24, 16, 2, 0), (5, 30, 2, 0), (23, 1, 2, 0), (13, 70, 4, 1), (9, 50, 3, 2),
                          (40, 41, 2, 0)])
def test_per_chunk_sinks_equal_a_naive_masked_softmax(q_start, T, window_chunks, earlier):
    """Sinks whose keys differ per query chunk (each chunk sees them rotated at its own positions) ≡ one softmax per
    query over its own chunk's sinks and every key, masked; outputs and gradients (the sinks' keys included), on
    every path: one block, grouped blocks (with and without gradients), explicit weights and FlexAttention."""
    C, S, G = 4, 3, 2
    k_start = max(0, (q_start // C - window_chunks - earlier) * C)
    chunks = (q_start + T - 1) // C - q_start // C + 1
    g = torch.Generator().manual_seed(11)
    L = q_start + T
    q, k, v = torch.randn(2, 4, T, 8, generator=g), torch.randn(2, 2, L, 8, generator=g), torch.randn(2, 2, L, 8, generator=g)
    sink_k, sink_v = torch.randn(2, 2, chunks, S, 8, generator=g), v[:, :, :S]
    q_pos, k_pos = torch.arange(q_start, q_start + T), torch.arange(L)
    window_start = (q_pos // C - window_chunks) * C
    allowed = (k_pos[None] <= q_pos[:, None]) & (k_pos[None] >= window_start[:, None])
    sink_allowed = torch.arange(S)[None] < window_start.clamp(min=k_start)[:, None]
    own_chunk = q_pos // C - q_start // C

    def naive(q, k, v, sink_k):
        own = sink_k[:, :, own_chunk].repeat_interleave(G, dim=1)  # (B, Hq, T, S, D)
        scores = torch.cat([torch.einsum("bhtd,bhtsd->bhts", q, own),
                            q @ k.repeat_interleave(G, dim=1).transpose(-1, -2)], dim=-1) * 8**-0.5
        weights = scores.masked_fill(~torch.cat([sink_allowed, allowed], dim=1), float("-inf")).softmax(-1)
        return weights @ torch.cat([v[:, :, :S], v], dim=2).repeat_interleave(G, dim=1), weights

    expected, weights = naive(q, k, v, sink_k)
    args = (q_start, k_start, 8**-0.5, C, window_chunks)
    fast = local_attention(q, k[:, :, k_start:], v[:, :, k_start:], *args, sink_k, sink_v)
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)

    leaves = [t.clone().requires_grad_() for t in (q, k, v, sink_k)]
    qg, kg, vg, sg = leaves
    trained = local_attention(qg, kg[:, :, k_start:], vg[:, :, k_start:], *args, sg, vg[:, :, :S])
    torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(trained.square().sum(), leaves, allow_unused=True)
    naive_grads = torch.autograd.grad(naive(qg, kg, vg, sg)[0].square().sum(), leaves, allow_unused=True)
    for grad, naive_grad in zip(grads, naive_grads):
        if naive_grad is None:  # no query saw a sink copy of this call: neither path uses them
            assert grad is None or not grad.any()
        else:
            torch.testing.assert_close(grad, naive_grad, rtol=1e-4, atol=1e-5)

    explicit, explicit_weights = explicit_local_attention(q, k[:, :, k_start:], v[:, :, k_start:], *args, sink_k, sink_v)
    torch.testing.assert_close(explicit, expected, rtol=1e-5, atol=1e-5)
    full = torch.zeros(2, 4, T, L)
    full[..., :] = weights[..., S:]
    full[..., :S] += weights[..., :S]
    torch.testing.assert_close(explicit_weights, full, rtol=1e-5, atol=1e-6)
    if T > 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
            flex = flex_local_attention(q, k[:, :, k_start:], v[:, :, k_start:], *args, sink_k, sink_v)
        torch.testing.assert_close(flex, expected, rtol=1e-5, atol=1e-5)


def test_sink_shift_keeps_every_query_within_the_distance_and_starts_at_zero():
    C, W, S, L = 64, 4, 4, 1000
    for chunk in range(200):
        shift = sink_shift(chunk, C, L)
        last_query, first_query = (chunk + 1) * C - 1, chunk * C
        assert last_query - shift < L  # the farthest any query of the chunk sees sink 0
        if shift:  # moved: the sinks stand before the chunk's window, where the window never holds them
            assert shift + S <= (chunk - W) * C
            assert first_query - (shift + S - 1) >= W * C
        else:
            assert (chunk + 1) * C <= L
    assert sink_shift(10**6, C, None) == 0
    config = tiny_config(num_sink_tokens=4, sink_max_distance=0)
    assert config.sink_distance == config.sliding_window + config.chunk_size + 4  # just before the window
    assert tiny_config(num_sink_tokens=4, sink_max_distance=None).sink_distance is None
    assert tiny_config(num_sink_tokens=4, sink_max_distance=100).sink_distance == 100
    with pytest.raises(ValueError, match="sink_max_distance must be None or >= 0, got -1"):
        tiny_config(num_sink_tokens=4, sink_max_distance=-1)


def _closed_gates_logits(sink_max_distance, filler: int, tail: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    model = tiny_model(memory_gate_init=0.0, num_sink_tokens=4, sink_max_distance=sink_max_distance).double()
    filler_ids = torch.randint(0, 97, (1, filler), generator=torch.Generator().manual_seed(filler))
    cache = SenriCache(model.config)
    with torch.no_grad():
        for piece in torch.cat([sinks, filler_ids], dim=1).split(96, dim=1):
            model(input_ids=piece, cache=cache)
        logits = model(input_ids=tail, cache=cache).logits
    return logits[0, -tail.shape[1] + 64 :]  # queries whose three layers (20 tokens back each) see only the tail


def test_beyond_the_sink_distance_a_stream_sees_the_same_however_long_it_is():
    """With the memory closed, a query sees its window and the sinks; once the sinks have moved, both are at the same
    RoPE distances at token 600 as at token 60,000, so the same tail gives the same logits (float64). Sinks kept at
    their own positions (None) are seen farther and farther away: the logits drift with the stream's length."""
    g = torch.Generator().manual_seed(12)
    sinks, tail = torch.randint(0, 97, (1, 4), generator=g), torch.randint(0, 97, (1, 92), generator=g)
    near, far = 500, 60_000 - 4  # both multiples of the chunk: the tail's chunks line up the same way
    bounded = [_closed_gates_logits(200, n, tail, sinks) for n in (near, far)]
    torch.testing.assert_close(bounded[0], bounded[1], rtol=0, atol=1e-9)
    unbounded = [_closed_gates_logits(None, n, tail, sinks) for n in (near, far)]
    assert (unbounded[0] - unbounded[1]).abs().max() > 1e-4


def test_rope_angles_are_exact_at_any_position():
    """The tables at position ~10^7 are as accurate as at 0 (float32 angles would be off by ~0.25 rad there), and
    near 0 they are Llama's."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = SenriConfig(hidden_size=64, num_attention_heads=1, num_key_value_heads=1, rope_theta=100000.0,
                         sliding_window=64, chunk_size=64)
    ours, llama = SenriRotaryEmbedding(config), LlamaRotaryEmbedding(config)
    x = torch.zeros(1)
    near = torch.arange(0, 512)[None]
    for mine, theirs in zip(ours(x, near), llama(x, near)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=5e-5)  # float32 angles are 1.5e-5 off at 511
    far = torch.arange(10**7, 10**7 + 8)[None]
    angles = far[..., None].double() * ours.inv_freq.double()
    cos, _ = ours(x, far)
    exact = torch.cat([angles, angles], dim=-1).cos()
    assert (cos.double() - exact).abs().max() < 1e-6
    assert (llama(x, far)[0].double() - exact).abs().max() > 1e-2  # what float32 angles give there


def test_stream_vs_fresh_compares_the_same_tokens_with_and_without_the_earlier_stream():
    """The long-stream check (``python -m senri.reports stream``): per block, the stream's loss and a fresh stream's
    over the same tokens. A model that sees no further back than 60 tokens (window only, no sinks, 3 layers × 20
    tokens) gives the two equal beyond a block's first 60 tokens; the first block is the same stream."""
    from senri.evaluation.harness import stream_vs_fresh, token_nlls

    model = tiny_model(memory_gate_init=0.0)
    ids = torch.randint(0, 97, (1, 300), generator=torch.Generator().manual_seed(13))
    rows = stream_vs_fresh(model, ids, block=128, chunk_tokens=50, fresh_every=2)
    assert [(r["start"], r["tokens"]) for r in rows] == [(0, 127), (128, 127), (256, 43)]
    assert "fresh" in rows[0] and "fresh" not in rows[1] and "fresh" in rows[2]
    assert rows[0]["streamed"] == rows[0]["fresh"] and rows[0]["ratio"] == 1.0
    with torch.no_grad():
        streamed, fresh = token_nlls(model, ids, 50), token_nlls(model, ids[:, 128:256], 50)
    assert rows[1]["streamed"] == round(streamed[128:255].mean().item(), 4)
    assert rows[2]["fresh"] == round(token_nlls(model, ids[:, 256:], 50).mean().item(), 4)
    torch.testing.assert_close(streamed[128 + 64 : 255], fresh[64:])  # beyond the reach of the earlier stream
    assert not torch.allclose(streamed[128:140], fresh[:12])
