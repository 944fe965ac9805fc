"""Configuration: profiles merge in order, auto picks by hardware, every bad key or value is named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from senri.training.config import ConfigManager, check_identity, identity_differences


def test_profile_overrides_defaults_and_overrides_win():
    cfg = ConfigManager("cpu-smoke", overrides={"max_steps": 7, "experiment.run_dir": "runs/x", "model": {"chunk_size": 4}})
    assert cfg.profile == "cpu-smoke" and cfg.training.max_steps == 7 and cfg.experiment.run_dir == "runs/x"
    assert cfg.model.chunk_size == 4 and cfg.model.sliding_window == 32  # profile value kept
    assert ConfigManager("cpu-real").model.sliding_window == 256 and ConfigManager("cpu-smoke").model.sliding_window == 32


def test_the_gpu_profiles_train_the_shipped_recipe_sized_for_a_colab_session():
    """t4 and a100 run phase B (the recipe of the shipped memory) on its model and window, from its phase-A init;
    precision by capability; the T4's run stops and publishes within two hours."""
    from senri.model.trained import SMOLLM2_WINDOW256, read_card

    card = read_card(SMOLLM2_WINDOW256)
    shipped = ConfigManager("real-finetune")
    for name in ("t4", "a100"):
        cfg = ConfigManager(name)
        assert cfg.training.recipe == "finetune" and "phase B" in card["recipe"]["name"]
        assert cfg.as_dict()["model"] == shipped.as_dict()["model"]  # the shipped memory's model and window
        assert cfg.model.sliding_window == card["recipe"]["init"]["settings"]["sliding_window"]
        assert cfg.training.finetune_init == shipped.training.finetune_init
        assert cfg.training.learning_rate == card["recipe"]["settings"]["learning_rate"]
        assert cfg.training.precision == "auto"
    assert ConfigManager("t4").training.finetune_time_budget_s <= 2 * 3600
    assert ConfigManager("a100").training.max_steps > ConfigManager("t4").training.max_steps


def test_auto_picks_by_compute_capability_and_memory(monkeypatch):
    import types

    import torch

    assert ConfigManager("auto").profile == "cpu-smoke"  # this machine has no GPU
    gpu = {"capability": (7, 5), "gib": 15}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # lies on a T4
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: gpu["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: types.SimpleNamespace(total_memory=gpu["gib"] * 2**30))
    assert ConfigManager("auto").profile == "t4" and ConfigManager("auto").resolve_precision() == "fp16"
    expected = {((8, 0), 80): "a100", ((9, 0), 80): "a100", ((8, 0), 40): "t4", ((8, 9), 24): "t4", ((7, 0), 32): "t4"}
    for (capability, gib), profile in expected.items():  # A100 80/40 GB, H100, L4, V100
        gpu.update(capability=capability, gib=gib)
        assert ConfigManager("auto").profile == profile, (capability, gib)
    # A 40 GB A100 gets t4's run, in bfloat16 (capability 8.0); a T4 float16.
    gpu.update(capability=(8, 0), gib=40)
    assert ConfigManager("auto").profile == "t4" and ConfigManager("auto").resolve_precision() == "bf16"


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


def test_run_name_locates_the_run_locally_and_on_drive(monkeypatch, tmp_path):
    cfg = ConfigManager("cpu-smoke")
    assert cfg.experiment.run_name == "cpu-smoke" and cfg.experiment.run_dir == "runs/cpu-smoke"
    named = ConfigManager("cpu-smoke", overrides={"experiment.run_name": "abc"})
    assert named.experiment.run_dir == "runs/abc"
    monkeypatch.setenv("SENRI_DRIVE_MOUNTPOINT", str(tmp_path / "drive"))
    assert named.resolve_drive_dir() is None and named.home_dir() == Path("runs/abc")  # Drive not mounted
    (tmp_path / "drive" / "MyDrive").mkdir(parents=True)
    assert named.resolve_drive_dir() == tmp_path / "drive" / "MyDrive" / "senri" / "abc" == named.home_dir()
    explicit = ConfigManager("cpu-smoke", overrides={"drive_dir": "/x/y", "run_dir": "elsewhere"})
    assert explicit.home_dir().as_posix() == "/x/y" and explicit.experiment.run_dir == "elsewhere"
    for bad in ("a/b", "..", "", "-x"):
        with pytest.raises(ValueError, match=f"experiment.run_name = {bad!r} is not valid; a run name is one folder"):
            ConfigManager("cpu-smoke", overrides={"experiment.run_name": bad})


def test_identity_names_each_differing_setting_and_ignores_continuation_ones(tmp_path):
    cfg = ConfigManager("cpu-smoke", overrides={"run_dir": str(tmp_path)})
    cfg.save(tmp_path / "config.yaml")
    longer = ConfigManager("cpu-smoke", overrides={"run_dir": str(tmp_path), "max_steps": 500, "save_steps": 3,
                                                   "niah_lengths": [64], "drive_dir": "/elsewhere",
                                                   "finetune_time_budget_s": 7200, "finetune_eval_steps": 7})
    check_identity(longer, tmp_path / "config.yaml")  # continuation, evaluation and location settings may differ
    other = ConfigManager("cpu-smoke", overrides={"run_dir": str(tmp_path), "seq_len": 64, "model.chunk_size": 4,
                                                  "num_train_samples": 10})
    assert identity_differences(other, yaml.safe_load((tmp_path / "config.yaml").read_text())) == {
        "model.chunk_size": (8, 4), "training.seq_len": (128, 64), "experiment.num_train_samples": (200, 10)}
    with pytest.raises(ValueError, match="run 'cpu-smoke' .* was made with other settings: model.chunk_size: 8 in the "
                       "run, 4 now; training.seq_len: 128 in the run, 64 now; .*start a new run under another name"):
        check_identity(other, tmp_path / "config.yaml")
    # A file written before a key existed: the missing key counts as its default.
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["model"]["use_alibi"]
    assert identity_differences(cfg, saved) == {}
    # ...except where the default changed: runs made before attention sinks had none (the default is now 4).
    converted = ConfigManager("t4")
    saved = converted.as_dict()
    del saved["model"]["num_sink_tokens"]
    assert identity_differences(converted, saved) == {"model.num_sink_tokens": (0, 4)}
    check_identity(cfg, tmp_path / "absent.yaml")  # no run yet: nothing to check
