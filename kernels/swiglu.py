"""SwiGLU activation of Llama's MLP, ``silu(gate) * up``: Triton forward and backward.

Forward, elementwise in fp32, result rounded once to the input dtype::

    sig = sigmoid(gate)
    out = gate * sig * up                     # silu(gate) * up

Backward recomputes ``sig`` from the saved ``gate`` (no fp32 activation is kept)::

    d_gate = g_out * up * sig * (1 + gate * (1 - sig))     # silu'(x) = sig * (1 + x * (1 - sig))
    d_up   = g_out * silu(gate)

Both passes are memory bound: one flat 1-D grid over all elements, BLOCK elements per program.

:func:`swiglu_forward_into` and :func:`swiglu_backward_into` are the public launchers of the two kernels on
caller-owned buffers (no autograd), for the fused MLP (``lora_mlp.py``), whose backward needs the activation
``out`` (for the gradient of the down projection's LoRA A) as well as ``d_gate`` and ``d_up``: one pass reads
``g_out``, ``gate`` and ``up`` and writes all three, over the inputs' own storage.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_same_device, check_tensor, empty, use_triton

_BLOCK = 1024  # 4 warps x 32 threads x 8 elements: 16-byte vector accesses for 16-bit dtypes
_NUM_WARPS = 4


@triton.jit
def _swiglu_fwd_kernel(
    GATE, UP, OUT,  # pointers, flat and contiguous
    n_elements,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: numel may pass 2**31
    mask = offs < n_elements
    gate = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    GRAD_OUT, GATE, UP, GRAD_GATE, GRAD_UP, OUT,  # pointers, flat and contiguous; OUT only with STORE_OUT
    n_elements,
    BLOCK: tl.constexpr,
    STORE_OUT: tl.constexpr,  # also write the forward's output (recomputed): the fused MLP's backward needs it
):
    # Each element is loaded and stored by the same program, so the outputs may overwrite the inputs.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    grad_out = tl.load(GRAD_OUT + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)  # recomputed: cheaper than storing it
    silu = gate * sig
    grad_gate = grad_out * up * sig * (1.0 + gate * (1.0 - sig))
    grad_up = grad_out * silu
    tl.store(GRAD_GATE + offs, grad_gate.to(GRAD_GATE.dtype.element_ty), mask=mask)
    tl.store(GRAD_UP + offs, grad_up.to(GRAD_UP.dtype.element_ty), mask=mask)
    if STORE_OUT:
        tl.store(OUT + offs, (silu * up).to(OUT.dtype.element_ty), mask=mask)


def _check_buffers(**tensors) -> None:
    """The launchers read and write flat: every buffer a contiguous tensor of one shape, dtype and device."""
    (first, ref), *others = tensors.items()
    for name, t in tensors.items():
        check_tensor(name, t)
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    for name, t in others:
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise ValueError(f"{name} is {tuple(t.shape)} {t.dtype} but {first} is {tuple(ref.shape)} {ref.dtype}; "
                             "they must match")
    check_same_device(**tensors)


def swiglu_forward_into(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = silu(gate) * up`` (fp32 math, one rounding) into the caller's buffer ``out``; all three
    contiguous, of one shape, dtype and device (else a ValueError/TypeError). No autograd. Returns ``out``."""
    _check_buffers(gate=gate, up=up, out=out)
    n = gate.numel()
    if use_triton(gate, "swiglu"):
        if n > 0:
            _swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    else:
        gf = gate.float()
        out.copy_(gf * torch.sigmoid(gf) * up.float())
    return out


def swiglu_backward_into(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, grad_gate: torch.Tensor,
                         grad_up: torch.Tensor, out: torch.Tensor | None = None) -> None:
    """``grad_gate``, ``grad_up`` (and, given ``out``, the recomputed ``silu(gate) * up``) in one pass.

    Every output may be the storage of an input (``grad_gate=gate``, ``grad_up=up``, ``out=grad_out``):
    each element is read before it is written. All contiguous, of one shape, dtype and device (else a
    ValueError/TypeError). No autograd."""
    buffers = dict(grad_out=grad_out, gate=gate, up=up, grad_gate=grad_gate, grad_up=grad_up)
    _check_buffers(**buffers, **({} if out is None else dict(out=out)))
    n = gate.numel()
    if use_triton(gate, "swiglu"):
        if n > 0:
            _swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](
                grad_out, gate, up, grad_gate, grad_up, out if out is not None else grad_gate, n,
                BLOCK=_BLOCK, STORE_OUT=out is not None, num_warps=_NUM_WARPS,
            )
        return
    gf, uf, df = gate.float(), up.float(), grad_out.float()
    sig = torch.sigmoid(gf)
    silu = gf * sig
    d_gate, d_up = df * uf * sig * (1 + gf * (1 - sig)), df * silu
    if out is not None:
        out.copy_(silu * uf)
    grad_gate.copy_(d_gate)
    grad_up.copy_(d_up)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor):
        gate, up = gate.contiguous(), up.contiguous()  # no-ops for the usual contiguous inputs
        out = swiglu_forward_into(gate, up, empty(gate.shape, dtype=gate.dtype, device=gate.device))
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = empty(gate.shape, dtype=gate.dtype, device=gate.device)
        grad_up = empty(up.shape, dtype=up.dtype, device=up.device)
        swiglu_backward_into(grad_out.contiguous(), gate, up, grad_gate, grad_up)
        return grad_gate, grad_up


def _swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: ``silu(gate) * up``, computed in fp32 and rounded once to the input dtype.

    Args:
        gate: ``[...]`` fp32/fp16/bf16, any shape (read contiguously; a non-contiguous input is
            copied once).
        up: same shape, dtype and device as ``gate``.

    Returns:
        ``[...]`` like ``gate``: ``gate * sigmoid(gate) * up``.

    Forward: ``out = gate * sigmoid(gate) * up`` (fp32 math). Only ``gate`` and ``up`` are saved.

    Backward, with ``sig = sigmoid(gate)`` recomputed:
    ``d_gate = g_out * up * sig * (1 + gate * (1 - sig))`` and ``d_up = g_out * gate * sig``.
    """
    check_tensor("gate", gate)
    check_tensor("up", up)
    check_same_device(gate=gate, up=up)
    if up.dtype != gate.dtype:
        raise TypeError(f"up has dtype {up.dtype} but gate has dtype {gate.dtype}; they must match")
    if up.shape != gate.shape:
        raise ValueError(f"up has shape {tuple(up.shape)} but gate has shape {tuple(gate.shape)}; they must match")
    if not use_triton(gate, "swiglu"):
        return _swiglu_torch(gate, up)
    return _SwiGLUFunction.apply(gate, up)
