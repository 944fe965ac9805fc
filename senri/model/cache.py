"""SenriCache: all streaming state of a Senri model, explicit and transferable.

Per layer it holds the local window's keys/values (raw, before RoPE: RoPE is applied when they are attended, and
memory writes need the raw keys) and, per memory layer, the memory ``M`` / ``z`` (float32). A new cache *is* a
memory reset. Its size stops growing once the window is full (``full_attention`` layers excepted).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .configuration_senri import MEMORY_LAYER_TYPES, SenriConfig

# Layers whose local attention has a window, and so keeps attention sinks.
WINDOWED_LAYER_TYPES = ("sliding_attention", "memory")
from .io import atomic_write
from .memory import MEMORY_DTYPE

STATE_FORMAT = "senri-memory-state"
STATE_VERSION = 1
# The configuration fields a saved state depends on: a state only continues a model that agrees on all of them.
STATE_CONFIG_FIELDS = (
    "num_hidden_layers", "num_key_value_heads", "head_dim", "sliding_window", "chunk_size", "memory_update",
    "layer_types", "memory_type", "num_memories", "num_memory_banks", "segments_per_bank", "use_alibi", "alibi_scale",
    "num_sink_tokens", "memory_feature_map", "memory_dpfp_nu",
)
# Fields added after states were first saved: a state without them was made by a model with these values.
LEGACY_STATE_DEFAULTS = {"memory_type": "single", "num_memories": 4, "num_memory_banks": 1, "segments_per_bank": 4,
                         "use_alibi": False, "alibi_scale": 1.0, "num_sink_tokens": 0, "memory_feature_map": "elu",
                         "memory_dpfp_nu": 3}


@dataclass
class LayerState:
    """The state one decoder layer reads and returns (a layer never mutates it: recomputation stays safe).

    keys/values: (B, H, L, D) raw window tokens, positions ``written_chunks * chunk_size`` .. ``seen_tokens - 1``
    (all tokens since 0 for full_attention layers); M: (B, H, D, D), z: (B, H, D) float32 or None — or, for layers
    with S memories per head (SenriConfig.memory_slots), M: (B, H, S, D, D), z: (B, H, S, D).
    rotated_keys: the same window keys with RoPE applied, kept by local-attention layers so that a decoding step
    rotates only its new keys; derived from ``keys`` (never saved: a restored state recomputes it once).

    A left-padded batch (``offsets`` set) is B independent streams that share the stream index: row b's first
    ``offsets[b]`` tokens are padding, its own positions start at 0 on its first real token, and ``seen_tokens``
    counts the shared stream, padding included. Each row's state is what that row alone would hold (:meth:`row`):
    its window (``row_lengths[b]`` tokens, the last ones of keys/values/rotated_keys: rows are right-aligned, as
    they all end at the stream's end), its memory (row b of M, z), its ``row_written[b]`` chunks and its attention
    sinks (the row's first real tokens, the first entries of sink_keys/values); ``written_chunks`` is then the
    fewest any row has written.
    """

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    M: torch.Tensor | None = None
    z: torch.Tensor | None = None
    seen_tokens: int = 0
    written_chunks: int = 0
    rotated_keys: torch.Tensor | None = None
    sink_keys: torch.Tensor | None = None
    sink_values: torch.Tensor | None = None
    offsets: tuple[int, ...] | None = None
    row_written: tuple[int, ...] | None = None
    row_lengths: tuple[int, ...] | None = None

    @property
    def window_start(self) -> int:
        return self.seen_tokens - (0 if self.keys is None else self.keys.shape[2])

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("keys", "values", "M", "z", "rotated_keys", "sink_keys", "sink_values")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    # --- left-padded batches ----------------------------------------------------------------------------------------
    def with_offsets(self, offsets: tuple[int, ...]) -> "LayerState":
        """This state with the rows' padding counts ``offsets``; rows may only gain padding while they have no real
        token yet (an empty state becomes a padded one)."""
        if self.offsets is None:
            if self.seen_tokens:
                raise ValueError("padding can only start a stream: this state has seen tokens without padding")
            batch = len(offsets)
            return replace(self, offsets=tuple(offsets), row_written=(0,) * batch, row_lengths=(0,) * batch)
        return replace(self, offsets=tuple(offsets))

    def row(self, b: int) -> "LayerState":
        """Row b of a left-padded batch's state as the state of that row alone (no padding, its own positions)."""
        seen = max(0, self.seen_tokens - self.offsets[b])
        length = self.row_lengths[b]

        def window(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None or length == 0 else t[b : b + 1, :, t.shape[2] - length :]

        sinks = 0 if self.sink_keys is None else min(self.sink_keys.shape[2], seen)
        return LayerState(
            keys=window(self.keys), values=window(self.values), rotated_keys=window(self.rotated_keys),
            M=None if self.M is None else self.M[b : b + 1], z=None if self.z is None else self.z[b : b + 1],
            seen_tokens=seen, written_chunks=self.row_written[b],
            sink_keys=self.sink_keys[b : b + 1, :, :sinks] if sinks else None,
            sink_values=self.sink_values[b : b + 1, :, :sinks] if sinks else None,
        )

    @staticmethod
    def stack_rows(rows: list["LayerState"], offsets: tuple[int, ...], seen_tokens: int) -> "LayerState":
        """The padded batch state of the rows' states (each from :meth:`row` after its own step); the inverse of
        :meth:`row`. Windows are right-aligned, sinks left-aligned; a row without memory yet gets an empty one."""
        lengths = tuple(0 if r.keys is None else r.keys.shape[2] for r in rows)

        def stack(name: str, align: str | None) -> torch.Tensor | None:
            tensors = [getattr(r, name) for r in rows]
            ref = next((t for t in tensors if t is not None), None)
            if ref is None:
                return None
            if align is None:  # M, z: one per row
                return torch.cat([ref.new_zeros(ref.shape) if t is None else t for t in tensors])
            width = max(0 if t is None else t.shape[2] for t in tensors)
            padded = []
            for t in tensors:
                if t is None:
                    t = ref[:, :, :0]
                gap = (0, 0, width - t.shape[2], 0) if align == "right" else (0, 0, 0, width - t.shape[2])
                padded.append(torch.nn.functional.pad(t, gap))
            return torch.cat(padded)

        row_written = tuple(r.written_chunks for r in rows)
        return LayerState(
            keys=stack("keys", "right"), values=stack("values", "right"), rotated_keys=stack("rotated_keys", "right"),
            M=stack("M", None), z=stack("z", None), seen_tokens=seen_tokens, written_chunks=min(row_written),
            sink_keys=stack("sink_keys", "left"), sink_values=stack("sink_values", "left"),
            offsets=tuple(offsets), row_written=row_written, row_lengths=lengths,
        )


class SenriCacheLayer(CacheLayerMixin):
    """transformers' per-layer cache interface around a :class:`LayerState`.

    ``keys`` / ``values`` are what transformers' own layers hold, read from the state (the source of truth; they are
    views, not copies, and cannot be assigned): the window's tokens, positions ``state.window_start`` ..
    ``seen_tokens - 1``, as ``(batch, kv_heads, tokens, head_dim)``. Keys are RoPE'd at their absolute positions,
    as attention uses them and as transformers' ``DynamicLayer`` / ``DynamicSlidingWindowLayer`` hold them (Llama
    rotates before ``update``); ``memory_only`` layers have no RoPE path and expose their raw keys. The window is
    Senri's: after a forward it holds from the start of the last seen token's window (``window_length + 1`` to
    ``window_length + chunk_size`` tokens once full; every token for ``full_attention``, the current chunk's
    for ``memory_only``), not transformers' last ``sliding_window - 1``. The attention sinks, once they have left
    the window, and the memory are not in them (``state``). A left-padded batch's rows are right-aligned, zeros
    before a shorter row's window (``LayerState.row``). Both are None while the layer holds no window, and also for
    a state restored by ``SenriCache.from_memory_state`` until its next forward rotates its keys.
    """

    is_compileable = False
    # A memory write cannot be undone, so `crop` cannot put the layer back as it was: generate refuses assisted and
    # prompt-lookup decoding for it (transformers >= 5.25 asks the layers; older ones read `_is_stateful`).
    is_croppable = False
    supports_early_init = False

    def __init__(self, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.is_sliding = layer_type == "sliding_attention"
        self.state = LayerState()

    @property
    def keys(self) -> torch.Tensor | None:
        """The window's keys as attention sees them (RoPE'd; raw on ``memory_only`` layers), or None."""
        if self.layer_type == "memory_only":
            return self.state.keys
        return self.state.rotated_keys if self.state.keys is not None else None

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        # CacheLayerMixin.__init__ sets keys = values = None; the state is the only place a layer's tensors live.
        if value is not None:
            raise AttributeError(
                "SenriCacheLayer.keys is read from its LayerState; advance it with SenriCache.set_layer_state"
            )

    @property
    def values(self) -> torch.Tensor | None:
        """The window's values (the tokens of :attr:`keys`), or None when :attr:`keys` is None."""
        return None if self.keys is None else self.state.values

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        if value is not None:
            raise AttributeError(
                "SenriCacheLayer.values is read from its LayerState; advance it with SenriCache.set_layer_state"
            )

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        raise NotImplementedError("Senri layers advance their state through SenriCache.set_layer_state")

    def get_seq_length(self) -> int:
        return self.state.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        window = 0 if self.state.keys is None else self.state.keys.shape[2]
        return window + query_length, self.state.window_start

    def reset(self) -> None:
        self.state = LayerState()

    def _select_rows(self, rows: torch.Tensor) -> None:
        """Keep batch rows ``rows`` (indices, in order, repeats allowed): tensors and the per-row padding records."""
        changes = {name: t.index_select(0, rows.to(t.device)) for name, t in self.state.tensors().items()}
        picked = rows.tolist()
        for name in ("offsets", "row_written", "row_lengths"):
            values = getattr(self.state, name)
            if values is not None:
                changes[name] = tuple(values[i] for i in picked)
        self.state = replace(self.state, **changes)

    def _batch_size(self) -> int:
        tensors = self.state.tensors()
        if tensors:
            return next(iter(tensors.values())).shape[0]
        return 0 if self.state.offsets is None else len(self.state.offsets)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx.flatten().long().cpu())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows(torch.arange(self._batch_size()).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        indices = torch.as_tensor(indices).cpu()
        self._select_rows(indices.nonzero().flatten() if indices.dtype == torch.bool else indices.flatten().long())

    def _map_batch(self, fn) -> None:
        self.state = replace(self.state, **{name: fn(t) for name, t in self.state.tensors().items()})

    def offload(self) -> None:
        self._map_batch(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        pass


class SenriCache(Cache):
    """Streaming state of a Senri model: windows, memories and the number of tokens seen.

    ``SenriCache(config, batch_size=1)`` is an empty state (reset memory). Pass it as ``cache``; every
    forward advances it. ``get_memory_state`` / ``from_memory_state`` move a state between processes.
    """

    def __init__(self, config: SenriConfig, batch_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        super().__init__(layers=[SenriCacheLayer(t) for t in config.layer_types])
        self.config = config
        self.max_batch_size = batch_size

    # --- state access used by the model -------------------------------------------------------------------------
    def layer_state(self, layer_idx: int) -> LayerState:
        return self.layers[layer_idx].state

    def set_layer_state(self, layer_idx: int, state: LayerState) -> None:
        self.layers[layer_idx].state = state

    @property
    def seen_tokens(self) -> int:
        """Tokens of the stream so far (the padding of a left-padded batch included)."""
        return self.layers[0].state.seen_tokens if self.layers else 0

    @property
    def pad_offsets(self) -> tuple[int, ...] | None:
        """Per row, the padding tokens before its first real token (a left-padded batch), or None without padding."""
        return self.layers[0].state.offsets if self.layers else None

    # --- inspection ----------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held by all tensors of the cache."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.state.tensors().values())

    def memory_norms(self) -> dict[int, float]:
        """Frobenius norm of ``M`` per memory layer (summed over the batch), 0.0 for a still-empty memory."""
        norms = {}
        for idx, layer in enumerate(self.layers):
            if layer.layer_type in MEMORY_LAYER_TYPES:
                M = layer.state.M
                norms[idx] = 0.0 if M is None else float(M.detach().float().norm())
        return norms

    # --- maintenance --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def svd_clean(self, energy_threshold: float = 0.95, max_rank: int | None = None) -> dict[int, dict[str, Any]]:
        """Replace each memory ``M`` by its best low-rank approximation (Eckart–Young), per batch row and head.

        The rank kept is the smallest whose singular values hold ``energy_threshold`` of Σσ², capped by
        ``max_rank``. Returns, per memory layer, tensors (B, H) ``original_rank``, ``retained_rank``,
        ``energy_retained`` and the singular values (B, H, D) before cleaning — (B, H, S) and (B, H, S, D) for layers
        of S memories, where a still-empty memory (M_i = 0) keeps rank 0 and counts as energy_retained 1.
        ``z`` is left as it is.
        """
        if not 0.0 < energy_threshold <= 1.0:
            raise ValueError(f"energy_threshold must be in (0, 1], got {energy_threshold}")
        if max_rank is not None and max_rank < 1:
            raise ValueError(f"max_rank must be >= 1 or None, got {max_rank}")
        stats = {}
        for idx, layer in enumerate(self.layers):
            if layer.layer_type not in MEMORY_LAYER_TYPES:
                continue
            M = layer.state.M
            if M is None or layer.state.written_chunks == 0:
                raise RuntimeError(
                    f"layer {idx}: the memory is empty (no chunk written yet); stream more than one window first"
                )
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)  # (B, H, D, D), (B, H, D)
            energy = S.square()
            total = energy.sum(-1, keepdim=True).clamp_min(torch.finfo(S.dtype).tiny)
            cumulative = energy.cumsum(-1) / total
            tolerance = S[..., :1] * S.shape[-1] * torch.finfo(S.dtype).eps
            original_rank = (S > tolerance).sum(-1)
            rank = (cumulative < energy_threshold).sum(-1) + 1  # smallest k with cumulative[k-1] >= threshold
            # Never above the numerical rank (rounding can leave cumulative[-1] a hair below a threshold of 1; a zero
            # memory has rank 0).
            rank = torch.minimum(rank, original_rank)
            if max_rank is not None:
                rank = rank.clamp(max=max_rank)
            keep = torch.arange(S.shape[-1], device=S.device) < rank[..., None]
            layer.state = replace(layer.state, M=(U * (S * keep)[..., None, :]) @ Vh)
            retained = (energy * keep).sum(-1) / total.squeeze(-1)
            stats[idx] = {
                "original_rank": original_rank,
                "retained_rank": rank,
                "energy_retained": torch.where(original_rank > 0, retained, torch.ones_like(retained)),
                "singular_values": S,
            }
        return stats

    # --- transfer ------------------------------------------------------------------------------------------------
    def get_memory_state(self, include_window: bool = False) -> dict[str, Any]:
        """The cache as a dict of tensors plus metadata (safe for ``torch.save`` / ``torch.load(weights_only=True)``).

        By default only the memories (``M``, ``z``) are included: enough to carry what the model compressed into a
        new document. ``include_window=True`` adds every layer's window, the full streaming state, so that a model
        fed the state continues exactly as if it had never stopped. The attention sinks (``num_sink_tokens``) are
        always included: a few tokens, and a windowed layer goes off its training distribution without them.
        """
        if self.pad_offsets is not None:
            raise ValueError(
                "the state of a left-padded batch cannot be saved (its rows are at different positions): save the "
                "state of each sequence streamed alone"
            )
        layers = {}
        for idx, layer in enumerate(self.layers):
            state = layer.state
            entry: dict[str, Any] = {"written_chunks": state.written_chunks}
            if layer.layer_type in MEMORY_LAYER_TYPES and state.M is not None:
                entry["M"], entry["z"] = state.M.detach().clone(), state.z.detach().clone()
            if include_window and state.keys is not None:
                entry["keys"], entry["values"] = state.keys.detach().clone(), state.values.detach().clone()
            if state.sink_keys is not None:
                entry["sink_keys"], entry["sink_values"] = state.sink_keys.detach().clone(), state.sink_values.detach().clone()
            layers[str(idx)] = entry
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "config": {name: getattr(self.config, name) for name in STATE_CONFIG_FIELDS},
            "batch_size": self.max_batch_size,
            "seen_tokens": self.seen_tokens,
            "include_window": include_window,
            "layers": layers,
        }

    @classmethod
    def from_memory_state(cls, config: SenriConfig, state: dict[str, Any]) -> "SenriCache":
        """Rebuild a cache from :meth:`get_memory_state`, refusing a state made for a different model."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a Senri memory state: expected a dict with format={STATE_FORMAT!r}")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"memory state version {state.get('version')!r} is not supported (expected {STATE_VERSION})")
        saved = state["config"]
        mismatches = [
            f"{name}: state has {saved.get(name, LEGACY_STATE_DEFAULTS.get(name))!r}, model has {getattr(config, name)!r}"
            for name in STATE_CONFIG_FIELDS
            if saved.get(name, LEGACY_STATE_DEFAULTS.get(name)) != getattr(config, name)
        ]
        if mismatches:
            raise ValueError("memory state does not match the model config: " + "; ".join(mismatches))
        batch_size = int(state["batch_size"])
        cache = cls(config, batch_size=batch_size)
        H, D = config.num_key_value_heads, config.head_dim
        # A memory layer's (M, z) shapes; routed layers have two (training: single memory, eval: head_dim memories).
        memory_shapes = config.memory_state_shapes(batch_size)
        seen = int(state["seen_tokens"])
        for idx, layer in enumerate(cache.layers):
            entry = state["layers"].get(str(idx))
            if entry is None:
                raise ValueError(f"memory state has no entry for layer {idx}")
            written = int(entry["written_chunks"])
            expected = {"M": [m for m, _ in memory_shapes], "z": [z for _, z in memory_shapes]}
            if "M" in entry and tuple(entry["M"].shape) in expected["M"]:
                expected["z"] = [memory_shapes[expected["M"].index(tuple(entry["M"].shape))][1]]  # z goes with M
            tensors = {}
            for name in ("M", "z", "keys", "values", "sink_keys", "sink_values"):
                if name not in entry:
                    continue
                tensor = entry[name]
                shapes = expected.get(name)
                if shapes is None:
                    shapes = [(batch_size, H, tensor.shape[2] if tensor.dim() == 4 else -1, D)]
                if tuple(tensor.shape) not in shapes:
                    raise ValueError(
                        f"layer {idx} {name} has shape {tuple(tensor.shape)}, expected {' or '.join(map(str, shapes))}"
                    )
                if name in ("M", "z") and tensor.dtype != MEMORY_DTYPE:
                    raise ValueError(f"layer {idx} {name} has dtype {tensor.dtype}, expected {MEMORY_DTYPE}")
                tensors[name] = tensor
            if layer.layer_type in MEMORY_LAYER_TYPES and written > 0 and "M" not in tensors:
                raise ValueError(f"layer {idx} is a memory layer with {written} chunks written but the state has no M")
            if state.get("include_window"):
                layer_seen = seen
                window = 0 if "keys" not in tensors else tensors["keys"].shape[2]
                if seen - window != (0 if layer.layer_type == "full_attention" else written * config.chunk_size):
                    raise ValueError(
                        f"layer {idx}: window of {window} tokens does not end at seen_tokens={seen} from chunk {written}"
                    )
            else:
                # Memory only: windows are dropped and every layer restarts at the last chunk boundary; the tokens
                # that were still in a window are lost, the memories are kept.
                tensors.pop("keys", None), tensors.pop("values", None)
                layer_seen = (seen // config.chunk_size) * config.chunk_size
                if layer.layer_type != "full_attention":
                    written = layer_seen // config.chunk_size
            sinks = min(config.num_sink_tokens, layer_seen) if layer.layer_type in WINDOWED_LAYER_TYPES else 0
            held = tensors["sink_keys"].shape[2] if "sink_keys" in tensors else 0
            if held < sinks:
                raise ValueError(f"layer {idx}: the state holds {held} attention sink tokens, the model needs {sinks} "
                                 f"(num_sink_tokens={config.num_sink_tokens})")
            for name in ("sink_keys", "sink_values"):
                if sinks:
                    tensors[name] = tensors[name][:, :, :sinks]
                else:
                    tensors.pop(name, None)
            layer.state = LayerState(**tensors, seen_tokens=layer_seen, written_chunks=written)
        return cache


def save_memory_state(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a state atomically (temporary file + rename): a crash never leaves a half-written state file."""
    with atomic_write(path, "wb") as f:
        torch.save(state, f)
    return Path(path)


def load_memory_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a state written by :func:`save_memory_state` (tensors and plain metadata only)."""
    return torch.load(Path(path), map_location=map_location, weights_only=True)


__all__ = ["SenriCache", "SenriCacheLayer", "LayerState", "save_memory_state", "load_memory_state"]
