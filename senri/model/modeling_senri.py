"""Senri: a Llama decoder whose layers see the past through a block-sliding window and a compressive memory.

Read top to bottom: local attention → memory path → attention module → decoder layer → model → causal LM.
Shapes: B batch, T new tokens, Hq query heads, H key/value heads, G = Hq // H, D head dim, C chunk size.
Equations cite Infini-attention (Munkhdalai et al., 2024).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    rotate_half,
)
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .cache import LayerState, SenriCache
from .configuration_senri import MEMORY_LAYER_TYPES, SenriConfig
from .memory import (
    MemoryLayout, alibi_decay, empty_memory, memory_attention, pad_tokens, slotted_memory_attention,
)

logger = logging.get_logger(__name__)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x (B, H, T, D) with cos/sin (1, T, D), as Llama applies it."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class SenriRotaryEmbedding(LlamaRotaryEmbedding):
    """Llama's RoPE tables with the angles (position × frequency) taken in float64.

    In float32 an angle near position 10^6 is off by up to 0.03 rad (10^7: 0.25): a stream that long would see its
    window through noisy relative phases. Senri rotates every key at its absolute position, however long the stream,
    so it computes the angles exactly and rounds only the tables (what float32 does near position 0 anyway). RoPE
    types whose frequencies change with the length (dynamic, longrope) keep Llama's path."""

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if "dynamic" in self.rope_type or self.rope_type == "longrope" or x.device.type == "mps":  # mps: no float64
            return super().forward(x, position_ids)
        angles = position_ids[..., None].double() * self.inv_freq.to(device=x.device, dtype=torch.float64)
        angles = torch.cat((angles, angles), dim=-1)  # (B, T, D)
        return (angles.cos() * self.attention_scaling).to(x.dtype), (angles.sin() * self.attention_scaling).to(x.dtype)


def window_start_of(position: torch.Tensor | int, chunk_size: int, window_chunks: int):
    """First position the block-sliding window of a query at ``position`` covers (may be negative: no cut yet)."""
    return (position // chunk_size - window_chunks) * chunk_size


def sink_shift(chunk: int, chunk_size: int, sink_distance: int | None) -> int:
    """How far a query in ``chunk`` sees the attention sinks moved forward: sink i is rotated at position i + shift,
    so the query's RoPE distance to a sink stays below ``sink_distance`` (SenriConfig.sink_distance; None: 0, the
    sinks' own positions). Depends on the query's chunk alone, so any split of a stream into calls sees the same."""
    return 0 if sink_distance is None else max(0, (chunk + 1) * chunk_size - sink_distance)


def chunk_sinks(sink_k: torch.Tensor | None, first: int, count: int) -> torch.Tensor | None:
    """The sinks of query chunks ``first .. first + count - 1`` of a call: ``sink_k`` as it is when shared by every
    chunk (B, H, S, D), else its slice of the per-chunk sinks (B, H, chunks, S, D)."""
    if sink_k is None or sink_k.dim() == 4:
        return sink_k
    return sink_k[:, :, first : first + count]


# Query chunks per block of the one-call window attention (each block's keys: its window, shared by the block's
# chunks, plus its own chunks): larger blocks compute more masked scores, smaller ones overlap more keys, whose
# gradients unfold's backward adds up. On CPU at the benchmark's shapes (window of 16 chunks), 4 was fastest for
# training steps and 1 for inference (no backward).
BLOCK_CHUNKS = 4
BLOCK_CHUNKS_INFERENCE = 1


def local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, k_start: int, scaling: float,
    chunk_size: int, window_chunks: int | None, sink_k: torch.Tensor | None = None, sink_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of queries at positions ``q_start..`` over keys at ``k_start..`` (both RoPE'd).

    q: (B, Hq, T, D); k, v: (B, H, L, D), the keys ending with the queries' own tokens. ``window_chunks=None`` is
    full causal attention; otherwise query t sees keys s with window_start_of(t) <= s <= t, and also the attention
    sinks ``sink_v`` (B, H, S, D), the stream's first S tokens, those of them that lie before its window
    (StreamingLLM), in one softmax with the window's keys. Their keys ``sink_k`` are (B, H, S, D) when every query
    sees them at the same positions, or (B, H, chunks, S, D): per query chunk of the call, from the first query's
    chunk on, each rotated where that chunk's queries see them (:func:`sink_shift`).

    One attention call, cost O(T · window): queries of one chunk are a single block over the keys from their
    window's start (a lower-right causal mask); queries of several chunks go through
    :func:`grouped_local_attention` (on CUDA :func:`flex_local_attention`). At a stream's start (training,
    a first prefill) the first W + 1 chunks, whose windows reach back to position 0, take a plain causal call
    of their own: two calls then, instead of blocks whose key windows reach before the stream.
    """
    T = q.shape[2]
    if window_chunks is not None and (q_start + T - 1) // chunk_size != q_start // chunk_size:
        args = (q, k, v, q_start, k_start, scaling, chunk_size, window_chunks, sink_k, sink_v)
        if _use_flex(q):
            try:
                return flex_local_attention(*args)
            except Exception as error:  # noqa: BLE001 - a GPU/compiler that cannot run it: the SDPA path still can
                _FLEX["failed"] = error
                logger.warning_once(f"FlexAttention failed ({error!r}); Senri's window uses one SDPA call instead")
        if q_start == k_start == 0 and window_chunks > 0:
            head = (window_chunks + 1) * chunk_size
            # A stream's first W + 1 chunks see every earlier token (their windows start at or before 0, and the
            # sinks are in them): plain causal attention, whose kernel skips the future, instead of blocks whose
            # keys would reach before the stream (zero padding, computed and masked). The rest as blocks.
            first = F.scaled_dot_product_attention(
                q[:, :, :head], k[:, :, :head], v[:, :, :head], is_causal=True, scale=scaling, enable_gqa=True
            )
            if head >= T:
                return first
            rest = grouped_local_attention(q[:, :, head:], k, v, head, 0, scaling, chunk_size, window_chunks,
                                           chunk_sinks(sink_k, window_chunks + 1, T), sink_v)
            return torch.cat([first, rest], dim=2)
        return grouped_local_attention(*args)
    lo = k_start if window_chunks is None else max(k_start, window_start_of(q_start, chunk_size, window_chunks))
    n_k = q_start + T - lo
    if sink_k is not None and sink_k.dim() == 5:
        sink_k = sink_k[:, :, 0]  # one chunk of queries: its own sinks
    n_s = 0 if sink_k is None else min(sink_k.shape[2], max(lo, 0))  # the sinks before the window (or the keys)
    block_k, block_v = k[:, :, lo - k_start :], v[:, :, lo - k_start :]
    mask = None
    if T != n_k or n_s:
        # Sinks first (always visible), then query i sees window keys j <= i + (n_k - T).
        allowed = torch.ones(T, n_k, dtype=torch.bool, device=q.device).tril(diagonal=n_k - T)
        mask = torch.cat([allowed.new_ones(T, n_s), allowed], dim=1)
    if n_s:
        block_k = torch.cat([sink_k[:, :, :n_s], block_k], dim=2)
        block_v = torch.cat([sink_v[:, :, :n_s], block_v], dim=2)
    return F.scaled_dot_product_attention(
        q, block_k, block_v, attn_mask=mask, is_causal=mask is None, scale=scaling, enable_gqa=True
    )


# The window's backend for queries spanning several chunks: "auto" (FlexAttention on CUDA when torch has it, else
# one SDPA call: grouped_local_attention), "sdpa", "flex" (eager flex_attention off CUDA: for tests) or
# "flex-compiled" (compiled as on CUDA, on any device: for tests of the compiled path).
LOCAL_ATTENTION_BACKEND = "auto"
_FLEX: dict = {}


def _use_flex(q: torch.Tensor) -> bool:
    if LOCAL_ATTENTION_BACKEND in ("flex", "flex-compiled"):
        return True
    if LOCAL_ATTENTION_BACKEND != "auto" or not q.is_cuda or "failed" in _FLEX:
        return False
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flex_local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, k_start: int, scaling: float,
    chunk_size: int, window_chunks: int, sink_k: torch.Tensor | None = None, sink_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`local_attention` through FlexAttention with a block mask: only the (query block, key block) tiles that
    the window or the sinks reach are computed. The sinks are put before the keys; the mask is the window's rule
    (and the sinks before each query's window). Compiled on CUDA (torch.compile), eager elsewhere (slow: tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    S = 0 if sink_k is None else sink_k.shape[-2]
    copies = 1 if S == 0 or sink_k.dim() == 4 else sink_k.shape[2]
    if S:  # per-chunk sinks: one copy per query chunk, all before the keys
        sink_v = sink_v if copies == 1 else sink_v[:, :, None].expand(-1, -1, copies, -1, -1).flatten(2, 3)
        k, v = torch.cat([sink_k.flatten(2, 3) if copies > 1 else sink_k, k], dim=2), torch.cat([sink_v, v], dim=2)
    build = _flex_block_mask.__wrapped__ if _tracing() else _flex_block_mask
    block_mask = build(q_start, k_start, q.shape[2], k.shape[2], chunk_size, window_chunks, S, copies, q.device)
    attend = flex_attention
    if (q.is_cuda or LOCAL_ATTENTION_BACKEND == "flex-compiled") and not _tracing():
        if "compiled" not in _FLEX:
            # dynamic=None: the first call compiles for its shapes, a second shape recompiles once with dynamic
            # sizes, and later lengths reuse that graph. (dynamic=False recompiled for every length and, past
            # torch._dynamo's recompile limit of 8, fell back to eager flex_attention, which materialises the
            # whole score matrix: seen on an H200, where it made the window slower than full attention.)
            _FLEX["compiled"] = torch.compile(flex_attention, dynamic=None)
        attend = _FLEX["compiled"]
    return attend(q, k, v, block_mask=block_mask, scale=scaling, enable_gqa=True)


@functools.lru_cache(maxsize=4)
def _flex_block_mask(
    q_start: int, k_start: int, T: int, L: int, C: int, W: int, S: int, copies: int, device: torch.device,
):
    from torch.nn.attention.flex_attention import create_block_mask

    # The offsets enter the mask as tensors, not Python ints: compiled flex_attention guards on the mask function's
    # closure, and an int there would recompile it for every new offset (every piece of a stream).
    q0, k0 = torch.tensor(q_start, device=device), torch.tensor(k_start, device=device)
    c0, slots = torch.tensor(q_start // C, device=device), torch.tensor(copies * S, device=device)
    per_chunk = copies > 1

    def window(b, h, q_index, k_index):
        q_pos, k_pos = q_index + q0, k_index - slots + k0
        start = (q_pos // C - W) * C
        in_window = (k_index >= slots) & (k_pos <= q_pos) & (k_pos >= start)
        if not S:
            return in_window
        sink = (k_index < slots) & (k_index % S < torch.maximum(start, k0))
        if per_chunk:  # the copy of the query's own chunk
            sink = sink & (k_index // S == q_pos // C - c0)
        return in_window | sink

    return create_block_mask(window, None, None, T, L, device=device)


@functools.lru_cache(maxsize=4)
def _grouped_mask(
    q_start: int, k_start: int, T: int, C: int, W: int, m: int, S: int, copies: int, device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The additive mask (N, 1, R, span) of :func:`grouped_local_attention` (0 where a query sees a key slot, -inf
    elsewhere). It depends only on these numbers, so the layers of one forward (and the steps of a training run)
    share it; nobody writes to it."""
    c0, c1 = q_start // C, (q_start + T - 1) // C
    R, lead, N = m * C, W // m, -(-(c1 - c0 + 1) // m)
    q_lo = c0 * C
    key_lo = q_lo - lead * R
    slots = copies * S  # sink slots leading each key group: ``copies`` copies of the S sinks
    q_pos = q_lo + torch.arange(N, device=device)[:, None] * R + torch.arange(R, device=device)[None]  # (N, R)
    group = torch.arange(lead + 1, device=device)[:, None]  # (lead + 1, 1) key groups of a block
    slot = torch.arange(slots + R, device=device)[None]
    k_pos = (key_lo + (torch.arange(N, device=device)[:, None, None] + group) * R + slot - slots).flatten(1)
    is_sink = (slot < slots).expand(lead + 1, -1).flatten()[None, None]
    q_pos, k_pos = q_pos[:, :, None], k_pos[:, None, :]
    window_start = window_start_of(q_pos, C, W)
    visible = ~is_sink & (k_pos >= max(k_start, 0)) & (k_pos <= q_pos) & (k_pos >= window_start)
    if S:
        sink_index = (slot % S).expand(lead + 1, -1).flatten()[None, None]
        first_group = (group == 0).expand(-1, slots + R).flatten()[None, None]
        # The sinks of the block's first group, those before the window (and before the keys held); with per-chunk
        # sinks, the copy of the query's own chunk in its block.
        own = is_sink & first_group & (sink_index < torch.clamp(window_start, min=k_start))
        if copies > 1:
            copy = (slot // S).expand(lead + 1, -1).flatten()[None, None]
            own &= copy == (torch.arange(R, device=device) // C)[None, :, None]
        visible |= own
    valid_query = (q_pos >= q_start) & (q_pos < q_start + T)
    visible |= ~valid_query  # padding queries of the grid see everything (finite, discarded)
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))[:, None]


def _block_chunks(window_chunks: int, query_chunks: int, training: bool) -> int:
    """Chunks per query block: at most BLOCK_CHUNKS (BLOCK_CHUNKS_INFERENCE without gradients) and the number of query
    chunks, dividing window_chunks."""
    limit = max(1, min(BLOCK_CHUNKS if training else BLOCK_CHUNKS_INFERENCE, query_chunks))
    return max(m for m in range(1, limit + 1) if window_chunks % m == 0)


def grouped_local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, k_start: int, scaling: float,
    chunk_size: int, window_chunks: int, sink_k: torch.Tensor | None = None, sink_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`local_attention` of queries spanning several chunks (training, prefill) in one SDPA call.

    The queries, on the chunk grid, form N blocks of m chunks (R = m·C queries). The keys are laid out in groups of
    m chunks, each group led by a copy of the S sinks: [sinks | R keys] per group, so that block n's keys (its
    window's W/m groups and its own group) are one contiguous, overlapping stretch of that layout. ``unfold`` makes
    them a view (no copy of the windows), batch and heads are folded into SDPA's head axis (kv head b·H + h serves
    query heads b·Hq + h·G.., as enable_gqa maps them), and a boolean mask (N, 1, R, span) keeps, per query, its
    window's keys up to itself and the sinks of the block's first group that lie before its window. Per-chunk sinks
    (B, H, chunks, S, D) lead each group with m copies, [m·S sinks | R keys], copy j holding those of the block's
    j-th query chunk, and the mask gives each query its own chunk's copy. Gradients of the views add up in
    ``unfold``'s backward (the per-chunk slices they replace each allocated a full-size gradient).
    """
    B, Hq, T, D = q.shape
    H, C, W = k.shape[1], chunk_size, window_chunks
    c0, c1 = q_start // C, (q_start + T - 1) // C
    m = _block_chunks(W, c1 - c0 + 1, training=torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))
    R, lead = m * C, W // m  # queries per block; key groups before a block's own
    N = -(-(c1 - c0 + 1) // m)
    q_lo = c0 * C  # position of the first query slot
    S = 0 if sink_k is None else sink_k.shape[-2]
    per_chunk = S > 0 and sink_k.dim() == 5
    copies = m if per_chunk else 1  # per-chunk sinks: each key group carries one copy per query chunk of a block
    pad_front, pad_back = q_start - q_lo, N * R - T - (q_start - q_lo)
    grid = pad_tokens(q, pad_front, pad_back)  # (B, Hq, N * R, D)
    grid = grid.view(B, Hq, N, R, D).permute(2, 0, 1, 3, 4).reshape(N, B * Hq, R, D)

    key_lo = q_lo - lead * R  # position of the first key slot
    cut = max(0, key_lo - k_start)

    def group_sinks(sinks: torch.Tensor) -> torch.Tensor:
        """(B, H, lead + N, copies · S, D): the sinks leading each key group (group n leads block n's keys)."""
        if sinks.dim() == 5:  # group n, copy j: the sinks of the block's j-th query chunk n·m + j
            chunk = torch.arange(lead + N, device=sinks.device)[:, None] * m + torch.arange(m, device=sinks.device)
            chunk = chunk.clamp(max=sinks.shape[2] - 1).flatten()  # groups past the last block: never visible
            return sinks.index_select(2, chunk).reshape(B, H, lead + N, m * S, D)
        return sinks[:, :, None, None].expand(B, H, lead + N, copies, S, D).reshape(B, H, lead + N, copies * S, D)

    def layout(x: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
        x = pad_tokens(x[:, :, cut:], max(0, k_start - key_lo), q_lo + N * R - (q_start + T))
        if S:
            groups = x.view(B, H, lead + N, R, D)
            x = torch.cat([group_sinks(sinks), groups], dim=3).view(B, H, -1, D)
        span = (lead + 1) * (copies * S + R)
        return x.unfold(2, span, copies * S + R).permute(2, 0, 1, 4, 3).reshape(N, B * H, span, D)

    keys, values = layout(k, sink_k), layout(v, sink_v)

    build = _grouped_mask.__wrapped__ if _tracing() else _grouped_mask
    mask = build(q_start, k_start, T, C, W, m, S, copies, q.device, q.dtype)
    out = F.scaled_dot_product_attention(grid, keys, values, attn_mask=mask, scale=scaling, enable_gqa=True)
    out = out.view(N, B, Hq, R, D).permute(1, 2, 0, 3, 4).reshape(B, Hq, N * R, D)
    return out[:, :, pad_front : pad_front + T]


def explicit_local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, k_start: int, scaling: float,
    chunk_size: int, window_chunks: int | None, sink_k: torch.Tensor | None = None, sink_v: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`local_attention` through one explicit masked softmax, also returning its weights.

    Same arguments and output; the weights are (B, Hq, T, q_start + T) over the stream positions 0..q_start+T-1:
    each query's softmax weights over the keys it sees (its window, and the attention sinks before the window),
    zero everywhere else (tokens in memory, tokens outside the window, the future). Only used when attention weights
    are asked for (``output_attentions=True``): it materialises the (T, L) scores. The output is computed from the
    returned weights (as Llama's eager attention returns the weights it multiplies the values by), so a gradient
    reaches them (``retain_grad``) and flows through them.
    """
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    q_pos = torch.arange(q_start, q_start + T, device=q.device)[:, None]
    k_pos = torch.arange(k_start, k_start + k.shape[2], device=q.device)[None]
    allowed = k_pos <= q_pos
    if window_chunks is not None:
        allowed &= k_pos >= window_start_of(q_pos, chunk_size, window_chunks)
    num_sinks = 0 if sink_k is None else sink_k.shape[-2]
    precision = torch.promote_types(q.dtype, torch.float32)  # at least float32 (float64 stays float64)
    scores = (q @ k.repeat_interleave(G, dim=1).transpose(-1, -2)).to(precision) * scaling
    if num_sinks:
        # A sink is seen through this copy only before the window (inside it, through the window's own key) or
        # before the keys held (a state restored without its window).
        sink_allowed = torch.arange(num_sinks, device=q.device)[None] < torch.clamp(
            window_start_of(q_pos, chunk_size, window_chunks), min=k_start
        )
        allowed = torch.cat([sink_allowed, allowed], dim=1)
        if sink_k.dim() == 5:  # each query's own chunk's sinks
            chunk = (q_pos[:, 0] // chunk_size - q_start // chunk_size)
            own = sink_k.index_select(2, chunk).repeat_interleave(G, dim=1)  # (B, Hq, T, S, D)
            sink_scores = torch.einsum("bhtd,bhtsd->bhts", q, own)
        else:
            sink_scores = q @ sink_k.repeat_interleave(G, dim=1).transpose(-1, -2)
        scores = torch.cat([sink_scores.to(precision) * scaling, scores], dim=-1)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    full = weights.new_zeros(B, Hq, T, q_start + T)
    full[..., k_start:] = weights[..., num_sinks:]
    full[..., :num_sinks] += weights[..., :num_sinks]
    full = full.to(v.dtype)
    return weighted_values(full, v, k_start, sink_v).to(q.dtype), full.to(q.dtype)


def weighted_values(
    weights: torch.Tensor, v: torch.Tensor, k_start: int, sink_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """The output of :func:`explicit_local_attention` from its weights (B, Hq, T, positions) over the stream and the
    values v (B, H, L, D) of the keys held (positions ``k_start..``) and ``sink_v`` (B, H, S, D) of the sinks.

    A position holds the weight of its window key or of its sink copy, never both (a sink's copy is seen only before
    the window and before the keys held), and a sink's value is its token's value: so the output is the weights over
    the keys held times their values, plus those over the sinks before them times the sinks' values."""
    G = weights.shape[1] // v.shape[1]
    output = weights[..., k_start:] @ v.repeat_interleave(G, dim=1)
    before = 0 if sink_v is None else min(sink_v.shape[2], k_start)
    if before:
        output = output + weights[..., :before] @ sink_v[:, :, :before].repeat_interleave(G, dim=1)
    return output


class _GateClamp(torch.autograd.Function):
    """clamp(x, 0, 1) whose gradient is kept inside [0, 1] (a gate at exactly 0 still learns) and, outside, only
    where descent moves x back inside (so the raw parameter cannot drift away while having no effect)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        inward = ((x >= 0) & (x <= 1)) | ((x < 0) & (grad < 0)) | ((x > 1) & (grad > 0))
        return grad * inward


def gate_clamp(x: torch.Tensor) -> torch.Tensor:
    return _GateClamp.apply(x)


def memory_layout(config: SenriConfig, training: bool) -> MemoryLayout | None:
    """The layout of a memory layer's several memories, or None for the single memory (see SenriConfig)."""
    slots = config.memory_slots(training)
    if slots is None:
        return None
    read = "multi" if config.memory_type == "single" else config.memory_type  # banks of single memories mix like multi
    return MemoryLayout(
        read, slots, num_memories=1 if config.memory_type == "single" else config.num_memories,
        num_banks=config.num_memory_banks, segments_per_bank=config.segments_per_bank, top_k=config.top_k_memories,
        relevance=config.memory_relevance,
    )


class SenriAttention(nn.Module):
    """GQA attention over the block-sliding window (RoPE) plus, on memory layers, the compressive memory (NoPE)."""

    def __init__(self, config: SenriConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.chunk_size = config.chunk_size
        self.has_memory = self.layer_type in MEMORY_LAYER_TYPES
        self.has_local = self.layer_type != "memory_only"
        # memory_only layers read every earlier chunk from memory (window of zero chunks + intra-chunk term).
        self.window_chunks = None if self.layer_type == "full_attention" else (
            config.window_chunks if self.has_local else 0
        )
        # Attention sinks belong to windows: full attention sees them anyway, memory_only layers write them to memory.
        self.num_sink_tokens = config.num_sink_tokens if self.has_local and self.window_chunks is not None else 0

        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        output_bias = bias if config.attention_output_bias is None else config.attention_output_bias
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=output_bias)
        if self.layer_type == "memory":
            # Weight of the memory path per query head (eq. 6 mixes with sigmoid(β); we use a clamped linear gate
            # so that 0 is reachable exactly and the gradient at 0 is not squashed).
            self.memory_gate = nn.Parameter(torch.full((self.num_heads,), float(config.memory_gate_init)))
        if self.has_memory and config.memory_qk_map:
            # Per KV head maps of the raw (NoPE) queries and keys before φ, for the memory path only: q and k were
            # trained for softmax attention with RoPE, the memory reads them without it. Identity at start, so a
            # converted model still computes exactly what its source did.
            eye = torch.eye(self.head_dim).expand(self.num_kv_heads, -1, -1)
            self.memory_query_map = nn.Parameter(eye.clone())
            self.memory_key_map = nn.Parameter(eye.clone())
        if self.has_memory and config.memory_type == "hierarchical":
            # Expansion gate g = sigmoid(w_h · q + b_h) per query head, from the raw (NoPE) query; 0 init: g = 0.5.
            self.memory_expansion_weight = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))
            self.memory_expansion_bias = nn.Parameter(torch.zeros(self.num_heads))
        self.memory_layouts = {training: memory_layout(config, training) for training in (True, False)}

    def check_state(self, state: LayerState) -> None:
        """Refuse a memory of the wrong layout for this mode (a routed state made in training, used in eval...).
        SenriModel calls it for every layer before any layer advances the cache, so a refusal changes nothing."""
        M = state.M
        if M is None or not self.has_memory:
            return
        layout = self.memory_layouts[self.training]
        slots = None if layout is None else layout.num_slots
        expected = "a single memory (B, H, D, D)" if slots is None else f"{slots} memories (B, H, {slots}, D, D)"
        features = self.config.memory_features.dim(self.head_dim)
        if slots is None and M.dim() == 4 and M.shape[2] != features:
            raise RuntimeError(
                f"layer {self.layer_idx}: the cache's memory has {M.shape[2]} features per head (M {tuple(M.shape)}) "
                f"but memory_feature_map={self.config.memory_feature_map!r} writes {features}: a state continues "
                "only a model with the same feature map"
            )
        if (M.dim() == 4) if slots is None else (M.dim() == 5 and M.shape[2] == slots):
            return
        held = "a single memory" if M.dim() == 4 else f"{M.shape[2]} memories"
        mode = "training" if self.training else "eval"
        hint = (
            " A routed memory is a single memory in training mode and head_dim memories in eval mode: a state made in"
            " one mode is not valid in the other; start a new SenriCache after model.train() / model.eval()."
            if self.config.memory_type == "routed" else ""
        )
        raise RuntimeError(
            f"layer {self.layer_idx}: the cache holds {held} (M {tuple(M.shape)}) but memory_type="
            f"{self.config.memory_type!r} in {mode} mode expects {expected}.{hint}"
        )

    def first_position_to_rotate(self, state: LayerState) -> int:
        """The first position whose key this layer must rotate now: the next token's when the window's rotated keys
        are kept (or nothing is cached), else the window's start."""
        if not self.has_local or state.keys is None or (
            state.rotated_keys is not None and state.rotated_keys.shape[2] == state.keys.shape[2]
        ):
            return state.seen_tokens
        return state.window_start

    def _rotated_sinks(self, sink_keys: torch.Tensor, sink_tables: tuple, P: int, T: int) -> torch.Tensor:
        """The sinks' keys (B, H, n, D) rotated where the queries at P..P+T-1 see them: (B, H, n, D) when every
        query chunk sees them at the same positions, else (B, H, chunks, n, D) per query chunk."""
        cos, sin, first, shifts = sink_tables
        c0, c1 = P // self.chunk_size - first, (P + T - 1) // self.chunk_size - first
        B, H, n, D = sink_keys.shape
        if shifts[c0] == shifts[c1]:  # shifts never decrease along the stream: one rotation for the whole call
            return rope(sink_keys, cos[c0 : c0 + 1, :n], sin[c0 : c0 + 1, :n])
        chunks = c1 - c0 + 1
        expanded = sink_keys[:, :, None].expand(B, H, chunks, n, D).reshape(B, H, chunks * n, D)
        rotated = rope(expanded, cos[c0 : c1 + 1, :n].reshape(1, -1, D), sin[c0 : c1 + 1, :n].reshape(1, -1, D))
        return rotated.view(B, H, chunks, n, D)

    def gate_values(self) -> torch.Tensor | None:
        return None if self.layer_type != "memory" else self.memory_gate.detach().clamp(0.0, 1.0)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple,
        state: LayerState, output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, LayerState]:
        """Returns the attention output (B, T, hidden), the window attention weights (B, Hq, T, P + T) when
        ``output_attentions`` (see :func:`explicit_local_attention`; else None) and the layer's new state.

        The weights are those of the softmax (local) path only. On a ``memory`` layer that path is mixed with the
        memory read, output = (1 − g_h) · local + g_h · memory per query head (g_h = the clamped ``memory_gate``):
        the weights still sum to 1 over the window and sinks and do not show the memory's share (the memory read is
        a normalised linear attention over every token that left the window). ``memory_only`` layers have no
        softmax path: their weights are all zero.
        """
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = self.k_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        v = self.v_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        attend = self._attend if state.offsets is None else self._attend_rows
        output, weights, new_state = attend(q, k, v, position_embeddings, state, output_attentions)
        output = output.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(output), weights, new_state

    def _attend_rows(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_embeddings: tuple, state: LayerState,
        output_attentions: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, LayerState]:
        """A left-padded batch: each row's real tokens through :meth:`_attend` with that row's own state and
        positions (LayerState.row), exactly as the row alone; padding enters neither window nor memory, and its
        outputs (and attention weights) are zero."""
        B, Hq, T, D = q.shape
        P = state.seen_tokens
        outputs, weights, rows, reattach = [], [], [], []
        for b in range(B):
            row = state.row(b)
            first = min(T, max(0, state.offsets[b] - P))  # this call's first real token of row b
            out_b = q.new_zeros(1, Hq, T - first, D)
            w_b = q.new_zeros(1, Hq, T - first, P + T - state.offsets[b]) if output_attentions else None
            if first < T:
                out_b, w_b, row = self._attend(
                    q[b : b + 1, :, first:], k[b : b + 1, :, first:], v[b : b + 1, :, first:], position_embeddings,
                    row, output_attentions, reattach=reattach,
                )
            outputs.append(pad_tokens(out_b, first, 0))
            if output_attentions:  # the row's positions 0.. are stream positions offsets[b]..
                weights.append(F.pad(w_b, (P + T - w_b.shape[-1], 0, first, 0)))
            if len(reattach) == len(rows):
                reattach.append(None)
            rows.append(row)
        new_state = LayerState.stack_rows(rows, state.offsets, P + T)
        if not output_attentions:
            return torch.cat(outputs), None, new_state
        weights = torch.cat(weights)
        for b, local_from in enumerate(reattach):
            if local_from is not None:
                # Row b's local output again, from its weights as returned (a slice of the batch's): the same value
                # (added as a difference that is exactly zero), but the gradient of the output reaches the returned
                # weights, as it does without padding.
                first = min(T, max(0, state.offsets[b] - P))
                own = weights[b : b + 1, :, first:, state.offsets[b] :].contiguous()
                outputs[b] = outputs[b] + pad_tokens(local_from(own), first, 0)
        return torch.cat(outputs), weights, new_state

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_embeddings: tuple, state: LayerState,
        output_attentions: bool, reattach: list | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, LayerState]:
        """Window (+ sinks) and memory paths of q (B, Hq, T, D), k, v (B, H, T, D) from ``state`` (no padding).
        Returns the output before o_proj (B, Hq, T, D), the window weights or None, and the new state.

        ``reattach`` (a list; padded rows, with ``output_attentions`` and gradients): gets a function of a copy of
        the weights returning what to add to the output so that it depends on that copy instead (its value: zero)."""
        B, T = q.shape[0], q.shape[2]
        P, k_start = state.seen_tokens, state.window_start
        new_keys = k
        if state.keys is not None:
            k, v = torch.cat([state.keys, k], dim=2), torch.cat([state.values, v], dim=2)  # positions k_start..P+T-1
        written, new_written = state.written_chunks, state.written_chunks
        if self.window_chunks is not None:
            # Chunks that every query of this call has pushed out of its window leave it (and enter memory).
            new_written = max(written, (P + T - 1) // self.chunk_size - self.window_chunks)

        sink_keys, sink_values = state.sink_keys, state.sink_values
        if self.num_sink_tokens and (sink_keys is None or sink_keys.shape[2] < self.num_sink_tokens):
            # Only while the stream is shorter than S: no chunk has left any window yet (S <= chunk_size).
            if k_start != 0:
                raise RuntimeError(f"layer {self.layer_idx}: sinks incomplete but the window starts at {k_start}")
            sink_keys, sink_values = k[:, :, : self.num_sink_tokens], v[:, :, : self.num_sink_tokens]

        output = weights = None
        if self.has_local:
            cos, sin, rope_start, sink_tables = position_embeddings
            sink_k = None
            if self.num_sink_tokens:
                sink_k = self._rotated_sinks(sink_keys, sink_tables, P, T)
            q_cos, q_sin = cos[:, P - rope_start : P + T - rope_start], sin[:, P - rope_start : P + T - rope_start]
            q_rope = rope(q, q_cos, q_sin)
            if self.first_position_to_rotate(state) == P:
                # The window's keys were rotated when they arrived (RoPE is absolute): rotate only the new ones.
                k_rope = rope(new_keys, q_cos, q_sin)
                if state.keys is not None:
                    k_rope = torch.cat([state.rotated_keys, k_rope], dim=2)
            else:
                k_cos = cos[:, k_start - rope_start : P + T - rope_start]
                k_sin = sin[:, k_start - rope_start : P + T - rope_start]
                k_rope = rope(k, k_cos, k_sin)
            attend = explicit_local_attention if output_attentions else local_attention
            output = attend(
                q_rope, k_rope, v, P, k_start, self.scaling, self.chunk_size, self.window_chunks, sink_k, sink_values
            )  # (B, Hq, T, D)
            if output_attentions:
                output, weights = output
                local, local_values, local_sinks = output, v, sink_values
        elif output_attentions:
            weights = q.new_zeros(B, self.num_heads, T, P + T)

        M, z = state.M, state.z
        if self.has_memory:
            if written * self.chunk_size != k_start:
                raise RuntimeError(f"layer {self.layer_idx}: window starts at {k_start}, memory ends at chunk {written}")
            layout = self.memory_layouts[self.training]
            slots = None if layout is None else layout.num_slots
            features = self.config.memory_features
            if M is None:
                M, z = empty_memory(B, self.num_kv_heads, self.head_dim, device=q.device, num_slots=slots,
                                    feature_dim=features.dim(self.head_dim))
            # Computed from the config, not held as a tensor attribute: a model built on the meta device by
            # from_pretrained would otherwise keep a meta tensor (ALiBi decay factors are not weights).
            decay = alibi_decay(self.num_kv_heads, self.config.alibi_scale) if self.config.use_alibi else None
            common = dict(intra_chunk=not self.has_local, decay=decay, num_sink_tokens=self.num_sink_tokens)
            if layout is None:
                common["feature_map"] = features
            memory_q, memory_k = q, k
            if self.config.memory_qk_map:
                G = self.num_groups
                memory_q = torch.einsum(
                    "bhgtd,hde->bhgte", q.view(B, self.num_kv_heads, G, T, self.head_dim),
                    self.memory_query_map.to(q.dtype),
                ).reshape(q.shape)
                memory_k = torch.einsum("bhtd,hde->bhte", k, self.memory_key_map.to(k.dtype))
            args = (memory_q, memory_k, v, M, z, P, written, new_written, self.chunk_size, self.window_chunks,
                    self.config.memory_update, self.config.memory_eps)
            if layout is None:
                memory_output, M, z = memory_attention(*args, **common)
            else:
                expansion = None
                if layout.read == "hierarchical":
                    logits = torch.einsum("bhtd,hd->bht", memory_q, self.memory_expansion_weight.to(q.dtype))
                    expansion = torch.sigmoid(logits + self.memory_expansion_bias.to(q.dtype)[:, None])
                memory_output, M, z = slotted_memory_attention(*args, layout, expansion=expansion, **common)
            if output is None:
                output = memory_output.to(q.dtype)
            else:
                gate = gate_clamp(self.memory_gate).to(output.dtype)[None, :, None, None]
                output = torch.lerp(output, memory_output.to(output.dtype), gate)  # (1 − g) local + g memory

        if reattach is not None and weights is not None and weights.requires_grad:
            share = 1.0 if self.layer_type != "memory" else 1 - gate  # d output / d local

            def local_from(copy: torch.Tensor) -> torch.Tensor:
                return share * (weighted_values(copy, local_values, k_start, local_sinks).to(q.dtype) - local)

            reattach.append(local_from)

        keep_from = (new_written - written) * self.chunk_size
        new_state = LayerState(
            keys=k[:, :, keep_from:], values=v[:, :, keep_from:], M=M, z=z, seen_tokens=P + T,
            written_chunks=new_written, rotated_keys=k_rope[:, :, keep_from:] if self.has_local else None,
            sink_keys=sink_keys if self.num_sink_tokens else None, sink_values=sink_values if self.num_sink_tokens else None,
        )
        return output, weights, new_state


class SenriDecoderLayer(GradientCheckpointingLayer):
    """A Llama block around SenriAttention. Under gradient checkpointing (``gradient_checkpointing_enable()``) its
    activations are recomputed in the backward pass: safe because a layer never mutates the state it reads."""

    def __init__(self, config: SenriConfig, layer_idx: int):
        super().__init__()
        self.self_attn = SenriAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple,
        state: LayerState, output_attentions: bool = False,
    ) -> tuple[torch.Tensor, LayerState]:
        attn_output, _, state = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, state, output_attentions=output_attentions
        )
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, state


def _tracing() -> bool:
    """Under torch.compile / torch.export / jit tracing: checks on tensor values must not branch in Python."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _require(condition: torch.Tensor, message: str) -> None:
    """Raise ValueError(message) unless the boolean tensor ``condition`` holds; when traced, the check is a runtime
    assertion in the graph (torch._assert_async) instead of a Python branch on a tensor value."""
    if _tracing():
        torch._assert_async(condition, message)
    elif not bool(condition):
        raise ValueError(message)


def _pad_offsets(
    attention_mask: torch.Tensor, P: int, T: int, offsets: tuple[int, ...] | None,
) -> tuple[int, ...] | None:
    """Per row, the padding tokens before its first real token, read from a 2D attention mask (1 real, 0 padding)
    over the new tokens (B, T) or over the whole stream (B, P + T) as generate passes it; None when no row is padded.

    Only left padding: a row's zeros all come before its first real token, so padding can only extend a row that has
    no real token yet, and a mask over the stream must agree with the padding the cache already holds.
    """
    B, width = attention_mask.shape
    if width not in (T, P + T):
        raise ValueError(f"attention_mask has {width} columns; expected {T} (the new tokens) or {P + T} (the stream)")
    old = torch.tensor(offsets if offsets is not None else [0] * B, device=attention_mask.device)
    if old.shape[0] != B:
        raise ValueError(f"cache holds batch size {old.shape[0]} but the attention_mask has batch size {B}")
    real = attention_mask.bool()
    start = P + T - width  # stream position of the mask's first column
    first_real = torch.where(real.any(dim=1), real.int().argmax(dim=1), width) + start
    new = torch.where(old < P, old, first_real)  # rows that have real tokens keep their padding
    expected = torch.arange(start, P + T, device=real.device)[None] >= new[:, None]
    wrong = (real != expected).any(dim=1).nonzero().flatten().tolist()
    if wrong:
        raise ValueError(
            f"attention_mask: Senri takes left padding only (each row: zeros, then ones; no padding once a row has a "
            f"real token, and a mask over the stream that agrees with the cache's padding); rows {wrong} are not"
        )
    new = tuple(new.tolist())
    return None if offsets is None and not any(new) else new


def _check_inputs(
    attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, P: int, T: int,
    offsets: tuple[int, ...] | None,
) -> None:
    """Refuse position_ids that are not each row's own positions continuing the cache (Senri derives positions from
    the cache and the padding); position_ids at padding are ignored. When traced: no padding (runtime assertion)."""
    if _tracing():
        if attention_mask is not None and attention_mask.dim() == 2:
            _require(attention_mask.all(), "left padding is not supported under torch.compile / torch.export")
        if position_ids is not None:
            _require((position_ids == torch.arange(P, P + T, device=position_ids.device)).all(),
                     f"position_ids must continue the cache ({P}..{P + T - 1}); Senri derives positions from the cache")
        return
    if position_ids is None:
        return
    expected = torch.arange(P, P + T, device=position_ids.device)[None]
    if offsets is not None:
        expected = expected - torch.tensor(offsets, device=position_ids.device)[:, None]
    real = expected >= 0
    if not bool(((position_ids == expected) | ~real).all()):
        where = "" if offsets is None else " (each row's own, from its first real token)"
        raise ValueError(f"position_ids must continue the cache{where}: {P}..{P + T - 1} less each row's padding; "
                         "Senri derives positions from the cache")


def _cache_argument(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The streaming state passed as ``cache`` (transformers >= 5.24) or by its former name ``past_key_values``."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("give the streaming state as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


class SenriPreTrainedModel(PreTrainedModel):
    config_class = SenriConfig
    config: SenriConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SenriDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    # A memory write cannot be undone, so the cache cannot be cropped back to an earlier length: generate refuses the
    # modes that would need it (assisted and prompt-lookup decoding) with its own error, as for recurrent models.
    _is_stateful = True
    # output_hidden_states: the embeddings, then each decoder layer's output (the last one after the final norm);
    # output_attentions: each layer's window attention weights (SenriAttention.forward says what they mean).
    _can_record_outputs = {
        "hidden_states": SenriDecoderLayer,
        "attentions": OutputRecorder(SenriAttention, index=1),
    }

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SenriAttention) and module.layer_type == "memory":
            init.constant_(module.memory_gate, float(self.config.memory_gate_init))
        if isinstance(module, SenriAttention) and hasattr(module, "memory_query_map"):
            eye = torch.eye(module.head_dim).expand(module.num_kv_heads, -1, -1)
            init.copy_(module.memory_query_map, eye)
            init.copy_(module.memory_key_map, eye)
        if isinstance(module, SenriAttention) and hasattr(module, "memory_expansion_weight"):
            init.zeros_(module.memory_expansion_weight)
            init.zeros_(module.memory_expansion_bias)


class SenriModel(SenriPreTrainedModel):
    def __init__(self, config: SenriConfig):
        config._validate_senri()  # again: a list field (layer_types) may have been changed in place
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([SenriDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = SenriRotaryEmbedding(config=config)
        self.post_init()

    def sink_tables(self, x: torch.Tensor, P: int, T: int, offsets: tuple[int, ...] | None) -> tuple | None:
        """RoPE tables of the attention sinks as each query chunk of this call sees them (:func:`sink_shift`):
        (cos, sin) (chunks, S, D) for the chunks from ``first`` on (of every row's own positions), and ``first``."""
        S, C = self.config.num_sink_tokens, self.config.chunk_size
        if not S:
            return None
        first, last = max(0, P - max(offsets or [0])) // C, (P + T - 1 - min(offsets or [0])) // C
        shifts = [sink_shift(c, C, self.config.sink_distance) for c in range(first, last + 1)]
        positions = torch.tensor(shifts, device=x.device)[:, None] + torch.arange(S, device=x.device)[None]
        cos, sin = self.rotary_emb(x, positions.view(1, -1))
        return cos.view(len(shifts), S, -1), sin.view(len(shifts), S, -1), first, shifts

    @merge_with_config_defaults  # use_cache=None: config.use_cache
    @capture_outputs  # output_hidden_states / output_attentions / return_dict
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        cache = _cache_argument(cache, past_key_values)
        # The keyword, else the config: capture_outputs records the attentions by the same rule, and they exist only if
        # the layers take the explicit path (output_hidden_states needs nothing here: the hooks record them).
        output_attentions = bool(kwargs.get("output_attentions", getattr(self.config, "output_attentions", False)))
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, T, _ = inputs_embeds.shape
        if T == 0:
            raise ValueError("input has no tokens (sequence length 0)")
        if cache is None:
            cache = SenriCache(self.config, batch_size=B)  # no cache given: start from an empty memory
        elif not isinstance(cache, SenriCache):
            raise TypeError(
                f"cache must be a SenriCache, got {type(cache).__name__}; "
                "create one with SenriCache(model.config, batch_size=...)"
            )
        P = cache.seen_tokens
        offsets = cache.pad_offsets  # a left-padded batch: per row, its padding tokens (None: no padding)
        if attention_mask is not None and attention_mask.dim() == 2 and not _tracing():
            offsets = _pad_offsets(attention_mask, P, T, offsets)
        _check_inputs(attention_mask, position_ids, P, T, offsets)
        states = [cache.layer_state(i) for i in range(len(self.layers))]
        if offsets is not None:
            states = [state if state.offsets == offsets else state.with_offsets(offsets) for state in states]
        # RoPE tables from the first position a layer must rotate in this call: the new tokens' only, unless a
        # window's rotated keys are missing (a restored state), then from that window's start. Padded rows have their
        # own positions (from 0 on their first real token): the tables span every row's.
        rows = [states] if offsets is None else [[state.row(b) for state in states] for b in range(B)]
        rope_start = min([max(0, P - max(offsets or [0]))] + [
            layer.self_attn.first_position_to_rotate(row[i]) for row in rows for i, layer in enumerate(self.layers)
        ])
        positions = torch.arange(rope_start, P + T - min(offsets or [0]), device=inputs_embeds.device)[None]
        cos, sin = self.rotary_emb(inputs_embeds, positions)
        position_embeddings = (cos, sin, rope_start, self.sink_tables(inputs_embeds, P, T, offsets))

        for idx, layer in enumerate(self.layers):  # before any layer advances the cache
            layer.self_attn.check_state(states[idx])
        hidden_states = inputs_embeds
        for idx, layer in enumerate(self.layers):
            state = states[idx]
            if state.keys is not None and state.keys.shape[0] != B:
                raise ValueError(f"cache holds batch size {state.keys.shape[0]} but the input has batch size {B}")
            hidden_states, state = layer(hidden_states, position_embeddings, state, output_attentions=output_attentions)
            cache.set_layer_state(idx, state)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)


class SenriForCausalLM(SenriPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SenriConfig):
        super().__init__(config)
        self.model = SenriModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple  # return_dict=False: a tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=_cache_argument(cache, past_key_values), inputs_embeds=inputs_embeds, use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, **kwargs):
        """``GenerationMixin.generate`` with a fresh :class:`SenriCache` unless one is passed.

        Without a cache (``use_cache=False``, as an argument or from the generation config) no ``cache`` argument is
        passed at all: every step then recomputes the whole sequence in one pass (which equals streaming it), and
        generate's modes that need a cache object to reorder (beam search, beam sampling) see none."""
        cache = _cache_argument(kwargs.pop("cache", None), kwargs.pop("past_key_values", None))
        if cache is None and self._generate_uses_cache(kwargs):
            reference = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
            batch_size = 1 if reference is None else reference.shape[0]
            cache = SenriCache(self.config, batch_size=batch_size)
        if cache is not None:
            kwargs["cache"] = cache
        return super().generate(inputs, **kwargs)

    def _generate_uses_cache(self, kwargs: dict) -> bool:
        """Whether generate will run with a cache: ``use_cache`` as passed, else from the ``generation_config``
        passed, else the model's generation config (True unless set otherwise)."""
        if kwargs.get("use_cache") is not None:
            return bool(kwargs["use_cache"])
        config = kwargs.get("generation_config") or self.generation_config
        return getattr(config, "use_cache", True) is not False

    def memory_gate_values(self) -> dict[int, torch.Tensor]:
        """Per memory layer, the memory path's weight per query head (in [0, 1])."""
        return {
            idx: layer.self_attn.gate_values()
            for idx, layer in enumerate(self.model.layers)
            if layer.self_attn.layer_type == "memory"
        }

    def new_cache(self, batch_size: int = 1) -> SenriCache:
        """An empty streaming state (a memory reset)."""
        return SenriCache(self.config, batch_size=batch_size)


def unwrap_peft(model: Any) -> Any:
    """The model itself, or the one a peft wrapper (LoRA adapters) holds: the SenriForCausalLM with its config."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# A saved (or pushed) model carries its code: save_pretrained copies this file and the modules it imports (cache,
# configuration_senri, memory, io) and writes auto_map to config.json, so that
# AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True) works where senri is not installed.
SenriModel.register_for_auto_class("AutoModel")
SenriForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["SenriPreTrainedModel", "SenriModel", "SenriForCausalLM", "SenriAttention", "SenriDecoderLayer",
           "memory_layout", "unwrap_peft"]
