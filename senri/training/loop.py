"""The one training loop: transformers' Trainer, with what every Senri recipe needs around it.

    from senri.training.config import ConfigManager
    from senri.training.recipes import train
    summary = train(ConfigManager("cpu-smoke", overrides={"run_dir": "runs/x", "max_steps": 30}))

A recipe (:class:`Recipe`: a model, a dataset and its collator, a loss) is run by :func:`run_recipe`; Trainer runs the
loop (mixed precision with GradScaler, accumulation, DDP, the learning-rate schedule, checkpoint save/load, RNG
states, skipping the batches already seen on resume, logging); this module adds, for every recipe:

* memory gates learn at ``learning_rate × gate_lr_multiplier`` with no weight decay (published reproductions
  failed with gates stuck near their initial value), and their values and the memory norms are logged;
* every checkpoint gets a manifest (``SENRI_COMPLETE``: each file and its size) once all processes have written
  it; only a checkpoint whose manifest matches its files is resumed from, so a save, copy or deletion cut short
  by a kill is never mistaken for a checkpoint; a recipe that trains a few parameters of a frozen model
  (``Recipe.trainable_only``) checkpoints those parameters only;
* the last ``save_total_limit`` complete checkpoints are kept, locally and on Google Drive, where each is copied
  under a temporary name and renamed once complete; a copy that fails (quota, a dropped mount) is a warning, and
  the next save copies its newer checkpoint instead: training goes on;
* ``metrics.jsonl`` has one line per logged step (the loss, the recipe's own terms, gates, evaluations);
* a time budget stops a run at the end of a step, saved: running it again continues;
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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator, set_seed

from ..evaluation.harness import load_records, save_records
from ..model.cache import SenriCache
from ..model.io import atomic_write
from ..model.modeling_senri import SenriForCausalLM, unwrap_peft
from .config import ConfigManager, check_identity

# Parameters of the memory path: the per-head gates.
GATE_PARAMETER_SUFFIXES = ("memory_gate",)
GATE_GROUP = "memory_gates"  # name of the optimizer param group holding the gates
COMPLETE_MARKER = "SENRI_COMPLETE"
TRAINABLE_FILE = "trainable.safetensors"  # a trainable_only checkpoint's parameters
# A finished run's results besides final/, copied to Drive in this order: train_summary.json (finished) comes last.
RESULT_FILES = ("config.yaml", "metrics.jsonl", "train_summary.json")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# --- optimizer ----------------------------------------------------------------------------------------------------
def is_gate_parameter(name: str) -> bool:
    return name.endswith(GATE_PARAMETER_SUFFIXES)


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


# --- recipes ------------------------------------------------------------------------------------------------------
@dataclass
class Recipe:
    """What a recipe gives the loop: the model to train (its ``requires_grad`` flags say what trains), the data and
    the loss. ``loss(model, batch)`` returns (loss, {name: float} logged beside it); None: the model's own loss."""

    model: Any
    train_dataset: Any
    loss: Callable[[Any, dict[str, Any]], tuple[torch.Tensor, dict[str, float]]] | None = None
    collator: Callable = default_data_collator
    tokenizer: Any = None
    gate_lr_multiplier: float = 1.0
    sequential: bool = False      # batches in the dataset's order (a sample depends on its step), not shuffled
    trainable_only: bool = False  # checkpoints hold the trainable parameters only (the rest is frozen)
    probe: torch.Tensor | None = None  # (1, T): memory norms are logged after reading it
    evaluate: Callable[[Any], dict[str, float]] | None = None  # logged at every eval_steps-th step and the last
    eval_steps: int | None = None  # None: at every logged step
    time_budget_s: float | None = None
    # step -> multiplier of the peak learning rate (every param group's); None: Trainer's lr_scheduler_type
    lr_lambda: Callable[[int], float] | None = None
    # (run_dir, summary): write final/ and anything else the recipe leaves; None: the model and tokenizer in final/
    finish: Callable[[Path, dict[str, Any]], None] | None = None


class SenriTrainer(Trainer):
    """Trainer running a :class:`Recipe`: its param groups (:func:`make_optimizer_param_groups`), its loss (and the
    terms it logs), its sample order, and checkpoints of the trainable parameters only where it asks."""

    def __init__(self, *args: Any, recipe: Recipe, **kwargs: Any):
        self.recipe, self.step_logs, self.skipped_steps = recipe, {}, 0
        super().__init__(*args, **kwargs)
        self.add_callback(_SkippedSteps(self))

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            groups = make_optimizer_param_groups(opt_model, self.args.learning_rate, self.args.weight_decay,
                                                 self.recipe.gate_lr_multiplier)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.recipe.lr_lambda is None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer if optimizer is None else optimizer, self.recipe.lr_lambda)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.recipe.loss is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, self.step_logs = self.recipe.loss(model, inputs)
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # the recipe's own terms, of the step just logged
            logs.update(self.step_logs)
            if self.accelerator.scaler is not None:  # float16: steps the loss scaler skipped (inf/NaN gradients)
                logs["skipped_steps"] = self.skipped_steps
        super().log(logs, start_time)

    def _get_train_sampler(self, train_dataset=None):
        if self.recipe.sequential:
            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)
        return super()._get_train_sampler(train_dataset)

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return trainable_parameters(self.model)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.recipe.trainable_only:
            return super()._save(output_dir, state_dict)
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            save_file({n: p.detach().contiguous().cpu() for n, p in self._trainable().items()},
                      os.path.join(output_dir, TRAINABLE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if not self.recipe.trainable_only:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_trainable(self.model, resume_from_checkpoint)


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """``model``'s trainable parameters by name: what a ``trainable_only`` checkpoint saves and loads."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, checkpoint: str | os.PathLike) -> None:
    """Copy a ``trainable_only`` checkpoint's parameters (:data:`TRAINABLE_FILE`) into ``model``'s trainable ones;
    a checkpoint holding other parameters is refused, naming some of them."""
    own = trainable_parameters(model)
    saved = load_file(os.path.join(checkpoint, TRAINABLE_FILE))
    if set(saved) != set(own):
        odd = sorted(set(saved) ^ set(own))[:4]
        raise ValueError(f"{checkpoint} holds other trainable parameters than this model: {odd}")
    with torch.no_grad():
        for name, value in saved.items():
            own[name].copy_(value)


class _SkippedSteps(TrainerCallback):
    """Counts the optimizer steps float16's loss scaler skipped (since the run's start or resume)."""

    def __init__(self, trainer: SenriTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.skipped_steps += int(self.trainer.accelerator.optimizer_step_was_skipped)
        return control


# --- checkpoints --------------------------------------------------------------------------------------------------
def _checkpoints(directory: Path | None) -> list[tuple[int, Path]]:
    """``checkpoint-N`` directories in ``directory``, oldest first (temporary names never match)."""
    if directory is None or not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def complete_checkpoints(directory: Path | None) -> list[tuple[int, Path]]:
    """(step, path) of the complete ``checkpoint-N`` directories in ``directory``, oldest first."""
    return [(step, p) for step, p in _checkpoints(directory) if is_complete(p)]


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
    local = complete_checkpoints(run_dir)
    remote = complete_checkpoints(Path(drive_dir) if drive_dir else None)
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
    """Appends one JSON object per logged step to ``metrics.jsonl``: loss and the recipe's own terms, learning
    rates, grad norm, gate values (mean/min/max per memory layer), ‖M‖ per memory layer after reading ``probe``
    into a fresh cache, and ``evaluate(model)`` at every ``eval_steps``-th step and the last."""

    def __init__(self, path: Path, probe: torch.Tensor | None = None,
                 evaluate: Callable[[Any], dict[str, float]] | None = None, eval_steps: int | None = None):
        self.path, self.probe, self.evaluate, self.eval_steps = path, probe, evaluate, eval_steps

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

    def _evaluates(self, state) -> bool:  # every eval_steps-th step and the last; without eval_steps, every log
        return self.evaluate is not None and (self.eval_steps is None or state.global_step >= state.max_steps
                                              or state.global_step % self.eval_steps == 0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps or (self.eval_steps and state.global_step % self.eval_steps == 0):
            control.should_log = True  # the file always ends with the last step, whatever logging_steps is
        return control

    def on_log(self, args, state, control, logs=None, model=None, optimizer=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return control
        record = {"step": state.global_step, **{k: v for k, v in logs.items() if k != "step"}}
        for group in getattr(optimizer, "param_groups", []):
            if group.get("name") == GATE_GROUP:
                record["gate_learning_rate"] = float(group["lr"])
        inner = unwrap_peft(model)  # a peft model's Senri
        if isinstance(inner, SenriForCausalLM):
            record.update(gate_stats(inner))
            if self.probe is not None:
                record.update(memory_norms(inner, self.probe))
        if self._evaluates(state):
            record.update(self.evaluate(model))
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        return control


class TimeBudgetCallback(TrainerCallback):
    """Stops training at the end of the step that exceeds ``seconds`` of this session, and saves it."""

    def __init__(self, seconds: float):
        self.seconds, self.began = seconds, time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.began > self.seconds:
            control.should_training_stop = control.should_save = control.should_log = True
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


# --- the loop -----------------------------------------------------------------------------------------------------
def training_arguments(run_dir: Path, **fields: Any) -> TrainingArguments:
    """Trainer's arguments for a run in ``run_dir``: Senri's defaults (checkpoints every ``save_steps`` rotated by
    :class:`CheckpointCallback`, CPU when there is no GPU, gloo for DDP on CPU), then ``fields``."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    defaults = dict(
        output_dir=str(run_dir), save_strategy="steps", save_total_limit=None, report_to="none",
        dataloader_num_workers=0, remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        # Every Senri parameter takes part in every forward today (gates too, even with an empty memory); True
        # keeps DDP working for variants that skip a path, for one extra autograd-graph walk per step.
        ddp_find_unused_parameters=True,
        # Progress bars in a terminal or a notebook; one printed line per log in a headless run.
        disable_tqdm=not (sys.stdout.isatty() or "ipykernel" in sys.modules),
    )
    return TrainingArguments(**{**defaults, **fields})


def config_arguments(cfg: ConfigManager) -> dict[str, Any]:
    """Trainer's arguments from the ``training`` section (precision from ``cfg.resolve_precision()``)."""
    t = cfg.training
    precision = cfg.resolve_precision()
    return dict(
        max_steps=t.max_steps, per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm, save_steps=t.save_steps, logging_steps=t.logging_steps, seed=t.seed,
        data_seed=t.seed,
        fp16=precision == "fp16",  # Trainer scales the loss (GradScaler); the model keeps M and z in float32
        bf16=precision == "bf16",
    )


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (none if it is missing)."""
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def fit(recipe: Recipe, args: TrainingArguments, drive_dir: Path | None = None, keep: int = 2,
        callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Train ``recipe`` to ``args.max_steps`` in ``args.output_dir``, resuming from its newest complete checkpoint
    (local or on Drive); returns the trainer, the step reached, where it resumed from and its loss and runtime."""
    run_dir = Path(args.output_dir)
    with args.main_process_first(local=False, desc="resume checkpoint"):
        run_dir.mkdir(parents=True, exist_ok=True)
        resume = find_resume_checkpoint(run_dir, drive_dir)
    metrics = MetricsCallback(run_dir / "metrics.jsonl", recipe.probe, recipe.evaluate, recipe.eval_steps)
    if args.process_index == 0:
        metrics.restore(resume)
    extra = [TimeBudgetCallback(recipe.time_budget_s)] if recipe.time_budget_s is not None else []
    trainer = SenriTrainer(
        model=recipe.model, args=args, train_dataset=recipe.train_dataset, data_collator=recipe.collator,
        callbacks=[metrics, CheckpointCallback(drive_dir, keep, metrics.path), *extra, *(callbacks or [])],
        recipe=recipe,
    )
    began = time.perf_counter()
    if resume is not None and _checkpoint_step(resume) >= args.max_steps:
        # Cut off after its last checkpoint, before its final save: finish it without training further
        # (Trainer, resumed at max_steps, would take one more step each time).
        trainer._load_from_checkpoint(str(resume))
        step, loss = _checkpoint_step(resume), None
    else:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        step, loss = trainer.state.global_step, result.training_loss
    recipe.model.eval()
    return {"trainer": trainer, "global_step": step, "resumed_from": str(resume) if resume else None,
            "train_loss": loss, "train_runtime": time.perf_counter() - began}


def run_recipe(cfg: ConfigManager, build: Callable[[], Recipe], arguments: dict[str, Any] | None = None,
               callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Train (or resume) the run described by ``cfg`` with the recipe ``build()`` makes; return a summary, also
    written to ``train_summary.json``.

    Writes ``{run_dir}/config.yaml``, ``metrics.jsonl``, ``checkpoint-N/`` (mirrored to Drive when
    ``cfg.resolve_drive_dir()`` gives a directory), ``final/`` and ``train_summary.json``; with Drive, the results
    are copied there when training ends (:func:`publish_results`). A run whose saved ``config.yaml`` (local or on
    Drive) has other identity settings raises naming them. A finished run, here or on Drive, is returned as it is.
    ``arguments`` override Trainer's arguments from the configuration. Works unchanged under ``torchrun
    --nproc_per_node N`` (gloo on CPU).
    """
    run_dir = Path(cfg.experiment.run_dir)
    args = training_arguments(run_dir, **{**config_arguments(cfg), **(arguments or {})})  # the process group
    drive_dir = cfg.resolve_drive_dir()
    with args.main_process_first(local=False, desc="resume checkpoint and data"):
        # The main process restores a Drive copy and builds the token cache; the others then find them ready.
        for where in (run_dir, drive_dir):
            if where is not None:
                check_identity(cfg, where / "config.yaml")
        # A run that already reached max_steps is finished: running it again returns its summary; one finished on
        # another runtime is read from Drive, and one whose copy to Drive failed is copied now.
        for where in (run_dir, drive_dir):
            done = _finished_summary(where, cfg.training.max_steps) if where is not None else None
            if done is not None:
                if where == run_dir and drive_dir is not None and args.process_index == 0:
                    publish_results(run_dir, drive_dir)
                return done
        set_seed(cfg.training.seed)  # what a recipe initialises at random (LoRA's A) is the same on every runtime
        recipe = build()
    if args.process_index == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")  # the run's identity, on Drive too before the first step
        if drive_dir is not None:
            publish_results(run_dir, drive_dir, files=("config.yaml",), model=False)
    done = fit(recipe, args, drive_dir, cfg.training.save_total_limit, callbacks)
    trainer, model = done.pop("trainer"), recipe.model
    inner = unwrap_peft(model)
    summary: dict[str, Any] = {
        "profile": cfg.profile, "recipe": cfg.training.recipe, "run_dir": str(run_dir), **done,
        "max_steps": cfg.training.max_steps, "stopped_early": done["global_step"] < cfg.training.max_steps,
        "gates": {str(k): v.tolist() for k, v in getattr(inner, "memory_gate_values", dict)().items()},
    }
    if recipe.finish is None:
        trainer.save_model(str(run_dir / "final"))  # writes on the main process only
    if trainer.is_world_process_zero():
        losses = [[r["step"], r["loss"]] for r in read_metrics(run_dir / "metrics.jsonl")]
        summary.update(final_loss=losses[-1][1] if losses else None, losses=losses)
        if recipe.finish is not None:
            recipe.finish(run_dir, summary)
        elif recipe.tokenizer is not None:
            recipe.tokenizer.save_pretrained(str(run_dir / "final"))
        save_records(run_dir / "train_summary.json", summary)
        if drive_dir is not None:
            publish_results(run_dir, drive_dir)
    _wait_for_everyone()
    return summary


__all__ = [
    "Recipe", "SenriTrainer", "make_optimizer_param_groups", "training_arguments", "config_arguments", "fit",
    "run_recipe", "read_metrics", "find_resume_checkpoint", "mirror_checkpoint", "prune_checkpoints",
    "mark_complete", "is_complete", "publish_results", "drive_warning", "RESULT_FILES", "gate_stats",
    "memory_norms", "COMPLETE_MARKER", "GATE_GROUP", "GATE_PARAMETER_SUFFIXES", "TRAINABLE_FILE", "load_trainable",
    "trainable_parameters", "complete_checkpoints",
]
