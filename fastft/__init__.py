"""fastft: fast, lean QLoRA fine-tuning of Llama and Qwen2 models on one GPU.

The Hugging Face integration is imported on first use, so ``import fastft.kernels`` (the kernel
library) pulls in only torch and triton.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "FastModel": "fastft.model",
    "patch_model": "fastft.model",
    "unpatch_model": "fastft.model",
    "dequantize_4bit": "fastft.quant",
    "UnsupportedModelError": "fastft.architectures",
    "estimate_memory": "fastft.memory.estimate",
    "max_context": "fastft.memory.estimate",
}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastft' has no attribute {name!r}")
