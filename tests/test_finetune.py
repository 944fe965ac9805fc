"""Phase B (end-to-end fine-tuning through the memory: LoRA via peft, answer-only loss, KL to the base, distance
curriculum), on tiny random models with the real SmolLM2 tokenizer (the pass-key text is real text)."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import tiny_llama

from senri.training.config import ConfigManager
from senri.training.loop import is_complete
from senri.training.finetune import (
    MIN_LR_RATE, SCHEDULES, FinetuneSettings, add_lora, answer_loss, kl_to_base, lr_factor, passkey_sample,
    run_finetune, seq_len_at, settings_from_config, stage_bounds, stages, curriculum_trained,
)
from senri.model.trained import LORA_FILE, load_trained_memory, read_card, save_trained_memory
from senri.training.transfer import build_student

WINDOW, CHUNK, SINKS = 32, 8, 2


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2[1]


def _student(base):
    return build_student(base, [1, 2], sliding_window=WINDOW, chunk_size=CHUNK, num_sink_tokens=SINKS,
                         memory_update="linear")


def _settings(**overrides) -> FinetuneSettings:
    fields = dict(steps=4, batch_size=2, curriculum=((0.0, 96), (0.5, 128)), save_steps=2, log_steps=1, eval_steps=2,
                  eval_cases=2, eval_length=128, kl_seq_len=64, kl_tokens=16, warmup_steps=1, learning_rate=1e-2,
                  gate_learning_rate=1e-2)
    return FinetuneSettings(**{**fields, **overrides})


CORPUS = list(range(1000, 4000))


def test_passkey_samples_have_the_exact_length_the_answer_last_and_the_needle_beyond_the_window(tokenizer):
    for index in range(40):
        length = random.Random(index).choice([96, 200, 640])
        ids, n_answer = passkey_sample(tokenizer, length, WINDOW + CHUNK, random.Random(index))
        assert len(ids) == length and n_answer == 6
        text = tokenizer.decode(ids)
        key = text.split("The pass key is ")[1][:5]
        assert key.isdigit() and text.endswith("What is the pass key? The pass key is " + key)
        needle_end = text.index(f"{key} is the pass key.") + len(f"{key} is the pass key.")
        question = text.rindex(" What is the pass key?")
        distance = len(tokenizer(text[needle_end:question], add_special_tokens=False)["input_ids"])
        assert distance >= WINDOW + CHUNK
    with pytest.raises(ValueError, match="no room"):
        passkey_sample(tokenizer, 60, 50, random.Random(0))
    settings = _settings(steps=10, curriculum=((0.0, 96), (0.3, 128), (0.6, 256)))
    assert [seq_len_at(s, settings) for s in (0, 2, 3, 5, 6, 9)] == [96, 96, 128, 128, 256, 256]


def test_lora_starts_as_the_model_and_only_adapters_and_memory_parameters_train(tokenizer):
    base = tiny_llama(len(tokenizer))
    student = _student(base)
    ids = torch.randint(0, len(tokenizer), (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = student(input_ids=ids).logits
    model = add_lora(student, _settings())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    lora = [name for name in trainable if "lora_" in name]
    assert lora and all(name.endswith(("memory_gate", "memory_query_map", "memory_key_map")) for name in
                        set(trainable) - set(lora))
    # Adapters on q/k/v/o of the layers from the first memory layer (1) on, none below.
    layers = {int(name.split("layers.")[1].split(".")[0]) for name in lora}
    modules = {name.split(".")[-4] for name in lora}
    assert layers == {1, 2, 3} and modules == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_answer_loss_is_the_cross_entropy_of_each_rows_answer_only(tokenizer):
    model = _student(tiny_llama(len(tokenizer)))
    ids = torch.randint(0, len(tokenizer), (2, 80), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([6, 3])
    logits = model(input_ids=ids).logits  # the naive way: every position's logits
    expected = torch.cat([F.cross_entropy(logits[0, -7:-1], ids[0, -6:], reduction="none"),
                          F.cross_entropy(logits[1, -4:-1], ids[1, -3:], reduction="none")]).mean()
    torch.testing.assert_close(answer_loss(model, ids, lengths), expected, rtol=1e-5, atol=1e-6)


def test_kl_is_zero_for_the_base_itself_and_the_naive_kl_otherwise(tokenizer):
    base = tiny_llama(len(tokenizer))
    ids = torch.randint(0, len(tokenizer), (1, 120), generator=torch.Generator().manual_seed(2))
    assert float(kl_to_base(base, base, ids, 20)) == pytest.approx(0.0, abs=1e-6)
    student = _student(base)
    with torch.no_grad():
        student.model.layers[1].self_attn.memory_gate.fill_(0.7)  # beyond the window the student now differs
    p = base(input_ids=ids).logits[0, -20:].float().log_softmax(-1)
    q = student(input_ids=ids).logits[0, -20:].float().log_softmax(-1)
    expected = (p.exp() * (p - q)).sum(-1).mean()
    got = kl_to_base(student, base, ids, 20)
    assert float(got) > 1e-4
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("schedule", ["cosine", "stage_cosine"])
def test_finetune_resumes_exactly(tokenizer, tmp_path, schedule):
    def trained(out_dir, steps_first=None):
        base = tiny_llama(len(tokenizer))
        model = add_lora(_student(base), _settings())
        if steps_first is not None:  # an interrupted run: a shorter time, then the same run again
            run_finetune(base, model, tokenizer, CORPUS, _settings(time_budget_s=0.0, schedule=schedule), out_dir)
            base = tiny_llama(len(tokenizer))
            model = add_lora(_student(base), _settings())
        result = run_finetune(base, model, tokenizer, CORPUS, _settings(schedule=schedule), out_dir)
        return result, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    straight, params = trained(tmp_path / "straight")
    resumed, params_resumed = trained(tmp_path / "resumed", steps_first=1)
    assert straight["steps"] == resumed["steps"] == 4
    for name in params:
        torch.testing.assert_close(params_resumed[name], params[name], rtol=0, atol=0)
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"answer_loss", "kl", "memory_on_accuracy", "memory_off_accuracy", "gate/1/mean"} <= set(records[1])
    assert any(p.abs().max() > 0 for n, p in params.items() if "lora_B" in n)  # the adapters moved
    # each step trained at the schedule's rate, the resumed steps too (the record of step s: optimiser step s - 1)
    rates = [r["learning_rate"] for r in records]
    assert rates == pytest.approx([1e-2 * lr_factor(r["step"] - 1, _settings(schedule=schedule)) for r in records])


def test_cosine_is_transformers_cosine_with_min_lr():
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    settings = _settings(steps=60, warmup_steps=7, curriculum=((0.0, 96), (0.3, 128), (0.7, 160)))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_cosine_with_min_lr_schedule_with_warmup(optimizer, 7, 60, min_lr_rate=MIN_LR_RATE)
    for step in range(60):
        assert lr_factor(step, settings) == pytest.approx(reference.lr_lambdas[0](step), abs=1e-12)


def test_stage_cosine_warms_up_and_decays_within_each_curriculum_stage():
    settings = _settings(steps=100, warmup_steps=10, curriculum=((0.0, 96), (0.5, 128), (0.75, 160), (0.75, 192)),
                         schedule="stage_cosine")
    # the stages are where the length changes; a stage with no step of its own (160 here) is left out
    assert stage_bounds(settings) == [(0, 50), (50, 75), (75, 100)]
    assert [seq_len_at(s, settings) for s in (0, 49, 50, 74, 75, 99)] == [96, 96, 128, 128, 192, 192]
    cosine = _settings(steps=100, warmup_steps=10, curriculum=settings.curriculum)
    for first, end in stage_bounds(settings):
        rates = [lr_factor(s, settings) for s in range(first, end)]
        assert rates[0] == 0.0 and rates[10] == pytest.approx(1.0)   # a fresh warm-up at each new length
        assert rates[:11] == sorted(rates[:11]) and rates[10:] == sorted(rates[10:], reverse=True)
        assert rates[-1] == pytest.approx(MIN_LR_RATE, abs=0.02)     # down to the floor by the stage's end
        # the run-long cosine enters the later stages well below the peak; the restart does not
        assert max(rates) > max(lr_factor(s, cosine) for s in range(first, end)) or first == 0
    short = _settings(steps=12, warmup_steps=10, curriculum=((0.0, 96), (0.5, 128)), schedule="stage_cosine")
    assert [lr_factor(s, short) for s in (6, 9)] == [0.0, pytest.approx(1.0)]  # warm-up: at most half a stage
    constant = _settings(steps=100, warmup_steps=10, schedule="constant")
    assert [lr_factor(s, constant) for s in (0, 5, 10, 99)] == [0.0, 0.5, 1.0, 1.0]
    assert set(SCHEDULES) == {"cosine", "stage_cosine", "constant"}
    with pytest.raises(ValueError, match="schedule must be one of cosine, stage_cosine, constant, got 'step'"):
        lr_factor(3, _settings(schedule="step"))


@pytest.mark.parametrize("steps", [7, 12, 100, 400])
def test_stages_and_the_steps_trained_at_each_agree_with_the_length_of_every_step(steps):
    settings = _settings(steps=steps, curriculum=((0.0, 512), (0.1, 640), (0.2, 1024), (0.4, 2048), (0.7, 4096)))
    for first, end, length in stages(settings):
        assert {seq_len_at(s, settings) for s in range(first, end)} == {length}
    assert sum(end - first for first, end, _ in stages(settings)) == steps
    for done in range(steps + 1):
        trained = curriculum_trained(settings, done)
        # each stage's trained steps are the steps below ``done`` at its length: nothing counted twice or lost
        assert sum(stage["trained"] for stage in trained) == done
        for stage in trained:
            assert stage["trained"] == sum(1 for s in range(done) if seq_len_at(s, settings) == stage["seq_len"])
    at_150 = curriculum_trained(_settings(steps=400, curriculum=settings.curriculum), 150)
    assert at_150 == [{"seq_len": 512, "steps": 40, "trained": 40}, {"seq_len": 640, "steps": 40, "trained": 40},
                      {"seq_len": 1024, "steps": 80, "trained": 70}, {"seq_len": 2048, "steps": 120, "trained": 0},
                      {"seq_len": 4096, "steps": 120, "trained": 0}]


def test_a_shipped_finetune_merges_its_lora_and_refuses_broken_artifacts(tokenizer, tmp_path):
    base = tiny_llama(len(tokenizer))
    model = add_lora(_student(base), _settings())
    run_finetune(base, model, tokenizer, CORPUS, _settings(steps=2), tmp_path / "run")
    directory = save_trained_memory(model, base, tmp_path / "art", "tiny", {"steps": 2})
    card = read_card(directory)
    assert card["lora"]["r"] == 8 and (directory / LORA_FILE).exists()
    ids = torch.randint(0, len(tokenizer), (1, 90), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        loaded = load_trained_memory(base, directory)
        assert type(loaded).__name__ == "SenriForCausalLM" and not any("lora" in n for n, _ in loaded.named_parameters())
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
    (directory / LORA_FILE).unlink()
    with pytest.raises(ValueError, match="lora_parameters.safetensors is missing"):
        load_trained_memory(base, directory)
    card["lora"]["r"] = 4
    (directory / "card.json").write_text(json.dumps(card))
    save_trained_memory(model, base, tmp_path / "art2", "tiny", {})
    (tmp_path / "art2" / "card.json").write_text(json.dumps({**read_card(tmp_path / "art2"), "lora": card["lora"]}))
    with pytest.raises(ValueError, match="do not match the card's LoRA settings"):
        load_trained_memory(base, tmp_path / "art2")


def test_the_real_finetune_profile_and_its_validation():
    settings = settings_from_config(ConfigManager("real-finetune"))
    assert settings.curriculum == ((0.0, 640), (0.3, 1024), (0.6, 2048)) and settings.eval_length == 2048
    assert settings.gate_learning_rate == pytest.approx(10 * settings.learning_rate)
    for bad in ([[0.0, 200]], [[0.2, 640]], [[0.0, 640], [1.5, 1024]], [[0.0, 640], [0.5, 1024], [0.3, 2048]]):
        with pytest.raises(ValueError, match="finetune_curriculum"):
            settings_from_config(ConfigManager("real-finetune", {"training.finetune_curriculum": bad}))
    assert settings.schedule == "cosine"
    assert settings_from_config(ConfigManager("real-finetune", {"training.finetune_schedule": "stage_cosine"})
                                ).schedule == "stage_cosine"
    with pytest.raises(ValueError, match="finetune_schedule"):
        ConfigManager("real-finetune", {"training.finetune_schedule": "restart"})


def test_every_metrics_record_has_the_losses_and_evaluations_log_memory_on_and_off(tokenizer, tmp_path):
    base = tiny_llama(len(tokenizer))
    model = add_lora(_student(base), _settings())
    run_finetune(base, model, tokenizer, CORPUS, _settings(log_steps=3, eval_steps=2), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3, 4]  # evaluations at 2 and 4 (the last step), a log at 3
    assert all("loss" in r and "answer_loss" in r and "gate/1/mean" in r for r in records)
    assert ["memory_on_accuracy" in r for r in records] == [True, False, True]


@pytest.mark.slow
def test_the_real_finetune_profile_trains_through_senri_training_from_phase_a_with_drive(tmp_path):
    """`training.recipe: finetune` (02_training's path) on the real SmolLM2: starts from phase A's shipped memory,
    writes a Trainer-shaped summary, metrics with losses, gates and memory on/off accuracy, final/ with LoRA merged,
    trained_memory/ with the adapters, the state mirrored to (a stand-in) Drive at each save."""
    from senri.model.conversion import load_local_smollm2
    from senri.training.recipes import train

    cfg = ConfigManager("real-finetune", {
        "training.max_steps": 2, "training.per_device_batch_size": 1, "training.finetune_curriculum": [[0.0, 384]],
        "training.finetune_eval_steps": 2, "training.save_steps": 1, "training.logging_steps": 1,
        "experiment.run_dir": str(tmp_path / "run"), "experiment.drive_dir": str(tmp_path / "drive")})
    summary = train(cfg)
    assert summary["recipe"] == "finetune" and summary["global_step"] == 2 and summary["final_loss"] > 0
    assert summary["last_eval"]["memory_off_accuracy"] == 0.0
    assert summary["curriculum"] == [{"seq_len": 384, "steps": 2, "trained": 2}]
    card = read_card(tmp_path / "run" / "trained_memory")
    assert card["summary"]["curriculum"] == summary["curriculum"]
    assert card["recipe"]["init"]["recipe"]["name"].startswith("phase A") and card["lora"]["r"] == 8
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and "gate/20/mean" in records[-1]
    assert is_complete(tmp_path / "drive" / "checkpoint-2")
    assert (tmp_path / "drive" / "final" / "config.json").is_file()
    # final/ is the model with its adapters merged: what load_trained_memory rebuilds from trained_memory/.
    from senri import SenriForCausalLM

    final = SenriForCausalLM.from_pretrained(tmp_path / "run" / "final")
    rebuilt = load_trained_memory(load_local_smollm2()[0], tmp_path / "run" / "trained_memory")
    ids = torch.arange(100, 500)[None]
    with torch.no_grad():
        torch.testing.assert_close(final(input_ids=ids).logits, rebuilt(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    # A checkpoint becomes the same trained memory the finished run wrote (so an intermediate stage can be graded):
    # the last checkpoint's export reads exactly as trained_memory/; a pruned or missing step is refused by name.
    from senri.training.recipes import checkpoint_memory

    exported = checkpoint_memory(tmp_path / "run", 2, tmp_path / "step-2")
    assert read_card(exported)["summary"]["checkpoint"].endswith("checkpoint-2")
    again = load_trained_memory(load_local_smollm2()[0], exported)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, rebuilt(input_ids=ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"checkpoint-7 is not a complete checkpoint; this run keeps steps \[1, 2\]"):
        checkpoint_memory(tmp_path / "run", 7)
