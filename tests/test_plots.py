"""Every figure renders from saved-result shapes and is written under run_dir/figures."""

from __future__ import annotations

import torch

from senri.workspace import plots


def test_all_figures_render_and_save(tmp_path):
    records = [{"step": s, "loss": 3.0 / (s + 1), "gate/1/mean": 0.1 * s} for s in range(5)]
    niah = [{"model": m, "length": n, "depth": d, "accuracy": float(m == "senri")}
            for m in ("senri", "swa_only") for n in (64, 128) for d in (0.1, 0.9)]
    figures = {
        "loss": plots.loss_curves({"senri": records}),
        "gates": plots.gate_curves(records),
        "gate_values": plots.gate_values({"layer_1": [0.1, 0.2]}),
        "norms": plots.memory_norms([{"tokens": 8, "layer_1": 0.0}, {"tokens": 16, "layer_1": 1.5}]),
        "attention": plots.attention_map(torch.eye(4)),
        "niah": plots.niah_heatmaps(niah),
        "ppl": plots.ppl_by_position({"senri": {"positions": [0, 64], "ppl": [30.0, 20.0]}}),
        "variants": plots.variant_accuracy({"single": {"64": 1.0, "128": 0.5}, "multi": {"64": 0.5, "128": 0.5}},
                                           window=64),
    }
    for name, fig in figures.items():
        path = plots.save_figure(fig, tmp_path, name)
        assert path.exists() and path.stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(f"{n}.png" for n in figures)
