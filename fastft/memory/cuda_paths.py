"""The CUDA code paths of the Hugging Face stack, as the memory accounting follows them.

On meta (and CPU) tensors, two libraries take other branches than on a GPU, with other allocations:

* ``torch.nn.functional.scaled_dot_product_attention`` picks its CUDA backend from the device:
  FlashAttention-2 for 16-bit inputs without a mask (GQA native), else memory-efficient attention with
  the boolean mask turned into an additive bias of the query's dtype, its last dim padded to a multiple
  of 16 (``aten/src/ATen/native/transformers/attention.cpp``, ``sdp_utils.cpp``). On meta it would take
  the math path and materialise ``[T, T]`` scores. :func:`cuda_sdpa` calls the backend op CUDA picks.
* bitsandbytes' 4-bit matmul (``bitsandbytes::gemm_4bit``, 0.50) on CUDA runs a custom kernel for up to
  1536 rows and, beyond, dequantizes the weight into a temporary ``[N, K]`` buffer (with the double-quant
  absmax dequantized into an fp32 temporary first) and calls ``F.linear``
  (``backends/cuda/ops.py: _dequant_linear_fallback``). :func:`bnb_gemm_4bit` does the same with
  bitsandbytes' own Python-level dequantization, so the buffers are allocated (and counted) as on CUDA.

:func:`cuda_code_paths` installs the first (for the duration of a ``with``), :func:`cuda_op_overrides`
gives the second to the tracking mode; the CPU validation of the accounting uses both too, so that both
runs follow the same code. :func:`cuda_op_workspace` gives
the bytes a CUDA kernel allocates internally for its own duration, invisible to a dispatch mode
(FlashAttention-2's backward: its fp32 ``dq`` accumulator, ``softmax_d`` and, under GQA, ``dk``/``dv``
expanded to all query heads, from ``flash_attn/flash_api.cpp: mha_bwd``; the memory-efficient
backward's fp32 ``delta`` and ``dq`` accumulator). cuBLAS workspaces are not counted.
"""
from __future__ import annotations

import contextlib
import importlib.util

import torch

from .. import reach_ins

aten = torch.ops.aten

CUDA_PATH_OPS = (reach_ins.ATEN_FLASH_ATTENTION_FOR_CPU, reach_ins.ATEN_FLASH_ATTENTION,
                 reach_ins.ATEN_EFFICIENT_ATTENTION, reach_ins.ATEN_FLASH_ATTENTION_BACKWARD,
                 reach_ins.ATEN_EFFICIENT_ATTENTION_BACKWARD)
GEMM_4BIT_CUSTOM_MAX_ROWS = 1536  # bitsandbytes 0.50 on CUDA: custom kernel up to here, dequant + linear beyond


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def cuda_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` through the backend CUDA would pick for a training step.

    On CPU tensors (the accounting's validation run) the chosen backend's op has no kernel; PyTorch's CPU
    flash attention stands in for it after the same preparation of k, v and the mask: it keeps the same
    tensors for the backward (output, log-sum-exp, the bias)."""
    if dropout_p:
        raise NotImplementedError("the memory accounting models attention without dropout")
    head_dim = query.shape[-1]
    flash = (attn_mask is None and query.dtype in (torch.float16, torch.bfloat16)
             and head_dim <= 256 and head_dim % 8 == 0)
    if not flash and key.shape[1] != query.shape[1]:  # memory-efficient attention has no GQA: expand k/v
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:  # additive bias in the query's dtype
            bias = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
            bias.masked_fill_(attn_mask.logical_not(), float("-inf"))
        else:
            bias = attn_mask
        last = bias.shape[-1]
        if last % 16:  # the kernel wants the bias's rows 16-element aligned: pad, then slice
            bias = torch.nn.functional.pad(bias, (0, 16 - last % 16))[..., :last]
        bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    if query.device.type == "cpu":
        if key.shape[1] != query.shape[1]:
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        return aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, is_causal, attn_mask=bias,
                                                                scale=scale)[0]
    if flash:
        return aten._scaled_dot_product_flash_attention(query, key, value, 0.0, is_causal, False, scale=scale)[0]
    needs_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return aten._scaled_dot_product_efficient_attention(query, key, value, bias, needs_lse, 0.0, is_causal,
                                                        scale=scale)[0]


def bnb_gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None, absmax_code=None,
                  absmax_offset=None):
    """bitsandbytes' CUDA ``gemm_4bit``: custom kernel (output only) up to 1536 rows, else dequant + linear."""
    import bitsandbytes.functional as F

    rows = A.numel() // A.shape[-1]
    if rows <= GEMM_4BIT_CUSTOM_MAX_ROWS:
        out = torch.empty((*A.shape[:-1], shapeB[0]), dtype=A.dtype, device=A.device)
        return out if bias is None else out.add_(bias)
    if absmax_8bit is not None:  # double quantization: the fp32 block scales first
        absmax = F.dequantize_blockwise(absmax_8bit, absmax=absmax, code=absmax_code, blocksize=256)
        absmax = absmax + absmax_offset
    weight = torch.ops.bitsandbytes.dequantize_4bit(B, absmax, blocksize, quant_type, shapeB, A.dtype)
    return torch.nn.functional.linear(A, weight, bias)


def grouped_mm_output(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
    """``torch._grouped_mm`` (transformers' default experts, ``grouped_mm``) on meta tensors: its output, which is all
    it allocates, for any float dtype (torch's meta kernel, like CUDA's, takes bf16 only; the CPU kernel that the
    accounting's fp32 validation runs takes fp32 too)."""
    out = reach_ins.get(reach_ins.GROUPED_MM_META_OUTPUT)(mat_a, mat_b, offs, out_dtype)
    return out if bias is None else out.add_(bias)


def meta_op_overrides() -> dict:
    """``{op: python function}`` for the accounting's meta tensors only (see :func:`grouped_mm_output`)."""
    return {reach_ins.get(reach_ins.ATEN_GROUPED_MM): grouped_mm_output}


def cuda_op_overrides() -> dict:
    """``{op: python function}`` for the tracking mode: ops whose CUDA implementation allocates differently."""
    import bitsandbytes  # noqa: F401 - registers torch.ops.bitsandbytes

    return {torch.ops.bitsandbytes.gemm_4bit.default: bnb_gemm_4bit}


def _trl_addmm_fp32(acc, a, b):
    """TRL's ``_addmm_fp32`` as it runs on CUDA: an fp32-output GEMM of the 16-bit operands, no fp32 copies
    (the CPU validation run keeps TRL's own CPU branch)."""
    if acc.device.type != "cpu" and a.dtype in (torch.float16, torch.bfloat16):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def _use_triton_on_gpus(device) -> bool:
    return device.type in ("cuda", "xpu", "meta", "cpu")


@contextlib.contextmanager
def cuda_code_paths():
    """Route SDPA through the backend CUDA picks and TRL's fused lm head through its GPU branches (its
    Triton kernels, interpreted on CPU tensors; fp32-output GEMMs), for the duration of the block."""
    for entry in CUDA_PATH_OPS:  # called (positionally) and recognised below by their schema names
        reach_ins.check(entry)
    patches = [(reach_ins.SDPA, cuda_sdpa)]
    if importlib.util.find_spec("trl") is not None:  # without TRL there is nothing of it to route
        patches += [(reach_ins.TRL_USE_TRITON, _use_triton_on_gpus),
                    (reach_ins.TRL_UTILS_USE_TRITON, _use_triton_on_gpus), (reach_ins.TRL_ADDMM_FP32, _trl_addmm_fp32)]
    with reach_ins.patched(*patches):
        yield


def cuda_op_workspace(func, args, kwargs, out) -> int:
    """Bytes ``func`` allocates internally on CUDA for its own duration (see the module doc)."""
    if func is aten._scaled_dot_product_flash_attention_backward.default:
        _, query, key = args[:3]  # [B, H, T, D]
        B, H, Tq, D = query.shape
        Hk, Tk = key.shape[1], key.shape[2]
        q_rounded = _round_up(Tq, 128)
        nbytes = 4 * B * H * q_rounded  # softmax_d
        nbytes += 4 * B * q_rounded * H * _round_up(D, 32 if D <= 128 else 64)  # dq_accum
        if Hk != H:  # dk / dv expanded to every query head, then summed per group
            nbytes += 2 * B * Tk * H * D * query.element_size()
        return nbytes
    if func is aten._scaled_dot_product_efficient_attention_backward.default:
        _, query = args[:2]
        B, H, Tq, D = query.shape
        nbytes = 4 * B * H * Tq  # delta
        if query.dtype != torch.float32:  # fp32 accumulator for dq
            nbytes += 4 * B * Tq * H * D
        return nbytes
    return 0
