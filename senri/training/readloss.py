"""A direct loss on the memory's read: the share of its weight on the needle, for the query that asks for it.

The diagnostics (:mod:`senri.evaluation.read_capacity`, :mod:`senri.evaluation.read_fit`) find that at 8× the window
the memory's keys set a fact's statement apart well enough for a query to read it at several times the uniform
share, and that one query map per layer, fitted for that alone on training facts, reads held-out facts as sharply
as full attention does. The answer's few tokens of loss reach the query maps only through every layer above, so the
recall rows train that read weakly. This loss trains it directly.

Under the linear rule the memory's read at a query is a weighted mean of the values written, with weights
``w_i ∝ φ(q)·φ(k_i)``: the needle's share is ``φ(q)·Σ_needle φ(k_i) / φ(q)·Σ_written φ(k_i)``. Both sums are the
memory's own keys (its key map applied, no RoPE), so the share is computed from the layer's projections in the same
forward as the recall loss, with gradients to the query and key maps, the LoRA adapters on ``q_proj``/``k_proj``
and everything below. :func:`needle_read_loss` is the mean of ``−log share`` over the memory layers' query heads and
the rows whose needle the memory holds at the asking query; pass-key rows carry no needle here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..evaluation.read_fidelity import held_tokens, needle_read_share, per_head_map
from ..model.memory import MEMORY_DTYPE
from ..model.modeling_senri import unwrap_peft


@dataclass(frozen=True)
class NeedleRow:
    """Row ``row`` of a left-padded batch: ``pad`` padding tokens, then its real tokens; the asking query at real
    position ``query`` (the one that predicts the answer's first token) and the needle's real token span ``needle``."""

    row: int
    pad: int
    query: int
    needle: tuple[int, int]


@contextlib.contextmanager
def captured_projections(model: Any) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
    """While open, every forward keeps each memory layer's ``q_proj`` and ``k_proj`` outputs (B, T, ·), with their
    graph, under ``captured[layer]["q"]`` / ``["k"]`` (the last forward's)."""
    inner = unwrap_peft(model)
    captured: dict[int, dict[str, torch.Tensor]] = {i: {} for i in inner.config.memory_layers}
    hooks = []
    for i in inner.config.memory_layers:
        attn = inner.model.layers[i].self_attn
        for name, module in (("q", attn.q_proj), ("k", attn.k_proj)):
            def keep(module, args, output, i=i, name=name):  # noqa: ANN001
                captured[i][name] = output
            hooks.append(module.register_forward_hook(keep))
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()


def needle_shares(model: Any, captured: dict[int, dict[str, torch.Tensor]],
                  rows: Sequence[NeedleRow]) -> torch.Tensor:
    """The share of the memory read's weight on the needle, per (row whose memory holds a needle token, memory layer,
    query head), flattened; empty when no row's memory holds its needle."""
    inner = unwrap_peft(model)
    config = inner.config
    if config.memory_update != "linear" or config.use_alibi:
        raise ValueError("the read loss needs the linear rule without ALiBi decay (memory_update='linear', "
                         f"use_alibi=False), got memory_update={config.memory_update!r}, use_alibi={config.use_alibi}")
    shares = []
    for r in rows:
        held = held_tokens(config, r.query)
        lo, hi = max(r.needle[0], config.num_sink_tokens), min(r.needle[1], held)
        if lo >= hi:
            continue
        keep = (torch.arange(held, device=inner.device) >= config.num_sink_tokens).to(MEMORY_DTYPE)
        for i, projections in captured.items():
            attn = inner.model.layers[i].self_attn
            H, G, D = attn.num_kv_heads, attn.num_groups, attn.head_dim
            q = projections["q"][r.row, r.pad + r.query].view(H, G, D).to(MEMORY_DTYPE)
            k = projections["k"][r.row, r.pad : r.pad + held].view(held, H, D).transpose(0, 1).to(MEMORY_DTYPE)
            if config.memory_qk_map:
                q = per_head_map(q, attn.memory_query_map.to(MEMORY_DTYPE))
                k = per_head_map(k, attn.memory_key_map.to(MEMORY_DTYPE))
            shares.append(needle_read_share(q, k, keep, slice(lo, hi), config.memory_features).flatten())
    return torch.cat(shares) if shares else torch.zeros(0)


def needle_read_loss(model: Any, captured: dict[int, dict[str, torch.Tensor]],
                     rows: Sequence[NeedleRow]) -> tuple[torch.Tensor | None, float | None]:
    """(mean ``−log share`` over :func:`needle_shares`, the mean share) or (None, None) when no row counts."""
    shares = needle_shares(model, captured, rows)
    if shares.numel() == 0:
        return None, None
    return -shares.clamp_min(1e-30).log().mean(), float(shares.detach().mean())


__all__ = ["NeedleRow", "captured_projections", "needle_shares", "needle_read_loss"]
