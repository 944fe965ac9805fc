"""Configuration: profiles merge in order, auto picks by hardware, every bad key or value is named."""

from __future__ import annotations

import pytest
import yaml

from senri.config import ConfigManager


def test_profile_overrides_defaults_and_overrides_win():
    cfg = ConfigManager("cpu-smoke", overrides={"max_steps": 7, "experiment.run_dir": "runs/x", "model": {"chunk_size": 4}})
    assert cfg.profile == "cpu-smoke" and cfg.training.max_steps == 7 and cfg.experiment.run_dir == "runs/x"
    assert cfg.model.chunk_size == 4 and cfg.model.sliding_window == 32  # profile value kept
    assert ConfigManager("t4").training.precision == "fp16" and ConfigManager("a100").training.precision == "bf16"
    assert ConfigManager("t4").model.sliding_window == 1024  # file default


def test_auto_picks_by_compute_capability(monkeypatch):
    import torch

    assert ConfigManager("auto").profile == "cpu-smoke"  # this machine has no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # lies on a T4
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert ConfigManager("auto").profile == "t4" and ConfigManager("auto").resolve_precision() == "fp16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert ConfigManager("auto").profile == "a100"


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"max_stepz": 3}, "'max_stepz' is not a known key \\(did you mean 'max_steps'\\?\\)"),
        ({"training.max_steps": "ten"}, "training.max_steps must be an integer, got str 'ten'"),
        ({"training.max_steps": 0}, "training.max_steps must be > 0, got 0"),
        ({"training.max_steps": None}, "training.max_steps must not be null; expected int"),
        ({"training.learning_rate": "fast"}, "training.learning_rate must be a finite number, got str 'fast'"),
        ({"training.learning_rate": float("nan")}, "training.learning_rate must be a finite number, got float nan"),
        ({"model.memory_update": "hebb"}, "model.memory_update = 'hebb' is not valid; valid values are \\['delta', 'linear'\\]"),
        ({"training.precision": "fp8"}, "valid values are \\['auto', 'fp32', 'fp16', 'bf16'\\]"),
        ({"model.memory_gate_init": 2}, "model.memory_gate_init must be in \\[0, 1\\], got 2"),
        ({"model.sliding_window": 30}, "model.sliding_window \\(30\\) must be a multiple of model.chunk_size \\(8\\)"),
        ({"model.layer_types": ["memory", "slidng"]}, "model.layer_types\\[1\\] = 'slidng' is not valid"),
        ({"experiment.niah_depths": [0.5, 1.5]}, "niah_depths entries must be in \\[0, 1\\], got 1.5"),
        ({"experiment.dataset": "wikitext"}, "valid values are \\['pg19', 'text_files', 'generated', 'passkey'\\]"),
        ({"experiment.dataset": "text_files"}, "needs experiment.data_files"),
        ({"model.memory_type": "multiple"},
         "model.memory_type = 'multiple' is not valid; valid values are \\['single', 'multi', 'hierarchical', 'routed'\\]"),
        ({"model.memory_relevance": "max"}, "model.memory_relevance = 'max' is not valid; valid values are \\['mass', 'mean'\\]"),
        ({"model.num_memory_banks": 0}, "model.num_memory_banks must be > 0, got 0"),
        ({"experiment.variants": [1]}, "experiment.variants must be a mapping of key: value, got list"),
        ({"experiment.variants": {"x": {"memory_typ": "multi"}}},
         "experiment.variants.x: unknown key model.memory_typ \\(did you mean 'memory_type'\\?\\)"),
        ({"experiment.variants": {"x": {"num_memories": 0}}}, "experiment.variants.x: model.num_memories must be > 0"),
        ({"experiment.variants": {"x": {"memory_type": "flat"}}}, "experiment.variants.x: model.memory_type = 'flat'"),
        ({"bogus.key": 1}, "unknown section 'bogus'; valid sections are \\['model', 'training', 'experiment'\\]"),
    ],
)
def test_bad_values_raise_errors_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        ConfigManager("cpu-smoke", overrides=overrides)


def test_unknown_profile_and_unknown_file_keys_are_named(tmp_path):
    with pytest.raises(ValueError, match="profile 'cpu-smok' is unknown.*did you mean 'cpu-smoke'"):
        ConfigManager("cpu-smok")
    (tmp_path / "training.yaml").write_text(yaml.safe_dump({"defaults": {"learning_rat": 1.0}}))
    with pytest.raises(ValueError, match="unknown key training.learning_rat \\(did you mean 'learning_rate'\\?\\)"):
        ConfigManager("cpu-smoke", config_dir=tmp_path)


def test_yaml_quirks_and_malformed_files(tmp_path):
    # YAML 1.1 reads 1e-4 (no dot) as the string '1e-4': it is still the number it looks like.
    (tmp_path / "training.yaml").write_text("defaults:\n  learning_rate: 1e-4\n")
    assert ConfigManager("t4", config_dir=tmp_path).training.learning_rate == 1e-4
    (tmp_path / "model.yaml").write_text("- sliding_window: 64\n")
    with pytest.raises(ValueError, match="model.yaml must be a mapping of key: value, got list"):
        ConfigManager("t4", config_dir=tmp_path)
    (tmp_path / "model.yaml").write_text("defaults: {}\nprofiles:\n  t4: [1, 2]\n")
    with pytest.raises(ValueError, match="model.yaml \\[t4\\] must be a mapping"):
        ConfigManager("t4", config_dir=tmp_path)


def test_to_senri_config_and_resolved_save(tmp_path):
    cfg = ConfigManager("cpu-proof")
    senri_config = cfg.to_senri_config(vocab_size=123)
    assert senri_config.vocab_size == 123 and senri_config.layer_types == ["memory", "sliding_attention"]
    assert senri_config.sliding_window == 64 and senri_config.memory_gate_init == 0.5
    saved = yaml.safe_load(cfg.save(tmp_path / "config.yaml").read_text())
    assert saved["profile"] == "cpu-proof" and saved["training"]["seq_len"] == 256


def test_memory_variant_settings_reach_the_model_config():
    cfg = ConfigManager("cpu-proof", overrides={"model.memory_type": "hierarchical", "model.num_memories": 3,
                                                "model.num_memory_banks": 2, "model.use_alibi": True})
    senri_config = cfg.to_senri_config(vocab_size=50)
    assert (senri_config.memory_type, senri_config.num_memories, senri_config.num_memory_banks) == ("hierarchical", 3, 2)
    assert senri_config.use_alibi and senri_config.memory_slots(training=True) == 6
    # Every variant the shipped profiles compare builds a valid model config.
    for profile in ("cpu-smoke", "cpu-proof"):
        base = ConfigManager(profile)
        assert base.experiment.variants, f"{profile} compares no variants"
        for name, overrides in base.experiment.variants.items():
            variant = ConfigManager(profile, overrides={f"model.{k}": v for k, v in overrides.items()})
            assert variant.to_senri_config(vocab_size=50).memory_type == overrides.get("memory_type", "single"), name


def test_drive_dir_resolution(monkeypatch, tmp_path):
    cfg = ConfigManager("cpu-smoke", overrides={"run_dir": "runs/abc"})
    monkeypatch.setattr("senri.config.DRIVE_ROOT", tmp_path / "absent")
    assert cfg.resolve_drive_dir() is None
    monkeypatch.setattr("senri.config.DRIVE_ROOT", tmp_path)
    assert cfg.resolve_drive_dir() == tmp_path / "senri" / "abc"
    assert ConfigManager("cpu-smoke", overrides={"drive_dir": "/x/y"}).resolve_drive_dir().as_posix() == "/x/y"
