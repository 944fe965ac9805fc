"""The text-memory recipe: teach the memory to remember *text*, not one format.

Phase B taught the memory the classic pass key in its repeated filler. This recipe goes on from there (by default
from the shipped phase-B memory, its LoRA adapters trained further rather than merged) with three signals per step,
all on the training half of the prose corpus (:mod:`senri.tasks.corpus`):

* **recall in natural haystacks** — facts of several kinds stated once in real sentences and asked back in other
  words at the end (:mod:`senri.tasks.facts`, training templates and entities only), with distractor facts; the
  target is the value, a full stop and the end token, so an answer ends. A share ``passkey_share`` of the recall
  rows is the classic pass key, so that skill is kept;
* **distillation beyond the window** — on a stretch of a training document, KL(base ‖ Senri) at every position past
  the first window, from the frozen base with full attention (the teacher's top ``distill_top_k`` probabilities and
  the rest's total mass), weighted toward the positions where the full context helps: the weight of a position is
  ``distill_floor`` plus how much lower the teacher's loss is than that of the same base restricted to its window
  (gates closed). Every such token is a training signal, not only an answer's few;
* a curriculum of sequence lengths, as phase B's (``curriculum``). Rows longer than ``segment`` tokens are read in
  segments with the memory state carried across them and backpropagated one segment at a time
  (:mod:`senri.training.streamed`; ``backprop``: through the borders exactly, or truncated at them), so a row of
  many thousand tokens fits the machine.

Teacher outputs are cached on disk by the text's content (``teacher_cache``), so a resumed run or another seed
over the same stretches does not run the teacher again. The loop is the one every recipe runs
(:mod:`senri.training.loop`); a sample depends only on (seed, step, row), so a restart sees the same data.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..evaluation.diagnostics import passkey_cases, teacher_forced_scores
from ..evaluation.real_model import depths_beyond_window, gates_closed
from ..model.conversion import convert_llama_to_senri, load_base_model, senri_config_from
from ..model.io import atomic_write
from ..model.modeling_senri import unwrap_peft
from ..model.trained import TRANSFER_PARAMETER_SUFFIXES, load_trained_memory, read_card
from ..tasks.corpus import OFFLINE_SOURCES, Document, iter_documents
from ..tasks.facts import KIND_NAMES, Haystack, fact_case, fact_cases
from .finetune import (
    FinetuneSettings, add_lora, answer_loss, finish_with_last_evaluation, init_directory, init_overrides, lr_factor,
    passkey_sample, seq_len_at,
)
from .finetune import settings_from_config as finetune_settings
from .loop import Recipe
from .readloss import NeedleRow, captured_projections, needle_read_loss
from .streamed import BACKPROP, DistillTargets, TokenTargets, streamed_loss
from .transfer import recipe_finish


@dataclass
class TextMemorySettings(FinetuneSettings):
    """Phase B's settings plus the text-memory ones (``config/training.yaml``: ``recipe: text`` and ``text_*``)."""

    sources: tuple[str, ...] = OFFLINE_SOURCES
    passkey_share: float = 0.25       # of the recall rows: the classic pass key
    distractors: int = 2              # at most this many other facts of the asked kind in a haystack
    distill_weight: float = 1.0
    distill_floor: float = 0.1        # nats: the weight every position beyond the window gets
    distill_top_k: int = 32
    teacher_cache: str | None = None  # a directory for the teacher's outputs (None: computed every time)
    kinds: tuple[str, ...] = field(default=KIND_NAMES)
    # Rows longer than this many tokens are read in segments with the memory carried across them
    # (senri.training.streamed): activations of one segment at a time; 0: every row at once.
    segment: int = 0
    backprop: str = "full"            # across segment borders: "full" (exact, by recomputation) or "truncated"
    # × the mean −log share of the memory read's weight on the fact's statement (senri.training.readloss), fact rows
    read_weight: float = 0.0
    max_streamed_documents: int = 200    # of a streamed source (pg19): books read for training
    eval_streamed_documents: int = 20    # and for the held-out evaluation


# --- the teacher -----------------------------------------------------------------------------------------------
class Teacher:
    """The frozen base with full attention (the teacher) and the same base restricted to its window and sinks (what
    a memory-less Senri sees), giving per position beyond ``start``: the teacher's top-k log-probabilities and
    token ids, and the weight ``floor + max(0, loss_window − loss_full)``; cached by content when ``cache`` is set."""

    def __init__(self, base: Any, windowed: Any, top_k: int, floor: float, cache: str | Path | None = None):
        self.base, self.windowed, self.top_k, self.floor = base.eval(), windowed.eval(), top_k, floor
        self.cache = None if cache is None else Path(cache)

    def _key(self, ids: torch.Tensor, start: int) -> str:
        digest = hashlib.sha256(ids.cpu().numpy().tobytes() + f"|{start}|{self.top_k}|{self.floor}".encode())
        return digest.hexdigest()[:24]

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, start: int) -> dict[str, torch.Tensor]:
        """For ``ids`` (1, T): ``log_probs`` / ``indices`` (T − 1 − start, k) and ``weights`` (T − 1 − start,) of the
        predictions of tokens start + 1 … T − 1."""
        path = None if self.cache is None else self.cache / f"{self._key(ids, start)}.pt"
        if path is not None and path.exists():
            return torch.load(path, map_location=ids.device)
        keep = ids.shape[1] - 1 - start
        targets = ids[0, start + 1 :]
        full = self.base(input_ids=ids[:, :-1], logits_to_keep=keep).logits[0].float().log_softmax(-1)
        window = self.windowed(input_ids=ids[:, :-1], logits_to_keep=keep).logits[0].float().log_softmax(-1)
        gain = (full.gather(1, targets[:, None]) - window.gather(1, targets[:, None]))[:, 0]  # loss_window − loss_full
        top = full.topk(self.top_k, dim=-1)
        out = {"log_probs": top.values, "indices": top.indices, "weights": self.floor + gain.clamp(min=0)}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path, "wb") as f:
                torch.save({k: v.cpu() for k, v in out.items()}, f)
        return out


def top_k_kl(student_log_probs: torch.Tensor, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per position, KL(teacher ‖ student) over the teacher's top k tokens and one bucket for all the others.

    ``student_log_probs`` (N, V) full log-softmax; ``teacher`` as :class:`Teacher` returns. Exact when the teacher's
    mass outside its top k is zero; otherwise the others are compared as one outcome (a lower bound of the KL)."""
    p_log = teacher["log_probs"]
    q_log = student_log_probs.gather(1, teacher["indices"])
    p_rest = (1 - p_log.exp().sum(-1)).clamp(min=1e-12)
    q_rest = (1 - q_log.exp().sum(-1)).clamp(min=1e-12)
    return (p_log.exp() * (p_log - q_log)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())


def distillation_loss(model: Any, ids: torch.Tensor, start: int, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ_t w_t KL_t / Σ_t w_t over the positions beyond ``start`` of ``ids`` (1, T) (the teacher's weights)."""
    keep = ids.shape[1] - 1 - start
    own = model(input_ids=ids[:, :-1], logits_to_keep=keep).logits[0].float().log_softmax(-1)
    kl = top_k_kl(own, teacher)
    return (teacher["weights"] * kl).sum() / teacher["weights"].sum()


def windowed_base(base: Any, config: Any) -> Any:
    """``base`` converted with ``config``'s window, chunk and sinks and no memory anywhere: what Senri sees with every
    gate closed."""
    layers = ["sliding_attention"] * base.config.num_hidden_layers
    return convert_llama_to_senri(base, sliding_window=config.sliding_window, chunk_size=config.chunk_size,
                                  num_sink_tokens=config.num_sink_tokens, sink_max_distance=config.sink_max_distance,
                                  layer_types=layers).to(next(base.parameters()).device)


# --- data --------------------------------------------------------------------------------------------------------
def document_ids(tokenizer: Any, docs: Sequence[Document]) -> list[list[int]]:
    """Each document's tokens (documents shorter than nothing are dropped)."""
    return [ids for ids in (list(tokenizer(d.text, add_special_tokens=False, verbose=False)["input_ids"])
                            for d in docs) if ids]


def stretch(doc_ids: Sequence[Sequence[int]], length: int, rng: random.Random) -> list[int]:
    """``length`` consecutive tokens from one document long enough for it, starting anywhere in it."""
    long_enough = [d for d in doc_ids if len(d) >= length]
    if not long_enough:
        raise ValueError(f"no training document has {length} tokens; the longest has {max(map(len, doc_ids))}")
    doc = long_enough[rng.randrange(len(long_enough))]
    start = rng.randrange(len(doc) - length + 1)
    return list(doc[start : start + length])


# Tokens a fact row leaves for its answer, so that the whole row stays within the step's length: the value, a full
# stop and the end token; SmolLM2 writes a six-digit code as a space and six digits, 9 tokens in all.
ANSWER_ROOM = 10


class TextMemorySamples(torch.utils.data.Dataset):
    """Sample ``i`` is row ``i % rows`` of step ``i // rows``: a recall sequence (a fact in a training document's
    sentences, or the classic pass key) at the curriculum's length for that step, and a stretch of a training
    document of the same length for the distillation, drawn by (seed, step, row) only."""

    def __init__(self, tokenizer: Any, haystack: Haystack, doc_ids: Sequence[Sequence[int]],
                 settings: TextMemorySettings, min_distance: int, rows: int):
        self.tokenizer, self.haystack, self.doc_ids, self.settings = tokenizer, haystack, doc_ids, settings
        self.min_distance, self.rows = min_distance, rows

    def __len__(self) -> int:
        return self.settings.steps * self.rows

    def __getitem__(self, index: int) -> dict[str, Any]:
        step, row = divmod(index, self.rows)
        s = self.settings
        rng = random.Random(f"text-memory-{s.seed}-{step}-{row}")
        length = seq_len_at(step, s)
        if rng.random() < s.passkey_share:
            ids, answer = passkey_sample(self.tokenizer, length, self.min_distance, rng, end=True)
            kind = "passkey"
        else:
            case = fact_case(self.tokenizer, self.haystack, length - ANSWER_ROOM, rng, "train", s.kinds,
                             rng.randint(0, s.distractors), self.min_distance, end=True)
            ids, answer, kind = case.ids, len(case.ids) - case.answer_start, case.kind
        text = stretch(self.doc_ids, length, rng) if s.distill_weight else []
        needle = case.needle if kind != "passkey" else None
        return {"input_ids": ids, "answer_length": answer, "text_ids": text, "kind": kind, "needle": needle}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A step's rows, left-padded to one length (Senri's padding side; the answers all end their rows): ids and
    attention mask (B, T), answer lengths (B,), the first row's text (1, L), and ``needles``: a
    :class:`senri.training.readloss.NeedleRow` per row with a fact's statement (its real positions; the asking query is
    the one before the answer)."""
    width = max(len(s["input_ids"]) for s in samples)
    ids = [[0] * (width - len(s["input_ids"])) + s["input_ids"] for s in samples]
    mask = [[0] * (width - len(s["input_ids"])) + [1] * len(s["input_ids"]) for s in samples]
    needles = [NeedleRow(b, width - len(s["input_ids"]), len(s["input_ids"]) - s["answer_length"] - 1,
                         tuple(s["needle"])) for b, s in enumerate(samples) if s.get("needle") is not None]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
            "answer_lengths": torch.tensor([s["answer_length"] for s in samples]),
            "text_ids": torch.tensor([samples[0]["text_ids"]], dtype=torch.long), "needles": needles}


# --- evaluation during training ----------------------------------------------------------------------------------
def recall_on_off(model: Any, cases: dict[str, Sequence[Any]]) -> dict[str, float]:
    """Teacher-forced accuracy on each named case set, with the memory as trained and with its gates closed."""
    inner = unwrap_peft(model)
    was_training = inner.training
    inner.eval()
    out = {}
    for name, case_list in cases.items():
        out[f"{name}_on"] = sum(f for f, _ in teacher_forced_scores(inner, case_list)) / len(case_list)
        with gates_closed(inner):
            out[f"{name}_off"] = sum(f for f, _ in teacher_forced_scores(inner, case_list)) / len(case_list)
    inner.train(was_training)
    return out


# --- the recipe --------------------------------------------------------------------------------------------------
def trainable_model(base: Any, init: str | None, settings: TextMemorySettings,
                    senri_kwargs: dict[str, Any] | None = None) -> Any:
    """The peft model to train: ``init``'s memory with its own LoRA adapters unmerged (they go on training), or
    fresh adapters (:func:`senri.training.finetune.add_lora`) when ``init`` has none or is None. ``senri_kwargs``
    (the profile's Senri settings; None: ``init``'s own) convert the model; with ``init`` they may differ from its card
    only in settings that shape no parameter (e.g. ``memory_update``: the linear rule's memory trained on by the
    delta rule)."""
    if init is None:
        return add_lora(convert_llama_to_senri(base, **(senri_kwargs or {})), settings)
    overrides = {} if senri_kwargs is None else init_overrides(init, senri_config_from(base.config, **senri_kwargs))
    model = load_trained_memory(base, init_directory(init), merge_lora=False, overrides=overrides)
    if not hasattr(model, "peft_config"):
        return add_lora(model, settings)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.endswith(TRANSFER_PARAMETER_SUFFIXES))
    return model


def make_text_memory_recipe(base: Any, model: Any, tokenizer: Any, settings: TextMemorySettings,
                            rows: int | None = None) -> Recipe:
    """The recipe for ``model`` (from :func:`trainable_model`): recall loss + ``distill_weight`` × the weighted KL
    (both logged), held-out recall (facts in held-out documents with held-out wording and entities, and pass
    keys) with the memory on and its gates closed every ``eval_steps``, the time budget."""
    config = model.get_base_model().config
    if config.sliding_window is None or not config.memory_layers:
        raise ValueError("the text-memory recipe needs a converted model with a sliding window and memory layers")
    if settings.backprop not in BACKPROP:
        raise ValueError(f"backprop must be one of {', '.join(BACKPROP)}, got {settings.backprop!r}")
    if settings.read_weight and settings.segment:
        raise ValueError(f"text_read_weight ({settings.read_weight}) reads the memory's weights in one forward of the "
                         f"whole row: set text_segment to 0 (got {settings.segment})")
    window, chunk = config.sliding_window, config.chunk_size
    train_docs = list(iter_documents(settings.sources, "train", max_streamed=settings.max_streamed_documents))
    heldout_docs = list(iter_documents(settings.sources, "heldout", max_streamed=settings.eval_streamed_documents))
    depths = depths_beyond_window(settings.eval_length, window, chunk)
    eval_cases = {
        "fact": fact_cases(tokenizer, heldout_docs, settings.eval_length, settings.eval_cases, settings.seed + 1,
                           depths, kinds=settings.kinds),
        "passkey": passkey_cases(tokenizer, settings.eval_length, settings.eval_cases, seed=settings.seed + 1,
                                 depths=depths),
    }
    windowed = windowed_base(base, config)
    teacher = Teacher(base, windowed, settings.distill_top_k, settings.distill_floor, settings.teacher_cache)
    start = window + chunk  # positions beyond the first window: only there can the memory matter

    def segmented(ids: torch.Tensor) -> bool:
        return 0 < settings.segment < ids.shape[1] - 1

    def loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        ids, answers = batch["input_ids"], batch["answer_lengths"]
        mask = batch["attention_mask"] if bool((batch["attention_mask"] == 0).any()) else None
        read, share = None, None
        if segmented(ids):
            recall = streamed_loss(model, ids[:, :-1], TokenTargets.answers(ids, answers), settings.segment,
                                   settings.backprop, None if mask is None else mask[:, :-1])
        elif settings.read_weight and batch.get("needles"):
            with captured_projections(model) as captured:
                recall = answer_loss(model, ids, answers, mask)
            read, share = needle_read_loss(model, captured, batch["needles"])
        else:
            recall = answer_loss(model, ids, answers, mask)
        logs = {"recall_loss": float(recall.detach()), "seq_len": ids.shape[1]}
        total = recall
        if read is not None:
            logs.update(read_loss=float(read.detach()), read_share=share)
            total = recall + settings.read_weight * read
        text = batch["text_ids"]
        if settings.distill_weight == 0 or text.shape[1] <= start + 1:
            return total, logs
        targets = teacher(text, start)
        if segmented(text):
            distill = streamed_loss(model, text[:, :-1], DistillTargets(targets, start, top_k_kl), settings.segment,
                                    settings.backprop)
        else:
            distill = distillation_loss(model, text, start, targets)
        return total + settings.distill_weight * distill, {**logs, "distill": float(distill.detach())}

    haystack = Haystack(tokenizer, train_docs)
    data = TextMemorySamples(tokenizer, haystack, document_ids(tokenizer, train_docs), settings, start,
                             rows or settings.batch_size)
    return Recipe(model, data, loss, collate, gate_lr_multiplier=settings.gate_learning_rate / settings.learning_rate,
                  sequential=True, trainable_only=True, evaluate=lambda m: recall_on_off(m, eval_cases),
                  eval_steps=settings.eval_steps, time_budget_s=settings.time_budget_s,
                  lr_lambda=functools.partial(lr_factor, settings=settings))


def settings_from_config(cfg: Any) -> TextMemorySettings:
    """The text-memory settings from a ConfigManager (phase B's keys plus ``text_*``)."""
    t = cfg.training
    return TextMemorySettings(**asdict(finetune_settings(cfg)), sources=tuple(t.text_sources),
                              passkey_share=t.text_passkey_share, distractors=t.text_distractors,
                              distill_weight=t.text_distill_weight, distill_floor=t.text_distill_floor,
                              teacher_cache=t.text_teacher_cache, segment=t.text_segment, backprop=t.text_backprop,
                              read_weight=t.text_read_weight)


def text_memory_recipe(cfg: Any) -> Recipe:
    """The text-memory recipe for ``cfg`` (``training.recipe: text``) from ``training.finetune_init``; when the run
    ends it writes ``trained_memory/`` (memory parameters and LoRA) and ``final/`` (LoRA merged)."""
    settings = settings_from_config(cfg)
    base, tokenizer = load_base_model(cfg.model.base_model)
    base = base.to("cuda" if torch.cuda.is_available() else "cpu")
    init = cfg.training.finetune_init
    model = trainable_model(base, init, settings, cfg.senri_config_kwargs())
    t = cfg.training
    recipe = make_text_memory_recipe(base, model, tokenizer, settings,
                                     t.per_device_batch_size * t.gradient_accumulation_steps)
    card = {"recipe": {"name": "text memory: natural-text recall + weighted distillation (senri.training.textmemory)",
                       "settings": asdict(settings), "init": None if init is None else read_card(init_directory(init))}}
    recipe.finish = finish_with_last_evaluation(recipe_finish(model, base, tokenizer, cfg.model.base_model, card),
                                                "fact_on", settings)
    return recipe


__all__ = ["TextMemorySettings", "Teacher", "windowed_base", "top_k_kl", "distillation_loss", "document_ids", "stretch",
           "TextMemorySamples", "collate", "recall_on_off", "trainable_model", "make_text_memory_recipe",
           "settings_from_config", "text_memory_recipe"]
