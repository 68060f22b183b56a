"""Flax NNX LLaMA models with the GaLore paper's presets, Hugging Face checkpoint I/O, GGUF
import and cached text generation."""

from models import llama
from models.decoding import generate
from models.gguf import load_gguf_config
from models.gguf import load_gguf_llama
from models.gguf import load_gguf_tokenizer_metadata
from models.hf import load_hf_llama
from models.hf import save_hf_llama
from models.llama import CONFIGS
from models.llama import Llama
from models.llama import LlamaConfig

__all__ = [
    "CONFIGS",
    "Llama",
    "LlamaConfig",
    "generate",
    "llama",
    "load_gguf_config",
    "load_gguf_llama",
    "load_gguf_tokenizer_metadata",
    "load_hf_llama",
    "save_hf_llama",
]
