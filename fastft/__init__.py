"""fastft: fast, lean QLoRA fine-tuning of Llama, Qwen2, Mistral, Qwen3 and Phi-3/Phi-4 models on one GPU.

The Hugging Face integration is imported on first use, so ``import fastft.kernels`` (the kernel
library) pulls in only torch and triton.
"""
import importlib
import logging

__version__ = "0.1.0"


class _KernelsNotInstalledFilter(logging.Filter):
    """bitsandbytes' CPU backend warns, when imported, that it could not load an optional kernel from Hugging
    Face's ``kernels`` package ("pip install kernels"); without it bitsandbytes uses its own C kernel, so on every
    CPU run the line is noise. Drop exactly that case (``kernels`` not installed); any other failure to load the
    kernel (a broken ``kernels`` install, say) is still reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        not_installed = any(isinstance(arg, ModuleNotFoundError) and arg.name == "kernels" for arg in record.args or ())
        return not (not_installed and str(record.msg).startswith("Failed to load CPU gemm_4bit_forward"))


# The logger exists before bitsandbytes is imported (peft imports it), so the filter is in place when it warns.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_KernelsNotInstalledFilter())

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
