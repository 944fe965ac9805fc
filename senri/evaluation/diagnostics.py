"""Where should a base model's memory layers go? Two measurements on the base model, before any training.

* :func:`retrieval_head_scan`: attention mass from the question's last token onto the needle, per layer and head,
  of the base model with full attention. The heads that copy the pass key are the ones a memory must serve.
* :func:`placement_ceiling`: what a *perfect* memory would give a placement. The chosen layers see the whole causal
  context (``full_attention``), every other layer its window plus the attention sinks; passkey accuracy
  (teacher-forced exact match of the key) and natural-text NLL beyond twice the window. A placement whose ceiling is
  zero asks training to build the retrieval circuit from nothing; the cheapest placement with a high ceiling is the
  one to train.

Both take any Llama-shaped ``transformers`` model (``q_proj``/``k_proj`` attention, RoPE) and its tokenizer.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..model.conversion import convert_llama_to_senri
from ..model.memory import MEMORY_DTYPE
from ..tasks.niah import PASSKEY_FILLER, make_needle

# Where the needle may sit: a fraction of the haystack, chosen by the caller so that it lies beyond the window.
DEFAULT_DEPTHS = (0.1, 0.4)


@dataclass
class PasskeyCase:
    """A classic pass-key prompt: ``ids`` (prompt then answer), the answer's positions and the needle's span."""

    ids: list[int]
    answer_start: int
    needle: tuple[int, int]
    key: str


def filler_sentences(tokenizer: Any) -> list[list[int]]:
    """The classic pass-key filler (``PASSKEY_FILLER``), one token list per sentence, each with its leading space."""
    return [list(tokenizer(" " + sentence.strip() + ".", add_special_tokens=False)["input_ids"])
            for sentence in PASSKEY_FILLER.split(".") if sentence.strip()]


def passkey_cases(
    tokenizer: Any, length: int, num_cases: int, seed: int = 0, depths: tuple[float, float] = DEFAULT_DEPTHS,
) -> list[PasskeyCase]:
    """``num_cases`` prompts of at most ``length`` tokens (answer excluded): whole sentences of the classic filler
    (``PASSKEY_FILLER``), the 5-digit key's sentences between two filler sentences at a depth drawn uniformly from
    ``depths`` (fractions of the filler), the question last. A case depends only on (seed, length, index)."""
    if not 0.0 <= depths[0] <= depths[1] <= 1.0:
        raise ValueError(f"depths must be 0 <= low <= high <= 1, got {depths}")
    encode = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    sentences = filler_sentences(tokenizer)
    cases = []
    for index in range(num_cases):
        rng = random.Random(f"passkey-case-{seed}-{length}-{index}")
        needle = make_needle("passkey", rng)
        needle_ids, question_ids = encode(" " + needle.needle_texts[0]), encode(" " + needle.question)
        answer_ids = encode(needle.answer)
        budget = length - len(needle_ids) - len(question_ids)
        filler: list[list[int]] = []
        while sum(map(len, filler)) + len(sentences[len(filler) % len(sentences)]) <= budget:
            filler.append(sentences[len(filler) % len(sentences)])
        if not filler:
            raise ValueError(f"length {length} is too short for a pass-key prompt")
        at = round(rng.uniform(*depths) * len(filler))  # a sentence boundary
        before = [t for sentence in filler[:at] for t in sentence]
        after = [t for sentence in filler[at:] for t in sentence]
        prompt = before + needle_ids + after + question_ids
        cases.append(PasskeyCase(prompt + answer_ids, len(prompt), (len(before), len(before) + len(needle_ids)),
                                 needle.answer.strip()))
    return cases


@torch.no_grad()
def teacher_forced_scores(model: Any, cases: Sequence[PasskeyCase]) -> list[tuple[bool, float]]:
    """Per case: (does the argmax predict every answer token given the prompt (teacher forcing), the mean
    log-probability of the answer tokens)."""
    device = next(model.parameters()).device
    scores = []
    for case in cases:
        ids = torch.tensor([case.ids], device=device)
        n_answer = len(case.ids) - case.answer_start
        logits = model(input_ids=ids[:, :-1], logits_to_keep=n_answer).logits[0].float()
        answer = ids[0, case.answer_start :]
        log_probs = logits.log_softmax(-1).gather(1, answer[:, None])
        scores.append((bool((logits.argmax(-1) == answer).all()), float(log_probs.mean())))
    return scores


def teacher_forced_passkey(model: Any, cases: Sequence[PasskeyCase]) -> list[bool]:
    """Per case: does the model's argmax predict every answer token given the prompt (teacher forcing)?"""
    return [found for found, _ in teacher_forced_scores(model, cases)]


@torch.no_grad()
def retrieval_head_scan(model: Any, cases: Sequence[PasskeyCase]) -> torch.Tensor:
    """(layers, heads): mean over cases of the attention mass from the question's last token onto the needle.

    Computed from each layer's own q/k projections and RoPE on the inputs the layer receives (a forward pre-hook),
    for the last query only: no (T, T) attention matrices are materialised.
    """
    layers = model.model.layers
    inputs: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}

    def capture(index: int):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            inputs[index] = (hidden, kwargs["position_embeddings"])
        return hook

    handles = [layer.self_attn.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    total = None
    try:
        for case in cases:
            prompt = torch.tensor([case.ids[: case.answer_start]], device=device)
            model(input_ids=prompt, logits_to_keep=1)
            masses = []
            for i, layer in enumerate(layers):
                attn, (hidden, (cos, sin)) = layer.self_attn, inputs[i]
                B, T, _ = hidden.shape
                D = attn.head_dim
                q = attn.q_proj(hidden[:, -1:]).view(B, 1, -1, D).transpose(1, 2)  # (B, Hq, 1, D)
                k = attn.k_proj(hidden).view(B, T, -1, D).transpose(1, 2)  # (B, H, T, D)
                q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
                _, k = apply_rotary_pos_emb(k, k, cos, sin)
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                weights = ((q @ k.transpose(-1, -2)) * D**-0.5).float().softmax(-1)[0, :, 0]  # (Hq, T)
                masses.append(weights[:, case.needle[0] : case.needle[1]].sum(-1))
            scan = torch.stack(masses)  # (layers, heads)
            total = scan if total is None else total + scan
    finally:
        for handle in handles:
            handle.remove()
    return total / len(cases)


def placement_layer_types(num_layers: int, full_layers: Sequence[int]) -> list[str]:
    """``full_attention`` on ``full_layers`` (a perfect memory's view), ``sliding_attention`` elsewhere."""
    bad = [i for i in full_layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"placement layers {bad} are out of range; valid layers are 0..{num_layers - 1}")
    return ["full_attention" if i in set(full_layers) else "sliding_attention" for i in range(num_layers)]


@torch.no_grad()
def nll_beyond(model: Any, ids: torch.Tensor, start: int) -> float:
    """Mean next-token NLL over positions >= ``start`` of ``ids`` (1, T)."""
    logits = model(input_ids=ids[:, :-1]).logits[0, start:]
    return float(torch.nn.functional.cross_entropy(logits.float(), ids[0, start + 1 :]))


def memory_state_bytes(config: Any, num_memory_layers: int) -> int:
    """Bytes of the memory state (M and z, float32) that ``num_memory_layers`` memory layers hold per sequence."""
    H, D = config.num_key_value_heads, config.head_dim
    return num_memory_layers * H * (D * D + D) * torch.finfo(MEMORY_DTYPE).bits // 8


def placement_ceiling(
    base: Any, tokenizer: Any, placements: dict[str, Sequence[int]], lengths: Sequence[int], num_cases: int,
    sliding_window: int = 256, chunk_size: int = 64, num_sink_tokens: int = 4, text_ids: torch.Tensor | None = None,
    seed: int = 0, prefill_tokens: int | None = None, progress: bool = False,
) -> list[dict[str, Any]]:
    """One record per (placement, length): passkey accuracy when the placement's layers see the full context and
    every other layer its window plus ``num_sink_tokens`` sinks; with ``text_ids`` (1, T) the NLL over positions
    beyond 2 × ``sliding_window``; the memory state bytes those layers would hold as memory layers, and with
    ``prefill_tokens`` the time of a prefill with memory on those layers (no grad, one thread's share)."""
    num_layers = base.config.num_hidden_layers
    cases = {length: passkey_cases(tokenizer, length, num_cases, seed) for length in lengths}
    records = []
    for name, layers in placements.items():
        full = convert_llama_to_senri(
            base, sliding_window=sliding_window, chunk_size=chunk_size, num_sink_tokens=num_sink_tokens,
            layer_types=placement_layer_types(num_layers, layers),
        ).eval()
        nll = None if text_ids is None else nll_beyond(full, text_ids, 2 * sliding_window)
        prefill = None
        if prefill_tokens:
            memory = convert_llama_to_senri(
                base, sliding_window=sliding_window, chunk_size=chunk_size, num_sink_tokens=num_sink_tokens,
                layer_types=["memory" if i in set(layers) else "sliding_attention" for i in range(num_layers)],
            ).eval()
            ids = torch.tensor([cases[lengths[0]][0].ids[:prefill_tokens]])
            with torch.no_grad():
                memory(input_ids=ids, logits_to_keep=1)  # warm-up
                began = time.perf_counter()
                memory(input_ids=ids, logits_to_keep=1)
                prefill = time.perf_counter() - began
        for length in lengths:
            found = teacher_forced_passkey(full, cases[length])
            record = {
                "placement": name, "layers": list(layers), "length": length, "window": sliding_window,
                "num_sink_tokens": num_sink_tokens, "cases": len(found), "passkey": sum(found) / len(found),
                "nll_beyond_2w": nll, "memory_state_bytes": memory_state_bytes(base.config, len(layers)),
                "prefill_seconds": prefill,
            }
            records.append(record)
            if progress:
                print(f"{name:>12} {length:>6}: passkey {record['passkey']:.2f} ({len(found)} cases), NLL {nll}",
                      flush=True)
    return records


__all__ = [
    "PasskeyCase", "passkey_cases", "teacher_forced_scores", "teacher_forced_passkey", "retrieval_head_scan", "placement_layer_types",
    "nll_beyond", "memory_state_bytes", "placement_ceiling",
]
