"""Backpropagation through a stream read in segments (senri.training.streamed) against naive one-graph references."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from senri import SenriCache
from senri.training.finetune import answer_loss
from senri.training.streamed import DistillTargets, TokenTargets, segment_bounds, streamed_loss
from senri.training.textmemory import distillation_loss, top_k_kl
from tests.conftest import tiny_model

SINKS = dict(num_sink_tokens=2)


def _batch(length: int = 46, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows, the second left-padded by 5 tokens, with answers of 3 and 5 tokens at their ends."""
    ids = torch.randint(1, 97, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    return ids, mask, torch.tensor([3, 5])


def _grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("segment", [1, 7, 16, 45])
@pytest.mark.parametrize("sinks", [False, True])
def test_full_backprop_through_segments_is_the_one_pass_loss_and_gradient(segment, sinks):
    model = tiny_model(**(SINKS if sinks else {})).double().train()
    ids, mask, answers = _batch()
    one_pass = answer_loss(model, ids, answers, mask)
    streamed = streamed_loss(model, ids[:, :-1], TokenTargets.answers(ids, answers), segment, "full", mask[:, :-1])
    torch.testing.assert_close(streamed, one_pass.float(), rtol=1e-6, atol=1e-7)
    expected = _grads(model, one_pass)
    got = _grads(model, streamed)
    # The memory carries the gradient across borders: the memory layer's projections learn from later answers.
    assert float(expected["model.layers.1.self_attn.k_proj.weight"].abs().max()) > 0
    _assert_same(got, expected, atol=1e-7)


def test_the_weighted_distillation_streams_exactly_gradients_included():
    model = tiny_model(**SINKS).double().train()
    ids = torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(5))
    start = 20
    with torch.no_grad():
        teacher_logits = torch.randn(60 - 1 - start, 97, generator=torch.Generator().manual_seed(6)).double()
    top = teacher_logits.log_softmax(-1).topk(97)  # every token: the KL is exact
    teacher = {"log_probs": top.values, "indices": top.indices,
               "weights": 0.1 + torch.rand(60 - 1 - start, generator=torch.Generator().manual_seed(7)).double()}
    one_pass = distillation_loss(model, ids, start, teacher)
    streamed = streamed_loss(model, ids[:, :-1], DistillTargets(teacher, start, top_k_kl), 9)
    torch.testing.assert_close(streamed, one_pass.float(), rtol=1e-6, atol=1e-7)
    _assert_same(_grads(model, streamed), _grads(model, one_pass), atol=1e-7)


def _naive_truncated(model, ids, targets, segment, mask):
    """Segments read with a graph each, the cache's state detached at every border, one backward of the sum."""
    cache, total = SenriCache(model.config, ids.shape[0]), 0
    for start, end in segment_bounds(ids.shape[1], segment):
        for i in range(len(cache.layers)):
            state = cache.layer_state(i)
            cache.set_layer_state(i, type(state)(**{**state.__dict__,
                                                    **{n: t.detach() for n, t in state.tensors().items()}}))
        keep = targets.keep(start, end)
        out = model(input_ids=ids[:, start:end], attention_mask=mask[:, :end], cache=cache,
                    logits_to_keep=max(keep, 1))
        part = targets(out.logits, start, end) if keep else None
        total = total + (0 if part is None else part)
    return total


def test_truncated_backprop_stops_at_each_border_and_keeps_the_loss():
    model = tiny_model().double().train()
    ids, mask, answers = _batch(length=60)
    targets = TokenTargets.answers(ids, answers)
    truncated = streamed_loss(model, ids[:, :-1], targets, 12, "truncated", mask[:, :-1])
    full = streamed_loss(model, ids[:, :-1], targets, 12, "full", mask[:, :-1])
    assert float(truncated.detach()) == float(full.detach())
    naive = _naive_truncated(model, ids[:, :-1], targets, 12, mask[:, :-1])
    cut, whole = _grads(model, truncated), _grads(model, full)
    _assert_same(cut, _grads(model, naive), atol=1e-7)
    # Cut at the borders, the answer no longer reaches how earlier tokens were written: the gradients differ.
    assert any(not torch.allclose(cut[n], whole[n], rtol=1e-4, atol=1e-7) for n in cut)


def test_recomputation_replays_dropout_and_peft_adapters_train_through_it():
    torch.manual_seed(0)
    inner = tiny_model().train()
    model = get_peft_model(inner, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():  # LoRA B starts at zero: give it weight, so the adapters matter
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    ids, mask, answers = _batch(length=40)
    targets = TokenTargets.answers(ids, answers)
    torch.manual_seed(11)
    streamed = streamed_loss(model, ids[:, :-1], targets, 8, "truncated", mask[:, :-1])
    got = _grads(model, streamed)
    torch.manual_seed(11)  # the same dropout masks, drawn segment by segment as the streamed forward drew them
    naive = _naive_truncated(model, ids[:, :-1], targets, 8, mask[:, :-1])
    torch.testing.assert_close(streamed, naive, rtol=1e-5, atol=1e-6)
    _assert_same(got, _grads(model, naive), atol=1e-6)
    assert all(float(g.abs().max()) > 0 for n, g in got.items() if "lora_" in n)
    torch.manual_seed(12)  # other masks: another loss (dropout is really on)
    again = streamed_loss(model, ids[:, :-1], targets, 8, "truncated", mask[:, :-1])
    assert float(again.detach()) != float(streamed.detach())


def test_without_gradients_it_only_reads_and_bad_settings_are_named():
    model = tiny_model().train()
    ids, mask, answers = _batch()
    targets = TokenTargets.answers(ids, answers)
    with torch.no_grad():
        value = streamed_loss(model, ids[:, :-1], targets, 10, attention_mask=mask[:, :-1])
        assert value.grad_fn is None
        torch.testing.assert_close(value, answer_loss(model, ids, answers, mask), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="backprop must be one of full, truncated, got 'all'"):
        streamed_loss(model, ids[:, :-1], targets, 10, "all")
    with pytest.raises(ValueError, match="segment must be a positive number of tokens, got 0"):
        streamed_loss(model, ids[:, :-1], targets, 0)
    with pytest.raises(ValueError, match="labels score no position"):
        TokenTargets(torch.full((1, 5), -100))
