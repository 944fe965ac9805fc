"""The read's ceiling is the best any query can do on the written keys, and the memory's own read never beats it
(senri.evaluation.read_capacity)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from senri.evaluation.read_capacity import MAPS, control_span, dpfp, feature_ceiling, map_features, read_capacity, squared
from senri.evaluation.read_fidelity import read_weights
from senri.model.memory import phi
from tests.conftest import tiny_model


def _share(weights: torch.Tensor, keep: torch.Tensor, needle: list[int]) -> torch.Tensor:
    weights = weights * keep
    return weights[..., needle].sum(-1) / weights.sum(-1)


def test_the_elu_ceiling_is_reached_by_a_query_and_beaten_by_none():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(300, 16, generator=g, dtype=torch.float64)
    keep = torch.ones(300, dtype=torch.float64)
    keep[:4] = 0  # sinks: never written, never counted
    needle = [40, 41, 42, 43, 44]
    ceiling = feature_ceiling(phi(keys), keep, needle)
    # no query does better: random ones, and gradient ascent from random starts
    queries = 3 * torch.randn(20000, 16, generator=g, dtype=torch.float64)
    assert float(_share(phi(queries) @ phi(keys).T, keep, needle).max()) <= ceiling + 1e-12
    for start in range(5):
        q = torch.randn(16, generator=torch.Generator().manual_seed(start), dtype=torch.float64).requires_grad_()
        optimiser = torch.optim.Adam([q], lr=0.1)
        for _ in range(300):
            loss = -_share(phi(q) @ phi(keys).T, keep, needle).log()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        assert float(_share(phi(q.detach()) @ phi(keys).T, keep, needle)) <= ceiling + 1e-12
    # the query that keeps one feature (the best) and sends the others to -inf reaches it
    best = int((phi(keys)[needle].sum(0) / (phi(keys) * keep[:, None]).sum(0)).argmax())
    q = torch.full((16,), -60.0, dtype=torch.float64)
    q[best] = 30.0
    assert float(_share(phi(q) @ phi(keys).T, keep, needle)) == pytest.approx(ceiling, rel=1e-6)
    assert ceiling > len(needle) / float(keep.sum())  # some feature favours the needle


def test_a_needle_with_a_feature_of_its_own_has_a_ceiling_near_one_and_a_typical_one_near_uniform():
    g = torch.Generator().manual_seed(1)
    keys = -8 + 0.1 * torch.randn(500, 8, generator=g)  # every feature near 0 under ELU + 1 ...
    keys[100:103, 5] = 4.0  # ... but the needle's fifth
    keep = torch.ones(500)
    assert feature_ceiling(phi(keys), keep, [100, 101, 102]) > 0.9
    assert feature_ceiling(phi(keys), keep, [200, 201, 202]) < 2 * 3 / 500


def test_the_larger_maps_are_the_kernels_they_claim():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(7, 16, generator=g, dtype=torch.float64)
    torch.testing.assert_close(squared(phi(q)) @ squared(phi(k)).T, (phi(q) @ phi(k).T) ** 2)
    features = dpfp(k)
    assert features.shape == (7, 2 * 16 * 3) and bool((features >= 0).all())
    r = torch.cat([k.clamp_min(0), (-k).clamp_min(0)], dim=-1)
    torch.testing.assert_close(features[:, 2 * 16 + 5], r[:, 5] * r[:, 3])  # ν = 2: r_i · r_{i-2}
    with pytest.raises(ValueError, match="unknown feature map 'hedgehog'; valid: memory, converted"):
        map_features("hedgehog", k, k)


def test_the_control_span_is_as_long_as_the_needle_written_and_apart_from_it():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        span = control_span(40, [10, 11, 12, 13], 4, g)
        assert len(span) == 4 and span == list(range(span[0], span[0] + 4))
        assert span[0] >= 4 and span[-1] < 40 and not set(span) & {10, 11, 12, 13}
    assert control_span(10, [4, 5, 6, 7, 8], 4, g) == []  # no room beside the needle


@pytest.mark.parametrize("qk_map", [False, True])
def test_read_capacity_bounds_the_memorys_own_read_and_sees_the_key_map(qk_map):
    model = tiny_model(memory_update="linear", memory_qk_map=qk_map)
    if qk_map:  # away from the identity, so that the key map matters
        torch.manual_seed(3)
        with torch.no_grad():
            for i in model.config.memory_layers:
                attn = model.model.layers[i].self_attn
                attn.memory_query_map.add_(0.3 * torch.randn_like(attn.memory_query_map))
                attn.memory_key_map.add_(0.3 * torch.randn_like(attn.memory_key_map))
    ids = torch.randint(0, 97, (1, 45), generator=torch.Generator().manual_seed(4)).tolist()[0]
    ids[3:9] = [11, 5, 12, 5, 13, 14]
    case = SimpleNamespace(ids=ids + [5, 6], answer_start=45, needle=(3, 9))
    out = read_capacity(model, [case])
    layers = read_weights(model, torch.tensor([ids]))
    H = model.config.num_key_value_heads
    assert out["layer_heads_holding_needle"] == len(layers) * H
    held = next(iter(layers.values()))["values"].shape[1]
    assert out["uniform"] == pytest.approx(6 / (held - model.config.num_sink_tokens))
    assert set(out["ceiling"]) == set(MAPS)
    # each head's ceiling bounds the best of its query heads' own read, so the means are ordered too
    assert out["ceiling"]["memory"] >= out["query_best"] - 1e-6 >= out["query_share"] - 2e-6
    assert out["ceiling"]["memory"] >= out["uniform"]
    # the degree-2 products of the memory's features are a sharper read of the same keys
    assert out["ceiling"]["memory^2"] >= out["ceiling"]["memory"] - 1e-6
    if qk_map:
        assert out["ceiling"]["converted"] != pytest.approx(out["ceiling"]["memory"])
    else:  # no key map: the memory writes the layer's own keys
        assert out["ceiling"]["converted"] == pytest.approx(out["ceiling"]["memory"])
    assert set(out["control_ceiling"]) == set(MAPS) and out["control_ceiling"]["memory"] >= out["uniform"] - 1e-6
    with pytest.raises(ValueError, match="unknown feature map 'x'"):
        read_capacity(model, [case], maps=("x",))


def _tiny_case(seed: int, model):
    ids = torch.randint(0, 97, (1, 45), generator=torch.Generator().manual_seed(seed)).tolist()[0]
    ids[3:9] = [11, 5, 12, 5, 13, 14]
    return SimpleNamespace(ids=ids + [5, 6], answer_start=45, needle=(3, 9))


@pytest.mark.parametrize("feature_map", ["elu", "dpfp"])
def test_the_fitted_query_maps_share_is_the_memorys_read_and_fitting_raises_it(feature_map):
    from senri.evaluation.read_fit import fit_query_maps, needle_share, query_map_shares, read_inputs

    model = tiny_model(memory_update="linear", memory_qk_map=True, memory_feature_map=feature_map)
    cases = [_tiny_case(seed, model) for seed in range(4)]
    layers = read_weights(model, torch.tensor([cases[0].ids[:45]]))
    own = {i: model.model.layers[i].self_attn.memory_query_map.detach() for i in layers}
    for i, inputs in read_inputs(model, cases[0]).items():  # the same weights as the memory's own read
        expected = layers[i]["weights"]["memory"][:, 3:9].sum(-1)
        torch.testing.assert_close(needle_share(own[i], inputs, model.config.memory_features), expected,
                                   rtol=1e-5, atol=1e-6)
    unchanged, _ = fit_query_maps(model, cases, steps=0)
    shares = query_map_shares(model, cases, unchanged)
    assert shares["fitted"] == pytest.approx(shares["own"]) and shares["own"] > 0
    # the asked value's tokens are part of the statement: their share is part of its share
    assert 0 < shares["own_value"] <= shares["own"] and shares["uniform_value"] <= shares["uniform"]
    maps, log = fit_query_maps(model, cases, steps=50, lr=1e-2)
    assert all(entry["after"] > entry["before"] for entry in log.values())
    assert query_map_shares(model, cases, maps)["fitted"] > shares["own"]
    # Fitting the key maps too (what the memory writes): the own maps reproduce the memory's read, and fitting both
    # reads the needle at least as sharply as the query map alone.
    from senri.evaluation.read_fit import fit_read_maps

    same_q, same_k, _ = fit_read_maps(model, cases, steps=0, keys=True)
    assert query_map_shares(model, cases, same_q, same_k)["fitted"] == pytest.approx(shares["own"])
    both_q, both_k, both_log = fit_read_maps(model, cases, steps=50, lr=1e-2, keys=True)
    assert any(not torch.equal(both_k[i], same_k[i]) for i in both_k)
    assert query_map_shares(model, cases, both_q, both_k)["fitted"] > shares["own"]
    far = SimpleNamespace(ids=cases[0].ids[:45] + [5], answer_start=45, needle=(44, 45))
    with pytest.raises(ValueError, match="no case has its needle in the memory"):
        fit_query_maps(model, [far], steps=1)


def test_a_memory_saved_with_fitted_query_maps_loads_with_them_and_nothing_else_changed(smollm2, tmp_path):
    from senri.evaluation.read_fit import save_with_query_maps
    from senri.model.trained import SMOLLM2_WINDOW256, load_trained_memory, read_card

    llama, _ = smollm2
    shipped = load_trained_memory(llama, SMOLLM2_WINDOW256)
    layer = shipped.config.memory_layers[0]
    fitted = shipped.model.layers[layer].self_attn.memory_query_map.detach() + 0.5
    out = save_with_query_maps(SMOLLM2_WINDOW256, {layer: fitted}, tmp_path / "fit" / "trained_memory", {"steps": 3})
    assert not (tmp_path / "fit" / "trained_memory.partial").exists()
    loaded = load_trained_memory(llama, out)
    torch.testing.assert_close(loaded.model.layers[layer].self_attn.memory_query_map, fitted)
    own, other = dict(shipped.named_parameters()), dict(loaded.named_parameters())
    assert [n for n in own if not torch.equal(own[n], other[n])] == [
        f"model.layers.{layer}.self_attn.memory_query_map"]
    assert read_card(out)["read_fit"] == {"source": str(SMOLLM2_WINDOW256), "steps": 3}
    assert read_card(out)["settings"]["memory_feature_map"] == "elu"
    # Maps fitted under another feature map: the card says so, and the memory loads with it.
    dpfp = save_with_query_maps(SMOLLM2_WINDOW256, {layer: fitted}, tmp_path / "dpfp" / "trained_memory", {},
                                settings={"memory_feature_map": "dpfp"})
    assert load_trained_memory(llama, dpfp).config.memory_feature_map == "dpfp"
    key = shipped.model.layers[layer].self_attn.memory_key_map.detach() - 0.25
    both = save_with_query_maps(SMOLLM2_WINDOW256, {layer: fitted}, tmp_path / "qk" / "trained_memory", {},
                                key_maps={layer: key})
    torch.testing.assert_close(load_trained_memory(llama, both).model.layers[layer].self_attn.memory_key_map, key)
    from senri.evaluation.read_fit import saved_maps

    query_maps, key_maps = saved_maps(both)
    assert set(query_maps) == set(key_maps) == set(shipped.config.memory_layers)
    torch.testing.assert_close(query_maps[layer], fitted.float())
    torch.testing.assert_close(key_maps[layer], key.float())
    with pytest.raises(ValueError, match=r"settings \['chunk_size'\] shape parameters"):
        save_with_query_maps(SMOLLM2_WINDOW256, {layer: fitted}, tmp_path / "bad", {}, settings={"chunk_size": 32})
    with pytest.raises(ValueError, match="has no model.layers.99.self_attn.memory_query_map"):
        save_with_query_maps(SMOLLM2_WINDOW256, {99: fitted}, tmp_path / "bad", {})


@pytest.mark.parametrize("feature_map", ["elu", "dpfp"])
def test_the_ordinary_reads_a_preserving_fit_keeps_are_the_memorys_own_and_the_fit_keeps_them(feature_map):
    from senri.evaluation.read_fidelity import layer_projections
    from senri.evaluation.read_fit import (
        context_positions, context_reads, fit_read_maps, own_key_maps, own_query_maps, query_map_shares, read_inputs,
    )
    from senri.model.memory import reference_memory_attention

    model = tiny_model(memory_update="linear", memory_qk_map=True, memory_feature_map=feature_map, num_sink_tokens=2)
    config = model.config
    g = torch.Generator().manual_seed(1)
    cases = []
    for _ in range(3):
        ids = torch.randint(0, 97, (90,), generator=g).tolist()
        ids[3:9] = [11, 5, 12, 5, 13, 14]
        cases.append(SimpleNamespace(ids=ids + [5, 6], answer_start=90, needle=(3, 9)))
    positions = context_positions(config, 89, 5)
    assert len(positions) == 5 and positions[0] == (config.window_chunks + 1) * config.chunk_size
    assert positions[-1] == 89 - 32 and context_positions(config, 40, 5) == []
    # The ordinary reads are what the memory path returns at those positions (the naive token-by-token reference).
    own_q, own_k = own_query_maps(model), own_key_maps(model)
    projections = layer_projections(model, torch.tensor([cases[0].ids[:90]]))
    for i, inputs in read_inputs(model, cases[0], context=5).items():
        p = projections[i]
        reference, _, _ = reference_memory_attention(
            p["mq"][None], p["mk"][None], p["v"][None], config.chunk_size, config.window_chunks, "linear",
            config.memory_eps, num_sink_tokens=config.num_sink_tokens, feature_map=config.memory_features)
        torch.testing.assert_close(context_reads(own_q[i], own_k[i], inputs, config.memory_features,
                                                 config.memory_eps), reference[0][:, positions], rtol=1e-4, atol=1e-5)
    # Fitting with the ordinary reads kept: the answer's read still sharpens, and the reads elsewhere move less
    # than in the free fit.
    free_q, free_k, _ = fit_read_maps(model, cases, steps=40, lr=1e-2, keys=True)
    kept_q, kept_k, log = fit_read_maps(model, cases, steps=40, lr=1e-2, keys=True, preserve=30.0, context=5)
    for i, entry in log.items():
        assert entry["after"] > entry["before"]
        inputs = [read_inputs(model, case, context=5)[i] for case in cases]
        own = [context_reads(own_q[i], own_k[i], b, config.memory_features) for b in inputs]
        norm = sum(float(r.pow(2).sum()) for r in own)

        def drift(q, k):
            return sum(float((context_reads(q, k, b, config.memory_features) - r).pow(2).sum())
                       for b, r in zip(inputs, own)) / norm

        assert entry["drift"] == pytest.approx(drift(kept_q[i], kept_k[i]), rel=1e-3)
        assert drift(kept_q[i], kept_k[i]) < drift(free_q[i], free_k[i])
    # read_drift measures the same, layer by layer, and is 0 for the memory's own maps.
    from senri.evaluation.read_fit import read_drift

    measured = read_drift(model, cases, kept_q, kept_k, context=5)
    assert measured["per_layer"] == pytest.approx({i: entry["drift"] for i, entry in log.items()}, rel=1e-3)
    assert read_drift(model, cases, own_q, own_k, context=5)["drift"] == 0
    assert read_drift(model, cases, free_q, free_k, context=5)["drift"] > measured["drift"]
    # Inputs read once serve both measures, as fitted-reads passes them: the same numbers.
    seen = [read_inputs(model, case, context=5) for case in cases]
    assert read_drift(model, cases, kept_q, kept_k, context=5, seen=seen) == measured
    assert query_map_shares(model, cases, kept_q, kept_k, seen=seen) == query_map_shares(model, cases, kept_q, kept_k)
    with pytest.raises(ValueError, match="preserve must be >= 0"):
        fit_read_maps(model, cases, steps=1, preserve=-1.0)
    with pytest.raises(ValueError, match="memory_update is 'delta'"):
        fit_read_maps(tiny_model(memory_update="delta", memory_qk_map=True), cases, steps=1, preserve=1.0)


def test_the_value_span_is_where_the_answers_value_sits_in_the_statement():
    from senri.evaluation.read_fit import value_span

    # statement 10..16 says "... 7 8 9 ." and the answer is "7 8 9" then a full stop and the end token
    ids = [1] * 10 + [3, 7, 4, 7, 8, 9, 2] + [1] * 5 + [7, 8, 9, 2, 0]
    case = SimpleNamespace(ids=ids, answer_start=22, value_tokens=3, needle=(10, 17))
    assert value_span(case) == [13, 14, 15]
    # without value_tokens the whole answer is the value: its longest prefix in the statement, the last such place
    assert value_span(SimpleNamespace(ids=ids, answer_start=22, needle=(10, 17))) == [13, 14, 15, 16]
    assert value_span(SimpleNamespace(ids=ids[:22] + [5], answer_start=22, needle=(10, 17))) == []
    # the last place where the longest prefix occurs
    assert value_span(SimpleNamespace(ids=ids, answer_start=22, value_tokens=1, needle=(10, 17))) == [13]
