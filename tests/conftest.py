"""Shared fixtures: tiny random Senri configs (for speed) and the real SmolLM2 checkpoint (for claims)."""

from __future__ import annotations

import pytest
import torch

from senri import SenriConfig, SenriForCausalLM, load_local_smollm2


def tiny_config(**overrides) -> SenriConfig:
    """A 3-layer model: sliding, memory, sliding; window 16 in chunks of 4."""
    fields = dict(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=16, chunk_size=4,
        layer_types=["sliding_attention", "memory", "sliding_attention"], memory_gate_init=0.5,
        max_position_embeddings=1 << 21, tie_word_embeddings=False,
    )
    fields.update(overrides)
    return SenriConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> SenriForCausalLM:
    torch.manual_seed(seed)
    return SenriForCausalLM(tiny_config(**overrides)).eval()


def tiny_llama(vocab: int, seed: int = 0):
    """A 4-layer random transformers Llama (the base the fine-tuning recipes convert), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def smollm2():
    """(LlamaForCausalLM, tokenizer): the real SmolLM2-135M-Instruct from the pip-shipped GGUF."""
    return load_local_smollm2()


@pytest.fixture
def one_thread():
    """Tiny models run ~10x faster on one thread than on two contended ones (used by the training-run modules)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
