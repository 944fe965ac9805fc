"""Measurements for analysis notebooks: memory norms over a stream, gate values, local attention maps."""

from __future__ import annotations

import torch

from .cache import SenriCache
from .modeling_senri import SenriForCausalLM, rope


@torch.inference_mode()
def memory_norm_trace(model: SenriForCausalLM, input_ids: torch.Tensor, piece: int) -> list[dict[str, float]]:
    """Stream ``input_ids`` (1, T) in pieces; after each, the Frobenius norm of M per memory layer.

    Returns one record per piece: ``{"tokens": seen, "layer_<i>": norm, ...}``.
    """
    cache = SenriCache(model.config, batch_size=input_ids.shape[0])
    input_ids = input_ids.to(model.device)
    trace = []
    for start in range(0, input_ids.shape[1], piece):
        model(input_ids=input_ids[:, start : start + piece], past_key_values=cache, use_cache=True, logits_to_keep=1)
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


__all__ = ["memory_norm_trace", "gate_table", "local_attention_map"]
