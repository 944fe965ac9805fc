"""Training on top of transformers' Trainer: model building, gate learning rates, metrics, checkpoints, resume.

    from senri.config import ConfigManager
    from senri.training import train
    summary = train(ConfigManager("cpu-smoke", overrides={"run_dir": "runs/x", "max_steps": 30}))

A restarted run with the same configuration resumes from the newest *complete* checkpoint, local or on Drive,
and reproduces the per-step losses of an uninterrupted run. Checkpoints are mirrored to Google Drive under a
temporary name and renamed once complete, so a half-copied checkpoint is never resumed from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from .cache import SenriCache
from .config import ConfigManager
from .configuration_senri import SenriConfig
from .conversion import convert_llama_to_senri, load_base_model
from .data import build_dataset, build_tokenizer
from .evaluation import save_records
from .modeling_senri import SenriForCausalLM

COMPLETE_MARKER = "SENRI_COMPLETE"
# Parameters trained with trainable: memory — the gates and the attention projections of memory layers.
MEMORY_PARAMETER_PATTERN = re.compile(r"memory_gate$")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# --- model --------------------------------------------------------------------------------------------------------
def build_model(cfg: ConfigManager) -> tuple[SenriForCausalLM, Any]:
    """(model, tokenizer) as the configuration describes: converted from ``base_model`` or random from scratch."""
    tokenizer = build_tokenizer(cfg)
    if cfg.model.init == "scratch":
        torch.manual_seed(cfg.training.seed)
        model = SenriForCausalLM(cfg.to_senri_config(vocab_size=len(tokenizer)))
    else:
        model = convert_llama_to_senri(load_base_model(cfg.model.base_model)[0], **cfg.senri_config_kwargs())
    if cfg.training.trainable == "memory":
        memory_layers = set(model.config.memory_layers)
        for name, param in model.named_parameters():
            layer = re.match(r"model\.layers\.(\d+)\.self_attn\.", name)
            param.requires_grad = bool(MEMORY_PARAMETER_PATTERN.search(name)) or (
                layer is not None and int(layer.group(1)) in memory_layers
            )
    return model, tokenizer


def optimizer_param_groups(model: torch.nn.Module, lr: float, weight_decay: float, gate_lr_multiplier: float):
    """Gates: lr × multiplier and no weight decay (they must move); norms and biases: no decay; the rest: decay."""
    gates, no_decay, decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if MEMORY_PARAMETER_PATTERN.search(name):
            gates.append(param)
        elif param.dim() < 2:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        {"params": gates, "lr": lr * gate_lr_multiplier, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


# --- checkpoints --------------------------------------------------------------------------------------------------
def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    if not directory or not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE_MARKER).exists() and (checkpoint / "trainer_state.json").exists()


def find_resume_checkpoint(run_dir: str | os.PathLike, drive_dir: str | os.PathLike | None = None) -> Path | None:
    """The newest complete checkpoint in ``run_dir`` or ``drive_dir``; one only on Drive is copied back first."""
    run_dir = Path(run_dir)
    local = [(step, p) for step, p in _checkpoints(run_dir) if is_complete(p)]
    remote = [(step, p) for step, p in _checkpoints(Path(drive_dir)) if is_complete(p)] if drive_dir else []
    best_local = local[-1] if local else None
    best_remote = remote[-1] if remote else None
    if best_remote and (not best_local or best_remote[0] > best_local[0]):
        target = run_dir / best_remote[1].name
        tmp = run_dir / f".{best_remote[1].name}.restore-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(best_remote[1], tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        return target
    return best_local[1] if best_local else None


def mirror_checkpoint(checkpoint: Path, drive_dir: Path, keep: int) -> Path:
    """Copy a complete checkpoint to Drive under a temporary name, then rename; keep the newest ``keep``."""
    drive_dir.mkdir(parents=True, exist_ok=True)
    for leftover in drive_dir.glob(".*.tmp-*"):  # copies interrupted earlier are never resumed from
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = drive_dir / f".{checkpoint.name}.tmp-{os.getpid()}"
    shutil.copytree(checkpoint, tmp)
    target = drive_dir / checkpoint.name
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    complete = [p for _, p in _checkpoints(drive_dir) if is_complete(p)]
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


# --- callbacks ----------------------------------------------------------------------------------------------------
class CheckpointCallback(TrainerCallback):
    """Marks each checkpoint complete once Trainer has written all of it, then mirrors it to Drive."""

    def __init__(self, drive_dir: Path | None, keep: int):
        self.drive_dir, self.keep = drive_dir, keep

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (checkpoint / COMPLETE_MARKER).write_text(str(state.global_step))
            if self.drive_dir is not None:
                mirror_checkpoint(checkpoint, self.drive_dir, self.keep)
        return control


class MetricsCallback(TrainerCallback):
    """Appends one JSON object per logged step to ``metrics.jsonl``: loss, lr, gate values and memory norms."""

    def __init__(self, path: Path, probe: torch.Tensor | None):
        self.path, self.probe = path, probe

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint, so the file has each step once."""
        if self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in lines))

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return control
        record = {"step": state.global_step, "loss": float(logs["loss"])}
        for key in ("learning_rate", "grad_norm"):
            if key in logs:
                record[key] = float(logs[key])
        model = getattr(model, "module", model)
        if isinstance(model, SenriForCausalLM):
            for layer, values in model.memory_gate_values().items():
                record[f"gate/{layer}/mean"] = float(values.mean())
                record[f"gate/{layer}/min"] = float(values.min())
                record[f"gate/{layer}/max"] = float(values.max())
            if self.probe is not None:
                record.update(memory_norms(model, self.probe))
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        return control


@torch.no_grad()
def memory_norms(model: SenriForCausalLM, probe: torch.Tensor) -> dict[str, float]:
    """‖M‖ per memory layer after reading ``probe`` (1, T) into a fresh cache."""
    was_training = model.training
    model.eval()
    cache = SenriCache(model.config, batch_size=1)
    model(input_ids=probe.to(model.device), past_key_values=cache, use_cache=True, logits_to_keep=1)
    model.train(was_training)
    return {f"memory_norm/{layer}": norm for layer, norm in cache.memory_norms().items()}


# --- training -----------------------------------------------------------------------------------------------------
def model_runs(cfg: ConfigManager) -> dict[str, ConfigManager]:
    """The models a run trains, each in ``{run_dir}/{name}``: ``senri`` and, with ``experiment.train_twin``, a
    ``swa_only`` twin of identical size and training budget whose layers are all sliding-window attention."""
    run_dir = Path(cfg.experiment.run_dir)
    overrides = dict(cfg._overrides)
    runs = {"senri": ConfigManager(cfg.requested_profile, {**overrides, "experiment.run_dir": str(run_dir / "senri")},
                                   cfg.config_dir)}
    if cfg.experiment.train_twin:
        layers = cfg.model.layer_types or SenriConfig.default_layer_types(
            cfg.model.num_hidden_layers, cfg.model.num_memory_layers, cfg.model.first_memory_layer,
            cfg.model.memory_layer_interval,
        )
        runs["swa_only"] = ConfigManager(cfg.requested_profile, {
            **overrides, "experiment.run_dir": str(run_dir / "swa_only"),
            "model.layer_types": ["sliding_attention"] * len(layers),
        }, cfg.config_dir)
    return runs



def training_arguments(cfg: ConfigManager, run_dir: Path) -> TrainingArguments:
    t = cfg.training
    precision = cfg.resolve_precision()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return TrainingArguments(
        output_dir=str(run_dir),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        seed=t.seed,
        data_seed=t.seed,
        report_to="none",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        ddp_find_unused_parameters=False,
        disable_tqdm=not os.isatty(1),
    )


def train(cfg: ConfigManager, model: SenriForCausalLM | None = None, tokenizer: Any = None,
          train_dataset: Any = None) -> dict[str, Any]:
    """Train (or resume) the run described by ``cfg``; returns a summary also written to train_summary.json."""
    run_dir = Path(cfg.experiment.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if model is None:
        model, tokenizer = build_model(cfg)
    if train_dataset is None:
        train_dataset = build_dataset(cfg, tokenizer)
    drive_dir = cfg.resolve_drive_dir()
    resume = find_resume_checkpoint(run_dir, drive_dir)
    args = training_arguments(cfg, run_dir)
    probe = train_dataset[0]["input_ids"][None]
    metrics = MetricsCallback(run_dir / "metrics.jsonl", probe)
    if args.process_index == 0:
        cfg.save(run_dir / "config.yaml")
        metrics.truncate_after(int(resume.name.split("-")[1]) if resume else 0)
    optimizer = torch.optim.AdamW(
        optimizer_param_groups(model, cfg.training.learning_rate, cfg.training.weight_decay,
                               cfg.training.gate_lr_multiplier)
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=train_dataset, data_collator=default_data_collator,
        optimizers=(optimizer, None), callbacks=[metrics, CheckpointCallback(drive_dir, cfg.training.save_total_limit)],
    )
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    summary = {
        "profile": cfg.profile, "run_dir": str(run_dir), "global_step": trainer.state.global_step,
        "train_loss": result.training_loss, "resumed_from": str(resume) if resume else None,
        "gates": {str(k): v.tolist() for k, v in model.memory_gate_values().items()},
    }
    if trainer.is_world_process_zero():
        trainer.save_model(str(run_dir / "final"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(run_dir / "final"))
        save_records(run_dir / "train_summary.json", summary)
    return summary


__all__ = [
    "build_model", "optimizer_param_groups", "find_resume_checkpoint", "mirror_checkpoint", "is_complete",
    "training_arguments", "train", "memory_norms", "model_runs", "COMPLETE_MARKER",
]
