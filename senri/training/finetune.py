"""Phase B of the real-model memory recipe: end-to-end fine-tuning through the memory.

Phase A (:mod:`senri.transfer`) teaches each memory layer alone to imitate the teacher's far attention. Phase B
trains the whole converted model on the task itself: the loss is the cross-entropy of the pass key's answer tokens
only (``logits_to_keep``: the 49K-vocabulary head runs on a handful of positions), gradients flow through every
memory write, and a KL term to the frozen base model on plain text keeps it a language model. What trains: LoRA
adapters (through ``peft``) on q/k/v/o of the layers from the first memory layer on, plus phase A's parameters
(memory q/k maps, and the gates at their own learning rate). A curriculum on needle distance starts with needles one
or two windows back (short sequences) and ends with many windows back.

Training is resumable exactly like phase A: trainable parameters, optimizer, scheduler and step are saved atomically
every ``save_steps``; a sample depends only on (seed, step, row), so a restart sees the same data.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..evaluation.diagnostics import filler_sentences, passkey_cases, teacher_forced_scores
from ..model.io import atomic_write
from ..model.modeling_senri import SenriForCausalLM
from ..tasks.niah import make_needle
from ..evaluation.real_model import depths_beyond_window, gates_closed
from ..model.trained import TRANSFER_PARAMETER_SUFFIXES
from .transfer import _jsonable, resume, text_sample

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Settings a resumed run may change: how often it saves, logs and evaluates, and how long it may run.
CONTINUATION_SETTINGS = ("save_steps", "log_steps", "eval_steps", "time_budget_s")


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


def seq_len_at(step: int, settings: FinetuneSettings) -> int:
    """The curriculum's sequence length at ``step``."""
    length = settings.curriculum[0][1]
    for start, stage_length in settings.curriculum:
        if step >= start * settings.steps:
            length = stage_length
    return length


def passkey_sample(tokenizer: Any, length: int, min_distance: int, rng: random.Random) -> tuple[list[int], int]:
    """A pass-key training sequence of exactly ``length`` tokens (prompt then answer) and its answer's length.

    The filler is a stretch of the classic filler's endless repetition (starting anywhere, as a window into a long
    document); the needle's last token lies at least ``min_distance`` tokens before the question, at a distance
    drawn uniformly up to as far as the sequence allows."""
    encode = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    needle = make_needle("passkey", rng)
    needle_ids, question_ids, answer_ids = (encode(" " + needle.needle_texts[0]), encode(" " + needle.question),
                                            encode(needle.answer))
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


def answer_loss(model: Any, ids: torch.Tensor, answer_lengths: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each row's answer, its last ``answer_lengths[b]`` tokens of ``ids`` (B, T), given
    everything before them; the vocabulary head runs on the last ``max(answer_lengths)`` positions only."""
    keep = int(answer_lengths.max())
    logits = model(input_ids=ids[:, :-1], logits_to_keep=keep).logits.float()
    labels = ids[:, -keep:].clone()
    labels[torch.arange(keep, device=ids.device)[None] < keep - answer_lengths[:, None]] = -100
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def kl_to_base(model: Any, base: Any, ids: torch.Tensor, tokens: int) -> torch.Tensor:
    """KL(base || model) per token over the last ``tokens`` positions of plain text ``ids`` (the base with full
    attention is the reference: the fine-tune must stay the language model it was)."""
    with torch.no_grad():
        reference = base(input_ids=ids, logits_to_keep=tokens).logits.float().log_softmax(-1)
    own = model(input_ids=ids, logits_to_keep=tokens).logits.float().log_softmax(-1)
    return F.kl_div(own.flatten(0, 1), reference.flatten(0, 1), log_target=True, reduction="batchmean")


def memory_on_off(model: Any, cases: Sequence[Any]) -> dict[str, float]:
    """Teacher-forced pass-key accuracy with the memory as trained and with every gate closed."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    was_training = inner.training
    inner.eval()
    on = [found for found, _ in teacher_forced_scores(inner, cases)]
    with gates_closed(inner):
        off = [found for found, _ in teacher_forced_scores(inner, cases)]
    inner.train(was_training)
    return {"memory_on_accuracy": sum(on) / len(on), "memory_off_accuracy": sum(off) / len(off)}


def _schedule(settings: FinetuneSettings) -> Callable[[int], float]:
    def factor(step: int) -> float:  # linear warm-up, cosine decay to 10 %
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def run_finetune(
    base: Any, peft_model: Any, tokenizer: Any, corpus_ids: Sequence[int], settings: FinetuneSettings,
    out_dir: str | Path, progress: Callable[[dict[str, Any]], None] | None = None,
    on_save: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Train ``peft_model`` (from :func:`add_lora`) for ``settings.steps`` steps, resuming from ``out_dir``.

    Writes ``finetune_state.pt`` (trainable parameters, optimizer, scheduler, step) and ``metrics.jsonl`` (loss,
    answer loss, KL, gate means, sequence length, memory-on / gates-closed accuracy at each evaluation)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inner = peft_model.get_base_model()
    config = inner.config
    window = config.sliding_window
    if window is None or not config.memory_layers:
        raise ValueError("phase B needs a converted model with a sliding window and memory layers")
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    gates = [p for n, p in params.items() if n.endswith("memory_gate")]
    others = [p for n, p in params.items() if not n.endswith("memory_gate")]
    optimizer = torch.optim.AdamW([{"params": others, "lr": settings.learning_rate, "weight_decay": 0.0},
                                   {"params": gates, "lr": settings.gate_learning_rate, "weight_decay": 0.0}])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings))
    state_path, metrics_path = out_dir / "finetune_state.pt", out_dir / "metrics.jsonl"
    step = resume(state_path, metrics_path, settings, CONTINUATION_SETTINGS, "fine-tuning", params, optimizer, scheduler)
    device = next(peft_model.parameters()).device
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    min_distance = window + config.chunk_size
    eval_cases = passkey_cases(tokenizer, settings.eval_length, settings.eval_cases, seed=settings.seed + 1,
                               depths=depths_beyond_window(settings.eval_length, window, config.chunk_size))
    base = base.eval()
    peft_model.train()
    began = time.perf_counter()

    def save() -> None:
        state = {"parameters": {n: p.detach().clone() for n, p in params.items()}, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "step": step, "settings": _jsonable(asdict(settings))}
        with atomic_write(state_path, "wb") as f:
            torch.save(state, f)
        if on_save:
            on_save(state_path)

    stopped_early = False
    while step < settings.steps:
        rng = random.Random(f"finetune-{settings.seed}-{step}")
        length = seq_len_at(step, settings)
        samples = [passkey_sample(tokenizer, length, min_distance, rng) for _ in range(settings.batch_size)]
        ids = torch.tensor([sample for sample, _ in samples], device=device)
        answer_lengths = torch.tensor([n for _, n in samples], device=device)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            task = answer_loss(peft_model, ids, answer_lengths)
            loss = task
            kl = None
            if settings.kl_weight > 0 and corpus_ids:
                text = torch.tensor([text_sample(corpus_ids, settings.kl_seq_len, rng)], device=device)
                kl = kl_to_base(peft_model, base, text, settings.kl_tokens)
                loss = task + settings.kl_weight * kl
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step += 1
        record: dict[str, Any] | None = None
        evaluate = step % settings.eval_steps == 0 or step == settings.steps
        if step % settings.log_steps == 0 or evaluate:  # every record has the losses (02 reads them)
            gate_means = {layer: float(inner.model.layers[layer].self_attn.memory_gate.detach().clamp(0, 1).mean())
                          for layer in config.memory_layers}
            record = {"step": step, "loss": float(loss.detach()), "answer_loss": float(task.detach()),
                      "kl": None if kl is None else float(kl.detach()), "grad_norm": float(grad_norm),
                      "seq_len": length, "seconds": time.perf_counter() - began,
                      **{f"gate/{layer}/mean": value for layer, value in gate_means.items()}}
        if evaluate:
            record.update(memory_on_off(peft_model, eval_cases))
        if record is not None:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if progress:
                progress(record)
        over_budget = settings.time_budget_s is not None and time.perf_counter() - began > settings.time_budget_s
        if step % settings.save_steps == 0 or step == settings.steps or over_budget:
            save()
        if over_budget:
            stopped_early = step < settings.steps
            break
    peft_model.eval()
    return {"steps": step, "seconds": time.perf_counter() - began, "stopped_early": stopped_early}


def load_finetune_state(peft_model: Any, state_path: str | Path) -> int:
    """Load a ``finetune_state.pt``'s trained parameters into ``peft_model`` (same LoRA layout); returns its step."""
    saved = torch.load(state_path, weights_only=True)
    own = dict(peft_model.named_parameters())
    missing = [name for name in saved["parameters"] if name not in own]
    if missing:
        raise ValueError(f"{state_path} does not fit this model: {missing[:4]} are not its parameters")
    with torch.no_grad():
        for name, value in saved["parameters"].items():
            own[name].copy_(value)
    return saved["step"]


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
        time_budget_s=t.finetune_time_budget_s,
    )


def init_directory(init: str) -> Path:
    """``training.finetune_init`` as a directory: "shipped" (the package's trained memory), the name of a directory
    under ``senri/trained/``, or a path."""
    from ..model.trained import SMOLLM2_WINDOW256, TRAINED_DIR

    if init == "shipped":
        return SMOLLM2_WINDOW256
    if "/" not in init and (TRAINED_DIR / init).is_dir():
        return TRAINED_DIR / init
    return Path(init)


def initial_model(cfg: Any, base: Any) -> SenriForCausalLM:
    """Phase B's starting point: ``training.finetune_init`` (a trained memory directory, e.g. phase A's
    ``trained_memory``; "shipped" for the package's) whose settings must be the profile's, or the plain conversion."""
    from ..model.conversion import convert_llama_to_senri
    from ..model.trained import CARD_SETTINGS, load_trained_memory, read_card

    init = cfg.training.finetune_init
    fresh = convert_llama_to_senri(base, **cfg.senri_config_kwargs())
    if init is None:
        return fresh
    directory = init_directory(init)
    card = read_card(directory)
    differ = [f"{k}: {card['settings'][k]!r} there, {getattr(fresh.config, k)!r} here" for k in CARD_SETTINGS
              if card["settings"].get(k) != getattr(fresh.config, k)]
    if differ:
        raise ValueError(f"training.finetune_init {init!r} was trained with other Senri settings: {'; '.join(differ)}")
    return load_trained_memory(base, directory)


def train_finetune(cfg: Any) -> dict[str, Any]:
    """Run phase B for ``cfg`` (``training.recipe: finetune``), resumable and mirrored to Drive like phase A; writes
    ``metrics.jsonl``, ``finetune_state.pt``, ``trained_memory/`` (memory parameters and LoRA), ``final/`` (LoRA
    merged) and ``train_summary.json`` in the run directory."""
    from ..model.conversion import load_base_model
    from .transfer import drive_mirror, finish_recipe_run, local_text_corpus, read_metrics, text_corpus_ids

    run_dir = Path(cfg.experiment.run_dir)
    settings = settings_from_config(cfg)
    drive_dir, mirror = drive_mirror(cfg, run_dir, "finetune_state.pt")
    base, tokenizer = load_base_model(cfg.model.base_model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = base.to(device)
    init_card = None
    if cfg.training.finetune_init is not None:
        from ..model.trained import read_card

        init_card = read_card(init_directory(cfg.training.finetune_init))
    peft_model = add_lora(initial_model(cfg, base).to(device), settings)
    corpus = text_corpus_ids(tokenizer, local_text_corpus())
    result = run_finetune(base, peft_model, tokenizer, corpus, settings, run_dir, on_save=mirror)
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if "memory_on_accuracy" in r]
    inner = peft_model.get_base_model()
    summary = {"recipe": "finetune", "global_step": result["steps"], "max_steps": settings.steps,
               "stopped_early": result["stopped_early"],
               "final_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None),
               "train_runtime": result["seconds"], "last_eval": evals[-1] if evals else None,
               "gates": {str(k): [round(float(x), 4) for x in v] for k, v in inner.memory_gate_values().items()}}
    card = {"recipe": {"name": "phase B: end-to-end fine-tuning through the memory (senri.finetune)",
                       "settings": asdict(settings), "init": init_card}, "steps": result["steps"], "summary": summary}
    return finish_recipe_run(cfg, peft_model, base, tokenizer, summary, card, drive_dir)


__all__ = ["FinetuneSettings", "LORA_TARGETS", "seq_len_at", "passkey_sample", "text_sample", "add_lora",
           "answer_loss", "kl_to_base", "memory_on_off", "run_finetune", "load_finetune_state",
           "settings_from_config", "initial_model", "train_finetune"]
