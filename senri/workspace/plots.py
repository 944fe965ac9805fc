"""Figures for 04_analysis: each function takes saved results (plain dicts/lists) and returns a Figure."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ..model.io import atomic_write


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a ``metrics.jsonl`` file (one JSON object per line)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def save_figure(fig: Figure, run_dir: str | os.PathLike, name: str) -> Path:
    """Save under ``{run_dir}/figures/{name}.png`` (temporary file + rename: never a half-written figure)."""
    path = Path(run_dir) / "figures" / f"{name}.png"
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    return path


def loss_curves(runs: Mapping[str, Sequence[Mapping]]) -> Figure:
    """Training loss against step, one line per run (``{"senri": records, "swa_only": records}``)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, records in runs.items():
        points = [(r["step"], r["loss"]) for r in records if "loss" in r]
        if points:
            ax.plot(*zip(*points), label=name)
    ax.set(xlabel="step", ylabel="training loss", title="Loss curves")
    ax.legend()
    return fig


def gate_curves(records: Sequence[Mapping]) -> Figure:
    """Mean memory-gate value per memory layer against step (keys ``gate/<layer>/mean`` in metrics.jsonl)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        for key, value in r.items():
            if key.startswith("gate") and key.endswith("mean"):
                series[key].append((r["step"], value))
    for key, points in sorted(series.items()):
        ax.plot(*zip(*points), label=key)
    ax.set(xlabel="step", ylabel="memory weight", title="Memory gates during training", ylim=(-0.05, 1.05))
    if series:
        ax.legend()
    return fig


def gate_values(table: Mapping[str, Sequence[float]]) -> Figure:
    """Memory weight per query head (columns) for each memory layer (rows), a heat map annotated with the values
    (from ``senri.evaluation.analysis.gate_table``)."""
    layers = list(table)
    heads = max((len(v) for v in table.values()), default=0)
    grid = [[float(v) for v in table[layer]] + [float("nan")] * (heads - len(table[layer])) for layer in layers]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * heads + 2), 0.6 * max(1, len(layers)) + 1.4))
    if layers:
        sns.heatmap(grid, ax=ax, vmin=0, vmax=1, cmap="viridis", annot=True, fmt=".2f",
                    xticklabels=[str(h) for h in range(heads)], yticklabels=layers,
                    cbar_kws={"label": "memory weight"})
    ax.set(xlabel="query head", ylabel="memory layer", title="Gate values per head")
    return fig


def memory_norms(trace: Sequence[Mapping[str, float]]) -> Figure:
    """‖M‖ per memory layer against tokens streamed (from ``senri.evaluation.analysis.memory_norm_trace``)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    layers = sorted({k for r in trace for k in r if k.startswith("layer_")})
    for layer in layers:
        ax.plot([r["tokens"] for r in trace], [r[layer] for r in trace], label=layer)
    ax.set(xlabel="tokens streamed", ylabel="‖M‖ (Frobenius)", title="Memory norm over the stream")
    if layers:
        ax.legend()
    return fig


def attention_map(weights, title: str = "Local attention") -> Figure:
    """A (T, T) attention-weight matrix (from ``senri.evaluation.analysis.local_attention_map``)."""
    fig, ax = plt.subplots(figsize=(4.5, 4))
    image = ax.imshow(weights, cmap="viridis", aspect="auto")
    ax.set(xlabel="key position", ylabel="query position", title=title)
    fig.colorbar(image, ax=ax)
    return fig


def niah_heatmaps(records: Iterable[Mapping]) -> Figure:
    """Mean NIAH accuracy on a needle depth × context length grid, one annotated heat map per model."""
    cells: dict[str, dict[tuple[float, int], list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        cells[r.get("model", "model")][(float(r["depth"]), int(r["length"]))].append(float(r["accuracy"]))
    models = sorted(cells)
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(4.5 * max(1, len(models)) + 1, 3.5), squeeze=False)
    for i, (ax, model) in enumerate(zip(axes[0], models)):
        depths = sorted({d for d, _ in cells[model]})
        lengths = sorted({n for _, n in cells[model]})
        grid = [[_mean(cells[model].get((d, n), [])) for n in lengths] for d in depths]  # missing cells: NaN, blank
        sns.heatmap(grid, ax=ax, vmin=0, vmax=1, cmap="RdYlGn", annot=True, fmt=".2f", annot_kws={"fontsize": 8},
                    xticklabels=[str(n) for n in lengths], yticklabels=[f"{d:.2f}" for d in depths],
                    cbar=i == len(models) - 1, cbar_kws={"label": "accuracy"})
        ax.set(xlabel="context length (tokens)", ylabel="needle depth", title=f"NIAH: {model}")
        ax.tick_params(axis="x", rotation=45)
    return fig


def ppl_by_position(curves: Mapping[str, Mapping[str, Sequence[float]]]) -> Figure:
    """Perplexity per position bucket, one line per model: ``{name: {"positions": [...], "ppl": [...]}}``."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, curve in curves.items():
        ax.plot(curve["positions"], curve["ppl"], marker="o", label=name)
    ax.set(xlabel="position (bucket start)", ylabel="perplexity", title="Perplexity by position", yscale="log")
    if curves:
        ax.legend()
    return fig


def variant_accuracy(table: Mapping[str, Mapping[Any, float]], window: int | None = None) -> Figure:
    """NIAH accuracy by context length, one line per memory variant: ``{variant: {length: accuracy}}``."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, by_length in table.items():
        lengths = sorted(by_length, key=int)
        ax.plot([int(n) for n in lengths], [by_length[n] for n in lengths], marker="o", label=name)
    if window is not None:
        ax.axvline(window, color="grey", linestyle=":", label="window")
    ax.set(xlabel="context length (tokens)", ylabel="NIAH accuracy", title="Memory variants", xscale="log", ylim=(0, 1.05))
    if table:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


# Panels of :func:`training_dynamics`: (title, metrics.jsonl key prefix, how heads combine, y label, log scale).
DYNAMICS_PANELS = (
    ("answer loss (all needles)", "loss", None, "cross-entropy", False),
    ("model retrieval beyond the window", "probe/acc", None, "accuracy", False),
    ("answer loss, needles beyond the window", "probe/answer_loss", None, "cross-entropy", False),
    ("weight on the needle in the memory read (best head)", "probe/needle_lift/", max, "× uniform", True),
    ("memory gates (each head)", "gate/", "each", "memory weight", False),
    ("‖M‖ after one training sample", "memory_norm/", max, "Frobenius norm", True),
)


def _series(records: Sequence[Mapping], prefix: str, combine: Any) -> dict[str, list[tuple[int, float]]]:
    """Per-step values of the keys starting with ``prefix``: one series (``combine`` of the matching keys, or the
    exact key), or one per key (``combine="each"``, gate keys ``gate/<layer>/head<h>``)."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        if combine == "each":
            for key, value in r.items():
                if key.startswith(prefix) and "/head" in key:
                    out[key[len(prefix):]].append((r["step"], value))
        elif combine is None:
            if prefix in r:
                out[""].append((r["step"], r[prefix]))
        else:
            values = [v for k, v in r.items() if k.startswith(prefix)]
            if values:
                out[""].append((r["step"], combine(values)))
    return out


def training_dynamics(runs: Mapping[str, Sequence[Mapping]], outcome: Mapping[str, bool] | None = None) -> Figure:
    """Training runs side by side (``{label: metrics.jsonl records}``): answer loss (training batches, and held-out
    needles beyond the window), retrieval of those needles, the needle's weight in the memory read (best head, ×
    uniform), each head's gate and the memory norm against step.
    ``outcome`` ({label: learned?}) colours learned runs blue and failed ones red, so the two groups compare at a
    glance."""
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    palette = plt.get_cmap("tab10")
    for n, (label, records) in enumerate(runs.items()):
        if outcome is not None:
            color, style = ("tab:blue", "-") if outcome.get(label, True) else ("tab:red", "--")
        else:
            color, style = palette(n % 10), "-"
        for ax, (title, prefix, combine, ylabel, log) in zip(axes.flat, DYNAMICS_PANELS):
            for i, (key, points) in enumerate(sorted(_series(records, prefix, combine).items())):
                ax.plot(*zip(*points), color=color, linestyle=style, alpha=0.85, linewidth=1.2,
                        label=label if i == 0 else None)
            ax.set(title=title, xlabel="step", ylabel=ylabel, yscale="log" if log else "linear")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def seed_table(by_seed: Mapping[str, Mapping[Any, Mapping[Any, float]]], lengths: Sequence[int] | None = None,
               window: int | None = None) -> Figure:
    """NIAH accuracy per (model, seed) and context length as a heat map (``variants.json``'s ``by_seed``)."""
    rows = [(f"{name} / seed {seed}", acc) for name, seeds in by_seed.items() for seed, acc in seeds.items()]
    lengths = list(lengths or sorted({int(n) for _, acc in rows for n in acc}))
    grid = [[float(acc.get(n, acc.get(str(n), float("nan")))) for n in lengths] for _, acc in rows]
    fig, ax = plt.subplots(figsize=(1.1 * len(lengths) + 3, 0.35 * len(rows) + 1.2))
    ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n}" + (f" ({n // window}×)" if window else "") for n in lengths])
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, "–" if value != value else f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set(xlabel="context length (tokens)", title="NIAH accuracy by seed")
    return fig


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


__all__ = [
    "read_jsonl", "save_figure", "loss_curves", "gate_curves", "gate_values", "memory_norms", "attention_map",
    "niah_heatmaps", "ppl_by_position", "variant_accuracy", "training_dynamics", "seed_table", "DYNAMICS_PANELS",
]


def retrieval_heads(scan: Any, title: str = "Attention from the question onto the needle") -> Figure:
    """Heatmap of a retrieval-head scan (layers × heads, :func:`senri.evaluation.diagnostics.retrieval_head_scan`)."""
    values = scan.detach().cpu().numpy() if hasattr(scan, "detach") else scan
    fig, ax = plt.subplots(figsize=(4.5, 0.22 * len(values) + 1.2))
    sns.heatmap(values, ax=ax, vmin=0, vmax=1, cmap="viridis", cbar_kws={"label": "attention mass"})
    ax.set(xlabel="head", ylabel="layer", title=title)
    return fig


def model_comparison(records: Sequence[Mapping], title: str = "Base vs gates closed vs trained memory") -> Figure:
    """Accuracy per case set (x) and model (bars) from :func:`senri.evaluation.real_model.compare_on_cases` records."""
    case_sets = list(dict.fromkeys(r["cases"] for r in records))
    models = list(dict.fromkeys(r["model"] for r in records))
    fig, ax = plt.subplots(figsize=(1.6 * len(case_sets) + 2.5, 3.4))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        values = [next((r["accuracy"] for r in records if r["model"] == model and r["cases"] == c), 0.0)
                  for c in case_sets]
        ax.bar([x + i * width for x in range(len(case_sets))], values, width, label=model)
    ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(case_sets))], case_sets)
    ax.set(ylabel="accuracy", ylim=(0, 1.05), title=title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig
