"""What the evaluation and analysis notebooks run: every step reads the configuration and writes or reads
``eval/*.json`` and ``figures/*.png`` in the run's directory (``cfg.home_dir()``: on Drive in Colab, so a new
runtime finds what another one trained), so a notebook is a few calls and its asserts."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from . import plots
from ..evaluation.analysis import gate_table, local_attention_map, memory_norm_trace
from ..model.cache import SenriCache
from ..training.config import TRAINING_DATA_KEYS, ConfigManager, model_runs
from ..model.conversion import convert_llama_to_senri, load_base_model
from ..tasks.data import build_tokenizer
from ..evaluation.harness import (
    baseline_perplexity,
    load_records,
    niah_accuracy_table,
    position_ppl,
    reversal_curse,
    run_niah,
    save_records,
)
from ..model.configuration_senri import SenriConfig
from ..model.modeling_senri import SenriForCausalLM
from ..tasks.niah import generate_haystack_text
from ..training.recipes import train


def eval_dir(cfg: ConfigManager) -> Path:
    return cfg.home_dir() / "eval"


def trained_dir(cfg: ConfigManager) -> Path:
    """Where a training run's results are: its home directory (Drive) or, if they never reached it, ``run_dir``."""
    home = cfg.home_dir()
    return home if (home / "train_summary.json").is_file() else Path(cfg.experiment.run_dir)


def eval_device() -> str:
    """Where evaluation runs: the GPU when there is one (it streams long contexts)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_evaluation(path: str | Path) -> SenriForCausalLM:
    """A saved model in eval mode, on :func:`eval_device`."""
    return SenriForCausalLM.from_pretrained(path).to(eval_device()).eval()


def load_trained(cfg: ConfigManager) -> dict[str, SenriForCausalLM]:
    """The final model of each of the run's models (``senri`` and, for a twin run, ``swa_only``)."""
    models = {}
    for name, run_cfg in model_runs(cfg).items():
        path = trained_dir(run_cfg) / "final"
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"no trained model at {path}: run notebooks/02_training first with the same profile and run_name "
                f"({cfg.profile!r}, {cfg.experiment.run_name!r})")
        models[name] = load_for_evaluation(path)
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
    base, converted = (m.to(eval_device()).eval() for m in (base, converted))
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
    """Every figure of the analysis notebook, from saved results only → ``cfg.home_dir()/figures/*.png``."""
    run_dir, out = cfg.home_dir(), eval_dir(cfg)
    metrics = {name: plots.read_jsonl(trained_dir(c) / "metrics.jsonl") for name, c in model_runs(cfg).items()}
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
    if (out / "variants.json").exists():
        figures["variant_accuracy"] = plots.variant_accuracy(load_records(out / "variants.json")["table"],
                                                             window=cfg.model.sliding_window)
    return {name: plots.save_figure(fig, run_dir, name) for name, fig in figures.items()}


# --- memory variants ----------------------------------------------------------------------------------------------
def variant_runs(cfg: ConfigManager) -> dict[str, dict[int, ConfigManager]]:
    """The runs of each ``experiment.variants`` entry, one per seed: ``{name: {seed: config}}``. Each is the
    profile's model with the variant's ``model.*`` overrides, trained ``experiment.variant_max_steps`` steps on the
    profile's data. Seeds are ``experiment.variant_seeds`` (run in ``{run_dir}/variants/{name}/seed-{seed}``) or, when
    that is empty, ``training.seed`` alone (run in ``{run_dir}/variants/{name}``)."""
    e = cfg.experiment
    if not e.variants:
        raise ValueError(
            f"profile {cfg.profile!r} defines no experiment.variants (name: model overrides); cpu-proof and cpu-smoke do"
        )
    drive_dir = cfg.resolve_drive_dir()
    runs: dict[str, dict[int, ConfigManager]] = {}
    for name, model_overrides in e.variants.items():
        runs[name] = {}
        for seed in e.variant_seeds or [cfg.training.seed]:
            where = Path("variants") / name / (f"seed-{seed}" if e.variant_seeds else "")
            overrides = {**cfg._overrides, "experiment.run_dir": str(Path(e.run_dir) / where),
                         "experiment.train_twin": False, "experiment.variants": {}, "experiment.variant_seeds": [],
                         "training.seed": seed, **{f"model.{key}": value for key, value in model_overrides.items()}}
            if e.variant_max_steps is not None:
                overrides["training.max_steps"] = e.variant_max_steps
            if drive_dir is not None:
                overrides["experiment.drive_dir"] = str(drive_dir / where)
            runs[name][seed] = ConfigManager(cfg.requested_profile, overrides, cfg.config_dir)
    return runs


@torch.inference_mode()
def memory_statistics(model: SenriForCausalLM, input_ids: torch.Tensor, energy_threshold: float = 0.95) -> dict[str, Any]:
    """After streaming ``input_ids`` (1, T): per memory layer the norm of M, its mean numerical rank and the mean rank
    that holds ``energy_threshold`` of its energy (``SenriCache.svd_clean`` on this throwaway cache, after the norms)."""
    cache = SenriCache(model.config, batch_size=input_ids.shape[0])
    input_ids = input_ids.to(model.device)
    piece = model.config.chunk_size * 4
    for start in range(0, input_ids.shape[1], piece):
        model(input_ids=input_ids[:, start : start + piece], cache=cache, use_cache=True, logits_to_keep=1)
    norms = cache.memory_norms()
    stats = {}
    for layer, s in cache.svd_clean(energy_threshold=energy_threshold).items():
        nonempty = s["original_rank"] > 0
        stats[f"layer_{layer}"] = {
            "memory_norm": norms[layer],
            "memories": int(s["original_rank"].numel()),
            "nonempty_memories": int(nonempty.sum()),
            "mean_rank": float(s["original_rank"][nonempty].float().mean()) if nonempty.any() else 0.0,
            f"mean_rank_{energy_threshold:g}_energy": float(s["retained_rank"][nonempty].float().mean())
            if nonempty.any() else 0.0,
        }
    return stats


def _finished_run(run_cfg: ConfigManager) -> bool:
    """Whether ``run_cfg``'s run directory holds a finished run of exactly this configuration; a finished run of
    another configuration is an error (it is not silently reused, nor overwritten)."""
    run_dir = trained_dir(run_cfg)
    if not (run_dir / "train_summary.json").exists():
        return False
    saved, wanted = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")), run_cfg.as_dict()
    keys = [("model", key) for key in wanted["model"]] + [("training", key) for key in wanted["training"]]
    keys += [("experiment", key) for key in TRAINING_DATA_KEYS]
    changed = sorted(f"{section}.{key}" for section, key in keys
                     if saved.get(section, {}).get(key) != wanted[section][key])
    if changed:
        raise ValueError(
            f"{run_dir} holds a finished run with other settings ({', '.join(changed)}); pass retrain=True to "
            "replace it, or use another experiment.run_dir"
        )
    return True


def compare_variants(cfg: ConfigManager, retrain: bool = False) -> dict[str, Any]:
    """Train each memory variant of ``experiment.variants`` (a finished run of the same settings is reused; with
    ``retrain`` its directory is deleted and it is trained again), then
    evaluate it exactly as :func:`evaluate_trained` evaluates ``senri`` (the NIAH grid, with the run's seed + 1 for
    haystacks and needles) and read its memory statistics → ``{run_dir}/eval/variants.json``:

    * ``niah``: every case's record (``model`` = variant name, ``seed`` = the run's seed);
    * ``table``: accuracy by length per variant, over all its seeds; ``by_seed``: the same per seed;
    * ``summary``: per variant its ``overrides`` and, per seed, steps, final loss, training time, gates and memory
      statistics (``runs``), with ``mean_final_loss``.
    """
    e = cfg.experiment
    tokenizer = build_tokenizer(cfg)
    ids = _held_out_ids(tokenizer, e.ppl_seq_len, cfg.training.seed)
    niah, by_seed, summary = [], {}, {}
    for name, seeds in variant_runs(cfg).items():
        summary[name], by_seed[name] = {"overrides": e.variants[name], "runs": {}}, {}
        for seed, run_cfg in seeds.items():
            if retrain:
                for where in {Path(run_cfg.experiment.run_dir), run_cfg.home_dir()}:
                    shutil.rmtree(where, ignore_errors=True)
            if not _finished_run(run_cfg):
                train(run_cfg)
            run_dir = trained_dir(run_cfg)
            trained = load_records(run_dir / "train_summary.json")
            model = load_for_evaluation(run_dir / "final")
            records = run_niah(model, tokenizer, e.niah_lengths, e.niah_depths, e.niah_samples, seed=seed + 1,
                               templates=e.niah_templates, model_name=name, window=model.config.sliding_window)
            niah += [{**r, "seed": seed} for r in records]
            by_seed[name][seed] = accuracy_by_length(records)[name]
            summary[name]["runs"][seed] = {
                "global_step": trained["global_step"], "final_loss": trained.get("final_loss"),
                "train_runtime": trained.get("train_runtime"), "gates": gate_table(model),
                "memory": memory_statistics(model, ids),
            }
        losses = [r["final_loss"] for r in summary[name]["runs"].values() if r["final_loss"] is not None]
        summary[name]["mean_final_loss"] = sum(losses) / len(losses) if losses else None
    result = {"niah": niah, "table": accuracy_by_length(niah), "by_seed": by_seed, "summary": summary}
    save_records(eval_dir(cfg) / "variants.json", result)
    return result


def proof_seeds(cfg: ConfigManager, seeds: list[int], retrain: bool = False) -> dict[str, Any]:
    """The memory proof repeated over ``seeds``: the profile's Senri model (``senri``, its defaults) and its
    sliding-window-only twin (``swa_only``) trained once per seed, each evaluated on the profile's NIAH grid with
    that seed's held-out haystack (:func:`compare_variants` with these two as its variants) →
    ``{run_dir}/eval/variants.json``; ``by_seed`` is the per-seed table."""
    layers = cfg.model.layer_types or SenriConfig.default_layer_types(
        cfg.model.num_hidden_layers, cfg.model.num_memory_layers, cfg.model.first_memory_layer,
        cfg.model.memory_layer_interval)
    variants = {"senri": {}, "swa_only": {"layer_types": ["sliding_attention"] * len(layers)}}
    overrides = {**cfg._overrides, "experiment.variants": variants, "experiment.variant_seeds": list(seeds),
                 "experiment.variant_max_steps": None}
    return compare_variants(ConfigManager(cfg.requested_profile, overrides, cfg.config_dir), retrain=retrain)


def seed_study(cfg: ConfigManager) -> dict[str, Any]:
    """Learned vs failed seeds of a multi-seed study (``eval/variants.json`` from :func:`compare_variants` or
    :func:`proof_seeds`), from saved results only → ``figures/seed_table.png`` and, per variant with a memory,
    ``figures/dynamics_<variant>.png`` (:func:`senri.workspace.plots.training_dynamics`, failed runs dashed red).

    Returns ``{"outcomes": {variant: {seed: learned}}, "takeoff": {variant: {seed: step}}, "figures": {...}}``;
    a run learned when its NIAH accuracy is >= 0.8 at every length of 8 windows or more, and its take-off step is
    the first logged step at which it retrieves half of the held-out needles beyond the window.
    """
    from ..evaluation.analysis import seed_outcomes, takeoff_step

    variants = load_records(eval_dir(cfg) / "variants.json")
    window = cfg.model.sliding_window
    outcomes = seed_outcomes(variants["by_seed"], window)
    figures = {"seed_table": plots.seed_table(variants["by_seed"], window=window)}
    takeoff: dict[str, dict[int, int | None]] = {}
    for name, seeds in variant_runs(_with_variants(cfg, variants)).items():
        runs = {}
        for seed, run_cfg in seeds.items():
            path = trained_dir(run_cfg) / "metrics.jsonl"
            if path.exists() and int(seed) in outcomes.get(name, {}):
                runs[f"{name} seed {seed}"] = plots.read_jsonl(path)
        if not runs or not any(k.startswith("probe/") for r in runs.values() for k in r[-1]):
            continue  # no memory or no retrieval probe logged (runs before issue 10)
        takeoff[name] = {int(label.rsplit(" ", 1)[1]): takeoff_step(records) for label, records in runs.items()}
        learned = {f"{name} seed {seed}": ok for seed, ok in outcomes[name].items()}
        figures[f"dynamics_{name}"] = plots.training_dynamics(runs, learned)
    paths = {name: plots.save_figure(fig, cfg.home_dir(), name) for name, fig in figures.items()}
    return {"outcomes": outcomes, "takeoff": takeoff, "figures": paths}


def _with_variants(cfg: ConfigManager, variants: dict[str, Any]) -> ConfigManager:
    """``cfg`` with the variants and seeds that ``variants.json`` (a compare_variants result) was made of."""
    seeds = sorted({int(s) for by in variants["by_seed"].values() for s in by})
    overrides = {**cfg._overrides, "experiment.variants": {n: v["overrides"] for n, v in variants["summary"].items()},
                 "experiment.variant_seeds": seeds}
    return ConfigManager(cfg.requested_profile, overrides, cfg.config_dir)


def accuracy_by_length(records: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """Mean NIAH accuracy per model and context length (the memory-proof table)."""
    table: dict[str, dict[int, list[float]]] = {}
    for r in records:
        table.setdefault(r["model"], {}).setdefault(int(r["length"]), []).append(float(r["accuracy"]))
    return {m: {n: sum(v) / len(v) for n, v in sorted(lengths.items())} for m, lengths in table.items()}


__all__ = ["evaluate_trained", "evaluate_real_model", "analyse", "accuracy_by_length", "load_trained", "eval_dir",
           "trained_dir",
           "variant_runs", "memory_statistics", "compare_variants", "proof_seeds",
           "seed_study"]
