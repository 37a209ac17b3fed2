"""The architectures fastft patches, each as a small spec over one shared decoder implementation.

Llama, Mistral, Qwen2, Qwen3 and Phi-3 share the decoder shape fastft patches: pre-norm RMSNorm, attention
with RoPE (optionally GQA, q/k/v bias, per-head q/k RMSNorm, sliding window, partial rotary), a SwiGLU MLP. What
differs is captured here; everything else is read off the modules themselves (e.g. whether q_proj has a bias).

Phi-3 (Phi-3-mini/medium, Phi-3.5-mini, Phi-4, Phi-4-mini: ``model_type="phi3"``) is Mistral's decoder with q, k, v
in one linear layer ``qkv_proj`` (rows ``[q | k | v]``) and gate, up in one ``gate_up_proj`` (rows ``[gate | up]``,
``down(silu(gate) * up)``), so a LoRA sits on each fused matrix (peft's target names). Its RoPE variants (LongRoPE's
short/long factors chosen by sequence length and its attention scaling, Phi-4-mini's partial rotary factor) live
in the model's rotary embedding module, whose cos/sin fastft takes as they are. Its ``resid_pdrop`` dropouts run in
the decoder layer's own forward, which fastft does not replace (exact); ``embd_pdrop`` is not used by transformers;
an ``attention_dropout`` routes attention to SDPA, as for every architecture (``fastft/attention.py``).

The mixture-of-experts models (Qwen3-MoE, Qwen2-MoE, Mixtral) are the same decoder with a sparse MoE block in
place of the MLP (in every layer, or every ``decoder_sparse_step``-th one outside ``mlp_only_layers``): a router,
the routed experts as two 3-D tensors, and for Qwen2-MoE a shared expert; :class:`MoESpec` says which
(``fastft/moe.py`` serves the block).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class MoESpec:
    """The sparse MoE block of transformers 5: ``gate`` (the router: softmax over the experts, top-k, with
    ``norm_topk_prob`` renormalised; it returns ``(logits, weights, index)``) and ``experts`` (``gate_up_proj``
    ``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``, SwiGLU per expert)."""

    # Qwen2-MoE: out += sigmoid(shared_expert_gate(x)) * shared_expert(x), a SwiGLU MLP every token passes through.
    shared_expert: bool = False
    # Mixtral: while training, the block's input is multiplied by U(1 - eps, 1 + eps) noise (router_jitter_noise).
    router_jitter: bool = False


@dataclass(frozen=True)
class ArchitectureSpec:
    model_type: str
    # Qwen3 normalises q and k per head (q_norm / k_norm) before RoPE.
    qk_norm: bool
    # The sliding window an attention module uses, or None for full attention.
    sliding_window: Callable[[object], int | None]
    # The sparse mixture-of-experts block, for MoE models (None: every layer has a dense SwiGLU MLP).
    moe: MoESpec | None = None
    # Phi-3: q, k and v are one linear layer `qkv_proj`, gate and up one `gate_up_proj` (each with one LoRA).
    fused_projections: bool = False

    @property
    def linear_layers(self) -> tuple[str, ...]:
        """The names of a decoder layer's linear layers (fastft's default LoRA targets)."""
        if self.fused_projections:
            return ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
        return ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _no_window(attention) -> None:
    return None


def _module_window(attention) -> int | None:
    # Qwen2/Qwen3 set `sliding_window` per layer (only when `use_sliding_window` and the layer type say so).
    return getattr(attention, "sliding_window", None)


def _config_window(attention) -> int | None:
    # Mistral passes config.sliding_window to every layer.
    return getattr(attention.config, "sliding_window", None)


SPECS = {
    "llama": ArchitectureSpec("llama", qk_norm=False, sliding_window=_no_window),
    "mistral": ArchitectureSpec("mistral", qk_norm=False, sliding_window=_config_window),
    "qwen2": ArchitectureSpec("qwen2", qk_norm=False, sliding_window=_module_window),
    "qwen3": ArchitectureSpec("qwen3", qk_norm=True, sliding_window=_module_window),
    "qwen3_moe": ArchitectureSpec("qwen3_moe", qk_norm=True, sliding_window=_module_window, moe=MoESpec()),
    "qwen2_moe": ArchitectureSpec("qwen2_moe", qk_norm=False, sliding_window=_module_window,
                                  moe=MoESpec(shared_expert=True)),
    "mixtral": ArchitectureSpec("mixtral", qk_norm=False, sliding_window=_config_window,
                                moe=MoESpec(router_jitter=True)),
    # Phi-3 passes config.sliding_window to every layer, as Mistral does
    "phi3": ArchitectureSpec("phi3", qk_norm=False, sliding_window=_config_window, fused_projections=True),
}


class UnsupportedModelError(ValueError):
    pass


def spec_for(config) -> ArchitectureSpec:
    """The spec of ``config``'s architecture; a clear error for anything fastft does not patch."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SPECS:
        raise UnsupportedModelError(
            f"fastft does not support model_type={model_type!r}; supported: {', '.join(sorted(SPECS))} "
            "(Llama 2/3/3.1, Mistral, Qwen1.5/Qwen2/Qwen2.5, Qwen3, Phi-3/3.5/4; mixture-of-experts: Qwen3-MoE, "
            "Qwen2-MoE / Qwen1.5-MoE, Mixtral)"
        )
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"fastft's MLP kernel is SwiGLU (hidden_act='silu'); "
                                    f"this config has hidden_act={act!r}")
    if getattr(config, "mlp_bias", False):
        raise UnsupportedModelError("fastft's fused MLP has no bias; this config sets mlp_bias=True")
    return SPECS[model_type]
