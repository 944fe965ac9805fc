"""The measurements behind docs/RESULTS.md's real-model tables, each reproducible with one command.

    python -m senri.reports sinks                       # NLL beyond 2x the window: base, no sinks, 4 sinks
    python -m senri.reports placement SEED CASES        # perfect-memory ceiling per placement (2K and 4K tokens)
    python -m senri.reports real KIND LENGTH CASES      # base / gates closed / shipped memory (KIND: passkey | fact | nll)
    python -m senri.reports grid DIRS CASES             # the grid: facts and pass keys 8x-64x, NLL (DIRS: base, shipped, trained memories, DIR@memory_update=delta or DIR@memory_feature_map=dpfp; every DIR below takes the same @)
    python -m senri.reports grid-at DIRS CASES LENGTHS  # the same at chosen lengths (comma-separated tokens)
    python -m senri.reports grid-merge A.json,B.json    # several grid runs' records together, and their summary
    python -m senri.reports corpus                      # the prose corpus: documents and tokens per source and split
    python -m senri.reports ceiling CASES LENGTHS       # the grid's recall cells for a perfect memory on layers 4-23
    python -m senri.reports store-selection CASES LENGTHS SCORE  # would a store chosen by SCORE (recall: LoLA | relative: recall error / |v| | attention: H2O) hold the needle?
    python -m senri.reports read-fidelity DIR CASES LENGTHS  # the needle's share of the memory's read weight, beside softmax / Taylor / full attention
    python -m senri.reports read-capacity DIR CASES LENGTHS  # the best share any query could read off the written keys (ELU+1 and larger maps), beside the memory's own read
    python -m senri.reports read-fit DIR TRAIN_CASES LENGTH STEPS CASES LENGTHS  # each memory layer's query map fitted to read training facts, measured on the grid's held-out ones
    python -m senri.reports read-fit-qk DIR TRAIN_CASES LENGTH STEPS CASES LENGTHS  # the same with each layer's key map fitted too
    python -m senri.reports read-fit-keep DIR TRAIN_CASES LENGTH STEPS CASES LENGTHS PRESERVE PASSKEYS  # q/k fit keeping the ordinary reads
    python -m senri.reports fitted-reads DIR FITTED_DIRS CASES LENGTHS  # fitted maps' reads (needle, value) and drift
    python -m senri.reports kernel-fit DIR CASES LENGTHS FEATURES STEPS INPUTS  # the same with a Hedgehog feature map fitted to attention on training prose (INPUTS: memory | rotated)
    python -m senri.reports stream TOKENS EVERY         # loss per 4K block of a long stream vs fresh starts (every EVERY-th block)
    python -m senri.reports stream-sinks TOKENS         # the same stream, gates closed, per sink placement
    python -m senri.reports ruler LENGTHS SAMPLES TASKS  # lm-eval's RULER (TASKS: offline | all | a,b): trained / closed / base
    python -m senri.reports ruler-of LENGTHS SAMPLES TASKS DIR MODELS  # the same for a trained memory DIR, MODELS of the three
    python -m senri.reports ship STATE UPDATE           # ship a phase-A state (transfer_state.pt, memory_update UPDATE)
    python -m senri.reports ship-run RUN_DIR GRID_JSON  # ship a finished phase-B run with its grid numbers
    python -m senri.reports checkpoint-memory RUN_DIR STEP  # a run's checkpoint as RUN_DIR/step-STEP/trained_memory (for grid-at)

Each prints its records and writes them as JSON under ``runs/reports/``. All run on the offline SmolLM2 with window
256 and chunk 64 (the ``cpu-real`` profile); one CPU thread unless ``OMP_NUM_THREADS`` says otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .model.conversion import convert_llama_to_senri, load_local_smollm2
from .evaluation.diagnostics import nll_beyond, placement_ceiling
from .model.io import atomic_write
from .evaluation.real_model import compare_on_cases, depths_beyond_window, gates_closed, nll_table, passkey_cases

WINDOW, CHUNK = 256, 64
OUT_DIR = Path("runs/reports")
# The placements compared in docs/RESULTS.md (layers that would carry memory; "all 30" is the base model).
PLACEMENTS = {
    "all 30 (base)": list(range(30)), "none": [], "10,20 (seeds)": [10, 20], "16-23": list(range(16, 24)),
    "8-23": list(range(8, 24)), "4-23": list(range(4, 24)),
}


def texts() -> dict[str, str]:
    """Held-out natural text that ships with Python: never used in training (senri.training.transfer trains on licences of
    the installed packages; the first entry here is those, for the sink measurement only)."""
    import pydoc_data.topics as topics

    from .training.transfer import local_text_corpus

    return {
        "package licences (joined)": "\n\n".join(local_text_corpus()),
        "Python LICENSE.txt": Path(sys.base_prefix, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}",
                                   "LICENSE.txt").read_text(encoding="utf-8", errors="ignore"),
        "pydoc topics": "\n\n".join(topics.topics[k] for k in sorted(topics.topics)),
    }


def long_prose(tokenizer: Any, tokens: int) -> torch.Tensor:
    """(1, tokens) of prose for long streams: the pydoc topics (113K tokens), then the docstrings of the standard
    library's modules in file order. The shipped memory never trained on either; the text recipe trains on their
    training halves (:mod:`senri.tasks.corpus`), so a memory from it is measured on held-out documents instead."""
    from .tasks.corpus import stdlib_docstrings

    parts = [texts()["pydoc topics"]]
    held = len(tokenizer(parts[0]).input_ids)
    for _, docs in stdlib_docstrings():
        if held >= tokens:
            break
        parts += docs
        held += sum(len(tokenizer(doc).input_ids) for doc in docs)
    ids = tokenizer("\n\n".join(parts), return_tensors="pt").input_ids
    if ids.shape[1] < tokens:
        raise ValueError(f"only {ids.shape[1]} tokens of held-out prose here; asked for {tokens}")
    return ids[:, :tokens]


STREAM_BLOCK, STREAM_PIECE = 4096, 1024


def stream(tokens: int, fresh_every: int) -> dict[str, Any]:
    """One stream of ``tokens`` held-out tokens in 1024-token pieces through the shipped memory, with its gates closed
    and as trained: per 4K block, the loss in the stream beside a fresh stream started at that block (at every
    ``fresh_every``-th block: 1 for all)."""
    from .evaluation.harness import stream_vs_fresh

    _, trained, tokenizer = _models(None)
    ids = long_prose(tokenizer, tokens).to(_device())
    records = []
    for name in ("gates closed", "trained"):
        with gates_closed(trained) if name == "gates closed" else contextlib.nullcontext():
            for row in stream_vs_fresh(trained, ids, STREAM_BLOCK, STREAM_PIECE, fresh_every):
                records.append(dict(row, model=name))
                print(records[-1], flush=True)
    worst = {name: max(r["ratio"] for r in records if r["model"] == name and "ratio" in r)
             for name in ("gates closed", "trained")}
    return {"tokens": tokens, "block": STREAM_BLOCK, "piece": STREAM_PIECE, "fresh_every": fresh_every,
            "worst_ratio": worst, "records": records}


def stream_sinks(tokens: int) -> dict[str, Any]:
    """The converted SmolLM2 (gates closed) streamed over ``tokens`` held-out tokens, per attention-sink placement
    (``sink_max_distance``; None: the sinks at their own positions): mean loss per 4K block."""
    from .evaluation.harness import token_nlls

    llama, tokenizer = load_local_smollm2()
    ids = long_prose(tokenizer, tokens)
    records = []
    for distance in (None, 0, 1024, 4096, 8192):
        model = convert_llama_to_senri(llama, sliding_window=WINDOW, chunk_size=CHUNK, sink_max_distance=distance)
        with torch.inference_mode():
            nlls = token_nlls(model.eval(), ids, STREAM_PIECE)
        blocks = [round(nlls[i : i + STREAM_BLOCK].mean().item(), 4) for i in range(0, nlls.numel(), STREAM_BLOCK)]
        records.append({"sink_max_distance": distance, "block": STREAM_BLOCK, "nll_per_block": blocks})
        print(records[-1], flush=True)
    return {"tokens": tokens, "records": records}


def ruler(lengths: str, samples: int, tasks: str, directory: str = "shipped",
          models: str = "trained,gates closed,base") -> dict[str, Any]:
    """lm-evaluation-harness's RULER needle tasks (``tasks``: "offline" for those whose haystacks build without the
    Hub, "all" for the six NIAH tasks and BABILong qa1-qa5, or a comma-separated list) at ``lengths`` (comma-separated
    tokens), ``samples`` per length, for the trained memory in ``directory`` (default: the shipped one), its gates
    closed and the base with full attention (``models``: which of the three; every prompt kept whole: max_length
    above the longest)."""
    from .evaluation.lm_harness import BABILONG, RULER_NIAH, RULER_OFFLINE, harness_lm, run_tasks

    llama, trained, tokenizer = _models(None if directory == "shipped" else directory)
    chosen = models.split(",")
    unknown = set(chosen) - {"trained", "gates closed", "base"}
    if unknown:
        raise ValueError(f"models {sorted(unknown)} are not valid; valid models are ['trained', 'gates closed', 'base']")
    names = {"offline": list(RULER_OFFLINE), "all": list(RULER_NIAH) + list(BABILONG)}.get(tasks, tasks.split(","))
    sizes = [int(n) for n in lengths.split(",")]
    longest = max(sizes) + 512
    tokenizer_dir = OUT_DIR / "tokenizer"  # RULER sizes its haystacks with it
    tokenizer.save_pretrained(tokenizer_dir)
    records = []
    for model_name, model in (("trained", trained), ("gates closed", trained), ("base", llama)):
        if model_name not in chosen:
            continue
        with gates_closed(trained) if model_name == "gates closed" else contextlib.nullcontext():
            lm = harness_lm(model, tokenizer, max_length=longest)
            for task, scores in run_tasks(lm, names, tokenizer_dir, sizes, samples).items():
                records.append({"model": model_name, "task": task, "samples": samples, "scores": scores})
                print(records[-1], flush=True)
    return {"lengths": sizes, "samples": samples, "records": records}


def sinks() -> list[dict[str, Any]]:
    llama, tokenizer = load_local_smollm2()
    rows = []
    for name, text in texts().items():
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :2048]
        row: dict[str, Any] = {"text": name, "tokens": ids.shape[1], "base": nll_beyond(llama, ids, 2 * WINDOW)}
        for count in (0, 4):
            model = convert_llama_to_senri(llama, sliding_window=WINDOW, chunk_size=CHUNK, num_sink_tokens=count)
            row[f"window {WINDOW}, {count} sinks"] = nll_beyond(model, ids, 2 * WINDOW)
        print(row, flush=True)
        rows.append(row)
    return rows


def placement(seed: int, cases: int) -> list[dict[str, Any]]:
    llama, tokenizer = load_local_smollm2()
    text = texts()["Python LICENSE.txt"]
    text_ids = tokenizer(text, return_tensors="pt").input_ids[:, :2048]
    return placement_ceiling(llama, tokenizer, PLACEMENTS, [2048, 4096], cases, sliding_window=WINDOW,
                             chunk_size=CHUNK, text_ids=text_ids, seed=seed, prefill_tokens=2048, progress=True)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _models(directory: str | None) -> tuple[Any, Any, Any]:
    """(base with full attention, the trained memory of ``directory`` (default: the shipped one), tokenizer)."""
    from .model.trained import SMOLLM2_WINDOW256, load_trained_memory

    llama, tokenizer = load_local_smollm2()
    trained = load_trained_memory(llama, directory or SMOLLM2_WINDOW256)
    return llama.to(_device()), trained.to(_device()), tokenizer


def _three_way(llama: Any, trained: Any, tokenizer: Any, kind: str, length: int, cases: int) -> list[dict[str, Any]]:
    if kind == "nll":
        ids = tokenizer(texts()["pydoc topics"], return_tensors="pt").input_ids[:, 20000 : 20000 + length]
        ids = ids.to(_device())
        records = nll_table({"trained": trained, "base": llama}, ids, WINDOW, CHUNK)
        with gates_closed(trained):
            records += [dict(r, model="gates closed") for r in nll_table({"x": trained}, ids, WINDOW, CHUNK)]
        return records
    depths = depths_beyond_window(length, WINDOW, CHUNK)
    if kind == "passkey":
        case_list = passkey_cases(tokenizer, length, cases, seed=7, depths=depths)
    elif kind == "fact":  # the grid's fact cell: held-out facts, one distractor, in held-out documents
        case_list = grid_cases(tokenizer, [length], cases)[("fact", length)]
    else:
        raise ValueError(f"kind {kind!r} is unknown; valid kinds are ['passkey', 'fact', 'nll']")
    name = f"{kind} {length}"
    records = compare_on_cases({"trained": trained}, {name: case_list}, progress=True)
    with gates_closed(trained):
        records += compare_on_cases({"gates closed": trained}, {name: case_list}, progress=True)
    return records + compare_on_cases({"base": llama}, {name: case_list}, progress=True)


def real(kind: str, length: int, cases: int, directory: str | None = None) -> dict[str, Any]:
    """Base (full attention), the shipped memory with its gates closed, and with them as trained, on the same
    cases (``seed=7``, needles beyond the window). On a GPU when there is one."""
    llama, trained, tokenizer = _models(directory)
    return {"kind": kind, "length": length, "records": _three_way(llama, trained, tokenizer, kind, length, cases)}


# The grid: pass keys and natural-text facts (held-out wording, entities and documents) at 8x-64x the window, and the
# NLL of held-out prose inside the window and beyond twice the window.
GRID_LENGTHS = (2048, 4096, 8192, 16384)
GRID_SEED = 7


def grid_cases(tokenizer: Any, lengths: Sequence[int], cases: int) -> dict[tuple[str, int], list[Any]]:
    """The grid's cases per (kind, length): the classic pass key, and held-out facts (one distractor) in held-out
    documents; needles beyond the window at every length."""
    from .tasks.corpus import documents
    from .tasks.facts import fact_cases

    heldout = documents(split="heldout")
    out: dict[tuple[str, int], list[Any]] = {}
    for length in lengths:
        depths = depths_beyond_window(length, WINDOW, CHUNK)
        out[("passkey", length)] = passkey_cases(tokenizer, length, cases, seed=GRID_SEED, depths=depths)
        out[("fact", length)] = fact_cases(tokenizer, heldout, length, cases, GRID_SEED, depths, distractors=1)
    return out


def grid_texts(tokenizer: Any, tokens: int = 4096) -> dict[str, torch.Tensor]:
    """Two held-out stretches of ``tokens`` tokens for the NLL cells: a held-out Gutenberg work and held-out
    documentation (package READMEs, one after another)."""
    from .tasks.corpus import documents

    out = {}
    for name, sources in (("gutenberg", ["gutenberg"]), ("documentation", ["package-docs"])):
        text = "\n\n".join(d.text for d in documents(sources, "heldout"))
        out[name] = tokenizer(text, return_tensors="pt").input_ids[:, 2000 : 2000 + tokens]
    return out


def _grid_models(directories: Sequence[str]) -> Iterator[tuple[str, Any]]:
    """(name, model) for each entry: "base" is the base with full attention; any other is a trained memory, followed
    by its gates-closed twin."""
    from .model.trained import load_trained_memory
    from .training.finetune import init_directory

    llama, _ = load_local_smollm2()
    for directory in directories:
        if directory == "base":
            yield "base", llama.to(_device())
            continue
        # "DIR@key=value,...": the trained memory read with other settings that shape no parameter (a lever).
        path, overrides = memory_spec(directory)
        model = load_trained_memory(llama, init_directory(path), overrides=overrides).to(_device())
        yield directory, model
        if not overrides:  # a lever's gates closed are its memory's gates closed: measured once, without the "@"
            with gates_closed(model):
                yield f"{directory} (gates closed)", model


def grid(directories: str, cases: int, lengths: str = ",".join(map(str, GRID_LENGTHS))) -> dict[str, Any]:
    """Every grid cell (:func:`grid_cases`, :func:`grid_texts`) for each entry of ``directories`` (comma-separated:
    "base" for the base with full attention, "shipped" for the package's memory, a trained memory's directory, with
    its gates as trained and closed). Each model's records are written to ``runs/reports/grid-partial-*.json`` as they
    come, so a stopped run keeps what it measured.
    The summary gives, per trained memory, the share of the NLL gap beyond 2x the window (gates closed -> base)
    that the memory closes and its in-window perplexity relative to the base's."""
    _, tokenizer = load_local_smollm2()
    sizes = [int(n) for n in str(lengths).split(",")]
    case_sets = grid_cases(tokenizer, sizes, cases)
    stretches = grid_texts(tokenizer)
    records: list[dict[str, Any]] = []
    for name, model in _grid_models([d for d in directories.split(",") if d]):
        for (kind, length), case_list in case_sets.items():
            for r in compare_on_cases({name: model}, {f"{kind} {length}": case_list}, progress=True):
                records.append(dict(r, kind=kind, length=length))
        for text, ids in stretches.items():
            for r in nll_table({name: model}, ids.to(_device()), WINDOW, CHUNK):
                records.append(dict(r, kind="nll", text=text, length=ids.shape[1]))
                print(records[-1], flush=True)
        with atomic_write(OUT_DIR / f"grid-partial-{directories.replace('/', '_')}-{cases}.json") as f:
            json.dump({"directories": directories, "cases": cases, "records": records}, f, indent=1)
    return {"directories": directories, "cases": cases, "records": records, "summary": grid_summary(records)}


def corpus_table() -> list[dict[str, Any]]:
    """Per offline source: documents and SmolLM2 tokens in the training and held-out halves of the split."""
    from .tasks.corpus import OFFLINE_SOURCES, documents

    _, tokenizer = load_local_smollm2()
    rows = []
    for source in OFFLINE_SOURCES:
        row: dict[str, Any] = {"source": source}
        for split in ("train", "heldout"):
            docs = documents([source], split)
            row[f"{split}_documents"] = len(docs)
            row[f"{split}_tokens"] = sum(len(tokenizer(d.text, verbose=False).input_ids) for d in docs)
        print(row, flush=True)
        rows.append(row)
    return rows


def ceiling(cases: int, lengths: str) -> dict[str, Any]:
    """The grid's recall cells (:func:`grid_cases`) for a perfect memory: the base with full attention on the memory
    layers (4-23) and the window plus sinks elsewhere, i.e. what the shipped placement could reach if its memory
    recalled exactly."""
    from .evaluation.diagnostics import placement_layer_types

    llama, tokenizer = load_local_smollm2()
    model = convert_llama_to_senri(llama, sliding_window=WINDOW, chunk_size=CHUNK, num_sink_tokens=4,
                                   layer_types=placement_layer_types(30, PLACEMENTS["4-23"])).eval().to(_device())
    records = []
    for (kind, length), case_list in grid_cases(tokenizer, [int(n) for n in lengths.split(",")], cases).items():
        for r in compare_on_cases({"perfect memory on 4-23": model}, {f"{kind} {length}": case_list}, progress=True):
            records.append(dict(r, kind=kind, length=length))
    return {"cases": cases, "records": records}


def memory_spec(directory: str) -> tuple[str, dict[str, Any]]:
    """``"DIR@key=value;key=value"`` -> (DIR, overrides): a trained memory read with other settings that shape no
    parameter (:data:`senri.model.trained.READ_SETTINGS`; a lever measured without training). Values are read as
    JSON where they parse (``memory_dpfp_nu=2`` is the integer 2), else kept as text (``memory_feature_map=dpfp``)."""
    from .model.trained import READ_SETTINGS

    path, _, spec = directory.partition("@")
    overrides: dict[str, Any] = {}
    for item in (part for part in spec.split(";") if part):
        key, sep, value = item.partition("=")
        if not sep or key not in READ_SETTINGS:
            raise ValueError(f"{item!r} in {directory!r}: write key=value with a key of {', '.join(READ_SETTINGS)}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return path, overrides


def _trained_memory(directory: str) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer): the trained memory ``directory`` ("shipped", a name under senri/trained/, or
    a path; ``DIR@key=value`` reads it with other :func:`memory_spec` settings) on the offline SmolLM2."""
    from .model.trained import load_trained_memory
    from .training.finetune import init_directory

    llama, tokenizer = load_local_smollm2()
    path, overrides = memory_spec(directory)
    return load_trained_memory(llama, init_directory(path), overrides=overrides).eval(), tokenizer


def _cell_records(tokenizer: Any, cases: int, lengths: str, measure: Any, **fields: Any) -> list[dict[str, Any]]:
    """One record per grid cell (:func:`grid_cases` at ``lengths``, comma-separated): its kind and length, ``fields``
    and what ``measure(case_list)`` returns, each printed as it comes."""
    records = []
    for (kind, length), case_list in grid_cases(tokenizer, [int(n) for n in lengths.split(",")], cases).items():
        records.append({"kind": kind, "length": length, **fields, **measure(case_list)})
        print(records[-1], flush=True)
    return records


def store_selection(cases: int, lengths: str, score: str, directory: str = "shipped") -> dict[str, Any]:
    """For the grid's pass-key and fact cases: would an exact store of 64 or 256 tokens per head, chosen by ``score``
    ("recall": the memory's recall error, as LoLA chooses; "relative": that error over the value's norm;
    "attention": the attention received in the window, as H2O), hold a token of the needle when the question comes
    (:mod:`senri.evaluation.store_selection`)? Per cell, per (layer, head) and per layer (some head's store), beside
    what a store chosen at random would hold."""
    from .evaluation.store_selection import store_selection as selection

    model, tokenizer = _trained_memory(directory)
    records = _cell_records(tokenizer, cases, lengths, lambda case_list: selection(model, case_list, score=score),
                            score=score)
    return {"directory": directory, "cases": cases, "score": score, "records": records}


def read_fidelity(directory: str, cases: int, lengths: str) -> dict[str, Any]:
    """For the grid's pass-key and fact cases (any lengths, 384 = 1.5x the window and up): how much of each memory
    layer's read weight lands on the needle when the answer's first token is predicted, under the memory's own
    kernel beside softmax, its Taylor approximation and full attention on the same tokens
    (:mod:`senri.evaluation.read_fidelity`)."""
    from .evaluation.read_fidelity import read_fidelity as fidelity

    model, tokenizer = _trained_memory(directory)
    return {"directory": directory, "cases": cases,
            "records": _cell_records(tokenizer, cases, lengths, lambda case_list: fidelity(model, case_list))}


def read_capacity(directory: str, cases: int, lengths: str) -> dict[str, Any]:
    """For the grid's pass-key and fact cases: the largest share of a memory layer's read weight that any query could
    put on the needle given the keys the memory wrote (under its ELU + 1, the converted model's keys, and two larger
    maps), beside the share its own queries and full attention put there (:mod:`senri.evaluation.read_capacity`)."""
    from .evaluation.read_capacity import read_capacity as capacity

    model, tokenizer = _trained_memory(directory)
    return {"directory": directory, "cases": cases,
            "records": _cell_records(tokenizer, cases, lengths, lambda case_list: capacity(model, case_list))}


def read_fit(directory: str, train_cases: int, length: int, steps: int, cases: int,
             lengths: str, keys: bool = False, preserve: float = 0.0, passkeys: int = 0) -> dict[str, Any]:
    """Fit each memory layer's query map (all else frozen) to read the needle of ``train_cases`` facts in training
    documents at ``length`` tokens (training templates and entities, one distractor), ``steps`` full-batch Adam
    steps; then the read's share on the needle with the fitted and the own maps on the training cases and on the
    grid's held-out cases at ``lengths`` (:mod:`senri.evaluation.read_fit`). The memory with the fitted maps is
    written to ``runs/read-fit/NAME-TRAIN_CASES-LENGTH-STEPS/trained_memory`` for ``grid-at``. With ``keys``
    (``read-fit-qk``) each layer's key map is fitted with its query map (``...-STEPS-qk``): what the memory writes
    may change too, as training the model would change it. With ``preserve`` (``read-fit-keep``, keys fitted too)
    the fit also keeps the memory's ordinary reads of the prose near the own maps' (``fit_read_maps(preserve=)``;
    ``...-STEPS-qk-keepPRESERVE``), and ``passkeys`` pass-key cases join the training cases (not the grid's: another
    seed), so that the fit reads, and keeps the ordinary reads of, the repeated filler too (``-pkN``)."""
    from .evaluation.read_fit import fit_read_maps, query_map_shares, save_with_query_maps
    from .evaluation.real_model import depths_beyond_window
    from .tasks.corpus import documents
    from .tasks.facts import fact_cases
    from .training.finetune import init_directory

    model, tokenizer = _trained_memory(directory)
    depths = depths_beyond_window(length, WINDOW, CHUNK)
    train = fact_cases(tokenizer, documents(split="train"), length, train_cases, GRID_SEED + 1,
                       depths, split="train", distractors=1)
    train += passkey_cases(tokenizer, length, passkeys, seed=GRID_SEED + 1, depths=depths) if passkeys else []
    maps, key_maps, log = fit_read_maps(model, train, steps, keys=keys, preserve=preserve)
    fitted = {"before": sum(v["before"] for v in log.values()) / len(log),
              "after": sum(v["after"] for v in log.values()) / len(log),
              **({"drift": sum(v["drift"] for v in log.values()) / len(log)} if preserve > 0 else {}),
              "training_cases": query_map_shares(model, train, maps, key_maps)}
    print({"fit": fitted}, flush=True)
    path, overrides = memory_spec(directory)
    source = init_directory(path)
    name = source.parent.name if source.name == "trained_memory" else source.name
    name += "".join(f"-{value}" for value in overrides.values())  # the lever the maps were fitted under
    saved = save_with_query_maps(source, maps, Path("runs/read-fit")
                                 / f"{name}-{train_cases}-{length}-{steps}{'-qk' if keys else ''}{f'-keep{preserve:g}' if preserve else ''}{f'-pk{passkeys}' if passkeys else ''}"
                                 / "trained_memory",
                                 {"train_cases": train_cases, "length": length, "steps": steps, "keys": keys,
                                  "preserve": preserve, "passkeys": passkeys,
                                  "training_share": fitted}, settings=overrides, key_maps=key_maps)
    print({"saved": str(saved)}, flush=True)
    records = _cell_records(tokenizer, cases, lengths,
                            lambda case_list: query_map_shares(model, case_list, maps, key_maps))
    return {"directory": directory, "train_cases": train_cases, "length": length, "steps": steps, "keys": keys,
            "preserve": preserve, "passkeys": passkeys, "fit": fitted,
            "fit_per_layer": log, "saved": str(saved), "records": records}


def read_fit_qk(directory: str, train_cases: int, length: int, steps: int, cases: int, lengths: str) -> dict[str, Any]:
    """:func:`read_fit` with each layer's key map fitted beside its query map."""
    return read_fit(directory, train_cases, length, steps, cases, lengths, keys=True)


def fitted_reads(directory: str, fitted: str, cases: int, lengths: str) -> dict[str, Any]:
    """Each fitted memory in ``fitted`` (comma-separated trained-memory directories, e.g. ``read-fit-qk``'s and
    ``read-fit-keep``'s) read beside ``directory``'s own maps on the grid's held-out cases: the read's share on the
    needle and on the asked value's tokens (:func:`senri.evaluation.read_fit.query_map_shares`), and how far the
    fitted maps move the ordinary reads of the prose (``drift``, :func:`senri.evaluation.read_fit.read_drift`: 0 is
    the own read, 1 a change as large as the read)."""
    from .evaluation.read_fit import query_map_shares, read_drift, read_inputs, saved_maps

    model, tokenizer = _trained_memory(directory)
    fits = {name: saved_maps(name) for name in fitted.split(",")}

    def measure(case_list: list[Any]) -> dict[str, Any]:
        seen = [read_inputs(model, case, context=32) for case in case_list]  # one forward per case for every fit
        return {name: {**query_map_shares(model, case_list, *maps, seen=seen),
                       "drift": read_drift(model, case_list, *maps, seen=seen)["drift"]}
                for name, maps in fits.items()}

    return {"directory": directory, "records": _cell_records(tokenizer, cases, lengths, measure)}


def read_fit_keep(directory: str, train_cases: int, length: int, steps: int, cases: int, lengths: str,
                  preserve: float, passkeys: int) -> dict[str, Any]:
    """:func:`read_fit_qk` that also keeps the memory's ordinary reads near the own maps' (weight ``preserve`` on
    their relative drift), so the layers above get what they were trained on except at the answer's read;
    ``passkeys`` pass-key cases join the training facts (0 for none)."""
    if preserve <= 0:
        raise ValueError(f"read-fit-keep's PRESERVE must be > 0 (read-fit-qk is the fit without it), got {preserve}")
    return read_fit(directory, train_cases, length, steps, cases, lengths, keys=True, preserve=preserve,
                    passkeys=passkeys)


def kernel_fit(directory: str, cases: int, lengths: str, features: int, steps: int,
               inputs: str = "memory") -> dict[str, Any]:
    """Fit a Hedgehog feature map per memory layer to the layer's attention over the memory's tokens on training
    prose (4 stretches of 1024 tokens: Gutenberg and documentation), then measure on held-out prose (the
    cross-entropy against attention, beside ELU + 1 and softmax) and on the grid's cases (the needle's share of
    each kernel's read weight) (:mod:`senri.evaluation.kernel_fit`). ``inputs``: the map reads the memory's queries
    and keys ("memory") or the rotated ones ("rotated")."""
    from .evaluation.kernel_fit import fit_feature_maps, kernel_cross_entropy
    from .evaluation.read_fidelity import read_fidelity as fidelity
    from .tasks.corpus import documents

    model, tokenizer = _trained_memory(directory)

    def stretches(split: str, count: int) -> list[torch.Tensor]:
        out = []
        for sources in (["gutenberg"], ["package-docs"]):
            ids = tokenizer("\n\n".join(d.text for d in documents(sources, split)), return_tensors="pt").input_ids
            out += [ids[:, 5000 + 1024 * j : 5000 + 1024 * (j + 1)] for j in range(count)]
        return out

    maps, log = fit_feature_maps(model, stretches("train", 2), features=features, steps=steps, inputs=inputs)
    print({"fit": log}, flush=True)
    heldout = kernel_cross_entropy(model, stretches("heldout", 1), maps, inputs=inputs)
    print({"heldout_cross_entropy": heldout}, flush=True)
    records = _cell_records(tokenizer, cases, lengths, lambda case_list: fidelity(model, case_list, maps))
    return {"directory": directory, "features": features, "steps": steps, "inputs": inputs, "fit": log,
            "heldout_cross_entropy": heldout, "records": records}


def grid_merge(paths: str) -> dict[str, Any]:
    """The records of several grid runs' JSON files (comma-separated; e.g. the base and the shipped memory measured
    once, a new memory later on the same cases) and their :func:`grid_summary`."""
    records = [r for path in paths.split(",") for r in json.loads(Path(path).read_text(encoding="utf-8"))["records"]]
    return {"sources": paths.split(","), "records": records, "summary": grid_summary(records)}


def grid_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per trained memory: accuracy per (kind, length) beside its gates closed and the base; the share of the NLL
    gap beyond 2x the window that it closes, and exp(in-window NLL - the base's) (its in-window perplexity ratio)."""
    models = sorted({r["model"] for r in records} - {"base"} - {m for m in (r["model"] for r in records)
                                                                 if m.endswith("(gates closed)")})
    out: dict[str, Any] = {}
    for model in models:
        cells = {}
        for r in records:
            if r["model"] == model and r["kind"] != "nll":
                key = f"{r['kind']} {r['length']}"
                lookup = {m["model"]: m["accuracy"] for m in records if m["kind"] == r["kind"]
                          and m["length"] == r["length"] and "accuracy" in m}
                cells[key] = {"trained": r["accuracy"], "gates closed": lookup.get(f"{model} (gates closed)"),
                              "base": lookup.get("base")}
        nll = {}
        for r in records:
            if r["model"] == model and r["kind"] == "nll":
                by = {m["model"]: m for m in records if m["kind"] == "nll" and m["text"] == r["text"]}
                closed, base = by.get(f"{model} (gates closed)"), by.get("base")
                entry = {"trained": r["nll_beyond_2w"]}
                if closed and base:
                    gap = closed["nll_beyond_2w"] - base["nll_beyond_2w"]
                    entry.update(closed=closed["nll_beyond_2w"], base=base["nll_beyond_2w"],
                                 gap_share=(closed["nll_beyond_2w"] - r["nll_beyond_2w"]) / gap if gap else None,
                                 in_window_ppl_ratio=float(torch.tensor(r["nll_inside_window"]
                                                                        - base["nll_inside_window"]).exp()))
                nll[r["text"]] = entry
        out[model] = {"cells": cells, "nll": nll}
    return out


CHECK_LENGTH, CHECK_CASES, CHECK_SEED = 1024, 4, 7


def card_check(model: Any, tokenizer: Any) -> dict[str, Any]:
    """Per case, what ``model`` and its gates-closed twin find on the card's pass keys at 4x the window (the tests
    measure them again)."""
    from .evaluation.diagnostics import teacher_forced_passkey

    cases = passkey_cases(tokenizer, CHECK_LENGTH, CHECK_CASES, seed=CHECK_SEED,
                          depths=depths_beyond_window(CHECK_LENGTH, WINDOW, CHUNK))
    check = {"length": CHECK_LENGTH, "seed": CHECK_SEED, "trained": teacher_forced_passkey(model, cases)}
    with gates_closed(model):
        check["gates closed"] = teacher_forced_passkey(model, cases)
    return check


def ship(state_path: str, memory_update: str, directory: str | None = None) -> dict[str, Any]:
    """Write a phase-A state as the shipped trained memory, with a card that records the recipe, the steps and,
    per case, what the trained model and its gates-closed twin find on 4 pass keys at 4x the window (the test
    re-measures them)."""
    from .model.trained import SMOLLM2_WINDOW256, read_card, save_trained_memory
    from .training.transfer import build_student

    llama, tokenizer = load_local_smollm2()
    student = build_student(llama, range(4, 24), sliding_window=WINDOW, chunk_size=CHUNK, num_sink_tokens=4,
                            memory_update=memory_update)
    saved = torch.load(state_path, weights_only=True)
    own = dict(student.named_parameters())
    with torch.no_grad():
        for name, value in saved["parameters"].items():
            own[name].copy_(value)
    student.eval()
    check = card_check(student, tokenizer)
    card = {"recipe": {"name": "phase A: layer-local attention transfer (senri.training.transfer)", "profile": "cpu-real",
                       "settings": saved["settings"]}, "steps": saved["step"], "check": check}
    path = save_trained_memory(student, llama, directory or SMOLLM2_WINDOW256, "local-smollm2", card)
    return read_card(path)


SHIP_TOLERANCE = 2 / 20  # a new memory ships only if no cell drops by more than 2 of 20 cases


def regressions(records: Sequence[dict[str, Any]], new: str, old: str = "shipped") -> list[str]:
    """The accuracy cells (kind, length) where memory ``new`` scores more than :data:`SHIP_TOLERANCE` below memory
    ``old``, both measured in the same grid (``records``), and the cells either one lacks."""
    def cells(model: str) -> dict[tuple[str, int], float]:
        return {(r["kind"], r["length"]): r["accuracy"] for r in records if r["model"] == model and "accuracy" in r}

    before, after = cells(old), cells(new)
    if not before or not after:
        raise ValueError(f"the grid has no accuracy cells for {old if not before else new!r}; "
                         f"models in it: {sorted({r['model'] for r in records})}")
    problems = [f"{kind} {length}: missing for {new}" for kind, length in before if (kind, length) not in after]
    problems += [f"{kind} {length}: {after[(kind, length)]:.2f} vs {before[(kind, length)]:.2f}"
                 for kind, length in before if (kind, length) in after
                 and after[(kind, length)] < before[(kind, length)] - SHIP_TOLERANCE - 1e-9]
    return problems


def ship_run(run_dir: str, grid_json: str, directory: str | None = None) -> dict[str, Any]:
    """Ship a finished phase-B run (``RUN_DIR/trained_memory``, e.g. ``real-finetune``): the files are copied as they
    are, the card gains the per-case check (re-measured by the tests), what the run actually did (steps, the
    curriculum stages it reached, time; from its metrics) and the grid's numbers (``grid_json``, from
    ``python -m senri.reports grid``)."""
    import shutil

    from .model.trained import CARD_FILE, SMOLLM2_WINDOW256, load_trained_memory, read_card
    from .training.loop import read_metrics

    source = Path(run_dir) / "trained_memory"
    llama, tokenizer = load_local_smollm2()
    check = card_check(load_trained_memory(llama, source), tokenizer)  # refuses a memory made for another base
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    stages: dict[int, int] = {}
    for record in records:
        if "seq_len" in record:
            stages.setdefault(record["seq_len"], record["step"])
    summary = json.loads((Path(run_dir) / "train_summary.json").read_text(encoding="utf-8"))
    grid_records = json.loads(Path(grid_json).read_text(encoding="utf-8"))["records"]
    if any(r["model"] == "shipped" for r in grid_records):  # a grid of the new memory beside the shipped one
        own = next((r["model"] for r in grid_records if r["model"] == str(source)), None)
        problems = regressions(grid_records, own or str(source))
        if problems:
            raise ValueError(f"{source} does not ship: it regresses against the shipped memory by more than "
                             f"{SHIP_TOLERANCE:.2f} in {problems}")
        grid_records = [r for r in grid_records if r["model"] == own or r["model"] == f"{own} (gates closed)"
                        or r["model"] == "base"]
        grid_records = [dict(r, model="trained" if r["model"] == own else
                             "gates closed" if r["model"].endswith("(gates closed)") else "base") for r in grid_records]
    card = read_card(source)
    card.update({
        "check": check,
        "run": {"steps_done": summary["global_step"], "steps_planned": summary["max_steps"],
                "stopped_by_time_budget": summary.get("stopped_early", False),
                "train_runtime_s": round(summary["train_runtime"], 1),
                "sequence_lengths_reached": {str(k): f"from about step {v}" for k, v in sorted(stages.items())},
                **({"curriculum": summary["curriculum"]} if "curriculum" in summary else {})},
        "results": [{k: r[k] for k in ("kind", "length", "model", "n", "accuracy", "answer_logprob") if k in r}
                    | ({} if r["kind"] != "nll" else {"nll_inside_window": r["nll_inside_window"],
                                                      "nll_beyond_2w": r["nll_beyond_2w"]})
                    for r in grid_records],
    })
    target = Path(directory or SMOLLM2_WINDOW256)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    with atomic_write(tmp / CARD_FILE) as f:
        json.dump(card, f, indent=1)
    if target.exists():
        shutil.rmtree(target)
    tmp.replace(target)
    return {"check": check, "run": card["run"]}


def checkpoint_memory(run_dir: str, step: int) -> dict[str, Any]:
    """A finetune or text run's checkpoint at ``step`` as a trained memory (``RUN_DIR/step-STEP/trained_memory``), to
    evaluate an intermediate curriculum stage with ``grid-at``."""
    from .training.recipes import checkpoint_memory as export

    return {"run_dir": run_dir, "step": step, "trained_memory": str(export(run_dir, step))}


def main(argv: list[str]) -> Any:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    commands = {"sinks": (sinks, ()), "placement": (placement, (int, int)), "real": (real, (str, int, int)),
                "grid": (grid, (str, int)), "grid-at": (grid, (str, int, str)), "grid-merge": (grid_merge, (str,)), "ceiling": (ceiling, (int, str)), "store-selection": (store_selection, (int, str, str)), "read-fidelity": (read_fidelity, (str, int, str)), "read-capacity": (read_capacity, (str, int, str)), "read-fit": (read_fit, (str, int, int, int, int, str)), "read-fit-qk": (read_fit_qk, (str, int, int, int, int, str)), "read-fit-keep": (read_fit_keep, (str, int, int, int, int, str, float, int)), "fitted-reads": (fitted_reads, (str, str, int, str)), "kernel-fit": (kernel_fit, (str, int, str, int, int, str)), "corpus": (corpus_table, ()), "stream": (stream, (int, int)), "stream-sinks": (stream_sinks, (int,)), "ruler": (ruler, (str, int, str)), "ruler-of": (ruler, (str, int, str, str, str)), "ship": (ship, (str, str)), "ship-run": (ship_run, (str, str)),
                "checkpoint-memory": (checkpoint_memory, (str, int))}
    if not argv or argv[0] not in commands:
        raise SystemExit(f"usage: python -m senri.reports {{{' | '.join(commands)}}} ... (see the module docstring)")
    function, types = commands[argv[0]]
    if len(argv) - 1 != len(types):
        raise SystemExit(f"{argv[0]} takes {len(types)} arguments, got {len(argv) - 1} (see the module docstring)")
    result = function(*(t(a) for t, a in zip(types, argv[1:])))
    out_dir = Path(os.environ.get("SENRI_REPORTS_DIR", OUT_DIR))
    path = out_dir / ("-".join(argv).replace("/", "_").replace(",", "+").strip("_.") + ".json")
    with atomic_write(path) as f:
        json.dump(result, f, indent=1)
    print(f"written to {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
