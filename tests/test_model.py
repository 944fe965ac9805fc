"""DESIGN.md invariants on tiny random models: exact coverage, streaming invariance, constant state, transfer."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from senri import SenriCache, SenriConfig, SenriForCausalLM, load_memory_state, save_memory_state
from tests.conftest import tiny_config, tiny_model

UPDATES = ["delta", "linear"]


def _stream(model, ids, pieces, cache=None):
    cache = cache or SenriCache(model.config, batch_size=ids.shape[0])
    logits, start = [], 0
    for n in pieces:
        out = model(input_ids=ids[:, start : start + n], cache=cache, use_cache=True)
        logits.append(out.logits)
        cache, start = out.cache, start + n
    assert start == ids.shape[1]
    return torch.cat(logits, dim=1), cache


# Attention sinks: none; at their own positions (sink_max_distance=None: the stream here is shorter than the default
# distance, so the same); moved along just before each chunk's window (0: the shortest distance).
SINK_SETTINGS = [(0, None), (4, None), (4, 0)]


@pytest.mark.parametrize("sinks,sink_max_distance", SINK_SETTINGS)
@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize(
    "layer_types",
    [["sliding_attention", "memory", "sliding_attention"], ["memory_only", "memory", "full_attention"]],
)
@pytest.mark.parametrize("feature_map", ["elu", "dpfp"])
def test_streaming_in_any_pieces_equals_one_pass(update, layer_types, sinks, sink_max_distance, feature_map):
    model = tiny_model(memory_update=update, layer_types=layer_types, num_sink_tokens=sinks,
                       sink_max_distance=sink_max_distance, memory_feature_map=feature_map)
    T = 260  # 16 windows; pieces straddle chunk (4) and window (16) boundaries
    ids = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        one_pass = model(input_ids=ids).logits
        for pieces in ([1] * T, [3, 5, 17, 1, 2, 64, 31, 137], [16] * 16 + [4]):
            streamed, _ = _stream(model, ids, pieces)
            torch.testing.assert_close(streamed, one_pass, rtol=0, atol=1e-4)


@pytest.mark.parametrize("sinks,sink_max_distance", SINK_SETTINGS)
def test_streaming_with_closed_gates_is_exact_in_float64(sinks, sink_max_distance):
    """Windows, sinks, RoPE and cache lose nothing: with the memory's share closed, streaming in any pieces (one
    attention call each, or single-token steps) equals one pass to float64 rounding."""
    model = tiny_model(memory_gate_init=0.0, num_sink_tokens=sinks, sink_max_distance=sink_max_distance,
                       layer_types=["sliding_attention", "memory", "full_attention"]).double()
    ids = torch.randint(0, 97, (2, 150), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        one_pass = model(input_ids=ids).logits
        for pieces in ([30, 1, 17, 50, 52], [1] * 150):
            streamed, _ = _stream(model, ids, pieces)
            torch.testing.assert_close(streamed, one_pass, rtol=0, atol=1e-12)


@pytest.mark.parametrize("update,sinks", [("delta", 0), ("linear", 0), ("delta", 4)])
def test_greedy_generate_matches_repeated_full_forwards(update, sinks):
    model = tiny_model(memory_update=update, num_sink_tokens=sinks, sink_max_distance=0)
    prompt = torch.randint(0, 97, (1, 70), generator=torch.Generator().manual_seed(2))
    generated = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False, pad_token_id=0
    )
    ids = prompt
    with torch.no_grad():
        for _ in range(40):
            next_token = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
    assert torch.equal(generated, ids)


def _last_logits_change_when_token_zero_changes(model, T: int) -> float:
    ids = torch.randint(1, 97, (1, T), generator=torch.Generator().manual_seed(3))
    other = ids.clone()
    other[0, 0] = 0
    with torch.no_grad():
        return (model(input_ids=ids).logits[0, -1] - model(input_ids=other).logits[0, -1]).abs().max().item()


def test_memory_carries_a_token_far_beyond_the_window():
    # 400 tokens = 25 windows: with three layers, token 0 can only reach the end through memory.
    assert _last_logits_change_when_token_zero_changes(tiny_model(memory_gate_init=0.5), 400) > 1e-6


def test_sliding_window_only_model_provably_forgets():
    # Each layer reaches back at most window + chunk tokens: 3 layers cannot span 400 tokens.
    model = tiny_model(layer_types=["sliding_attention"] * 3)
    assert _last_logits_change_when_token_zero_changes(model, 400) == 0.0
    # ...and a closed memory gate (converted-model default) behaves the same.
    assert _last_logits_change_when_token_zero_changes(tiny_model(memory_gate_init=0.0), 400) == 0.0


@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("feature_map", ["elu", "dpfp"])
def test_exact_coverage_every_earlier_token_through_exactly_one_path(sinks, feature_map):
    """Each earlier token reaches a query through the window or the memory, never both, never neither; the attention
    sinks (the first tokens) through the window only."""
    config = tiny_config(num_hidden_layers=1, layer_types=["memory"], memory_gate_init=0.5, num_sink_tokens=sinks,
                         memory_feature_map=feature_map)
    model = SenriForCausalLM(config).eval()
    attn = model.model.layers[0].self_attn
    T = 45
    x = torch.randn(1, T, config.hidden_size, requires_grad=True)
    cos, sin = model.model.rotary_emb(x, torch.arange(T)[None])
    sink_tables = model.model.sink_tables(x, 0, T, None)
    from senri.model.cache import LayerState

    for t in (3, 19, 20, 23, 24, 44):
        # Gradient of query t's output w.r.t. each input token, through the local path and the memory path alone.
        paths = {}
        for name, gate in (("local", 0.0), ("memory", 1.0)):
            with torch.no_grad():
                attn.memory_gate.fill_(gate)
            out, _, _ = attn(x, (cos, sin, 0, sink_tables), LayerState())
            (grad,) = torch.autograd.grad(out[0, t].sum(), x)
            paths[name] = grad[0].abs().sum(-1) > 0
        window_start = max(0, (t // 4 - 4) * 4)
        for s in range(t):
            in_window = s >= window_start or s < sinks
            assert paths["local"][s] == in_window, f"query {t}, token {s}: local path"
            assert paths["memory"][s] == (not in_window), f"query {t}, token {s}: memory path"


@pytest.mark.parametrize("sinks", [0, 4])
def test_cache_bytes_stop_growing_once_the_window_is_full(sinks):
    model = tiny_model(num_sink_tokens=sinks)
    cache = SenriCache(model.config, batch_size=1)
    sizes = []
    with torch.no_grad():
        for step in range(200):
            model(input_ids=torch.tensor([[step % 97]]), cache=cache, use_cache=True)
            sizes.append(cache.nbytes())
    # Full after window + chunk tokens (+ the memory allocated at the first write); bounded ever after.
    assert max(sizes[40:]) == max(sizes[:40]) and sizes[-1] <= max(sizes)
    assert all(layer.state.keys.shape[2] <= 16 + 4 for layer in cache.layers)
    assert all((layer.state.sink_keys is None) == (sinks == 0) for layer in cache.layers)


def test_full_attention_cache_grows_and_memory_state_is_float32():
    model = tiny_model(layer_types=["memory", "memory", "full_attention"])
    _, cache = _stream(model, torch.randint(0, 97, (1, 120)), [60, 60])
    assert cache.layers[2].state.keys.shape[2] == 120
    assert cache.layers[0].state.M.dtype == torch.float32


@pytest.mark.parametrize("update,sinks,sink_max_distance,feature_map", [
    ("delta", 0, None, "elu"), ("linear", 0, None, "elu"), ("delta", 4, None, "elu"), ("delta", 4, 0, "elu"),
    ("linear", 4, 0, "dpfp"),
])
def test_state_saved_to_disk_continues_identically_in_a_fresh_process(tmp_path, update, sinks, sink_max_distance,
                                                                      feature_map):
    model = tiny_model(memory_update=update, num_sink_tokens=sinks, sink_max_distance=sink_max_distance,
                       memory_feature_map=feature_map)
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(0, 97, (1, 300), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(input_ids=ids).logits[:, 200:]
        _, cache = _stream(model, ids[:, :200], [77, 123])
    save_memory_state(cache.get_memory_state(include_window=True), tmp_path / "state.pt")
    torch.save(ids[:, 200:], tmp_path / "rest.pt")
    script = textwrap.dedent(f"""
        import torch, senri
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r}).eval()
        assert type(model).__name__ == "SenriForCausalLM"
        cache = senri.SenriCache.from_memory_state(model.config, senri.load_memory_state({str(tmp_path / 'state.pt')!r}))
        rest = torch.load({str(tmp_path / 'rest.pt')!r})
        with torch.no_grad():
            torch.save(model(input_ids=rest, cache=cache, use_cache=True).logits, {str(tmp_path / 'out.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sinks", [0, 4])
def test_memory_only_state_keeps_memory_and_drops_the_window(sinks):
    model = tiny_model(num_sink_tokens=sinks)
    _, cache = _stream(model, torch.randint(0, 97, (1, 150)), [150])
    state = cache.get_memory_state()
    assert "keys" not in state["layers"]["1"] and state["layers"]["1"]["M"].dtype == torch.float32
    restored = SenriCache.from_memory_state(model.config, state)
    torch.testing.assert_close(restored.layers[1].state.M, cache.layers[1].state.M)
    assert restored.seen_tokens == 148 and restored.layers[0].state.keys is None
    if sinks:  # the sinks are kept: a few tokens, and the windows need them
        torch.testing.assert_close(restored.layers[0].state.sink_keys, cache.layers[0].state.sink_keys)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 97, (1, 30)), cache=restored, use_cache=True)


def test_mismatched_memory_states_are_refused_with_the_reason(tmp_path):
    model = tiny_model()
    _, cache = _stream(model, torch.randint(0, 97, (1, 60)), [60])
    state = cache.get_memory_state(include_window=True)
    with pytest.raises(ValueError, match="chunk_size: state has 4, model has 8"):
        SenriCache.from_memory_state(tiny_config(chunk_size=8), state)
    # ALiBi changes how the memory was written: a state does not continue a model that decays differently.
    with pytest.raises(ValueError, match="use_alibi: state has False, model has True"):
        SenriCache.from_memory_state(tiny_config(use_alibi=True), state)
    # A state saved before the variant fields existed was made by a single, undecayed memory: still accepted.
    legacy = {**state, "config": {k: v for k, v in state["config"].items()
                                  if k not in ("memory_type", "num_memories", "num_memory_banks", "segments_per_bank",
                                               "use_alibi", "alibi_scale")}}
    assert SenriCache.from_memory_state(model.config, legacy).seen_tokens == 60
    with pytest.raises(ValueError, match="memory_type: state has 'single', model has 'multi'"):
        SenriCache.from_memory_state(tiny_config(memory_type="multi"), legacy)
    # A memory written with another feature map holds other features: refused, by name.
    with pytest.raises(ValueError, match="memory_feature_map: state has 'elu', model has 'dpfp'"):
        SenriCache.from_memory_state(tiny_config(memory_feature_map="dpfp"), state)
    # A cache made by hand for another feature map is refused by the layer before anything advances.
    dpfp_model = tiny_model(memory_feature_map="dpfp")
    with pytest.raises(RuntimeError, match="the cache's memory has 8 features per head .* writes 48"):
        dpfp_model(input_ids=torch.tensor([[1]]), cache=cache, use_cache=True)
    bad = save_memory_state(state, tmp_path / "s.pt")
    loaded = load_memory_state(bad)
    loaded["layers"]["1"]["M"] = loaded["layers"]["1"]["M"][:, :1]
    with pytest.raises(ValueError, match=r"layer 1 M has shape \(1, 1, 8, 8\), expected \(1, 2, 8, 8\)"):
        SenriCache.from_memory_state(model.config, loaded)
    with pytest.raises(ValueError, match="not a Senri memory state"):
        SenriCache.from_memory_state(model.config, {"M": 1})
    with pytest.raises(TypeError, match="SenriCache"):
        from transformers import DynamicCache

        model(input_ids=torch.tensor([[1]]), past_key_values=DynamicCache(), use_cache=True)


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(sliding_window=-4), "sliding_window must be a non-negative integer \\(rounded up to whole chunks of 4\\)"),
        (dict(layer_types=["sliding_attention", "memroy", "memory"]), "'memroy' is unknown.*did you mean 'memory'"),
        (dict(layer_types=["memory"]), "layer_types has 1 entries but num_hidden_layers is 3"),
        (dict(layer_types=None, first_memory_layer=2, memory_layer_interval=2), "memory layer indices \\[4\\] are out of range"),
        (dict(memory_update="hebbian"), "memory_update = 'hebbian' is unknown.*'delta', 'linear'"),
        (dict(memory_gate_init=1.5), "memory_gate_init must be in \\[0, 1\\], got 1.5"),
        (dict(chunk_size=0, sliding_window=0), "chunk_size must be a positive integer"),
        (dict(num_sink_tokens=5), "num_sink_tokens must be in 0..chunk_size \\(4\\), got 5"),
        (dict(memory_feature_map="dpfq"), "memory_feature_map = 'dpfq' is unknown.*did you mean 'dpfp'"),
        (dict(memory_feature_map="dpfp", memory_dpfp_nu=16), "memory_dpfp_nu must be in 1..15 .*got 16"),
        (dict(memory_feature_map="dpfp", memory_type="multi"), "needs a single memory per head"),
        (dict(memory_feature_map="dpfp", num_memory_banks=2), "needs a single memory per head"),
    ],
)
def test_bad_configs_raise_errors_naming_the_problem(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


def test_default_layout_is_the_seed_layout():
    config = SenriConfig()
    assert config.num_hidden_layers == 30 or len(config.layer_types) == config.num_hidden_layers
    smol = SenriConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    assert smol.memory_layers == [10, 20] and smol.sliding_window == 1024 and smol.chunk_size == 64
    assert smol.memory_update == "delta" and smol.memory_gate_init == 0.0


def test_right_padding_and_padding_after_real_tokens_are_refused_clearly():
    model = tiny_model()  # left padding is supported: tests/test_padding.py
    for mask in ([[1, 1, 0]], [[0, 1, 0]], [[1, 0, 1]]):
        with pytest.raises(ValueError, match=r"left padding only .* rows \[0\] are not"):
            model(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor(mask))


def test_training_forward_starts_from_empty_memory_each_call():
    model = tiny_model().train()
    ids = torch.randint(0, 97, (2, 100))
    first = model(input_ids=ids, labels=ids).loss
    second = model(input_ids=ids, labels=ids).loss
    assert torch.equal(first, second)  # nothing is carried between independent samples
    first.backward()
    gate = model.model.layers[1].self_attn.memory_gate
    assert gate.grad is not None and gate.grad.abs().sum() > 0


def test_closed_gate_still_receives_gradient():
    model = tiny_model(memory_gate_init=0.0).train()
    ids = torch.randint(0, 97, (2, 100))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.layers[1].self_attn.memory_gate.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_million_token_stream_under_autocast_stays_finite_with_float32_memory(dtype):
    model = tiny_model(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                       sliding_window=64, chunk_size=64, vocab_size=32)
    cache = SenriCache(model.config, batch_size=1)
    piece = 16384
    g = torch.Generator().manual_seed(5)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        for _ in range((1 << 20) // piece):
            out = model(input_ids=torch.randint(0, 32, (1, piece), generator=g), cache=cache, use_cache=True)
            assert torch.isfinite(out.logits).all()
    state = cache.layers[1].state
    assert cache.seen_tokens == 1 << 20
    assert state.M.dtype == torch.float32 and torch.isfinite(state.M).all() and torch.isfinite(state.z).all()


@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("q_start,T,window_chunks,earlier",
                         [(0, 37, 2, 0), (0, 11, 2, 0), (24, 16, 2, 0), (5, 30, 2, 0), (23, 1, 2, 0), (40, 9, 2, 0), (13, 70, 4, 1), (9, 50, 3, 2)])
def test_local_attention_equals_a_naive_masked_softmax(q_start, T, window_chunks, earlier, sinks):
    """Block-sliding window (+ the first ``sinks`` tokens of the stream) ≡ one softmax over all keys with a mask;
    the keys given may start ``earlier`` chunks before the first query's window (as a cache holds them)."""
    from senri.model.modeling_senri import explicit_local_attention, local_attention

    C = 4
    k_start = max(0, (q_start // C - window_chunks - earlier) * C)
    g = torch.Generator().manual_seed(6)
    L = q_start + T  # every key from position 0; the fast path gets the window's and the sinks'
    q, k, v = torch.randn(2, 4, T, 8, generator=g), torch.randn(2, 2, L, 8, generator=g), torch.randn(2, 2, L, 8, generator=g)
    sink_k, sink_v = (k[:, :, :sinks], v[:, :, :sinks]) if sinks else (None, None)
    fast = local_attention(q, k[:, :, k_start:], v[:, :, k_start:], q_start, k_start, 8**-0.5, C, window_chunks,
                           sink_k, sink_v)
    q_pos, k_pos = torch.arange(q_start, q_start + T), torch.arange(L)
    allowed = (k_pos[None] <= q_pos[:, None]) & (
        (k_pos[None] >= ((q_pos // C - window_chunks) * C)[:, None]) | (k_pos[None] < sinks)
    )

    def weights_of(q, k=k):
        scores = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) * 8**-0.5
        return scores.masked_fill(~allowed, float("-inf")).softmax(-1)

    weights = weights_of(q)
    naive = weights @ v.repeat_interleave(2, dim=1)
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-5)
    # With gradients the grouped path takes larger blocks (BLOCK_CHUNKS); same result, and gradients flow.
    q_grad, k_grad, v_grad = (t.clone().requires_grad_() for t in (q, k, v))
    sinks_grad = (k_grad[:, :, :sinks], v_grad[:, :, :sinks]) if sinks else (None, None)
    trained = local_attention(q_grad, k_grad[:, :, k_start:], v_grad[:, :, k_start:], q_start, k_start, 8**-0.5, C,
                              window_chunks, *sinks_grad)
    torch.testing.assert_close(trained, naive, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(trained.square().sum(), (q_grad, k_grad, v_grad))
    naive_trained = weights_of(q_grad, k_grad) @ v_grad.repeat_interleave(2, dim=1)
    naive_grads = torch.autograd.grad(naive_trained.square().sum(), (q_grad, k_grad, v_grad))
    for grad, naive_grad in zip(grads, naive_grads):
        torch.testing.assert_close(grad, naive_grad, rtol=1e-4, atol=1e-5)
    # The explicit path (output_attentions) gives the same output and these weights over positions 0..q_start+T-1.
    explicit, explicit_weights = explicit_local_attention(
        q, k[:, :, k_start:], v[:, :, k_start:], q_start, k_start, 8**-0.5, C, window_chunks, sink_k, sink_v
    )
    torch.testing.assert_close(explicit, naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(explicit_weights, weights, rtol=1e-5, atol=1e-6)
    # The FlexAttention path (CUDA's; eager here) applies the same rule through its block mask.
    import warnings

    from senri.model.modeling_senri import flex_local_attention

    if T > 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
            flex = flex_local_attention(q, k[:, :, k_start:], v[:, :, k_start:], q_start, k_start, 8**-0.5, C,
                                        window_chunks, sink_k, sink_v)
        torch.testing.assert_close(flex, naive, rtol=1e-5, atol=1e-5)


def test_a_flex_attention_that_fails_falls_back_to_the_one_sdpa_call(monkeypatch):
    import senri.model.modeling_senri as modeling

    g = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(1, 4, 30, 8, generator=g), torch.randn(1, 2, 30, 8, generator=g), torch.randn(1, 2, 30, 8, generator=g)
    expected = modeling.local_attention(q, k, v, 0, 0, 8**-0.5, 4, 2)

    def unavailable(*args):
        raise RuntimeError("no triton here")

    monkeypatch.setattr(modeling, "LOCAL_ATTENTION_BACKEND", "flex")
    monkeypatch.setattr(modeling, "flex_local_attention", unavailable)
    monkeypatch.setattr(modeling, "_FLEX", {})
    assert torch.equal(modeling.local_attention(q, k, v, 0, 0, 8**-0.5, 4, 2), expected)
    assert "failed" in modeling._FLEX


def test_gate_clamp_passes_gradient_at_zero_and_only_inward_outside():
    from senri.model.modeling_senri import gate_clamp

    x = torch.tensor([0.0, 0.5, 1.0, -0.2, -0.2, 1.3, 1.3], requires_grad=True)
    grad = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0])
    (gate_clamp(x) * grad).sum().backward()
    assert torch.equal(gate_clamp(x).detach(), x.detach().clamp(0, 1))
    # descent x -= lr * grad: -0.2 with grad -1 moves up (kept), with +1 would move further out (dropped)
    assert x.grad.tolist() == [1.0, 1.0, -1.0, -1.0, 0.0, 1.0, -0.0]


def test_config_roundtrip_keeps_layer_types_and_loads_as_a_plain_transformers_config(tmp_path):
    from transformers import AutoConfig, PreTrainedConfig

    config = tiny_config(layer_types=["memory_only", "memory", "full_attention"], memory_update="linear")
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(again, SenriConfig) and again.layer_types == config.layer_types
    assert again.memory_update == "linear" and again.chunk_size == 4
    # transformers' Trainer reads a checkpoint's config as a plain PreTrainedConfig when resuming.
    assert PreTrainedConfig.from_json_file(str(tmp_path / "config.json")).transformers_version


def test_decoding_rotates_only_new_keys_and_a_restored_state_recomputes_the_window_rotation():
    """Local layers keep their window's keys rotated (RoPE is absolute), so a step rotates only its own tokens; the
    kept rotation equals rotating the raw window keys, it is what attention uses, and a state without it (restored
    from disk) gives the same logits."""
    from dataclasses import replace

    from senri.model.modeling_senri import rope

    model = tiny_model()
    ids = torch.randint(0, 97, (2, 60), generator=torch.Generator().manual_seed(3))
    cache = SenriCache(model.config, 2)
    with torch.no_grad():
        model(input_ids=ids[:, :41], cache=cache, use_cache=True)
        state = cache.layer_state(0)
        positions = torch.arange(state.window_start, state.seen_tokens)[None]
        cos, sin = model.model.rotary_emb(state.keys, positions)
        torch.testing.assert_close(state.rotated_keys, rope(state.keys, cos, sin), rtol=0, atol=0)
        assert model.model.layers[0].self_attn.first_position_to_rotate(state) == 41
        assert cache.layer_state(1).rotated_keys.shape == cache.layer_state(1).keys.shape

        restored = SenriCache.from_memory_state(model.config, cache.get_memory_state(include_window=True))
        assert restored.layer_state(0).rotated_keys is None
        assert model.model.layers[0].self_attn.first_position_to_rotate(restored.layer_state(0)) == 41 - 17
        expected = model(input_ids=ids[:, 41:], cache=restored, use_cache=True).logits
        poisoned = SenriCache.from_memory_state(model.config, cache.get_memory_state(include_window=True))
        for idx in range(3):
            poisoned.set_layer_state(idx, replace(cache.layer_state(idx)))
        for step in range(41, 60):
            logits = model(input_ids=ids[:, step : step + 1], cache=cache, use_cache=True).logits
            torch.testing.assert_close(logits[:, 0], expected[:, step - 41], rtol=0, atol=1e-5)
        # The kept rotation is really what attention reads: corrupt it and the output changes.
        bad = poisoned.layer_state(0)
        poisoned.set_layer_state(0, replace(bad, rotated_keys=torch.zeros_like(bad.rotated_keys)))
        wrong = model(input_ids=ids[:, 41:42], cache=poisoned, use_cache=True).logits
        assert (wrong[:, 0] - expected[:, 0]).abs().max() > 1e-4  # 10x the tolerance the equal paths meet


def test_memory_qk_maps_start_as_identity_then_change_the_memory_path_and_stream_exactly(tmp_path):
    """memory_qk_map adds identity-initialised per-KV-head maps of the memory's q and k: at start the model computes
    exactly what the same weights without maps compute; moved, they change the output beyond the window only; the
    model still streams like one pass and the maps survive save_pretrained / from_pretrained bit-exact."""
    plain = tiny_model(num_sink_tokens=4)
    mapped = SenriForCausalLM(tiny_config(num_sink_tokens=4, memory_qk_map=True)).eval()
    missing = mapped.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["model.layers.1.self_attn.memory_key_map", "model.layers.1.self_attn.memory_query_map"]
    ids = torch.randint(0, 97, (2, 120), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(mapped(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
        attn = mapped.model.layers[1].self_attn
        attn.memory_query_map.add_(0.1 * torch.randn_like(attn.memory_query_map))
        attn.memory_key_map.add_(0.1 * torch.randn_like(attn.memory_key_map))
        moved = mapped(input_ids=ids).logits
        assert torch.equal(moved[:, :20], plain(input_ids=ids).logits[:, :20])  # nothing in memory yet
        assert (moved[:, 40:] - plain(input_ids=ids).logits[:, 40:]).abs().max() > 1e-4
        streamed, _ = _stream(mapped, ids, [7, 1, 33, 79])
    torch.testing.assert_close(streamed, moved, rtol=0, atol=1e-5)
    mapped.save_pretrained(tmp_path)
    again = SenriForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(again.model.layers[1].self_attn.memory_key_map, attn.memory_key_map)
    assert torch.equal(again.model.layers[1].self_attn.memory_query_map, attn.memory_query_map)


def test_compiled_flex_attention_matches_sdpa_and_does_not_recompile_per_offset_or_length(monkeypatch):
    """The compiled FlexAttention path (CUDA's; compiled here on the CPU) equals the SDPA path for several offsets
    (stream pieces) and lengths, and its number of compiled graphs stops growing once each size has varied once
    (automatic dynamic shapes): an int offset in the mask would recompile per piece, and past torch's recompile
    limit flex_attention falls back to its eager, full-matrix form."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import senri.model.modeling_senri as modeling

    pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setattr(modeling, "_FLEX", {})
    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(3)
    C, W, S = 8, 2, 2
    graphs = []
    for q_start, T in ((0, 48), (16, 48), (40, 32), (72, 64), (96, 40), (120, 56), (200, 24), (304, 72)):
        k_start = max(0, (q_start // C - W) * C)
        q = torch.randn(1, 4, T, 8, generator=g)
        k, v = (torch.randn(1, 2, q_start + T - k_start, 8, generator=g) for _ in range(2))
        sink_k, sink_v = (torch.randn(1, 2, S, 8, generator=g) for _ in range(2))
        monkeypatch.setattr(modeling, "LOCAL_ATTENTION_BACKEND", "sdpa")
        expected = modeling.local_attention(q, k, v, q_start, k_start, 8**-0.5, C, W, sink_k, sink_v)
        monkeypatch.setattr(modeling, "LOCAL_ATTENTION_BACKEND", "flex-compiled")
        got = modeling.local_attention(q, k, v, q_start, k_start, 8**-0.5, C, W, sink_k, sink_v)
        assert "failed" not in modeling._FLEX, modeling._FLEX.get("failed")
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[3] <= 4, graphs  # new offsets and lengths after the fourth piece: no new graph
