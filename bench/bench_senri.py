"""Senri vs transformers' LlamaForCausalLM (sdpa) on the same shapes; prints ratios (median of repeats).

Run: `make bench` (or `.venv/bin/python bench/bench_senri.py`). Settings are the constants below (no argparse).
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from senri import SenriCache, SenriConfig, SenriForCausalLM

SHAPES = dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1 << 16)
WINDOW, CHUNK = 1024, 64
REPEATS = 5
PIECE = 512  # streaming piece size
torch.manual_seed(0)


def median_seconds(fn, repeats: int = REPEATS) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(torch.get_num_threads())
    llama = LlamaForCausalLM(LlamaConfig(**SHAPES, attn_implementation="sdpa")).eval()
    senri = SenriForCausalLM(SenriConfig(**SHAPES, sliding_window=WINDOW, chunk_size=CHUNK,
                                         layer_types=["sliding_attention", "memory", "sliding_attention", "memory"]))
    senri.load_state_dict(llama.state_dict(), strict=False)
    senri.eval()
    ids = torch.randint(0, SHAPES["vocab_size"], (1, 16384))
    rows = []

    with torch.inference_mode():
        # 1. Prefill of 8K tokens in one forward.
        t_llama = median_seconds(lambda: llama(ids[:, :8192], logits_to_keep=1))
        t_senri = median_seconds(lambda: senri(input_ids=ids[:, :8192], logits_to_keep=1))
        rows.append(("8K prefill: llama / senri (target >= 2.0)", t_llama, t_senri, t_llama / t_senri))
        t_llama16 = median_seconds(lambda: llama(ids, logits_to_keep=1), 3)
        t_senri16 = median_seconds(lambda: senri(input_ids=ids, logits_to_keep=1), 3)
        rows.append(("16K prefill: llama / senri", t_llama16, t_senri16, t_llama16 / t_senri16))

        # 2. Per-token cost of streaming in pieces: 16K vs 2K tokens.
        def stream(n: int) -> None:
            cache = SenriCache(senri.config, batch_size=1)
            for s in range(0, n, PIECE):
                senri(input_ids=ids[:, s : s + PIECE], cache=cache, use_cache=True, logits_to_keep=1)

        per_2k = median_seconds(lambda: stream(2048), 3) / 2048
        per_16k = median_seconds(lambda: stream(16384), 3) / 16384
        rows.append(("per-token streaming cost: 16K / 2K (target <= 1.3)", per_16k, per_2k, per_16k / per_2k))

        # 3. Latency of one decoded token after 1K and after 8K tokens of context.
        def decode_after(n: int) -> float:
            cache = SenriCache(senri.config, batch_size=1)
            for s in range(0, n, PIECE):
                senri(input_ids=ids[:, s : s + PIECE], cache=cache, use_cache=True, logits_to_keep=1)
            token = ids[:, n : n + 1]

            def step() -> None:
                # Decode 32 tokens from a copy-free state: each call advances the cache, which is what decoding does.
                for _ in range(32):
                    senri(input_ids=token, cache=cache, use_cache=True)

            return median_seconds(step) / 32

        d_1k, d_8k = decode_after(1024), decode_after(8192)
        rows.append(("decode latency: after 8K / after 1K (target <= 1.2)", d_8k, d_1k, d_8k / d_1k))

        # Reference point: Llama's decode after 8K with its growing KV cache.
        from transformers import DynamicCache

        llama_cache = DynamicCache()
        llama(ids[:, :8192], cache=llama_cache, use_cache=True, logits_to_keep=1)
        t_llama_decode = median_seconds(
            lambda: [llama(ids[:, :1], cache=llama_cache, use_cache=True) for _ in range(8)], 3
        ) / 8
        rows.append(("decode after 8K: llama / senri", t_llama_decode, d_8k, t_llama_decode / d_8k))

    print(f"shapes: {SHAPES}, window {WINDOW}, chunk {CHUNK}, threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"{'measurement':55s} {'a (s)':>10s} {'b (s)':>10s} {'a/b':>7s}")
    for name, a, b, ratio in rows:
        print(f"{name:55s} {a:10.5f} {b:10.5f} {ratio:7.2f}")


if __name__ == "__main__":
    main()
