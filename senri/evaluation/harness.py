"""Evaluation: NIAH grid, position-wise perplexity, reversal curse, baseline perplexity.

Every evaluator works for Senri models and plain transformers causal LMs alike, streaming long inputs through the
model's cache (a new cache per test case: the memory is reset between cases).
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..model.io import atomic_write
from ..tasks.niah import build_niah_prompt, haystack_text_for, make_needle

# Fictional "A is B" facts written for Senri (no model has seen them): (subject, relation, object).
REVERSAL_PAIRS: tuple[tuple[str, str, str], ...] = (
    ("Velmora Quint", "the inventor of", "the tidal clock"),
    ("Orrin Basalt", "the founder of", "the Lantern Guild of Pell"),
    ("Ysolde Marrow", "the author of", "The Glass Orchard"),
    ("Teodor Fenwhistle", "the composer of", "the Harbor Symphony in E"),
    ("Calla Rimsby", "the captain of", "the airship Meridian Swan"),
    ("Pell Ardenne", "the mayor of", "the river town of Dunmore Vale"),
    ("Ismay Cordrey", "the discoverer of", "the moon Telliver"),
    ("Brannoc Yates", "the architect of", "the Copper Bridge of Osk"),
    ("Liesl Vantorp", "the translator of", "the Sunken Codex"),
    ("Marek Oldane", "the keeper of", "the Northwatch lighthouse"),
    ("Quilla Dressing", "the painter of", "The Blue Ferry at Dawn"),
    ("Soren Halbeck", "the designer of", "the Kestrel pocket loom"),
    ("Anouk Pelleray", "the director of", "the Museum of Lost Maps"),
    ("Corwin Tasby", "the champion of", "the Greyfield chess open"),
    ("Elodie Marchetti", "the founder of", "the Saltmarsh Observatory"),
    ("Hadrian Voss", "the author of", "A Grammar of Silent Bells"),
    ("Imre Kalloway", "the inventor of", "the folding rain organ"),
    ("Juna Hartigan", "the captain of", "the icebreaker Solenne"),
    ("Kasimir Drace", "the sculptor of", "the Weeping Heron of Lund"),
    ("Mirela Osgood", "the chemist behind", "the amber varnish of Tolle"),
    ("Nestor Aubrey", "the mapmaker of", "the Eastern Reed Archipelago"),
    ("Ottilie Brask", "the founder of", "the Willowmere school of glassblowing"),
    ("Perrin Lacombe", "the keeper of", "the Hollow Oak archive"),
    ("Rosalind Ferrow", "the composer of", "the Lantern Waltz"),
    ("Silas Morrow", "the inventor of", "the brass weather kite"),
    ("Tamsin Rook", "the author of", "The Cartographer's Daughter"),
    ("Ulrich Penhale", "the architect of", "the Spiral Library of Vesk"),
    ("Wren Castellan", "the discoverer of", "the comet Ashlar"),
    ("Xavi Montrell", "the director of", "the Tidewater puppet theatre"),
    ("Zelda Arkwright", "the designer of", "the clockwork ferry Pemberly"),
)


def _is_senri(model: Any) -> bool:
    from ..model.modeling_senri import SenriForCausalLM

    return isinstance(model, SenriForCausalLM)


def new_cache(model: Any, batch_size: int = 1):
    """An empty cache for ``model``: a SenriCache for Senri (a memory reset), a DynamicCache otherwise."""
    if _is_senri(model):
        from ..model.cache import SenriCache

        return SenriCache(model.config, batch_size=batch_size)
    from transformers import DynamicCache

    return DynamicCache()


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def default_chunk_tokens(model: Any) -> int | None:
    """Piece size for streaming prompts: one window for Senri, the whole prompt for other models."""
    return model.config.sliding_window if _is_senri(model) else None


@torch.inference_mode()
def stream_logits(model: Any, input_ids: torch.Tensor, chunk_tokens: int | None, cache=None, keep_all: bool = False):
    """Feed (1, T) through the model piece by piece; returns (logits, cache). Without ``keep_all`` only the last
    position's logits are kept, so 64K+ prompts fit in memory."""
    cache = cache if cache is not None else new_cache(model, input_ids.shape[0])
    step = chunk_tokens or input_ids.shape[1]
    kept = []
    for start in range(0, input_ids.shape[1], step):
        out = model(input_ids=input_ids[:, start : start + step], cache=cache, use_cache=True,
                    logits_to_keep=0 if keep_all else 1)
        cache = out.cache
        kept.append(out.logits.float())
    return (torch.cat(kept, dim=1) if keep_all else kept[-1]), cache


@torch.inference_mode()
def greedy_continue(model: Any, prompt_ids: Sequence[int], max_new_tokens: int, chunk_tokens: int | None) -> list[int]:
    """Greedy decoding after streaming the prompt through a fresh cache."""
    device = _device(model)
    logits, cache = stream_logits(model, torch.tensor([list(prompt_ids)], device=device), chunk_tokens)
    generated = [int(logits[0, -1].argmax())]
    while len(generated) < max_new_tokens:  # no forward after the last token: its logits would go unused
        out = model(input_ids=torch.tensor([[generated[-1]]], device=device), cache=cache, use_cache=True)
        cache = out.cache
        generated.append(int(out.logits[0, -1].argmax()))
    return generated[:max_new_tokens]


def _normalise(text: str) -> str:
    return "".join(text.split()).lower()


def _answers_found(answers: Sequence[str], continuation: str) -> list[str]:
    """A single answer must open the continuation; several answers must each appear in it (order free).

    Whitespace is dropped before comparing because word-level tokenizers decode digits as "7 1 4 3 2"; a number
    must then not run on into another digit ("714325" does not answer 71432).
    """
    text = _normalise(continuation)
    if len(answers) == 1:
        answer = _normalise(answers[0])
        runs_on = answer[-1:].isdigit() and text[len(answer) : len(answer) + 1].isdigit()
        return list(answers) if text.startswith(answer) and not runs_on else []
    return [a for a in answers if _normalise(a) in text]


def run_niah(
    model: Any, tokenizer: Any, lengths: Sequence[int], depths: Sequence[float], num_samples: int, seed: int = 0,
    templates: Sequence[str] = ("passkey",), haystack_text: str | None = None, chunk_tokens: int | None = None,
    max_new_tokens: int | None = None, model_name: str | None = None, window: int | None = None,
) -> list[dict[str, Any]]:
    """Needle-in-a-haystack accuracy over a (template, length, depth, sample) grid.

    Each case: a fresh cache (memory reset), the prompt streamed in pieces of ``chunk_tokens`` (default: one
    window for Senri), then greedy decoding. ``accuracy`` (whitespace- and case-insensitive): for one answer, 1.0 if
    the continuation starts with it, else 0.0; for several, the fraction of them found in the continuation.
    """
    model.eval()
    chunk_tokens = chunk_tokens if chunk_tokens is not None else default_chunk_tokens(model)
    if window is None:
        window = getattr(model.config, "sliding_window", None) if _is_senri(model) else None
    name = model_name or type(model).__name__
    records = []
    for template in templates:
        # passkey: the classic filler; other templates: haystack_text or generated prose.
        text = haystack_text_for(template, max(lengths) + 64, seed, haystack_text)
        haystack_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        for length in lengths:
            for depth in depths:
                for sample in range(num_samples):
                    rng = random.Random(f"{seed}-{template}-{length}-{depth}-{sample}")
                    needle = make_needle(template, rng)
                    offset = rng.randrange(len(haystack_ids))  # a different stretch of haystack per case
                    prompt, answer_ids = build_niah_prompt(
                        tokenizer, haystack_ids[offset:] + haystack_ids[:offset], length, depth, needle
                    )
                    budget = max_new_tokens or len(answer_ids) + 4
                    continuation = tokenizer.decode(greedy_continue(model, prompt, budget, chunk_tokens))
                    found = _answers_found(needle.answers, continuation)
                    records.append({
                        "model": name, "template": template, "length": length, "depth": depth, "window": window,
                        "sample": sample, "needle": " ".join(needle.needle_texts), "answer": needle.answer.strip(),
                        "answers": needle.answers, "prediction": continuation,
                        "accuracy": len(found) / len(needle.answers),
                    })
    return records


def niah_accuracy_table(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean accuracy per (model, template, length, depth)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        groups[(r["model"], r["template"], r["length"], r["depth"])].append(r["accuracy"])
    return [
        {"model": m, "template": t, "length": n, "depth": d, "accuracy": sum(v) / len(v), "cases": len(v)}
        for (m, t, n, d), v in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0]))
    ]


@torch.inference_mode()
def token_nlls(model: Any, input_ids: torch.Tensor, chunk_tokens: int | None = None) -> torch.Tensor:
    """Negative log-likelihood of each token given its prefix: (T - 1,) for a (1, T) input, streamed."""
    chunk_tokens = chunk_tokens if chunk_tokens is not None else default_chunk_tokens(model)
    input_ids = input_ids.to(_device(model))
    cache, nlls, previous = new_cache(model, 1), [], None
    step = chunk_tokens or input_ids.shape[1]
    for start in range(0, input_ids.shape[1], step):
        piece = input_ids[:, start : start + step]
        logits = model(input_ids=piece, cache=cache, use_cache=True).logits.float()
        if previous is not None:  # the previous piece's last position predicts this piece's first token
            nlls.append(F.cross_entropy(previous, piece[:, 0], reduction="none"))
        if piece.shape[1] > 1:
            nlls.append(F.cross_entropy(logits[0, :-1], piece[0, 1:], reduction="none"))
        previous = logits[:, -1]
    return torch.cat(nlls)


@torch.inference_mode()
def stream_vs_fresh(model: Any, input_ids: torch.Tensor, block: int, chunk_tokens: int | None = None,
                    fresh_every: int = 1) -> list[dict]:
    """Does more context ever hurt? Per block of ``block`` tokens of a (1, T) stream: the mean NLL of its tokens in
    one stream from the start (``streamed``) and, for every ``fresh_every``-th block, in a fresh stream started at the
    block (``fresh``, and the ratio), over the same tokens (the block's first has no context in the fresh stream and
    counts in neither)."""
    streamed = token_nlls(model, input_ids, chunk_tokens)  # streamed[i]: token i + 1 given tokens 0..i
    rows = []
    for index, start in enumerate(range(0, input_ids.shape[1] - 1, block)):
        tokens = min(block, input_ids.shape[1] - start) - 1
        if tokens <= 0:
            break
        same = streamed[start : start + tokens].mean().item()
        row = {"start": start, "tokens": tokens, "streamed": round(same, 4)}
        if index % fresh_every == 0:
            fresh = token_nlls(model, input_ids[:, start : start + block], chunk_tokens).mean().item()
            row.update(fresh=round(fresh, 4), ratio=round(same / fresh, 4))
        rows.append(row)
    return rows


def perplexity(model: Any, input_ids: torch.Tensor, chunk_tokens: int | None = None) -> float:
    """exp(mean NLL) over the sequence."""
    return math.exp(token_nlls(model, input_ids, chunk_tokens).mean().item())


def position_ppl(
    model: Any, input_ids: torch.Tensor, bucket_size: int, chunk_tokens: int | None = None
) -> dict[str, list]:
    """Perplexity per position bucket of a long document: ``{"positions": starts, "nll": [...], "ppl": [...]}``.

    Position p is the predicted token's index (1..T-1); bucket b holds positions [b*size, (b+1)*size).
    """
    nlls = token_nlls(model, input_ids, chunk_tokens).cpu()
    positions = torch.arange(1, nlls.shape[0] + 1)
    result: dict[str, list] = {"positions": [], "nll": [], "ppl": [], "tokens": []}
    for start in range(0, int(positions[-1]) + 1, bucket_size):
        mask = (positions >= start) & (positions < start + bucket_size)
        if mask.any():
            nll = nlls[mask].mean().item()
            result["positions"].append(start)
            result["nll"].append(nll)
            result["ppl"].append(math.exp(nll))
            result["tokens"].append(int(mask.sum()))
    return result


@torch.inference_mode()
def _continuation_ppl(model: Any, tokenizer: Any, prefix: str, continuation: str) -> float:
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    cont_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prefix_ids + cont_ids], device=_device(model))
    logits = model(input_ids=ids).logits.float()
    targets = ids[0, len(prefix_ids):]
    nll = F.cross_entropy(logits[0, len(prefix_ids) - 1 : -1], targets)
    return math.exp(nll.item())


def reversal_curse(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str, str]] | None = None) -> dict[str, Any]:
    """Forward vs backward perplexity on fictional "A is B" facts (metrics as in the New-LLM seed).

    forward: ppl of "B" after "A is <relation>" ("Velmora Quint is the inventor of" → "the tidal clock");
    backward: ppl of "A" after "<Relation> B is" ("The inventor of the tidal clock is" → "Velmora Quint").
    Means are geometric over pairs. ``gap`` = backward − forward (0 is symmetric) and ``ratio`` = forward /
    backward (1 is symmetric); after training on A→B only, the reversal curse shows as gap ≫ 0, ratio ≪ 1.
    """
    model.eval()
    rows = []
    for subject, relation, obj in pairs or REVERSAL_PAIRS:
        forward = _continuation_ppl(model, tokenizer, f"{subject} is {relation}", f" {obj}.")
        backward = _continuation_ppl(model, tokenizer, f"{relation[0].upper()}{relation[1:]} {obj} is", f" {subject}.")
        rows.append({"subject": subject, "relation": relation, "object": obj, "forward_ppl": forward,
                     "backward_ppl": backward})
    forward_mean = math.exp(sum(math.log(r["forward_ppl"]) for r in rows) / len(rows))
    backward_mean = math.exp(sum(math.log(r["backward_ppl"]) for r in rows) / len(rows))
    return {"pairs": rows, "forward_ppl": forward_mean, "backward_ppl": backward_mean,
            "gap": backward_mean - forward_mean, "ratio": forward_mean / backward_mean}


def baseline_perplexity(base_model: Any, senri_model: Any, input_ids: torch.Tensor,
                        chunk_tokens: int | None = None) -> dict[str, float]:
    """Perplexity of the base checkpoint and of its Senri conversion on the same text."""
    return {"base": perplexity(base_model, input_ids, None), "senri": perplexity(senri_model, input_ids, chunk_tokens),
            "tokens": int(input_ids.shape[1])}


def save_records(path: str | os.PathLike, records: Any) -> Path:
    """Write JSON atomically (temporary file + rename): results are never half-written."""
    with atomic_write(path) as f:  # e.g. a value json cannot write: no stray temporary file, no half file
        json.dump(records, f, indent=1)
    return Path(path)


def load_records(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


__all__ = [
    "stream_vs_fresh",
    "REVERSAL_PAIRS", "new_cache", "stream_logits", "greedy_continue", "run_niah", "niah_accuracy_table",
    "token_nlls", "perplexity", "position_ppl", "reversal_curse", "baseline_perplexity", "save_records",
    "load_records",
]
