"""Flax NNX LLaMA models with the GaLore paper's presets and Hugging Face checkpoint I/O."""

from models import llama
from models.hf import load_hf_llama
from models.hf import save_hf_llama
from models.llama import CONFIGS
from models.llama import Llama
from models.llama import LlamaConfig

__all__ = [
    "CONFIGS",
    "Llama",
    "LlamaConfig",
    "llama",
    "load_hf_llama",
    "save_hf_llama",
]
