"""What reading a training row in segments saves: peak memory and time of one training step on the real model.

One forward and backward of the text recipe's recall loss (a pass-key row, answer tokens only) on SmolLM2-135M with
the shipped memory and its LoRA adapters trainable, as ``recipe: text`` trains it: the whole row at once, then in
segments with the exact gradient through their borders, then truncated at them (senri.training.streamed). Each
mode runs in a fresh process, so that its peak resident memory is its own; the number reported is the peak minus
the resident memory once the model is loaded. Settings through the environment: LENGTH (default 4096), SEGMENT
(1024), THREADS (1). Writes runs/reports/streamed-memory-LENGTH-SEGMENT.json.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def one_step(mode: str, length: int, segment: int) -> dict:
    """One training step's forward and backward in this process: seconds and peak resident memory above the loaded
    model's, in MiB."""
    import torch

    from senri.model.conversion import load_local_smollm2
    from senri.training.finetune import answer_loss, passkey_sample
    from senri.training.streamed import TokenTargets, streamed_loss
    from senri.training.textmemory import TextMemorySettings, trainable_model

    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    base, tokenizer = load_local_smollm2()
    model = trainable_model(base, "shipped", TextMemorySettings())
    model.train()
    ids, answer = passkey_sample(tokenizer, length, 2 * model.get_base_model().config.sliding_window,
                                 random.Random(0), end=True)
    ids, answers = torch.tensor([ids]), torch.tensor([answer])
    loaded = _rss_mib()
    began = time.perf_counter()
    if mode == "whole":
        loss = answer_loss(model, ids, answers)
    else:
        loss = streamed_loss(model, ids[:, :-1], TokenTargets.answers(ids, answers), segment, mode)
    loss.backward()
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    grad = sum(float(p.grad.float().norm() ** 2) for p in model.parameters() if p.grad is not None) ** 0.5
    return {"mode": mode, "loss": float(loss.detach()), "grad_norm": grad, "seconds": round(seconds, 1),
            "peak_above_model_mib": round(peak - loaded, 0)}


def main() -> dict:
    length, segment = int(os.environ.get("LENGTH", "4096")), int(os.environ.get("SEGMENT", "1024"))
    rows = []
    for mode in ("whole", "full", "truncated"):
        out = subprocess.run([sys.executable, __file__, mode, str(length), str(segment)], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    report = {"length": length, "segment": segment, "rows": rows}
    path = Path("runs/reports") / f"streamed-memory-{length}-{segment}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    if len(sys.argv) == 4:
        print(json.dumps(one_step(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
    else:
        main()
