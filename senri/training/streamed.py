"""Losses over sequences longer than fit in memory at once: backpropagation through the stream, segment by segment.

A Senri model reads a long sequence as a stream: the cache carries the window and the memory from one piece to the
next, and reading in pieces equals reading at once (the streaming invariant). :func:`streamed_loss` uses that for
training. It reads ``ids`` in segments of ``segment`` tokens, with the cache carried across them, and returns the
loss as one differentiable scalar, but never holds more than one segment's activations:

* **forward** — the segments are read without a graph; the cache's state at each segment border is kept (windows,
  memories, sinks: a fixed size per border, not the activations);
* **backward** — segments are read again from their borders in reverse order (the same random state, the same
  autocast), and each one's gradient is taken with respect to the trainable parameters and to the state it
  started from. With ``backprop="full"`` that state gradient is passed on to the segment before, so the gradient
  equals the one-pass gradient exactly (backpropagation through time by recomputation: the memory's writes of a
  needle in the first segment learn from the answer in the last). With ``backprop="truncated"`` it stops at each
  border (truncated backpropagation: cheaper, but an answer then cannot teach how its needle was written).

Why not transformers' gradient checkpointing: it recomputes inside one forward over the whole sequence, so the
attention's and the memory's per-token tensors for all of it are still live at once; here a segment is the unit,
which is what lets a 2-core CPU or a T4 take rows of many thousand tokens. It is a ``torch.autograd.Function``
(as ``torch.utils.checkpoint``'s reentrant form is), so the training loop needs no change: the trainer's
backward, gradient accumulation and float16 loss scaling reach it as the upstream gradient.

The loss must be a sum over positions, each segment adding its share (:class:`TokenTargets`,
:class:`DistillTargets`, or any :class:`SegmentLoss`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..model.cache import LayerState, SenriCache
from ..model.modeling_senri import unwrap_peft

BACKPROP = ("full", "truncated")


class SegmentLoss(Protocol):
    """A loss that is a sum over stream positions: ``keep(start, end)`` says how many of the segment's last
    positions need logits (0: none), ``__call__(logits, start, end)`` returns the segment's share (or None)."""

    def keep(self, start: int, end: int) -> int: ...

    def __call__(self, logits: torch.Tensor, start: int, end: int) -> torch.Tensor | None: ...


@dataclass
class TokenTargets:
    """Mean cross-entropy over the labelled positions of a stream: ``labels`` (B, N), the token each position should
    predict, -100 where nothing is scored; the mean is over all labelled positions of all rows (as
    ``F.cross_entropy(..., ignore_index=-100)`` of the whole sequence)."""

    labels: torch.Tensor

    def __post_init__(self) -> None:
        scored = (self.labels != -100).any(0).nonzero()
        self.first = int(scored[0]) if len(scored) else self.labels.shape[1]
        self.count = int((self.labels != -100).sum())
        if self.count == 0:
            raise ValueError("TokenTargets: labels score no position (every label is -100)")

    @classmethod
    def answers(cls, ids: torch.Tensor, answer_lengths: torch.Tensor) -> "TokenTargets":
        """The targets of :func:`senri.training.finetune.answer_loss`: row b's last ``answer_lengths[b]`` tokens of
        ``ids`` (B, T), each predicted from everything before it (the stream is ``ids[:, :-1]``)."""
        labels = ids[:, 1:].clone()
        positions = torch.arange(labels.shape[1], device=ids.device)[None]
        labels[positions < labels.shape[1] - answer_lengths[:, None]] = -100
        return cls(labels)

    def keep(self, start: int, end: int) -> int:
        return max(0, end - max(start, self.first))

    def __call__(self, logits: torch.Tensor, start: int, end: int) -> torch.Tensor | None:
        keep = logits.shape[1]
        labels = self.labels[:, end - keep : end]
        if bool((labels == -100).all()):
            return None
        ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        return ce / self.count


@dataclass
class DistillTargets:
    """Weighted KL(teacher ‖ model) at stream positions ``start`` .. N-1 of a one-row stream, normalised by the sum of
    the weights: ``teacher`` as :class:`senri.training.textmemory.Teacher` returns it (``log_probs``/``indices``
    (P, k), ``weights`` (P,), row p for position ``start + p``); ``kl(log_probs, teacher_rows)`` gives the per
    position KL (:func:`senri.training.textmemory.top_k_kl`)."""

    teacher: dict[str, torch.Tensor]
    start: int
    kl: Any

    def keep(self, start: int, end: int) -> int:
        return max(0, end - max(start, self.start))

    def __call__(self, logits: torch.Tensor, start: int, end: int) -> torch.Tensor | None:
        first = end - logits.shape[1] - self.start
        rows = {name: value[first : end - self.start] for name, value in self.teacher.items()}
        kl = self.kl(logits[0].float().log_softmax(-1), rows)
        return (rows["weights"] * kl).sum() / self.teacher["weights"].sum()


# --- the state at a segment border -------------------------------------------------------------------------------
def _snapshot(cache: SenriCache) -> list[LayerState]:
    """The cache's per-layer states, detached (a layer never mutates its state, so no copy is needed)."""
    return [replace(s, **{n: t.detach() for n, t in s.tensors().items()})
            for s in (cache.layer_state(i) for i in range(len(cache.layers)))]


def _restore(config: Any, states: list[LayerState] | None, batch: int,
             leaves: bool) -> tuple[SenriCache, dict[tuple[int, str], torch.Tensor]]:
    """A cache holding ``states`` (None: empty); with ``leaves`` its floating tensors are new leaves that require
    grad, returned by (layer, field) so that the gradient with respect to them can be read."""
    cache, found = SenriCache(config, batch), {}
    for i, state in enumerate(states or ()):
        swapped = {}
        for name, t in state.tensors().items():
            if leaves and t.is_floating_point():
                t = found[(i, name)] = t.detach().requires_grad_(True)
            swapped[name] = t
        cache.set_layer_state(i, replace(state, **swapped))
    return cache, found


def _outputs(cache: SenriCache) -> dict[tuple[int, str], torch.Tensor]:
    return {(i, name): t for i in range(len(cache.layers)) for name, t in cache.layer_state(i).tensors().items()}


@dataclass
class _Stream:
    model: Any
    config: Any
    ids: torch.Tensor
    attention_mask: torch.Tensor | None
    bounds: list[tuple[int, int]]
    loss: SegmentLoss
    backprop: str
    params: Sequence[torch.nn.Parameter]

    def read(self, cache: SenriCache, start: int, end: int) -> torch.Tensor | None:
        """One segment through the model (advancing ``cache``), and its share of the loss."""
        keep = self.loss.keep(start, end)
        mask = None if self.attention_mask is None else self.attention_mask[:, :end]
        # logits_to_keep=0 would mean every position: a segment without targets asks for one and scores none.
        out = self.model(input_ids=self.ids[:, start:end], attention_mask=mask, cache=cache, use_cache=True,
                         logits_to_keep=max(keep, 1))
        return self.loss(out.logits, start, end) if keep else None

    def total(self, borders: list | None = None, rng: list | None = None) -> torch.Tensor:
        """The whole stream's loss, read without a graph; ``borders`` / ``rng`` (lists) get the cache's state and the
        random state at the start of each segment (None for the first segment's empty state)."""
        device = self.ids.device
        cache = SenriCache(self.config, self.ids.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=device)
        with torch.no_grad():
            for start, end in self.bounds:
                if borders is not None:
                    borders.append(_snapshot(cache) if start else None)
                if rng is not None:
                    rng.append((torch.get_rng_state(),
                                torch.cuda.get_rng_state(device) if device.type == "cuda" else None))
                part = self.read(cache, start, end)
                if part is not None:
                    total = total + part.float()
        return total


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _StreamedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stream: _Stream, *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.stream, ctx.autocast = stream, _autocast_state(stream.ids.device.type)
        ctx.borders, ctx.rng = [], []
        return stream.total(ctx.borders, ctx.rng)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        stream = ctx.stream
        device = stream.ids.device
        sums: list[torch.Tensor | None] = [None] * len(stream.params)
        carried: dict[tuple[int, str], torch.Tensor] = {}
        enabled, dtype = ctx.autocast
        for k in reversed(range(len(stream.bounds))):
            start, end = stream.bounds[k]
            cache, leaves = _restore(stream.config, ctx.borders[k], stream.ids.shape[0], stream.backprop == "full")
            cpu_rng, cuda_rng = ctx.rng[k]
            with torch.random.fork_rng(devices=[device] if cuda_rng is not None else []):
                torch.set_rng_state(cpu_rng)
                if cuda_rng is not None:
                    torch.cuda.set_rng_state(cuda_rng, device)
                with torch.enable_grad(), torch.autocast(device.type, dtype=dtype, enabled=enabled):
                    part = stream.read(cache, start, end)
            outputs, upstream = ([part], [grad.to(part.dtype)]) if part is not None else ([], [])
            for key, tensor in _outputs(cache).items():
                if key in carried and tensor.requires_grad:
                    outputs.append(tensor)
                    upstream.append(carried[key])
            leaf_keys = list(leaves)
            if not outputs:
                carried = {}
                continue
            inputs = [*stream.params, *(leaves[key] for key in leaf_keys)]
            grads = torch.autograd.grad(outputs, inputs, upstream, allow_unused=True)
            for i, g in enumerate(grads[: len(stream.params)]):
                if g is not None:
                    sums[i] = g if sums[i] is None else sums[i] + g
            carried = {key: g for key, g in zip(leaf_keys, grads[len(stream.params):]) if g is not None}
        return (None, *sums)


def segment_bounds(length: int, segment: int) -> list[tuple[int, int]]:
    """[start, end) of each segment of a ``length``-token stream (the last one may be shorter)."""
    if isinstance(segment, bool) or not isinstance(segment, int) or segment < 1:
        raise ValueError(f"segment must be a positive number of tokens, got {segment!r}")
    return [(s, min(s + segment, length)) for s in range(0, length, segment)]


def streamed_loss(model: Any, ids: torch.Tensor, loss: SegmentLoss, segment: int, backprop: str = "full",
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``loss`` of the stream ``ids`` (B, N) read by ``model`` (a Senri model, or a peft model around one) in
    segments of ``segment`` tokens with the cache carried across them; a differentiable scalar whose backward
    recomputes one segment at a time. ``backprop``: "full" (the exact gradient of the whole stream) or "truncated"
    (no gradient across segment borders). ``attention_mask`` (B, N): a left-padded batch."""
    if backprop not in BACKPROP:
        raise ValueError(f"backprop must be one of {', '.join(BACKPROP)}, got {backprop!r}")
    inner = unwrap_peft(model)
    params = [p for p in model.parameters() if p.requires_grad]
    stream = _Stream(model, inner.config, ids, attention_mask, segment_bounds(ids.shape[1], segment), loss,
                     backprop, params)
    if not torch.is_grad_enabled() or not params:
        return stream.total()
    return _StreamedLoss.apply(stream, *params)


__all__ = ["BACKPROP", "SegmentLoss", "TokenTargets", "DistillTargets", "segment_bounds", "streamed_loss"]
