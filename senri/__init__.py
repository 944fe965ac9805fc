"""Senri: a small pretrained Llama with an Infini-attention compressive memory beside sliding-window attention."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .model.cache import SenriCache, load_memory_state, save_memory_state
from .model.configuration_senri import SenriConfig
from .model.conversion import convert_llama_to_senri, convert_qwen2_to_senri, load_base_model, load_local_smollm2
from .model.modeling_senri import SenriForCausalLM, SenriModel
from .model.trained import load_trained_smollm2

AutoConfig.register("senri", SenriConfig, exist_ok=True)
AutoModel.register(SenriConfig, SenriModel, exist_ok=True)
AutoModelForCausalLM.register(SenriConfig, SenriForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = [
    "SenriConfig", "SenriModel", "SenriForCausalLM", "SenriCache", "convert_llama_to_senri", "load_local_smollm2",
    "save_memory_state", "load_memory_state", "load_base_model", "convert_qwen2_to_senri", "load_trained_smollm2",
]
