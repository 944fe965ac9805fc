"""What the evaluation and analysis notebooks run: every step reads the configuration and writes or reads
``{run_dir}/eval/*.json`` and ``{run_dir}/figures/*.png``, so a notebook is a few calls and its asserts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import plots
from .analysis import gate_table, local_attention_map, memory_norm_trace
from .config import ConfigManager
from .conversion import convert_llama_to_senri, load_base_model
from .data import build_tokenizer
from .evaluation import (
    baseline_perplexity, load_records, niah_accuracy_table, position_ppl, reversal_curse, run_niah, save_records,
)
from .modeling_senri import SenriForCausalLM
from .niah import generate_haystack_text
from .training import model_runs


def eval_dir(cfg: ConfigManager) -> Path:
    return Path(cfg.experiment.run_dir) / "eval"


def load_trained(cfg: ConfigManager) -> dict[str, SenriForCausalLM]:
    """The final model of each of the run's models (``senri`` and, for a twin run, ``swa_only``)."""
    models = {}
    for name, run_cfg in model_runs(cfg).items():
        path = Path(run_cfg.experiment.run_dir) / "final"
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"no trained model at {path}: run notebooks/02_training first (same run_dir)")
        models[name] = SenriForCausalLM.from_pretrained(path).eval()
    return models


def _held_out_ids(tokenizer: Any, length: int, seed: int) -> torch.Tensor:
    # Generated prose with a seed the training data never uses.
    text = generate_haystack_text(length * 2, seed=seed + 10_007)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:length]])


def evaluate_trained(cfg: ConfigManager) -> dict[str, Any]:
    """NIAH grid, perplexity by position and memory statistics of the trained model(s) → eval/*.json."""
    e = cfg.experiment
    tokenizer = build_tokenizer(cfg)
    models = load_trained(cfg)
    niah, ppl = [], {}
    ids = _held_out_ids(tokenizer, e.ppl_seq_len, cfg.training.seed)
    for name, model in models.items():
        # seed + 1: a haystack (and needles) the training data never contained.
        niah += run_niah(model, tokenizer, e.niah_lengths, e.niah_depths, e.niah_samples, seed=cfg.training.seed + 1,
                         templates=e.niah_templates, model_name=name, window=model.config.sliding_window)
        ppl[name] = position_ppl(model, ids, e.ppl_bucket_size)
    senri = models["senri"]
    local_layers = [i for i, layer in enumerate(senri.model.layers) if layer.self_attn.has_local]
    attention = None
    if local_layers:
        length = min(ids.shape[1], 2 * senri.config.sliding_window + 2 * senri.config.chunk_size)
        weights = local_attention_map(senri, ids[:, :length], local_layers[0], head=0)
        attention = {"layer": local_layers[0], "weights": weights.tolist()}
    stats = {
        "gates": gate_table(senri),
        "memory_norms": memory_norm_trace(senri, ids, piece=senri.config.chunk_size),
        "attention_map": attention,
    }
    out = eval_dir(cfg)
    save_records(out / "niah.json", niah)
    save_records(out / "ppl_by_position.json", ppl)
    save_records(out / "memory_stats.json", stats)
    return {"niah": niah, "table": niah_accuracy_table(niah), "ppl": ppl, "stats": stats}


def evaluate_real_model(cfg: ConfigManager) -> dict[str, Any]:
    """The pretrained base (full attention) next to its Senri conversion (window ``real_model_window``, memory
    closed): NIAH beyond the window, baseline perplexity, position-wise perplexity, reversal curse → eval/."""
    e = cfg.experiment
    base, tokenizer = load_base_model(cfg.model.base_model)
    converted = convert_llama_to_senri(base, sliding_window=e.real_model_window, chunk_size=cfg.model.chunk_size
                                       if e.real_model_window % cfg.model.chunk_size == 0 else 64)
    niah = []
    for name, model in (("base_full_attention", base), ("senri_converted", converted)):
        niah += run_niah(model, tokenizer, e.real_model_niah_lengths, e.niah_depths, e.real_model_niah_samples,
                         seed=cfg.training.seed, templates=["passkey"], model_name=name,
                         window=None if model is base else e.real_model_window)
    ids = tokenizer(generate_haystack_text(e.ppl_seq_len * 2, seed=7), return_tensors="pt").input_ids[:, : e.ppl_seq_len]
    result = {
        "niah": niah,
        "baseline_perplexity": baseline_perplexity(base, converted, ids),
        "ppl_by_position": {"base_full_attention": position_ppl(base, ids, e.ppl_bucket_size, chunk_tokens=None),
                            "senri_converted": position_ppl(converted, ids, e.ppl_bucket_size)},
        "reversal": {"base_full_attention": reversal_curse(base, tokenizer),
                     "senri_converted": reversal_curse(converted, tokenizer)},
    }
    save_records(eval_dir(cfg) / "real_model.json", result)
    return result


def analyse(cfg: ConfigManager) -> dict[str, Path]:
    """Every figure of the analysis notebook, from saved results only → {run_dir}/figures/*.png."""
    run_dir, out = Path(cfg.experiment.run_dir), eval_dir(cfg)
    metrics = {name: plots.read_jsonl(Path(c.experiment.run_dir) / "metrics.jsonl") for name, c in model_runs(cfg).items()}
    stats = load_records(out / "memory_stats.json")
    figures = {
        "loss_curves": plots.loss_curves(metrics),
        "gate_curves": plots.gate_curves(metrics["senri"]),
        "gate_values": plots.gate_values(stats["gates"]),
        "memory_norms": plots.memory_norms(stats["memory_norms"]),
        "niah_heatmap": plots.niah_heatmaps(load_records(out / "niah.json")),
        "ppl_by_position": plots.ppl_by_position(load_records(out / "ppl_by_position.json")),
    }
    if stats["attention_map"]:
        figures["attention_map"] = plots.attention_map(stats["attention_map"]["weights"],
                                                       f"Local attention, layer {stats['attention_map']['layer']}")
    if (out / "real_model.json").exists():
        real = load_records(out / "real_model.json")
        figures["real_model_niah"] = plots.niah_heatmaps(real["niah"])
        figures["real_model_ppl"] = plots.ppl_by_position(real["ppl_by_position"])
    return {name: plots.save_figure(fig, run_dir, name) for name, fig in figures.items()}


def accuracy_by_length(records: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """Mean NIAH accuracy per model and context length (the memory-proof table)."""
    table: dict[str, dict[int, list[float]]] = {}
    for r in records:
        table.setdefault(r["model"], {}).setdefault(int(r["length"]), []).append(float(r["accuracy"]))
    return {m: {n: sum(v) / len(v) for n, v in sorted(lengths.items())} for m, lengths in table.items()}


__all__ = ["evaluate_trained", "evaluate_real_model", "analyse", "accuracy_by_length", "load_trained", "eval_dir"]
