"""Would an exact store chosen by the memory's own recall error (as LoLA chooses) keep a needle? A diagnostic.

LoLA keeps, beside a linear memory, a small exact store of the key/value pairs the memory recalls worst, and reads
them with the window's softmax. Whether that can help a given task depends on one measurable thing: do the
needle's tokens rank near the top of the recall errors among everything the memory writes? If they do not, a store
of fixed size chosen this way never holds them, however it is read.

:func:`recall_errors` rebuilds, for every memory layer, what the memory wrote during one forward of a prompt: the
keys and values from the layer's own projections (captured by hooks, the memory's key map applied), and the
memory's state before each chunk from its own update rule (:func:`senri.model.memory.memory_states`; a test holds
the last state equal to the cache's). A written token's recall error is ``‖v − φ(k) M / (φ(k)·z + eps)‖`` with the
state before its chunk was written, per key/value head: the selection score LoLA uses; ``relative`` divides it by
``‖v‖`` (what the memory misses as a share of what was written, so that tokens with large values do not rank first
for their size alone).
:func:`needle_ranks` then says, per layer and head, where the needle's best token ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..model.cache import SenriCache
from ..model.memory import MEMORY_DTYPE, alibi_decay, empty_memory, memory_states, sink_keep_mask
from ..model.modeling_senri import unwrap_peft
from .read_fidelity import layer_projections


def memory_writes(model: Any, ids: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """Per memory layer, what the memory wrote while reading ``ids`` (1, T) in one forward: ``error`` (H, W), the
    recall error of each of the W tokens written (positions 0..W-1, per key/value head; the attention sinks, never
    written, are NaN), ``relative`` (H, W), the same divided by the value's norm, and ``M``, ``z``, the memory
    rebuilt after the last write."""
    inner = unwrap_peft(model)
    config = inner.config
    layers = {i: inner.model.layers[i].self_attn for i in config.memory_layers}
    if any(attn.memory_layouts[False] is not None for attn in layers.values()):
        raise ValueError("memory_writes reads single memories (memory_type 'single'); this model's have slots")
    out = {}
    C, S = config.chunk_size, config.num_sink_tokens
    for i, p in layer_projections(model, ids).items():
        attn = layers[i]
        written = p["written"]
        H, D = attn.num_kv_heads, attn.head_dim
        k, v = p["mk"][None, :, :written], p["v"][None, :, :written]  # the memory's keys (its key map applied)
        N = written // C
        keep = sink_keep_mask(0, written, S, device=ids.device)
        decay = alibi_decay(H, config.alibi_scale) if config.use_alibi else None
        features = config.memory_features
        M, z = empty_memory(1, H, D, device=ids.device, feature_dim=features.dim(D))
        with torch.no_grad():
            Ms, zs = memory_states(k.view(1, H, N, C, D), v.view(1, H, N, C, D), M, z, config.memory_update,
                                   config.memory_eps, decay=decay, keep=None if keep is None else keep.view(N, C),
                                   feature_map=features)
            sk = features(k.to(MEMORY_DTYPE)).view(1, H, N, C, -1)
            read = (sk @ Ms[:, :, :N]) / (sk @ zs[:, :, :N].unsqueeze(-1) + config.memory_eps)
            values = v.to(MEMORY_DTYPE).view(1, H, N, C, D)
            error = (values - read).norm(dim=-1).view(H, written)
            relative = error / values.norm(dim=-1).view(H, written).clamp(min=torch.finfo(MEMORY_DTYPE).tiny)
        if keep is not None:
            error[:, keep == 0] = float("nan")
            relative[:, keep == 0] = float("nan")
        out[i] = {"error": error, "relative": relative, "M": Ms[:, :, -1], "z": zs[:, :, -1]}
    return out


def recall_errors(model: Any, ids: torch.Tensor, relative: bool = False) -> dict[int, torch.Tensor]:
    """Per memory layer: (H, W) recall errors of the tokens the memory wrote while reading ``ids``
    (:func:`memory_writes`; ``relative``: divided by the value's norm)."""
    return {i: w["relative" if relative else "error"] for i, w in memory_writes(model, ids).items()}


def attention_received(model: Any, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per memory layer: (H, T) how much attention each token of ``ids`` (1, T) received while it was in the window
    (or a sink), summed over the later queries and over the query heads of each key/value head: the score by which
    H2O-style caches keep their "heavy hitters". Read one chunk per call, so that only (chunk, T) weights per layer
    exist at once."""
    inner = unwrap_peft(model)
    config = inner.config
    T, C = ids.shape[1], config.chunk_size
    H, G = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    scores = {i: torch.zeros(config.num_attention_heads, T, dtype=torch.float64) for i in config.memory_layers}
    cache = SenriCache(config, 1)
    with torch.no_grad():
        for start in range(0, T, C):
            out = inner(input_ids=ids[:, start : start + C], cache=cache, use_cache=True, output_attentions=True,
                        logits_to_keep=1)
            for i in scores:
                weights = out.attentions[i][0].double()  # (Hq, t, start + t)
                scores[i][:, : weights.shape[-1]] += weights.sum(dim=1).cpu()
    return {i: score.view(H, G, T).sum(dim=1) for i, score in scores.items()}


def needle_ranks(errors: dict[int, torch.Tensor], needle: tuple[int, int]) -> dict[int, torch.Tensor]:
    """Per layer: (H,) the rank (0 = the worst recalled, the first a store would keep) of the needle's best-ranked
    token among the written tokens, per head; NaN where the memory wrote none of the needle's tokens."""
    out = {}
    for i, error in errors.items():
        written = error.shape[1]
        lo, hi = needle[0], min(needle[1], written)
        if lo >= hi:
            out[i] = torch.full((error.shape[0],), float("nan"))
            continue
        scores = error.nan_to_num(float("-inf"))
        order = scores.argsort(dim=1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(written).expand_as(order))
        out[i] = rank[:, lo:hi].min(dim=1).values.float()
    return out


def _kept_by_chance(store: int, needle: int, written: int) -> float:
    """The probability that a store of ``store`` of the ``written`` tokens, chosen at random, holds at least one of
    the ``needle`` tokens (hypergeometric)."""
    miss = 1.0
    for j in range(needle):
        miss *= max(0.0, (written - store - j) / (written - j))
    return 1.0 - miss


# How a store chooses what it keeps: the memory's recall error (LoLA), the same relative to the value's norm, or the
# attention a token received while in the window (H2O).
SCORES = ("recall", "relative", "attention")


def store_selection(model: Any, cases: Sequence[Any], stores: Sequence[int] = (64, 256),
                    score: str = "recall") -> dict[str, Any]:
    """Over ``cases`` (each with ``ids``, ``answer_start``, ``needle``) and every (memory layer, head): the share whose
    store of each size, chosen by ``score`` (:data:`SCORES`), would hold a needle token, beside the share a store
    chosen at random would (:func:`_kept_by_chance`); per layer, with a store in each of its heads, the share where
    some head's store holds one (``kept_by_any_head``, beside its chance); and the mean rank of the needle's best
    token, beside its mean for a random ranking ((W − n) / (n + 1) for n needle tokens among W)."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    hits: dict[int, list[float]] = {s: [] for s in stores}
    chance: dict[int, list[float]] = {s: [] for s in stores}
    any_hits: dict[int, list[float]] = {s: [] for s in stores}
    any_chance: dict[int, list[float]] = {s: [] for s in stores}
    ranks, chance_ranks = [], []
    for case in cases:
        ids = torch.tensor([case.ids[: case.answer_start]])
        errors = recall_errors(model, ids, relative=score == "relative")
        if score == "attention":  # the same tokens (those written; sinks NaN), scored by the attention they received
            received = attention_received(model, ids)
            errors = {i: torch.where(e.isnan(), e, received[i][:, : e.shape[1]].to(e.dtype)) for i, e in errors.items()}
        for i, rank in needle_ranks(errors, case.needle).items():
            written = int((~errors[i][0].isnan()).sum())
            needle = max(0, min(case.needle[1], errors[i].shape[1]) - case.needle[0])
            if needle == 0:
                continue
            ranks.extend(rank.tolist())
            chance_ranks.extend([(written - needle) / (needle + 1)] * len(rank))
            for s in stores:
                kept, p = (rank < s).float(), _kept_by_chance(s, needle, written)
                hits[s].extend(kept.tolist())
                chance[s].extend([p] * len(rank))
                any_hits[s].append(float(kept.max()))
                any_chance[s].append(1.0 - (1.0 - p) ** len(rank))  # the heads' random stores drawn independently
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {
        "pairs": len(ranks),
        "mean_rank": mean(ranks), "mean_rank_by_chance": mean(chance_ranks),
        "median_rank": float(torch.tensor(ranks).median()) if ranks else None,
        "kept": {s: mean(h) for s, h in hits.items()},
        "kept_by_chance": {s: mean(c) for s, c in chance.items()},
        "kept_by_any_head": {s: mean(h) for s, h in any_hits.items()},
        "kept_by_any_head_by_chance": {s: mean(c) for s, c in any_chance.items()},
    }


__all__ = ["SCORES", "memory_writes", "recall_errors", "attention_received", "needle_ranks", "store_selection"]
