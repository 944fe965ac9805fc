"""Could a learned feature map read the memory as sharply as attention does? Fitted and measured, not yet built.

:mod:`senri.evaluation.read_fidelity` finds the memory's ELU + 1 read uniform over a fact stated in prose, where
full attention over the same tokens is not. Before a new feature map goes into the memory (and its state, cache,
references and invariants), this module asks whether one *can* do better on the same queries and keys, the way
Hedgehog (Zhang et al., 2024) learns its map: per key/value head, ``φ(x) = [softmax(x W), softmax(−x W)]`` with
``W`` (D, F) for queries and another for keys (2F features, so a state of 2F × D per head), fitted layer by layer
to the layer's own attention.

The target for a query at position t is the layer's full attention (RoPE at the true positions) restricted to the
tokens the memory holds for it (those before its window, sinks excluded) and renormalised: what the memory should
supply. The map reads the memory's queries and keys (its query/key maps applied, no RoPE), as the memory does. The
loss is the cross-entropy of the kernel's normalised weights against that target (Hedgehog's), over sampled
queries of training prose; :func:`kernel_cross_entropy` measures it on held-out prose for the learned map beside
ELU + 1 and softmax of the same no-RoPE logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..model.memory import MEMORY_DTYPE
from ..model.modeling_senri import unwrap_peft
from .read_fidelity import INPUTS, held_tokens, kernel_scores, layer_projections


class FeatureMaps(nn.Module):
    """Hedgehog feature maps of one layer: per key/value head ``W_q``, ``W_k`` (H, D, F), identity-like at start
    (F = D: W = I), ``φ(x) = [softmax(x W), softmax(−x W)]`` over the features (positive, 2F of them)."""

    def __init__(self, num_kv_heads: int, head_dim: int, features: int, inputs: str = "memory"):
        super().__init__()
        self.inputs = inputs  # which queries and keys it reads (:data:`INPUTS`)
        eye = torch.eye(head_dim, features, dtype=MEMORY_DTYPE).expand(num_kv_heads, head_dim, features)
        self.query = nn.Parameter(eye.clone())
        self.key = nn.Parameter(eye.clone())

    @staticmethod
    def features(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """(H, T, D) x (H, D, F) -> (H, T, 2F)."""
        projected = x @ W
        return torch.cat([projected.softmax(-1), (-projected).softmax(-1)], dim=-1)

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Unnormalised kernel φ(q)·φ(k): queries (Hq, Q, D), keys (H, W, D) -> (Hq, Q, W)."""
        H = k.shape[0]
        fq = self.features(q.reshape(H, -1, q.shape[-1]), self.query)  # (H, G*Q, 2F)
        fk = self.features(k, self.key)
        return (fq @ fk.transpose(-1, -2)).view(q.shape[0], q.shape[1], k.shape[1])


def _targets(config: Any, projections: dict[str, torch.Tensor], positions: torch.Tensor,
             scaling: float, groups: int, inputs: str = "memory") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the queries at ``positions``: the mask (Q, T) of the tokens the memory holds for each (sinks excluded),
    the full-attention target weights (Hq, Q, T) renormalised over them, and the queries a feature map reads
    (Hq, Q, D): the memory's (``inputs="memory"``) or the rotated ones (``"rotated"``)."""
    T = projections["k"].shape[1]
    held = torch.tensor([held_tokens(config, int(t)) for t in positions])
    mask = (torch.arange(T)[None] < held[:, None]) & (projections["keep"][None] > 0)
    rq = projections["rq"][:, positions]  # (Hq, Q, D)
    rk = projections["rk"].repeat_interleave(groups, dim=0)  # (Hq, T, D)
    logits = (rq @ rk.transpose(-1, -2)) * scaling
    target = logits.masked_fill(~mask, float("-inf")).softmax(-1)
    return mask, target, projections[INPUTS[inputs][0]][:, positions]


def _cross_entropy(scores: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a kernel's normalised weights (from positive ``scores``) against ``target``, per query."""
    scores = scores.masked_fill(~mask, 0.0)
    log_weights = scores.clamp_min(1e-30).log() - scores.sum(-1, keepdim=True).log()
    return -(target * log_weights.masked_fill(~mask, 0.0)).sum(-1).mean()


def _query_positions(config: Any, T: int, queries: int, generator: torch.Generator) -> torch.Tensor:
    """Up to ``queries`` positions, drawn without replacement, whose memory holds at least one written token."""
    first = (config.window_chunks + 1) * config.chunk_size
    first = max(first, next((t for t in range(first, T) if held_tokens(config, t) > config.num_sink_tokens), T))
    if first >= T:
        raise ValueError(f"a text of {T} tokens leaves no query whose memory holds a token; it needs more than "
                         f"{first} tokens")
    candidates = torch.arange(first, T)
    return candidates[torch.randperm(len(candidates), generator=generator)[:queries]].sort().values


def _check_inputs(inputs: str) -> None:
    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {', '.join(INPUTS)}, got {inputs!r}")


def fit_feature_maps(model: Any, texts: Sequence[torch.Tensor], features: int = 64, steps: int = 200,
                     lr: float = 1e-2, queries: int = 128, seed: int = 0,
                     inputs: str = "memory") -> tuple[dict[int, FeatureMaps], dict]:
    """Fit one :class:`FeatureMaps` per memory layer of ``model`` to its full attention over the memory's tokens on
    ``texts`` ((1, T) token tensors), ``queries`` query positions per text, Adam for ``steps`` full-batch steps.
    ``inputs``: the map reads the memory's queries and keys (no RoPE, as the memory reads) or the rotated ones
    (RoPE at the tokens' own positions, as LoLCATs linearises: a memory would then write rotated keys).
    Returns the maps and per layer the loss before and after."""
    _check_inputs(inputs)
    inner = unwrap_peft(model)
    config = inner.config
    generator = torch.Generator().manual_seed(seed)
    batches: dict[int, list[tuple]] = {i: [] for i in config.memory_layers}
    for ids in texts:
        positions = _query_positions(config, ids.shape[1], queries, generator)
        for i, p in layer_projections(model, ids).items():
            attn = inner.model.layers[i].self_attn
            batches[i].append((*_targets(config, p, positions, attn.scaling, attn.num_groups, inputs),
                               p[INPUTS[inputs][1]]))
    maps, log = {}, {}
    for i, batch in batches.items():
        attn = inner.model.layers[i].self_attn
        torch.manual_seed(seed + i)
        fmap = FeatureMaps(attn.num_kv_heads, attn.head_dim, features, inputs)
        optimiser = torch.optim.Adam(fmap.parameters(), lr=lr)

        def loss() -> torch.Tensor:
            return sum(_cross_entropy(fmap.scores(mq, mk), target, mask)
                       for mask, target, mq, mk in batch) / len(batch)

        with torch.no_grad():
            before = float(loss())
        for _ in range(steps):
            optimiser.zero_grad()
            value = loss()
            value.backward()
            optimiser.step()
        with torch.no_grad():
            log[i] = {"before": before, "after": float(loss())}
        maps[i] = fmap.requires_grad_(False)
    return maps, log


def kernel_cross_entropy(model: Any, texts: Sequence[torch.Tensor], maps: dict[int, FeatureMaps] | None = None,
                         queries: int = 128, seed: int = 1, inputs: str = "memory") -> dict[str, float]:
    """Mean cross-entropy (nats) against full attention over the memory's tokens on ``texts``, over memory layers and
    sampled queries, for the memory's ELU + 1 read, Taylor-2 and softmax of its no-RoPE logits, ``maps``
    (``learned``, reading ``inputs`` as fitted) and a uniform read (the entropy bound's other end)."""
    _check_inputs(inputs)
    inner = unwrap_peft(model)
    config = inner.config
    generator = torch.Generator().manual_seed(seed)
    totals: dict[str, list[float]] = {"memory": [], "taylor2": [], "softmax": [], "uniform": []}
    if maps:
        totals["learned"] = []
    for ids in texts:
        positions = _query_positions(config, ids.shape[1], queries, generator)
        for i, p in layer_projections(model, ids).items():
            attn = inner.model.layers[i].self_attn
            mask, target, mq = _targets(config, p, positions, attn.scaling, attn.num_groups)
            learned_q = p[INPUTS[inputs][0]][:, positions]
            with torch.no_grad():
                scores = {**kernel_scores(mq, p["mk"], attn.num_groups, mask), "uniform": torch.ones_like(target)}
                if maps:
                    scores["learned"] = maps[i].scores(learned_q, p[INPUTS[inputs][1]])
                for name, s in scores.items():
                    totals[name].append(float(_cross_entropy(s, target, mask)))
    return {name: sum(v) / len(v) for name, v in totals.items()}


__all__ = ["FeatureMaps", "fit_feature_maps", "kernel_cross_entropy"]
