"""The chunked memory path equals a naive token loop: outputs, final state and every gradient."""

from __future__ import annotations

import pytest
import torch

from senri.model.memory import (
    ELU, FeatureMap, alibi_decay, dpfp, empty_memory, memory_attention, memory_states, reference_memory_attention,
)


def _inputs(T: int, seed: int = 0, B: int = 2, Hq: int = 4, H: int = 2, D: int = 8):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64).requires_grad_() for h in (Hq, H, H))
    return q, k, v


def _chunked(q, k, v, C, window_chunks, update, pieces=None, intra=False, decay=None, sinks=0, features=ELU):
    """The fast path as the model drives it, fed in pieces (the keys not yet in memory carried along)."""
    B, _, T, D = q.shape
    M, z = empty_memory(B, k.shape[1], D, feature_dim=features.dim(D))
    M, z = M.double(), z.double()
    pieces = pieces or [T]
    outputs, start, written = [], 0, 0
    for n in pieces:
        end = start + n
        new_written = max(written, (end - 1) // C - window_chunks)
        out, M, z = memory_attention(
            q[:, :, start:end], k[:, :, written * C : end], v[:, :, written * C : end], M, z, start, written,
            new_written, C, window_chunks, update, 1e-6, intra_chunk=intra, decay=decay, num_sink_tokens=sinks,
            feature_map=features,
        )
        outputs.append(out)
        start, written = end, new_written
    return torch.cat(outputs, dim=2), M, z


def _reference(q, k, v, C, window_chunks, update, intra=False, decay=None, sinks=0, features=ELU):
    out, M, z = reference_memory_attention(
        q, k, v, C, window_chunks, update, 1e-6, intra_chunk=intra, decay=decay, num_sink_tokens=sinks,
        feature_map=features,
    )
    return out, M, z


@pytest.fixture(autouse=True)
def _float64(monkeypatch):
    # The reference runs in float64 so that differences are the algorithm's, not rounding's.
    monkeypatch.setattr("senri.model.memory.MEMORY_DTYPE", torch.float64)


@pytest.mark.parametrize("update", ["linear", "delta"])
# memory_only layers (intra) have no window, hence no attention sinks; windowed memory layers with 0 and 3 sinks.
@pytest.mark.parametrize("window_chunks,intra,sinks", [(2, False, 0), (2, False, 3), (0, True, 0)])
@pytest.mark.parametrize("pieces", [None, [5, 1, 1, 9, 3, 18], [1] * 37])
@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("features", [ELU, FeatureMap("dpfp", 2)], ids=["elu", "dpfp2"])
def test_chunked_equals_naive_loop_outputs_state_and_gradients(update, window_chunks, intra, sinks, pieces, alibi,
                                                               features):
    T, C = 37, 4
    q, k, v = _inputs(T)
    decay = alibi_decay(2, scale=4.0).double() if alibi else None
    fast, M_fast, z_fast = _chunked(q, k, v, C, window_chunks, update, pieces, intra, decay, sinks, features)
    slow, M_slow, z_slow = _reference(q, k, v, C, window_chunks, update, intra, decay, sinks, features)
    assert M_fast.shape[-2:] == (features.dim(8), 8) and z_fast.shape[-1] == features.dim(8)
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(M_fast, M_slow, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(z_fast, z_slow, rtol=1e-9, atol=1e-9)
    weights = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * weights).sum() + M_fast.sum() + z_fast.sum(), (q, k, v))
    grads_slow = torch.autograd.grad((slow * weights).sum() + M_slow.sum() + z_slow.sum(), (q, k, v))
    for name, a, b in zip("qkv", grads_fast, grads_slow):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8, msg=f"gradient of {name} differs")


def test_gradient_reaches_early_tokens_through_memory():
    q, k, v = _inputs(40)
    out, _, _ = _chunked(q, k, v, 4, 2, "delta")
    # The last query is 8 chunks after token 0; only the memory connects them.
    grad_k, grad_v = torch.autograd.grad(out[:, :, -1].sum(), (k, v))
    assert grad_v[:, :, 0].abs().sum() > 0 and grad_k[:, :, 0].abs().sum() > 0
    # Tokens still inside the last query's window do not reach it through memory.
    assert grad_v[:, :, -12:].abs().sum() == 0


def test_delta_rule_stores_only_what_memory_does_not_already_predict():
    # A key whose features are one-hot (φ(k) = e_0) written twice with the same value: the second time the
    # memory already predicts v exactly, so the delta rule adds (almost) nothing while the linear rule doubles.
    k = torch.full((1, 1, 2, 1, 8), -60.0, dtype=torch.float64)
    k[..., 0] = 0.0
    v = torch.randn(1, 1, 1, 1, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).repeat(1, 1, 2, 1, 1)
    M, z = (t.double() for t in empty_memory(1, 1, 8))
    Ms_delta, _ = memory_states(k, v, M, z, "delta", 1e-6)
    Ms_linear, _ = memory_states(k, v, M, z, "linear", 1e-6)
    torch.testing.assert_close(Ms_linear[:, :, 2], 2 * Ms_linear[:, :, 1])
    torch.testing.assert_close(Ms_delta[:, :, 1], Ms_linear[:, :, 1])
    assert (Ms_delta[:, :, 2] - Ms_delta[:, :, 1]).norm() < 1e-5 * Ms_delta[:, :, 1].norm()


def test_unknown_update_rule_is_named():
    k = torch.randn(1, 1, 1, 4, 8)
    M, z = empty_memory(1, 1, 8)
    with pytest.raises(ValueError, match="'hebbian'.*delta.*linear"):
        memory_states(k, k, M, z, "hebbian", 1e-6)


def test_alibi_weights_each_segment_by_decay_to_the_power_of_its_age():
    k = torch.randn(1, 2, 5, 4, 8, dtype=torch.float64)
    v = torch.randn(1, 2, 5, 4, 8, dtype=torch.float64)
    M, z = (t.double() for t in empty_memory(1, 2, 8))
    decay = alibi_decay(2, scale=2.0).double()
    Ms, zs = memory_states(k, v, M, z, "linear", 1e-6, decay)
    sk = torch.nn.functional.elu(k) + 1
    # After 5 writes, segment j weighs γ^(4 - j): an explicit weighted sum of the per-segment outer products.
    expected = sum(decay[:, None, None] ** (4 - j) * (sk[:, :, j].transpose(-1, -2) @ v[:, :, j]) for j in range(5))
    torch.testing.assert_close(Ms[:, :, -1], expected)
    torch.testing.assert_close(zs[:, :, -1], sum(decay[:, None] ** (4 - j) * sk[:, :, j].sum(2) for j in range(5)))
    slopes = -torch.log(alibi_decay(4))
    torch.testing.assert_close(slopes.float(), torch.tensor([2.0 ** (-8 * h / 4) for h in (1, 2, 3, 4)]))


def test_attention_sinks_are_never_written_to_memory():
    T, C, sinks = 37, 4, 3
    q, k, v = _inputs(T)
    _, M, z = _chunked(q, k, v, C, 2, "linear", sinks=sinks)
    with torch.no_grad():
        k2, v2 = k.clone(), v.clone()
        k2[:, :, :sinks] += 5.0
        v2[:, :, :sinks] -= 3.0
    _, M2, z2 = _chunked(q, k2, v2, C, 2, "linear", sinks=sinks)
    torch.testing.assert_close(M, M2, rtol=0, atol=0)
    torch.testing.assert_close(z, z2, rtol=0, atol=0)
    _, M0, _ = _chunked(q, k2, v2, C, 2, "linear", sinks=0)
    assert not torch.allclose(M0, M)  # without sinks, the same tokens are written


def _graph_nodes(output: torch.Tensor) -> list[str]:
    seen, stack, names = set(), [output.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize("update,alibi", [("delta", False), ("delta", True), ("linear", True)])
def test_the_chunk_loops_backward_takes_each_chunk_without_a_full_size_gradient_per_chunk(update, alibi):
    """The sequential writes (delta rule, decayed memories) take their chunks by unbind: indexing one chunk at a
    time would give a Select/Slice node per chunk, whose backward allocates and adds a zero gradient the size of
    all the chunks (quadratic in the chunks; on an 8K training step, 0.4 s of 5.6 s)."""
    B, H, N, C, D = 1, 2, 12, 4, 8
    g = torch.Generator().manual_seed(3)
    k, v = (torch.randn(B, H, N, C, D, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    M, z = (t.double() for t in empty_memory(B, H, D))
    decay = alibi_decay(H).double() if alibi else None
    Ms, zs = memory_states(k, v, M, z, update, 1e-6, decay)
    nodes = _graph_nodes(Ms.sum() + zs.sum())
    per_chunk = [name for name in nodes if name.startswith(("SelectBackward", "SliceBackward"))]
    assert len(per_chunk) <= 2, per_chunk
    assert nodes.count("UnbindBackward0") >= 1


def test_the_slotted_loop_takes_its_chunks_by_split_not_by_a_slice_per_chunk():
    from senri.model.memory import MemoryLayout, slotted_memory_attention

    T, C, W = 48, 4, 2
    q, k, v = _inputs(T)
    layout = MemoryLayout(read="multi", num_slots=2, num_memories=2)
    M, z = (t.double() for t in empty_memory(2, 2, 8, num_slots=2))
    out, M, z = slotted_memory_attention(q, k, v, M, z, 0, 0, T // C - 1 - W, C, W, "linear", 1e-6, layout)
    nodes = _graph_nodes(out.sum() + M.sum() + z.sum())
    per_chunk = [name for name in nodes if name.startswith(("SelectBackward", "SliceBackward"))]
    assert len(per_chunk) <= 4, per_chunk  # the final cut of the padded grid, not one per chunk (12 here)


def test_dpfp_is_the_kernel_of_sign_pattern_products_and_enlarges_the_state():
    """dpfp(q)·dpfp(k) = Σ_ν Σ_j r_q[j] r_q[j−ν] r_k[j] r_k[j−ν] with r = [relu(x), relu(−x)] (indices mod 2D), as
    Schlag et al. define it; 2Dν non-negative features, the state's first dimension."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 5, generator=g, dtype=torch.float64)
    rq, rk = (torch.cat([x.clamp(min=0), (-x).clamp(min=0)]) for x in (q, k))
    for nu in (1, 3):
        naive = sum(rq[j] * rq[(j - i) % 10] * rk[j] * rk[(j - i) % 10] for i in range(1, nu + 1) for j in range(10))
        torch.testing.assert_close(dpfp(q, nu) @ dpfp(k, nu), naive)
        assert dpfp(q, nu).shape == (10 * nu,) and bool((dpfp(q, nu) >= 0).all())
        assert FeatureMap("dpfp", nu).dim(5) == 10 * nu
    assert ELU.dim(5) == 5
    M, z = empty_memory(2, 3, 5, feature_dim=FeatureMap("dpfp", 3).dim(5))
    assert M.shape == (2, 3, 30, 5) and z.shape == (2, 3, 30)
    with pytest.raises(ValueError, match="feature map 'taylor' is unknown; valid values are \\['elu', 'dpfp'\\]"):
        FeatureMap("taylor")
    with pytest.raises(ValueError, match="nu must be a positive integer, got 0"):
        FeatureMap("dpfp", 0)
