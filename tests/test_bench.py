"""The benchmark scripts run: both models on the benchmark's shapes, Senri holding Llama's weights, and the profile
script's pairs and tables (on a short input: the benchmark's own lengths take minutes)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_bench_models_share_llamas_weights_and_agree_within_the_window():
    sys.path.insert(0, str(BENCH))
    try:
        from bench_senri import SHAPES, WINDOW, build_models
    finally:
        sys.path.remove(str(BENCH))
    llama, senri = build_models()
    assert senri.config.sliding_window == WINDOW and senri.config.num_hidden_layers == SHAPES["num_hidden_layers"]
    for name, weight in llama.state_dict().items():
        torch.testing.assert_close(senri.state_dict()[name], weight)
    # Gates closed (the default) and a context inside the window: the two compute the same function, so the bench
    # times the same model with two attention implementations.
    ids = torch.randint(0, SHAPES["vocab_size"], (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(senri(input_ids=ids).logits, llama(ids).logits, rtol=1e-4, atol=1e-4)

def test_profile_script_prints_pairs_a_median_and_both_profiles():
    result = subprocess.run(
        [sys.executable, "profile_senri.py", "prefill", "256", "--pairs", "2", "--rows", "3"],
        cwd=BENCH, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert len(re.findall(r"^senri [\d.]+ s  llama [\d.]+ s  senri/llama [\d.]+$", out, re.M)) == 2
    assert re.search(r"prefill 256: senri/llama median [\d.]+ \(min [\d.]+, max [\d.]+\) over 2 pairs", out)
    assert "llama, one profiled prefill step of 256 tokens" in out and "senri, one profiled prefill step" in out
    assert out.count("Self CPU time total") == 2
