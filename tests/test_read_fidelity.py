"""The read-fidelity diagnostic's weights are the memory's real read and the base's real attention
(senri.evaluation.read_fidelity)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from senri import convert_llama_to_senri
from senri.evaluation.read_fidelity import KERNELS, read_fidelity, read_weights
from tests.conftest import tiny_llama, tiny_model


@pytest.mark.parametrize("overrides", [{}, {"num_sink_tokens": 2}, {"memory_qk_map": True},
                                       {"memory_qk_map": True, "num_sink_tokens": 2, "memory_feature_map": "dpfp",
                                        "memory_eps": 1e-9}])  # DPFP's φ(q)·z is small: eps would show
def test_the_memory_kernels_weights_average_the_values_into_the_layers_memory_output(overrides):
    model = tiny_model(memory_update="linear", **overrides)
    torch.manual_seed(1)
    with torch.no_grad():
        for i in model.config.memory_layers:
            attn = model.model.layers[i].self_attn
            attn.memory_gate.fill_(1.0)  # the layer's output is its memory read alone
            if overrides.get("memory_qk_map"):  # away from the identity, so that the maps matter
                attn.memory_query_map.add_(0.3 * torch.randn_like(attn.memory_query_map))
                attn.memory_key_map.add_(0.3 * torch.randn_like(attn.memory_key_map))
    ids = torch.randint(0, 97, (1, 45), generator=torch.Generator().manual_seed(4))
    heads_in: dict[int, torch.Tensor] = {}
    hooks = [model.model.layers[i].self_attn.o_proj.register_forward_pre_hook(
        lambda module, args, i=i: heads_in.__setitem__(i, args[0].detach())) for i in model.config.memory_layers]
    weights = read_weights(model, ids)
    with torch.no_grad():
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    config = model.config
    assert set(weights) == set(config.memory_layers)
    for i, layer in weights.items():
        Hq, D, G = config.num_attention_heads, config.head_dim, config.num_attention_heads // config.num_key_value_heads
        held = layer["values"].shape[1]
        assert held > 0 and held % config.chunk_size == 0
        w = layer["weights"]["memory"]
        assert w.shape == (Hq, held)
        torch.testing.assert_close(w.sum(-1), torch.ones(Hq))
        sinks = overrides.get("num_sink_tokens", 0)
        assert bool((w[:, :sinks] == 0).all())  # sinks are never written
        # ELU + 1 weighs every written token; DPFP's features are sparse in sign patterns, so some weigh nothing.
        assert bool((w[:, sinks:] > 0).all()) if "memory_feature_map" not in overrides else bool((w >= 0).all())
        read = (w[:, :, None] * layer["values"].repeat_interleave(G, dim=0)).sum(1)  # (Hq, D)
        # eps = 1e-6 in the read's normaliser: a relative difference of ~1e-6 / (φ(q)·z) at most
        torch.testing.assert_close(read, heads_in[i][0, -1].view(Hq, D), rtol=1e-4, atol=1e-5)
        for name in KERNELS:
            torch.testing.assert_close(layer["weights"][name].sum(-1), torch.ones(Hq, dtype=torch.float64)
                                       if layer["weights"][name].dtype == torch.float64 else torch.ones(Hq))


def test_rope_softmax_is_the_source_llamas_attention_on_the_written_tokens_and_softmax_drops_the_rotation():
    llama = tiny_llama(97)
    llama.config._attn_implementation = "eager"
    model = convert_llama_to_senri(llama, sliding_window=16, chunk_size=8, memory_update="linear",
                                   num_sink_tokens=2, layer_types=["memory", "full_attention", "memory",
                                                                   "sliding_attention"]).eval()
    ids = torch.randint(0, 97, (1, 53), generator=torch.Generator().manual_seed(5))
    weights = read_weights(model, ids)
    with torch.no_grad():
        attentions = llama(input_ids=ids, output_attentions=True).attentions
    assert set(weights) == {0, 2}
    for i, layer in weights.items():
        if i == 2:  # its input went through layer 0's window and memory, not the base's full attention
            continue
        held = layer["values"].shape[1]
        full = attentions[i][0, :, -1, :held].double()  # (Hq, held): the base's attention on what the memory holds
        full[:, :2] = 0  # the sinks stay in the window, never in memory
        torch.testing.assert_close(layer["weights"]["rope softmax"].double(), full / full.sum(-1, keepdim=True),
                                   rtol=1e-4, atol=1e-6)
        # Without the rotation the weights differ: RoPE matters for these keys.
        assert float((layer["weights"]["softmax"] - layer["weights"]["rope softmax"]).abs().max()) > 1e-4
        # softmax and taylor2 are exp and its second-order polynomial of one set of logits x: with x recovered
        # from softmax up to a constant c, taylor2 ∝ 1 + (x + c) + (x + c)² / 2 for the one c that fits.
        x = layer["weights"]["softmax"][:, 2:].double().log()
        t = layer["weights"]["taylor2"][:, 2:].double()
        cs = torch.linspace(-50, 50, 200001, dtype=torch.float64)[:, None, None]
        poly = 1 + (x + cs) + (x + cs) ** 2 / 2
        fit = (poly / poly.sum(-1, keepdim=True) - t).abs().amax(dim=2).min(dim=0).values  # per head
        assert float(fit.max()) < 1e-6 * float(t.max())


def test_read_fidelity_reports_the_needles_share_of_each_kernels_weight_beside_a_uniform_read():
    model = tiny_model(memory_update="linear")
    ids = torch.randint(0, 97, (1, 45), generator=torch.Generator().manual_seed(4)).tolist()[0]
    ids[3:9] = [11, 5, 12, 5, 13, 14]  # the answer's first token (5) stands twice in the needle
    case = SimpleNamespace(ids=ids + [5, 6], answer_start=45, needle=(3, 9))
    out = read_fidelity(model, [case])
    layers = read_weights(model, torch.tensor([ids]))
    first = next(iter(layers.values()))
    held = first["values"].shape[1]
    assert out["layers_holding_needle"] == len(layers)
    assert out["uniform"] == pytest.approx(6 / held)
    expected = sum(float(l["weights"]["memory"][:, 3:9].sum(-1).mean()) for l in layers.values()) / len(layers)
    assert out["needle_share"]["memory"] == pytest.approx(expected)
    assert set(out["needle_share"]) == set(KERNELS) and out["gate"] is not None
    copies = sum(float(l["weights"]["softmax"][:, [4, 6]].sum(-1).mean()) for l in layers.values()) / len(layers)
    assert out["answer_share"]["softmax"] == pytest.approx(copies)
    assert out["answer_uniform"] == pytest.approx(2 / held)
    far = SimpleNamespace(ids=ids + [5], answer_start=45, needle=(44, 45))  # still in the window: never read
    assert read_fidelity(model, [far])["layers_holding_needle"] == 0


def test_read_weights_refuses_a_read_that_is_no_weighted_mean():
    with pytest.raises(ValueError, match="memory_update='linear'"):
        read_weights(tiny_model(memory_update="delta"), torch.zeros(1, 20, dtype=torch.long))


def test_softmax_weights_stay_finite_when_a_never_written_sink_has_the_largest_logit():
    from senri.evaluation.read_fidelity import _exp_over

    w = _exp_over(torch.tensor([[1000.0, 0.0, 1.0]]), torch.tensor([0.0, 1.0, 1.0]))
    w = w * torch.tensor([0.0, 1.0, 1.0])
    torch.testing.assert_close(w / w.sum(), torch.tensor([[0.0, 1.0, torch.e]]) / (1 + torch.e))
