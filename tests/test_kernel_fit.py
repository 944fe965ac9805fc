"""The Hedgehog feature-map fit (senri.evaluation.kernel_fit): its kernel, its targets and that fitting lowers the
cross-entropy against attention."""

from __future__ import annotations

import math

import torch

from senri.evaluation.kernel_fit import FeatureMaps, _query_positions, _targets, fit_feature_maps, kernel_cross_entropy
from senri.evaluation.read_fidelity import held_tokens, layer_projections, read_weights
from tests.conftest import tiny_model


def test_the_feature_maps_kernel_is_the_dot_product_of_each_heads_softmax_features():
    torch.manual_seed(0)
    fmap = FeatureMaps(num_kv_heads=2, head_dim=4, features=3)
    with torch.no_grad():
        fmap.query.add_(torch.randn_like(fmap.query))
        fmap.key.add_(torch.randn_like(fmap.key))
    q, k = torch.randn(4, 5, 4), torch.randn(2, 7, 4)
    scores = fmap.scores(q, k)
    assert scores.shape == (4, 5, 7)
    for h in range(4):  # query head h reads key/value head h // 2
        kv = h // 2
        for i in range(5):
            x = q[h, i] @ fmap.query[kv]
            fq = torch.cat([x.softmax(0), (-x).softmax(0)])
            for j in range(7):
                y = k[kv, j] @ fmap.key[kv]
                fk = torch.cat([y.softmax(0), (-y).softmax(0)])
                torch.testing.assert_close(scores[h, i, j], fq @ fk)


def test_the_target_of_the_last_query_is_full_attention_on_the_memorys_tokens():
    model = tiny_model(memory_update="linear", num_sink_tokens=2)
    ids = torch.randint(0, 97, (1, 45), generator=torch.Generator().manual_seed(4))
    layer = model.config.memory_layers[0]
    attn = model.model.layers[layer].self_attn
    p = layer_projections(model, ids)[layer]
    mask, target, mq = _targets(model.config, p, torch.tensor([44]), attn.scaling, attn.num_groups)
    held = held_tokens(model.config, 44)
    assert bool(mask[0, :2].logical_not().all()) and bool(mask[0, 2:held].all()) and not bool(mask[0, held:].any())
    expected = read_weights(model, ids)[layer]["weights"]["rope softmax"]
    torch.testing.assert_close(target[:, 0, :held], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mq[:, 0], p["mq"][:, 44])


def test_fitting_lowers_the_cross_entropy_against_attention_and_uniform_is_log_of_the_tokens_held():
    model = tiny_model(memory_update="linear", num_sink_tokens=2, seed=3)
    with torch.no_grad():  # a random tiny model attends almost uniformly: sharpen it so there is something to fit
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
    texts = [torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    maps, log = fit_feature_maps(model, texts, features=8, steps=60, lr=3e-2, queries=16)
    assert set(maps) == set(model.config.memory_layers)
    for entry in log.values():
        assert entry["after"] < entry["before"] - 1e-3
    heldout = [torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(9))]
    ce = kernel_cross_entropy(model, heldout, maps, queries=16, seed=5)
    assert set(ce) == {"memory", "taylor2", "softmax", "uniform", "learned"}
    # A uniform read over the n tokens the memory holds costs log n nats whatever the target.
    positions = _query_positions(model.config, 64, 16, torch.Generator().manual_seed(5))
    expected = sum(math.log(held_tokens(model.config, int(t)) - 2) for t in positions) / len(positions)
    assert abs(ce["uniform"] - expected) < 1e-4
    assert all(v >= 0 for v in ce.values())


def test_a_text_too_short_for_the_memory_is_refused_with_the_length_it_needs():
    import pytest

    model = tiny_model(memory_update="linear")
    with pytest.raises(ValueError, match="needs more than"):
        kernel_cross_entropy(model, [torch.zeros(1, 20, dtype=torch.long)])


def test_a_map_fitted_on_rotated_inputs_reads_rotated_queries_and_keys_and_a_wrong_name_is_refused():
    import pytest

    model = tiny_model(memory_update="linear", num_sink_tokens=2, seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
    texts = [torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    maps, log = fit_feature_maps(model, texts, features=8, steps=60, lr=3e-2, queries=16, inputs="rotated")
    layer = model.config.memory_layers[0]
    assert maps[layer].inputs == "rotated" and log[layer]["after"] < log[layer]["before"] - 1e-3
    ids = texts[0]
    p = layer_projections(model, ids)[layer]
    held = held_tokens(model.config, 63)
    expected = maps[layer].scores(p["rq"][:, -1:], p["rk"][:, :held])[:, 0] * p["keep"][:held]
    learned = read_weights(model, ids, maps)[layer]["weights"]["learned"]
    torch.testing.assert_close(learned, expected / expected.sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="inputs must be one of memory, rotated"):
        fit_feature_maps(model, texts, inputs="rope")
