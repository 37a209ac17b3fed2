"""xformers' ``memory_efficient_attention`` in float64 PyTorch, for CPU tests (xformers has no CPU kernel).

It validates its inputs with xformers' own checks -- shapes, and the layouts its CUTLASS forward (and, when a
gradient is needed, backward) kernels accept on a GPU -- and applies ``attn_bias`` through xformers' own
``materialize``, so a wrong layout or mask in fastft's plumbing fails here as it would on a GPU.
"""
from __future__ import annotations

import torch
from xformers.ops import fmha

LAYOUTS_SEEN: list[int] = []  # query.ndim of every reference call


def reference_memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
    """Same signature and result as ``fmha.memory_efficient_attention``; records ``query.ndim``."""
    inputs = fmha.Inputs(query=query, key=key, value=value, attn_bias=attn_bias, p=p, scale=scale)
    inputs.validate_inputs()
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    for op in [fmha.cutlass.FwOp] + ([fmha.cutlass.BwOp] if needs_grad else []):
        # on CPU the op refuses the device; anything else it would refuse on a GPU too
        reasons = [r for r in op.not_supported_reasons(inputs) if not r.startswith("device=")]
        assert not reasons, f"{op.NAME} would refuse these inputs: {reasons}"
    LAYOUTS_SEEN.append(query.ndim)
    # [B, M, G, H, K] (GQA, K/V broadcast over H) -> [B, M, G*H, K]
    q, k, v = (t.flatten(2, 3) if t.ndim == 5 else t for t in (query, key, value))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bmhk,bnhk->bhmn", q.double(), k.double()) * scale
    scores = scores + attn_bias.materialize((q.shape[1], k.shape[1]), dtype=torch.float64)
    out = torch.einsum("bhmn,bnhk->bmhk", scores.softmax(-1), v.double()).to(query.dtype)
    return out.reshape(*query.shape[:-1], value.shape[-1])


def use_reference_op(monkeypatch) -> list[int]:
    """Replace xformers' op by the reference and declare fastft's xformers route able to run (on CPU it cannot);
    returns the (cleared) list of the layouts the reference is called with."""
    import fastft.xformers_attention

    monkeypatch.setattr(fmha, "memory_efficient_attention", reference_memory_efficient_attention)
    monkeypatch.setattr(fastft.xformers_attention, "unavailable_reason", lambda device, dtype, head_dim: None)
    LAYOUTS_SEEN.clear()
    return LAYOUTS_SEEN
