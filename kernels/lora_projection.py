"""One frozen (NF4 or 16/32-bit) projection plus a LoRA adapter, forward and backward: the helpers that
``lora_linear.py``, ``lora_qkv.py`` and ``lora_mlp.py`` share (argument checks, dtype rules, dropout masks,
the dequantization workspace). No autograd Function here; each op file wraps these in its own.

    y = x @ W.T (+ bias) + s * (x @ A.T) @ B.T          x [T, in], W [out, in], A [r, in], B [out, r]

Backward (``dy`` [T, out]; W is frozen and gets no gradient)::

    dyB = dy @ B                      # [T, r], shared by dx and dA
    dx  = dy @ W + s * dyB @ A        # [T, in]; the LoRA term is accumulated with addmm_
    dA  = s * dyB.T @ x               # [r, in]
    dB  = s * dy.T @ (x @ A.T)        # [out, r]; x @ A.T is the small [T, r] kept from the forward
    dbias = dy.sum(0)                 # only when the bias requires grad (Qwen2's frozen q/k/v bias does not)

Dequantize-then-cuBLAS: an NF4 ``W`` is dequantized by the Triton kernel of ``nf4.py`` into one 16-bit
workspace buffer shared by every layer (per device and dtype, grown to the largest weight that uses it),
used by one matmul and overwritten by the next; the backward dequantizes again instead of keeping a copy.
The LoRA product ``x @ A.T`` is computed once in the forward, reused for ``B`` and kept for ``dB``.

**LoRA dropout** (peft's ``lora_dropout``, while training): the LoRA branch sees ``dropout(x) = M * x``,
the base matmul ``x``. Then ``x @ A.T`` above becomes ``(M * x) @ A.T``, ``dA = s * dyB.T @ (M * x)`` and
the LoRA term of ``dx`` is ``s * M * (dyB @ A)``: three Triton kernels of ``lora_dropout.py`` that draw
``M`` from a seed tile by tile (the seed is drawn in the forward, kept on the autograd context, and
drawn again identically when gradient checkpointing recomputes the forward). Neither ``M`` nor ``M * x``
is ever stored. Without dropout none of this runs (no extra launch).

Dtypes follow peft 0.21's ``lora.Linear4bit`` (over bitsandbytes' ``Linear4bit``) and ``lora.Linear``:

* the base matmul runs in ``compute_dtype`` (bitsandbytes' ``bnb_4bit_compute_dtype``; default
  ``x.dtype``): ``x`` is cast to it, W is dequantized straight into it (as ``matmul_4bit`` does),
  and the result is cast back to ``x.dtype``;
* the LoRA branch runs in ``A.dtype`` on ``x`` cast to it, and its result is cast to ``x.dtype``
  before the add, as peft does (fp32 adapters on a bf16 model stay fp32);
* in the usual case, all three dtypes equal, nothing is cast and the LoRA term is accumulated into
  the base output (``addmm_``);
* under ``torch.autocast`` the matmuls run in the autocast dtype (A and B are cast, differentiably);
  an NF4 layer returns ``x.dtype`` (bitsandbytes casts back), a plain one the autocast dtype.

Engines: each fused op (``lora_linear``, ``lora_qkv``, ``lora_mlp``) runs the kernels it calls (NF4
dequantization, LoRA dropout, SwiGLU) on their PyTorch engines when the op is disabled by name
(``_common.composite_op``), and its backward on the engines its forward ran (``_common.disabled_scope``).

A projection is passed around as the tuple ``(weight, bias, A, B, scaling, compute_dtype, dropout)`` that
:func:`check_projection` validates and :func:`prepare_projections` resolves.
"""
from __future__ import annotations

import contextlib
import numbers

import torch

from ._common import FLOAT_DTYPES, autocast_dtype, check_tensor, empty
from .lora_dropout import DropoutMask, dropout_lora_a, dropout_lora_grad_a, dropout_lora_grad_x_
from .nf4 import NF4Weight, dequantize_nf4

# ---------------------------------------------------------------------------------------------
# The shared dequantization buffer


_workspaces: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def dequant_workspace(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous ``shape`` view of one flat buffer per (device, dtype), grown to the largest
    weight seen. Valid until the next call: the fused layers use it for exactly one matmul
    (ordered on one CUDA stream), so one buffer serves every layer of the model."""
    key = (device, dtype)
    numel = shape[0] * shape[1]
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < numel:
        _workspaces.pop(key, None)  # free the old one before allocating the larger one
        buf = _workspaces[key] = empty((numel,), dtype=dtype, device=device)
    return buf[:numel].view(shape)


def release_dequant_workspace() -> None:
    """Free the shared dequantization buffers (they are re-allocated on the next fused call)."""
    _workspaces.clear()


def dequant_workspaces() -> list[torch.Tensor]:
    """The shared dequantization buffers alive now (one per device and dtype), e.g. to account their memory."""
    return list(_workspaces.values())


def dense_weight(weight, dtype: torch.dtype) -> torch.Tensor:
    """The frozen weight as a dense ``[out, in]`` matrix in ``dtype`` (NF4: in the shared buffer)."""
    if isinstance(weight, NF4Weight):
        return dequantize_nf4(weight, out=dequant_workspace(weight.shape, dtype, weight.device))
    return weight if weight.dtype == dtype else weight.to(dtype)


# ---------------------------------------------------------------------------------------------
# Argument checks and dtype resolution


def check_projection(name: str, in_features: int, params, device) -> tuple:
    """Validate one ``(weight, bias, A, B, scaling[, compute_dtype[, dropout]])`` tuple; return it as a
    7-tuple with scaling a float, compute_dtype a dtype or None and dropout a float."""
    if not isinstance(params, (tuple, list)) or len(params) not in (5, 6, 7):
        raise TypeError(f"{name} must be a (weight, bias, A, B, scaling[, compute_dtype[, dropout]]) tuple, got "
                        f"{type(params).__name__}"
                        + (f" of length {len(params)}" if isinstance(params, (tuple, list)) else ""))
    weight, bias, A, B, scaling = params[:5]
    compute_dtype = params[5] if len(params) >= 6 else None
    dropout = params[6] if len(params) == 7 else 0.0
    if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} compute_dtype must be float32, float16 or bfloat16, got {compute_dtype}")
    if isinstance(weight, NF4Weight):
        out_features, w_in = weight.shape
        w_device = weight.device
    else:
        check_tensor(f"{name} weight", weight, ndim=2)
        if weight.requires_grad:
            raise ValueError(f"{name} weight requires grad; the fused LoRA path keeps the base weight frozen")
        out_features, w_in = weight.shape
        w_device = weight.device
    if w_in != in_features:
        raise ValueError(f"{name} weight has shape {(out_features, w_in)}; x has {in_features} features")
    if w_device != device:
        raise ValueError(f"{name} weight is on {w_device} but x is on {device}")
    if bias is not None:
        check_tensor(f"{name} bias", bias, ndim=1)
        if bias.shape[0] != out_features:
            raise ValueError(f"{name} bias has shape {tuple(bias.shape)}; expected ({out_features},)")
    if (A is None) != (B is None):
        raise ValueError(f"{name}: A and B must both be tensors or both be None (no active adapter)")
    if A is not None:
        check_tensor(f"{name} A", A, ndim=2)
        check_tensor(f"{name} B", B, ndim=2)
        r = A.shape[0]
        if A.shape[1] != in_features:
            raise ValueError(f"{name} A has shape {tuple(A.shape)}; expected [r, {in_features}]")
        if tuple(B.shape) != (out_features, r):
            raise ValueError(f"{name} B has shape {tuple(B.shape)}; expected [{out_features}, {r}] (A has r={r})")
        if B.dtype != A.dtype:
            raise TypeError(f"{name} B has dtype {B.dtype} but A has {A.dtype}; they must match")
        if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
            raise TypeError(f"{name} scaling must be a real number, got {type(scaling).__name__}")
    for label, t in ((f"{name} bias", bias), (f"{name} A", A), (f"{name} B", B)):
        if t is not None and t.device != device:
            raise ValueError(f"{label} is on {t.device} but x is on {device}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ValueError(f"{name} dropout must be a probability in [0, 1), got {dropout!r}")
    return weight, bias, A, B, float(scaling) if A is not None else 1.0, compute_dtype, float(dropout)


def prepare_projections(x: torch.Tensor, projections):
    """Resolve dtypes (see the module doc) for checked projections on input ``x``.

    Returns ``(x, projections, out_dtypes)``: ``x`` in the dtype the Function takes, each
    projection as ``(weight, bias, A, B, s, compute_dtype, dropout)`` with a concrete compute dtype,
    and the dtype each output must finally be cast to."""
    ac = autocast_dtype(x.device.type)
    if ac is None:
        prepared = [(w, b, A, B, s, cd or x.dtype, p) for w, b, A, B, s, cd, p in projections]
        return x, prepared, [x.dtype] * len(projections)
    if all(not isinstance(p[0], NF4Weight) for p in projections):
        x = x.to(ac)  # a plain nn.Linear under autocast: everything, output included, in ac
    prepared, out_dtypes = [], []
    for w, b, A, B, s, _, p in projections:
        if A is not None:
            A, B = A.to(ac), B.to(ac)
        prepared.append((w, b, A, B, s, ac, p))
        out_dtypes.append(x.dtype if isinstance(w, NF4Weight) else ac)
    return x, prepared, out_dtypes


@contextlib.contextmanager
def autocast_off(device_type: str):
    """Our matmuls pick their dtypes explicitly: keep autocast from re-casting them."""
    if autocast_dtype(device_type) is not None:
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield


# ---------------------------------------------------------------------------------------------
# One projection, forward and backward


def draw_masks(device: torch.device, projections, op: str) -> list:
    """One :class:`DropoutMask` with a fresh seed per projection that has an adapter and dropout > 0 (in
    projection order), None for the others; ``op``: the fused op drawing them. Called inside the forward, so a
    checkpointed recompute, with the generators restored, draws the same seeds."""
    return [DropoutMask.draw(p[6], device, op) if p[2] is not None and p[6] > 0 else None for p in projections]


def project_forward(x2: torch.Tensor, weight, bias, A, B, s: float, compute_dtype: torch.dtype, mask=None):
    """``y = x2 @ W.T + bias + s * (x2 @ A.T) @ B.T`` returned in ``x2.dtype``, with the dtype rules
    of the module doc; returns ``(y, xa)``, ``xa = x2 @ A.T`` ([T, r], A's dtype) kept for dB.
    With a dropout ``mask`` (``lora_dropout.py``) the LoRA branch sees ``M * x2``: ``xa = (M * x2) @ A.T``."""
    dtype, cd = x2.dtype, compute_dtype
    xc = x2 if cd == dtype else x2.to(cd)
    W = dense_weight(weight, cd)
    if bias is not None:
        y = torch.addmm(bias.to(cd), xc, W.t())
    else:
        y = torch.mm(xc, W.t())
    if cd != dtype:
        y = y.to(dtype)  # bitsandbytes casts the base result back to the input dtype
    if A is None:
        return y, None
    fused = A.dtype == cd == dtype
    if mask is not None:
        xa = dropout_lora_a(x2, A, mask)  # the mask is drawn inside the kernel, never stored
    elif fused:
        xa = torch.mm(x2, A.t())
    else:
        xa = torch.mm(x2.to(A.dtype), A.t())
    if fused:
        y.addmm_(xa, B.t(), alpha=s)  # LoRA accumulated into the base output
    else:  # peft: LoRA computed in the adapter's dtype, cast to the result dtype, added
        y.add_(torch.mm(xa, B.t()).mul_(s).to(dtype))
    return y, xa


def project_backward(dy: torch.Tensor, x2: torch.Tensor, weight, A, B, s: float, xa, compute_dtype, *,
                      need_dx: bool, need_dA: bool, need_dB: bool, dx=None, dx_out=None, mask=None):
    """Gradients of :func:`project_forward` for ``dy`` [T, out] (``x2.dtype``).

    ``dx`` is accumulated into ``dx`` when given (``addmm_``), else written into ``dx_out`` when
    given, else allocated. ``dx_out`` may alias ``x2``: ``x2`` is read (for dA) before dx is written.
    ``mask``: the forward's dropout mask, regenerated by the kernels of ``lora_dropout.py`` for dA and
    for the LoRA term of dx. Returns ``(dx, dA, dB)`` (None where not needed).
    """
    dtype, cd = dy.dtype, compute_dtype
    dA = dB = lora_dx = None
    fused = A is not None and A.dtype == cd == dtype
    if A is not None:
        # The LoRA terms of dA and dx are  alpha * dyB.T @ x  and  alpha * dyB @ A.
        if fused:
            dyB, alpha = torch.mm(dy, B), s  # [T, r]
            if need_dB:
                dB = torch.mm(dy.t(), xa).mul_(s)
        else:  # in the adapter's dtype, as autograd through peft's casts computes it
            g = dy.to(A.dtype)
            if need_dB:
                dB = torch.mm(g.t(), xa).mul_(s)
            dyB, alpha = torch.mm(g, B).mul_(s), 1.0
        if need_dA:
            if mask is not None:
                dA = dropout_lora_grad_a(dyB, x2, mask, alpha)
            elif fused:
                dA = torch.mm(dyB.t(), x2).mul_(s)
            else:
                dA = torch.mm(dyB.t(), x2.to(A.dtype))
        if need_dx and not fused and mask is None:
            lora_dx = torch.mm(dyB, A).to(dtype)  # computed before dx_out may overwrite x2
    if not need_dx:
        return dx, dA, dB
    W = dense_weight(weight, cd)
    if cd == dtype:
        if dx is not None:
            dx.addmm_(dy, W)
        elif dx_out is not None:
            dx = torch.mm(dy, W, out=dx_out)
        else:
            dx = torch.mm(dy, W)
    else:  # base matmul in the compute dtype, its gradient cast back
        base_dx = torch.mm(dy.to(cd), W).to(dtype)
        if dx is not None:
            dx.add_(base_dx)
        elif dx_out is not None:
            dx = dx_out.copy_(base_dx)
        else:
            dx = base_dx
    if A is not None:
        if mask is not None:
            dropout_lora_grad_x_(dx, dyB, A, mask, alpha)
        elif fused:
            dx.addmm_(dyB, A, alpha=s)
        else:
            dx.add_(lora_dx)
    return dx, dA, dB


def bias_grad(dy: torch.Tensor, bias_dtype):
    """``dbias = dy.sum(0)`` in the bias dtype (as bitsandbytes' matmul_4bit gives it)."""
    return dy.sum(0, dtype=bias_dtype)
