"""RMSNorm with Llama's casting rules (or Gemma's): Triton forward and hand-written Triton backward.

Forward, per row ``x`` of length ``H`` (exactly Hugging Face's ``LlamaRMSNorm``)::

    h    = float32(x)
    rstd = 1 / sqrt(mean(h^2) + eps)                  # saved per row, fp32
    xhat = h * rstd
    y    = weight * cast(xhat, x.dtype)               # the cast comes BEFORE the weight
                                                      # y.dtype = promote(weight.dtype, x.dtype)

Backward (the cast is treated as the identity, as autograd does)::

    g     = dy * weight                                # fp32
    dx    = rstd * (g - xhat * mean(g * xhat))         # per row
    dw    = sum over rows of dy * cast(xhat, x.dtype)  # fp32 partial sums per program, then one sum

Gemma (``unit_offset=True``): the stored weight is an offset from 1, and the cast comes AFTER it::

    y  = cast(xhat * (1 + float32(weight)), x.dtype)  # y.dtype = x.dtype (Gemma2/3's RMSNorm)
    g  = dy * (1 + weight);   dx as above;   dw = sum over rows of dy * xhat (xhat in fp32, not rounded)

``dw`` is reduced without atomics: each backward program owns a contiguous range of rows and
writes one fp32 partial row; PyTorch sums the ``[programs, H]`` partials and casts to the weight's
dtype. When ``weight`` does not require grad (frozen norms under LoRA) the partials are skipped.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_same_device, check_tensor, empty, gpu_device, multiprocessor_count, use_triton

# One row lives in registers; past 64 KB per row the single-block design stops making sense
# (same limit as Triton's layer-norm tutorial).
_MAX_FUSED_BYTES = 65536


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD,  # pointers: input rows, weight [H], output rows, rstd [rows] (fp32)
    stride_x_row, stride_y_row,  # row strides (columns are contiguous)
    n_cols, eps,
    BLOCK_H: tl.constexpr,
    UNIT_OFFSET: tl.constexpr,  # Gemma: y = cast(xhat * (1 + w)) instead of Llama's w * cast(xhat)
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2**31 on big batches
    cols = tl.arange(0, BLOCK_H)
    mask = cols < n_cols

    x = tl.load(X + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)

    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        # Gemma scales in fp32 and rounds once, to x's dtype
        y = (x * rstd) * (1.0 + w)
    else:
        # Llama rounds the normalized value to x's dtype before applying the weight; the product is
        # then taken in fp32 and rounded once to the promoted output dtype, as PyTorch does.
        y = w * (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y_row + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL,  # pointers; DW_PARTIAL is fp32 [programs, H]
    stride_dy_row, stride_x_row, stride_dx_row,
    n_rows, n_cols, rows_per_program,
    BLOCK_H: tl.constexpr,
    COMPUTE_DW: tl.constexpr,  # False for a frozen weight: skip the partial sums
    UNIT_OFFSET: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < n_cols

    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        w = tl.where(mask, 1.0 + w, 0.0)  # the factor the forward applied
    dw_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        g = dy * w
        # d(x * rstd)/dx = rstd * (I - xhat xhat^T / H); masked columns are 0 in both terms
        dx = (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols)) * rstd
        tl.store(DX + row * stride_dx_row + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            if UNIT_OFFSET:
                dw_acc += dy * xhat
            else:
                # the forward multiplied the weight by the rounded xhat: use the same value here
                dw_acc += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=mask)


def _launch_params(n_cols: int, element_size: int):
    block_h = triton.next_power_of_2(n_cols)
    if block_h * element_size > _MAX_FUSED_BYTES:
        raise ValueError(f"rms_norm supports rows up to {_MAX_FUSED_BYTES} bytes; got H={n_cols}")
    num_warps = min(max(block_h // 256, 1), 8)
    return block_h, num_warps


def _num_backward_programs(n_rows: int, device: torch.device) -> int:
    # Enough programs to fill the GPU; few enough that the [programs, H] partials stay small.
    if gpu_device(device):
        slots = 4 * multiprocessor_count(device)
    else:
        slots = 4  # the interpreter runs programs one after another
    return max(1, min(n_rows, slots))


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool):
        shape = x.shape
        n_cols = shape[-1]
        x2 = x.reshape(-1, n_cols)  # a view whenever the leading dims allow it
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        n_rows = x2.shape[0]
        out_dtype = x.dtype if unit_offset else torch.promote_types(weight.dtype, x.dtype)
        # allocated in x's shape and returned as is: a view output would forbid in-place ops on it
        y = empty(shape, dtype=out_dtype, device=x.device)
        y2 = y.view(n_rows, n_cols)
        rstd = empty((n_rows,), dtype=torch.float32, device=x.device)
        block_h, num_warps = _launch_params(n_cols, max(x.element_size(), out_dtype.itemsize))
        if n_rows > 0:
            _rms_norm_fwd_kernel[(n_rows,)](
                x2, weight, y2, rstd,
                x2.stride(0), y2.stride(0),
                n_cols, eps,
                BLOCK_H=block_h, UNIT_OFFSET=unit_offset, num_warps=num_warps,
            )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        ctx.block_h, ctx.num_warps, ctx.unit_offset = block_h, num_warps, unit_offset
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        compute_dw = ctx.needs_input_grad[1]
        dy2 = dy.reshape(-1, n_cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = empty(ctx.shape, dtype=x2.dtype, device=x2.device)
        dx2 = dx.view(n_rows, n_cols)
        programs = _num_backward_programs(n_rows, x2.device)
        rows_per_program = triton.cdiv(n_rows, programs) if n_rows > 0 else 1
        programs = triton.cdiv(n_rows, rows_per_program)  # no program without rows
        dw_partial = (
            empty((max(programs, 1), n_cols), dtype=torch.float32, device=x2.device) if compute_dw else None
        )
        if n_rows > 0:
            _rms_norm_bwd_kernel[(programs,)](
                dy2, x2, weight, rstd, dx2, dw_partial if compute_dw else dx2,  # dummy pointer when unused
                dy2.stride(0), x2.stride(0), dx2.stride(0),
                n_rows, n_cols, rows_per_program,
                BLOCK_H=ctx.block_h, COMPUTE_DW=compute_dw, UNIT_OFFSET=ctx.unit_offset, num_warps=ctx.num_warps,
            )
        dw = None
        if compute_dw:
            dw = dw_partial.sum(0).to(weight.dtype) if n_rows > 0 else torch.zeros_like(weight)
        return dx, dw, None, None


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (h * (1.0 + weight.float())).to(x.dtype)
    return weight * h.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, unit_offset: bool = False) -> torch.Tensor:
    """Llama RMSNorm: ``weight * cast(x * rsqrt(mean(x^2, -1) + eps), x.dtype)``, the norm in fp32; with
    ``unit_offset=True`` Gemma's: ``cast(x * rsqrt(mean(x^2, -1) + eps) * (1 + weight), x.dtype)``, all in fp32.

    Args:
        x: ``[..., H]`` fp32/fp16/bf16, any leading shape. The last dim should be contiguous
            (otherwise it is copied once); leading dims are read through their row stride when
            they flatten to one, else copied.
        weight: ``[H]`` fp32/fp16/bf16, same device. May be frozen (``requires_grad=False``):
            then no ``dweight`` work is done.
        eps: added to the mean square before the reciprocal square root.
        unit_offset: Gemma 2/3's norm (the weight is stored as an offset from 1; the cast comes last).

    Returns:
        ``[..., H]`` of dtype ``promote(weight.dtype, x.dtype)`` (fp32 weight + bf16 x -> fp32),
        equal to Hugging Face's ``LlamaRMSNorm`` output; with ``unit_offset``, of x's dtype, equal to
        ``Gemma2RMSNorm`` / ``Gemma3RMSNorm``.

    Forward (per row, fp32): ``rstd = 1/sqrt(mean(x^2) + eps)``, ``xhat = x * rstd``,
    ``y = weight * cast(xhat, x.dtype)``; ``rstd`` is saved.

    Backward: with ``g = dy * weight``, ``dx = rstd * (g - xhat * mean(g * xhat))`` and
    ``dweight = sum_rows(dy * cast(xhat, x.dtype))``, accumulated in fp32 partial sums per program
    (no atomics) and summed once. With ``unit_offset``: ``g = dy * (1 + weight)`` and
    ``dweight = sum_rows(dy * xhat)`` (xhat in fp32).
    """
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=1)
    check_same_device(x=x, weight=weight)
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"weight has {weight.shape[0]} elements but x's last dim (H) is {x.shape[-1]}: "
            f"x shape {tuple(x.shape)}, weight shape {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("x's last dim (H) must be at least 1")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    if not isinstance(unit_offset, bool):
        raise TypeError(f"unit_offset must be a bool, got {unit_offset!r}")
    if not use_triton(x, "rms_norm"):
        return _rms_norm_torch(x, weight, float(eps), unit_offset)
    return _RMSNormFunction.apply(x, weight.contiguous(), float(eps), unit_offset)
