"""Memory variants (multi, hierarchical, routed, banks, ALiBi), SVD cleaning, presets, Qwen2 conversion.

Each variant keeps DESIGN.md's invariants (reference equality, streaming ≡ one pass, constant state, transfer) and
shows its own semantics; the variants are defined in SenriConfig's docstring.
"""

from __future__ import annotations

import pytest
import torch

from senri import SenriCache, SenriConfig, SenriForCausalLM, load_memory_state, save_memory_state
from senri.model.memory import (
    MemoryLayout,
    alibi_decay,
    empty_memory,
    memory_attention,
    phi,
    read_slots,
    reference_slotted_memory_attention,
    slotted_memory_attention,
    write_slots,
)
from tests.conftest import tiny_config, tiny_model


def _streamed_cache(model, T=120):
    cache = SenriCache(model.config, batch_size=2)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(0)),
              cache=cache, use_cache=True)
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
        a = model(input_ids=nxt, cache=cache, use_cache=True).logits
        b = model(input_ids=nxt, cache=restored, use_cache=True).logits
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
        parts = [model(input_ids=ids[:, s : s + 7], cache=cache, use_cache=True).logits for s in range(0, 40, 7)]
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
        first = [model(input_ids=ids[:, s : s + 13], cache=cache, use_cache=True).logits for s in range(0, 91, 13)]
        restored = SenriCache.from_memory_state(model.config, cache.get_memory_state(include_window=True))
        rest = model(input_ids=ids[:, 91:], cache=restored, use_cache=True).logits
    torch.testing.assert_close(torch.cat(first + [rest], 1), one, rtol=0, atol=1e-5)
    plain = tiny_model(memory_update=update)
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=ids).logits[:, -1], one[:, -1])


# --- memory variants: multi, hierarchical, routed, banks (SenriConfig's docstring defines them) -------------------

LAYOUTS = {
    "multi": MemoryLayout("multi", 3, num_memories=3),
    "hierarchical+banks": MemoryLayout("hierarchical", 4, num_memories=2, num_banks=2, segments_per_bank=2),
    "routed": MemoryLayout("routed", 8, top_k=3),
    "banks": MemoryLayout("multi", 2, num_banks=2, segments_per_bank=3),
    "multi-mean": MemoryLayout("multi", 3, num_memories=3, relevance="mean"),
    "hierarchical+banks-mean": MemoryLayout("hierarchical", 4, num_memories=2, num_banks=2, segments_per_bank=2,
                                            relevance="mean"),
}
VARIANTS = {
    "multi": dict(memory_type="multi", num_memories=3),
    "hierarchical": dict(memory_type="hierarchical", num_memories=2),
    "routed": dict(memory_type="routed", top_k_memories=3),
    "banks": dict(num_memory_banks=2, segments_per_bank=3),
    "multi+banks+alibi": dict(memory_type="multi", num_memories=2, num_memory_banks=2, segments_per_bank=2,
                              use_alibi=True, alibi_scale=4.0),
    "hierarchical-mean": dict(memory_type="hierarchical", num_memories=3, memory_relevance="mean"),
}


def _qkv(T, seed=0, B=2, Hq=4, H=2, D=8, gate=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64).requires_grad_() for h in (Hq, H, H))
    expansion = torch.rand(B, Hq, T, generator=g, dtype=torch.float64).requires_grad_() if gate else None
    return q, k, v, expansion


def _slotted(q, k, v, layout, C, window_chunks, update, pieces, intra=False, decay=None, expansion=None, sinks=0):
    """The fast path as the model drives it, fed in pieces (the keys not yet in memory carried along)."""
    B, _, T, D = q.shape
    M, z = (t.double() for t in empty_memory(B, k.shape[1], D, num_slots=layout.num_slots))
    outputs, start, written = [], 0, 0
    for n in pieces:
        end = start + n
        new_written = max(written, (end - 1) // C - window_chunks)
        gate = None if expansion is None else expansion[:, :, start:end]
        out, M, z = slotted_memory_attention(
            q[:, :, start:end], k[:, :, written * C : end], v[:, :, written * C : end], M, z, start, written,
            new_written, C, window_chunks, update, 1e-6, layout, intra, decay, gate, num_sink_tokens=sinks,
        )
        outputs.append(out)
        start, written = end, new_written
    return torch.cat(outputs, dim=2), M, z


@pytest.fixture
def float64_memory(monkeypatch):
    # The reference runs in float64 so that differences are the algorithm's, not rounding's.
    monkeypatch.setattr("senri.model.memory.MEMORY_DTYPE", torch.float64)


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("update", ["delta", "linear"])
@pytest.mark.parametrize("window_chunks,intra,pieces,sinks", [
    (2, False, [5, 1, 1, 9, 3, 10], 0), (2, False, [2, 1, 9, 3, 14], 3), (0, True, [1] * 12 + [5, 6], 0),
])
def test_slotted_memory_equals_naive_loop_outputs_state_and_gradients(float64_memory, name, update, window_chunks,
                                                                      intra, pieces, sinks):
    layout = LAYOUTS[name]
    q, k, v, expansion = _qkv(sum(pieces), gate=layout.read == "hierarchical")
    decay = alibi_decay(2, scale=4.0).double() if update == "delta" else None
    fast, M_fast, z_fast = _slotted(q, k, v, layout, 4, window_chunks, update, pieces, intra, decay, expansion, sinks)
    slow, M_slow, z_slow = reference_slotted_memory_attention(q, k, v, 4, window_chunks, update, 1e-6, layout, intra,
                                                              decay, expansion, num_sink_tokens=sinks)
    for a, b in ((fast, slow), (M_fast, M_slow), (z_fast, z_slow)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    inputs = (q, k, v) + (() if expansion is None else (expansion,))
    weights = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * weights).sum() + M_fast.sum() + z_fast.sum(), inputs)
    grads_slow = torch.autograd.grad((slow * weights).sum() + M_slow.sum() + z_slow.sum(), inputs)
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_routing_writes_a_key_only_to_the_memory_of_its_largest_coordinate():
    layout = LAYOUTS["routed"]
    k = torch.randn(2, 2, 4, 8, generator=torch.Generator().manual_seed(1))
    k[0, 0, :, :] = 0.1
    k[0, 0, :, 5] = -3.0  # every key of (batch 0, head 0) has its largest |k_i| at i = 5 (negative sign)
    v = torch.randn(2, 2, 4, 8)
    M, z = write_slots(k, v, layout.slots(0, k), *empty_memory(2, 2, 8, num_slots=8), "linear", 1e-6)
    touched = z.abs().sum(-1) > 0  # (B, H, S)
    expected = torch.nn.functional.one_hot(k.abs().argmax(-1), 8).sum(2) > 0
    assert torch.equal(touched, expected) and torch.equal(M.abs().sum((-1, -2)) > 0, expected)
    assert touched[0, 0].nonzero().flatten().tolist() == [5]
    sk = torch.nn.functional.elu(k[0, 0]) + 1
    torch.testing.assert_close(M[0, 0, 5], sk.T @ v[0, 0])  # exactly Σ φ(k) ⊗ v of its keys


def test_routed_query_reads_only_its_top_k_bases_softmax_weighted_by_abs_q():
    layout = MemoryLayout("routed", 8, top_k=2)
    g = torch.Generator().manual_seed(2)
    M, z = torch.rand(1, 1, 8, 8, 8, generator=g), torch.rand(1, 1, 8, 8, generator=g)
    q = torch.zeros(1, 1, 1, 8)
    q[..., 3], q[..., 6] = -2.0, 1.0  # the two largest |q_i|: bases 3 and 6
    out = read_slots(q, M, z, layout, 1e-6)
    M_poisoned, z_poisoned = M.clone(), z.clone()
    others = [i for i in range(8) if i not in (3, 6)]
    M_poisoned[:, :, others], z_poisoned[:, :, others] = 1e6, 1e-3
    torch.testing.assert_close(read_slots(q, M_poisoned, z_poisoned, layout, 1e-6), out)
    sq = torch.nn.functional.elu(q[0, 0, 0]) + 1
    reads = {i: (sq @ M[0, 0, i]) / (sq @ z[0, 0, i] + 1e-6) for i in (3, 6)}
    w3, w6 = torch.softmax(torch.tensor([2.0, 1.0]), 0)
    torch.testing.assert_close(out[0, 0, 0], w3 * reads[3] + w6 * reads[6])


def _slot_written_per_chunk(config_overrides, chunks=14):
    """Feed a one-memory-layer model one chunk at a time; return which memory's z changed at each written chunk."""
    model = tiny_model(num_hidden_layers=1, layer_types=["memory"], **config_overrides)
    cache, changed = SenriCache(model.config, 1), []
    ids = torch.randint(0, 97, (1, 4 * (chunks + 5)), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for start in range(0, ids.shape[1], 4):
            before = cache.layers[0].state
            model(input_ids=ids[:, start : start + 4], cache=cache, use_cache=True)
            after = cache.layers[0].state
            if after.written_chunks > before.written_chunks:
                assert after.written_chunks == before.written_chunks + 1
                old = torch.zeros_like(after.z) if before.z is None else before.z
                changed.append((after.z - old).abs().sum(-1)[0, 0].nonzero().flatten().tolist())
    return changed


@pytest.mark.parametrize(
    "overrides,slot_of_chunk",
    [
        (dict(memory_type="multi", num_memories=3), lambda j: j % 3),  # round robin
        (dict(num_memory_banks=2, segments_per_bank=3), lambda j: (j // 3) % 2),  # next bank after 3 segments
        (dict(memory_type="multi", num_memories=2, num_memory_banks=3, segments_per_bank=4),
         lambda j: 2 * ((j // 4) % 3) + j % 2),  # round robin inside the bank
    ],
)
def test_segments_go_round_robin_and_banks_switch_after_segments_per_bank(overrides, slot_of_chunk):
    changed = _slot_written_per_chunk(overrides)
    assert changed == [[slot_of_chunk(j)] for j in range(len(changed))] and len(changed) >= 14


def test_alibi_decays_every_memory_by_segment_distance_exactly(float64_memory):
    layout = LAYOUTS["hierarchical+banks"]  # 4 memories: chunk j goes to 2 * ((j // 2) % 2) + j % 2
    k, v = torch.randn(1, 2, 6, 4, 8, dtype=torch.float64), torch.randn(1, 2, 6, 4, 8, dtype=torch.float64)
    decay = alibi_decay(2, scale=2.0).double()
    M, z = (t.double() for t in empty_memory(1, 2, 8, num_slots=4))
    for j in range(6):
        M, z = write_slots(k[:, :, j], v[:, :, j], layout.slots(j, k[:, :, j]), M, z, "linear", 1e-6, decay)
    sk = torch.nn.functional.elu(k) + 1
    for i in range(4):
        # Each memory is the explicit sum of its segments, weighted exp(-slope_h * (number of segments written after)).
        segments = [j for j in range(6) if layout.segment_slot(j) == i]
        expected_M = sum(decay[:, None, None] ** (5 - j) * sk[:, :, j].transpose(-1, -2) @ v[:, :, j] for j in segments)
        expected_z = sum(decay[:, None] ** (5 - j) * sk[:, :, j].sum(2) for j in segments)
        torch.testing.assert_close(M[:, :, i], expected_M)
        torch.testing.assert_close(z[:, :, i], expected_z)


def test_hierarchical_reads_the_coarse_sum_at_gate_zero_and_the_multi_mix_at_gate_one(float64_memory):
    q, k, v, _ = _qkv(41)
    C, window_chunks, pieces = 4, 2, [41]
    # Gate 0: the coarse memory Σ_i M_i, which under the linear rule is exactly the single memory.
    hierarchical = MemoryLayout("hierarchical", 3, num_memories=3)
    zero, one = torch.zeros(2, 4, 41, dtype=torch.float64), torch.ones(2, 4, 41, dtype=torch.float64)
    coarse, M, z = _slotted(q, k, v, hierarchical, C, window_chunks, "linear", pieces, expansion=zero)
    single, M_single, z_single = memory_attention(q, k, v, *(t.double() for t in empty_memory(2, 2, 8)), 0, 0,
                                                  (41 - 1) // C - window_chunks, C, window_chunks, "linear", 1e-6)
    torch.testing.assert_close(coarse, single)
    torch.testing.assert_close(M.sum(2), M_single)
    torch.testing.assert_close(z.sum(2), z_single)
    fine, _, _ = _slotted(q, k, v, hierarchical, C, window_chunks, "delta", pieces, expansion=one)
    multi, _, _ = _slotted(q, k, v, MemoryLayout("multi", 3, num_memories=3), C, window_chunks, "delta", pieces)
    torch.testing.assert_close(fine, multi)


def test_mean_relevance_weighs_memories_by_content_not_by_how_much_they_hold():
    """"mass" relevance φ(q)·z_i prefers the fuller memory; "mean" relevance (divided by Σz_i) is unchanged when a
    memory holds the same keys many times over, and a memory nothing was written to takes no share."""
    D = 4
    q = torch.tensor([[[[1.0, -1.0, 0.5, 0.0]]]])  # (B, H, R, D)
    k_a, k_b = torch.randn(2, D, generator=torch.Generator().manual_seed(0))
    v_a, v_b = torch.eye(D)[0], torch.eye(D)[1]
    M, z = empty_memory(1, 1, D, num_slots=3)
    for slot, key, value, copies in ((0, k_a, v_a, 1), (1, k_b, v_b, 1)):
        M[0, 0, slot] += copies * torch.outer(phi(key), value)
        z[0, 0, slot] += copies * phi(key)
    mean, mass = (MemoryLayout("multi", 3, num_memories=3, relevance=r) for r in ("mean", "mass"))
    read_mean, read_mass = read_slots(q, M, z, mean, 1e-6), read_slots(q, M, z, mass, 1e-6)
    # Memory 1 written 50 times over: its mean relevance (so the mix) is the same, its mass relevance is not.
    M_full, z_full = M.clone(), z.clone()
    M_full[0, 0, 1] *= 50
    z_full[0, 0, 1] *= 50
    torch.testing.assert_close(read_slots(q, M_full, z_full, mean, 1e-6), read_mean)
    assert read_slots(q, M_full, z_full, mass, 1e-6)[..., 1] > read_mass[..., 1] + 0.1
    # The empty memory 2 takes no weight: the read is the two-memory softmax mix over a_i = (v_a, v_b).
    sq = phi(q[0, 0, 0])
    r = torch.stack([sq @ phi(k_a) / phi(k_a).sum(), sq @ phi(k_b) / phi(k_b).sum()])
    torch.testing.assert_close(read_mean[0, 0, 0], r.softmax(0) @ torch.stack([v_a, v_b]))


def _variant_model(name, memory_only=False, **overrides):
    layer_types = ["memory_only", "memory", "sliding_attention"] if memory_only else None
    fields = dict(VARIANTS[name], **overrides)
    if layer_types:
        fields["layer_types"] = layer_types
    return tiny_model(**fields)


@pytest.mark.parametrize("memory_only,sinks", [(False, 0), (False, 4), (True, 0), (True, 4)])
@pytest.mark.parametrize("name", VARIANTS)
def test_variant_streams_like_one_pass_with_constant_state_and_transfers(tmp_path, name, memory_only, sinks):
    """Streaming in pieces (1-token steps included) ≡ one pass; cache bytes stop growing; a state saved to disk and
    loaded into a new cache continues identically (with and without attention sinks)."""
    model = _variant_model(name, memory_only, num_sink_tokens=sinks)
    ids = torch.randint(0, 97, (2, 120), generator=torch.Generator().manual_seed(4))
    cache, logits, sizes = SenriCache(model.config, 2), [], []
    with torch.no_grad():
        one_pass = model(input_ids=ids).logits
        for start in range(45):
            logits.append(model(input_ids=ids[:, start : start + 1], cache=cache, use_cache=True).logits)
            sizes.append(cache.nbytes())
        for start in range(45, 85, 13):
            end = min(start + 13, 85)
            logits.append(model(input_ids=ids[:, start:end], cache=cache, use_cache=True).logits)
        path = save_memory_state(cache.get_memory_state(include_window=True), tmp_path / "state.pt")
        restored = SenriCache.from_memory_state(model.config, load_memory_state(path))
        logits.append(model(input_ids=ids[:, 85:86], cache=restored, use_cache=True).logits)
        logits.append(model(input_ids=ids[:, 86:], cache=restored, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), one_pass, rtol=0, atol=1e-5)
    assert max(sizes[30:]) == max(sizes[:30])  # window (16) + chunk (4) tokens, then the memory: no growth after


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_survives_save_pretrained_and_from_pretrained(tmp_path, name):
    """A saved variant loads back (transformers builds it on the meta device first) and computes the same logits
    beyond the window, in eval mode (routed: its inference memories)."""
    model = _variant_model(name, memory_only=True).eval()
    ids = torch.randint(0, 97, (1, 100), generator=torch.Generator().manual_seed(5))
    model.save_pretrained(tmp_path)
    loaded = SenriForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.memory_type == model.config.memory_type and loaded.config.use_alibi == model.config.use_alibi
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_trains_gradient_reaches_token_zero_through_memory(name):
    """In train mode a gradient flows through memory writes: the last token's loss depends on token 0, which three
    layers of 20-token windows cannot reach (150 tokens)."""
    model = _variant_model(name).train()
    ids = torch.randint(0, 97, (1, 150), generator=torch.Generator().manual_seed(5))
    embeds = model.model.embed_tokens(ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeds).logits
    torch.nn.functional.cross_entropy(logits[0, -1:], ids[0, -1:]).backward()
    assert embeds.grad[0, 0].abs().sum() > 0
    attention = model.model.layers[1].self_attn
    assert attention.memory_gate.grad.abs().sum() > 0 and attention.k_proj.weight.grad.abs().sum() > 0
    if name == "hierarchical":
        assert attention.memory_expansion_weight.grad.abs().sum() > 0
        assert attention.memory_expansion_bias.grad.abs().sum() > 0


def test_routed_is_the_single_memory_in_training_and_refuses_a_state_of_the_other_mode():
    routed, single = tiny_model(memory_type="routed", top_k_memories=3), tiny_model()
    ids = torch.randint(0, 97, (1, 90), generator=torch.Generator().manual_seed(6))
    routed.train(), single.train()
    with torch.no_grad():
        torch.testing.assert_close(routed(input_ids=ids).logits, single(input_ids=ids).logits, rtol=0, atol=0)
        train_cache = SenriCache(routed.config, 1)
        routed(input_ids=ids, cache=train_cache, use_cache=True)
        assert train_cache.layers[1].state.M.shape == (1, 2, 8, 8)
        routed.eval()
        assert not torch.allclose(routed(input_ids=ids).logits[:, -1], single(input_ids=ids).logits[:, -1])
        with pytest.raises(RuntimeError, match="layer 1: the cache holds a single memory.*eval mode.*not valid"):
            routed(input_ids=ids[:, :5], cache=train_cache, use_cache=True)
        assert train_cache.seen_tokens == 90 and all(layer.state.seen_tokens == 90 for layer in train_cache.layers)
        eval_cache = SenriCache(routed.config, 1)
        routed(input_ids=ids, cache=eval_cache, use_cache=True)
        assert eval_cache.layers[1].state.M.shape == (1, 2, 8, 8, 8)
        # Both shapes are valid states of a routed model; each continues only in its own mode.
        transferred = SenriCache.from_memory_state(routed.config, train_cache.get_memory_state(include_window=True))
        routed.train()
        routed(input_ids=ids[:, :5], cache=transferred, use_cache=True)
        with pytest.raises(RuntimeError, match="holds 8 memories.*training mode"):
            routed(input_ids=ids[:, :5], cache=eval_cache, use_cache=True)


def test_multi_memory_states_are_checked_on_transfer():
    model = _variant_model("multi")
    cache = SenriCache(model.config, 1)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 97, (1, 60)), cache=cache, use_cache=True)
    state = cache.get_memory_state(include_window=True)
    with pytest.raises(ValueError, match="num_memories: state has 3, model has 2"):
        SenriCache.from_memory_state(tiny_config(memory_type="multi", num_memories=2), state)
    state["layers"]["1"]["z"] = state["layers"]["1"]["z"][:, :, :2]
    with pytest.raises(ValueError, match=r"layer 1 z has shape \(1, 2, 2, 8\), expected \(1, 2, 3, 8\)"):
        SenriCache.from_memory_state(model.config, state)


@pytest.mark.parametrize("name", ["multi", "routed"])
def test_svd_cleaning_of_several_memories_reports_each_and_keeps_empty_ones_empty(name):
    model = _variant_model(name)
    cache = _streamed_cache(model, T=40)  # 5 chunks written: some memories are still empty
    S = cache.layers[1].state.M.shape[2]
    stats = cache.svd_clean(energy_threshold=0.9, max_rank=3)[1]
    assert stats["retained_rank"].shape == (2, 2, S) and stats["singular_values"].shape == (2, 2, S, 8)
    empty = stats["original_rank"] == 0
    assert empty.any() if name == "routed" else not empty.any()
    assert (stats["retained_rank"][empty] == 0).all() and (stats["energy_retained"][empty] == 1).all()
    assert (stats["retained_rank"] <= 3).all()
    capped = stats["retained_rank"] == 3
    assert (stats["energy_retained"][~capped & ~empty] >= 0.9 - 1e-6).all()
    assert (torch.linalg.matrix_rank(cache.layers[1].state.M) <= stats["retained_rank"]).all()


def test_bad_variant_configs_raise_errors_naming_the_problem():
    with pytest.raises(ValueError, match="memory_type = 'mutli' is unknown.*did you mean 'multi'"):
        tiny_config(memory_type="mutli")
    with pytest.raises(ValueError, match="num_memories must be a positive integer, got 0"):
        tiny_config(memory_type="multi", num_memories=0)
    with pytest.raises(ValueError, match=r"top_k_memories \(9\) must be <= head_dim \(8\)"):
        tiny_config(memory_type="routed", top_k_memories=9)
    with pytest.raises(ValueError, match="num_memory_banks = 2 is not supported with memory_type='routed'"):
        tiny_config(memory_type="routed", num_memory_banks=2)


@pytest.mark.parametrize("name", ["hierarchical", "multi", "routed"])
def test_variants_convert_from_llama_and_equal_the_source_within_the_window(name):
    from transformers import LlamaConfig, LlamaForCausalLM

    from senri import convert_llama_to_senri

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    senri = convert_llama_to_senri(llama, sliding_window=16, chunk_size=4, layer_types=["memory", "sliding_attention"],
                                   **VARIANTS[name])
    ids = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(senri(input_ids=ids).logits, llama(ids).logits, rtol=0, atol=1e-4)


def test_seed_presets_have_the_seed_shapes_and_take_overrides():
    smol = SenriConfig.smollm_135m()
    assert (smol.intermediate_size, smol.vocab_size, smol.rope_parameters["rope_theta"]) == (1536, 49152, 10000.0)
    assert smol.tie_word_embeddings and (smol.sliding_window, smol.chunk_size) == (1024, 64)
    assert SenriConfig.smollm_135m(memory_type="multi", sliding_window=512).sliding_window == 512
    pythia = SenriConfig.pythia_70m()
    assert (pythia.num_attention_heads, pythia.intermediate_size, pythia.memory_layers) == (8, 2048, [0])
    assert pythia.layer_types[1:] == ["sliding_attention"] * 5
    japanese = SenriConfig.japanese()
    assert japanese.vocab_size == 52000 and japanese.tokenizer_name == "cyberagent/open-calm-small"
    assert japanese.layer_types[0] == "memory_only" and japanese.hidden_size == 512
    assert SenriConfig.full_attention_baseline(num_hidden_layers=2).layer_types == ["full_attention"] * 2


def test_memory_only_presets_stream_like_one_pass_with_variants():
    for preset in (SenriConfig.pythia_70m, SenriConfig.japanese):
        config = preset(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                        vocab_size=61, num_hidden_layers=3, layer_types=["memory_only", "sliding_attention", "memory"],
                        sliding_window=8, chunk_size=4, memory_type="hierarchical", num_memories=2)
        torch.manual_seed(0)
        model = SenriForCausalLM(config).eval()
        ids = torch.randint(0, 61, (1, 50))
        with torch.no_grad():
            one = model(input_ids=ids).logits
            cache = SenriCache(config, 1)
            parts = [model(input_ids=ids[:, s : s + 3], cache=cache, use_cache=True).logits
                     for s in range(0, 50, 3)]
        torch.testing.assert_close(torch.cat(parts, 1), one, rtol=0, atol=1e-5)


def test_japanese_tokenizer_error_is_clear_without_the_hub(monkeypatch):
    from transformers import AutoTokenizer

    from senri.model.configuration_senri import load_japanese_tokenizer

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(OSError, match="cannot load the Japanese tokenizer 'cyberagent/open-calm-small'.*not reachable"):
        load_japanese_tokenizer()
