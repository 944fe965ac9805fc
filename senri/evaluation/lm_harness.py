"""The field's long-context benchmarks through EleutherAI's lm-evaluation-harness: Senri as any causal LM.

RULER's needle tasks and BABILong run on Senri exactly as on a transformers model, in a notebook::

    from senri.evaluation.lm_harness import harness_lm, run_tasks
    lm = harness_lm(model, tokenizer)                  # lm-eval's HFLM around the model object
    scores = run_tasks(lm, ["niah_single_1"], tokenizer_dir, lengths=[4096, 8192], samples=10)

or from the command line on a saved model (``save_pretrained`` writes the code; ``trust_remote_code`` loads it)::

    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --tasks niah_single_1 \\
        --metadata '{"max_seq_lengths": [4096, 8192]}' --limit 10

Nothing here changes lm-eval: Senri's context is not bounded by its window, and a converted model's config says so
(``max_position_embeddings`` = :data:`senri.model.conversion.STREAM_CONTEXT`), which is where lm-eval reads the
length it truncates prompts to. lm-eval is an optional dependency (``pip install "lm-eval[ruler]"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# RULER's needle-in-a-haystack tasks (lm-eval names). Offline only niah_single_1 and niah_multikey_2/3 can build their
# haystacks (a repeated filler, or needles among needles); the others read Paul Graham's essays from the Hub.
RULER_NIAH = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue",
              "niah_multiquery")
RULER_OFFLINE = ("niah_single_1", "niah_multikey_2", "niah_multikey_3")
BABILONG = ("babilong_qa1", "babilong_qa2", "babilong_qa3", "babilong_qa4", "babilong_qa5")  # the Hub's data
RULER_SAMPLES_PER_LENGTH = 500  # RULER generates 500 samples per length, the lengths one after the other


def harness_lm(model: Any, tokenizer: Any, max_length: int | None = None, batch_size: int = 1) -> Any:
    """lm-eval's ``HFLM`` around an in-memory causal LM. ``max_length`` (the longest prompt lm-eval keeps) defaults to
    the model config's ``max_position_embeddings``, as lm-eval reads it for a model loaded by name."""
    from lm_eval.models.huggingface import HFLM

    length = max_length or model.config.max_position_embeddings
    return HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", max_length=length, batch_size=batch_size)


def ruler_sample_indices(lengths: Sequence[int], samples: int) -> list[int]:
    """The first ``samples`` of each length's RULER samples (``limit`` would take them all from the first length)."""
    if not 0 < samples <= RULER_SAMPLES_PER_LENGTH:
        raise ValueError(f"samples must be in 1..{RULER_SAMPLES_PER_LENGTH}, got {samples}")
    return [i * RULER_SAMPLES_PER_LENGTH + j for i in range(len(lengths)) for j in range(samples)]


def run_tasks(
    lm: Any, tasks: Sequence[str], tokenizer_dir: str | Path, lengths: Sequence[int], samples: int,
    include_path: str | Path | None = None,
) -> dict[str, dict[str, float]]:
    """Scores per task and metric from ``lm_eval.simple_evaluate``: RULER tasks one metric per length, BABILong
    ``acc@LENGTH``, other tasks (local ones from ``include_path``) their own metrics.

    ``tokenizer_dir``: where the RULER tasks load the tokenizer that sizes their haystacks (a model object does not
    name one). RULER tasks take the first ``samples`` of every length; the others their first ``samples`` (BABILong
    per length: its data set has one configuration per length, "4k", "8k"...). RULER reports a length no sample had
    as -1: left out."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    def evaluate(names: list[str], metadata: dict[str, Any], **selection: Any) -> dict[str, dict[str, float]]:
        # The tasks read their metadata from the task manager (simple_evaluate's own is used only without one).
        manager = TaskManager(include_path=None if include_path is None else str(include_path), metadata=metadata)
        output = simple_evaluate(model=lm, tasks=names, task_manager=manager, log_samples=False, **selection)
        return {task: {key.split(",")[0]: float(value) for key, value in results.items()
                       if isinstance(value, (int, float)) and "_stderr" not in key and value != -1
                       and key != "sample_len"}  # lm-eval's count of samples, not a score
                for task, results in output["results"].items()}

    ruler = [task for task in tasks if task.startswith("niah_")]
    babilong = [task for task in tasks if task.startswith("babilong")]
    others = [task for task in tasks if task not in ruler and task not in babilong]
    scores: dict[str, dict[str, float]] = {}
    if ruler:
        scores.update(evaluate(ruler, {"tokenizer": str(tokenizer_dir), "max_seq_lengths": list(lengths)},
                               samples={task: ruler_sample_indices(lengths, samples) for task in ruler}))
    for length in lengths if babilong else ():
        for task, metrics in evaluate(babilong, {"max_seq_lengths": f"{length // 1024}k"}, limit=samples).items():
            scores.setdefault(task, {}).update({f"{metric}@{length}": value for metric, value in metrics.items()})
    if others:
        scores.update(evaluate(others, {}, limit=samples))
    return scores


__all__ = ["BABILONG", "RULER_NIAH", "RULER_OFFLINE", "harness_lm", "ruler_sample_indices", "run_tasks"]
