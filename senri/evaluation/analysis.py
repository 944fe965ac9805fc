"""Measurements for analysis notebooks: memory norms over a stream, gate values, local attention maps."""

from __future__ import annotations

import torch

from ..model.cache import SenriCache
from ..model.memory import MEMORY_DTYPE, empty_memory, memory_states
from ..model.modeling_senri import SenriForCausalLM, rope


@torch.inference_mode()
def memory_norm_trace(model: SenriForCausalLM, input_ids: torch.Tensor, piece: int) -> list[dict[str, float]]:
    """Stream ``input_ids`` (1, T) in pieces; after each, the Frobenius norm of M per memory layer.

    Returns one record per piece: ``{"tokens": seen, "layer_<i>": norm, ...}``.
    """
    cache = SenriCache(model.config, batch_size=input_ids.shape[0])
    input_ids = input_ids.to(model.device)
    trace = []
    for start in range(0, input_ids.shape[1], piece):
        model(input_ids=input_ids[:, start : start + piece], cache=cache, use_cache=True, logits_to_keep=1)
        trace.append({"tokens": cache.seen_tokens, **{f"layer_{i}": n for i, n in cache.memory_norms().items()}})
    return trace


def gate_table(model: SenriForCausalLM) -> dict[str, list[float]]:
    """Per memory layer, the memory path's weight for each query head."""
    return {f"layer_{i}": values.float().tolist() for i, values in model.memory_gate_values().items()}


@torch.inference_mode()
def local_attention_map(model: SenriForCausalLM, input_ids: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    """Softmax weights (T, T) of one head's local attention on a single sequence (1, T), window mask applied.

    Recomputes q and k from the layer's input (captured with a forward hook), so it shows what the block-sliding
    window lets each query see: zeros left of the window, zeros above the diagonal.
    """
    if input_ids.shape[0] != 1:
        raise ValueError(f"local_attention_map takes one sequence, got batch size {input_ids.shape[0]}")
    attn = model.model.layers[layer].self_attn
    if not attn.has_local:
        raise ValueError(f"layer {layer} is {attn.layer_type!r}: it has no local attention")
    captured = {}

    def capture(module: torch.nn.Module, args: tuple, output: object) -> None:
        captured["x"] = args[0]

    handle = attn.register_forward_hook(capture)
    try:
        model(input_ids=input_ids.to(model.device))
    finally:
        handle.remove()
    x = captured["x"]
    T, D = x.shape[1], attn.head_dim
    q = attn.q_proj(x).view(1, T, -1, D).transpose(1, 2)[:, head : head + 1]
    k = attn.k_proj(x).view(1, T, -1, D).transpose(1, 2)[:, head // attn.num_groups : head // attn.num_groups + 1]
    cos, sin = model.model.rotary_emb(x, torch.arange(T, device=x.device)[None])
    scores = (rope(q, cos, sin) @ rope(k, cos, sin).transpose(-1, -2))[0, 0].float() * attn.scaling
    pos = torch.arange(T, device=x.device)
    allowed = pos[None, :] <= pos[:, None]
    if attn.window_chunks is not None:
        C = attn.chunk_size
        allowed &= pos[None, :] >= ((pos // C - attn.window_chunks) * C)[:, None]
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1).cpu()


def passkey_probe(tokenizer, seq_len: int, num_samples: int, seed: int, window: int, chunk_size: int,
                  template: str = "niah_words") -> dict[str, torch.Tensor]:
    """A fixed batch of passkey samples whose needle lies beyond the window (only the memory can reach it), built
    like the training data (:class:`senri.tasks.data.PasskeyRetrievalDataset`) from a seed training never uses.

    Returns ``input_ids`` (N, seq_len), ``answer_pos`` (N,) (the position whose logits predict the answer),
    ``answer`` (N,) (its first token) and ``value_pos`` (N,) (where that token sits inside the needle).
    """
    from ..tasks.data import PasskeyRetrievalDataset

    data = PasskeyRetrievalDataset(tokenizer, seq_len, num_samples, seed + 20_011, window, chunk_size,
                                   template=template, beyond_window=1.0)
    ids, answer_pos, answer, value_pos = [], [], [], []
    for i in range(num_samples):
        prompt, ans, where = data.sample(i)
        row = prompt + ans
        found = [p for p in range(where["needle_start"], where["needle_end"]) if row[p] == ans[0]]
        ids.append(row)
        answer_pos.append(len(prompt) - 1)
        answer.append(ans[0])
        value_pos.append(found[-1] if found else where["needle_end"] - 2)
    as_tensor = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return {"input_ids": as_tensor(ids), "answer_pos": as_tensor(answer_pos), "answer": as_tensor(answer),
            "value_pos": as_tensor(value_pos)}


@torch.no_grad()
def retrieval_probe(model: SenriForCausalLM, probe: dict[str, torch.Tensor],
                    candidates: torch.Tensor | None = None) -> dict[str, float]:
    """How well the model, and its memory alone, retrieve a needle beyond the window (``probe``: :func:`passkey_probe`).

    * ``probe/acc``, ``probe/answer_loss``: the model's greedy accuracy and cross-entropy on the answer token;
    * per memory layer ``i`` and query head ``h``, at the answer position (which reads only the memory for the
      needle): ``probe/needle_lift/i/h``: the share of the memory read's weight φ(q)·φ(k_s) that falls on the
      needle's value token, times the number of memorised tokens (1 = no preference, the read is an average);
      ``probe/memory_acc/i/h``: whether the value read from memory, φ(q)M / φ(q)z, is closer to the
      needle word's value vector than to every other candidate's (cosine; ``candidates``: token ids, the answer words);
      it uses the layer's own update rule, so a delta-rule memory that has overwritten the needle scores low;
      ``probe/needle_scale/i/h``: the read's component along the needle's value vector, in units of it (1: the
      needle comes back at full size; it shrinks when the normaliser φ(q)·z counts tokens the numerator does not).
    """
    was_training = model.training
    model.eval()
    device = model.device
    ids = probe["input_ids"].to(device)
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for i in model.config.memory_layers:
        attn = model.model.layers[i].self_attn
        hooks.append(attn.register_forward_hook(lambda m, args, out, i=i: captured.__setitem__(i, args[0])))
    try:
        logits = model(input_ids=ids).logits.float()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    rows = torch.arange(ids.shape[0], device=device)
    answer_pos, answer = probe["answer_pos"].to(device), probe["answer"].to(device)
    at = logits[rows, answer_pos]
    stats = {"probe/acc": float((at.argmax(-1) == answer).float().mean()),
             "probe/answer_loss": float(torch.nn.functional.cross_entropy(at, answer))}
    if candidates is None:
        candidates = torch.unique(answer)
    candidates = candidates.to(device)
    for i, x in captured.items():
        attn = model.model.layers[i].self_attn
        B, T, _ = x.shape
        D, H, G, C = attn.head_dim, attn.num_kv_heads, attn.num_groups, attn.chunk_size
        q = attn.q_proj(x).view(B, T, H * G, D).transpose(1, 2).to(MEMORY_DTYPE)
        k = attn.k_proj(x).view(B, T, H, D).transpose(1, 2).to(MEMORY_DTYPE)
        v = attn.v_proj(x).view(B, T, H, D).transpose(1, 2).to(MEMORY_DTYPE)
        t = int(answer_pos[0])
        if not bool((answer_pos == t).all()):
            raise ValueError("retrieval_probe needs every sample's answer at the same position")
        window_chunks = attn.window_chunks or 0
        n_mem = max(0, t // C - window_chunks)  # chunks the query at t reads from memory
        if n_mem == 0:
            continue
        mem_k, mem_v = k[:, :, : n_mem * C], v[:, :, : n_mem * C]
        features = model.config.memory_features
        sq = features(q[:, :, t])  # (B, Hq, P)
        sk = features(mem_k).repeat_interleave(G, dim=1)  # (B, Hq, L, P)
        weights = torch.einsum("bhd,bhld->bhl", sq, sk)
        share = weights[rows, :, probe["value_pos"].to(device)] / weights.sum(-1)  # (B, Hq)
        lift = share * n_mem * C
        M0, z0 = empty_memory(B, H, D, device=device, feature_dim=features.dim(D))
        Ms, zs = memory_states(mem_k.reshape(B, H, n_mem, C, D), mem_v.reshape(B, H, n_mem, C, D), M0, z0,
                               model.config.memory_update, model.config.memory_eps, feature_map=features)
        M, z = Ms[:, :, -1].repeat_interleave(G, dim=1), zs[:, :, -1].repeat_interleave(G, dim=1)
        norm = torch.einsum("bhd,bhd->bh", sq, z)[..., None] + model.config.memory_eps
        read = torch.einsum("bhd,bhde->bhe", sq, M) / norm
        needle_v = v[rows, :, probe["value_pos"].to(device)].repeat_interleave(G, dim=1)  # (B, Hq, D)
        # Projection of the read on the needle's value, in units of that value: 1 = the needle returned at full size.
        along = (read * needle_v).sum(-1) / needle_v.pow(2).sum(-1).clamp_min(1e-12)
        for h in range(H * G):
            stats[f"probe/needle_scale/{i}/{h}"] = float(along[:, h].mean())
        for h in range(H * G):
            stats[f"probe/needle_lift/{i}/{h}"] = float(lift[:, h].mean())
        if i != 0:
            continue
        # Value vectors of the candidate words (layer 0: a function of the token alone).
        cand_x = captured_values(model, i, candidates)  # (K, Hkv, D)
        cand_v = cand_x.repeat_interleave(G, dim=1)  # (K, Hq, D)
        scores = torch.einsum("bhd,khd->bhk", read, torch.nn.functional.normalize(cand_v, dim=-1))  # cosine
        target = (candidates[None, :] == answer[:, None]).float().argmax(-1)  # (B,)
        correct = (scores.argmax(-1) == target[:, None]).float()  # (B, Hq)
        for h in range(H * G):
            stats[f"probe/memory_acc/{i}/{h}"] = float(correct[:, h].mean())
    return stats


def retrieval_by_length(model: SenriForCausalLM, tokenizer, lengths, num_samples: int = 16, seed: int = 0,
                        candidates: torch.Tensor | None = None) -> dict[int, dict[str, float]]:
    """:func:`retrieval_probe` on needles beyond the window in contexts of each length (``{length: stats}``), plus
    per length the best head's ``memory_acc`` and ``needle_lift``: does the memory still return the needle when
    thousands of tokens were written after it?"""
    out = {}
    for length in lengths:
        probe = passkey_probe(tokenizer, length, num_samples, seed, model.config.sliding_window,
                              model.config.chunk_size)
        stats = retrieval_probe(model, probe, candidates)
        for name in ("memory_acc", "needle_lift", "needle_scale"):
            values = [v for k, v in stats.items() if k.startswith(f"probe/{name}/")]
            stats[f"best_{name}"] = max(values) if values else float("nan")
        out[int(length)] = stats
    return out


def takeoff_step(records, key: str = "probe/acc", level: float = 0.5) -> int | None:
    """The first logged step at which ``key`` (default: retrieval accuracy beyond the window) reaches ``level``
    in a run's ``metrics.jsonl`` records; None if it never does."""
    return next((int(r["step"]) for r in records if r.get(key, float("-inf")) >= level), None)


def seed_outcomes(by_seed, window: int, min_multiple: int = 8, threshold: float = 0.8) -> dict[str, dict[int, bool]]:
    """Whether each (model, seed) run learned retrieval: NIAH accuracy >= ``threshold`` at every length of at
    least ``min_multiple`` windows (``by_seed``: ``{model: {seed: {length: accuracy}}}``, as in variants.json)."""
    out: dict[str, dict[int, bool]] = {}
    for name, seeds in by_seed.items():
        out[name] = {}
        for seed, table in seeds.items():
            far = [float(acc) for length, acc in table.items() if int(length) >= min_multiple * window]
            out[name][int(seed)] = bool(far) and min(far) >= threshold
    return out


@torch.no_grad()
def captured_values(model: SenriForCausalLM, layer: int, token_ids: torch.Tensor) -> torch.Tensor:
    """Value vectors (K, H, D) that layer ``layer`` (must be 0: its input is the token embedding alone) gives
    each of ``token_ids``."""
    if layer != 0:
        raise ValueError("candidate value vectors are position-free only on layer 0")
    block = model.model.layers[0]
    x = block.input_layernorm(model.model.embed_tokens(token_ids.to(model.device)))
    attn = block.self_attn
    return attn.v_proj(x).view(len(token_ids), attn.num_kv_heads, attn.head_dim).to(MEMORY_DTYPE)


__all__ = ["memory_norm_trace", "gate_table", "local_attention_map", "passkey_probe", "retrieval_probe",
           "retrieval_by_length", "captured_values",
           "takeoff_step", "seed_outcomes"]
