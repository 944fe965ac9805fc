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


def context_positions(config: Any, answer_query: int, count: int, question: int = 32) -> list[int]:
    """``count`` query positions of the prose before ``answer_query``, evenly spaced from the first that reads a
    non-empty memory to ``question`` tokens before the answer's query (the question's own tokens excluded): the
    ordinary reads that :func:`fit_read_maps` keeps with ``preserve``. Empty where the prose is too short."""
    first = (config.window_chunks + 1) * config.chunk_size
    last = answer_query - question
    if count <= 0 or last <= first:
        return []
    return sorted({round(first + (last - first) * j / max(count - 1, 1)) for j in range(count)})


def value_span(case: Any) -> list[int]:
    """The positions of the asked value's tokens inside ``case``'s needle (what the answer copies): where the
    longest prefix of the answer's value tokens (``value_tokens`` of them, or the whole answer) occurs in the
    statement, its last such place. Empty where not even the first token occurs there (a tokenisation that differs
    in context)."""
    count = getattr(case, "value_tokens", len(case.ids) - case.answer_start)
    value = case.ids[case.answer_start: case.answer_start + count]
    start, end = case.needle
    best: tuple[int, int] = (0, 0)
    for j in range(start, end):
        n = 0
        while n < len(value) and j + n < end and case.ids[j + n] == value[n]:
            n += 1
        if n and n >= best[1]:
            best = (j, n)
    return list(range(best[0], best[0] + best[1]))


def read_inputs(model: Any, case: Any, context: int = 0) -> dict[int, dict[str, Any]]:
    """Per memory layer, what the read of ``case``'s answer query sees: ``q`` (Hq, D) the layer's raw query (no
    map, no RoPE), ``keys`` (H, W, D) the memory's keys as written (``raw_keys`` before its key map), ``keep`` (W,)
    and ``needle``, the needle's
    written positions (empty where the memory does not hold it yet), ``value`` those of the asked value's tokens in
    it (:func:`value_span`). With ``context`` > 0, also what ``context``
    ordinary reads of the prose see (:func:`context_positions`): ``values`` (H, W, D) the written values,
    ``context_q`` (Hq, Q, D) their raw queries and ``context_held`` (Q,) how many of the first tokens each one's
    memory holds."""
    config = unwrap_peft(model).config
    ids = torch.tensor([case.ids[: case.answer_start]])
    held = held_tokens(config, ids.shape[1] - 1)
    positions = context_positions(config, ids.shape[1] - 1, context)
    out = {}
    for i, p in layer_projections(model, ids).items():
        # The query is cloned out of the layer's (Hq, T, D) queries so that a batch of cases does not hold them all.
        out[i] = {"q": p["q"][:, -1].clone(), "keys": p["mk"][:, :held], "raw_keys": p["k"][:, :held], "keep": p["keep"][:held],
                  "needle": list(range(case.needle[0], min(case.needle[1], held))),
                  "value": [t for t in value_span(case) if t < held]}
        if positions:
            out[i].update(values=p["v"][:, :held], context_q=p["q"][:, positions],
                          context_held=torch.tensor([held_tokens(config, t) for t in positions]))
    return out


def context_reads(query_map: torch.Tensor, key_map: torch.Tensor, inputs: dict[str, Any],
                  feature_map: FeatureMap = ELU, eps: float = 1e-6) -> torch.Tensor:
    """What the memory returns (Hq, Q, D) to ``inputs``' ordinary reads (:func:`read_inputs` with ``context``) with
    its queries mapped by ``query_map`` and its keys by ``key_map`` (H, D, D): ``φ(q)M / (φ(q)z + eps)`` of the
    linear update rule, each query reading the first ``context_held`` tokens written."""
    H, D = query_map.shape[0], query_map.shape[-1]
    fq = feature_map(per_head_map(inputs["context_q"].view(H, -1, inputs["context_q"].shape[1], D), query_map))
    fk = feature_map(_mapped_keys(key_map, inputs)) * inputs["keep"][:, None]  # (H, W, P)
    W = fk.shape[1]
    held = (torch.arange(W)[None, :] < inputs["context_held"][:, None]).to(fk.dtype)  # (Q, W)
    weights = torch.einsum("hgqp,hwp->hgqw", fq, fk) * held
    read = weights @ inputs["values"][:, None] / (weights.sum(-1, keepdim=True) + eps)
    return read.reshape(-1, *read.shape[2:])


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
                  preserve: float = 0.0, context: int = 32,
                  ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor] | None, dict[int, dict[str, float]]]:
    """Fit each memory layer's query map (and, with ``keys``, its key map too: what the memory writes) to maximise
    the mean log-share of the read on the needle over ``cases`` (Adam, full batch, from the model's own maps).
    With ``preserve`` > 0 the loss adds ``preserve`` × the *drift* of the memory's ordinary reads: over ``context``
    reads of the prose per case (:func:`context_positions`), ``Σ‖read − own read‖² / Σ‖own read‖²`` (the own maps'
    reads; :func:`context_reads`, the linear update rule), so that the fit sharpens the answer's read while what
    the layers above get elsewhere stays as they were trained on it.
    Returns the query maps, the key maps (None without ``keys``) and per layer the mean share before and after
    (and, with ``preserve``, the drift after)."""
    config = unwrap_peft(model).config
    if preserve > 0 and config.memory_update != "linear":
        raise ValueError(f"preserve reads the linear update rule's memory; this model's memory_update is "
                         f"{config.memory_update!r}")
    if preserve < 0:
        raise ValueError(f"preserve must be >= 0, got {preserve}")
    per_layer: dict[int, list[dict[str, Any]]] = {}
    for case in cases:
        for i, inputs in read_inputs(model, case, context if preserve > 0 else 0).items():
            if inputs["needle"]:
                per_layer.setdefault(i, []).append(inputs)
    if not per_layer:
        raise ValueError("no case has its needle in the memory when the answer is asked; use longer cases")
    maps, key_maps, log = own_query_maps(model), (own_key_maps(model) if keys else None), {}
    own_keys = own_key_maps(model)
    features = config.memory_features
    for i, batch in per_layer.items():
        anchored = [b for b in batch if "context_q" in b]  # none without preserve: no context was read
        with torch.no_grad():
            own_reads = [context_reads(maps[i], own_keys[i], b, features, config.memory_eps) for b in anchored]
        own_norm = sum(float(r.pow(2).sum()) for r in own_reads) or 1.0
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

        def drift() -> torch.Tensor:
            keys_now = own_keys[i] if key_maps is None else key_map
            return sum((context_reads(query_map, keys_now, b, features, config.memory_eps) - r).pow(2).sum()
                       for b, r in zip(anchored, own_reads)) / own_norm

        before = mean_share()
        for _ in range(steps):
            loss = -shares().clamp_min(1e-30).log().mean()
            if anchored:
                loss = loss + preserve * drift()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        log[i] = {"before": before, "after": mean_share()}
        if anchored:
            with torch.no_grad():
                log[i]["drift"] = float(drift())
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
                     key_maps: dict[int, torch.Tensor] | None = None,
                     seen: Sequence[dict[int, dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Over ``cases`` and every (memory layer, query head) whose memory holds the needle: the mean share of the read
    on the needle with the model's own query maps (``own``) and with ``maps`` (``fitted``; the keys mapped by
    ``key_maps`` where given), each layer's best head (``own_best``, ``fitted_best``), and the needle's share of the
    written tokens (``uniform``); the same on the asked value's tokens alone (``own_value``, ``fitted_value``,
    ``uniform_value``: what the answer copies, :func:`value_span`). ``seen``, each case's :func:`read_inputs`
    where already read, spares the forward per case."""
    own, features = own_query_maps(model), unwrap_peft(model).config.memory_features
    totals: dict[str, list[float]] = {"own": [], "fitted": [], "own_best": [], "fitted_best": [], "uniform": [],
                                      "own_value": [], "fitted_value": [], "uniform_value": []}
    for case_inputs in seen or (read_inputs(model, case) for case in cases):
        for i, inputs in case_inputs.items():
            if not inputs["needle"]:
                continue
            with torch.no_grad():
                fitted_inputs = inputs if key_maps is None else {**inputs, "keys": _mapped_keys(key_maps[i], inputs)}
                for name, query_map, view in (("own", own[i], inputs), ("fitted", maps[i], fitted_inputs)):
                    share = needle_share(query_map, view, features)
                    totals[name].extend(share.tolist())
                    totals[name + "_best"].append(float(share.max()))
                    if inputs["value"]:
                        totals[name + "_value"].extend(
                            needle_share(query_map, {**view, "needle": inputs["value"]}, features).tolist())
            totals["uniform"].append(len(inputs["needle"]) / float(inputs["keep"].sum()))
            if inputs["value"]:
                totals["uniform_value"].append(len(inputs["value"]) / float(inputs["keep"].sum()))
    return {name: (sum(v) / len(v) if v else None) for name, v in totals.items()}


def saved_maps(directory: str | Path) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """The memory query and key maps per memory layer of the trained memory ``directory``, float32 (what
    :func:`save_with_query_maps` wrote, or any trained memory's own)."""
    tensors = load_file(str(Path(directory) / PARAMETERS_FILE))
    out: tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]] = ({}, {})
    for name, value in tensors.items():
        for maps, suffix in zip(out, ("memory_query_map", "memory_key_map")):
            if name.endswith(f".self_attn.{suffix}"):
                maps[int(name.split(".")[2])] = value.float()
    if not out[0]:
        raise ValueError(f"{directory} has no memory query maps (memory_qk_map)")
    return out


def read_drift(model: Any, cases: Sequence[Any], maps: dict[int, torch.Tensor], key_maps: dict[int, torch.Tensor],
               context: int = 32, seen: Sequence[dict[int, dict[str, Any]]] | None = None) -> dict[str, Any]:
    """How far ``maps`` and ``key_maps`` move the memory's ordinary reads of the prose from the model's own maps,
    layer by layer on the same inputs (:func:`context_reads`, ``context`` reads per case): ``drift`` the mean over
    the memory layers of ``Σ‖read − own read‖² / Σ‖own read‖²``, and ``per_layer``. ``seen``, each case's
    :func:`read_inputs` with ``context`` where already read, spares the forward per case."""
    config = unwrap_peft(model).config
    own_q, own_k = own_query_maps(model), own_key_maps(model)
    sums: dict[int, list[float]] = {}
    for case_inputs in seen or (read_inputs(model, case, context) for case in cases):
        for i, inputs in case_inputs.items():
            if "context_q" not in inputs:
                continue
            with torch.no_grad():
                own = context_reads(own_q[i], own_k[i], inputs, config.memory_features, config.memory_eps)
                read = context_reads(maps[i], key_maps[i], inputs, config.memory_features, config.memory_eps)
            entry = sums.setdefault(i, [0.0, 0.0])
            entry[0] += float((read - own).pow(2).sum())
            entry[1] += float(own.pow(2).sum())
    if not sums:
        raise ValueError("no case is long enough for an ordinary read of the memory; use longer cases")
    per_layer = {i: a / b for i, (a, b) in sums.items()}
    return {"drift": sum(per_layer.values()) / len(per_layer), "per_layer": per_layer}


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


__all__ = ["value_span", "context_positions", "read_inputs", "context_reads", "needle_share", "own_query_maps", "own_key_maps", "fit_read_maps", "fit_query_maps",
           "query_map_shares", "saved_maps", "read_drift", "save_with_query_maps"]
