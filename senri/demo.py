"""`make demo`: what Senri is for, in a few minutes on a CPU.

1. The shipped trained SmolLM2 (``senri.load_trained_smollm2``) reads a document whose pass key is stated once, 8x
   and 16x its 256-token window back, and answers — beside the same model with its memory gates closed and the base
   model with full attention (the ceiling). A small table: model, context, window, answer, correct.
2. What the fixed-size state buys: cache bytes and time per generated token as the context grows, Senri against
   transformers' Llama KV cache on the same model.
3. The headline figure: the shipped memory's measured pass-key accuracy by context (from its card: 20 cases per
   length, the three models) beside the state size; a one-screen summary, also written to ``{out_dir}/demo.json``,
   figures in ``{out_dir}/figures``.

Run: ``python -m senri.demo [out_dir]`` (``make demo``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .evaluation.diagnostics import PasskeyCase, passkey_cases
from .model.io import atomic_write
from .evaluation.real_model import depths_beyond_window, gates_closed

DEMO_CONTEXTS = (256, 512, 1024, 2048, 4096)


@torch.no_grad()
def answer(model: Any, tokenizer: Any, case: PasskeyCase, max_new_tokens: int = 8) -> str:
    """The model's greedy continuation of the case's prompt (the prompt streamed by ``generate``)."""
    device = next(model.parameters()).device
    prompt = torch.tensor([case.ids[: case.answer_start]], device=device)
    output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, prompt.shape[1] :], skip_special_tokens=True).strip()


def demo_cases(tokenizer: Any, length: int, window: int, chunk: int, cases: int, seed: int) -> list[tuple[str, Any]]:
    """(task, case) pairs at ``length`` tokens, the needle beyond the window: the classic pass key, and a fact stated
    once in ordinary prose (a held-out Gutenberg work, held-out wording and entities) and asked back in other words."""
    from .tasks.corpus import documents
    from .tasks.facts import fact_cases

    depths = depths_beyond_window(length, window, chunk)
    prose = documents(["gutenberg"], "heldout")
    return ([("pass key", c) for c in passkey_cases(tokenizer, length, cases, seed, depths)]
            + [("fact in prose", c) for c in fact_cases(tokenizer, prose, length, cases, seed, depths)])


def recall_table(trained: Any, base: Any, tokenizer: Any, lengths: tuple[int, ...] = (2048, 4096), cases: int = 1,
                 seed: int = 11) -> list[dict[str, Any]]:
    """Answers of the trained model, the same model with gates closed, and the base model (full attention) on pass
    keys and on facts in prose (:func:`demo_cases`), prompts of ``lengths`` tokens whose needle lies beyond the
    window."""
    window, chunk = trained.config.sliding_window, trained.config.chunk_size
    from tqdm.auto import tqdm

    rows = []
    progress = tqdm(total=6 * cases * len(lengths), desc="recall", leave=False)
    for length in lengths:
        for task, case in demo_cases(tokenizer, length, window, chunk, cases, seed):
            distance = case.answer_start - case.needle[1]
            runs = [("Senri, trained memory", trained, window), ("Senri, gates closed", None, window),
                    ("base, full attention", base, None)]
            for name, model, model_window in runs:
                progress.update()
                if model is None:
                    with gates_closed(trained):
                        text = answer(trained, tokenizer, case)
                else:
                    text = answer(model, tokenizer, case)
                rows.append({"task": task, "model": name, "context": length, "window": model_window, "key": case.key,
                             "key_tokens_back": distance, "answer": text, "correct": text.startswith(case.key)})
    progress.close()
    return rows


@torch.no_grad()
def state_growth(senri: Any, llama: Any, contexts: tuple[int, ...] = DEMO_CONTEXTS, steps: int = 8) -> list[dict]:
    """Cache bytes after a prompt of each length and the time per generated token after it, Senri vs Llama."""
    from transformers import DynamicCache

    from .model.cache import SenriCache

    from tqdm.auto import tqdm

    rows = []
    ids = torch.randint(100, 1000, (1, max(contexts) + steps), generator=torch.Generator().manual_seed(0))
    for context in tqdm(contexts, desc="state growth", leave=False):
        for name, model in (("Senri", senri), ("Llama KV cache", llama)):
            cache = SenriCache(senri.config, 1) if model is senri else DynamicCache()
            model(input_ids=ids[:, :context], cache=cache, use_cache=True, logits_to_keep=1)
            began = time.perf_counter()
            for i in range(steps):
                model(input_ids=ids[:, context + i : context + i + 1], cache=cache, use_cache=True)
            seconds = (time.perf_counter() - began) / steps
            nbytes = cache.nbytes() if isinstance(cache, SenriCache) else sum(
                t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
                if t is not None)
            rows.append({"model": name, "context": context, "cache_mib": nbytes / 2**20, "ms_per_token": 1e3 * seconds})
    return rows


def _plot_growth(ax: Any, rows: list[dict[str, Any]], key: str) -> None:
    """One line per model of ``key`` (cache_mib or ms_per_token) against the context, on a base-2 axis."""
    for name in dict.fromkeys(r["model"] for r in rows):
        points = [r for r in rows if r["model"] == name]
        ax.plot([r["context"] for r in points], [r[key] for r in points], marker="o", label=name)
    contexts = sorted({r["context"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.minorticks_off()
    ax.set_xlabel("context (tokens)")


def state_growth_figure(rows: list[dict[str, Any]]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    _plot_growth(axes[0], rows, "cache_mib")
    _plot_growth(axes[1], rows, "ms_per_token")
    axes[0].set(ylabel="cache (MiB)", title="State size")
    axes[1].set(ylabel="ms per generated token", title="Decode time")
    axes[0].legend()
    fig.tight_layout()
    return fig


MODEL_NAMES = {"trained": "Senri, trained memory", "gates closed": "Senri, gates closed", "base": "base, full attention"}


def measured_passkey(card: dict[str, Any]) -> dict[str, dict[int, tuple[int, int]]]:
    """The card's pass-key results: model -> context -> (found, cases)."""
    table: dict[str, dict[int, tuple[int, int]]] = {}
    for r in card.get("results", []):
        if r.get("kind") == "passkey":
            table.setdefault(r["model"], {})[r["length"]] = (round(r["accuracy"] * r["n"]), r["n"])
    return table


def headline_figure(card: dict[str, Any], growth: list[dict[str, Any]], window: int):
    """Left: pass-key accuracy by context (the card's measured cases) for the three models; right: state size."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    measured = measured_passkey(card)
    for model, by_length in measured.items():
        lengths = sorted(by_length)
        axes[0].plot([length / window for length in lengths], [by_length[n][0] / by_length[n][1] for n in lengths],
                     marker="o", label=MODEL_NAMES.get(model, model))
    multiples = sorted({length // window for by_length in measured.values() for length in by_length})
    cases = sorted({n for by_length in measured.values() for _, n in by_length.values()})
    axes[0].set(xlabel=f"needle context (multiples of the {window}-token window)", ylabel="pass keys found",
                title=f"Recall beyond the window ({'/'.join(map(str, cases))} cases each)", ylim=(-0.05, 1.05))
    axes[0].set_xscale("log", base=2)
    axes[0].set_xticks(multiples, [f"{m}×" for m in multiples])
    axes[0].minorticks_off()
    axes[0].legend(fontsize=8)
    _plot_growth(axes[1], growth, "cache_mib")
    axes[1].set(ylabel="MiB", title="Cache / state size")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def summary_text(recall: list[dict[str, Any]], growth: list[dict[str, Any]], card: dict[str, Any],
                 out_dir: Path, seconds: float) -> str:
    card_window = card["settings"]["sliding_window"]  # the window the card's measurements were made with
    lines = ["", f"Senri demo — SmolLM2-135M with a compressive memory beside a {card_window}-token window", ""]
    lines.append(f"{'task':<14}{'model':<24}{'context':>8}{'window':>8}{'tokens back':>12}  {'expected':<12}"
                 f"{'answer':<16}correct")
    for r in recall:
        window = "full" if r["window"] is None else r["window"]
        lines.append(f"{r.get('task', 'pass key'):<14}{r['model']:<24}{r['context']:>8}{window:>8}"
                     f"{r['key_tokens_back']:>12}  {r['key'][:10]:<12}{r['answer'][:14]:<16}"
                     f"{'yes' if r['correct'] else 'no'}")
    big = max(r["context"] for r in growth)
    at = {r["model"]: r for r in growth if r["context"] == big}
    lines += ["", f"At {big} tokens of context: Senri's state {at['Senri']['cache_mib']:.1f} MiB, "
              f"{at['Senri']['ms_per_token']:.0f} ms/token; Llama's KV cache {at['Llama KV cache']['cache_mib']:.1f} "
              f"MiB, {at['Llama KV cache']['ms_per_token']:.0f} ms/token (Senri's state stops growing at its window)."]
    measured = measured_passkey(card)
    if measured:
        lines.append("The shipped memory, measured (card.json, docs/RESULTS.md), pass keys found:")
        for model, by_length in measured.items():
            lines.append(f"  {MODEL_NAMES.get(model, model):<24}" + "  ".join(
                f"{length // card_window}×: {found}/{n}" for length, (found, n) in sorted(by_length.items())))
    lines += [f"Figures and demo.json in {out_dir}/ ({seconds:.0f} s).",
              "The toy memory proof (a 2-layer model trained from scratch) is not part of the demo: "
              "`make variants PROFILE=cpu-proof` / notebooks 02-04 with profile cpu-proof run it.", ""]
    return "\n".join(lines)


def main(out_dir: str | Path = "runs/demo") -> dict[str, Any]:
    from .model.conversion import load_local_smollm2
    from .workspace.plots import save_figure
    from .model.trained import read_card, load_trained_smollm2

    began = time.perf_counter()
    out_dir = Path(out_dir)
    trained, tokenizer = load_trained_smollm2()
    base, _ = load_local_smollm2()
    print("1/2 recall beyond the window (trained, gates closed, base)...", flush=True)
    recall = recall_table(trained, base, tokenizer)
    print("2/2 state size and decode time as the context grows...", flush=True)
    growth = state_growth(trained, base)
    figure = save_figure(state_growth_figure(growth), out_dir, "state_growth")
    card = read_card()
    headline = save_figure(headline_figure(card, growth, card["settings"]["sliding_window"]), out_dir, "headline")
    seconds = time.perf_counter() - began
    result = {"recall": recall, "state_growth": growth, "figure": str(figure), "headline_figure": str(headline),
              "seconds": seconds}
    with atomic_write(out_dir / "demo.json") as f:
        json.dump(result, f, indent=1)
    print(summary_text(recall, growth, card, out_dir, seconds))
    return result


if __name__ == "__main__":
    main(*sys.argv[1:])
