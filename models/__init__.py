"""Flax NNX LLaMA models with the GaLore paper's presets, Hugging Face checkpoint I/O, GGUF
import and cached text generation; a BERT encoder (:mod:`models.bert`)."""

from models import bert
from models import llama
from models.bert import BertConfig
from models.bert import load_hf_bert
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
    "BertConfig",
    "CONFIGS",
    "Llama",
    "LlamaConfig",
    "bert",
    "generate",
    "llama",
    "load_gguf_config",
    "load_gguf_llama",
    "load_gguf_tokenizer_metadata",
    "load_hf_bert",
    "load_hf_llama",
    "save_hf_llama",
]
