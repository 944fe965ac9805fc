"""Compressive memory (Infini-attention, Munkhdalai et al. 2024) as pure functions.

Shapes: B batch, H key/value heads, G query heads per KV head, N chunks, C chunk size, D head dim.
A memory is ``M: (B, H, D, D)`` and ``z: (B, H, D)``, always float32 (fp16 overflows within thousands of tokens).

``memory_states`` is the fast chunked path; ``reference_memory_attention`` is the naive token loop that the tests
hold it equal to (outputs, final state and gradients).

Layers with several memories per KV head (multi, hierarchical, routed at inference, banks: see SenriConfig) hold
``M: (B, H, S, D, D)`` and ``z: (B, H, S, D)``; a :class:`MemoryLayout` says which memory each key is written to and
how a query combines them. ``slotted_memory_attention`` is their path, ``reference_slotted_memory_attention`` its
naive token loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MEMORY_DTYPE = torch.float32


def phi(x: torch.Tensor) -> torch.Tensor:
    """The feature map σ = ELU + 1 (paper, eq. 3): positive, so the normaliser φ(q)·z stays > 0."""
    return F.elu(x) + 1.0


def dpfp(x: torch.Tensor, nu: int = 3) -> torch.Tensor:
    """DPFP features (Schlag et al. 2021) (..., D) -> (..., 2Dν): ``r = [relu(x), relu(−x)]`` times ``r`` rolled by
    1..ν, concatenated. Non-negative; the kernel ``dpfp(q)·dpfp(k)`` is sparse in sign patterns, so a state of 2Dν
    features per value dimension separates more keys than D features of ELU + 1."""
    r = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
    return torch.cat([r * torch.roll(r, shifts=i, dims=-1) for i in range(1, nu + 1)], dim=-1)


FEATURE_MAPS = ("elu", "dpfp")


@dataclass(frozen=True)
class FeatureMap:
    """The memory's feature map φ, applied to its (mapped) keys when writing and to its queries when reading.

    ``"elu"`` (default): ELU + 1, D features per head (Infini-attention). ``"dpfp"``: :func:`dpfp` with ``nu``,
    2Dν features: a state ``M: (.., 2Dν, D)``, ``z: (.., 2Dν)``, ν·2 times ELU + 1's. The map shapes no parameter,
    only the state.
    """

    name: str = "elu"
    nu: int = 3

    def __post_init__(self):
        if self.name not in FEATURE_MAPS:
            raise ValueError(f"memory feature map {self.name!r} is unknown; valid values are {list(FEATURE_MAPS)}")
        if self.nu < 1:
            raise ValueError(f"the DPFP order nu must be a positive integer, got {self.nu}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return phi(x) if self.name == "elu" else dpfp(x, self.nu)

    def dim(self, head_dim: int) -> int:
        """Features per head for keys of ``head_dim`` dimensions: the first dimension of ``M`` and of ``z``."""
        return head_dim if self.name == "elu" else 2 * head_dim * self.nu


ELU = FeatureMap()


@contextlib.contextmanager
def float32_memory(device: torch.device) -> Iterator[None]:
    """Disable autocast so memory arithmetic really runs in float32 under fp16/bf16 autocast."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def empty_memory(
    batch_size: int, num_heads: int, head_dim: int, device: torch.device | str | None = None,
    num_slots: int | None = None, feature_dim: int | None = None,
):
    """A fresh (reset) memory: M = 0, z = 0; (B, H, P, D) / (B, H, P), or (B, H, S, P, D) / (B, H, S, P) with slots,
    where P is ``feature_dim`` (the feature map's :meth:`FeatureMap.dim`; ``head_dim`` for ELU + 1, the default)."""
    slots = () if num_slots is None else (num_slots,)
    P = head_dim if feature_dim is None else feature_dim
    M = torch.zeros(batch_size, num_heads, *slots, P, head_dim, dtype=MEMORY_DTYPE, device=device)
    z = torch.zeros(batch_size, num_heads, *slots, P, dtype=MEMORY_DTYPE, device=device)
    return M, z


def alibi_decay(num_heads: int, scale: float = 1.0) -> torch.Tensor:
    """Per-head decay factor per written segment, exp(−slope_h), with ALiBi's geometric slopes 2^(−8(h+1)/H)."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, num_heads + 1, dtype=torch.float64) / num_heads) * scale
    return torch.exp(-slopes).to(MEMORY_DTYPE)


def memory_states(
    k: torch.Tensor, v: torch.Tensor, M: torch.Tensor, z: torch.Tensor, update: str, eps: float,
    decay: torch.Tensor | None = None, keep: torch.Tensor | None = None, feature_map: FeatureMap = ELU,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write ``N`` chunks into memory, one chunk at a time, and return every intermediate state.

    k, v: (B, H, N, C, D) raw keys / values of the chunks (φ = ``feature_map`` is applied here), M: (B, H, P, D),
    z: (B, H, P) with P = ``feature_map.dim(D)``.
    Returns Ms: (B, H, N + 1, P, D) and zs: (B, H, N + 1, P), where index j is the state after writing chunks < j.

    * linear (eq. 4):  M_j+1 = M_j + φ(K_j)ᵀ V_j
    * delta  (eq. 5):  M_j+1 = M_j + φ(K_j)ᵀ (V_j − φ(K_j) M_j / (φ(K_j) z_j + eps))
    and in both z_j+1 = z_j + Σ_t φ(K_j,t).
    With ``decay`` (H,) (ALiBi-style, ``use_alibi``), the old state is scaled by it before each write:
    M_j+1 = γ M_j + ..., z_j+1 = γ z_j + ..., so a segment written d segments ago weighs γ^d — a fixed-size state.
    ``keep`` (N, C) of 0/1 leaves out the tokens marked 0 (attention sinks): φ(k) = 0 writes nothing to M or z.
    """
    sk, v = feature_map(k.to(MEMORY_DTYPE)), v.to(MEMORY_DTYPE)
    if keep is not None:
        sk = sk * keep.to(sk.dtype)[..., None]
    if decay is not None:
        return _decayed_memory_states(sk, v, M, z, update, eps, decay.to(sk.device))
    dz = sk.sum(dim=3)  # (B, H, N, D)
    zs = torch.cat([z.unsqueeze(2), z.unsqueeze(2) + dz.cumsum(dim=2)], dim=2)
    if update == "linear":
        # The chunk writes are independent: one batched matmul and a prefix sum.
        dM = sk.transpose(-1, -2) @ v  # (B, H, N, D, D)
        Ms = torch.cat([M.unsqueeze(2), M.unsqueeze(2) + dM.cumsum(dim=2)], dim=2)
        return Ms, zs
    if update != "delta":
        raise ValueError(f"memory update {update!r} is unknown; valid values are ['delta', 'linear']")
    # Only the numerator depends on the previous write; every chunk's normaliser φ(K_j)·z_j + eps comes from the
    # prefix sums at once. Each step is then two fused ops on (B·H, ., .) matrices:
    # U_j = V_j − φ(K_j) M_j / n_j (addcdiv) and M_j+1 = M_j + φ(K_j)ᵀ U_j (baddbmm).
    # The chunks are taken by unbind, not by indexing: the backward of one unbind is one stack, while each index's
    # backward would allocate and add a zero gradient the size of the whole input (quadratic in the chunks).
    B, H, N, C, P = sk.shape
    D = v.shape[-1]
    norms = (sk @ zs[:, :, :N].unsqueeze(-1) + eps).flatten(0, 1)  # (B·H, N, C, 1)
    flat_sk, flat_v = sk.flatten(0, 1), v.flatten(0, 1)  # (B·H, N, C, D)
    states = [M.flatten(0, 1)]  # (B·H, P, D)
    for sk_j, sk_t, v_j, n_j in zip(flat_sk.unbind(1), flat_sk.transpose(-1, -2).unbind(1), flat_v.unbind(1),
                                    norms.unbind(1)):
        states.append(torch.baddbmm(states[-1], sk_t, torch.addcdiv(v_j, sk_j @ states[-1], n_j, value=-1.0)))
    return torch.stack(states, dim=1).view(B, H, N + 1, P, D), zs


def _decayed_memory_states(sk, v, M, z, update, eps, decay):
    if update not in ("delta", "linear"):
        raise ValueError(f"memory update {update!r} is unknown; valid values are ['delta', 'linear']")
    Ms, zs = [M], [z]
    for sk_j, values in zip(sk.unbind(2), v.unbind(2)):  # unbind: see memory_states
        M_j, z_j = Ms[-1], zs[-1]
        if update == "delta":
            values = values - (sk_j @ M_j) / ((sk_j @ z_j.unsqueeze(-1)) + eps)
        Ms.append(decay[:, None, None] * M_j + sk_j.transpose(-1, -2) @ values)
        zs.append(decay[:, None] * z_j + sk_j.sum(dim=2))
    return torch.stack(Ms, dim=2), torch.stack(zs, dim=2)


def sink_keep_mask(
    first_position: int, num_tokens: int, num_sink_tokens: int, device: torch.device | str | None = None
) -> torch.Tensor | None:
    """(num_tokens,) 0/1 float mask of the tokens at ``first_position..`` that may be written to memory: the first
    ``num_sink_tokens`` tokens of the stream (attention sinks) stay in every local window and are never written.
    None when no token of the range is a sink."""
    if first_position >= num_sink_tokens or num_tokens == 0:
        return None
    positions = torch.arange(first_position, first_position + num_tokens, device=device)
    return (positions >= num_sink_tokens).to(MEMORY_DTYPE)


def pad_tokens(x: torch.Tensor, front: int, back: int) -> torch.Tensor:
    """x (..., T, D) with ``front``/``back`` zero rows on the token axis; x itself when there are none (F.pad
    would copy it)."""
    return x if front == back == 0 else F.pad(x, (0, 0, front, back))


def memory_read(
    q: torch.Tensor, M: torch.Tensor, z: torch.Tensor, eps: float, intra_k: torch.Tensor | None = None,
    intra_v: torch.Tensor | None = None, feature_map: FeatureMap = ELU,
) -> torch.Tensor:
    """Retrieve from memory (eq. 3): A_mem = φ(Q) M / (φ(Q) z + eps), no positional encoding.

    q: (B, H, N, G*C, D) raw queries grouped by chunk; M: (B, H, N, P, D), z: (B, H, N, P): the state each chunk
    reads (P features of ``feature_map``).
    ``intra_k``/``intra_v`` (B, H, N, C, D), for ``memory_only`` layers, add the causal linear attention over the
    query's own chunk so that the memory path alone covers every earlier token.
    Returns (B, H, N, G*C, D) float32.
    """
    sq = feature_map(q.to(MEMORY_DTYPE))
    numerator = sq @ M
    denominator = sq @ z.unsqueeze(-1)  # (B, H, N, G*C, 1)
    if intra_k is not None:
        sk, chunk = feature_map(intra_k.to(MEMORY_DTYPE)), intra_k.shape[-2]
        scores = sq @ sk.transpose(-1, -2)  # (B, H, N, G*C, C)
        # Query row r is token r % C of its chunk (queries of the G heads are stacked head-major).
        rows = torch.arange(scores.shape[-2], device=q.device) % chunk
        causal = torch.arange(chunk, device=q.device)[None, :] <= rows[:, None]
        scores = scores * causal
        numerator = numerator + scores @ intra_v.to(MEMORY_DTYPE)
        denominator = denominator + scores.sum(dim=-1, keepdim=True)
    return numerator / (denominator + eps)


def memory_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, M: torch.Tensor, z: torch.Tensor, q_start: int, written: int,
    new_written: int, chunk_size: int, window_chunks: int, update: str, eps: float, intra_chunk: bool = False,
    decay: torch.Tensor | None = None, num_sink_tokens: int = 0, feature_map: FeatureMap = ELU,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The memory path of one layer for queries at positions ``q_start..``: write, then read chunk by chunk.

    q: (B, Hq, T, D) raw queries; k, v: (B, H, L, D) raw keys/values from position ``written * chunk_size`` on
    (the not-yet-memorised window followed by the new tokens); M, z: the memory holding chunks < ``written``.
    Chunks ``written .. new_written - 1`` are written; the query chunk c reads the state holding exactly the chunks
    < c − window_chunks (exact coverage: the rest is in its window). The first ``num_sink_tokens`` tokens of the
    stream are never written (they stay in every window). Returns the output (B, Hq, T, D) float32 and the final
    (M, z).
    """
    B, Hq, T, D = q.shape
    H, C = k.shape[1], chunk_size
    G = Hq // H
    n_write = new_written - written
    first_chunk, last_chunk = q_start // C, (q_start + T - 1) // C
    n_query = last_chunk - first_chunk + 1
    with float32_memory(q.device):
        write_k = k[:, :, : n_write * C].reshape(B, H, n_write, C, D)
        write_v = v[:, :, : n_write * C].reshape(B, H, n_write, C, D)
        keep = sink_keep_mask(written * C, n_write * C, num_sink_tokens, q.device)
        keep = None if keep is None else keep.view(n_write, C)
        Ms, zs = memory_states(write_k, write_v, M, z, update, eps, decay, keep, feature_map)
        chunks = torch.arange(first_chunk, last_chunk + 1, device=q.device)
        index = (chunks - window_chunks - written).clamp(0, n_write)
        # Lay the queries on the chunk grid: (B, Hq, T, D) -> (B, H, n_query, G*C, D), heads of a group stacked.
        pad_front, pad_back = q_start - first_chunk * C, (last_chunk + 1) * C - (q_start + T)
        grid = pad_tokens(q, pad_front, pad_back).view(B, H, G, n_query, C, D)
        grid = grid.permute(0, 1, 3, 2, 4, 5).reshape(B, H, n_query, G * C, D)
        intra_k = intra_v = None
        if intra_chunk:
            own = slice((first_chunk - written) * C, None)  # the query chunks' own keys
            intra_k = pad_tokens(k[:, :, own], 0, pad_back).view(B, H, n_query, C, D)
            intra_v = pad_tokens(v[:, :, own], 0, pad_back).view(B, H, n_query, C, D)
        read = memory_read(grid, Ms[:, :, index], zs[:, :, index], eps, intra_k, intra_v, feature_map)
    read = read.view(B, H, n_query, G, C, D).permute(0, 1, 3, 2, 4, 5).reshape(B, Hq, n_query * C, D)
    return read[:, :, pad_front : pad_front + T], Ms[:, :, -1], zs[:, :, -1]


def reference_memory_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int, window_chunks: int, update: str, eps: float,
    intra_chunk: bool = False, decay: torch.Tensor | None = None, num_sink_tokens: int = 0,
    feature_map: FeatureMap = ELU,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Naive token-by-token memory path of a sequence starting at position 0, for testing.

    q: (B, Hq, T, D), k, v: (B, H, T, D). Query t reads a memory holding exactly the chunks that ended before its
    window (chunks < t // C − window_chunks); with ``intra_chunk`` (memory_only layers) it also reads the tokens
    s <= t of its own chunk. Returns (outputs (B, Hq, T, D), final M, final z); the final state holds the chunks
    written for the last query.
    """
    B, Hq, T, D = q.shape
    H = k.shape[1]
    G = Hq // H
    P = feature_map.dim(D)
    M = torch.zeros(B, H, P, D, dtype=MEMORY_DTYPE, device=q.device)
    z = torch.zeros(B, H, P, dtype=MEMORY_DTYPE, device=q.device)
    written = 0
    outputs = []
    for t in range(T):
        while written < t // chunk_size - window_chunks:
            # Every token of the chunk reads the memory as it was before the chunk (delta rule, eq. 5).
            M_old, z_old = M, z
            if decay is not None:  # older segments fade by γ per newer segment
                M = M * decay.to(M.dtype)[:, None, None]
                z = z * decay.to(z.dtype)[:, None]
            for s in range(max(written * chunk_size, num_sink_tokens), (written + 1) * chunk_size):
                sk = feature_map(k[:, :, s].to(MEMORY_DTYPE))  # (B, H, P)
                vs = v[:, :, s].to(MEMORY_DTYPE)
                if update == "delta":
                    vs = vs - torch.einsum("bhd,bhde->bhe", sk, M_old) / (torch.einsum("bhd,bhd->bh", sk, z_old) + eps)[..., None]
                M = M + torch.einsum("bhd,bhe->bhde", sk, vs)
                z = z + sk
            written += 1
        head_outputs = []
        for h in range(Hq):
            sq = feature_map(q[:, h, t].to(MEMORY_DTYPE))  # (B, P)
            numerator = torch.einsum("bd,bde->be", sq, M[:, h // G])
            denominator = torch.einsum("bd,bd->b", sq, z[:, h // G])
            if intra_chunk:
                for s in range((t // chunk_size) * chunk_size, t + 1):
                    weight = torch.einsum("bd,bd->b", sq, feature_map(k[:, h // G, s].to(MEMORY_DTYPE)))
                    numerator = numerator + weight[:, None] * v[:, h // G, s].to(MEMORY_DTYPE)
                    denominator = denominator + weight
            head_outputs.append(numerator / (denominator[:, None] + eps))
        outputs.append(torch.stack(head_outputs, dim=1))
    return torch.stack(outputs, dim=2), M, z


# --- several memories per head -------------------------------------------------------------------------------------
SLOTTED_READS = ("multi", "hierarchical", "routed")
RELEVANCES = ("mass", "mean")
EMPTY_RELEVANCE = -1e4  # "mean" relevance of a memory nothing was written to: it takes no share of the mix


@dataclass(frozen=True)
class MemoryLayout:
    """How a layer's S memories per KV head are written and read (SenriConfig's docstring defines the variants).

    read: ``"multi"`` (relevance-softmax mix; also used for banks of single memories), ``"hierarchical"`` (coarse sum
    plus gated expansion into the mix) or ``"routed"`` (orthogonal basis B = I, S = head_dim).
    Segment-assigned layouts write chunk j to memory ``bank * num_memories + j % num_memories`` with
    ``bank = (j // segments_per_bank) % num_banks``; routed layouts write each key to argmax_i |k_i|.
    relevance (multi / hierarchical mixes): ``"mass"`` r_i = φ(q)·z_i, or ``"mean"`` r_i = φ(q)·z_i / Σ_d z_i,d (the
    query's mean affinity to the memory's keys; an empty memory gets no weight).
    """

    read: str
    num_slots: int
    num_memories: int = 1
    num_banks: int = 1
    segments_per_bank: int = 1
    top_k: int = 1
    relevance: str = "mass"

    def __post_init__(self):
        if self.read not in SLOTTED_READS:
            raise ValueError(f"memory layout read {self.read!r} is unknown; valid values are {list(SLOTTED_READS)}")
        if self.relevance not in RELEVANCES:
            raise ValueError(f"memory relevance {self.relevance!r} is unknown; valid values are {list(RELEVANCES)}")
        if self.read != "routed" and self.num_slots != self.num_memories * self.num_banks:
            raise ValueError(
                f"num_slots ({self.num_slots}) must be num_memories × num_banks "
                f"({self.num_memories} × {self.num_banks})"
            )

    def segment_slot(self, chunk: int) -> int:
        """The memory a segment-assigned layout writes chunk ``chunk`` (absolute index in the stream) to."""
        bank = (chunk // self.segments_per_bank) % self.num_banks
        return bank * self.num_memories + chunk % self.num_memories

    def slots(self, chunk: int, k: torch.Tensor) -> int | torch.Tensor:
        """Where chunk ``chunk`` (absolute index) with raw keys k: (B, H, C, D) is written: one memory index for the
        whole chunk (segment-assigned layouts) or, routed, a memory index per key (B, H, C)."""
        if self.read == "routed":
            return k.abs().argmax(dim=-1)  # the basis vector e_i with the largest |<k, e_i>|
        return self.segment_slot(chunk)


def write_slots(
    k: torch.Tensor, v: torch.Tensor, slots: int | torch.Tensor, M: torch.Tensor, z: torch.Tensor, update: str,
    eps: float, decay: torch.Tensor | None = None, keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write one chunk into S memories: all of it into memory ``slots`` (an int), or each key (and its value) into
    its own memory ``slots[b, h, c]`` (a (B, H, C) long tensor).

    k, v: (B, H, C, D) raw keys/values; M: (B, H, S, D, D), z: (B, H, S, D). Memory i takes the rules of
    :func:`memory_states` with the chunk's keys assigned to it (delta: each key retrieves from its own memory as it
    was before the chunk); with ``decay`` (H,) every memory of the head is first scaled by γ_h. ``keep`` (C,) 0/1
    leaves out the tokens marked 0 (attention sinks).
    """
    if update not in ("delta", "linear"):
        raise ValueError(f"memory update {update!r} is unknown; valid values are ['delta', 'linear']")
    sk, v = phi(k.to(MEMORY_DTYPE)), v.to(MEMORY_DTYPE)
    if keep is not None:
        sk = sk * keep.to(sk.dtype)[:, None]
    B, H, C, D = sk.shape
    S = M.shape[2]
    if isinstance(slots, int):
        if update == "delta":
            v = v - (sk @ M[:, :, slots]) / ((sk @ z[:, :, slots].unsqueeze(-1)) + eps)
        one_hot = F.one_hot(torch.tensor(slots, device=sk.device), S).to(sk.dtype)  # (S,)
        dM = one_hot[:, None, None] * (sk.transpose(-1, -2) @ v).unsqueeze(2)  # (B, H, S, D, D), zero but in `slots`
        dz = one_hot[:, None] * sk.sum(dim=2).unsqueeze(2)
    else:
        # Row (b, h, slots[b, h, c]) of the memories flattened to (B * H * S, ...) takes key c's write.
        rows = ((torch.arange(B, device=sk.device)[:, None, None] * H
                 + torch.arange(H, device=sk.device)[None, :, None]) * S + slots).flatten()
        if update == "delta":
            own_M, own_z = M.flatten(0, 2)[rows], z.flatten(0, 2)[rows]  # (B*H*C, D, D), (B*H*C, D)
            flat_sk = sk.flatten(0, 2)
            retrieved = (flat_sk.unsqueeze(-2) @ own_M).squeeze(-2) / ((flat_sk * own_z).sum(-1, keepdim=True) + eps)
            v = v - retrieved.view(B, H, C, D)
        outer = sk.unsqueeze(-1) * v.unsqueeze(-2)  # (B, H, C, D, D)
        dM = torch.zeros_like(M).flatten(0, 2).index_add(0, rows, outer.flatten(0, 2)).view_as(M)
        dz = torch.zeros_like(z).flatten(0, 2).index_add(0, rows, sk.flatten(0, 2)).view_as(z)
    if decay is not None:
        decay = decay.to(device=sk.device, dtype=sk.dtype)
        M, z = decay[:, None, None, None] * M, decay[:, None, None] * z
    return M + dM, z + dz


def read_slots(
    q: torch.Tensor, M: torch.Tensor, z: torch.Tensor, layout: MemoryLayout, eps: float,
    expansion: torch.Tensor | None = None, intra_k: torch.Tensor | None = None, intra_v: torch.Tensor | None = None,
    intra_slots: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Read S memories and combine them as ``layout.read`` says.

    q: (B, H, R, D) raw queries (R rows: the G query heads' tokens of one chunk, head-major); M: (B, H, S, D, D),
    z: (B, H, S, D). Per memory A_i = φ(q) M_i / (φ(q) z_i + eps), relevance r_i = φ(q)·z_i (``layout.relevance``
    "mass") or φ(q)·z_i / Σ_d z_i,d ("mean"; −1e4 for an empty memory), then
      multi:        Σ_i softmax(r)_i A_i
      hierarchical: (1 − g) A_c + g Σ_i softmax(r)_i A_i with the coarse read
                    A_c = φ(q) Σ_i M_i / (φ(q) Σ_i z_i + eps) and g = expansion (B, H, R)
      routed:       Σ_{i ∈ top-k |q_i|} softmax_{top-k}(|q_i|) A_i
    ``intra_k``/``intra_v`` (B, H, C, D) and ``intra_slots`` (int or (B, H, C), as ``MemoryLayout.slots``), for
    memory_only layers: the query chunk's own keys up to the query's token as if already written (linearly) to
    their memories. Returns (B, H, R, D).
    """
    sq = phi(q.to(MEMORY_DTYPE))
    numerator = torch.einsum("bhrd,bhsde->bhrse", sq, M)  # (B, H, R, S, D)
    denominator = torch.einsum("bhrd,bhsd->bhrs", sq, z)  # (B, H, R, S)
    mass = z.sum(dim=-1).unsqueeze(2)  # (B, H, 1, S): Σ φ(k) over the keys each memory holds, for "mean" relevance
    if intra_k is not None:
        sk, chunk = phi(intra_k.to(MEMORY_DTYPE)), intra_k.shape[-2]
        scores = sq @ sk.transpose(-1, -2)  # (B, H, R, C)
        rows = torch.arange(scores.shape[-2], device=q.device) % chunk
        visible = (torch.arange(chunk, device=q.device)[None, :] <= rows[:, None]).to(scores.dtype)  # (R, C)
        scores = scores * visible
        if isinstance(intra_slots, int):  # the whole chunk goes to one memory
            intra_slots = torch.full(intra_k.shape[:-1], intra_slots, dtype=torch.long, device=q.device)
        assign = F.one_hot(intra_slots, M.shape[2]).to(scores.dtype)  # (B, H, C, S)
        numerator = numerator + torch.einsum("bhrc,bhcs,bhce->bhrse", scores, assign, intra_v.to(MEMORY_DTYPE))
        denominator = denominator + scores @ assign
        mass = mass + (visible * sk.sum(dim=-1)[:, :, None, :]) @ assign  # Σ φ(k) of the visible intra keys
    reads = numerator / (denominator.unsqueeze(-1) + eps)  # (B, H, R, S, D)
    if layout.read == "routed":
        top = q.to(MEMORY_DTYPE).abs().topk(layout.top_k, dim=-1)  # bases with the largest |<q, e_i>|
        selected = reads.gather(3, top.indices.unsqueeze(-1).expand(*top.indices.shape, reads.shape[-1]))
        return (top.values.softmax(dim=-1).unsqueeze(-1) * selected).sum(dim=3)
    if layout.relevance == "mass":
        relevance = denominator
    else:
        relevance = torch.where(mass > 0, denominator / mass.clamp_min(eps), EMPTY_RELEVANCE)
    fine = (relevance.softmax(dim=-1).unsqueeze(-1) * reads).sum(dim=3)
    if layout.read == "multi":
        return fine
    coarse = numerator.sum(dim=3) / (denominator.sum(dim=3, keepdim=True) + eps)
    return coarse + expansion.to(MEMORY_DTYPE).unsqueeze(-1) * (fine - coarse)


def slotted_memory_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, M: torch.Tensor, z: torch.Tensor, q_start: int, written: int,
    new_written: int, chunk_size: int, window_chunks: int, update: str, eps: float, layout: MemoryLayout,
    intra_chunk: bool = False, decay: torch.Tensor | None = None, expansion: torch.Tensor | None = None,
    num_sink_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`memory_attention` for a layer of S memories per KV head (M: (B, H, S, D, D), z: (B, H, S, D)).

    Same arguments and the same exact coverage (query chunk c reads the state holding exactly chunks
    < c − window_chunks), plus ``layout`` and, for hierarchical layouts, ``expansion`` (B, Hq, T): the expansion
    gate of each query. Query chunks are taken in order, writing the chunks each needs first, so only one state is
    alive at a time (a routed layer's state is D times a single memory's). Returns (B, Hq, T, D) float32, M, z.
    """
    B, Hq, T, D = q.shape
    H, C = k.shape[1], chunk_size
    G = Hq // H
    first_chunk, last_chunk = q_start // C, (q_start + T - 1) // C
    n_query = last_chunk - first_chunk + 1
    if (expansion is None) != (layout.read != "hierarchical"):
        raise ValueError("an expansion gate is given exactly for hierarchical layouts")
    pad_front, pad_back = q_start - first_chunk * C, (last_chunk + 1) * C - (q_start + T)
    with float32_memory(q.device):
        grid = pad_tokens(q, pad_front, pad_back).view(B, H, G, n_query, C, D)
        gates = None if expansion is None else F.pad(expansion, (pad_front, pad_back)).view(B, H, G, n_query, C)
        # Pieces by split/unbind, not by indexing in the loop (whose backward adds a full-size zero gradient per piece).
        k_chunks, v_chunks = k.split(C, dim=2), v.split(C, dim=2)
        grid_chunks = grid.unbind(3)
        gate_chunks = None if gates is None else gates.unbind(3)
        outputs, current = [], written
        for i, chunk in enumerate(range(first_chunk, last_chunk + 1)):
            while current < min(max(chunk - window_chunks, written), new_written):
                k_c, v_c = k_chunks[current - written], v_chunks[current - written]
                keep = sink_keep_mask(current * C, C, num_sink_tokens, q.device)
                M, z = write_slots(k_c, v_c, layout.slots(current, k_c), M, z, update, eps, decay, keep)
                current += 1
            intra = {}
            if intra_chunk:
                own_k, own_v = k_chunks[chunk - written], v_chunks[chunk - written]
                missing = C - own_k.shape[2]
                intra_k, intra_v = (pad_tokens(t, 0, missing) for t in (own_k, own_v))  # (B, H, C, D)
                intra = dict(intra_k=intra_k, intra_v=intra_v, intra_slots=layout.slots(chunk, intra_k))
            rows = grid_chunks[i].reshape(B, H, G * C, D)
            gate = None if gate_chunks is None else gate_chunks[i].reshape(B, H, G * C)
            outputs.append(read_slots(rows, M, z, layout, eps, gate, **intra).view(B, H, G, C, D))
        if current != new_written:
            raise RuntimeError(f"wrote chunks up to {current}, expected {new_written}")
    read = torch.stack(outputs, dim=3).reshape(B, Hq, n_query * C, D)
    return read[:, :, pad_front : pad_front + T], M, z


def reference_slotted_memory_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int, window_chunks: int, update: str, eps: float,
    layout: MemoryLayout, intra_chunk: bool = False, decay: torch.Tensor | None = None,
    expansion: torch.Tensor | None = None, num_sink_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Naive token-by-token loop of :func:`slotted_memory_attention` from position 0, one (batch, head, memory) at a
    time, for testing. Returns (outputs (B, Hq, T, D), final M (B, H, S, D, D), final z (B, H, S, D))."""
    B, Hq, T, D = q.shape
    H, S, C = k.shape[1], layout.num_slots, chunk_size
    G = Hq // H
    zero_M = torch.zeros(D, D, dtype=MEMORY_DTYPE, device=q.device)
    M = [[[zero_M] * S for _ in range(H)] for _ in range(B)]
    z = [[[zero_M[0]] * S for _ in range(H)] for _ in range(B)]

    def slot_of(chunk: int, b: int, h: int, s: int) -> int:
        if layout.read == "routed":
            return int(k[b, h, s].abs().argmax())
        bank = (chunk // layout.segments_per_bank) % layout.num_banks
        return bank * layout.num_memories + chunk % layout.num_memories

    written, outputs = 0, [[[None] * Hq for _ in range(B)] for _ in range(T)]  # [t][b][hq] -> (D,)
    for t in range(T):
        while written < t // C - window_chunks:
            for b in range(B):
                for h in range(H):
                    old_M, old_z = list(M[b][h]), list(z[b][h])
                    if decay is not None:
                        M[b][h] = [decay[h].to(MEMORY_DTYPE) * m for m in M[b][h]]
                        z[b][h] = [decay[h].to(MEMORY_DTYPE) * n for n in z[b][h]]
                    for s in range(max(written * C, num_sink_tokens), (written + 1) * C):
                        i = slot_of(written, b, h, s)
                        sk, vs = phi(k[b, h, s].to(MEMORY_DTYPE)), v[b, h, s].to(MEMORY_DTYPE)
                        if update == "delta":
                            vs = vs - (sk @ old_M[i]) / (sk @ old_z[i] + eps)
                        M[b][h][i] = M[b][h][i] + torch.outer(sk, vs)
                        z[b][h][i] = z[b][h][i] + sk
            written += 1
        for b in range(B):
            for hq in range(Hq):
                h = hq // G
                sq = phi(q[b, hq, t].to(MEMORY_DTYPE))
                numerators = [sq @ M[b][h][i] for i in range(S)]
                denominators = [sq @ z[b][h][i] for i in range(S)]
                masses = [z[b][h][i].sum() for i in range(S)]
                if intra_chunk:
                    for s in range((t // C) * C, t + 1):
                        i = slot_of(t // C, b, h, s)
                        weight = sq @ phi(k[b, h, s].to(MEMORY_DTYPE))
                        numerators[i] = numerators[i] + weight * v[b, h, s].to(MEMORY_DTYPE)
                        denominators[i] = denominators[i] + weight
                        masses[i] = masses[i] + phi(k[b, h, s].to(MEMORY_DTYPE)).sum()
                reads = [n / (d + eps) for n, d in zip(numerators, denominators)]
                if layout.read == "routed":
                    scores = q[b, hq, t].to(MEMORY_DTYPE).abs()
                    chosen = sorted(range(D), key=lambda i: -float(scores[i].detach()))[: layout.top_k]
                    exps = [torch.exp(scores[i] - scores[chosen[0]]) for i in chosen]
                    out = sum(e * reads[i] for e, i in zip(exps, chosen)) / sum(exps)
                else:
                    if layout.relevance == "mass":
                        relevance = denominators
                    else:
                        relevance = [d / m if m > 0 else torch.tensor(EMPTY_RELEVANCE, dtype=MEMORY_DTYPE)
                                     for d, m in zip(denominators, masses)]
                    top = max(float(r.detach()) for r in relevance)
                    exps = [torch.exp(r - top) for r in relevance]
                    out = sum(e * r for e, r in zip(exps, reads)) / sum(exps)
                    if layout.read == "hierarchical":
                        coarse = sum(numerators) / (sum(denominators) + eps)
                        g = expansion[b, hq, t].to(MEMORY_DTYPE)
                        out = (1 - g) * coarse + g * out
                outputs[t][b][hq] = out

    def stack(nested: list) -> torch.Tensor:  # nested lists [i][j][l] of tensors -> one tensor (I, J, L, ...)
        return torch.stack([torch.stack([torch.stack(inner) for inner in middle]) for middle in nested])

    return stack(outputs).permute(1, 2, 0, 3), stack(M), stack(z)


__all__ = [
    "MEMORY_DTYPE", "phi", "dpfp", "FEATURE_MAPS", "FeatureMap", "ELU", "alibi_decay", "sink_keep_mask", "float32_memory", "empty_memory", "memory_states", "memory_read", "memory_attention",
    "reference_memory_attention", "MemoryLayout", "RELEVANCES", "write_slots", "read_slots", "slotted_memory_attention",
    "reference_slotted_memory_attention",
]
