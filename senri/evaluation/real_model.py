"""The real-model yardstick: base (full attention) vs converted with gates closed vs trained memory, same cases.

* pass-key retrieval (the classic filler, :func:`senri.evaluation.diagnostics.passkey_cases`) with the needle beyond the
  window, scored by teacher forcing (every key token must be the argmax: what greedy decoding would produce);
* a natural-text needle ("a fact stated once") in natural text that training never saw
  (:func:`senri.tasks.facts.fact_cases`);
* NLL on held-out natural text inside and beyond the window.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .diagnostics import PasskeyCase, nll_beyond, passkey_cases, teacher_forced_scores


def depths_beyond_window(length: int, sliding_window: int, chunk_size: int, margin: int = 32) -> tuple[float, float]:
    """Needle depths (fractions of the haystack) whose needle ends before the last ``window + chunk`` tokens, so
    that it lies beyond every query's window when the question is asked."""
    usable = length - sliding_window - chunk_size - margin
    if usable <= 0:
        raise ValueError(f"length {length} leaves no room beyond a window of {sliding_window} + {chunk_size}")
    return 0.02, max(0.02, usable / length - 0.02)


@contextlib.contextmanager
def gates_closed(model: Any) -> Iterator[Any]:
    """The same model with every memory gate at 0 (exactly the converted base model) inside the block."""
    gates = [layer.self_attn.memory_gate for layer in model.model.layers if hasattr(layer.self_attn, "memory_gate")]
    saved = [g.detach().clone() for g in gates]
    with torch.no_grad():
        for g in gates:
            g.zero_()
    try:
        yield model
    finally:
        with torch.no_grad():
            for g, value in zip(gates, saved):
                g.copy_(value)


def compare_on_cases(models: dict[str, Any], cases: dict[str, Sequence[PasskeyCase]],
                     progress: bool = False) -> list[dict[str, Any]]:
    """Teacher-forced accuracy of each model on each named case set, and the mean log-probability of the answer
    tokens (a softer signal than exact match): one record per (model, case set)."""
    records = []
    for case_name, case_list in cases.items():
        for model_name, model in models.items():
            if model is None:
                continue
            scores = teacher_forced_scores(model, case_list)
            found = [f for f, _ in scores]
            records.append({"model": model_name, "cases": case_name, "n": len(found),
                            "accuracy": sum(found) / len(found), "found": found,
                            "answer_logprob": sum(lp for _, lp in scores) / len(scores)})
            if progress:
                print(f"{case_name:>22} {model_name:>14}: {sum(found)}/{len(found)}, answer log-prob "
                      f"{records[-1]['answer_logprob']:.3f}", flush=True)
    return records


def nll_table(models: dict[str, Any], text_ids: torch.Tensor, sliding_window: int, chunk_size: int) -> list[dict]:
    """NLL of each model on ``text_ids`` (1, T): inside the window (positions < window + chunk, where every model
    sees the whole prefix) and beyond twice the window."""
    inside = text_ids[:, : sliding_window + chunk_size]
    return [{"model": name, "nll_inside_window": nll_beyond(model, inside, 0),
             "nll_beyond_2w": nll_beyond(model, text_ids, 2 * sliding_window)}
            for name, model in models.items() if model is not None]


__all__ = ["depths_beyond_window", "gates_closed", "compare_on_cases", "nll_table", "passkey_cases"]
