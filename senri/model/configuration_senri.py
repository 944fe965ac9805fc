"""SenriConfig: a Llama config plus the block-sliding window and the compressive memory."""

from __future__ import annotations

import difflib

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from .memory import FEATURE_MAPS as MEMORY_FEATURE_MAPS
from .memory import RELEVANCES as MEMORY_RELEVANCES
from .memory import FeatureMap

LAYER_TYPES = ("sliding_attention", "memory", "memory_only", "full_attention")
MEMORY_LAYER_TYPES = ("memory", "memory_only")
MEMORY_UPDATES = ("delta", "linear")
MEMORY_TYPES = ("single", "multi", "hierarchical", "routed")
SERIALIZED_LAYER_TYPES = "senri_layer_types"
# The fields SenriConfig._validate_senri reads: checked again whenever one of them is assigned.
VALIDATED_ON_ASSIGNMENT = frozenset({
    "layer_types", "num_hidden_layers", "chunk_size", "sliding_window", "memory_update", "memory_gate_init",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size", "memory_relevance", "memory_type",
    "num_memories", "top_k_memories", "num_memory_banks", "segments_per_bank", "num_sink_tokens", "alibi_scale",
    "sink_max_distance",
    "memory_eps", "memory_feature_map", "memory_dpfp_nu",
})
JAPANESE_TOKENIZER = "cyberagent/open-calm-small"


def load_japanese_tokenizer():
    """The OpenCALM tokenizer of the Japanese preset (needs the Hugging Face Hub)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(JAPANESE_TOKENIZER)
    except OSError as error:
        raise OSError(f"cannot load the Japanese tokenizer {JAPANESE_TOKENIZER!r}: the Hub is not reachable ({error})") from error


def _suggest(value: object, valid: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(value), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"valid values are {list(valid)}{hint}"


@strict
class SenriConfig(LlamaConfig):
    r"""Configuration of a Senri model.

    All Llama fields keep their meaning. Senri adds:

    * ``sliding_window`` / ``chunk_size``: the local window is *block-sliding*: a query in chunk ``c`` sees the
      tokens of chunks ``c - window_chunks .. c``, ``window_chunks = ceil(sliding_window / chunk_size)`` (between
      ``window_length + 1`` and ``window_length + chunk_size`` tokens, ``window_length = window_chunks * chunk_size``);
      every older chunk has been written to memory. So each earlier token is visible through exactly one path
      (docs/DESIGN.md, exact coverage invariant). Any ``sliding_window`` >= 0 is accepted: one that is not a multiple
      of ``chunk_size`` is rounded *up* to whole chunks (``sliding_window=2``, ``chunk_size=8``: one chunk). Whole
      chunks are what keeps the invariants: memory writes and the windows' starts stay on the chunk grid, so exact
      coverage, streaming ≡ one pass, the constant state and state transfer hold unchanged; rounding up (not down)
      keeps the promise that a query sees at least its ``sliding_window`` previous tokens, and padding a partial
      chunk instead would make the window's start depend on the query within a chunk (one chunk written in pieces).
      Every window length (``window_chunks``, ``window_length``, ``sink_distance``) comes from these properties.
    * ``memory_update``: ``"delta"`` (default) or ``"linear"`` (Infini-attention, eqs. 4 and 5).
    * ``layer_types``: one of ``sliding_attention``, ``memory`` (window + memory), ``memory_only``, ``full_attention``
      per layer. By default derived from ``num_memory_layers`` / ``first_memory_layer`` / ``memory_layer_interval``.
    * ``memory_gate_init``: weight of the memory path at initialisation, in [0, 1]. 0 (default) makes a converted
      model compute exactly what its source computed, while the gate still receives a gradient.
    * ``memory_eps``: the epsilon of the memory read's normaliser.
    * ``num_sink_tokens``: the first S tokens of the stream (attention sinks, StreamingLLM) stay visible to every
      windowed layer besides its window and are never written to memory, so each earlier token is still visible
      through exactly one path. A pretrained model whose window loses its first tokens goes off its training
      distribution; conversions default to 4. 0 (default here) is the plain window. At most ``chunk_size``.
    * ``sink_max_distance`` (L): the farthest RoPE distance at which a query sees a sink. A query in chunk c sees
      sink i as if it stood at position i + max(0, (c + 1)·C − L), so the distance stays below L however long the
      stream (sinks kept at their own positions 0..S−1 are seen at distances the base model never trained on:
      SmolLM2 breaks past ~12K tokens). While (c + 1)·C ≤ L the sinks keep their own positions (a stream shorter
      than L computes what it always did). L is at least ``window_length + chunk_size + num_sink_tokens`` (the
      sinks then stand just before the window, where StreamingLLM places them): a smaller value, 0 included,
      means that. None: their own positions always (unbounded; what models before this setting did).
    * ``memory_qk_map``: memory layers get per-KV-head maps ``memory_query_map`` / ``memory_key_map`` (H, D, D),
      identity at start, applied to the raw queries and keys of the memory path only (read and write): q and k were
      trained for softmax attention with RoPE, the memory reads them without it.
    * ``memory_feature_map``: the memory's feature map φ. ``"elu"`` (default): ELU + 1, head_dim features per head
      (Infini-attention). ``"dpfp"``: DPFP of order ``memory_dpfp_nu`` (Schlag et al. 2021), 2·head_dim·ν features:
      the state is ``M: (B, H, 2Dν, D)``, ``z: (B, H, 2Dν)``. It shapes no parameter, so a memory trained with one
      map loads with the other. Single memories only (``memory_type="single"``, one bank).
    * ``use_alibi`` / ``alibi_scale``: older segments' memory contributions decay as exp(−slope_h · distance in
      segments), with ALiBi's per-head geometric slopes times ``alibi_scale``. Implemented as a decay of the whole
      state (every memory of the layer) by exp(−slope_h) per written chunk, which weighs a segment written d chunks
      ago by exactly exp(−slope_h · d) and keeps the state fixed-size and streaming exact.

    Memory variants (the seeds'; a *segment* is one chunk of ``chunk_size`` tokens, numbered from 0 in the stream).
    Except ``"single"`` with one bank, a memory layer holds S memories, ``M: (B, H, S, D, D)``, ``z: (B, H, S, D)``:

    * ``memory_type="single"`` (default): one memory per KV head (Infini-attention).
    * ``"multi"``: ``num_memories`` independent memories; segment j is written to memory ``j % num_memories``. A query
      reads every memory (A_i = φ(q) M_i / (φ(q) z_i + eps)) and mixes them by attention-based selection: relevance
      r_i = φ(q)·z_i, output Σ_i softmax(r)_i A_i. No extra parameters. ``memory_relevance="mean"`` divides the
      relevance by the memory's key mass, r_i = φ(q)·z_i / Σ_d z_i,d — the query's mean affinity to the memory's keys,
      independent of how many tokens it holds (φ(q)·z_i grows with every token written); an empty memory gets no
      weight. Also used by hierarchical. On the cpu-proof task "mean" scored below "mass" (docs/RESULTS.md).
    * ``"hierarchical"``: the memories of ``"multi"`` are the *fine* level; the *coarse* memory is their sum
      (M_c = Σ_i M_i, z_c = Σ_i z_i, what a single memory would hold under the linear rule). A query reads the coarse
      memory A_c = φ(q) M_c / (φ(q) z_c + eps) and expands into the fine level by a learned per-head expansion gate
      g = sigmoid(w_h · q + b_h) ∈ (0, 1) on the raw query: output (1 − g) A_c + g Σ_i softmax(r)_i A_i.
      Parameters ``memory_expansion_weight`` (Hq, D), ``memory_expansion_bias`` (Hq,), initialised to 0 (g = 0.5).
    * ``"routed"`` (the Senri-LLM seed's orthogonal-basis routing, basis B = I): in training mode (``model.train()``)
      exactly ``"single"``. In eval mode every KV head has D = head_dim memories; each key is written to memory
      argmax_i |k_i| and a query reads the ``top_k_memories`` memories with the largest |q_i|, weighted by
      softmax over those |q_i|. The state shapes differ ((B, H, D, D) in training, (B, H, D, D, D) in eval): a
      state made in one mode is refused, with an error, by the other.
    * ``num_memory_banks`` / ``segments_per_bank`` (any memory_type but ``"routed"``): segment j goes to bank
      (j // segments_per_bank) % num_memory_banks, i.e. the layer switches to the next bank after
      ``segments_per_bank`` written segments and wraps around after the last bank (banks keep accumulating). Each
      bank holds ``num_memories`` memories (1 for ``"single"``), written round-robin inside the bank; memory
      ``bank * num_memories + j % num_memories``. Reads treat all S = banks × memories as the memories of
      ``"multi"`` (relevance softmax mix; for ``"hierarchical"`` the coarse memory is the sum of all of them).
    * ``memory_only`` layers read their own chunk's earlier tokens as if already written (linear rule) to the
      memory they will be written to.
    """

    model_type = "senri"
    # Llama's tensor- and pipeline-parallel plans are not inherited: a q/k/v head split would cut the compressive
    # memory and the window state across devices, and the pipeline plan passes an attention mask between stages
    # that Senri's layers do not take (they carry a cache state). Senri advertises no plan rather than a broken one.
    base_model_tp_plan = None
    base_model_pp_plan = None

    sliding_window: int = 1024
    chunk_size: int = 64
    memory_update: str = "delta"
    num_memory_layers: int = 2
    first_memory_layer: int = 10
    memory_layer_interval: int = 10
    layer_types: list[str] | None = None
    memory_gate_init: float = 0.0
    memory_eps: float = 1e-6
    use_alibi: bool = False
    alibi_scale: float = 1.0
    memory_type: str = "single"
    num_memories: int = 4
    top_k_memories: int = 8
    num_memory_banks: int = 1
    segments_per_bank: int = 4
    memory_relevance: str = "mass"
    num_sink_tokens: int = 0
    sink_max_distance: int | None = 0
    memory_qk_map: bool = False
    memory_feature_map: str = "elu"
    memory_dpfp_nu: int = 3
    tokenizer_name: str | None = None  # the tokenizer a preset is meant for (japanese(): JAPANESE_TOKENIZER)
    attention_output_bias: bool | None = None  # o_proj bias; None: same as attention_bias (Qwen2: q/k/v only)

    def __post_init__(self, **kwargs):
        stored = kwargs.pop(SERIALIZED_LAYER_TYPES, None)
        if stored is not None and self.layer_types is None:
            self.layer_types = list(stored)
        if self.layer_types is None:
            self.layer_types = self.default_layer_types(
                self.num_hidden_layers, self.num_memory_layers, self.first_memory_layer, self.memory_layer_interval
            )
        else:
            self.layer_types = list(self.layer_types)
        # Checked here, before transformers' strict validators, so that errors are plain ValueErrors.
        self._validate_senri()
        super().__post_init__(**kwargs)

    def __setattr__(self, name: str, value) -> None:
        """Fields that Senri checks are checked again on assignment once the config exists (an invalid value is
        refused, naming the key, and the config keeps its old value). Use :meth:`update` to change several fields
        that must agree (e.g. ``chunk_size`` and ``sliding_window``) at once."""
        if name not in VALIDATED_ON_ASSIGNMENT or not self.__dict__.get("_post_init_done", False) or (
            self.__dict__.get("_senri_deferred", False)
        ):
            super().__setattr__(name, value)
            return
        self._assign_validated({name: value})

    def update(self, config_dict: dict) -> None:
        """Set several fields, then check them together (all or nothing)."""
        checked = {key: value for key, value in config_dict.items() if key in VALIDATED_ON_ASSIGNMENT}
        for key, value in config_dict.items():
            if key not in checked:
                setattr(self, key, value)
        if checked:
            self._assign_validated(checked)

    def _assign_validated(self, values: dict) -> None:
        missing = object()
        old = {name: self.__dict__.get(name, missing) for name in values}
        self.__dict__["_senri_deferred"] = True
        try:
            for name, value in values.items():
                super().__setattr__(name, value)
            self._validate_senri()
        except (ValueError, TypeError) as error:
            for name, value in old.items():  # restore, bypassing the validators
                if value is missing:
                    self.__dict__.pop(name, None)
                else:
                    self.__dict__[name] = value
            keys = ", ".join(f"{name} = {value!r}" for name, value in values.items())
            raise ValueError(f"SenriConfig: setting {keys} is refused: {error}") from error
        finally:
            self.__dict__.pop("_senri_deferred", None)

    def to_dict(self) -> dict:
        output = super().to_dict()
        # transformers reads a checkpoint's config.json as a plain PreTrainedConfig when a Trainer resumes, and that
        # rejects layer types it does not know ("memory"): Senri's are stored under their own key.
        output[SERIALIZED_LAYER_TYPES] = output.pop("layer_types", None)
        return output

    @staticmethod
    def default_layer_types(
        num_hidden_layers: int, num_memory_layers: int, first_memory_layer: int, memory_layer_interval: int
    ) -> list[str]:
        """Every layer slides; layers ``first + i * interval`` (i < num_memory_layers) also carry memory."""
        if num_memory_layers < 0 or memory_layer_interval < 1 or first_memory_layer < 0:
            raise ValueError(
                "num_memory_layers must be >= 0, first_memory_layer >= 0 and memory_layer_interval >= 1; got "
                f"{num_memory_layers}, {first_memory_layer}, {memory_layer_interval}"
            )
        memory_layers = [first_memory_layer + i * memory_layer_interval for i in range(num_memory_layers)]
        out_of_range = [i for i in memory_layers if i >= num_hidden_layers]
        if out_of_range:
            raise ValueError(
                f"memory layer indices {out_of_range} are out of range for num_hidden_layers={num_hidden_layers} "
                f"(first_memory_layer={first_memory_layer}, memory_layer_interval={memory_layer_interval}, "
                f"num_memory_layers={num_memory_layers}); valid indices are 0..{num_hidden_layers - 1}"
            )
        return ["memory" if i in memory_layers else "sliding_attention" for i in range(num_hidden_layers)]

    # --- presets (from the seeds) -------------------------------------------------------------------------------
    @classmethod
    def smollm_135m(cls, **overrides) -> "SenriConfig":
        """SmolLM-135M's shapes with the seed's layout: window 1024, chunk 64, memory on layers 10 and 20."""
        fields = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
        return cls(**{**fields, **overrides})

    @classmethod
    def pythia_70m(cls, **overrides) -> "SenriConfig":
        """A from-scratch model of Pythia-70M's size (512 hidden, 6 layers, 8 heads) with the Infini-Pythia seed's
        composition: layer 0 memory-only, the rest sliding windows. Llama blocks, not GPT-NeoX's."""
        fields = dict(vocab_size=50304, hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1 << 20,
                      layer_types=["memory_only"] + ["sliding_attention"] * 5, sliding_window=1024, chunk_size=64)
        return cls(**{**fields, **overrides})

    @classmethod
    def full_attention_baseline(cls, **overrides) -> "SenriConfig":
        """SmolLM-135M's shapes with full attention in every layer (no window, no memory): the baseline."""
        layers = overrides.get("num_hidden_layers", 30)
        return cls.smollm_135m(**{"layer_types": ["full_attention"] * layers, **overrides})

    @classmethod
    def japanese(cls, **overrides) -> "SenriConfig":
        """The Senri-Japanese seed: the Pythia-70M-shaped composition (memory-only layer 0, then sliding windows)
        with the OpenCALM vocabulary (52,000 tokens); ``tokenizer_name`` is JAPANESE_TOKENIZER, loaded by
        :func:`load_japanese_tokenizer`."""
        fields = dict(vocab_size=52000, tokenizer_name=JAPANESE_TOKENIZER, bos_token_id=0, eos_token_id=0)
        return cls.pythia_70m(**{**fields, **overrides})

    @property
    def memory_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t in MEMORY_LAYER_TYPES]

    def memory_slots(self, training: bool) -> int | None:
        """Number S of memories per KV head of a memory layer, or None for the single memory's (B, H, D, D) layout.

        ``training`` matters only for ``memory_type="routed"`` (single memory in training, head_dim memories in eval).
        """
        if self.memory_type == "routed":
            return None if training else self.head_dim
        per_bank = 1 if self.memory_type == "single" else self.num_memories
        slots = per_bank * self.num_memory_banks
        return None if self.memory_type == "single" and slots == 1 else slots

    @property
    def memory_features(self) -> FeatureMap:
        """The memory's feature map φ (``memory_feature_map``, ``memory_dpfp_nu``)."""
        return FeatureMap(self.memory_feature_map, self.memory_dpfp_nu)

    def memory_state_shapes(self, batch_size: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """The (M, z) shapes a memory layer's state may have (routed: the training shape, then the eval shape)."""
        B, H, D = batch_size, self.num_key_value_heads, self.head_dim
        P = self.memory_features.dim(D)
        shapes = []
        for training in ((True, False) if self.memory_type == "routed" else (True,)):
            S = self.memory_slots(training)
            shapes.append(((B, H, P, D), (B, H, P)) if S is None else ((B, H, S, P, D), (B, H, S, P)))
        return shapes

    @property
    def window_chunks(self) -> int:
        """Number of full chunks the local window holds behind the current chunk: ``sliding_window`` rounded up to
        whole chunks (a query always sees at least ``sliding_window`` earlier tokens)."""
        return -(-self.sliding_window // self.chunk_size)

    @property
    def window_length(self) -> int:
        """Tokens of the whole chunks behind the current one that the window holds (``window_chunks * chunk_size``,
        ``sliding_window`` rounded up to a multiple of ``chunk_size``)."""
        return self.window_chunks * self.chunk_size

    @property
    def sink_distance(self) -> int | None:
        """The farthest RoPE distance at which a query sees an attention sink (``sink_max_distance``, at least the
        window's reach), or None when the sinks keep their own positions."""
        if self.sink_max_distance is None:
            return None
        return max(self.sink_max_distance, self.window_length + self.chunk_size + self.num_sink_tokens)

    def validate_layer_type(self) -> None:
        """Replaces transformers' check, which only knows its own layer types (Senri's run in __post_init__)."""

    def _validate_senri(self) -> None:
        for i, layer_type in enumerate(self.layer_types):
            if layer_type not in LAYER_TYPES:
                raise ValueError(f"layer_types[{i}] = {layer_type!r} is unknown; {_suggest(layer_type, LAYER_TYPES)}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}; "
                "give one layer type per layer"
            )

        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {self.chunk_size}")
        if self.sliding_window is None or self.sliding_window < 0:
            raise ValueError(
                f"sliding_window must be a non-negative integer (rounded up to whole chunks of {self.chunk_size}), "
                f"got {self.sliding_window}"
            )
        if self.memory_update not in MEMORY_UPDATES:
            raise ValueError(f"memory_update = {self.memory_update!r} is unknown; {_suggest(self.memory_update, MEMORY_UPDATES)}")
        if not 0.0 <= float(self.memory_gate_init) <= 1.0:
            raise ValueError(f"memory_gate_init must be in [0, 1], got {self.memory_gate_init}")
        kv_heads = self.num_key_value_heads or self.num_attention_heads
        if self.num_attention_heads % kv_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({kv_heads})"
            )
        if self.memory_relevance not in MEMORY_RELEVANCES:
            raise ValueError(f"memory_relevance = {self.memory_relevance!r} is unknown; "
                             f"{_suggest(self.memory_relevance, MEMORY_RELEVANCES)}")
        if self.memory_type not in MEMORY_TYPES:
            raise ValueError(f"memory_type = {self.memory_type!r} is unknown; {_suggest(self.memory_type, MEMORY_TYPES)}")
        for name in ("num_memories", "top_k_memories", "num_memory_banks", "segments_per_bank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.memory_type == "routed":
            head_dim = self.head_dim or self.hidden_size // self.num_attention_heads  # set by Llama's __post_init__
            if self.top_k_memories > head_dim:
                raise ValueError(
                    f"top_k_memories ({self.top_k_memories}) must be <= head_dim ({head_dim}): routed memories "
                    "have one memory per basis vector, head_dim per head"
                )
            if self.num_memory_banks != 1:
                raise ValueError(
                    f"num_memory_banks = {self.num_memory_banks} is not supported with memory_type='routed' "
                    "(routing already assigns each key to a memory); use num_memory_banks=1"
                )
        if not 0 <= self.num_sink_tokens <= self.chunk_size:
            raise ValueError(
                f"num_sink_tokens must be in 0..chunk_size ({self.chunk_size}), got {self.num_sink_tokens} "
                "(StreamingLLM keeps 4; 0 is the plain window)"
            )
        if self.sink_max_distance is not None and self.sink_max_distance < 0:
            raise ValueError(f"sink_max_distance must be None or >= 0, got {self.sink_max_distance}")
        if self.alibi_scale <= 0:
            raise ValueError(f"alibi_scale must be > 0, got {self.alibi_scale}")
        if self.memory_eps <= 0:
            raise ValueError(f"memory_eps must be > 0, got {self.memory_eps}")
        if self.memory_feature_map not in MEMORY_FEATURE_MAPS:
            raise ValueError(f"memory_feature_map = {self.memory_feature_map!r} is unknown; "
                             f"{_suggest(self.memory_feature_map, MEMORY_FEATURE_MAPS)}")
        if self.memory_feature_map != "elu":
            head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
            if not 1 <= self.memory_dpfp_nu < 2 * head_dim:
                raise ValueError(f"memory_dpfp_nu must be in 1..{2 * head_dim - 1} (2·head_dim − 1: each order "
                                 f"rolls the 2·head_dim features once more), got {self.memory_dpfp_nu}")
            if self.memory_type != "single" or self.num_memory_banks != 1:
                raise ValueError(f"memory_feature_map = {self.memory_feature_map!r} needs a single memory per head "
                                 f"(memory_type='single', num_memory_banks=1), got memory_type={self.memory_type!r}, "
                                 f"num_memory_banks={self.num_memory_banks}; the memory variants read ELU + 1 only")


# A saved config names its code (auto_map) and carries configuration_senri.py, so that AutoConfig loads it with
# trust_remote_code=True where senri is not installed.
SenriConfig.register_for_auto_class()

__all__ = ["SenriConfig", "LAYER_TYPES", "MEMORY_LAYER_TYPES", "MEMORY_UPDATES", "MEMORY_TYPES", "JAPANESE_TOKENIZER",
           "load_japanese_tokenizer"]
