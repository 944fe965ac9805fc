"""Training on top of transformers' Trainer: model building, gate learning rates, metrics, checkpoints, resume.

    from senri.config import ConfigManager
    from senri.training import train
    summary = train(ConfigManager("cpu-smoke", overrides={"run_dir": "runs/x", "max_steps": 30}))

Trainer runs the loop (mixed precision with GradScaler, accumulation, DDP, checkpoint save/load, logging); this
module adds what Senri needs around it:

* memory gates learn at ``learning_rate × gate_lr_multiplier`` with no weight decay (published reproductions
  failed with gates stuck near their initial value), and their values and the memory norms are logged;
* every checkpoint gets a manifest (``SENRI_COMPLETE``: each file and its size) once all processes have written
  it; only a checkpoint whose manifest matches its files is resumed from, so a save, copy or deletion cut short
  by a kill is never mistaken for a checkpoint;
* the last ``save_total_limit`` complete checkpoints are kept, locally and on Google Drive, where each is copied
  under a temporary name and renamed once complete; a copy that fails (quota, a dropped mount) is a warning, and
  the next save copies its newer checkpoint instead: training goes on;
* a finished run's ``final/`` model, ``metrics.jsonl``, ``config.yaml`` and ``train_summary.json`` are copied to
  the run's Drive directory too (``cfg.home_dir()``), the summary last: a fresh runtime evaluates from there;
* a run restarted with the same configuration resumes from the newest complete checkpoint, local or on Drive,
  and logs the same per-step losses as an uninterrupted run (Trainer restores the RNG states and skips the
  batches already seen; the sampler is seeded by ``data_seed`` and the epoch); restarted with settings that
  shape another model, data or training (``cfg.identity()``), it refuses, naming them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from ..model.cache import SenriCache
from .config import ConfigManager, check_identity
from ..model.conversion import convert_llama_to_senri, load_base_model
from ..tasks.data import build_dataset, build_tokenizer
from ..evaluation.harness import load_records, save_records
from ..model.io import atomic_write
from ..model.modeling_senri import SenriForCausalLM

# Parameters of the memory path: the per-head gates, and whatever else the model names "memory".
GATE_PARAMETER_SUFFIXES = ("memory_gate",)
MEMORY_PARAMETER_FRAGMENTS = ("memory",)
GATE_GROUP = "memory_gates"  # name of the optimizer param group holding the gates
COMPLETE_MARKER = "SENRI_COMPLETE"
# A finished run's results besides final/, copied to Drive in this order: train_summary.json (finished) comes last.
RESULT_FILES = ("config.yaml", "metrics.jsonl", "train_summary.json")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_LAYER_ATTENTION = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.")


# --- model --------------------------------------------------------------------------------------------------------
def is_gate_parameter(name: str) -> bool:
    return name.endswith(GATE_PARAMETER_SUFFIXES)


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
            param.requires_grad = any(f in name for f in MEMORY_PARAMETER_FRAGMENTS) or (
                layer is not None and int(layer.group(1)) in memory_layers
            )
    return model, tokenizer


def make_optimizer_param_groups(model: torch.nn.Module, lr: float, weight_decay: float,
                                gate_lr_multiplier: float) -> list[dict[str, Any]]:
    """Gates: lr × multiplier, no weight decay; other 1-D parameters (norms, biases): no decay; the rest: decay.

    Frozen parameters are left out. Groups are named (``decay``, ``no_decay``, ``memory_gates``); the learning-rate
    schedule scales each group's own lr, so gates keep their multiplier through warm-up and decay.
    """
    groups: dict[str, list[torch.nn.Parameter]] = {"decay": [], "no_decay": [], GATE_GROUP: []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if is_gate_parameter(name):
            groups[GATE_GROUP].append(param)
        elif param.dim() < 2:
            groups["no_decay"].append(param)
        else:
            groups["decay"].append(param)
    settings = {"decay": (lr, weight_decay), "no_decay": (lr, 0.0), GATE_GROUP: (lr * gate_lr_multiplier, 0.0)}
    return [
        {"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
        for name, params in groups.items() if params
    ]


class SenriTrainer(Trainer):
    """Trainer whose optimizer (``args.optim``, AdamW by default) uses :func:`make_optimizer_param_groups`."""

    def __init__(self, *args: Any, gate_lr_multiplier: float = 1.0, **kwargs: Any):
        self.gate_lr_multiplier = gate_lr_multiplier
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            groups = make_optimizer_param_groups(opt_model, self.args.learning_rate, self.args.weight_decay,
                                                 self.gate_lr_multiplier)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


# --- checkpoints --------------------------------------------------------------------------------------------------
def _checkpoints(directory: Path | None) -> list[tuple[int, Path]]:
    """``checkpoint-N`` directories in ``directory``, oldest first (temporary names never match)."""
    if directory is None or not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def _manifest(directory: Path) -> dict[str, int]:
    return {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*")) if p.is_file() and p.name != COMPLETE_MARKER
    }


def mark_complete(checkpoint: Path) -> None:
    """Write the manifest (every file and its size) under a temporary name, then rename it into place."""
    manifest = json.dumps({"files": _manifest(checkpoint)}, indent=0)
    with atomic_write(checkpoint / COMPLETE_MARKER) as f:
        f.write(manifest)


def is_complete(checkpoint: Path) -> bool:
    """True when the checkpoint's manifest exists and every file it lists is there with its size."""
    try:
        files = json.loads((Path(checkpoint) / COMPLETE_MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if "trainer_state.json" not in files:
        return False
    for name, size in files.items():
        path = Path(checkpoint) / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _remove(path: Path) -> None:
    """Delete a directory so that no kill leaves a half-deleted ``checkpoint-N`` behind: rename, then delete."""
    doomed = path.with_name(f".{path.name}.deleting-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _copy_complete(checkpoint: Path, target: Path) -> Path:
    """Copy ``checkpoint`` to ``target`` under a temporary name, check the copy, then rename it into place."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint, tmp)
    if not is_complete(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"copy of {checkpoint} to {tmp} does not match its manifest")
    if target.exists():
        _remove(target)
    os.replace(tmp, target)
    return target


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints in ``directory``; remove older ones, checkpoints without a
    matching manifest and interrupted copies or deletions (``.checkpoint-N.*`` names)."""
    for leftover in directory.glob(".checkpoint-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    complete = []
    for _, path in _checkpoints(directory):
        if is_complete(path):
            complete.append(path)
        else:
            _remove(path)
    for path in complete[:-keep]:
        _remove(path)


def find_resume_checkpoint(run_dir: str | os.PathLike, drive_dir: str | os.PathLike | None = None) -> Path | None:
    """The newest complete checkpoint in ``run_dir`` or ``drive_dir`` (copied back to ``run_dir`` if only there).

    Incomplete local checkpoints newer than it (a save cut short) are removed: Trainer would write into them.
    """
    run_dir = Path(run_dir)
    for leftover in run_dir.glob(".checkpoint-*") if run_dir.is_dir() else []:
        shutil.rmtree(leftover, ignore_errors=True)
    local = [(step, p) for step, p in _checkpoints(run_dir) if is_complete(p)]
    remote = [(step, p) for step, p in _checkpoints(Path(drive_dir) if drive_dir else None) if is_complete(p)]
    best = local[-1] if local else None
    if remote and (best is None or remote[-1][0] > best[0]):
        best = (remote[-1][0], _copy_complete(remote[-1][1], run_dir / remote[-1][1].name))
    newest = best[0] if best else -1
    for step, path in _checkpoints(run_dir):
        if step > newest and not is_complete(path):
            _remove(path)
    return best[1] if best else None


def mirror_checkpoint(checkpoint: Path, drive_dir: Path, keep: int) -> Path:
    """Copy a complete checkpoint to Drive (temporary name, then rename); keep the newest ``keep`` there."""
    drive_dir.mkdir(parents=True, exist_ok=True)
    target = _copy_complete(checkpoint, drive_dir / checkpoint.name)
    prune_checkpoints(drive_dir, keep)  # copies interrupted earlier are removed, never resumed from
    return target


def drive_warning(message: str) -> None:
    """One line on stderr: a Drive copy that failed is reported, never raised (the local run is complete)."""
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def _copy_file(source: Path, target: Path) -> None:
    with atomic_write(target, "wb") as f, open(source, "rb") as data:
        shutil.copyfileobj(data, f)


def publish_results(run_dir: Path, home: Path, files: tuple[str, ...] = RESULT_FILES, model: bool = True) -> bool:
    """Copy ``final/`` (under a temporary name, then renamed) and ``files`` of ``run_dir`` that exist into ``home``,
    in that order. A failure is a warning (:func:`drive_warning`) and returns False: training re-run later copies
    them again."""
    try:
        home.mkdir(parents=True, exist_ok=True)
        if model and (run_dir / "final").is_dir():
            tmp = home / f".final.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(run_dir / "final", tmp)
            if (home / "final").exists():
                _remove(home / "final")
            os.replace(tmp, home / "final")
        for name in files:
            if (run_dir / name).is_file():
                _copy_file(run_dir / name, home / name)
    except OSError as error:
        drive_warning(f"results of {run_dir} were not copied to {home} ({type(error).__name__}: {error}); "
                      "they are complete locally; running training again copies them")
        return False
    return True


def _finished_summary(directory: Path, max_steps: int) -> dict[str, Any] | None:
    """The summary of a run in ``directory`` that trained ``max_steps`` or more and saved its final model."""
    try:
        summary = load_records(directory / "train_summary.json")
    except (OSError, ValueError):
        return None
    done = isinstance(summary, dict) and int(summary.get("global_step") or 0) >= max_steps
    return summary if done and (directory / "final" / "config.json").is_file() else None


def _checkpoint_step(checkpoint: Path | None) -> int:
    return int(_CHECKPOINT.match(checkpoint.name).group(1)) if checkpoint else 0


# --- callbacks ----------------------------------------------------------------------------------------------------
def _wait_for_everyone() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class CheckpointCallback(TrainerCallback):
    """Adds the metrics logged so far to each checkpoint and marks it complete once every process has written its
    part, then mirrors it to Drive (so a run restored from Drive keeps its metrics history). A failed copy is a
    warning; the next save copies its own, newer checkpoint (and the run's config.yaml) again."""

    def __init__(self, drive_dir: Path | None, keep: int, metrics_path: Path):
        self.drive_dir, self.keep, self.metrics_path = drive_dir, keep, metrics_path

    def on_save(self, args, state, control, **kwargs):
        _wait_for_everyone()  # each DDP process writes its own rng_state_<rank>.pth; no barrier in Trainer
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if self.metrics_path.exists():  # Trainer logs a step before saving it: lines up to this step
                shutil.copyfile(self.metrics_path, checkpoint / self.metrics_path.name)
            mark_complete(checkpoint)
            # Rotation happens here, not in Trainer (which deletes before this marker exists): at every moment the
            # newest complete checkpoint is intact.
            prune_checkpoints(checkpoint.parent, self.keep)
            if self.drive_dir is not None:
                try:
                    mirror_checkpoint(checkpoint, self.drive_dir, self.keep)
                    config = checkpoint.parent / "config.yaml"
                    if config.is_file():
                        _copy_file(config, self.drive_dir / config.name)
                except OSError as error:
                    drive_warning(f"{checkpoint.name} was not copied to {self.drive_dir} ({type(error).__name__}: "
                                  f"{error}); training goes on and the next save copies its checkpoint")
        _wait_for_everyone()
        return control


class MetricsCallback(TrainerCallback):
    """Appends one JSON object per logged step to ``metrics.jsonl``: loss, learning rates, grad norm, gate values
    (mean/min/max per memory layer) and ‖M‖ per memory layer after reading ``probe`` into a fresh cache."""

    def __init__(self, path: Path, probe: torch.Tensor | None = None,
                 extra: Callable[[SenriForCausalLM], dict[str, float]] | None = None):
        self.path, self.probe, self.extra = path, probe, extra  # extra(model): more metrics (retrieval probe)

    def restore(self, checkpoint: Path | None) -> None:
        """Start the file as it was when ``checkpoint`` was saved (empty for a new run), so it has each step once."""
        if checkpoint is None:
            self.path.unlink(missing_ok=True)
        elif (checkpoint / self.path.name).exists():
            with atomic_write(self.path, "wb") as f, open(checkpoint / self.path.name, "rb") as saved:
                shutil.copyfileobj(saved, f)
        else:
            self.truncate_after(_checkpoint_step(checkpoint))

    def truncate_after(self, step: int) -> None:
        """Keep only the lines logged up to ``step``; a line cut short by a kill is dropped too."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        with atomic_write(self.path) as f:
            f.write("".join(line + "\n" for line in kept))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True  # the file always ends with the last step, whatever logging_steps is
        return control

    def on_log(self, args, state, control, logs=None, model=None, optimizer=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return control
        record = {"step": state.global_step, "epoch": state.epoch, "loss": float(logs["loss"])}
        for key in ("learning_rate", "grad_norm"):
            if key in logs:
                record[key] = float(logs[key])
        for group in getattr(optimizer, "param_groups", []):
            if group.get("name") == GATE_GROUP:
                record["gate_learning_rate"] = float(group["lr"])
        if isinstance(model, SenriForCausalLM):
            record.update(gate_stats(model))
            if self.probe is not None:
                record.update(memory_norms(model, self.probe))
            if self.extra is not None:
                record.update(self.extra(model))
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        return control


def gate_stats(model: SenriForCausalLM) -> dict[str, float]:
    """``gate/<layer>/{mean,min,max}`` of the per-head memory weights."""
    stats = {}
    for layer, values in model.memory_gate_values().items():
        stats.update({f"gate/{layer}/mean": float(values.mean()), f"gate/{layer}/min": float(values.min()),
                      f"gate/{layer}/max": float(values.max())})
        stats.update({f"gate/{layer}/head{h}": float(v) for h, v in enumerate(values.tolist())})
    return stats


@torch.no_grad()
def memory_norms(model: SenriForCausalLM, probe: torch.Tensor) -> dict[str, float]:
    """``memory_norm/<layer>``: ‖M‖ (Frobenius) per memory layer after reading ``probe`` (B, T) into a new cache."""
    was_training = model.training
    model.eval()
    cache = SenriCache(model.config, batch_size=probe.shape[0])
    model(input_ids=probe.to(model.device), cache=cache, use_cache=True, logits_to_keep=1)
    model.train(was_training)
    return {f"memory_norm/{layer}": norm for layer, norm in cache.memory_norms().items()}


def retrieval_metrics(cfg: ConfigManager, tokenizer: Any,
                      samples: int = 32) -> Callable[[SenriForCausalLM], dict[str, float]] | None:
    """On the passkey task: a function logging, per step, retrieval of needles beyond the window by the model and by
    its memory alone (:func:`senri.analysis.retrieval_probe` on ``samples`` fixed held-out samples); None for other
    datasets."""
    if cfg.experiment.dataset != "passkey" or not samples or tokenizer is None:
        return None
    from ..evaluation.analysis import passkey_probe, retrieval_probe
    from ..tasks.niah import VALUE_WORDS

    probe = passkey_probe(tokenizer, cfg.training.seq_len, samples, cfg.training.seed, cfg.model.sliding_window,
                          cfg.model.chunk_size, template=cfg.experiment.niah_templates[0])
    words = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in VALUE_WORDS]
    candidates = torch.tensor(sorted({ids[0] for ids in words if len(ids) == 1}))
    return lambda model: retrieval_probe(model, probe, candidates if len(candidates) else None)


# --- training -----------------------------------------------------------------------------------------------------
def training_arguments(cfg: ConfigManager, run_dir: Path) -> TrainingArguments:
    """Trainer's arguments from the ``training`` section (precision from ``cfg.resolve_precision()``)."""
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
        fp16=precision == "fp16",  # Trainer scales the loss (GradScaler); the model keeps M and z in float32
        bf16=precision == "bf16",
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # CheckpointCallback keeps the last training.save_total_limit complete ones
        logging_steps=t.logging_steps,
        seed=t.seed,
        data_seed=t.seed,
        report_to="none",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        # Every Senri parameter takes part in every forward today (gates too, even with an empty memory); True
        # keeps DDP working for variants that skip a path, for one extra autograd-graph walk per step.
        ddp_find_unused_parameters=True,
        # Progress bars in a terminal or a notebook; one printed line per log in a headless run.
        disable_tqdm=not (sys.stdout.isatty() or "ipykernel" in sys.modules),
    )


def _read_losses(path: Path) -> list[list[float]]:
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [[r["step"], r["loss"]] for r in records]


def train(cfg: ConfigManager, model: SenriForCausalLM | None = None, tokenizer: Any = None,
          train_dataset: Any = None, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Train (or resume) the run described by ``cfg``; return a summary, also written to ``train_summary.json``.

    Writes ``{run_dir}/config.yaml``, ``metrics.jsonl``, ``checkpoint-N/`` (mirrored to Drive when
    ``cfg.resolve_drive_dir()`` gives a directory), ``final/`` (model and tokenizer) and ``train_summary.json``;
    with Drive, the results are copied there when training ends (:func:`publish_results`). A run whose saved
    ``config.yaml`` (local or on Drive) has other identity settings raises naming them. A finished run, here or on
    Drive, is returned as it is. Works unchanged under ``torchrun --nproc_per_node N`` (gloo on CPU).
    ``training.recipe: transfer`` runs phase A of the real-model recipe instead (:func:`senri.transfer.train_transfer`),
    ``finetune`` its phase B (:func:`senri.finetune.train_finetune`).
    """
    run_dir = Path(cfg.experiment.run_dir)
    args = training_arguments(cfg, run_dir)  # sets up the process group under torchrun
    drive_dir = cfg.resolve_drive_dir()
    with args.main_process_first(local=False, desc="resume checkpoint and data"):
        # The main process restores a Drive copy and builds the token cache; the others then find them ready.
        for where in (run_dir, drive_dir):
            if where is not None:
                check_identity(cfg, where / "config.yaml")
        # A run that already reached max_steps is finished: running it again returns its summary (transformers'
        # Trainer, resumed at max_steps, would take one more step each time); one finished on another runtime is
        # read from Drive, and one whose copy to Drive failed is copied now.
        for where in (run_dir, drive_dir):
            done = _finished_summary(where, cfg.training.max_steps) if where is not None else None
            if done is not None:
                if where == run_dir and drive_dir is not None and args.process_index == 0:
                    publish_results(run_dir, drive_dir)
                return done
        run_dir.mkdir(parents=True, exist_ok=True)
        resume = find_resume_checkpoint(run_dir, drive_dir)
        finished = resume is not None and _checkpoint_step(resume) >= cfg.training.max_steps
        if model is None:
            model, tokenizer = build_model(cfg)
        if train_dataset is None:
            train_dataset = build_dataset(cfg, tokenizer)
    probe = torch.as_tensor(train_dataset[0]["input_ids"])[None]  # (1, T): memory norms are read on this sample
    metrics = MetricsCallback(run_dir / "metrics.jsonl", probe, retrieval_metrics(cfg, tokenizer))
    if args.process_index == 0:
        cfg.save(run_dir / "config.yaml")  # the run's identity, on Drive too before the first step
        if drive_dir is not None:
            publish_results(run_dir, drive_dir, files=("config.yaml",), model=False)
        metrics.restore(resume)
    trainer = SenriTrainer(
        model=model, args=args, train_dataset=train_dataset, data_collator=default_data_collator,
        callbacks=[metrics, CheckpointCallback(drive_dir, cfg.training.save_total_limit, metrics.path),
                   *(callbacks or [])],
        gate_lr_multiplier=cfg.training.gate_lr_multiplier,
    )
    if finished:  # cut off after its last checkpoint, before its final save: finish it without training further
        model.load_state_dict(SenriForCausalLM.from_pretrained(resume).state_dict())
        global_step, train_loss, runtime = _checkpoint_step(resume), None, None
    else:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        global_step, train_loss = trainer.state.global_step, result.training_loss
        runtime = result.metrics.get("train_runtime")
    trainer.save_model(str(run_dir / "final"))  # writes on the main process only
    summary: dict[str, Any] = {
        "profile": cfg.profile, "run_dir": str(run_dir), "global_step": global_step,
        "resumed_from": str(resume) if resume else None, "train_loss": train_loss, "train_runtime": runtime,
        "gates": {str(k): v.tolist() for k, v in getattr(model, "memory_gate_values", dict)().items()},
    }
    if trainer.is_world_process_zero():
        losses = _read_losses(metrics.path)
        summary.update(final_loss=losses[-1][1] if losses else None, losses=losses)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(run_dir / "final"))
        save_records(run_dir / "train_summary.json", summary)
        if drive_dir is not None:
            publish_results(run_dir, drive_dir)
    _wait_for_everyone()
    return summary


__all__ = [
    "build_model", "make_optimizer_param_groups", "SenriTrainer", "training_arguments", "train",
    "find_resume_checkpoint", "mirror_checkpoint", "prune_checkpoints", "mark_complete", "is_complete",
    "publish_results", "drive_warning", "RESULT_FILES",
    "gate_stats", "memory_norms", "COMPLETE_MARKER", "GATE_GROUP", "GATE_PARAMETER_SUFFIXES",
    "MEMORY_PARAMETER_FRAGMENTS",
]
