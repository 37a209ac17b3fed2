"""Patch one model instance with fastft's kernels, and undo it.

Only sub-modules are patched (their ``forward`` bound on the instance), never transformers' classes and
never a decoder layer's ``forward``: transformers wraps that one with gradient checkpointing when the class
is created, and replacing it would silently switch checkpointing off. So a patched and an unpatched model
live side by side in one process, and :func:`unpatch_model` restores the original.

Per decoder layer:

* ``input_layernorm`` / ``post_attention_layernorm`` (Gemma: also ``pre_feedforward_layernorm`` /
  ``post_feedforward_layernorm``; the final norm, Qwen3's and Gemma 3's q/k norms) -> ``rms_norm`` kernel (Gemma's
  ``x * (1 + w)`` with ``unit_offset``);
* ``self_attn`` -> one attention forward for every architecture: fused q/k/v projection (NF4 + LoRA; Phi-3's
  one ``qkv_proj`` is one ``lora_linear`` split into q, k, v), RoPE kernel, the attention registered as "fastft"
  (or whatever ``config._attn_implementation`` names), fused o projection;
* ``mlp`` -> fused gate/up/SwiGLU/down (NF4 + LoRA; GeGLU for Gemma; Phi-3's ``gate_up_proj``:
  ``lora_mlp_gate_up``); a sparse mixture-of-experts block instead -> router, experts op with LoRA per expert, fused
  shared expert (``moe.py``).

The fused LoRA path reads the *active* adapter at every call (TRL's DPO switches to a ``ref`` adapter
and disables adapters for reference log-probs), and whether its ``lora_dropout`` applies (training mode).
A projection the fused path cannot serve exactly (DoRA, several active adapters, FP4/8-bit weights, ...)
runs peft's own forward; a one-time warning says which and why.

Disabled kernels (``disable_kernels`` / ``FASTFT_DISABLE_KERNELS``, see :data:`MODEL_ROUTES`): each named op
runs the plain transformers / peft path instead, per model instance: a norm keeps transformers' forward, an
attention or MLP module whose ops are all disabled keeps it too, and otherwise the patched forward routes the
disabled ops (rope, swiglu, the fused LoRA projections) to transformers' or peft's code. The fused LoRA ops that
still run do so inside ``fastft.kernels._common.disabled_scope`` of the model's names, so NF4 dequantization and
SwiGLU inside them honour "nf4" and "swiglu".
"""
from __future__ import annotations

import logging
import sys
import types

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import reach_ins
from .architectures import ArchitectureSpec
from .kernels._common import KERNEL_NAMES, disabled_scope
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

# Where each op of a patched model runs when its kernel is disabled.
MODEL_ROUTES = {
    "rms_norm": "transformers' RMSNorm forward",
    "rope": "transformers' apply_rotary_pos_emb",
    "swiglu": "transformers' act_fn(gate) * up",
    "cross_entropy": "transformers' loss function on the logits",
    "fused_linear_cross_entropy": "full logits + fastft's cross_entropy kernel",
    "linear_log_probs": "TRL's _ChunkedLogProbFunction",
    "nf4": "PyTorch dequantization (bitsandbytes' where peft's forward runs)",
    "lora_linear": "peft's forward",
    "lora_qkv": "peft's forward",
    "lora_mlp": "peft's forward",
    "moe_experts": "fastft's PyTorch loop over the hit experts (peft's forward cannot run 4-bit experts)",
    "attention": "PyTorch SDPA",
}
assert set(MODEL_ROUTES) == set(KERNEL_NAMES)
# An attention / MLP module with all of these disabled keeps transformers' own forward.
ATTENTION_OPS = frozenset({"lora_qkv", "lora_linear", "rope", "attention"})
MLP_OPS = frozenset({"lora_mlp", "swiglu"})
# Phi-3's fused qkv_proj runs the lora_linear kernel as the model's q/k/v projection: either name routes it to peft.
FUSED_QKV_OPS = frozenset({"lora_qkv", "lora_linear"})


def model_routes(disabled: frozenset[str]) -> dict[str, str]:
    """Where each of the kernel names ``disabled`` runs in a model instead, in :data:`KERNEL_NAMES` order."""
    route = dict(MODEL_ROUTES)
    if "cross_entropy" in disabled:
        route["fused_linear_cross_entropy"] = "full logits + transformers' loss function"
    return {name: route[name] for name in KERNEL_NAMES if name in disabled}


def describe_routes(disabled: frozenset[str], source: str) -> str:
    """The log line of a model with the kernels ``disabled`` (named by ``source``): where each disabled op runs,
    and which run fastft's kernels."""
    routes = ", ".join(f"{name} -> {where}" for name, where in model_routes(disabled).items())
    kept = [name for name in KERNEL_NAMES if name not in disabled]
    return (f"fastft: kernels disabled ({source}): {routes}; "
            f"fastft kernels: {', '.join(kept) if kept else 'none (plain transformers + peft)'}")


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


def unit_offset_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Gemma's RMSNorm (``Gemma2RMSNorm`` / ``Gemma3RMSNorm``: ``x * (1 + w)``, its epsilon named ``eps``)."""
    return rms_norm(hidden_states, self.weight, self.eps, unit_offset=True)


def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    activation, disabled = self._fastft_spec.activation, self._fastft_disabled
    if "lora_mlp" not in disabled:
        gate, up, down = _fused_args(self.gate_proj), _fused_args(self.up_proj), _fused_args(self.down_proj)
        if gate is not None and up is not None and down is not None:
            with disabled_scope(disabled):
                return lora_mlp(x, gate, up, down, chunk_tokens=getattr(self, "_fastft_mlp_chunk_tokens", None),
                                activation=activation)
    gate, up = self.gate_proj(x), self.up_proj(x)
    return self.down_proj(self.act_fn(gate) * up if "swiglu" in disabled else swiglu(gate, up, activation))


def gate_up_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Phi-3's MLP: ``gate, up = chunk(gate_up_proj(x), 2)``, ``down_proj(silu(gate) * up)``."""
    disabled = self._fastft_disabled
    if "lora_mlp" not in disabled:
        gate_up, down = _fused_args(self.gate_up_proj), _fused_args(self.down_proj)
        if gate_up is not None and down is not None:
            with disabled_scope(disabled):
                return lora_mlp_gate_up(x, gate_up, down,
                                        chunk_tokens=getattr(self, "_fastft_mlp_chunk_tokens", None))
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(self.activation_fn(gate) * up if "swiglu" in disabled else swiglu(gate, up))


def _project_fused_qkv(self, x):
    """Phi-3's one ``qkv_proj``: one projection (one LoRA), its ``[q | k | v]`` columns split. The projection runs
    the ``lora_linear`` kernel; disabling that or ``lora_qkv`` (it is the q/k/v projection) runs peft's forward."""
    qkv = None if FUSED_QKV_OPS & self._fastft_disabled else _fused_args(self.qkv_proj)
    if qkv is None:
        y = self.qkv_proj(x)
    else:
        with disabled_scope(self._fastft_disabled):
            y = lora_linear(x, *qkv)
    kv_size = self.config.num_key_value_heads * self.head_dim
    q, k, v = y.split([y.shape[-1] - 2 * kv_size, kv_size, kv_size], dim=-1)
    # v gets its own storage: attention keeps v for its backward (a KV cache keeps it too), and a view would keep
    # all of y alive with it; RoPE reads q and k into new tensors
    return q, k, v.contiguous()


def _project_qkv(self, x):
    if self._fastft_spec.fused_projections:
        return _project_fused_qkv(self, x)
    if "lora_qkv" not in self._fastft_disabled:
        q, k, v = _fused_args(self.q_proj), _fused_args(self.k_proj), _fused_args(self.v_proj)
        if q is not None and k is not None and v is not None:
            with disabled_scope(self._fastft_disabled):
                return lora_qkv(x, q, k, v)
    return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def _project_o(self, x):
    o = None if "lora_linear" in self._fastft_disabled else _fused_args(self.o_proj)
    if o is None:
        return self.o_proj(x)
    with disabled_scope(self._fastft_disabled):
        return lora_linear(x, *o)


def transformers_rope(attention: nn.Module):
    """``apply_rotary_pos_emb`` of the module that defines ``attention``'s class (transformers' RoPE for that
    architecture; same call as ``apply_rope``), or a clear error when that module has none."""
    rope = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    if not callable(rope):
        raise NotImplementedError(f"fastft: rope is disabled, but {type(attention).__module__} has no "
                                  "apply_rotary_pos_emb to route it to; enable rope for this model")
    return rope


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
    rope = transformers_rope(self) if "rope" in self._fastft_disabled else apply_rope
    q, k = rope(q, k, cos, sin)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)

    # "eager" is no registered function: the model's own eager attention (Gemma 2's soft-caps the scores)
    attention_fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._fastft_eager)
    softcap = getattr(self, "attn_logit_softcapping", None)  # Gemma 2's soft-capped scores
    out, weights = attention_fn(
        self, q, k, v, attention_mask,
        dropout=self.attention_dropout if self.training else 0.0,
        scaling=self.scaling,
        sliding_window=spec.sliding_window(self),
        **({} if softcap is None else dict(softcap=softcap)),
        **kwargs,
    )
    return _project_o(self, out.reshape(batch, seq_len, -1)), weights


def _bind(module: nn.Module, forward) -> None:
    module.forward = types.MethodType(forward, module)
    setattr(module, _PATCHED_FORWARD, True)


def _eager_attention(attention: nn.Module):
    """The ``eager_attention_forward`` of the attention module's modeling file (transformers' fallback when
    ``_attn_implementation`` is "eager"); checked once, at patch time."""
    eager = getattr(sys.modules[type(attention).__module__], "eager_attention_forward", None)
    if eager is None:
        raise RuntimeError(f"fastft: {type(attention).__module__} has no eager_attention_forward (checked against "
                           "transformers 5.17-5.23); this transformers version is not supported")
    return eager


def patch_decoder(backbone: nn.Module, spec: ArchitectureSpec, disabled: frozenset[str] = frozenset()) -> None:
    """Bind fastft's forwards on the norms, attention and MLP modules of ``backbone`` (LlamaModel, ...), except
    where the kernel names ``disabled`` leave transformers' own (see the module docstring)."""
    for entry in (reach_ins.ATTN_IMPLEMENTATION, reach_ins.TENSOR_VERSION):  # read at every forward
        reach_ins.check(entry)
    # the kernels' sync-free input checks on a GPU; without it they check on the host (one warning, here)
    reach_ins.available(reach_ins.ASSERT_ASYNC)
    norm_forward = unit_offset_rms_norm_forward if spec.norm_unit_offset else rms_norm_forward
    norms = [backbone.norm]
    for layer in backbone.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not ATTENTION_OPS <= disabled:
            if "rope" in disabled:
                transformers_rope(attn)  # fails now, not in the first forward, if there is none
            attn._fastft_spec, attn._fastft_disabled = spec, disabled
            attn._fastft_eager = _eager_attention(attn)
            _bind(attn, attention_forward)
        mlp._fastft_spec = spec
        if spec.moe is not None and is_sparse_block(mlp):
            # always fastft's block: its experts op is PyTorch (NF4 dequantization inside honours "nf4"), and peft's
            # forward cannot run on 4-bit experts
            check_block(mlp, spec.moe)
            mlp._fastft_moe, mlp._fastft_disabled = spec.moe, disabled
            _bind(mlp, moe_block_forward)
            if spec.moe.shared_expert and not MLP_OPS <= disabled:
                mlp.shared_expert._fastft_spec, mlp.shared_expert._fastft_disabled = spec, disabled
                _bind(mlp.shared_expert, mlp_forward)
        elif not MLP_OPS <= disabled:
            mlp._fastft_disabled = disabled
            _bind(mlp, gate_up_mlp_forward if spec.fused_projections else mlp_forward)
        norms += [getattr(layer, name) for name in spec.layer_norms]
        if spec.qk_norm:
            norms += [attn.q_norm, attn.k_norm]
    if "rms_norm" not in disabled:
        for norm in norms:
            _bind(norm, norm_forward)


def unpatch_modules(root: nn.Module) -> None:
    """Remove every forward fastft bound below ``root``; the class forwards apply again."""
    for module in root.modules():
        if module.__dict__.pop(_PATCHED_FORWARD, False):
            module.__dict__.pop("forward", None)
