"""How sharply does the memory read what it holds? A diagnostic of the read itself, one kernel beside another.

The memory's read under the linear rule is a weighted mean of the values it wrote,
``A = φ(q) M / (φ(q)·z + eps) = Σ_i w_i v_i``, with ``w_i ∝ φ(q)·φ(k_i)`` (φ = ELU + 1). Full attention over
the same tokens weighs them by ``softmax(q·k_i / √D)`` instead. Whether a needle can be read at all depends on how
much of the read's weight lands on it. :func:`read_weights` computes, for the query that predicts the answer's first
token, the weights each memory layer gives the tokens it wrote, under four kernels of the *same* queries and keys:

* ``memory``: the memory's own read (its query/key maps, ELU + 1, the linear rule): the weights whose mean of the
  values is the memory's output (a test holds ``Σ w_i v_i`` equal to the read from the rebuilt state);
* ``taylor2``: ``1 + x + x²/2`` of the memory's logits ``x = q·k / √D`` (the second-order Taylor feature map of
  Based: a fixed-size state of 1 + D + D² features per head whose read is exactly this);
* ``softmax``: ``exp(x)`` of the same logits: what an exact store of every written token read by softmax would give
  (no RoPE, as the memory reads);
* ``rope softmax``: the layer's own attention with RoPE at the tokens' true positions, restricted to the written
  tokens: what full attention (the perfect-memory ceiling) gives them.

:func:`read_fidelity` then reports, over cases and (memory layer, query head), the share of each kernel's weight on
the needle's tokens beside their share of the written tokens (a uniform read), and the gates' weight on the memory
path. Single memories under the linear rule without ALiBi decay only (the shipped memory's kind): the delta rule's
read is no weighted mean of values, so it has no weights to compare.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..model.cache import SenriCache
from ..model.memory import ELU, MEMORY_DTYPE, FeatureMap, sink_keep_mask
from ..model.modeling_senri import gate_clamp, rope, unwrap_peft

KERNELS = ("memory", "taylor2", "softmax", "rope softmax")
# What a learned feature map may read (:mod:`senri.evaluation.kernel_fit`): the memory's queries and keys (its maps
# applied, no RoPE), or the rotated ones; the names of :func:`layer_projections`' entries.
INPUTS = {"memory": ("mq", "mk"), "rotated": ("rq", "rk")}


def _exp_over(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """exp(logits) up to a factor, stable over the kept tokens only (a sink's large logit would underflow the rest)."""
    kept = logits.masked_fill(keep == 0, float("-inf"))
    return (kept - kept.max(dim=-1, keepdim=True).values).exp()


def kernel_scores(mq: torch.Tensor, mk: torch.Tensor, groups: int, keep: torch.Tensor,
                  feature_map: FeatureMap = ELU) -> dict[str, torch.Tensor]:
    """Unnormalised weights (Hq, Q, W) of the memory's queries ``mq`` (Hq, Q, D) over its keys ``mk`` (H, W, D)
    (query head h reads key/value head h // ``groups``) under the memory's feature map (ELU + 1 unless given), and
    Taylor-2 and softmax of the same no-RoPE logits q·k / √D; softmax kept stable over the tokens ``keep`` ((W,) or
    (Q, W)) marks."""
    keys = mk.repeat_interleave(groups, dim=0)
    logits = (mq @ keys.transpose(-1, -2)) / math.sqrt(mq.shape[-1])
    return {"memory": feature_map(mq) @ feature_map(keys).transpose(-1, -2), "taylor2": 1 + logits + logits ** 2 / 2,
            "softmax": _exp_over(logits, keep)}


def needle_feature_sums(mk: torch.Tensor, keep: torch.Tensor, needle: Any,
                        feature_map: FeatureMap = ELU) -> tuple[torch.Tensor, torch.Tensor]:
    """The features (``feature_map``, the memory's φ) of the keys ``mk`` (H, W, D) summed over the positions
    ``needle`` (a slice or index list) and over all written ones (``keep`` (W,) marks them; the memory's
    normaliser): two (H, P) tensors."""
    features = feature_map(mk) * keep[:, None]
    return features[:, needle].sum(1), features.sum(1)


def share_from_sums(mq: torch.Tensor, sums: tuple[torch.Tensor, torch.Tensor],
                    feature_map: FeatureMap = ELU) -> torch.Tensor:
    """The share (H, G) of the memory's read weight that each query ``mq`` (H, G, D) (G query heads per key/value
    head) puts on the needle whose :func:`needle_feature_sums` are ``sums``: ``φ(q)·Σ_needle φ(k) / φ(q)·Σ φ(k)``."""
    needle, written = sums
    fq = feature_map(mq)
    total = (fq * written[:, None]).sum(-1)
    # A query whose features meet no written key's (DPFP's are sparse) reads nothing: no share on the needle either.
    # Divided by 1 there, not by 0, so that neither the share nor its gradient is NaN.
    empty = total == 0
    return torch.where(empty, 0.0, (fq * needle[:, None]).sum(-1) / torch.where(empty, 1.0, total))


def needle_read_share(mq: torch.Tensor, mk: torch.Tensor, keep: torch.Tensor, needle: Any,
                      feature_map: FeatureMap = ELU) -> torch.Tensor:
    """The share (H, G) of the memory's read weight (under ``feature_map``) that each query ``mq`` (H, G, D) puts on
    the written positions ``needle`` among the keys ``mk`` (H, W, D), ``keep`` (W,) marking those written."""
    return share_from_sums(mq, needle_feature_sums(mk, keep, needle, feature_map), feature_map)


def per_head_map(x: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """``x`` (H, ..., D) with each key/value head's vectors mapped by its own map ``maps`` (H, D, D), as the memory's
    query and key maps apply (queries grouped (H, G, ..., D) by the head they read)."""
    return torch.einsum("h...d,hde->h...e", x, maps)


def layer_projections(model: Any, ids: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """Per memory layer, what the layer projected while reading ``ids`` (1, T) in one forward, in float32: the raw
    queries ``q`` (Hq, T, D) and keys ``k`` / values ``v`` (H, T, D); the memory's queries ``mq`` and keys ``mk``
    (its query/key maps applied, no RoPE: what the memory reads and writes with); the rotated ``rq`` / ``rk`` at
    the tokens' own positions (what full attention compares); ``keep`` (T,), 0 at the never-written sinks; and
    ``written``, how many of the first tokens the layer's memory holds after the forward (the cache's count)."""
    inner = unwrap_peft(model)
    config = inner.config
    layers = {i: inner.model.layers[i].self_attn for i in config.memory_layers}
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, attn in layers.items():
        for name in ("q_proj", "k_proj", "v_proj"):
            def keep(module, args, output, key=(i, name)):  # noqa: ANN001
                captured[key] = output.detach()
            hooks.append(getattr(attn, name).register_forward_hook(keep))
    cache = SenriCache(config, 1)
    try:
        with torch.no_grad():
            inner(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    T = ids.shape[1]
    cos, sin = inner.model.rotary_emb(captured[next(iter(captured))], torch.arange(T, device=ids.device).view(1, -1))
    cos, sin = cos.to(MEMORY_DTYPE), sin.to(MEMORY_DTYPE)
    keep = sink_keep_mask(0, T, config.num_sink_tokens, device=ids.device)
    keep = torch.ones(T, device=ids.device) if keep is None else keep.to(MEMORY_DTYPE)
    out = {}
    for i, attn in layers.items():
        H, D, G = attn.num_kv_heads, attn.head_dim, attn.num_groups
        q = captured[(i, "q_proj")].view(1, T, H * G, D).transpose(1, 2).to(MEMORY_DTYPE)
        k = captured[(i, "k_proj")].view(1, T, H, D).transpose(1, 2).to(MEMORY_DTYPE)
        v = captured[(i, "v_proj")].view(1, T, H, D).transpose(1, 2).to(MEMORY_DTYPE)
        mq, mk = q[0], k[0]
        if config.memory_qk_map:
            with torch.no_grad():
                mq = per_head_map(mq.view(H, G, T, D), attn.memory_query_map.to(MEMORY_DTYPE)).reshape(H * G, T, D)
                mk = per_head_map(mk, attn.memory_key_map.to(MEMORY_DTYPE))
        out[i] = {"q": q[0], "k": k[0], "v": v[0], "mq": mq, "mk": mk, "rq": rope(q, cos, sin)[0],
                  "rk": rope(k, cos, sin)[0], "keep": keep,
                  "written": cache.layer_state(i).written_chunks * config.chunk_size}
    return out


def held_tokens(config: Any, position: int) -> int:
    """How many of the stream's first tokens the memory holds when the query at ``position`` reads it: the chunks
    before its window (exact coverage)."""
    return max(0, position // config.chunk_size - config.window_chunks) * config.chunk_size


def read_weights(model: Any, ids: torch.Tensor,
                 feature_maps: dict[int, Any] | None = None) -> dict[int, dict[str, Any]]:
    """Per memory layer, for the last token of ``ids`` (1, T) as query: ``weights``, for each of :data:`KERNELS`
    (and ``learned`` where ``feature_maps`` has the layer: a :class:`senri.evaluation.kernel_fit.FeatureMaps` read of
    the memory's queries and keys), a (Hq, W) tensor over the W tokens the memory held when that query read it
    (positions 0..W-1; never-written sinks get 0), each row summing to 1; ``values`` (H, W, D), the written values;
    ``query`` (Hq, D) and ``gate`` (Hq,), the memory path's weight in the layer's output; ``keys`` (H, W, D), the
    memory's keys as written (its key map applied, no RoPE), ``raw_keys`` the layer's own, and ``keep`` (W,), 0 at
    the never-written sinks."""
    inner = unwrap_peft(model)
    config = inner.config
    if config.memory_update != "linear" or config.use_alibi:
        raise ValueError("read_weights needs the linear rule without ALiBi decay (memory_update='linear', "
                         f"use_alibi=False), got memory_update={config.memory_update!r}, use_alibi={config.use_alibi}")
    if any(inner.model.layers[i].self_attn.memory_layouts[False] is not None for i in config.memory_layers):
        raise ValueError("read_weights reads single memories (memory_type 'single'); this model's have slots")
    T = ids.shape[1]
    held = held_tokens(config, T - 1)
    out = {}
    for i, p in layer_projections(model, ids).items():
        attn = inner.model.layers[i].self_attn
        G = attn.num_groups
        keep = p["keep"][:held]
        mq, mk = p["mq"][:, -1:], p["mk"][:, :held]  # (Hq, 1, D), (H, W, D)
        rotated_keys = p["rk"][:, :held].repeat_interleave(G, dim=0)
        rope_logits = (p["rq"][:, -1:] @ rotated_keys.transpose(-1, -2)) * attn.scaling
        if held == 0:  # the memory holds nothing yet: no weights
            raw = {name: rope_logits[:, 0] for name in KERNELS}
        else:
            raw = {name: w[:, 0] for name, w in kernel_scores(mq, mk, G, keep, config.memory_features).items()}
            raw["rope softmax"] = _exp_over(rope_logits, keep)[:, 0]
            if feature_maps is not None and i in feature_maps:
                fmap = feature_maps[i]
                q_name, k_name = INPUTS[fmap.inputs]
                with torch.no_grad():
                    raw["learned"] = fmap.scores(p[q_name][:, -1:], p[k_name][:, :held])[:, 0]
        weights = {name: w * keep / (w * keep).sum(-1, keepdim=True) for name, w in raw.items()}
        gate = gate_clamp(attn.memory_gate.detach()).to(MEMORY_DTYPE) if hasattr(attn, "memory_gate") else None
        out[i] = {"weights": weights, "values": p["v"][:, :held], "query": mq[:, 0], "gate": gate,
                  "keys": mk, "raw_keys": p["k"][:, :held], "keep": keep}
    return out


def read_fidelity(model: Any, cases: Sequence[Any], feature_maps: dict[int, Any] | None = None) -> dict[str, Any]:
    """Over ``cases`` (each with ``ids``, ``answer_start`` and ``needle``, the needle's token span) and every (memory
    layer, query head) whose memory holds a needle token when the answer's first token is predicted: the mean share of
    each kernel's read weight on the needle (``needle_share``), the same for the best head of each layer
    (``best_head_share``), on the needle's copies of the answer's first token (``answer_share``: the token the
    query has to copy; ``answer_uniform`` its share of the written tokens), the needle's share of the written tokens
    (``uniform``), and the mean gate."""
    kernels = KERNELS + (("learned",) if feature_maps else ())
    shares: dict[str, list[float]] = {k: [] for k in kernels}
    best: dict[str, list[float]] = {k: [] for k in kernels}
    answer: dict[str, list[float]] = {k: [] for k in kernels}
    uniform, answer_uniform, gates, used = [], [], [], 0
    for case in cases:
        ids = torch.tensor([case.ids[: case.answer_start]])
        first = case.ids[case.answer_start]
        copies = [p for p in range(*case.needle) if case.ids[p] == first]
        for layer in read_weights(model, ids, feature_maps).values():
            held = layer["values"].shape[1]
            lo, hi = case.needle[0], min(case.needle[1], held)
            if lo >= hi:
                continue
            used += 1
            written = float(layer["weights"]["memory"][0].gt(0).sum())
            uniform.append((hi - lo) / written)
            if layer["gate"] is not None:
                gates.append(float(layer["gate"].mean()))
            held_copies = [p for p in copies if p < held]
            if held_copies:
                answer_uniform.append(len(held_copies) / written)
            for name, w in layer["weights"].items():
                share = w[:, lo:hi].sum(-1)
                shares[name].extend(share.tolist())
                best[name].append(float(share.max()))
                if held_copies:
                    answer[name].extend(w[:, held_copies].sum(-1).tolist())
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"cases": len(cases), "layers_holding_needle": used,
            "needle_share": {k: mean(v) for k, v in shares.items()},
            "best_head_share": {k: mean(v) for k, v in best.items()},
            "answer_share": {k: mean(v) for k, v in answer.items()}, "answer_uniform": mean(answer_uniform),
            "uniform": mean(uniform), "gate": mean(gates)}


__all__ = [
    "KERNELS", "INPUTS", "kernel_scores", "per_head_map", "needle_feature_sums", "share_from_sums", "needle_read_share",
    "layer_projections", "held_tokens", "read_weights", "read_fidelity",
]
