"""Compressive memory (Infini-attention, Munkhdalai et al. 2024) as pure functions.

Shapes: B batch, H key/value heads, G query heads per KV head, N chunks, C chunk size, D head dim.
A memory is ``M: (B, H, D, D)`` and ``z: (B, H, D)``, always float32 (fp16 overflows within thousands of tokens).

``memory_states`` is the fast chunked path; ``reference_memory_attention`` is the naive token loop that the tests
hold it equal to (outputs, final state and gradients).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

MEMORY_DTYPE = torch.float32


def phi(x: torch.Tensor) -> torch.Tensor:
    """The feature map σ = ELU + 1 (paper, eq. 3): positive, so the normaliser φ(q)·z stays > 0."""
    return F.elu(x) + 1.0


@contextlib.contextmanager
def float32_memory(device: torch.device) -> Iterator[None]:
    """Disable autocast so memory arithmetic really runs in float32 under fp16/bf16 autocast."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def empty_memory(batch_size: int, num_heads: int, head_dim: int, device: torch.device | str | None = None):
    """A fresh (reset) memory: M = 0, z = 0."""
    M = torch.zeros(batch_size, num_heads, head_dim, head_dim, dtype=MEMORY_DTYPE, device=device)
    z = torch.zeros(batch_size, num_heads, head_dim, dtype=MEMORY_DTYPE, device=device)
    return M, z


def alibi_decay(num_heads: int, scale: float = 1.0) -> torch.Tensor:
    """Per-head decay factor per written segment, exp(−slope_h), with ALiBi's geometric slopes 2^(−8(h+1)/H)."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, num_heads + 1, dtype=torch.float64) / num_heads) * scale
    return torch.exp(-slopes).to(MEMORY_DTYPE)


def memory_states(
    k: torch.Tensor, v: torch.Tensor, M: torch.Tensor, z: torch.Tensor, update: str, eps: float,
    decay: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write ``N`` chunks into memory, one chunk at a time, and return every intermediate state.

    k, v: (B, H, N, C, D) raw keys / values of the chunks (φ is applied here), M: (B, H, D, D), z: (B, H, D).
    Returns Ms: (B, H, N + 1, D, D) and zs: (B, H, N + 1, D), where index j is the state after writing chunks < j.

    * linear (eq. 4):  M_j+1 = M_j + φ(K_j)ᵀ V_j
    * delta  (eq. 5):  M_j+1 = M_j + φ(K_j)ᵀ (V_j − φ(K_j) M_j / (φ(K_j) z_j + eps))
    and in both z_j+1 = z_j + Σ_t φ(K_j,t).
    With ``decay`` (H,) (ALiBi-style, ``use_alibi``), the old state is scaled by it before each write:
    M_j+1 = γ M_j + ..., z_j+1 = γ z_j + ..., so a segment written d segments ago weighs γ^d — a fixed-size state.
    """
    sk, v = phi(k.to(MEMORY_DTYPE)), v.to(MEMORY_DTYPE)
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
    states = [M]
    for j in range(k.shape[2]):
        sk_j = sk[:, :, j]  # (B, H, C, D)
        retrieved = (sk_j @ states[-1]) / ((sk_j @ zs[:, :, j].unsqueeze(-1)) + eps)  # (B, H, C, D)
        states.append(states[-1] + sk_j.transpose(-1, -2) @ (v[:, :, j] - retrieved))
    return torch.stack(states, dim=2), zs


def _decayed_memory_states(sk, v, M, z, update, eps, decay):
    if update not in ("delta", "linear"):
        raise ValueError(f"memory update {update!r} is unknown; valid values are ['delta', 'linear']")
    Ms, zs = [M], [z]
    for j in range(sk.shape[2]):
        sk_j, M_j, z_j = sk[:, :, j], Ms[-1], zs[-1]
        values = v[:, :, j]
        if update == "delta":
            values = values - (sk_j @ M_j) / ((sk_j @ z_j.unsqueeze(-1)) + eps)
        Ms.append(decay[:, None, None] * M_j + sk_j.transpose(-1, -2) @ values)
        zs.append(decay[:, None] * z_j + sk_j.sum(dim=2))
    return torch.stack(Ms, dim=2), torch.stack(zs, dim=2)


def memory_read(
    q: torch.Tensor, M: torch.Tensor, z: torch.Tensor, eps: float, intra_k: torch.Tensor | None = None,
    intra_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Retrieve from memory (eq. 3): A_mem = φ(Q) M / (φ(Q) z + eps), no positional encoding.

    q: (B, H, N, G*C, D) raw queries grouped by chunk; M: (B, H, N, D, D), z: (B, H, N, D): the state each chunk reads.
    ``intra_k``/``intra_v`` (B, H, N, C, D), for ``memory_only`` layers, add the causal linear attention over the
    query's own chunk so that the memory path alone covers every earlier token.
    Returns (B, H, N, G*C, D) float32.
    """
    sq = phi(q.to(MEMORY_DTYPE))
    numerator = sq @ M
    denominator = sq @ z.unsqueeze(-1)  # (B, H, N, G*C, 1)
    if intra_k is not None:
        sk, chunk = phi(intra_k.to(MEMORY_DTYPE)), intra_k.shape[-2]
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
    decay: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The memory path of one layer for queries at positions ``q_start..``: write, then read chunk by chunk.

    q: (B, Hq, T, D) raw queries; k, v: (B, H, L, D) raw keys/values from position ``written * chunk_size`` on
    (the not-yet-memorised window followed by the new tokens); M, z: the memory holding chunks < ``written``.
    Chunks ``written .. new_written - 1`` are written; the query chunk c reads the state holding exactly the chunks
    < c − window_chunks (exact coverage: the rest is in its window). Returns the output (B, Hq, T, D) float32 and
    the final (M, z).
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
        Ms, zs = memory_states(write_k, write_v, M, z, update, eps, decay)
        chunks = torch.arange(first_chunk, last_chunk + 1, device=q.device)
        index = (chunks - window_chunks - written).clamp(0, n_write)
        # Lay the queries on the chunk grid: (B, Hq, T, D) -> (B, H, n_query, G*C, D), heads of a group stacked.
        pad_front, pad_back = q_start - first_chunk * C, (last_chunk + 1) * C - (q_start + T)
        grid = F.pad(q, (0, 0, pad_front, pad_back)).view(B, H, G, n_query, C, D)
        grid = grid.permute(0, 1, 3, 2, 4, 5).reshape(B, H, n_query, G * C, D)
        intra_k = intra_v = None
        if intra_chunk:
            own = slice((first_chunk - written) * C, None)  # the query chunks' own keys
            intra_k = F.pad(k[:, :, own], (0, 0, 0, pad_back)).view(B, H, n_query, C, D)
            intra_v = F.pad(v[:, :, own], (0, 0, 0, pad_back)).view(B, H, n_query, C, D)
        read = memory_read(grid, Ms[:, :, index], zs[:, :, index], eps, intra_k, intra_v)
    read = read.view(B, H, n_query, G, C, D).permute(0, 1, 3, 2, 4, 5).reshape(B, Hq, n_query * C, D)
    return read[:, :, pad_front : pad_front + T], Ms[:, :, -1], zs[:, :, -1]


def reference_memory_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int, window_chunks: int, update: str, eps: float,
    intra_chunk: bool = False, decay: torch.Tensor | None = None,
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
    M = torch.zeros(B, H, D, D, dtype=MEMORY_DTYPE, device=q.device)
    z = torch.zeros(B, H, D, dtype=MEMORY_DTYPE, device=q.device)
    written = 0
    outputs = []
    for t in range(T):
        while written < t // chunk_size - window_chunks:
            # Every token of the chunk reads the memory as it was before the chunk (delta rule, eq. 5).
            M_old, z_old = M, z
            if decay is not None:  # older segments fade by γ per newer segment
                M = M * decay.to(M.dtype)[:, None, None]
                z = z * decay.to(z.dtype)[:, None]
            for s in range(written * chunk_size, (written + 1) * chunk_size):
                sk = phi(k[:, :, s].to(MEMORY_DTYPE))  # (B, H, D)
                vs = v[:, :, s].to(MEMORY_DTYPE)
                if update == "delta":
                    vs = vs - torch.einsum("bhd,bhde->bhe", sk, M_old) / (torch.einsum("bhd,bhd->bh", sk, z_old) + eps)[..., None]
                M = M + torch.einsum("bhd,bhe->bhde", sk, vs)
                z = z + sk
            written += 1
        head_outputs = []
        for h in range(Hq):
            sq = phi(q[:, h, t].to(MEMORY_DTYPE))  # (B, D)
            numerator = torch.einsum("bd,bde->be", sq, M[:, h // G])
            denominator = torch.einsum("bd,bd->b", sq, z[:, h // G])
            if intra_chunk:
                for s in range((t // chunk_size) * chunk_size, t + 1):
                    weight = torch.einsum("bd,bd->b", sq, phi(k[:, h // G, s].to(MEMORY_DTYPE)))
                    numerator = numerator + weight[:, None] * v[:, h // G, s].to(MEMORY_DTYPE)
                    denominator = denominator + weight
            head_outputs.append(numerator / (denominator[:, None] + eps))
        outputs.append(torch.stack(head_outputs, dim=1))
    return torch.stack(outputs, dim=2), M, z


__all__ = [
    "MEMORY_DTYPE", "phi", "alibi_decay", "float32_memory", "empty_memory", "memory_states", "memory_read", "memory_attention",
    "reference_memory_attention",
]
