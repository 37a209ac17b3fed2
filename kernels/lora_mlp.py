"""Llama's MLP, ``down(swiglu(gate(x), up(x)))``, with frozen (NF4 or 16/32-bit) weights and LoRA on
all three projections, as one autograd Function.

Forward (each ``proj(z) = z @ W.T (+ bias) + s * (z @ A.T) @ B.T``, see ``lora_linear.py``)::

    g = gate(x)                 # [T, I]   kept
    u = up(x)                   # [T, I]   kept
    h = silu(g) * u             # [T, I]   fp32 math, rounded once; NOT kept (recomputed)
    y = down(h)                 # [T, H]

Backward (``dy`` [T, H]; ``sig = sigmoid(g)``)::

    h      = silu(g) * u                        # recomputed into a [T, I] buffer
    dA_d   = s_d * (dy @ B_d).T @ h             # needs h ...
    dB_d   = s_d * dy.T @ (h @ A_d.T)
    dh     = dy @ W_d + s_d * (dy @ B_d) @ A_d  # ... then dh overwrites h in the same buffer
    dg     = dh * u * sig * (1 + g * (1 - sig)) # written over g   (SwiGLU backward, in place)
    du     = dh * g * sig                       # written over u
    dx     = dg @ W_g + s_g * (dg @ B_g) @ A_g + du @ W_u + s_u * (du @ B_u) @ A_u   # one buffer
    dA_p   = s_p * (dp @ B_p).T @ x,   dB_p = s_p * dp.T @ (x @ A_p.T)      for p in (gate, up)

Kept between forward and backward: ``x``, ``g``, ``u`` and the small LoRA products ``x @ A_g.T``,
``x @ A_u.T``, ``h @ A_d.T`` ([T, r] each). Recomputed: ``h`` (one elementwise pass, cheaper than
keeping a third [T, I] tensor) and every dequantized weight (the NF4 weights go through the shared
workspace buffer of ``lora_linear.py`` right before each matmul; none is kept). Recomputing ``g``
and ``u`` instead of keeping them would cost two large matmuls: not done. The backward peaks at one
extra [T, I] buffer (h, then dh); ``dg``/``du`` reuse the storage of ``g``/``u``, so a graph's
backward can run only once (a second one raises a RuntimeError).

The SwiGLU steps use the Triton kernels of ``swiglu.py`` (forward into a given buffer, backward in
place); the PyTorch engine runs the same math in fp32. Dtype rules as in ``lora_linear.py``.
"""
from __future__ import annotations

import torch
import triton

from ._common import check_tensor, empty, use_triton
from .lora_linear import _autocast_off, _bias_grad, _check_projection, _prepare, _project_backward, _project_forward
from .swiglu import _BLOCK as _SWIGLU_BLOCK
from .swiglu import _NUM_WARPS as _SWIGLU_NUM_WARPS
from .swiglu import _swiglu_bwd_kernel, _swiglu_fwd_kernel

_N = 6  # Function arguments per projection: weight, bias, A, B, scaling, compute_dtype


def _swiglu_forward_into(g: torch.Tensor, u: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = silu(g) * u`` (fp32 math, one rounding); all contiguous, same shape and dtype."""
    n = g.numel()
    if use_triton(g):
        if n > 0:
            _swiglu_fwd_kernel[(triton.cdiv(n, _SWIGLU_BLOCK),)](g, u, out, n, BLOCK=_SWIGLU_BLOCK,
                                                                 num_warps=_SWIGLU_NUM_WARPS)
    else:
        gf = g.float()
        out.copy_(gf * torch.sigmoid(gf) * u.float())
    return out


def _swiglu_backward_inplace(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> None:
    """``g <- dh * u * sig * (1 + g * (1 - sig))`` and ``u <- dh * g * sig`` with ``sig = sigmoid(g)``.
    In place is safe in the kernel: each element is loaded and stored by the same program."""
    n = g.numel()
    if use_triton(g):
        if n > 0:
            _swiglu_bwd_kernel[(triton.cdiv(n, _SWIGLU_BLOCK),)](dh, g, u, g, u, n, BLOCK=_SWIGLU_BLOCK,
                                                                 num_warps=_SWIGLU_NUM_WARPS)
    else:
        gf, uf, dhf = g.float(), u.float(), dh.float()
        sig = torch.sigmoid(gf)
        dg = dhf * uf * sig * (1 + gf * (1 - sig))
        du = dhf * gf * sig
        g.copy_(dg)
        u.copy_(du)


class _LoraMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, *flat):
        gate, up, down = (flat[i:i + _N] for i in range(0, 3 * _N, _N))
        g, xa_g = _project_forward(x2, *gate)
        u, xa_u = _project_forward(x2, *up)
        h = _swiglu_forward_into(g, u, empty(g.shape, dtype=g.dtype, device=g.device))
        y, ha_d = _project_forward(h, *down)
        del h  # recomputed in the backward
        ctx.save_for_backward(x2, g, u, gate[2], gate[3], xa_g, up[2], up[3], xa_u, down[2], down[3], ha_d)
        ctx.weights = (gate[0], up[0], down[0])  # frozen weights: references only
        ctx.scalings = (gate[4], up[4], down[4])
        ctx.compute_dtypes = (gate[5], up[5], down[5])
        ctx.bias_dtypes = tuple(None if p[1] is None else p[1].dtype for p in (gate, up, down))
        return y

    @staticmethod
    def backward(ctx, dy):
        if getattr(ctx, "consumed", False):
            raise RuntimeError("lora_mlp's backward overwrites its saved gate/up activations with their gradients: "
                               "it runs once per forward (backward with retain_graph=True twice is not supported)")
        ctx.consumed = True
        x2, g, u, A_g, B_g, xa_g, A_u, B_u, xa_u, A_d, B_d, ha_d = ctx.saved_tensors
        need = ctx.needs_input_grad  # x2, then (weight, bias, A, B, s, compute_dtype) for gate, up, down
        W_g, W_u, W_d = ctx.weights
        s_g, s_u, s_d = ctx.scalings
        cd_g, cd_u, cd_d = ctx.compute_dtypes
        grads = [None] * (3 * _N)
        with _autocast_off(dy.device.type):
            # down: h is needed only for dA_d; dh then overwrites it in the same buffer
            buf = empty(g.shape, dtype=g.dtype, device=g.device)
            d = 1 + 2 * _N  # index in needs_input_grad of down's weight
            need_dA_d = A_d is not None and need[d + 2]
            if need_dA_d:
                _swiglu_forward_into(g, u, buf)
            dh, dA_d, dB_d = _project_backward(dy, buf, W_d, A_d, B_d, s_d, ha_d, cd_d,
                                               need_dx=True, need_dA=need_dA_d, need_dB=need[d + 3], dx_out=buf)
            grads[d: d + 3] = [_bias_grad(dy, ctx.bias_dtypes[2]) if need[d + 1] else None, dA_d, dB_d]
            # SwiGLU backward, in place: g <- dg, u <- du
            _swiglu_backward_inplace(dh, g, u)
            dg, du = g, u
            del dh, buf
            # gate and up: one dx buffer
            dx = None
            for i, (dp, W, A, B, s, xa, cd) in enumerate(((dg, W_g, A_g, B_g, s_g, xa_g, cd_g),
                                                           (du, W_u, A_u, B_u, s_u, xa_u, cd_u))):
                base = 1 + _N * i
                dx, dA, dB = _project_backward(dp, x2, W, A, B, s, xa, cd, need_dx=need[0],
                                               need_dA=need[base + 2], need_dB=need[base + 3], dx=dx)
                grads[base: base + 3] = [_bias_grad(dp, ctx.bias_dtypes[i]) if need[base + 1] else None, dA, dB]
        return (dx, *grads)


def lora_mlp(x: torch.Tensor, gate, up, down) -> torch.Tensor:
    """Llama/Qwen2 MLP with LoRA: ``down(silu(gate(x)) * up(x))`` in one autograd node.

    Args:
        x: ``[..., H]`` fp32/fp16/bf16 hidden states (the base matmuls run in this dtype).
        gate, up: ``(weight, bias, A, B, scaling[, compute_dtype])`` tuples as the arguments of
            ``lora_linear`` (e.g. ``fastft.quant.fused_linear_args(module)``), weights
            ``(I, H)`` (NF4Weight or frozen tensor), A ``[r, H]``, B ``[I, r]`` (or both None).
        down: the same with weight ``(H, I)``, A ``[r, I]``, B ``[H, r]``.

    Returns:
        ``[..., H]`` in ``x.dtype`` (autocast: see ``lora_linear.py``; g, u, h stay in ``x.dtype``).

    Backward: see the module docstring. ``h = silu(g) * u`` is recomputed, ``g``/``u`` are kept and
    overwritten by their gradients, each NF4 weight is re-dequantized into the shared buffer.
    """
    check_tensor("x", x, min_ndim=1)
    gate = _check_projection("gate", x.shape[-1], gate, x.device)
    up = _check_projection("up", x.shape[-1], up, x.device)
    intermediate = gate[0].shape[0]
    if up[0].shape[0] != intermediate:
        raise ValueError(f"up weight has {up[0].shape[0]} output features but gate has {intermediate}")
    down = _check_projection("down", intermediate, down, x.device)
    if down[0].shape[0] != x.shape[-1]:
        raise ValueError(f"down weight has shape {tuple(down[0].shape)}; expected ({x.shape[-1]}, {intermediate})")
    x, (gate, up, down), out_dtypes = _prepare(x, [gate, up, down])
    lead_shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    with _autocast_off(x.device.type):
        y = _LoraMLPFunction.apply(x2, *gate, *up, *down)
    return y.reshape(*lead_shape, y.shape[-1]).to(out_dtypes[2])
