"""The read loss is the memory's own read: its share on the needle equals the weights the memory averages its values
with, a left-padded row gives what the row alone gives, and it trains the query and key maps
(senri.training.readloss)."""

from __future__ import annotations

import pytest
import torch

from senri.evaluation.read_fidelity import read_weights
from senri.training.readloss import NeedleRow, captured_projections, needle_read_loss, needle_shares
from tests.conftest import tiny_model

NEEDLE = (3, 9)


def _model(**overrides):
    model = tiny_model(memory_update="linear", memory_qk_map=True, **overrides)
    torch.manual_seed(3)
    with torch.no_grad():
        for i in model.config.memory_layers:  # away from the identity, so that the maps matter
            attn = model.model.layers[i].self_attn
            attn.memory_query_map.add_(0.3 * torch.randn_like(attn.memory_query_map))
            attn.memory_key_map.add_(0.3 * torch.randn_like(attn.memory_key_map))
    return model


def _row(seed: int, length: int) -> list[int]:
    ids = torch.randint(0, 97, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    ids[NEEDLE[0] : NEEDLE[1]] = [11, 5, 12, 5, 13, 14]
    return ids


def _shares(model, batch: torch.Tensor, rows, mask=None) -> torch.Tensor:
    with captured_projections(model) as captured, torch.no_grad():
        model(input_ids=batch, attention_mask=mask)
    return needle_shares(model, captured, rows)


@pytest.mark.parametrize("sinks,feature_map", [(0, "elu"), (2, "elu"), (2, "dpfp")])
def test_the_share_is_the_memorys_own_read_weight_on_the_needle(sinks, feature_map):
    model = _model(num_sink_tokens=sinks, memory_feature_map=feature_map)
    ids = _row(4, 47)  # the answer query is the last token before the answer: position 44
    layers = read_weights(model, torch.tensor([ids[:45]]))
    expected = torch.cat([layer["weights"]["memory"][:, NEEDLE[0] : NEEDLE[1]].sum(-1) for layer in layers.values()])
    shares = _shares(model, torch.tensor([ids[:-1]]), [NeedleRow(0, 0, 44, NEEDLE)])
    torch.testing.assert_close(shares, expected, rtol=1e-5, atol=1e-7)


def test_a_left_padded_row_reads_as_the_row_alone_and_a_needle_in_the_window_counts_nothing():
    model = _model()
    short, long = _row(5, 40), _row(6, 52)
    alone = [_shares(model, torch.tensor([ids[:-1]]), [NeedleRow(0, 0, len(ids) - 3, NEEDLE)]) for ids in (short, long)]
    batch = torch.tensor([[0] * 12 + short[:-1], long[:-1]])
    mask = (torch.arange(51)[None] >= torch.tensor([[12], [0]])).long()
    rows = [NeedleRow(0, 12, len(short) - 3, NEEDLE), NeedleRow(1, 0, len(long) - 3, NEEDLE)]
    torch.testing.assert_close(_shares(model, batch, rows, mask), torch.cat(alone), rtol=1e-5, atol=1e-7)
    near = NeedleRow(0, 0, len(long) - 3, (45, 47))  # still in the window when asked: the memory does not hold it
    assert _shares(model, torch.tensor([long[:-1]]), [near]).numel() == 0
    with captured_projections(model) as captured:
        model(input_ids=torch.tensor([long[:-1]]))
    assert needle_read_loss(model, captured, [near]) == (None, None)


def test_the_loss_trains_the_read_toward_the_needle():
    model = _model()
    ids = torch.tensor([_row(7, 47)[:-1]])
    rows = [NeedleRow(0, 0, 44, NEEDLE)]
    maps = [p for n, p in model.named_parameters() if "memory_query_map" in n or "memory_key_map" in n]
    optimiser = torch.optim.Adam(maps, lr=0.1)
    before = float(_shares(model, ids, rows).detach().mean())
    for _ in range(20):
        with captured_projections(model) as captured:
            model(input_ids=ids)
        loss, share = needle_read_loss(model, captured, rows)
        optimiser.zero_grad()
        loss.backward()
        assert all(float(p.grad.abs().max()) > 0 for p in maps)
        optimiser.step()
    assert share > before and float(_shares(model, ids, rows).mean()) > 1.3 * before


def test_the_read_loss_refuses_a_read_that_is_no_weighted_mean():
    model = tiny_model(memory_update="delta")
    with captured_projections(model) as captured:
        model(input_ids=torch.zeros(1, 45, dtype=torch.long))
    with pytest.raises(ValueError, match="memory_update='linear'"):
        needle_shares(model, captured, [NeedleRow(0, 0, 44, NEEDLE)])


def test_a_query_that_meets_no_written_key_reads_no_share_and_no_nan_gradient():
    """Under DPFP a query's features can miss every written key's (the read then returns nothing): its share is 0 and
    the gradient stays finite (a 0/0 there once turned a whole fitted query map into NaN)."""
    from senri.evaluation.read_fidelity import needle_read_share
    from senri.model.memory import FeatureMap

    dpfp = FeatureMap("dpfp", 1)
    keys = torch.tensor([[[1.0, 2.0], [3.0, 1.0]]])  # (H=1, W=2, D=2): both positive, features only on (x0, x1)
    query = torch.tensor([[[-1.0, -1.0]]], requires_grad=True)  # all negative: features only on (−x0, −x1)
    share = needle_read_share(query, keys, torch.ones(2), [0], dpfp)
    assert float(share) == 0.0
    (grad,) = torch.autograd.grad(share.sum(), query)
    assert bool(torch.isfinite(grad).all())
    meets = needle_read_share(torch.tensor([[[1.0, 1.0]]]), keys, torch.ones(2), [0], dpfp)
    assert float(meets) == pytest.approx(2.0 / 5.0)  # the first key's feature product 1·2 of 1·2 + 3·1
