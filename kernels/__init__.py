"""fastft's kernel library: Triton kernels with hand-written backward passes.

Imports only torch and triton. Installed as ``fastft.kernels`` (never as a top-level ``kernels``:
that name belongs to a Hugging Face package transformers probes for). One op per module (plus shared machinery:
``_common``, and ``vocab_rows``, the online-softmax kernel pair of the three vocabulary ops); each public
function runs the compiled kernel on CUDA tensors, the interpreted kernel on CPU tensors under
``TRITON_INTERPRET=1``, and a plain PyTorch path on CPU otherwise, or on any device for an op disabled by name
(``FASTFT_DISABLE_KERNELS=rms_norm,attention``, or a ``disabled("rms_norm")`` block; names: ``KERNEL_NAMES``).
"""
from ._common import KERNEL_GROUPS, KERNEL_NAMES, disabled, use_engine
from .attention import attention, attention_varlen
from .cross_entropy import cross_entropy
from .fused_linear_cross_entropy import fused_linear_cross_entropy
from .linear_log_probs import linear_log_probs
from .lora_linear import lora_linear
from .lora_mlp import lora_mlp, lora_mlp_gate_up
from .lora_qkv import lora_qkv
from .moe_experts import moe_experts
from .nf4 import NF4Weight, dequantize_nf4
from .rms_norm import rms_norm
from .rope import apply_rope
from .swiglu import swiglu

__all__ = [
    "apply_rope", "attention", "attention_varlen", "cross_entropy", "dequantize_nf4", "disabled",
    "fused_linear_cross_entropy", "KERNEL_GROUPS", "KERNEL_NAMES", "linear_log_probs", "lora_linear", "lora_mlp",
    "lora_mlp_gate_up", "lora_qkv", "moe_experts", "NF4Weight", "rms_norm", "swiglu", "use_engine",
]
