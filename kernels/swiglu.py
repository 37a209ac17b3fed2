"""The gated activation of Llama's MLP, ``silu(gate) * up`` (SwiGLU), or of Gemma's, ``gelu_tanh(gate) * up``
(GeGLU): Triton forward and backward; ``activation`` picks one.

Forward, elementwise in fp32, result rounded once to the input dtype::

    silu:      sig = sigmoid(gate)                      act = gate * sig
    gelu_tanh: u = sqrt(2/pi) * (gate + 0.044715 gate^3)  act = 0.5 gate (1 + tanh(u)) = gate * sig,
               sig = sigmoid(2u)                        # 0.5 (1 + tanh(u)) == sigmoid(2u), no cancellation
    out = act * up

Backward recomputes ``sig`` from the saved ``gate`` (no fp32 activation is kept)::

    silu:      act' = sig * (1 + gate * (1 - sig))
    gelu_tanh: act' = sig + gate * sig * (1 - sig) * 2 u',   u' = sqrt(2/pi) (1 + 3 * 0.044715 gate^2)
               (= 0.5 (1 + tanh u) + 0.5 gate (1 - tanh^2 u) u': PyTorch's gelu(approximate="tanh") and its gradient)
    d_gate = g_out * up * act'
    d_up   = g_out * act

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
ACTIVATIONS = ("silu", "gelu_tanh")
_SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(0.7978845608028654)
_GELU_KAPPA: tl.constexpr = tl.constexpr(0.044715)


@triton.jit
def _activation(gate, ACTIVATION: tl.constexpr):
    """(act(gate), act'(gate)) in fp32, from one sigmoid (see the module docstring)."""
    if ACTIVATION == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (gate + _GELU_KAPPA * gate * gate * gate)
        sig = tl.sigmoid(2.0 * inner)
        d_inner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_KAPPA * gate * gate)
        return gate * sig, sig + gate * sig * (1.0 - sig) * 2.0 * d_inner
    else:
        sig = tl.sigmoid(gate)
        return gate * sig, sig * (1.0 + gate * (1.0 - sig))


@triton.jit
def _swiglu_fwd_kernel(
    GATE, UP, OUT,  # pointers to [rows, n_cols] buffers, unit stride along a row
    stride_gate, stride_up, stride_out,  # row strides: a column half of a fused [rows, 2I] projection has 2I
    n_cols,
    BLOCK: tl.constexpr,
    ACTIVATION: tl.constexpr,  # "silu" or "gelu_tanh"
):
    row = tl.program_id(0).to(tl.int64)  # int64: rows * stride may pass 2**31
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(GATE + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    act, _ = _activation(gate, ACTIVATION)  # (the derivative is compiled out: unused)
    tl.store(OUT + row * stride_out + cols, (act * up).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    GRAD_OUT, GATE, UP, GRAD_GATE, GRAD_UP, OUT,  # pointers to [rows, n_cols] buffers; OUT only with STORE_OUT
    stride_grad_out, stride_gate, stride_up, stride_grad_gate, stride_grad_up, stride_out,  # row strides
    n_cols,
    BLOCK: tl.constexpr,
    STORE_OUT: tl.constexpr,  # also write the forward's output (recomputed): the fused MLP's backward needs it
    ACTIVATION: tl.constexpr,
):
    # Each element is loaded and stored by the same program, so the outputs may overwrite the inputs.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    grad_out = tl.load(GRAD_OUT + row * stride_grad_out + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    act, d_act = _activation(gate, ACTIVATION)  # recomputed: cheaper than storing it
    grad_gate = grad_out * up * d_act
    grad_up = grad_out * act
    tl.store(GRAD_GATE + row * stride_grad_gate + cols, grad_gate.to(GRAD_GATE.dtype.element_ty), mask=mask)
    tl.store(GRAD_UP + row * stride_grad_up + cols, grad_up.to(GRAD_UP.dtype.element_ty), mask=mask)
    if STORE_OUT:
        tl.store(OUT + row * stride_out + cols, (act * up).to(OUT.dtype.element_ty), mask=mask)


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


def check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _activation_torch(gate: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(act, act') of an fp32 ``gate``: the kernels' formulas in PyTorch."""
    if activation == "gelu_tanh":
        inner = 0.7978845608028654 * (gate + 0.044715 * gate.pow(3))
        sig = torch.sigmoid(2 * inner)
        d_inner = 0.7978845608028654 * (1 + 3 * 0.044715 * gate.square())
        return gate * sig, sig + gate * sig * (1 - sig) * 2 * d_inner
    sig = torch.sigmoid(gate)
    return gate * sig, sig * (1 + gate * (1 - sig))


def swiglu_forward_into(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor, activation: str = "silu"
                        ) -> torch.Tensor:
    """``out = act(gate) * up`` (fp32 math, one rounding) into the caller's buffer ``out``; all three of one
    shape, dtype and device, each contiguous or 2-D with strided rows, e.g. the two column halves of a fused
    ``[T, 2I]`` gate/up projection (else a ValueError/TypeError). No autograd. Returns ``out``."""
    gate2, up2, out2 = _check_buffers(gate=gate, up=up, out=out)
    check_activation(activation)
    if use_triton(gate, "swiglu"):
        if gate.numel() > 0:
            grid, block = _grid(gate2)
            _swiglu_fwd_kernel[grid](gate2, up2, out2, gate2.stride(0), up2.stride(0), out2.stride(0),
                                     gate2.shape[1], BLOCK=block, ACTIVATION=activation, num_warps=_NUM_WARPS)
    else:
        out.copy_(_activation_torch(gate.float(), activation)[0] * up.float())
    return out


def swiglu_backward_into(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, grad_gate: torch.Tensor,
                         grad_up: torch.Tensor, out: torch.Tensor | None = None, activation: str = "silu") -> None:
    """``grad_gate``, ``grad_up`` (and, given ``out``, the recomputed ``act(gate) * up``) in one pass.

    Every output may be the storage of an input (``grad_gate=gate``, ``grad_up=up``, ``out=grad_out``):
    each element is read before it is written. All of one shape, dtype and device, each contiguous or 2-D with
    strided rows (else a ValueError/TypeError). No autograd."""
    buffers = dict(grad_out=grad_out, gate=gate, up=up, grad_gate=grad_gate, grad_up=grad_up)
    rows = _check_buffers(**buffers, **({} if out is None else dict(out=out)))
    check_activation(activation)
    if use_triton(gate, "swiglu"):
        if gate.numel() > 0:
            out2 = rows[5] if out is not None else rows[3]
            grid, block = _grid(rows[1])
            _swiglu_bwd_kernel[grid](*rows[:5], out2, *(t.stride(0) for t in rows[:5]), out2.stride(0),
                                     rows[1].shape[1], BLOCK=block, STORE_OUT=out is not None,
                                     ACTIVATION=activation, num_warps=_NUM_WARPS)
        return
    gf, uf, df = gate.float(), up.float(), grad_out.float()
    act, d_act = _activation_torch(gf, activation)
    d_gate, d_up = df * uf * d_act, df * act
    if out is not None:
        out.copy_(act * uf)
    grad_gate.copy_(d_gate)
    grad_up.copy_(d_up)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, activation: str):
        gate, up = gate.contiguous(), up.contiguous()  # no-ops for the usual contiguous inputs
        out = swiglu_forward_into(gate, up, empty(gate.shape, dtype=gate.dtype, device=gate.device), activation)
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = empty(gate.shape, dtype=gate.dtype, device=gate.device)
        grad_up = empty(up.shape, dtype=up.dtype, device=up.device)
        swiglu_backward_into(grad_out.contiguous(), gate, up, grad_gate, grad_up, activation=ctx.activation)
        return grad_gate, grad_up, None


def _swiglu_torch(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    gf = gate.float()
    act = torch.nn.functional.silu(gf) if activation == "silu" else torch.nn.functional.gelu(gf, approximate="tanh")
    return (act * up.float()).to(gate.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """SwiGLU ``silu(gate) * up`` (Llama), or GeGLU ``gelu_tanh(gate) * up`` (Gemma: ``activation="gelu_tanh"``,
    transformers' ``gelu_pytorch_tanh``), computed in fp32 and rounded once to the input dtype.

    Args:
        gate: ``[...]`` fp32/fp16/bf16, any shape (read contiguously; a non-contiguous input is
            copied once).
        up: same shape, dtype and device as ``gate``.
        activation: ``"silu"`` or ``"gelu_tanh"`` (``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``).

    Returns:
        ``[...]`` like ``gate``: ``act(gate) * up``.

    Forward: ``out = act(gate) * up`` (fp32 math). Only ``gate`` and ``up`` are saved.

    Backward, with the activation recomputed: ``d_gate = g_out * up * act'(gate)`` and ``d_up = g_out * act(gate)``;
    silu' = ``sig * (1 + gate * (1 - sig))``, gelu_tanh' in the module docstring.
    """
    check_activation(activation)
    check_tensor("gate", gate)
    check_tensor("up", up)
    check_same_device(gate=gate, up=up)
    if up.dtype != gate.dtype:
        raise TypeError(f"up has dtype {up.dtype} but gate has dtype {gate.dtype}; they must match")
    if up.shape != gate.shape:
        raise ValueError(f"up has shape {tuple(up.shape)} but gate has shape {tuple(gate.shape)}; they must match")
    if not use_triton(gate, "swiglu"):
        return _swiglu_torch(gate, up, activation)
    return _SwiGLUFunction.apply(gate, up, activation)
