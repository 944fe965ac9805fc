"""Shipped trained memories: only what training changed (gates, memory q/k maps, LoRA adapters), a few MB, plus a
JSON card.

An artifact directory holds ``memory_parameters.safetensors`` (and ``lora_parameters.safetensors`` after phase B,
with the LoRA settings in the card) and ``card.json``: the base checkpoint it was trained
on (name and a fingerprint of its weights), the Senri settings of the conversion, the recipe, the training steps,
the commit, and the measured numbers. :func:`load_trained_smollm2` rebuilds the model from the offline SmolLM2:
conversion with the card's settings, then the shipped parameters, checked name by name and shape by shape, then
the LoRA adapters (rebuilt with ``peft`` and merged into q/k/v/o, so the result is a plain SenriForCausalLM).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .conversion import convert_llama_to_senri, load_base_model
from .io import atomic_write
from .modeling_senri import SenriForCausalLM

# The parameters training changes in a converted model (phase A: gates and memory q/k maps; phase B adds LoRA).
TRANSFER_PARAMETER_SUFFIXES = ("memory_gate", "memory_query_map", "memory_key_map")
TRAINED_DIR = Path(__file__).resolve().parent.parent / "trained"
SMOLLM2_WINDOW256 = TRAINED_DIR / "smollm2-window256"
PARAMETERS_FILE = "memory_parameters.safetensors"
LORA_FILE = "lora_parameters.safetensors"
CARD_FILE = "card.json"
# The Senri settings a card records: together with the base checkpoint they define the model the parameters fit.
CARD_SETTINGS = ("sliding_window", "chunk_size", "num_sink_tokens", "layer_types", "memory_update", "memory_qk_map",
                 "memory_type", "memory_eps", "memory_feature_map", "memory_dpfp_nu")
# Of those, the ones that shape no parameter: a trained memory may be loaded with them changed (``overrides``), e.g.
# the linear rule's parameters read and written by the delta rule.
READ_SETTINGS = ("memory_update", "memory_eps", "memory_feature_map", "memory_dpfp_nu")
# Card settings added after the first cards were written, with the value every earlier card was trained with.
LEGACY_CARD_SETTINGS = {"memory_feature_map": "elu", "memory_dpfp_nu": 3}


def base_fingerprint(model: Any) -> str:
    """A short fingerprint of a base checkpoint's weights (sums of a few tensors): refuses a different base."""
    state = model.state_dict()
    names = sorted(state)[:: max(1, len(state) // 8)]
    return ";".join(f"{name}={float(state[name].double().sum()):.6e}" for name in names)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def save_trained_memory(model: Any, base: Any, directory: str | Path, base_model: str,
                        card: dict[str, Any]) -> Path:
    """Write ``model``'s trained memory parameters and a card (``card`` adds the recipe, steps, numbers...).

    ``model`` is a SenriForCausalLM, or a peft model around one (phase B): then its LoRA adapters are written too,
    with their settings in the card."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lora = None
    inner = model
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        lora = lora_config_of(model)
        # save_embedding_layers=False: the adapters never touch the embeddings, and peft's "auto" check would load
        # the base model's config as a SenriConfig (transformers then warns of a llama/senri type mismatch).
        adapters = get_peft_model_state_dict(model, save_embedding_layers=False)
        lora_tensors = {k: v.detach().float().contiguous().cpu() for k, v in adapters.items()}
        inner = model.get_base_model()
    tensors = {name: p.detach().float().contiguous().cpu() for name, p in inner.named_parameters()
               if name.endswith(TRANSFER_PARAMETER_SUFFIXES)}
    if not tensors:
        raise ValueError("the model has no trained memory parameters (gates, memory q/k maps) to save")
    _save_tensors(tensors, directory / PARAMETERS_FILE)
    if lora is not None:
        _save_tensors(lora_tensors, directory / LORA_FILE)
    elif (directory / LORA_FILE).exists():
        (directory / LORA_FILE).unlink()  # a stale adapter must not be merged into a model trained without it
    full_card = {
        "base_model": base_model, "base_fingerprint": base_fingerprint(base),
        "settings": {name: getattr(inner.config, name) for name in CARD_SETTINGS},
        "parameters": {name: list(t.shape) for name, t in tensors.items()},
        "lora": lora, "commit": git_commit(), **card,
    }
    with atomic_write(directory / CARD_FILE) as f:
        json.dump(full_card, f, indent=1)
    return directory


def lora_config_of(peft_model: Any) -> dict[str, Any]:
    """The LoRA settings a card records (enough to rebuild the adapter before loading its weights)."""
    config = peft_model.peft_config["default"]
    return {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules),
            "layers_to_transform": list(config.layers_to_transform), "layers_pattern": config.layers_pattern}


def read_card(directory: str | Path = SMOLLM2_WINDOW256) -> dict[str, Any]:
    path = Path(directory) / CARD_FILE
    if not path.exists():
        raise FileNotFoundError(f"no trained memory at {directory}: {CARD_FILE} is missing")
    card = json.loads(path.read_text(encoding="utf-8"))
    if "settings" in card:  # settings added after cards were first written: a card without them had these values
        card["settings"] = {**LEGACY_CARD_SETTINGS, **card["settings"]}
    return card


def load_trained_memory(base: Any, directory: str | Path, check_base: bool = True, merge_lora: bool = True,
                        overrides: dict[str, Any] | None = None) -> Any:
    """Convert ``base`` with the card's settings and load the shipped parameters; every mismatch is an error.

    The card's LoRA adapters are merged into q/k/v/o (a plain SenriForCausalLM); with ``merge_lora=False`` the
    result is the peft model with the adapters loaded and unmerged, for a recipe that goes on training them.
    ``overrides`` change settings of the card that shape no parameter (e.g. ``memory_update``: the same trained
    parameters read and written by the delta rule), for measuring a lever without training."""
    directory = Path(directory)
    card = read_card(directory)
    if check_base and card["base_fingerprint"] != base_fingerprint(base):
        raise ValueError(f"the trained memory in {directory} was made for another base checkpoint "
                         f"({card['base_model']}): its weight fingerprint differs")
    model = convert_llama_to_senri(base, **{**card["settings"], **(overrides or {})})
    tensors = load_file(str(directory / PARAMETERS_FILE))
    own = dict(model.named_parameters())
    problems = [f"{name}: not a parameter of the converted model" for name in tensors if name not in own]
    problems += [f"{name}: shipped {tuple(t.shape)} vs model {tuple(own[name].shape)}"
                 for name, t in tensors.items() if name in own and own[name].shape != t.shape]
    problems += [f"{name}: in the card but not shipped" for name in card["parameters"] if name not in tensors]
    if problems:
        raise ValueError(f"the trained memory in {directory} does not match its model: " + "; ".join(problems[:6]))
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor)
    if card.get("lora"):
        model = _load_lora(model, card["lora"], directory / LORA_FILE)
        if merge_lora:
            model = model.merge_and_unload()
    return model.eval()


def _load_lora(model: SenriForCausalLM, lora: dict[str, Any], path: Path) -> Any:
    """Rebuild the card's LoRA adapters with peft around ``model`` and load them (every adapter weight must be
    present and used)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    if not path.exists():
        raise ValueError(f"the card in {path.parent} names LoRA adapters but {path.name} is missing")
    peft_model = get_peft_model(model, LoraConfig(**lora, lora_dropout=0.0, bias="none"))
    tensors = load_file(str(path))
    adapters = get_peft_model_state_dict(peft_model, save_embedding_layers=False)  # as saved
    expected = {name: tuple(t.shape) for name, t in adapters.items()}
    odd = sorted(set(tensors) ^ set(expected))
    odd += [f"{name}: {tuple(t.shape)} vs {expected[name]}" for name, t in tensors.items()
            if name in expected and tuple(t.shape) != expected[name]]
    if odd:
        raise ValueError(f"the LoRA adapters in {path} do not match the card's LoRA settings: {odd[:4]}")
    set_peft_model_state_dict(peft_model, tensors)
    return peft_model


def load_trained_smollm2(directory: str | Path = SMOLLM2_WINDOW256):
    """``(SenriForCausalLM, tokenizer)``: the offline SmolLM2-135M-Instruct converted with the shipped trained memory
    (window 256, 4 sinks, memory on the card's layers), ready for ``generate()`` and streaming."""
    card = read_card(directory)
    base, tokenizer = load_base_model(card["base_model"])
    return load_trained_memory(base, directory), tokenizer


__all__ = ["TRAINED_DIR", "SMOLLM2_WINDOW256", "CARD_SETTINGS", "READ_SETTINGS", "base_fingerprint",
           "save_trained_memory", "read_card", "load_trained_memory", "load_trained_smollm2"]
