"""Can a query map *learn* to read a fact out of the memory? Fitted on training facts, measured on held-out ones.

:mod:`senri.evaluation.read_capacity` bounds what any query could read off the written keys, case by case. A
model has one query map per layer, used for every question. This module fits exactly that: per memory layer, the
memory's query map (H, D, D) (started from the trained one), all else frozen, to maximise the log-share of the
memory's read weight on the needle for the query that predicts the answer, over cases built from training
documents, templates and entities (:func:`senri.tasks.facts.fact_cases` with ``split="train"``). Measured on the
grid's held-out cases, beside the memory's own map: if a fitted map reads held-out facts well above the uniform
share, the read is learnable from the question and the training signal is what is missing (a direct loss on the
read is then a recipe lever); if not, the per-case ceiling is out of reach for one map, and the feature map or the
keys must change.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..model.memory import ELU, FeatureMap
from ..model.modeling_senri import unwrap_peft
from ..model.trained import CARD_FILE, PARAMETERS_FILE, READ_SETTINGS
from .read_fidelity import (
    held_tokens, layer_projections, needle_feature_sums, needle_read_share, per_head_map, share_from_sums,
)


def read_inputs(model: Any, case: Any) -> dict[int, dict[str, Any]]:
    """Per memory layer, what the read of ``case``'s answer query sees: ``q`` (Hq, D) the layer's raw query (no
    map, no RoPE), ``keys`` (H, W, D) the memory's keys as written (``raw_keys`` before its key map), ``keep`` (W,)
    and ``needle``, the needle's
    written positions (empty where the memory does not hold it yet)."""
    ids = torch.tensor([case.ids[: case.answer_start]])
    held = held_tokens(unwrap_peft(model).config, ids.shape[1] - 1)
    out = {}
    for i, p in layer_projections(model, ids).items():
        out[i] = {"q": p["q"][:, -1], "keys": p["mk"][:, :held], "raw_keys": p["k"][:, :held], "keep": p["keep"][:held],
                  "needle": list(range(case.needle[0], min(case.needle[1], held)))}
    return out


def _mapped_queries(query_map: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
    """The raw queries (Hq, D) of ``inputs`` mapped by ``query_map`` (H, D, D): (H, G, D), query head h reading
    key/value head h // G, as the memory does."""
    H, D = query_map.shape[0], query_map.shape[-1]
    return per_head_map(inputs["q"].view(H, -1, D), query_map)


def needle_share(query_map: torch.Tensor, inputs: dict[str, Any], feature_map: FeatureMap = ELU) -> torch.Tensor:
    """The share (Hq,) of each query head's read weight (under the memory's ``feature_map``) on the needle, its
    query mapped by ``query_map`` (H, D, D)."""
    return needle_read_share(_mapped_queries(query_map, inputs), inputs["keys"], inputs["keep"],
                             inputs["needle"], feature_map).flatten()


def _own_maps(model: Any, name: str) -> dict[int, torch.Tensor]:
    inner = unwrap_peft(model)
    out = {}
    for i in inner.config.memory_layers:
        attn = inner.model.layers[i].self_attn
        if inner.config.memory_qk_map:
            out[i] = getattr(attn, name).detach().float().clone()
        else:
            out[i] = torch.eye(attn.head_dim).expand(attn.num_kv_heads, -1, -1).clone()
    return out


def own_query_maps(model: Any) -> dict[int, torch.Tensor]:
    """The memory's query map per memory layer (the identity where the model has none), detached, float32."""
    return _own_maps(model, "memory_query_map")


def own_key_maps(model: Any) -> dict[int, torch.Tensor]:
    """The memory's key map per memory layer (the identity where the model has none), detached, float32."""
    return _own_maps(model, "memory_key_map")


def _mapped_keys(key_map: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
    """The raw keys (H, W, D) of ``inputs`` mapped by ``key_map`` (H, D, D), as the memory writes them."""
    return per_head_map(inputs["raw_keys"], key_map)


def fit_read_maps(model: Any, cases: Sequence[Any], steps: int = 200, lr: float = 3e-3, keys: bool = False,
                  ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor] | None, dict[int, dict[str, float]]]:
    """Fit each memory layer's query map (and, with ``keys``, its key map too: what the memory writes) to maximise
    the mean log-share of the read on the needle over ``cases`` (Adam, full batch, from the model's own maps).
    Returns the query maps, the key maps (None without ``keys``) and per layer the mean share before and after."""
    per_layer: dict[int, list[dict[str, Any]]] = {}
    for case in cases:
        for i, inputs in read_inputs(model, case).items():
            if inputs["needle"]:
                per_layer.setdefault(i, []).append(inputs)
    if not per_layer:
        raise ValueError("no case has its needle in the memory when the answer is asked; use longer cases")
    maps, key_maps, log = own_query_maps(model), (own_key_maps(model) if keys else None), {}
    features = unwrap_peft(model).config.memory_features
    for i, batch in per_layer.items():
        query_map = maps[i].requires_grad_()
        trained = [query_map]
        if key_maps is not None:
            key_map = key_maps[i].requires_grad_()
            trained.append(key_map)
        optimiser = torch.optim.Adam(trained, lr=lr)
        # Fixed keys: their feature sums once, not at every step.
        fixed = None if keys else [needle_feature_sums(b["keys"], b["keep"], b["needle"], features) for b in batch]

        def shares() -> torch.Tensor:
            sums = fixed or [needle_feature_sums(_mapped_keys(key_map, b), b["keep"], b["needle"], features)
                             for b in batch]
            return torch.cat([share_from_sums(_mapped_queries(query_map, b), s, features).flatten()
                              for b, s in zip(batch, sums)])

        def mean_share() -> float:
            with torch.no_grad():
                return float(shares().mean())

        before = mean_share()
        for _ in range(steps):
            loss = -shares().clamp_min(1e-30).log().mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        log[i] = {"before": before, "after": mean_share()}
        maps[i] = query_map.detach()
        if key_maps is not None:
            key_maps[i] = key_map.detach()
    return maps, key_maps, log


def fit_query_maps(model: Any, cases: Sequence[Any], steps: int = 200,
                   lr: float = 3e-3) -> tuple[dict[int, torch.Tensor], dict[int, dict[str, float]]]:
    """:func:`fit_read_maps` of the query maps alone (the keys as the memory writes them): the maps and the log."""
    maps, _, log = fit_read_maps(model, cases, steps, lr)
    return maps, log


def query_map_shares(model: Any, cases: Sequence[Any], maps: dict[int, torch.Tensor],
                     key_maps: dict[int, torch.Tensor] | None = None) -> dict[str, Any]:
    """Over ``cases`` and every (memory layer, query head) whose memory holds the needle: the mean share of the read
    on the needle with the model's own query maps (``own``) and with ``maps`` (``fitted``; the keys mapped by
    ``key_maps`` where given), each layer's best head (``own_best``, ``fitted_best``), and the needle's share of the
    written tokens (``uniform``)."""
    own, features = own_query_maps(model), unwrap_peft(model).config.memory_features
    totals: dict[str, list[float]] = {"own": [], "fitted": [], "own_best": [], "fitted_best": [], "uniform": []}
    for case in cases:
        for i, inputs in read_inputs(model, case).items():
            if not inputs["needle"]:
                continue
            with torch.no_grad():
                fitted_inputs = inputs if key_maps is None else {**inputs, "keys": _mapped_keys(key_maps[i], inputs)}
                for name, query_map, seen in (("own", own[i], inputs), ("fitted", maps[i], fitted_inputs)):
                    share = needle_share(query_map, seen, features)
                    totals[name].extend(share.tolist())
                    totals[name + "_best"].append(float(share.max()))
            totals["uniform"].append(len(inputs["needle"]) / float(inputs["keep"].sum()))
    return {name: (sum(v) / len(v) if v else None) for name, v in totals.items()}


def save_with_query_maps(source: str | Path, maps: dict[int, torch.Tensor], out: str | Path,
                         record: dict[str, Any], settings: dict[str, Any] | None = None,
                         key_maps: dict[int, torch.Tensor] | None = None) -> Path:
    """The trained memory ``source`` with its memory query maps replaced by ``maps`` (and its key maps by
    ``key_maps`` where given), written to ``out`` (a
    trained-memory directory that :func:`senri.model.trained.load_trained_memory` loads and the grid grades); the
    card records ``record`` under ``read_fit`` and, in its settings, ``settings`` (the settings that shape no
    parameter under which the maps were fitted, e.g. another feature map). Written beside ``out`` and renamed into
    place, so a failure leaves no half-written memory."""
    source, out = Path(source), Path(out)
    tensors = load_file(str(source / PARAMETERS_FILE))
    replaced = [(f"model.layers.{i}.self_attn.memory_query_map", m) for i, m in maps.items()]
    replaced += [(f"model.layers.{i}.self_attn.memory_key_map", m) for i, m in (key_maps or {}).items()]
    for name, value in replaced:
        if name not in tensors:
            raise ValueError(f"{source} has no {name}: its memory has no map to replace (memory_qk_map)")
        tensors[name] = value.to(tensors[name].dtype).contiguous()
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    save_file(tensors, str(staging / PARAMETERS_FILE))
    card = json.loads((staging / CARD_FILE).read_text())
    card["read_fit"] = {"source": str(source), **record}
    if settings:
        unknown = sorted(set(settings) - set(READ_SETTINGS))
        if unknown:
            raise ValueError(f"settings {unknown} shape parameters; only {', '.join(READ_SETTINGS)} may change")
        card["settings"] = {**card["settings"], **settings}
    (staging / CARD_FILE).write_text(json.dumps(card, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


__all__ = ["read_inputs", "needle_share", "own_query_maps", "own_key_maps", "fit_read_maps", "fit_query_maps",
           "query_map_shares",
           "save_with_query_maps"]
