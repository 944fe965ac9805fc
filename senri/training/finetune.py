"""Phase B of the real-model memory recipe: end-to-end fine-tuning through the memory.

Phase A (:mod:`senri.training.transfer`) teaches each memory layer alone to imitate the teacher's far attention. Phase B
trains the whole converted model on the task itself: the loss is the cross-entropy of the pass key's answer tokens
only (``logits_to_keep``: the 49K-vocabulary head runs on a handful of positions), gradients flow through every
memory write, and a KL term to the frozen base model on plain text keeps it a language model. What trains: LoRA
adapters (through ``peft``) on q/k/v/o of the layers from the first memory layer on, plus phase A's parameters
(memory q/k maps, and the gates at their own learning rate). A curriculum on needle distance starts with needles one
or two windows back (short sequences) and ends with many windows back.

The loop is the one every recipe runs (:mod:`senri.training.loop`), which resumes it exactly: a sample depends only on
(seed, step, row), so a restart sees the same data.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..evaluation.diagnostics import filler_sentences, passkey_cases, teacher_forced_scores
from ..evaluation.real_model import depths_beyond_window, gates_closed
from ..model.conversion import convert_llama_to_senri, load_base_model, senri_config_from
from ..model.modeling_senri import SenriForCausalLM, unwrap_peft
from ..model.trained import (
    CARD_SETTINGS, READ_SETTINGS, SMOLLM2_WINDOW256, TRAINED_DIR, TRANSFER_PARAMETER_SUFFIXES, load_trained_memory,
    read_card,
)
from ..tasks.niah import make_needle
from .loop import Recipe, fit, read_metrics, training_arguments
from .streamed import TokenTargets
from .transfer import local_text_corpus, recipe_finish, text_corpus_ids, text_sample

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Trainer's arguments of phase B beside the configuration's: AdamW without decay. The learning rate follows the
# recipe's own schedule (lr_factor, settings.schedule), which replaces Trainer's.
FINETUNE_ARGUMENTS = {"weight_decay": 0.0}
# learning-rate schedules (training.finetune_schedule). cosine: one linear warm-up, then a cosine to min_lr_rate of
# the peak over the whole run. stage_cosine: the same within each curriculum stage (a warm restart at each new
# length, so every stage trains at a useful rate). constant: the peak after one warm-up.
SCHEDULES = ("cosine", "stage_cosine", "constant")
MIN_LR_RATE = 0.1


@dataclass
class FinetuneSettings:
    """Phase B settings (``config/training.yaml``: ``recipe: finetune`` and the ``finetune_*`` keys)."""

    steps: int = 400
    batch_size: int = 4
    # (fraction of the steps from which it applies, sequence length): needles lie between one window + one chunk
    # and the whole sequence back, so short sequences mean near needles.
    curriculum: tuple[tuple[float, int], ...] = ((0.0, 640), (0.3, 1024), (0.6, 2048))
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_first_layer: int | None = None  # None: the first memory layer
    learning_rate: float = 3e-4          # LoRA and memory q/k maps
    gate_learning_rate: float = 3e-3
    warmup_steps: int = 20
    kl_weight: float = 0.5               # KL(base || model) on plain text, per token
    kl_seq_len: int = 512
    kl_tokens: int = 128                 # the last kl_tokens positions of each text sample are scored
    max_grad_norm: float = 1.0
    save_steps: int = 50
    log_steps: int = 5
    eval_steps: int = 50                 # memory-on vs gates-closed accuracy on eval_cases held-out pass keys
    eval_cases: int = 8
    eval_length: int = 1024
    seed: int = 4321                     # data seed (the reported evaluation uses other seeds)
    time_budget_s: float | None = None   # stop (and save) once training has run this long
    schedule: str = "cosine"             # one of SCHEDULES


def stages(settings: FinetuneSettings) -> list[tuple[int, int, int]]:
    """The curriculum's stages as (first step, end step, sequence length) over the run's ``steps`` (a stage with no
    step of its own is left out): the step ``s`` trains at the length of the stage holding it (:func:`seq_len_at`)."""
    starts = [math.ceil(start * settings.steps) for start, _ in settings.curriculum] + [settings.steps]
    return [(a, b, length) for a, b, (_, length) in zip(starts, starts[1:], settings.curriculum) if b > a]


def stage_bounds(settings: FinetuneSettings) -> list[tuple[int, int]]:
    """The curriculum's stages as [first step, end step) ranges (:func:`stages` without their lengths)."""
    return [(first, end) for first, end, _ in stages(settings)]


def warmup_cosine(step: int, steps: int, warmup: int, min_rate: float = MIN_LR_RATE) -> float:
    """The multiplier of the peak rate at ``step`` of ``steps``: linear from 0 over ``warmup`` steps, then a cosine
    from 1 to ``min_rate`` at ``steps`` (transformers' ``cosine_with_min_lr`` schedule)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, steps - warmup)
    return min_rate + (1.0 - min_rate) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def lr_factor(step: int, settings: FinetuneSettings) -> float:
    """The multiplier of the peak learning rate at optimiser step ``step`` under ``settings.schedule``. With
    ``stage_cosine`` each stage warms up over ``min(warmup_steps, its steps // 2)`` steps and decays to
    :data:`MIN_LR_RATE` by its end."""
    if settings.schedule == "constant":
        return min(1.0, step / max(1, settings.warmup_steps))
    if settings.schedule == "cosine":
        return warmup_cosine(step, settings.steps, settings.warmup_steps)
    if settings.schedule == "stage_cosine":
        for first, end in stage_bounds(settings):
            if first <= step < end:
                return warmup_cosine(step - first, end - first, min(settings.warmup_steps, (end - first) // 2))
        return MIN_LR_RATE
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {settings.schedule!r}")


def curriculum_trained(settings: FinetuneSettings, steps_done: int) -> list[dict[str, int]]:
    """Each curriculum stage's length, its planned steps and the steps trained at it by a run that stopped after
    ``steps_done`` steps: what a time budget that stopped a run early never reached."""
    return [{"seq_len": length, "steps": end - first, "trained": min(max(steps_done - first, 0), end - first)}
            for first, end, length in stages(settings)]


def seq_len_at(step: int, settings: FinetuneSettings) -> int:
    """The curriculum's sequence length at ``step``."""
    length = settings.curriculum[0][1]
    for start, stage_length in settings.curriculum:
        if step >= start * settings.steps:
            length = stage_length
    return length


def passkey_sample(tokenizer: Any, length: int, min_distance: int, rng: random.Random,
                   end: bool = False) -> tuple[list[int], int]:
    """A pass-key training sequence of exactly ``length`` tokens (prompt then answer) and its answer's length; with
    ``end`` the answer is the key, a full stop and the end token (so that a model trained on it stops).

    The filler is a stretch of the classic filler's endless repetition (starting anywhere, as a window into a long
    document); the needle's last token lies at least ``min_distance`` tokens before the question, at a distance
    drawn uniformly up to as far as the sequence allows."""
    encode = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    needle = make_needle("passkey", rng)
    needle_ids, question_ids, answer_ids = (encode(" " + needle.needle_texts[0]), encode(" " + needle.question),
                                            encode(needle.answer))
    if end:
        answer_ids = answer_ids + encode(".") + [tokenizer.eos_token_id]
    filler_budget = length - len(needle_ids) - len(question_ids) - len(answer_ids)
    if filler_budget <= min_distance:
        raise ValueError(f"length {length} leaves no room for a needle {min_distance} tokens back")
    sentences = filler_sentences(tokenizer)
    offset = rng.randrange(len(sentences))
    distance = rng.randint(min_distance, filler_budget)
    # Whole sentences after the needle (at least `distance` tokens), then the filler before it, taken backwards
    # from the needle so that the sequence may start mid-sentence.
    after: list[int] = []
    index = offset
    while len(after) < distance:
        after.extend(sentences[index % len(sentences)])
        index += 1
    after = after[:filler_budget]
    before: list[int] = []
    index = offset - 1
    while len(before) < filler_budget - len(after):
        before[:0] = sentences[index % len(sentences)]
        index -= 1
    before = before[len(before) - (filler_budget - len(after)):]
    ids = before + needle_ids + after + question_ids + answer_ids
    assert len(ids) == length, (len(ids), length)
    return ids, len(answer_ids)


def add_lora(model: SenriForCausalLM, settings: FinetuneSettings) -> Any:
    """``model`` wrapped by peft with LoRA on q/k/v/o of the layers from ``lora_first_layer`` (default: the first
    memory layer) on; the memory q/k maps and gates stay trainable, everything else is frozen."""
    from peft import LoraConfig, get_peft_model

    first = settings.lora_first_layer
    if first is None:
        first = min(model.config.memory_layers) if model.config.memory_layers else 0
    config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=0.0, bias="none",
                        target_modules=list(LORA_TARGETS), layers_to_transform=list(range(first, model.config.num_hidden_layers)),
                        layers_pattern="layers")
    peft_model = get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        if name.endswith(TRANSFER_PARAMETER_SUFFIXES):
            p.requires_grad_(True)
    return peft_model


def answer_loss(model: Any, ids: torch.Tensor, answer_lengths: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of each row's answer, its last ``answer_lengths[b]`` tokens of ``ids`` (B, T), given
    everything before them (the labels of :meth:`senri.training.streamed.TokenTargets.answers`, which scores the same
    answers when a row is read in segments); the vocabulary head runs on the last ``max(answer_lengths)`` positions
    only. Rows of several lengths are left-padded, with ``attention_mask`` (B, T) marking the real tokens."""
    keep = int(answer_lengths.max())
    mask = None if attention_mask is None else attention_mask[:, :-1]
    logits = model(input_ids=ids[:, :-1], attention_mask=mask, logits_to_keep=keep).logits
    return TokenTargets.answers(ids, answer_lengths)(logits, 0, ids.shape[1] - 1)


def kl_to_base(model: Any, base: Any, ids: torch.Tensor, tokens: int) -> torch.Tensor:
    """KL(base || model) per token over the last ``tokens`` positions of plain text ``ids`` (the base with full
    attention is the reference: the fine-tune must stay the language model it was)."""
    with torch.no_grad():
        reference = base(input_ids=ids, logits_to_keep=tokens).logits.float().log_softmax(-1)
    own = model(input_ids=ids, logits_to_keep=tokens).logits.float().log_softmax(-1)
    return F.kl_div(own.flatten(0, 1), reference.flatten(0, 1), log_target=True, reduction="batchmean")


def memory_on_off(model: Any, cases: Sequence[Any]) -> dict[str, float]:
    """Teacher-forced pass-key accuracy with the memory as trained and with every gate closed."""
    inner = unwrap_peft(model)
    was_training = inner.training
    inner.eval()
    on = [found for found, _ in teacher_forced_scores(inner, cases)]
    with gates_closed(inner):
        off = [found for found, _ in teacher_forced_scores(inner, cases)]
    inner.train(was_training)
    return {"memory_on_accuracy": sum(on) / len(on), "memory_off_accuracy": sum(off) / len(off)}


class FinetuneSamples(torch.utils.data.Dataset):
    """Phase B's data: sample ``i`` is row ``i % samples_per_step`` of step ``i // samples_per_step``: a pass-key
    sequence at the curriculum's length for that step, and a stretch of plain text for the KL term, drawn by (seed,
    step, row) only."""

    def __init__(self, tokenizer: Any, corpus_ids: Sequence[int], settings: FinetuneSettings, min_distance: int,
                 samples_per_step: int):
        self.tokenizer, self.corpus_ids, self.settings = tokenizer, corpus_ids, settings
        self.min_distance, self.samples_per_step = min_distance, samples_per_step

    def __len__(self) -> int:
        return self.settings.steps * self.samples_per_step

    def __getitem__(self, index: int) -> dict[str, Any]:
        step, row = divmod(index, self.samples_per_step)
        rng = random.Random(f"finetune-{self.settings.seed}-{step}-{row}")
        ids, answer = passkey_sample(self.tokenizer, seq_len_at(step, self.settings), self.min_distance, rng)
        text = text_sample(self.corpus_ids, self.settings.kl_seq_len, rng) if self.corpus_ids else []
        return {"input_ids": ids, "answer_length": answer, "text_ids": text}


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """A step's rows (one length): ids (B, T), answer lengths (B,), and the first row's text (1, L) for the KL."""
    return {"input_ids": torch.tensor([s["input_ids"] for s in samples]),
            "answer_lengths": torch.tensor([s["answer_length"] for s in samples]),
            "text_ids": torch.tensor([samples[0]["text_ids"]], dtype=torch.long)}


def make_finetune_recipe(base: Any, peft_model: Any, tokenizer: Any, corpus_ids: Sequence[int],
                         settings: FinetuneSettings, samples_per_step: int | None = None) -> Recipe:
    """Phase B as a recipe for ``peft_model`` (from :func:`add_lora`): the answer loss plus ``kl_weight`` × the KL to
    the frozen ``base`` (both logged), memory-on vs gates-closed accuracy every ``eval_steps``, the time budget."""
    config = peft_model.get_base_model().config
    if config.sliding_window is None or not config.memory_layers:
        raise ValueError("phase B needs a converted model with a sliding window and memory layers")
    eval_cases = passkey_cases(tokenizer, settings.eval_length, settings.eval_cases, seed=settings.seed + 1,
                               depths=depths_beyond_window(settings.eval_length, config.sliding_window,
                                                           config.chunk_size))
    teacher = base.eval()

    def loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        task = answer_loss(model, batch["input_ids"], batch["answer_lengths"])
        logs = {"answer_loss": float(task.detach()), "seq_len": batch["input_ids"].shape[1]}
        if settings.kl_weight == 0 or not batch["text_ids"].numel():
            return task, logs
        kl = kl_to_base(model, teacher, batch["text_ids"], settings.kl_tokens)
        return task + settings.kl_weight * kl, {**logs, "kl": float(kl.detach())}

    data = FinetuneSamples(tokenizer, corpus_ids, settings, config.sliding_window + config.chunk_size,
                           samples_per_step or settings.batch_size)
    return Recipe(peft_model, data, loss, collate, gate_lr_multiplier=settings.gate_learning_rate / settings.learning_rate,
                  sequential=True, trainable_only=True, evaluate=lambda model: memory_on_off(model, eval_cases),
                  eval_steps=settings.eval_steps, time_budget_s=settings.time_budget_s,
                  lr_lambda=functools.partial(lr_factor, settings=settings))


def finetune_arguments(settings: FinetuneSettings, out_dir: str | Path) -> Any:
    """Trainer's arguments for a phase-B-shaped run of ``settings`` (the text-memory recipe's too) in ``out_dir``."""
    return training_arguments(
        Path(out_dir), max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, warmup_steps=settings.warmup_steps, max_grad_norm=settings.max_grad_norm,
        save_steps=settings.save_steps, logging_steps=settings.log_steps, seed=settings.seed, data_seed=settings.seed,
        bf16=torch.cuda.is_available(), **FINETUNE_ARGUMENTS)


def run_finetune(base: Any, peft_model: Any, tokenizer: Any, corpus_ids: Sequence[int], settings: FinetuneSettings,
                 out_dir: str | Path, drive_dir: Path | None = None) -> dict[str, Any]:
    """Train ``peft_model`` (from :func:`add_lora`) for ``settings.steps`` steps through the loop, resuming from the
    newest checkpoint in ``out_dir``; writes ``checkpoint-N/`` and ``metrics.jsonl`` (loss, answer loss, KL, gates,
    sequence length, memory-on / gates-closed accuracy at each evaluation) there."""
    done = fit(make_finetune_recipe(base, peft_model, tokenizer, corpus_ids, settings),
               finetune_arguments(settings, out_dir), drive_dir)
    return {"steps": done["global_step"], "seconds": done["train_runtime"],
            "stopped_early": done["global_step"] < settings.steps}


def settings_from_config(cfg: Any) -> FinetuneSettings:
    """Phase B settings from a ConfigManager's ``training`` section (``recipe: finetune``); a curriculum entry that
    is not ``[fraction in 0..1, length > window + chunk]`` in increasing order raises naming the key."""
    t, m = cfg.training, cfg.model
    stages = []
    for entry in t.finetune_curriculum:
        if (not isinstance(entry, (list, tuple)) or len(entry) != 2 or not 0 <= float(entry[0]) <= 1
                or int(entry[1]) <= m.sliding_window + m.chunk_size):
            raise ValueError(f"training.finetune_curriculum: {entry!r} is not [fraction of the steps in 0..1, "
                             f"sequence length > sliding_window + chunk_size = {m.sliding_window + m.chunk_size}]")
        stages.append((float(entry[0]), int(entry[1])))
    if not stages or stages[0][0] != 0 or [s[0] for s in stages] != sorted(s[0] for s in stages):
        raise ValueError(f"training.finetune_curriculum must start at fraction 0 and increase, got {t.finetune_curriculum}")
    return FinetuneSettings(
        steps=t.max_steps, batch_size=t.per_device_batch_size, curriculum=tuple(stages), lora_rank=t.finetune_lora_rank,
        lora_alpha=2.0 * t.finetune_lora_rank, learning_rate=t.learning_rate,
        gate_learning_rate=t.learning_rate * t.gate_lr_multiplier, warmup_steps=t.warmup_steps,
        kl_weight=t.finetune_kl_weight, max_grad_norm=t.max_grad_norm, save_steps=t.save_steps,
        log_steps=t.logging_steps, eval_steps=t.finetune_eval_steps, eval_length=stages[-1][1], seed=t.seed,
        time_budget_s=t.finetune_time_budget_s, schedule=t.finetune_schedule,
    )


def init_directory(init: str) -> Path:
    """``training.finetune_init`` as a directory: "shipped" (the package's trained memory), the name of a directory
    under ``senri/trained/``, or a path."""
    if init == "shipped":
        return SMOLLM2_WINDOW256
    if "/" not in init and (TRAINED_DIR / init).is_dir():
        return TRAINED_DIR / init
    return Path(init)


def init_overrides(init: str, config: Any) -> dict[str, Any]:
    """How ``config`` (the profile's SenriConfig) departs from the card of ``training.finetune_init`` ``init``: the
    settings that shape no parameter (``READ_SETTINGS``, e.g. ``memory_update``) are returned, to load the memory with;
    any other difference raises, naming the setting and both values."""
    card = read_card(init_directory(init))["settings"]
    differ = {k: getattr(config, k) for k in CARD_SETTINGS if card.get(k) != getattr(config, k)}
    fixed = [f"{k}: {card.get(k)!r} there, {v!r} here" for k, v in differ.items() if k not in READ_SETTINGS]
    if fixed:
        raise ValueError(f"training.finetune_init {init!r} was trained with other Senri settings: {'; '.join(fixed)} "
                         f"(only {', '.join(READ_SETTINGS)} may differ from its card)")
    return differ


def initial_model(cfg: Any, base: Any) -> SenriForCausalLM:
    """Phase B's starting point: ``training.finetune_init`` (a trained memory directory, e.g. phase A's
    ``trained_memory``; "shipped" for the package's), loaded with the profile's settings (which may differ from its
    card only in :data:`READ_SETTINGS`), or the plain conversion."""
    init, kwargs = cfg.training.finetune_init, cfg.senri_config_kwargs()
    if init is None:
        return convert_llama_to_senri(base, **kwargs)
    overrides = init_overrides(init, senri_config_from(base.config, **kwargs))
    return load_trained_memory(base, init_directory(init), overrides=overrides)


def finetune_recipe(cfg: Any) -> Recipe:
    """Phase B for ``cfg`` (``training.recipe: finetune``) from ``training.finetune_init``; when the run ends it writes
    ``trained_memory/`` (memory parameters and LoRA) and ``final/`` (LoRA merged)."""
    settings = settings_from_config(cfg)
    base, tokenizer = load_base_model(cfg.model.base_model)
    base = base.to("cuda" if torch.cuda.is_available() else "cpu")
    init = cfg.training.finetune_init
    init_card = None if init is None else read_card(init_directory(init))
    peft_model = add_lora(initial_model(cfg, base), settings)
    t = cfg.training
    recipe = make_finetune_recipe(base, peft_model, tokenizer, text_corpus_ids(tokenizer, local_text_corpus()),
                                  settings, t.per_device_batch_size * t.gradient_accumulation_steps)
    card = {"recipe": {"name": "phase B: end-to-end fine-tuning through the memory (senri.training.finetune)",
                       "settings": asdict(settings), "init": init_card}}
    recipe.finish = finish_with_last_evaluation(recipe_finish(peft_model, base, tokenizer, cfg.model.base_model, card),
                                                "memory_on_accuracy", settings)
    return recipe


def finish_with_last_evaluation(finish: Any, marker: str, settings: FinetuneSettings) -> Any:
    """``finish`` (run_dir, summary) that first puts the run's last evaluation (the last ``metrics.jsonl`` record
    holding ``marker``) into the summary as ``last_eval``, and the steps trained at each curriculum stage as
    ``curriculum`` (:func:`curriculum_trained`)."""
    def finish_with_evaluation(run_dir: Path, summary: dict[str, Any]) -> None:
        evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if marker in r]
        summary["last_eval"] = evals[-1] if evals else None
        summary["curriculum"] = curriculum_trained(settings, int(summary["global_step"]))
        finish(run_dir, summary)

    return finish_with_evaluation


__all__ = ["FinetuneSettings", "LORA_TARGETS", "FINETUNE_ARGUMENTS", "SCHEDULES", "MIN_LR_RATE", "stages",
           "stage_bounds", "curriculum_trained", "warmup_cosine", "lr_factor", "seq_len_at", "passkey_sample", "add_lora",
           "answer_loss", "kl_to_base", "memory_on_off", "FinetuneSamples", "collate", "make_finetune_recipe",
           "finetune_arguments", "run_finetune", "settings_from_config", "init_directory", "init_overrides",
           "initial_model", "finetune_recipe", "finish_with_last_evaluation"]
