"""Where the time of one benchmark measurement goes: Senri and Llama timed in alternating pairs, then one profiled
step of each (torch.profiler, operators by self time).

Run: `.venv/bin/python bench/profile_senri.py train 8192` (or `prefill 8192`; `--pairs`, `--rows`, `--threads`).
Same shapes as bench_senri.py. The pairs show how much a shared machine moves single timings; the tables show which
operators a change should target (matrix products and the window's SDPA are most of both models' steps).
"""

from __future__ import annotations

import argparse
import time

import torch

from bench_senri import SHAPES, build_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["train", "prefill"])
    parser.add_argument("tokens", type=int)
    parser.add_argument("--pairs", type=int, default=5, help="alternating Senri/Llama timings (default 5)")
    parser.add_argument("--rows", type=int, default=15, help="operators shown per table (default 15)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llama, senri = build_models()
    ids = torch.randint(0, SHAPES["vocab_size"], (1, args.tokens))

    def run(model) -> None:
        if args.mode == "train":
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        else:
            with torch.inference_mode():
                model(input_ids=ids, logits_to_keep=1)

    for model in (llama, senri):
        model.train(args.mode == "train")
        run(model)  # warm-up
    ratios = []
    for _ in range(args.pairs):
        seconds = []
        for model in (senri, llama):
            start = time.perf_counter()
            run(model)
            seconds.append(time.perf_counter() - start)
        ratios.append(seconds[0] / seconds[1])
        print(f"senri {seconds[0]:.3f} s  llama {seconds[1]:.3f} s  senri/llama {ratios[-1]:.3f}", flush=True)
    ratios.sort()
    print(f"{args.mode} {args.tokens}: senri/llama median {ratios[len(ratios) // 2]:.3f} "
          f"(min {ratios[0]:.3f}, max {ratios[-1]:.3f}) over {len(ratios)} pairs")
    for name, model in (("llama", llama), ("senri", senri)):
        with torch.profiler.profile() as profile:
            run(model)
        print(f"\n{name}, one profiled {args.mode} step of {args.tokens} tokens")
        print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=48))


if __name__ == "__main__":
    main()
