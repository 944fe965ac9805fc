"""Workspace configuration: config/{model,training,experiment}.yaml, named profiles, validated overrides.

    cfg = ConfigManager(profile="auto", overrides={"max_steps": 30, "experiment.run_dir": "runs/x"})
    cfg.model.sliding_window, cfg.training.learning_rate, cfg.experiment.run_dir

Order: file defaults <- profile <- overrides. ``auto`` picks by the GPU's compute capability and memory
(:data:`GPU_PROFILES`): ``a100`` (bf16, >= 8.0 and >= 70 GiB), ``t4`` (any other GPU) or ``cpu-smoke`` (no GPU).
Every key and value is checked; a bad one raises naming it and what is valid.

A run is named (``experiment.run_name``, default: the profile) and has one directory every notebook finds,
:meth:`ConfigManager.home_dir`: its Drive directory (``MyDrive/senri/<run_name>`` when Drive is mounted in Colab,
or ``experiment.drive_dir``), else its local ``experiment.run_dir`` (default ``runs/<run_name>``). The settings
that shape its model, data and training (:meth:`ConfigManager.identity`) are remembered there; a run continued
with other ones is refused (:func:`identity_differences`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from ..model.configuration_senri import LAYER_TYPES, SenriConfig
from ..model.io import atomic_write

PROFILES = ("cpu-smoke", "cpu-proof", "cpu-real", "real-finetune", "cpu-text", "cpu-text-near", "gpu-text", "t4", "a100")
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
# What ``auto`` picks on a GPU, first match wins: (profile, minimum compute capability, minimum memory in GiB).
# a100 trains batches of 8 x 2048 tokens in bf16, meant for an 80 GB A100 or an H100; every other GPU (T4, L4,
# V100, a 40 GB A100) gets t4's batch of 1 x 2048 with 8 accumulation steps in fp16.
GPU_PROFILES = (("a100", (8, 0), 70.0), ("t4", (0, 0), 0.0))
# Where Colab mounts Google Drive; SENRI_DRIVE_MOUNTPOINT moves it (the simulated Colab session in the tests does).
DEFAULT_DRIVE_MOUNTPOINT = "/content/drive"
# Training settings that only say how long a run goes on, how often it is evaluated and what it keeps: a run may
# continue with other values (one stopped by its time budget goes on under a larger one, as make text-memory-gpu
# advises).
CONTINUATION_KEYS = ("max_steps", "save_steps", "save_total_limit", "logging_steps", "finetune_time_budget_s",
                     "finetune_eval_steps")
# Experiment settings that change what a run trains on (the others say where it lives or how it is evaluated).
TRAINING_DATA_KEYS = ("dataset", "dataset_name", "data_files", "num_train_samples", "niah_ratio", "needle_beyond_window")
# Identity keys whose default differs from what runs saved before the key existed were made with: a saved
# config.yaml without them is read with these values (any other missing key counts as its default).
LEGACY_IDENTITY = {"model.num_sink_tokens": 0}
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def drive_root() -> Path:
    """``MyDrive`` under the Drive mount point (it exists only while Drive is mounted)."""
    return Path(os.environ.get("SENRI_DRIVE_MOUNTPOINT", DEFAULT_DRIVE_MOUNTPOINT)) / "MyDrive"


@dataclass
class ModelSettings:
    base_model: str = "HuggingFaceTB/SmolLM-135M"
    init: Literal["convert", "scratch"] = "convert"
    tokenizer: Literal["base", "synthetic"] = "base"
    sliding_window: int = 1024
    chunk_size: int = 64
    memory_update: Literal["delta", "linear"] = "delta"
    num_memory_layers: int = 2
    first_memory_layer: int = 10
    memory_layer_interval: int = 10
    layer_types: list[str] | None = None
    memory_gate_init: float = 0.0
    num_sink_tokens: int = 4
    memory_qk_map: bool = False
    memory_feature_map: Literal["elu", "dpfp"] = "elu"
    memory_dpfp_nu: int = 3
    memory_type: Literal["single", "multi", "hierarchical", "routed"] = "single"
    num_memories: int = 4
    top_k_memories: int = 8
    num_memory_banks: int = 1
    segments_per_bank: int = 4
    memory_relevance: Literal["mass", "mean"] = "mass"
    use_alibi: bool = False
    alibi_scale: float = 1.0
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3


@dataclass
class TrainingSettings:
    max_steps: int = 1000
    per_device_batch_size: int = 1
    gradient_accumulation_steps: int = 8
    learning_rate: float = 1e-4
    gate_lr_multiplier: float = 100.0
    weight_decay: float = 0.01
    warmup_steps: int = 50
    lr_scheduler: Literal["constant", "linear", "cosine", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = 1.0
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    seq_len: int = 2048
    save_steps: int = 200
    save_total_limit: int = 3
    logging_steps: int = 10
    seed: int = 42
    trainable: Literal["all", "memory"] = "memory"
    # lm: language-model training with transformers' Trainer; transfer: phase A of the real-model recipe
    # (senri.training.transfer: layer-local attention transfer from the full-attention base, gates and memory maps only).
    # finetune: phase B (senri.training.finetune: end-to-end through the memory, LoRA + memory parameters, answer-only loss,
    # KL to the base on text, a curriculum on needle distance). text: the text-memory recipe (senri.training.textmemory:
    # phase B's adapters trained further on facts in natural prose and a weighted distillation beyond the window).
    recipe: Literal["lm", "transfer", "finetune", "text"] = "lm"
    transfer_passkey_share: float = 0.5
    transfer_base_weight: float = 0.01
    finetune_init: str | None = None  # a trained memory directory to start from (phase A's); "shipped": the package's
    finetune_curriculum: list[list[float]] = field(default_factory=lambda: [[0.0, 640], [0.3, 1024], [0.6, 2048]])
    finetune_lora_rank: int = 8
    finetune_kl_weight: float = 0.5
    finetune_eval_steps: int = 50
    finetune_time_budget_s: float | None = None
    # The finetune and text recipes' learning rate (senri.training.finetune.lr_factor): cosine (one warm-up, a cosine
    # to 10 % over the run), stage_cosine (a warm-up and a cosine within each curriculum stage), constant.
    finetune_schedule: Literal["cosine", "stage_cosine", "constant"] = "cosine"
    text_sources: list[str] = field(default_factory=lambda: ["licences", "package-docs", "python-docs", "docstrings",
                                                             "gutenberg"])
    text_passkey_share: float = 0.25
    text_distractors: int = 2
    text_distill_weight: float = 1.0
    text_distill_floor: float = 0.1
    text_teacher_cache: str | None = None
    # Rows longer than text_segment tokens are read in segments, the memory carried across them, one segment's
    # activations at a time (senri.training.streamed); 0: whole rows. text_backprop: across the segments' borders,
    # "full" (the exact gradient, by recomputation) or "truncated" (none).
    text_segment: int = 0
    text_backprop: Literal["full", "truncated"] = "full"
    # × the mean −log share of the memory read's weight on the fact's statement in the fact rows (senri.training.readloss:
    # the read trained directly, not only through the answer's tokens); needs whole rows (text_segment 0).
    text_read_weight: float = 0.0


@dataclass
class ExperimentSettings:
    run_name: str | None = None  # None: the profile's name
    run_dir: str | None = None  # None: runs/<run_name> (this machine's disk)
    drive_dir: str | None = None  # None: MyDrive/senri/<run_name> while Drive is mounted (Colab)
    dataset: Literal["pg19", "text_files", "generated", "passkey"] = "pg19"
    dataset_name: str = "emozilla/pg19"
    data_files: list[str] = field(default_factory=list)
    data_cache_dir: str = "data_cache"
    num_train_samples: int = 20000
    niah_ratio: float = 0.01
    needle_beyond_window: float = 1.0
    train_twin: bool = False
    niah_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])
    niah_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    niah_samples: int = 2
    niah_templates: list[str] = field(default_factory=lambda: ["passkey"])
    ppl_seq_len: int = 4096
    ppl_bucket_size: int = 512
    real_model_window: int = 1024
    real_model_niah_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    real_model_niah_samples: int = 1
    compare_real_model: bool = True  # 03: the pretrained base next to its conversion (loads the base model)
    # Memory variants compared on this profile's task: name -> model.* overrides (see compare_variants).
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    variant_max_steps: int | None = None  # training.max_steps of each variant run (None: training.max_steps)
    variant_seeds: list[int] = field(default_factory=list)  # train every variant once per seed ([]: training.seed)


SECTIONS = {"model": ModelSettings, "training": TrainingSettings, "experiment": ExperimentSettings}
# Keys that must be > 0 / >= 0, and fractions in [0, 1].
POSITIVE = {
    "sliding_window", "chunk_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_steps", "per_device_batch_size", "gradient_accumulation_steps", "learning_rate",
    "seq_len", "save_steps", "save_total_limit", "logging_steps", "num_train_samples", "niah_samples",
    "ppl_seq_len", "ppl_bucket_size", "gate_lr_multiplier", "memory_layer_interval", "real_model_window",
    "real_model_niah_samples", "num_memories", "top_k_memories", "num_memory_banks", "segments_per_bank", "alibi_scale",
    "variant_max_steps", "finetune_lora_rank", "finetune_eval_steps", "finetune_time_budget_s", "memory_dpfp_nu",
}
NON_NEGATIVE = {"text_read_weight", "text_segment", "text_distractors", "text_distill_weight", "text_distill_floor", "finetune_kl_weight", "num_sink_tokens", "num_memory_layers", "first_memory_layer", "weight_decay", "warmup_steps", "max_grad_norm", "seed"}
FRACTIONS = {"text_passkey_share", "transfer_passkey_share", "memory_gate_init", "niah_ratio", "needle_beyond_window"}


def detect_profile() -> str:
    """The profile ``auto`` stands for on this machine: by the GPU's compute capability and memory
    (:data:`GPU_PROFILES`), ``cpu-smoke`` without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu-smoke"
    # is_bf16_supported() is True on a T4 through emulation; the compute capability tells the truth.
    capability = tuple(torch.cuda.get_device_capability())
    memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    return next(name for name, min_capability, min_gib in GPU_PROFILES
                if capability >= min_capability and memory_gib >= min_gib)


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _mapping(value: Any, where: str) -> dict[str, Any]:
    """``value`` as a dict (an empty YAML entry is an empty mapping); anything else raises naming ``where``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping of key: value, got {type(value).__name__} {value!r}")
    return value


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` converted to ``annotation`` where lossless, else raise naming the key."""
    origin, args = get_origin(annotation), get_args(annotation)
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"{name} must not be null; expected {getattr(annotation, '__name__', annotation)}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{name} = {value!r} is not valid; valid values are {list(args)}{_suggest(str(value), list(args))}")
        return value
    if args and type(None) in args:  # Optional[X]
        inner = [a for a in args if a is not type(None)][0]
        return _check_type(name, value, inner)
    if annotation is Any:
        return value
    if origin is dict:
        return {str(k): _check_type(f"{name}.{k}", v, args[1]) for k, v in _mapping(value, name).items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {type(value).__name__} {value!r}")
        return [_check_type(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is float:
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept any string that is a plain number.
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ValueError(f"{name} must be a finite number, got {type(value).__name__} {value!r}")
        return float(number)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {type(value).__name__} {value!r}")
        return value
    return value


class ConfigManager:
    """Loads, merges and validates the three config files for one profile."""

    def __init__(self, profile: str = "auto", overrides: dict[str, Any] | None = None,
                 config_dir: str | os.PathLike | None = None):
        self.requested_profile = profile
        self._overrides = dict(overrides or {})
        self.profile = detect_profile() if profile == "auto" else profile
        if self.profile not in PROFILES:
            raise ValueError(f"profile {profile!r} is unknown; valid profiles are {['auto', *PROFILES]}{_suggest(profile, list(PROFILES))}")
        self.config_dir = Path(config_dir) if config_dir else DEFAULT_CONFIG_DIR
        merged = {section: {} for section in SECTIONS}
        for section in SECTIONS:
            path = self.config_dir / f"{section}.yaml"
            data = _mapping(yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None, str(path))
            unknown = set(data) - {"defaults", "profiles"}
            if unknown:
                raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}; valid keys are ['defaults', 'profiles']")
            defaults = _mapping(data.get("defaults"), f"{path}: defaults")
            merged[section].update(self._checked_keys(section, defaults, str(path)))
            profiles = _mapping(data.get("profiles"), f"{path}: profiles")
            bad = set(profiles) - set(PROFILES)
            if bad:
                raise ValueError(f"{path}: unknown profiles {sorted(bad)}; valid profiles are {list(PROFILES)}")
            where = f"{path} [{self.profile}]"
            merged[section].update(self._checked_keys(section, _mapping(profiles.get(self.profile), where), where))
        for section, key, value in self._flatten_overrides(overrides or {}):
            merged[section][key] = value
        self.model: ModelSettings = self._build("model", merged["model"])
        self.training: TrainingSettings = self._build("training", merged["training"])
        self.experiment: ExperimentSettings = self._build("experiment", merged["experiment"])
        e = self.experiment
        if e.run_name is None:
            e.run_name = self.profile
        elif not _RUN_NAME.match(e.run_name) or e.run_name in (".", ".."):
            raise ValueError(f"experiment.run_name = {e.run_name!r} is not valid; a run name is one folder name: "
                             "letters, digits, '.', '_' and '-', starting with a letter or digit")
        if e.run_dir is None:
            e.run_dir = f"runs/{e.run_name}"
        self._validate_relations()

    # --- loading ------------------------------------------------------------------------------------------------
    @staticmethod
    def _checked_keys(section: str, values: dict[str, Any], where: str) -> dict[str, Any]:
        valid = [f.name for f in dataclasses.fields(SECTIONS[section])]
        for key in values:
            if key not in valid:
                raise ValueError(f"{where}: unknown key {section}.{key}{_suggest(key, valid)}; valid keys are {valid}")
        return dict(values)

    @staticmethod
    def _flatten_overrides(overrides: dict[str, Any]) -> list[tuple[str, str, Any]]:
        """Accept {"training.max_steps": 3}, {"training": {"max_steps": 3}} and unambiguous bare {"max_steps": 3}."""
        owners: dict[str, list[str]] = {}
        for section, cls in SECTIONS.items():
            for f in dataclasses.fields(cls):
                owners.setdefault(f.name, []).append(section)
        flat = []
        for key, value in overrides.items():
            if key in SECTIONS and isinstance(value, dict):
                flat += [(key, k, v) for k, v in ConfigManager._checked_keys(key, value, "overrides").items()]
            elif "." in key:
                section, name = key.split(".", 1)
                if section not in SECTIONS:
                    raise ValueError(f"override {key!r}: unknown section {section!r}; valid sections are {list(SECTIONS)}")
                ConfigManager._checked_keys(section, {name: value}, "overrides")
                flat.append((section, name, value))
            elif key in owners:
                if len(owners[key]) > 1:
                    raise ValueError(f"override {key!r} is ambiguous; write one of {[f'{s}.{key}' for s in owners[key]]}")
                flat.append((owners[key][0], key, value))
            else:
                raise ValueError(f"override {key!r} is not a known key{_suggest(key, list(owners))}; valid keys are {sorted(owners)}")
        return flat

    @staticmethod
    def _build(section: str, values: dict[str, Any]):
        cls = SECTIONS[section]
        hints = get_type_hints(cls)
        checked = {}
        for key, value in values.items():
            name = f"{section}.{key}"
            value = _check_type(name, value, hints[key])
            if key in POSITIVE and value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
            if key in NON_NEGATIVE and value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
            if key in FRACTIONS and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
            checked[key] = value
        return cls(**checked)

    def _validate_relations(self) -> None:
        m, t, e = self.model, self.training, self.experiment
        if m.sliding_window % m.chunk_size != 0:
            raise ValueError(
                f"model.sliding_window ({m.sliding_window}) must be a multiple of model.chunk_size ({m.chunk_size})"
            )
        if m.layer_types is not None:
            for i, layer_type in enumerate(m.layer_types):
                if layer_type not in LAYER_TYPES:
                    raise ValueError(f"model.layer_types[{i}] = {layer_type!r} is not valid; valid values are {list(LAYER_TYPES)}")
            if m.init == "scratch" and len(m.layer_types) != m.num_hidden_layers:
                raise ValueError(
                    f"model.layer_types has {len(m.layer_types)} entries but model.num_hidden_layers is {m.num_hidden_layers}"
                )
        for d in e.niah_depths:
            if not 0.0 <= d <= 1.0:
                raise ValueError(f"experiment.niah_depths entries must be in [0, 1], got {d}")
        if any(n <= 0 for n in e.niah_lengths):
            raise ValueError(f"experiment.niah_lengths entries must be > 0, got {e.niah_lengths}")
        if m.tokenizer == "synthetic" and m.init != "scratch":
            raise ValueError("model.tokenizer = 'synthetic' needs model.init = 'scratch' (a pretrained model has its own vocabulary)")
        if e.dataset == "text_files" and not e.data_files:
            raise ValueError("experiment.dataset = 'text_files' needs experiment.data_files (a list of .txt paths)")
        if t.save_total_limit < 1:
            raise ValueError("training.save_total_limit must be >= 1")
        if len(set(e.variant_seeds)) != len(e.variant_seeds) or any(s < 0 for s in e.variant_seeds):
            raise ValueError(f"experiment.variant_seeds must be distinct non-negative integers, got {e.variant_seeds}")
        for name, overrides in e.variants.items():
            # A variant's overrides are model keys whose merged settings must themselves be valid.
            where = f"experiment.variants.{name}"
            self._checked_keys("model", overrides, where)
            try:
                self._build("model", {**dataclasses.asdict(m), **overrides})
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None

    # --- derived ------------------------------------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, **{s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the resolved configuration as YAML (temporary file + rename)."""
        with atomic_write(path) as f:
            yaml.safe_dump(self.as_dict(), f, sort_keys=False)
        return Path(path)

    def resolve_precision(self) -> str:
        """fp16 on a T4-class GPU, bf16 from compute capability 8.0, fp32 on CPU (for precision: auto)."""
        if self.training.precision != "auto":
            return self.training.precision
        import torch

        if not torch.cuda.is_available():
            return "fp32"
        return "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16"

    def resolve_drive_dir(self) -> Path | None:
        """The run's directory on Drive: experiment.drive_dir, else ``MyDrive/senri/<run_name>`` while Drive is
        mounted; None without Drive."""
        if self.experiment.drive_dir:
            return Path(self.experiment.drive_dir)
        if drive_root().is_dir():
            return drive_root() / "senri" / self.experiment.run_name
        return None

    def home_dir(self) -> Path:
        """The run's directory that every notebook finds: on Drive when there is one (results outlive the runtime),
        else ``experiment.run_dir``. Training works in ``run_dir`` and copies checkpoints and results here."""
        return self.resolve_drive_dir() or Path(self.experiment.run_dir)

    def identity(self) -> dict[str, Any]:
        """The settings that shape the run's model, data and training, as dotted keys: every model and training
        key but :data:`CONTINUATION_KEYS`, and the experiment's :data:`TRAINING_DATA_KEYS`."""
        keys = [("model", f.name) for f in dataclasses.fields(ModelSettings)]
        keys += [("training", f.name) for f in dataclasses.fields(TrainingSettings) if f.name not in CONTINUATION_KEYS]
        keys += [("experiment", name) for name in TRAINING_DATA_KEYS]
        return {f"{section}.{name}": getattr(getattr(self, section), name) for section, name in keys}

    def senri_config_kwargs(self) -> dict[str, Any]:
        """The SenriConfig fields this configuration sets (architecture fields only for init: scratch)."""
        m = self.model
        fields = dict(
            sliding_window=m.sliding_window, chunk_size=m.chunk_size, memory_update=m.memory_update,
            num_memory_layers=m.num_memory_layers, first_memory_layer=m.first_memory_layer,
            memory_layer_interval=m.memory_layer_interval, layer_types=m.layer_types,
            memory_gate_init=m.memory_gate_init, num_sink_tokens=m.num_sink_tokens, memory_qk_map=m.memory_qk_map,
            memory_feature_map=m.memory_feature_map, memory_dpfp_nu=m.memory_dpfp_nu, memory_type=m.memory_type,
            num_memories=m.num_memories,
            top_k_memories=m.top_k_memories, num_memory_banks=m.num_memory_banks,
            segments_per_bank=m.segments_per_bank, memory_relevance=m.memory_relevance, use_alibi=m.use_alibi, alibi_scale=m.alibi_scale,
        )
        if m.init == "scratch":
            fields.update(
                hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
                num_key_value_heads=m.num_key_value_heads,
            )
        return fields

    def to_senri_config(self, vocab_size: int | None = None, **extra: Any):
        """A SenriConfig for a model trained from scratch with this configuration."""
        fields = self.senri_config_kwargs()
        if vocab_size is not None:
            fields["vocab_size"] = vocab_size
        fields.setdefault("max_position_embeddings", 1 << 20)
        fields.setdefault("tie_word_embeddings", False)
        fields.update(extra)
        return SenriConfig(**fields)

    def __repr__(self) -> str:
        return (f"ConfigManager(profile={self.profile!r}, run_name={self.experiment.run_name!r}, "
                f"run_dir={self.experiment.run_dir!r})")


_DEFAULTS = {section: {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                       for f in dataclasses.fields(cls)} for section, cls in SECTIONS.items()}


def identity_differences(cfg: ConfigManager, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, cfg's value)}`` for each identity setting that differs between ``saved`` (a
    resolved configuration as :meth:`ConfigManager.as_dict` writes it) and ``cfg``. A key the saved file lacks (it
    was written before the key existed) counts as :data:`LEGACY_IDENTITY`'s value or else the key's default."""
    differences = {}
    for key, value in cfg.identity().items():
        section, name = key.split(".", 1)
        missing = LEGACY_IDENTITY.get(key, _DEFAULTS[section][name])
        before = _mapping(saved.get(section), section).get(name, missing)
        if before != value:
            differences[key] = (before, value)
    return differences


def check_identity(cfg: ConfigManager, saved_path: str | os.PathLike) -> None:
    """Raise naming every differing key and both values when the run whose resolved configuration is at
    ``saved_path`` was made with other identity settings than ``cfg``; do nothing when the file is absent."""
    path = Path(saved_path)
    if not path.is_file():
        return
    differences = identity_differences(cfg, _mapping(yaml.safe_load(path.read_text(encoding="utf-8")), str(path)))
    if differences:
        lines = "; ".join(f"{key}: {old!r} in the run, {new!r} now" for key, (old, new) in differences.items())
        raise ValueError(
            f"run {cfg.experiment.run_name!r} ({path.parent}) was made with other settings: {lines}. Continue it with "
            f"its own settings, or start a new run under another name (notebook parameter run_name, or override "
            f"experiment.run_name)"
        )



def model_runs(cfg: ConfigManager) -> dict[str, ConfigManager]:
    """The models a run trains, each in ``{run_dir}/{name}`` (and ``{drive_dir}/{name}``): ``senri`` and, with
    ``experiment.train_twin``, a ``swa_only`` twin of identical size and training budget whose layers are all
    sliding-window attention."""
    run_dir, drive_dir = Path(cfg.experiment.run_dir), cfg.resolve_drive_dir()

    def run(name: str, **extra: Any) -> ConfigManager:
        overrides = {**cfg._overrides, "experiment.run_dir": str(run_dir / name), **extra}
        if drive_dir is not None:  # one Drive directory per model, so the two never resume from each other
            overrides["experiment.drive_dir"] = str(drive_dir / name)
        return ConfigManager(cfg.requested_profile, overrides, cfg.config_dir)

    runs = {"senri": run("senri")}
    if cfg.experiment.train_twin:
        layers = cfg.model.layer_types or SenriConfig.default_layer_types(
            cfg.model.num_hidden_layers, cfg.model.num_memory_layers, cfg.model.first_memory_layer,
            cfg.model.memory_layer_interval,
        )
        runs["swa_only"] = run("swa_only", **{"model.layer_types": ["sliding_attention"] * len(layers)})
    return runs

__all__ = ["ConfigManager", "ModelSettings", "TrainingSettings", "ExperimentSettings", "PROFILES", "GPU_PROFILES",
           "CONTINUATION_KEYS", "TRAINING_DATA_KEYS", "detect_profile", "drive_root", "identity_differences",
           "check_identity", "model_runs"]
