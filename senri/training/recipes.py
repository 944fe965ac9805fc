"""The language-model recipe, and :func:`train`, which runs the recipe ``cfg.training.recipe`` names through the
one loop (:func:`senri.training.loop.run_recipe`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import yaml

import torch
from transformers import TrainerCallback

from ..model.conversion import convert_llama_to_senri, load_base_model
from ..model.modeling_senri import SenriForCausalLM
from ..tasks.data import build_dataset, build_tokenizer
from .config import SECTIONS, ConfigManager
from .finetune import FINETUNE_ARGUMENTS, finetune_recipe
from .loop import Recipe, complete_checkpoints, load_trainable, run_recipe
from .textmemory import text_memory_recipe
from .transfer import TRANSFER_ARGUMENTS, transfer_recipe

_LAYER_ATTENTION = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.")


def build_model(cfg: ConfigManager) -> tuple[SenriForCausalLM, Any]:
    """(model, tokenizer) as the configuration describes: converted from ``base_model`` or random from scratch.

    With ``training.trainable: memory`` only the memory path learns: parameters named ``*memory*`` (the gates)
    and the attention projections of memory layers (they produce the q, k, v the memory reads and writes).
    """
    tokenizer = build_tokenizer(cfg)
    if cfg.model.init == "scratch":
        torch.manual_seed(cfg.training.seed)
        model = SenriForCausalLM(cfg.to_senri_config(vocab_size=len(tokenizer)))
    else:
        # load_base_model: the offline GGUF for "local-smollm2", LlamaForCausalLM.from_pretrained otherwise (fp32).
        model = convert_llama_to_senri(load_base_model(cfg.model.base_model)[0], **cfg.senri_config_kwargs())
    if cfg.training.trainable == "memory":
        memory_layers = set(model.config.memory_layers)
        for name, param in model.named_parameters():
            layer = _LAYER_ATTENTION.search(name)
            param.requires_grad = "memory" in name or (layer is not None and int(layer.group(1)) in memory_layers)
    return model, tokenizer


def retrieval_metrics(cfg: ConfigManager, tokenizer: Any,
                      samples: int = 32) -> Callable[[SenriForCausalLM], dict[str, float]] | None:
    """On the passkey task: a function logging, per step, retrieval of needles beyond the window by the model and by
    its memory alone (:func:`senri.evaluation.analysis.retrieval_probe` on ``samples`` fixed held-out samples); None
    for other datasets."""
    if cfg.experiment.dataset != "passkey" or not samples or tokenizer is None:
        return None
    from ..evaluation.analysis import passkey_probe, retrieval_probe
    from ..tasks.niah import VALUE_WORDS

    probe = passkey_probe(tokenizer, cfg.training.seq_len, samples, cfg.training.seed, cfg.model.sliding_window,
                          cfg.model.chunk_size, template=cfg.experiment.niah_templates[0])
    words = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in VALUE_WORDS]
    candidates = torch.tensor(sorted({ids[0] for ids in words if len(ids) == 1}))
    return lambda model: retrieval_probe(model, probe, candidates if len(candidates) else None)


def language_model_recipe(cfg: ConfigManager, model: SenriForCausalLM | None = None, tokenizer: Any = None,
                          train_dataset: Any = None) -> Recipe:
    """Next-token prediction on the configured dataset (the model's own loss); ``model``, ``tokenizer`` and
    ``train_dataset`` replace what the configuration would build."""
    if model is None:
        model, tokenizer = build_model(cfg)
    if train_dataset is None:
        train_dataset = build_dataset(cfg, tokenizer)
    probe = torch.as_tensor(train_dataset[0]["input_ids"])[None]  # (1, T): memory norms are read on this sample
    return Recipe(model, train_dataset, tokenizer=tokenizer, gate_lr_multiplier=cfg.training.gate_lr_multiplier,
                  probe=probe, evaluate=retrieval_metrics(cfg, tokenizer))


def train(cfg: ConfigManager, model: SenriForCausalLM | None = None, tokenizer: Any = None,
          train_dataset: Any = None, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Train (or resume) the run ``cfg`` describes with its recipe (``training.recipe``: ``lm``, ``transfer`` for
    phase A of the real-model recipe, ``finetune`` for its phase B, ``text`` for the text-memory recipe); returns its summary (see
    :func:`senri.training.loop.run_recipe`). ``model``, ``tokenizer`` and ``train_dataset`` go to ``lm``."""
    if cfg.training.recipe == "transfer":
        return run_recipe(cfg, lambda: transfer_recipe(cfg), TRANSFER_ARGUMENTS, callbacks)
    if cfg.training.recipe == "finetune":
        return run_recipe(cfg, lambda: finetune_recipe(cfg), FINETUNE_ARGUMENTS, callbacks)
    if cfg.training.recipe == "text":
        return run_recipe(cfg, lambda: text_memory_recipe(cfg), FINETUNE_ARGUMENTS, callbacks)
    return run_recipe(cfg, lambda: language_model_recipe(cfg, model, tokenizer, train_dataset), None, callbacks)


def checkpoint_memory(run_dir: str | Path, step: int, out_dir: str | Path | None = None) -> Path:
    """A real-model run's checkpoint at ``step`` (``finetune`` or ``text`` recipe) written as its finished run would
    write it: ``{out_dir}/trained_memory`` (default ``out_dir``: ``{run_dir}/step-{step}``) and ``final/``, so an
    intermediate stage can be evaluated (``python -m senri.reports grid-at {out_dir}/trained_memory …``). The model is
    rebuilt from the run's own ``config.yaml``; an incomplete checkpoint is refused."""
    run_dir = Path(run_dir)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    cfg = ConfigManager(saved["profile"], {section: saved[section] for section in SECTIONS})
    builders = {"finetune": finetune_recipe, "text": text_memory_recipe}
    if cfg.training.recipe not in builders:
        raise ValueError(f"{run_dir} ran training.recipe {cfg.training.recipe!r}; a checkpoint becomes a trained "
                         f"memory for {' or '.join(builders)} only")
    kept = dict(complete_checkpoints(run_dir))
    checkpoint = run_dir / f"checkpoint-{step}"
    if step not in kept:
        raise ValueError(f"{checkpoint} is not a complete checkpoint; this run keeps steps {sorted(kept)}")
    recipe = builders[cfg.training.recipe](cfg)
    load_trainable(recipe.model, checkpoint)
    out = Path(out_dir) if out_dir is not None else run_dir / f"step-{step}"
    recipe.finish(out, {"global_step": step, "max_steps": cfg.training.max_steps, "checkpoint": str(checkpoint)})
    return out / "trained_memory"


__all__ = ["build_model", "retrieval_metrics", "language_model_recipe", "train", "checkpoint_memory"]
