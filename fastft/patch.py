"""Patch one model instance with fastft's kernels, and undo it.

Only sub-modules are patched (their ``forward`` bound on the instance), never transformers' classes and
never a decoder layer's ``forward``: transformers wraps that one with gradient checkpointing when the class
is created, and replacing it would silently switch checkpointing off. So a patched and an unpatched model
live side by side in one process, and :func:`unpatch_model` restores the original.

Per decoder layer:

* ``input_layernorm`` / ``post_attention_layernorm`` (and the final norm, Qwen3's q/k norms) ->
  ``rms_norm`` kernel;
* ``self_attn`` -> one attention forward for every architecture: fused q/k/v projection (NF4 + LoRA; Phi-3's
  one ``qkv_proj`` is one ``lora_linear`` split into q, k, v), RoPE kernel, the attention registered as "fastft"
  (or whatever ``config._attn_implementation`` names), fused o projection;
* ``mlp`` -> fused gate/up/SwiGLU/down (NF4 + LoRA; Phi-3's ``gate_up_proj``: ``lora_mlp_gate_up``); a sparse
  mixture-of-experts block instead -> router, experts op with LoRA per expert, fused shared expert (``moe.py``).

The fused LoRA path reads the *active* adapter at every call (TRL's DPO switches to a ``ref`` adapter
and disables adapters for reference log-probs), and whether its ``lora_dropout`` applies (training mode).
A projection the fused path cannot serve exactly (DoRA, several active adapters, FP4/8-bit weights, ...)
runs peft's own forward; a one-time warning says which and why.
"""
from __future__ import annotations

import logging
import types

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .architectures import ArchitectureSpec
from .kernels.lora_linear import lora_linear
from .kernels.lora_mlp import lora_mlp, lora_mlp_gate_up
from .kernels.lora_qkv import lora_qkv
from .kernels.rms_norm import rms_norm
from .kernels.rope import apply_rope
from .kernels.swiglu import swiglu
from .moe import check_block, is_sparse_block, moe_block_forward
from .quant import UnsupportedLoraLayer, fused_linear_args

logger = logging.getLogger("fastft")
_PATCHED_FORWARD = "_fastft_patched"
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def _fused_args(module: nn.Module):
    """(weight, bias, A, B, scaling, compute_dtype, dropout) of a projection for the fused kernels, or None
    when the fused path cannot serve it exactly and the module's own forward must run."""
    try:
        return fused_linear_args(module)
    except UnsupportedLoraLayer as reason:
        _warn_once(f"{type(module).__name__}:{reason}", f"fastft: {reason}; this projection runs peft's own forward")
        return None


def rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up, down = _fused_args(self.gate_proj), _fused_args(self.up_proj), _fused_args(self.down_proj)
    if gate is not None and up is not None and down is not None:
        return lora_mlp(x, gate, up, down, chunk_tokens=getattr(self, "_fastft_mlp_chunk_tokens", None))
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def gate_up_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Phi-3's MLP: ``gate, up = chunk(gate_up_proj(x), 2)``, ``down_proj(silu(gate) * up)``."""
    gate_up, down = _fused_args(self.gate_up_proj), _fused_args(self.down_proj)
    if gate_up is not None and down is not None:
        return lora_mlp_gate_up(x, gate_up, down, chunk_tokens=getattr(self, "_fastft_mlp_chunk_tokens", None))
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(swiglu(gate, up))


def _project_fused_qkv(self, x):
    """Phi-3's one ``qkv_proj``: one projection (one LoRA), its ``[q | k | v]`` columns split."""
    qkv = _fused_args(self.qkv_proj)
    y = lora_linear(x, *qkv) if qkv is not None else self.qkv_proj(x)
    kv_size = self.config.num_key_value_heads * self.head_dim
    q, k, v = y.split([y.shape[-1] - 2 * kv_size, kv_size, kv_size], dim=-1)
    # v gets its own storage: attention keeps v for its backward (a KV cache keeps it too), and a view would keep
    # all of y alive with it; RoPE reads q and k into new tensors
    return q, k, v.contiguous()


def _project_qkv(self, x):
    if self._fastft_spec.fused_projections:
        return _project_fused_qkv(self, x)
    q, k, v = _fused_args(self.q_proj), _fused_args(self.k_proj), _fused_args(self.v_proj)
    if q is not None and k is not None and v is not None:
        return lora_qkv(x, q, k, v)
    return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def _project_o(self, x):
    o = _fused_args(self.o_proj)
    return lora_linear(x, *o) if o is not None else self.o_proj(x)


def attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                      **kwargs):
    """One attention forward for every supported architecture (see ``architectures.py``)."""
    spec: ArchitectureSpec = self._fastft_spec
    batch, seq_len, _ = hidden_states.shape
    head_shape = (batch, seq_len, -1, self.head_dim)

    q, k, v = _project_qkv(self, hidden_states)
    q, k, v = q.view(head_shape), k.view(head_shape), v.view(head_shape)
    if spec.qk_norm:
        q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D] views

    cos, sin = position_embeddings
    q, k = apply_rope(q, k, cos, sin)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)

    attention_fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, sdpa_attention_forward)
    out, weights = attention_fn(
        self, q, k, v, attention_mask,
        dropout=self.attention_dropout if self.training else 0.0,
        scaling=self.scaling,
        sliding_window=spec.sliding_window(self),
        **kwargs,
    )
    return _project_o(self, out.reshape(batch, seq_len, -1)), weights


def _bind(module: nn.Module, forward) -> None:
    module.forward = types.MethodType(forward, module)
    setattr(module, _PATCHED_FORWARD, True)


def patch_decoder(backbone: nn.Module, spec: ArchitectureSpec) -> None:
    """Bind fastft's forwards on the norms, attention and MLP modules of ``backbone`` (LlamaModel, ...)."""
    for layer in backbone.layers:
        attn = layer.self_attn
        attn._fastft_spec = spec
        _bind(attn, attention_forward)
        if spec.moe is not None and is_sparse_block(layer.mlp):
            check_block(layer.mlp, spec.moe)
            layer.mlp._fastft_moe = spec.moe
            _bind(layer.mlp, moe_block_forward)
            if spec.moe.shared_expert:
                _bind(layer.mlp.shared_expert, mlp_forward)
        else:
            _bind(layer.mlp, gate_up_mlp_forward if spec.fused_projections else mlp_forward)
        _bind(layer.input_layernorm, rms_norm_forward)
        _bind(layer.post_attention_layernorm, rms_norm_forward)
        if spec.qk_norm:
            _bind(attn.q_norm, rms_norm_forward)
            _bind(attn.k_norm, rms_norm_forward)
    _bind(backbone.norm, rms_norm_forward)


def unpatch_modules(root: nn.Module) -> None:
    """Remove every forward fastft bound below ``root``; the class forwards apply again."""
    for module in root.modules():
        if module.__dict__.pop(_PATCHED_FORWARD, False):
            module.__dict__.pop("forward", None)
