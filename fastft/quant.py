"""bitsandbytes and peft adapters for the fused NF4 + LoRA kernels.

* :func:`nf4_weight_of` reads a ``bitsandbytes.nn.Params4bit`` (its packed ``.data`` and
  ``.quant_state``) into the plain-tensor :class:`~fastft.kernels.nf4.NF4Weight` the kernels take.
* :func:`dequantize_4bit` (exported as ``fastft.dequantize_4bit``) is a drop-in for
  ``bitsandbytes.functional.dequantize_4bit(weight.data, weight.quant_state)`` on NF4 weights.
* :func:`lora_args_of` / :func:`fused_linear_args` give ``(weight, bias, A, B, scaling,
  compute_dtype, dropout)`` of a projection for ``lora_linear`` / ``lora_qkv`` / ``lora_mlp``, reading
  peft's *active* adapter (and whether its dropout applies now) at call time (fp32 adapters of an fp16
  model as fp16 copies), or raise
  :class:`UnsupportedLoraLayer` (a ``ValueError``) saying why the fused path cannot serve the layer
  exactly; the caller then runs peft's own forward.

bitsandbytes is imported by the user's model, never by this module: a parameter can only be a
``Params4bit`` if bitsandbytes is already in ``sys.modules``.

CPU repacking: on CPUs with AVX512-BF16, bitsandbytes 0.50 rewrites a ``Linear4bit``'s weight into
a CPU-specific layout on its first eval-mode, no-grad forward (``quant_state.packing_format_for_cpu``:
nibbles permuted in 32-row tiles, per-block scales rounded to bf16 and transposed, double
quantization undone). :func:`nf4_weight_of` recognises that state and rebuilds the standard layout
from it exactly (the permutation is undone; the bf16 scales are what the layer now computes with),
without touching the layer. ``bitsandbytes.functional.dequantize_4bit`` itself would return garbage
for such a weight.
"""
from __future__ import annotations

import sys
from typing import NamedTuple

import torch
from torch import nn

from .kernels.nf4 import NF4Weight, dequantize_nf4


class UnsupportedLoraLayer(ValueError):
    """The fused NF4 + LoRA path cannot reproduce this layer exactly; run its own forward."""


class UnsupportedWeight(UnsupportedLoraLayer):
    """The weight is not one the fused path reads (FP4, 8-bit, not yet quantized, ...)."""


class LoraArgs(NamedTuple):
    """Arguments of ``lora_linear(x, *args)`` (and one projection of ``lora_qkv`` / ``lora_mlp``)."""

    weight: NF4Weight | torch.Tensor
    bias: torch.Tensor | None
    A: torch.Tensor | None  # [r, in], None when no adapter is active
    B: torch.Tensor | None  # [out, r]
    scaling: float
    compute_dtype: torch.dtype | None = None  # bitsandbytes' compute dtype of the base matmul (None: x's)
    dropout: float = 0.0  # the adapter's lora_dropout p while its dropout module trains; 0 in eval mode


def is_dtensor(tensor) -> bool:
    """Whether ``tensor`` is a ``torch.distributed`` DTensor (FSDP2's sharded parameters are)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(tensor, DTensor)


def unsharded_class(module: torch.nn.Module) -> type:
    """``type(module)``, or for a module FSDP2 sharded (class ``FSDP<Name>(FSDPModule, <Name>)``), ``<Name>``."""
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule
        if isinstance(module, FSDPModule):
            return type(module).__bases__[-1]
    return type(module)


def _bnb():
    return sys.modules.get("bitsandbytes")


def _is_params4bit(param) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(param, bnb.nn.Params4bit)


def _is_int8(param) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(param, bnb.nn.Int8Params)


# ---------------------------------------------------------------------------------------------
# NF4 weights


def _standard_layout_of_cpu_packed(data: torch.Tensor, qs) -> NF4Weight:
    """Undo bitsandbytes' ``_convert_weight_packed_for_cpu`` exactly (see the module doc).

    The packed layout: codes ``[N, K]`` are tiled ``[N/32, 32, K/2, 2] -> [N/32, K/2, 32, 2]`` and
    each run of 64 codes is stored as 32 bytes, low nibble = first 32 codes, high nibble = last 32.
    The scales are bf16 ``[K / blocksize, N]``; element ``(n, k)`` uses ``absmax[k // blocksize, n]``.
    """
    N, K = (int(s) for s in qs.shape)
    bs = qs.blocksize
    if data.dtype != torch.uint8:
        data = data.view(torch.uint8)
    if N % 32 or K % 2 or K % bs or data.numel() != N * K // 2:
        raise UnsupportedWeight(
            f"weight in bitsandbytes' CPU-packed layout with shape {(N, K)} and blocksize {bs} cannot be unpacked"
        )
    tiles = data.reshape(-1, 32)
    codes = torch.cat([tiles & 0xF, tiles >> 4], dim=-1)  # [-1, 64]
    codes = codes.reshape(N // 32, K // 2, 32, 2).transpose(1, 2).reshape(-1)  # row-major element order
    packed = (codes[0::2] << 4) | codes[1::2]
    absmax = qs.absmax.t().float().contiguous().reshape(-1)  # [N, K / bs]: flat block order
    dtype = getattr(qs, "original_dtype", None) or torch.bfloat16
    return NF4Weight(packed=packed, absmax=absmax, code=qs.code.float().contiguous(), blocksize=bs,
                     shape=(N, K), dtype=dtype)


def nf4_weight_of(param) -> NF4Weight:
    """The :class:`NF4Weight` view of a quantized ``bitsandbytes.nn.Params4bit`` (no copy).

    Raises :class:`UnsupportedWeight` for anything else: FP4 weights, 8-bit ``Int8Params``, plain
    tensors, a ``Params4bit`` not quantized yet (bitsandbytes quantizes when the layer is moved to a
    device). A weight in bitsandbytes' CPU-packed inference layout is converted back (a copy).
    """
    if not _is_params4bit(param):
        if _is_int8(param):
            raise UnsupportedWeight("8-bit weights (bitsandbytes Int8Params) are not supported; only NF4 4-bit")
        if isinstance(param, torch.Tensor):
            raise UnsupportedWeight(f"not a 4-bit weight: a plain {str(param.dtype).replace('torch.', '')} "
                                    f"{type(param).__name__} of shape {tuple(param.shape)}")
        raise UnsupportedWeight(f"not a 4-bit weight: {type(param).__name__}")
    qs = param.quant_state
    if qs is None and getattr(param, "module", None) is not None:
        qs = getattr(param.module, "quant_state", None)  # bitsandbytes keeps a copy on the module
    if qs is None or not getattr(param, "bnb_quantized", True):
        raise UnsupportedWeight("the 4-bit weight is not quantized yet (move its layer to a device first)")
    return _nf4_weight(param.data, qs)


def _nf4_weight(data: torch.Tensor, qs) -> NF4Weight:
    """The :class:`NF4Weight` of packed bytes ``data`` (any storage dtype) described by quant state ``qs``."""
    if qs.quant_type != "nf4":
        raise UnsupportedWeight(f"4-bit quant_type {qs.quant_type!r} is not supported; only 'nf4'")
    if len(qs.shape) != 2:
        raise UnsupportedWeight(f"4-bit weight of shape {tuple(qs.shape)}; expected a 2-D (out, in) weight")

    # Built once per quantized weight and cached on its quant state (called at every forward). The
    # cache holds the source tensors, so a re-quantized or moved weight (new tensors) misses it.
    key = (data, qs.absmax, qs.state2.absmax if qs.nested else None)
    cached = getattr(qs, "_fastft_nf4_weight", None)
    if cached is not None and cached[0][0].data_ptr() == data.data_ptr() and all(
        a is b for a, b in zip(cached[0][1:], key[1:])
    ):
        return cached[1]
    if getattr(qs, "packing_format_for_cpu", False):
        weight = _standard_layout_of_cpu_packed(data, qs)  # a converted copy
    else:
        if data.dtype != torch.uint8:  # quant_storage other than uint8 (e.g. bf16 for FSDP)
            data = data.view(torch.uint8)
        nested = {}
        if qs.nested:
            s2 = qs.state2
            nested = dict(nested_absmax=s2.absmax, nested_code=s2.code, nested_blocksize=s2.blocksize,
                          offset=qs.offset)
        weight = NF4Weight(packed=data.reshape(-1), absmax=qs.absmax, code=qs.code, blocksize=qs.blocksize,
                           shape=tuple(qs.shape), dtype=qs.dtype, **nested)
    qs._fastft_nf4_weight = (key, weight)
    return weight


def dequantize_4bit(weight) -> torch.Tensor:
    """Dequantize a 4-bit NF4 weight with fastft's kernel.

    Args:
        weight: a ``bitsandbytes.nn.Params4bit`` (or a ``bitsandbytes.nn.Linear4bit``, whose
            ``.weight`` is taken).

    Returns:
        ``[out, in]`` in ``quant_state.dtype``: the values and dtype of
        ``bitsandbytes.functional.dequantize_4bit(weight.data, weight.quant_state)``, i.e. of
        bitsandbytes' CUDA kernel and its reference PyTorch backend. (bitsandbytes 0.50.2's CPU C
        kernel gets some layouts wrong, where quantization blocks straddle rows; fastft does not copy
        that.) A weight in the CPU-packed layout dequantizes to what the layer computes with, in its
        original dtype.
    """
    bnb = _bnb()
    if bnb is not None and isinstance(weight, bnb.nn.Linear4bit):
        weight = weight.weight
    return dequantize_nf4(nf4_weight_of(weight))


# ---------------------------------------------------------------------------------------------
# peft LoRA layers


def _nf4_weight_of_fsdp_gathered(base: nn.Module, weight) -> NF4Weight:
    """The NF4 weight of a ``Linear4bit`` whose ``Params4bit`` FSDP has replaced.

    FSDP shards a 4-bit weight stored in a float ``bnb_4bit_quant_storage`` like any parameter: inside the
    FSDP unit's forward and backward the layer holds the all-gathered packed bytes as a plain parameter, and
    bitsandbytes keeps the quant state on the module (its own forward re-attaches it the same way). A shard
    outside the unit's forward is refused (the caller falls back); bytes FSDP cast to another dtype are an error.
    """
    qs = getattr(base, "quant_state", None)
    if qs is None:
        raise UnsupportedWeight("the 4-bit layer lost its weight's quant state (no quant_state on the layer)")
    if is_dtensor(weight):
        raise UnsupportedWeight("the 4-bit weight is an FSDP shard (DTensor) here, not the all-gathered weight: "
                                "the layer runs outside its FSDP unit's forward")
    storage = getattr(base, "quant_storage", torch.uint8)
    if not isinstance(weight, torch.Tensor) or weight.dtype != storage:
        # Every bit pattern is lost once packed codes are cast as numbers: no forward can serve this layer.
        raise ValueError(
            f"the 4-bit weight of {type(base).__name__} is stored as {storage} but arrives as "
            f"{getattr(weight, 'dtype', type(weight).__name__)}: FSDP's mixed precision cast the packed 4-bit codes. "
            "Load the model with bnb_4bit_quant_storage equal to FSDP's parameter dtype (FastModel does, for its "
            "dtype: train with the same dtype, e.g. bf16=True for a bfloat16 model)"
        )
    return _nf4_weight(weight.detach(), qs)


def _frozen_weight_of(base: nn.Module):
    """The base layer's weight for the fused kernels: an NF4Weight or a frozen float tensor."""
    weight = getattr(base, "weight", None)
    if _is_params4bit(weight):
        return nf4_weight_of(weight)
    if _bnb() is not None and isinstance(base, _bnb().nn.Linear4bit):
        return _nf4_weight_of_fsdp_gathered(base, weight)
    if _is_int8(weight):
        raise UnsupportedWeight(f"{type(base).__name__} holds 8-bit weights (Int8Params); only NF4 4-bit or 16/32-bit")
    if not isinstance(base, nn.Linear):
        raise UnsupportedLoraLayer(f"base layer {type(base).__name__} is not a linear layer")
    if not isinstance(weight, torch.Tensor) or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UnsupportedWeight(f"{type(base).__name__} weight of dtype {getattr(weight, 'dtype', None)} "
                                "is not supported")
    if weight.requires_grad:
        raise UnsupportedLoraLayer(f"{type(base).__name__} weight requires grad; the fused path trains LoRA "
                                   "adapters on a frozen base only")
    return weight.detach()


def _is_lora_layer(module) -> bool:
    peft = sys.modules.get("peft")
    if peft is None:
        return False
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def lora_args_of(layer: nn.Module) -> LoraArgs:
    """``(weight, bias, A, B, scaling, compute_dtype, dropout)`` of a peft LoRA linear layer for its active
    adapter, now.

    Returns ``A = B = None`` (base layer only) when adapters are disabled, the layer is merged, or
    no active adapter lives on this layer. fp32 adapters over an fp16 base (fp16 training's master weights)
    come as fp16 copies, differentiable: the LoRA branch then computes in fp16, as under fp16 autocast (peft's
    forward would compute it in fp32). ``dropout`` is the adapter's ``lora_dropout`` p when its
    ``nn.Dropout`` is in training mode (peft's forward would drop then), else 0. Raises
    :class:`UnsupportedLoraLayer` naming the reason when the fused path would not reproduce peft's
    forward exactly: a weight that is not NF4 or 16/32-bit float (FP4, 8-bit), a trainable base weight,
    DoRA or any other ``lora_variant``, a dropout module other than ``nn.Dropout`` / ``nn.Identity`` (or
    ``p = 1``), ``lora_bias``, several active adapters, adapters disabled while merged (peft unmerges
    first), a non-linear base layer.
    """
    if not _is_lora_layer(layer):
        raise UnsupportedLoraLayer(f"{type(layer).__name__} is not a peft LoRA layer")
    base = layer.get_base_layer()
    weight, bias, _, _, _, compute_dtype, _ = _base_args(base)
    base_only = LoraArgs(weight, bias, None, None, 1.0, compute_dtype)

    if layer.disable_adapters:
        if layer.merged:
            raise UnsupportedLoraLayer("adapters are disabled on a merged layer (peft unmerges it in its forward)")
        return base_only
    if layer.merged:
        return base_only

    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if not active:
        return base_only
    if len(active) > 1:
        raise UnsupportedLoraLayer(f"{len(active)} active adapters ({', '.join(active)}); the fused path serves one")
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        variant = type(layer.lora_variant[name]).__name__ if name in getattr(layer, "lora_variant", {}) else "DoRA"
        raise UnsupportedLoraLayer(f"adapter {name!r} uses a LoRA variant ({variant}, e.g. DoRA)")
    dropout = _dropout_p(layer.lora_dropout[name], name)
    if getattr(layer, "lora_bias", {}).get(name, False):
        raise UnsupportedLoraLayer(f"adapter {name!r} has lora_bias=True")
    lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_B.bias is not None:
        raise UnsupportedLoraLayer(f"adapter {name!r} is not a plain linear LoRA ({type(lora_A).__name__})")
    A, B = lora_A.weight, lora_B.weight
    if A.dtype == torch.float32 and (compute_dtype if isinstance(weight, NF4Weight) else weight.dtype) == torch.float16:
        # fp32 master weights of an fp16 model (fastft/master_weights.py): the kernels compute with fp16 copies,
        # made now; the gradients flow back through the cast to the fp32 parameters
        A, B = A.to(torch.float16), B.to(torch.float16)
    return LoraArgs(weight, bias, A, B, float(layer.scaling[name]), compute_dtype, dropout)


def _dropout_p(module: nn.Module, name: str) -> float:
    """The dropout probability peft's ``lora_dropout[name]`` applies now: ``p`` of a training
    ``nn.Dropout``, 0 for ``nn.Identity`` (peft's module for p = 0) or a dropout in eval mode."""
    if type(module) is nn.Identity:
        return 0.0
    if type(module) is not nn.Dropout or module.inplace or not 0 <= module.p < 1:
        raise UnsupportedLoraLayer(f"adapter {name!r} has a lora_dropout module the fused path does not serve "
                                   f"({module!r}); only nn.Dropout with p < 1")
    return float(module.p) if module.training else 0.0


def fused_linear_args(module: nn.Module) -> LoraArgs:
    """Like :func:`lora_args_of`, for any projection: a peft LoRA layer, a bare
    ``bitsandbytes.nn.Linear4bit`` or a frozen ``nn.Linear`` (no adapter: ``A = B = None``).
    Raises :class:`UnsupportedLoraLayer` for anything else."""
    if _is_lora_layer(module):
        return lora_args_of(module)
    if isinstance(module, nn.Linear):
        return _base_args(module)
    raise UnsupportedLoraLayer(f"{type(module).__name__} is neither a linear layer nor a peft LoRA layer")


def _base_args(base: nn.Module) -> LoraArgs:
    """A base layer alone: its frozen weight, bias and (bitsandbytes) compute dtype, no adapter."""
    weight = _frozen_weight_of(base)
    compute_dtype = getattr(base, "compute_dtype", None) if isinstance(weight, NF4Weight) else None
    return LoraArgs(weight, getattr(base, "bias", None), None, None, 1.0, compute_dtype)
