"""SenriConfig: a Llama config plus the block-sliding window and the compressive memory."""

from __future__ import annotations

import difflib

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

LAYER_TYPES = ("sliding_attention", "memory", "memory_only", "full_attention")
MEMORY_LAYER_TYPES = ("memory", "memory_only")
MEMORY_UPDATES = ("delta", "linear")
SERIALIZED_LAYER_TYPES = "senri_layer_types"
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
      tokens of chunks ``c - sliding_window // chunk_size .. c`` (between ``sliding_window + 1`` and
      ``sliding_window + chunk_size`` tokens); every older chunk has been written to memory. So each earlier token
      is visible through exactly one path (DESIGN.md, exact coverage invariant).
    * ``memory_update``: ``"delta"`` (default) or ``"linear"`` (Infini-attention, eqs. 4 and 5).
    * ``layer_types``: one of ``sliding_attention``, ``memory`` (window + memory), ``memory_only``, ``full_attention``
      per layer. By default derived from ``num_memory_layers`` / ``first_memory_layer`` / ``memory_layer_interval``.
    * ``memory_gate_init``: weight of the memory path at initialisation, in [0, 1]. 0 (default) makes a converted
      model compute exactly what its source computed, while the gate still receives a gradient.
    * ``memory_eps``: the epsilon of the memory read's normaliser.
    * ``use_alibi`` / ``alibi_scale``: older segments' memory contributions decay as exp(−slope_h · distance in
      segments), with ALiBi's per-head geometric slopes times ``alibi_scale``.
    """

    model_type = "senri"

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
        """SmolLM-135M's shapes with the OpenCALM vocabulary (52,000 tokens; see JAPANESE_TOKENIZER)."""
        return cls.smollm_135m(**{"vocab_size": 52000, "bos_token_id": 0, "eos_token_id": 0, **overrides})

    @property
    def memory_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t in MEMORY_LAYER_TYPES]

    @property
    def window_chunks(self) -> int:
        """Number of full chunks the local window holds behind the current chunk."""
        return self.sliding_window // self.chunk_size

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
        if self.sliding_window < 0 or self.sliding_window % self.chunk_size != 0:
            raise ValueError(
                f"sliding_window ({self.sliding_window}) must be a non-negative multiple of chunk_size "
                f"({self.chunk_size}), e.g. {max(1, round(self.sliding_window / self.chunk_size)) * self.chunk_size}"
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
        if self.alibi_scale <= 0:
            raise ValueError(f"alibi_scale must be > 0, got {self.alibi_scale}")
        if self.memory_eps <= 0:
            raise ValueError(f"memory_eps must be > 0, got {self.memory_eps}")


__all__ = ["SenriConfig", "LAYER_TYPES", "MEMORY_LAYER_TYPES", "MEMORY_UPDATES", "JAPANESE_TOKENIZER",
           "load_japanese_tokenizer"]
