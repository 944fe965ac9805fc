"""lm-evaluation-harness runs Senri as any causal LM: in a notebook (HFLM around the model object) and from its command
line on a saved model (trust_remote_code), prompts far beyond the window kept whole. Offline: a tiny model and local
tasks (RULER's and BABILong's numbers on the real model are in docs/RESULTS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from senri.model.conversion import STREAM_CONTEXT
from senri.evaluation.lm_harness import harness_lm, ruler_sample_indices, run_tasks
from tests.conftest import tiny_model

CHOICE_TASK = """task: senri_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}\\nQuestion: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""
RECALL_TASK = """task: senri_local_recall
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}\\nQuestion: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
NAMES = ["Biscuit", "Pepper", "Mango", "Juniper", "Olive", "Clover"]


def _tasks(tmp_path, tokenizer):
    filler = " ".join(["The archive keeps its records in order, and the clerks file each one by date."] * 20)
    docs = [{"context": f"My neighbour's cat is called {name}. {filler}", "question": "What is the cat called?",
             "answer": name, "choices": [f" {n}" for n in NAMES[:3]] + [f" {name}"], "label": 3} for name in NAMES]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs), encoding="utf-8")
    (tmp_path / "choice.yaml").write_text(CHOICE_TASK.format(data=data), encoding="utf-8")
    (tmp_path / "recall.yaml").write_text(RECALL_TASK.format(data=data), encoding="utf-8")
    return docs, len(tokenizer(docs[0]["context"]).input_ids)


def _senri(tokenizer):
    return tiny_model(vocab_size=len(tokenizer), num_sink_tokens=4, max_position_embeddings=STREAM_CONTEXT)


def _own_choice_accuracy(model, tokenizer, docs) -> float:
    """Multiple choice as lm-eval scores it (the choice's summed log-probability after the prompt), by Senri alone,
    streaming the prompt and the choice through the cache in 64-token pieces."""
    correct = 0
    for doc in docs:
        prompt = f"{doc['context']}\nQuestion: {doc['question']}\nAnswer:"
        scores = []
        for choice in doc["choices"]:
            context, whole = tokenizer(prompt).input_ids, tokenizer(prompt + choice).input_ids
            ids = torch.tensor([whole])
            cache, logits = model.new_cache(), []
            with torch.no_grad():
                for piece in ids.split(64, dim=1):
                    logits.append(model(input_ids=piece, cache=cache).logits)
            logprobs = F.log_softmax(torch.cat(logits, dim=1)[0, :-1].float(), dim=-1)
            targets = ids[0, 1:]
            scores.append(logprobs[len(context) - 1 :].gather(-1, targets[len(context) - 1 :, None]).sum().item())
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return correct / len(docs)


def test_lm_eval_runs_senri_in_process_on_prompts_far_beyond_the_window(tmp_path, smollm2):
    _, tokenizer = smollm2
    docs, prompt_tokens = _tasks(tmp_path, tokenizer)
    model = _senri(tokenizer)
    assert prompt_tokens > 10 * model.config.sliding_window
    seen = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["input_ids"]).shape[1]), with_kwargs=True
    )
    lm = harness_lm(model, tokenizer)
    assert lm.max_length == STREAM_CONTEXT  # lm-eval keeps prompts of any length whole
    scores = run_tasks(lm, ["senri_local_choice", "senri_local_recall"], "unused", [], samples=len(docs),
                       include_path=tmp_path)
    hook.remove()
    assert max(seen) >= prompt_tokens  # the whole prompt reached the model, untruncated
    assert set(scores) == {"senri_local_choice", "senri_local_recall"}
    assert 0.0 <= scores["senri_local_recall"]["exact_match"] <= 1.0
    # lm-eval's log-likelihoods (one forward over prompt + choice) rank the choices as Senri streaming them does.
    assert scores["senri_local_choice"]["acc"] == _own_choice_accuracy(model, tokenizer, docs)


def test_lm_eval_command_line_loads_a_saved_senri_model_with_its_code(tmp_path, smollm2):
    _, tokenizer = smollm2
    docs, _ = _tasks(tmp_path, tokenizer)
    model = _senri(tokenizer)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={tmp_path / 'model'},trust_remote_code=True,dtype=float32", "--tasks", "senri_local_choice",
               "--include_path", str(tmp_path), "--limit", str(len(docs)), "--output_path", str(tmp_path / "out"),
               "--device", "cpu"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["results"]["senri_local_choice"]["acc,none"] == _own_choice_accuracy(model, tokenizer, docs)
    assert results["config"]["model_num_parameters"] == sum(p.numel() for p in model.parameters())


def test_ruler_samples_are_taken_from_every_length():
    assert ruler_sample_indices([4096, 8192], 3) == [0, 1, 2, 500, 501, 502]


def test_ruler_builds_its_haystacks_offline_with_the_tokenizer_given(tmp_path, smollm2):
    """RULER's niah_single_1 generates its samples locally, sized by the tokenizer ``run_tasks`` hands it; the model
    answers them through lm-eval's generate_until (a 1K-token prompt: 64 windows of the tiny model)."""
    _, tokenizer = smollm2
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    model = _senri(tokenizer)
    scores = run_tasks(harness_lm(model, tokenizer), ["niah_single_1"], tmp_path / "tokenizer", [1024], samples=1)
    assert set(scores) == {"niah_single_1"} and set(scores["niah_single_1"]) == {"1024"}
    assert 0.0 <= scores["niah_single_1"]["1024"] <= 1.0
