"""Phase A of the real-model memory recipe: layer-local attention transfer (as in LoLCATs).

The frozen base model with full attention is the teacher. At every memory layer the student layer (window + sinks +
memory, gated) is fed the *teacher's* input to that layer and trained to reproduce the teacher's full-attention
output (before ``o_proj``), weighted per head and position by the attention mass the teacher puts on keys the
student's window no longer holds: that is exactly what the memory must supply. Only memory-specific parameters
train (the gates and the ``memory_qk_map`` maps), and each layer learns alone, so a step costs one teacher forward
plus one attention layer per memory layer: cheap enough for a CPU.

The loop is the one every recipe runs (:mod:`senri.training.loop`): checkpoints hold the trainable parameters, and
a restart continues from the last one with the same data (a case depends only on its index).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..evaluation.diagnostics import passkey_cases
from ..model.cache import LayerState
from ..model.conversion import convert_llama_to_senri, load_base_model
from ..model.modeling_senri import SenriForCausalLM, window_start_of
from ..model.trained import TRANSFER_PARAMETER_SUFFIXES, save_trained_memory
from .loop import Recipe, fit, training_arguments

# Trainer's arguments of phase A beside the configuration's: Adam at constant learning rates, no clipping.
TRANSFER_ARGUMENTS = {"lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 0.0}


@dataclass
class TransferSettings:
    """Phase A settings (``config/training.yaml``, ``transfer_*`` keys of a profile map onto these)."""

    steps: int = 300
    seq_len: int = 1024
    learning_rate: float = 1e-2
    gate_learning_rate: float = 2e-2
    passkey_share: float = 0.5          # share of training sequences that are pass-key prompts (the rest: text)
    needle_depths: tuple[float, float] = (0.02, 0.7)
    base_weight: float = 0.01           # loss weight of every position besides its far-attention mass
    memory_weight: float = 1.0          # weight of the memory-fidelity term (memory read vs far-only attention)
    save_steps: int = 25
    log_steps: int = 5
    seed: int = 1234                    # data seed: evaluation cases use other seeds


def transfer_parameters(model: SenriForCausalLM) -> dict[str, torch.nn.Parameter]:
    """The parameters phase A trains (gates and memory q/k maps), by name; everything else is frozen."""
    return {name: p for name, p in model.named_parameters() if name.endswith(TRANSFER_PARAMETER_SUFFIXES)}


def text_corpus_ids(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """All ``texts`` tokenised and joined (separated by a blank line)."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer("\n\n" + text, add_special_tokens=False)["input_ids"])
    return ids


def training_sequence(index: int, tokenizer: Any, corpus_ids: Sequence[int], settings: TransferSettings) -> list[int]:
    """Sequence ``index`` of the phase-A data: a pass-key prompt or a stretch of natural text, chosen and drawn by
    (seed, index) only, so a resumed run sees the same data."""
    rng = random.Random(f"transfer-{settings.seed}-{index}")
    if not corpus_ids or rng.random() < settings.passkey_share:
        case = passkey_cases(tokenizer, settings.seq_len, 1, seed=settings.seed * 100003 + index,
                             depths=settings.needle_depths)[0]
        return case.ids[: settings.seq_len]
    return text_sample(corpus_ids, settings.seq_len, rng)


def text_sample(corpus_ids: Sequence[int], length: int, rng: random.Random) -> list[int]:
    """A stretch of ``length`` tokens of ``corpus_ids`` starting where ``rng`` says."""
    start = rng.randrange(max(1, len(corpus_ids) - length))
    return list(corpus_ids[start : start + length])


class _Done(Exception):
    """Stops the teacher's forward once the last memory layer's attention output is captured."""


@torch.no_grad()
def teacher_targets(
    teacher: Any, ids: torch.Tensor, layers: Sequence[int], sliding_window: int, chunk_size: int, num_sink_tokens: int,
) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per memory layer: (the teacher's input to the attention (B, T, hidden), its attention output before o_proj
    (B, T, Hq, D), the far-attention mass (B, T, Hq): softmax weight on keys outside the student's window and sinks,
    the far-only attention output (B, T, Hq, D): the teacher's attention renormalised over those keys, i.e. what a
    perfect memory read would return).
    """
    captured: dict[int, dict[str, Any]] = {layer: {} for layer in layers}
    handles = []
    for layer in layers:
        attn = teacher.model.layers[layer].self_attn

        def on_input(module, args, kwargs, layer=layer):
            captured[layer]["hidden"] = kwargs.get("hidden_states", args[0] if args else None)
            captured[layer]["rope"] = kwargs["position_embeddings"]

        def on_output(module, args, layer=layer):
            captured[layer]["output"] = args[0]
            if layer == max(layers):
                raise _Done  # the layers above the last memory layer are not needed

        handles.append(attn.register_forward_pre_hook(on_input, with_kwargs=True))
        handles.append(attn.o_proj.register_forward_pre_hook(on_output))
    try:
        teacher(input_ids=ids, logits_to_keep=1)
    except _Done:
        pass
    finally:
        for handle in handles:
            handle.remove()
    T = ids.shape[1]
    positions = torch.arange(T, device=ids.device)
    # Keys the student's local attention cannot see: not a sink, before the query's block-sliding window.
    far = (positions[None] < window_start_of(positions, chunk_size, sliding_window // chunk_size)[:, None]) & (
        positions[None] >= num_sink_tokens
    )  # (T, T)
    targets = {}
    for layer in layers:
        attn, c = teacher.model.layers[layer].self_attn, captured[layer]
        hidden, (cos, sin) = c["hidden"], c["rope"]
        B, D = hidden.shape[0], attn.head_dim
        q = attn.q_proj(hidden).view(B, T, -1, D).transpose(1, 2)
        k = attn.k_proj(hidden).view(B, T, -1, D).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = (q @ k.transpose(-1, -2)) * D**-0.5
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=ids.device).triu(1), float("-inf"))
        far_probs = scores.softmax(-1) * far  # (B, Hq, T, T)
        mass = far_probs.sum(-1)  # (B, Hq, T)
        v = attn.v_proj(hidden).view(B, T, -1, D).transpose(1, 2)  # (B, H, T, D)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        far_output = (far_probs @ v) / mass.clamp_min(1e-6)[..., None]  # (B, Hq, T, D)
        targets[layer] = (hidden, c["output"].view(B, T, -1, D), mass.transpose(1, 2), far_output.transpose(1, 2))
    return targets


def student_layer_output(model: SenriForCausalLM, layer: int, hidden: torch.Tensor,
                         gate: float | None = None) -> torch.Tensor:
    """Student layer ``layer``'s attention output before o_proj (B, T, Hq, D) on ``hidden``, from an empty state;
    with ``gate``, computed as if every memory gate of the layer were ``gate`` (the parameter is left untouched)."""
    from torch.func import functional_call

    attn = model.model.layers[layer].self_attn
    T = hidden.shape[1]
    cos, sin = model.model.rotary_emb(hidden, torch.arange(T, device=hidden.device)[None])
    captured = {}
    handle = attn.o_proj.register_forward_pre_hook(lambda module, args: captured.setdefault("out", args[0]))
    args = (hidden, (cos, sin, 0, model.model.sink_tables(hidden, 0, T, None)), LayerState())
    try:
        if gate is None:
            attn(*args)
        else:
            functional_call(attn, {"memory_gate": torch.full_like(attn.memory_gate, gate)}, args)
    finally:
        handle.remove()
    return captured["out"].view(hidden.shape[0], T, -1, attn.head_dim)


def student_paths(model: SenriForCausalLM, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(local, memory): the student layer's window-only output (no gradient: nothing in it trains) and its memory
    read (B, T, Hq, D), computed with the gate set to 0 and to 1."""
    with torch.no_grad():
        local = student_layer_output(model, layer, hidden, gate=0.0)
    return local, student_layer_output(model, layer, hidden, gate=1.0)


def transfer_loss(
    local: torch.Tensor, memory: torch.Tensor, gate: torch.Tensor, target: torch.Tensor, mass: torch.Tensor,
    far_output: torch.Tensor, base_weight: float, memory_weight: float,
) -> torch.Tensor:
    """Output term Σ w ‖local + g (memory − local) − target‖² / Σ w, w = far mass + base_weight (trains the gates
    g (Hq,) and the maps), plus ``memory_weight`` × the memory-fidelity term Σ m ‖memory − far_output‖² / Σ m,
    m = far mass: the memory read learns to be the teacher's far-only attention whatever the gate is (a closed gate
    would otherwise starve the maps of gradient)."""
    from ..model.modeling_senri import gate_clamp

    weight = mass + base_weight
    output = local + gate_clamp(gate)[:, None] * (memory - local)
    output_term = (weight * (output.float() - target.float()).square().sum(-1)).sum() / weight.sum()
    fidelity = (mass * (memory.float() - far_output.float()).square().sum(-1)).sum() / mass.sum().clamp_min(1e-6)
    return output_term + memory_weight * fidelity


def build_student(base: Any, memory_layers: Sequence[int], **senri_settings: Any) -> SenriForCausalLM:
    """The converted model of phase A: memory on ``memory_layers`` with q/k maps, gates closed, sinks kept."""
    num_layers = base.config.num_hidden_layers
    layer_types = ["memory" if i in set(memory_layers) else "sliding_attention" for i in range(num_layers)]
    settings = {"memory_gate_init": 0.0, "memory_qk_map": True, **senri_settings}
    return convert_llama_to_senri(base, layer_types=layer_types, **settings)


class TransferSequences(torch.utils.data.Dataset):
    """Phase A's data: sample ``i`` is :func:`training_sequence` ``i`` ((T,) token ids), ``length`` of them."""

    def __init__(self, tokenizer: Any, corpus_ids: Sequence[int], settings: TransferSettings, length: int):
        self.tokenizer, self.corpus_ids, self.settings, self.length = tokenizer, corpus_ids, settings, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor(training_sequence(index, self.tokenizer, self.corpus_ids, self.settings))}


def make_transfer_recipe(base: Any, student: SenriForCausalLM, tokenizer: Any, corpus_ids: Sequence[int],
                         settings: TransferSettings, samples_per_step: int = 1) -> Recipe:
    """Phase A as a recipe: only ``student``'s transfer parameters train; each step's loss is the mean over memory
    layers of :func:`transfer_loss` against the frozen ``base``'s targets (logged per layer as ``layer_loss/L``)."""
    for p in student.parameters():
        p.requires_grad_(False)
    params = transfer_parameters(student)
    if not params:
        raise ValueError("the student has no transfer parameters: build it with memory layers and memory_qk_map=True")
    for p in params.values():
        p.requires_grad_(True)
    teacher, config = base.eval(), student.config

    def loss(model: SenriForCausalLM, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        targets = teacher_targets(teacher, batch["input_ids"], config.memory_layers, config.sliding_window,
                                  config.chunk_size, config.num_sink_tokens)
        losses = {}
        for layer, (hidden, target, mass, far_output) in targets.items():
            local, memory = student_paths(model, layer, hidden)
            losses[layer] = transfer_loss(local, memory, model.model.layers[layer].self_attn.memory_gate, target,
                                          mass, far_output, settings.base_weight, settings.memory_weight)
        return sum(losses.values()) / len(losses), {f"layer_loss/{k}": float(v.detach()) for k, v in losses.items()}

    data = TransferSequences(tokenizer, corpus_ids, settings, settings.steps * samples_per_step)
    return Recipe(student, data, loss, gate_lr_multiplier=settings.gate_learning_rate / settings.learning_rate,
                  sequential=True, trainable_only=True)


def run_transfer(base: Any, student: SenriForCausalLM, tokenizer: Any, corpus_ids: Sequence[int],
                 settings: TransferSettings, out_dir: str | Path, drive_dir: Path | None = None) -> dict[str, Any]:
    """Train ``student``'s transfer parameters for ``settings.steps`` steps (one sequence each) through the loop,
    resuming from the newest checkpoint in ``out_dir``; writes ``checkpoint-N/`` and ``metrics.jsonl`` there."""
    args = training_arguments(Path(out_dir), max_steps=settings.steps, per_device_train_batch_size=1,
                              learning_rate=settings.learning_rate, save_steps=settings.save_steps,
                              logging_steps=settings.log_steps, seed=settings.seed, data_seed=settings.seed,
                              **TRANSFER_ARGUMENTS)
    done = fit(make_transfer_recipe(base, student, tokenizer, corpus_ids, settings), args, drive_dir)
    return {"steps": done["global_step"], "seconds": done["train_runtime"]}


def local_text_corpus(max_files: int = 60) -> list[str]:
    """English prose that ships with every Python environment: the licence texts of the installed packages (used
    as the natural-text share of phase A; evaluation uses other text)."""
    import site
    import sysconfig

    roots = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    files = sorted({path for root in roots for path in Path(root).glob("*.dist-info/LICENSE*") if path.is_file()})
    return [path.read_text(encoding="utf-8", errors="ignore") for path in files[:max_files]]


def settings_from_config(cfg: Any) -> TransferSettings:
    """Phase A settings from a ConfigManager's ``training`` section (``recipe: transfer``)."""
    t = cfg.training
    return TransferSettings(
        steps=t.max_steps, seq_len=t.seq_len, learning_rate=t.learning_rate,
        gate_learning_rate=t.learning_rate * t.gate_lr_multiplier, passkey_share=t.transfer_passkey_share,
        base_weight=t.transfer_base_weight, save_steps=t.save_steps, log_steps=t.logging_steps, seed=t.seed,
    )


def recipe_finish(model: Any, base: Any, tokenizer: Any, base_model: str,
                  card: dict[str, Any]) -> Callable[[Path, dict[str, Any]], None]:
    """What a real-model recipe leaves besides the loop's results: ``trained_memory/`` (senri.model.trained format,
    its card ``card`` with the steps and the summary) and ``final/``, the whole converted model (LoRA merged)."""
    def finish(run_dir: Path, summary: dict[str, Any]) -> None:
        save_trained_memory(model, base, run_dir / "trained_memory", base_model,
                            {**card, "steps": summary["global_step"], "summary": summary})
        final = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        final.save_pretrained(run_dir / "final")
        tokenizer.save_pretrained(run_dir / "final")
    return finish


def transfer_recipe(cfg: Any) -> Recipe:
    """Phase A for ``cfg`` (``training.recipe: transfer``): the base model converted with the profile's Senri settings
    is the student, the base with full attention the teacher; the trained memory is written to
    ``{run_dir}/trained_memory`` when the run ends."""
    base, tokenizer = load_base_model(cfg.model.base_model)
    base = base.to("cuda" if torch.cuda.is_available() else "cpu")
    student = convert_llama_to_senri(base, **cfg.senri_config_kwargs())
    settings = settings_from_config(cfg)
    t = cfg.training
    recipe = make_transfer_recipe(base, student, tokenizer, text_corpus_ids(tokenizer, local_text_corpus()), settings,
                                  t.per_device_batch_size * t.gradient_accumulation_steps)
    recipe.finish = recipe_finish(student, base, tokenizer, cfg.model.base_model, {"recipe": asdict(settings)})
    return recipe


__all__ = [
    "TransferSettings", "TRANSFER_ARGUMENTS", "transfer_parameters", "text_corpus_ids", "training_sequence",
    "text_sample", "teacher_targets", "student_layer_output", "transfer_loss", "build_student", "TransferSequences",
    "make_transfer_recipe", "run_transfer", "local_text_corpus", "settings_from_config", "recipe_finish",
    "transfer_recipe",
]
