"""Could *any* query read the needle out of the keys the memory wrote? The read's ceiling, beside what it reads.

:mod:`senri.evaluation.read_fidelity` finds the memory's read of a fact in prose uniform: its weight on the fact's
statement is the statement's share of the written tokens. Two causes would look the same there, and they call for
different work. Either the query is wrong (the keys do set the fact apart, and training the query maps on longer
rows is the lever), or the keys under the feature map do not set it apart from what surrounds it (then no query
can read it, and the feature map or the keys must change). This module separates them.

Under a positive feature map the memory's read weight on a written token is ``w_i ∝ a·f(k_i)``, with ``a = f(q)``
non-negative. Over all non-negative ``a`` the needle's share ``Σ_needle a·f(k_i) / Σ_all a·f(k_i)`` is a
linear-fractional function, maximal at a vertex: one feature alone. So :func:`feature_ceiling` is exact and cheap:
the best over features ``p`` of ``Σ_needle f_p(k_i) / Σ_all f_p(k_i)``. For the memory's own map (ELU + 1, one
feature per key dimension) every non-negative ``a`` is some ``φ(q)`` in the limit (``φ(x) → 0`` as ``x → −∞``), so
the ceiling is what the best query reaches; for a larger map whose query features are constrained (the
degree-2 product, DPFP) it is an upper bound. :data:`MAPS`:

* ``memory``: ELU + 1 of the memory's keys (its key map applied): the memory as it is (64 features per head);
* ``converted``: ELU + 1 of the layer's raw keys, before any key map: what conversion gives the memory;
* ``memory^2``: the products ``φ_d(k) φ_e(k)`` (D² features; the kernel ``(φ(q)·φ(k))²``, a state D times the
  memory's): a sharper read of the same keys;
* ``dpfp3``: Schlag et al.'s deterministic parameter-free projection with ν = 3 (6D features, ``[relu(±k)]``
  times itself shifted by 1, 2, 3).

:func:`read_capacity` reports these per (memory layer, key/value head) over the grid's cases, beside the needle's
share under the memory's own queries and under full attention (:func:`read_fidelity.read_weights`): the headroom
between what the query reads and what the keys allow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..model.memory import dpfp, phi
from .read_fidelity import read_weights

MAPS = ("memory", "converted", "memory^2", "dpfp3")


def squared(features: torch.Tensor) -> torch.Tensor:
    """Degree-2 products (..., P) -> (..., P²), so that ``squared(f(q))·squared(f(k)) = (f(q)·f(k))²``."""
    return (features.unsqueeze(-1) * features.unsqueeze(-2)).flatten(-2)


def map_features(name: str, keys: torch.Tensor, raw_keys: torch.Tensor) -> torch.Tensor:
    """The non-negative features (W, P) of one head's written keys under map ``name`` (:data:`MAPS`)."""
    if name == "memory":
        return phi(keys)
    if name == "converted":
        return phi(raw_keys)
    if name == "memory^2":
        return squared(phi(keys))
    if name == "dpfp3":
        return dpfp(keys)
    raise ValueError(f"unknown feature map {name!r}; valid: {', '.join(MAPS)}")


def feature_ceiling(features: torch.Tensor, keep: torch.Tensor, needle: Sequence[int]) -> float:
    """The largest share of a read's weight that a non-negative query feature vector can put on the tokens
    ``needle`` (indices into W) among the kept ones: ``max_p Σ_needle f_p / Σ_kept f_p`` over the features (W, P).
    Exact (linear-fractional in the query's features, so a single feature is optimal)."""
    weighted = features * keep.unsqueeze(-1)
    total = weighted.sum(0)
    share = weighted[list(needle)].sum(0) / total.clamp_min(torch.finfo(total.dtype).tiny)
    return float(share.max())


def control_span(held: int, needle: Sequence[int], sinks: int, generator: torch.Generator) -> list[int]:
    """A span of ``len(needle)`` written positions (past the ``sinks``, before ``held``) that does not touch the
    needle, at a random start; empty where the memory holds too few tokens for one."""
    n, lo, hi = len(needle), needle[0], needle[-1] + 1
    starts = [s for s in range(sinks, held - n + 1) if s + n <= lo or s >= hi]
    if not starts:
        return []
    start = starts[int(torch.randint(len(starts), (1,), generator=generator))]
    return list(range(start, start + n))


def read_capacity(model: Any, cases: Sequence[Any], maps: Sequence[str] = MAPS, seed: int = 0) -> dict[str, Any]:
    """Over ``cases`` (each with ``ids``, ``answer_start`` and ``needle``, as for
    :func:`senri.evaluation.read_fidelity.read_fidelity`) and every (memory layer, key/value head) whose memory holds
    a needle token when the answer's first token is predicted:

    * ``ceiling[map]``: the mean best share any query could put on the needle under each feature map (``maps``),
      ``ceiling_best_layer_head[map]`` its mean over cases of the best (layer, head), and ``answer_ceiling[map]``
      the same for the needle's copies of the answer's first token (what the query must copy);
    * ``query_share``: the mean share the memory's own queries put on the needle (the group's heads; as read
      fidelity's ``memory``) and ``query_best`` the group's best head, ``attention_share`` full attention's;
    * ``uniform``: the needle's share of the written tokens; ``answer_uniform`` that of the answer's copies;
    * ``control_ceiling[map]``: the ceiling of a control span, as many written tokens as the needle's elsewhere in the
      same memory (drawn once per case, seeded by ``seed``): whether the keys set the needle apart from any other
      sentence, or any span of its length can be read as sharply.
    """
    for name in maps:
        if name not in MAPS:
            raise ValueError(f"unknown feature map {name!r}; valid: {', '.join(MAPS)}")
    ceilings: dict[str, list[float]] = {m: [] for m in maps}
    answer: dict[str, list[float]] = {m: [] for m in maps}
    control: dict[str, list[float]] = {m: [] for m in maps}
    generator = torch.Generator().manual_seed(seed)
    sinks = getattr(model.config, "num_sink_tokens", 0)
    best_per_case: dict[str, list[float]] = {m: [] for m in maps}
    query, query_best, attention, uniform, answer_uniform = [], [], [], [], []
    used = 0
    for case in cases:
        ids = torch.tensor([case.ids[: case.answer_start]])
        first = case.ids[case.answer_start]
        case_best: dict[str, float] = {}
        elsewhere: list[int] | None = None
        for layer in read_weights(model, ids).values():
            held = layer["values"].shape[1]
            needle = list(range(case.needle[0], min(case.needle[1], held)))
            if not needle:
                continue
            if elsewhere is None:  # one control span per case, the same in every layer
                elsewhere = control_span(held, needle, sinks, generator)
            copies = [p for p in needle if case.ids[p] == first]
            keep = layer["keep"]
            written = float(keep.sum())
            H = layer["keys"].shape[0]
            groups = layer["weights"]["memory"].shape[0] // H
            for h in range(H):
                used += 1
                uniform.append(len(needle) / written)
                heads = slice(h * groups, (h + 1) * groups)
                own = layer["weights"]["memory"][heads][:, needle].sum(-1)
                query.append(float(own.mean()))
                query_best.append(float(own.max()))
                attention.append(float(layer["weights"]["rope softmax"][heads][:, needle].sum(-1).mean()))
                if copies:
                    answer_uniform.append(len(copies) / written)
                for name in maps:
                    features = map_features(name, layer["keys"][h], layer["raw_keys"][h])
                    ceiling = feature_ceiling(features, keep, needle)
                    ceilings[name].append(ceiling)
                    case_best[name] = max(case_best.get(name, 0.0), ceiling)
                    if copies:
                        answer[name].append(feature_ceiling(features, keep, copies))
                    if elsewhere:
                        control[name].append(feature_ceiling(features, keep, elsewhere))
        for name, value in case_best.items():
            best_per_case[name].append(value)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"cases": len(cases), "layer_heads_holding_needle": used, "uniform": mean(uniform),
            "answer_uniform": mean(answer_uniform), "query_share": mean(query), "query_best": mean(query_best),
            "attention_share": mean(attention),
            "ceiling": {m: mean(v) for m, v in ceilings.items()},
            "ceiling_best_layer_head": {m: mean(v) for m, v in best_per_case.items()},
            "answer_ceiling": {m: mean(v) for m, v in answer.items()},
            "control_ceiling": {m: mean(v) for m, v in control.items()}}


__all__ = ["MAPS", "dpfp", "squared", "map_features", "feature_ceiling", "control_span", "read_capacity"]
