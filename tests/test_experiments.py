"""The memory-variant comparison: one run per variant, the same evaluation for each, results saved for 04_analysis."""

from __future__ import annotations

import json

import pytest

from senri.training.config import ConfigManager
from senri.evaluation.harness import load_records
from senri.workspace.experiments import compare_variants, variant_runs
from senri.workspace.plots import variant_accuracy

VARIANTS = {"single": {}, "routed": {"memory_type": "routed", "top_k_memories": 2},
            "banks": {"memory_type": "multi", "num_memories": 2, "num_memory_banks": 2, "segments_per_bank": 2}}


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("variants")
    cfg = ConfigManager("cpu-smoke", overrides={
        "experiment.run_dir": str(run_dir), "experiment.variants": VARIANTS, "experiment.variant_max_steps": 2,
        "experiment.niah_lengths": [64, 128], "experiment.niah_depths": [0.5], "experiment.num_train_samples": 16,
        "experiment.ppl_seq_len": 128,
    })
    return cfg, compare_variants(cfg)


def test_variant_runs_apply_each_variants_overrides_in_its_own_directory(tmp_path):
    cfg = ConfigManager("cpu-smoke", overrides={"experiment.run_dir": str(tmp_path), "experiment.variants": VARIANTS,
                                                "experiment.variant_max_steps": 3})
    runs = {name: seeds[cfg.training.seed] for name, seeds in variant_runs(cfg).items()}
    assert list(runs) == list(VARIANTS)
    assert runs["routed"].model.memory_type == "routed" and runs["routed"].model.top_k_memories == 2
    assert runs["banks"].model.num_memory_banks == 2 and runs["single"].model.memory_type == "single"
    for name, run in runs.items():
        assert run.experiment.run_dir == str(tmp_path / "variants" / name)
        assert run.training.max_steps == 3 and not run.experiment.train_twin and not run.experiment.variants
        # Everything but the variant's own keys is the profile's.
        assert run.model.sliding_window == cfg.model.sliding_window and run.training.seed == cfg.training.seed
    seeded = ConfigManager("cpu-smoke", overrides={**cfg._overrides, "experiment.variant_seeds": [7, 3]})
    for name, seeds in variant_runs(seeded).items():
        assert list(seeds) == [7, 3]
        for seed, run in seeds.items():
            assert run.training.seed == seed and run.experiment.run_dir == str(tmp_path / "variants" / name / f"seed-{seed}")
    with pytest.raises(ValueError, match="defines no experiment.variants"):
        variant_runs(ConfigManager("t4"))
    with pytest.raises(ValueError, match="variant_seeds must be distinct non-negative integers, got \\[1, 1\\]"):
        ConfigManager("cpu-smoke", overrides={"experiment.variant_seeds": [1, 1]})


def test_every_variant_is_trained_and_evaluated_on_the_same_grid(comparison):
    cfg, result = comparison
    saved = load_records(tmp := (cfg.experiment.run_dir + "/eval/variants.json"))
    assert saved["table"] == json.loads(json.dumps(result["table"]))  # what was returned is what was saved
    grid = {(r["model"], r["length"], r["seed"]) for r in result["niah"]}
    assert grid == {(name, n, 42) for name in VARIANTS for n in (64, 128)}, tmp
    runs = {name: s["runs"]["42"] for name, s in saved["summary"].items()}
    for name, run in runs.items():
        assert run["global_step"] == 2 and saved["summary"][name]["overrides"] == VARIANTS[name]
        assert run["train_runtime"] > 0 and run["gates"]["layer_0"]
        assert saved["summary"][name]["mean_final_loss"] == run["final_loss"]
        assert saved["by_seed"][name]["42"] == saved["table"][name]  # one seed: its table is the table
    # Routed memories are a single memory in training: the same seed and data give the same training run.
    assert runs["routed"]["final_loss"] == runs["single"]["final_loss"]
    # ...but not the same memory at inference: head_dim memories per KV head, each written only by its keys.
    head_dim, kv_heads = 64 // 4, 2
    memory = {name: run["memory"]["layer_0"] for name, run in runs.items()}
    assert memory["single"]["memories"] == kv_heads and memory["banks"]["memories"] == kv_heads * 4
    assert memory["routed"]["memories"] == kv_heads * head_dim
    assert 0 < memory["routed"]["nonempty_memories"] <= kv_heads * head_dim
    for stats in memory.values():
        assert 0 < stats["mean_rank_0.95_energy"] <= stats["mean_rank"] <= head_dim and stats["memory_norm"] > 0
    assert variant_accuracy(saved["table"], window=cfg.model.sliding_window).axes


def test_a_finished_variant_is_reused_not_retrained(comparison):
    cfg, result = comparison
    summaries = [f"{cfg.experiment.run_dir}/variants/{name}/train_summary.json" for name in VARIANTS]
    before = [open(p).read() for p in summaries]
    again = compare_variants(cfg)
    assert [open(p).read() for p in summaries] == before
    assert again["table"] == result["table"]


def test_a_finished_variant_with_other_settings_is_an_error_until_retrained(comparison):
    cfg, _ = comparison
    longer = ConfigManager("cpu-smoke", overrides={**cfg._overrides, "experiment.variants": {"single": {}},
                                                   "experiment.variant_max_steps": 3})
    with pytest.raises(ValueError, match="holds a finished run with other settings \\(training.max_steps\\)"):
        compare_variants(longer)
    other_data = ConfigManager("cpu-smoke", overrides={**longer._overrides, "experiment.variant_max_steps": 2,
                                                       "experiment.num_train_samples": 24})
    with pytest.raises(ValueError, match="other settings \\(experiment.num_train_samples\\)"):
        compare_variants(other_data)
    result = compare_variants(longer, retrain=True)
    assert result["summary"]["single"]["runs"][42]["global_step"] == 3 and list(result["table"]) == ["single"]


def test_variants_over_several_seeds_average_the_seeds(tmp_path):
    cfg = ConfigManager("cpu-smoke", overrides={
        "experiment.run_dir": str(tmp_path), "experiment.variants": {"single": {}}, "experiment.variant_seeds": [3, 4],
        "experiment.variant_max_steps": 2, "experiment.niah_lengths": [64], "experiment.niah_depths": [0.5],
        "experiment.niah_samples": 2, "experiment.num_train_samples": 16, "experiment.ppl_seq_len": 128,
    })
    result = compare_variants(cfg)
    assert sorted({r["seed"] for r in result["niah"]}) == [3, 4] and len(result["niah"]) == 4
    per_seed = result["by_seed"]["single"]
    assert result["table"]["single"][64] == pytest.approx((per_seed[3][64] + per_seed[4][64]) / 2)
    runs = result["summary"]["single"]["runs"]
    assert (tmp_path / "variants" / "single" / "seed-3" / "final").is_dir() and set(runs) == {3, 4}
    assert runs[3]["final_loss"] != runs[4]["final_loss"]  # different seeds, different runs
    assert result["summary"]["single"]["mean_final_loss"] == pytest.approx((runs[3]["final_loss"] + runs[4]["final_loss"]) / 2)
