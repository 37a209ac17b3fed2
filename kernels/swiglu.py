"""SwiGLU activation of Llama's MLP, ``silu(gate) * up``: Triton forward and backward.

Forward, elementwise in fp32, result rounded once to the input dtype::

    sig = sigmoid(gate)
    out = gate * sig * up                     # silu(gate) * up

Backward recomputes ``sig`` from the saved ``gate`` (no fp32 activation is kept)::

    d_gate = g_out * up * sig * (1 + gate * (1 - sig))     # silu'(x) = sig * (1 + x * (1 - sig))
    d_up   = g_out * silu(gate)

Both passes are memory bound: one program per row and BLOCK columns. Rows may be strided, so the gate and up
halves of a fused ``[T, 2I]`` gate/up projection (Phi-3's ``gate_up_proj``) are read and written in place.

:func:`swiglu_forward_into` and :func:`swiglu_backward_into` are the public launchers of the two kernels on
caller-owned buffers (no autograd), for the fused MLP (``lora_mlp.py``), whose backward needs the activation
``out`` (for the gradient of the down projection's LoRA A) as well as ``d_gate`` and ``d_up``: one pass reads
``g_out``, ``gate`` and ``up`` and writes all three, over the inputs' own storage (for a fused gate/up projection,
its ``[T, 2I]`` output becomes its gradient ``[d_gate | d_up]``).
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
    GATE, UP, OUT,  # pointers to [rows, n_cols] buffers, unit stride along a row
    stride_gate, stride_up, stride_out,  # row strides: a column half of a fused [rows, 2I] projection has 2I
    n_cols,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: rows * stride may pass 2**31
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(GATE + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(OUT + row * stride_out + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    GRAD_OUT, GATE, UP, GRAD_GATE, GRAD_UP, OUT,  # pointers to [rows, n_cols] buffers; OUT only with STORE_OUT
    stride_grad_out, stride_gate, stride_up, stride_grad_gate, stride_grad_up, stride_out,  # row strides
    n_cols,
    BLOCK: tl.constexpr,
    STORE_OUT: tl.constexpr,  # also write the forward's output (recomputed): the fused MLP's backward needs it
):
    # Each element is loaded and stored by the same program, so the outputs may overwrite the inputs.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    grad_out = tl.load(GRAD_OUT + row * stride_grad_out + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)  # recomputed: cheaper than storing it
    silu = gate * sig
    grad_gate = grad_out * up * sig * (1.0 + gate * (1.0 - sig))
    grad_up = grad_out * silu
    tl.store(GRAD_GATE + row * stride_grad_gate + cols, grad_gate.to(GRAD_GATE.dtype.element_ty), mask=mask)
    tl.store(GRAD_UP + row * stride_grad_up + cols, grad_up.to(GRAD_UP.dtype.element_ty), mask=mask)
    if STORE_OUT:
        tl.store(OUT + row * stride_out + cols, (silu * up).to(OUT.dtype.element_ty), mask=mask)


def _as_rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, n]`` with unit stride along a row: a contiguous tensor of any rank (flattened), or a 2-D
    tensor whose rows are strided (a column block of a wider matrix, e.g. the gate half of ``[T, 2I]``)."""
    if t.is_contiguous():
        return t.reshape(-1, t.shape[-1]) if t.dim() > 0 and t.numel() > 0 else t.reshape(1, -1)
    if t.dim() == 2 and t.stride(1) == 1:
        return t
    raise ValueError(f"{name} must be contiguous, or 2-D with unit stride along its last dim (rows may be strided), "
                     f"got shape {tuple(t.shape)} with strides {t.stride()}")


def _check_buffers(**tensors) -> list[torch.Tensor]:
    """The launchers read and write row by row: every buffer of one shape, dtype and device, each contiguous or a
    2-D tensor with strided rows (:func:`_as_rows`). Returns them as ``[rows, n]``."""
    (first, ref), *others = tensors.items()
    for name, t in tensors.items():
        check_tensor(name, t)
    for name, t in others:
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise ValueError(f"{name} is {tuple(t.shape)} {t.dtype} but {first} is {tuple(ref.shape)} {ref.dtype}; "
                             "they must match")
    check_same_device(**tensors)
    return [_as_rows(name, t) for name, t in tensors.items()]


def _grid(rows: torch.Tensor):
    """One program per row and ``BLOCK`` columns; ``BLOCK`` at most the row length rounded up to a power of two."""
    n_rows, n_cols = rows.shape
    block = min(_BLOCK, triton.next_power_of_2(max(n_cols, 1)))
    return (n_rows, triton.cdiv(n_cols, block)), block


def swiglu_forward_into(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = silu(gate) * up`` (fp32 math, one rounding) into the caller's buffer ``out``; all three of one
    shape, dtype and device, each contiguous or 2-D with strided rows, e.g. the two column halves of a fused
    ``[T, 2I]`` gate/up projection (else a ValueError/TypeError). No autograd. Returns ``out``."""
    gate2, up2, out2 = _check_buffers(gate=gate, up=up, out=out)
    if use_triton(gate):
        if gate.numel() > 0:
            grid, block = _grid(gate2)
            _swiglu_fwd_kernel[grid](gate2, up2, out2, gate2.stride(0), up2.stride(0), out2.stride(0),
                                     gate2.shape[1], BLOCK=block, num_warps=_NUM_WARPS)
    else:
        gf = gate.float()
        out.copy_(gf * torch.sigmoid(gf) * up.float())
    return out


def swiglu_backward_into(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, grad_gate: torch.Tensor,
                         grad_up: torch.Tensor, out: torch.Tensor | None = None) -> None:
    """``grad_gate``, ``grad_up`` (and, given ``out``, the recomputed ``silu(gate) * up``) in one pass.

    Every output may be the storage of an input (``grad_gate=gate``, ``grad_up=up``, ``out=grad_out``):
    each element is read before it is written. All of one shape, dtype and device, each contiguous or 2-D with
    strided rows (else a ValueError/TypeError). No autograd."""
    buffers = dict(grad_out=grad_out, gate=gate, up=up, grad_gate=grad_gate, grad_up=grad_up)
    rows = _check_buffers(**buffers, **({} if out is None else dict(out=out)))
    if use_triton(gate):
        if gate.numel() > 0:
            out2 = rows[5] if out is not None else rows[3]
            grid, block = _grid(rows[1])
            _swiglu_bwd_kernel[grid](*rows[:5], out2, *(t.stride(0) for t in rows[:5]), out2.stride(0),
                                     rows[1].shape[1], BLOCK=block, STORE_OUT=out is not None, num_warps=_NUM_WARPS)
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
    if not use_triton(gate):
        return _swiglu_torch(gate, up)
    return _SwiGLUFunction.apply(gate, up)
