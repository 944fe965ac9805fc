"""Analysis measurements show what the model computes."""

from __future__ import annotations

import torch

from senri.evaluation.analysis import gate_table, local_attention_map, memory_norm_trace
from tests.conftest import tiny_model


def test_memory_norm_trace_starts_empty_and_grows_once_chunks_leave_the_window():
    model = tiny_model()
    trace = memory_norm_trace(model, torch.randint(0, 97, (1, 96)), piece=8)
    assert [r["tokens"] for r in trace] == list(range(8, 97, 8))
    assert trace[0]["layer_1"] == 0.0 and trace[-1]["layer_1"] > trace[3]["layer_1"] > 0.0


def test_local_attention_map_is_a_block_sliding_window():
    model = tiny_model()
    weights = local_attention_map(model, torch.randint(0, 97, (1, 40)), layer=0, head=1)
    torch.testing.assert_close(weights.sum(-1), torch.ones(40))
    assert weights[10, 11:].sum() == 0  # causal
    assert weights[39, :20].sum() == 0 and weights[39, 20] > 0  # query 39 (chunk 9) sees chunks 5..9


def test_gate_table_lists_each_memory_layer_head():
    assert gate_table(tiny_model(memory_gate_init=0.25)) == {"layer_1": [0.25] * 4}
