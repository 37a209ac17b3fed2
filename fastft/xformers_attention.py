"""Attention through xformers' memory-efficient kernel, registered in transformers' interfaces as "fastft_xformers".

Why: below compute capability 8.0 (V100, T4) Triton's ``tl.dot`` has no tensor-core path, so fastft's own
attention kernel is slow there. PyTorch SDPA would need a dense ``[T, T]`` mask for a packed (padding-free)
batch; xformers' ``memory_efficient_attention`` (its CUTLASS kernels, sm_50 and up, fp16 and fp32) takes the
sequence boundaries instead (``BlockDiagonalCausalMask``), so packed and padded batches cost no mask memory.
``patch_model`` routes here when fastft's kernel cannot serve the model on the GPU and xformers can
(:func:`fastft.attention.choose_attention`); ``attn_implementation="fastft_xformers"`` asks for it explicitly.

xformers is optional (``pip install 'fastft[xformers]'``): this module imports it only when attention runs or
when :func:`unavailable_reason` asks whether it can.

Every batch is run as one packed row ``[1, tokens, H, D]`` with a block-diagonal causal mask:

* plain batch ``[B, T]``: B sequences of T tokens;
* padded batch (2D mask): the real tokens gathered into sequences, outputs scattered back (pads get 0);
* packed batch: the sequences of ``cu_seq_lens_q`` (padding-free collators) or of restarting ``position_ids``;
* sliding window ``w``: the same mask made local (a query sees itself and the ``w - 1`` keys before it);
* decoding with a KV cache (4D mask from the mask function): PyTorch SDPA, as for fastft's own attention.

The sequence lengths are read to the host once per forward (memoised on the mask / position_ids tensor that
every layer receives). GQA: without gradients, xformers' grouped 5-D layout ``[1, N, G, H, D]`` with K/V
broadcast over the group (no copy); with gradients, K/V are repeated per query head, because xformers'
backward kernels have no 5-D layout.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from .attention import batch_packing, fastft_mask, once_per_forward, padding_metadata

ATTENTION_NAME = "fastft_xformers"


def _fmha():
    try:
        from xformers.ops import fmha
    except ImportError as exc:
        raise ImportError(f"attention {ATTENTION_NAME!r} needs xformers: "
                          f"pip install 'fastft[xformers]' ({exc})") from exc
    return fmha


def unavailable_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when xformers can train attention on ``device`` in ``dtype`` at this head size, else why not.

    Asks xformers' CUTLASS operators (its fallback that covers every GPU from sm_50) with a tiny input of the
    model's kind: this catches a missing install, no CUDA device, an xformers build whose CUDA extension does
    not load beside this torch, a GPU too old or too new, and bf16 below sm_80."""
    try:
        fmha = _fmha()
    except ImportError:
        return "xformers is not installed (pip install 'fastft[xformers]')"
    probe = torch.zeros(1, 2, 1, head_dim, device=device, dtype=dtype)
    bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens([2], device=device)
    inputs = fmha.Inputs(query=probe, key=probe, value=probe, attn_bias=bias, scale=1.0)
    reasons = fmha.cutlass.FwOp.not_supported_reasons(inputs) + fmha.cutlass.BwOp.not_supported_reasons(inputs)
    return "; ".join(dict.fromkeys(reasons)) or None


def _block_diagonal(lengths: list[int], device: torch.device):
    # A fully padded row has no tokens, hence no sequence.
    return _fmha().attn_bias.BlockDiagonalCausalMask.from_seqlens([n for n in lengths if n > 0], device=device)


def _from_cu_seqlens(cu_seqlens: torch.Tensor):
    starts = cu_seqlens.tolist()
    return _block_diagonal([b - a for a, b in zip(starts, starts[1:])], cu_seqlens.device)


def _unpadded(attention_mask: torch.Tensor):
    # (fastft_mask has memoised the metadata of a mask it returns); None: nothing padded
    padding = once_per_forward(attention_mask, "unpad", padding_metadata, attention_mask)
    return None if padding is None else (padding[0], _from_cu_seqlens(padding[1]))


def _from_position_ids(position_ids: torch.Tensor, batch: int):
    cu_seqlens = batch_packing(position_ids, batch).cu_seqlens
    if cu_seqlens is None:  # one sequence per row
        return _block_diagonal([position_ids.shape[-1]] * batch, position_ids.device)
    return _from_cu_seqlens(cu_seqlens)


def attend_packed(q, k, v, bias, scale: float | None, sliding_window: int | None) -> torch.Tensor:
    """Causal attention over packed tokens: q ``[N, Hq, D]``, k/v ``[N, Hkv, D]``, ``bias`` the sequences'
    ``BlockDiagonalCausalMask``; returns ``[N, Hq, D]``. Query head ``h`` reads kv head ``h // (Hq // Hkv)``."""
    fmha = _fmha()
    if sliding_window is not None:
        bias = bias.make_local_attention(sliding_window)
    tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if group == 1 or needs_grad:
        if group > 1:  # xformers' backward kernels take no grouped layout: one K/V copy per query head
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, scale=scale)[0]
    grouped = (1, tokens, kv_heads, group, head_dim)
    out = fmha.memory_efficient_attention(q.reshape(grouped), k[None, :, :, None].expand(grouped),
                                          v[None, :, :, None].expand(grouped), attn_bias=bias, scale=scale)
    return out.reshape(tokens, q_heads, head_dim)


def xformers_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                       **kwargs):
    """Attention interface entry. query ``[B, Hq, T, D]``, key/value ``[B, Hkv, S, D]``; returns
    ``([B, T, Hq, D], None)`` like every transformers attention function."""
    if dropout:
        raise ValueError(f"{ATTENTION_NAME!r} runs without attention dropout; "
                         f"the config sets attention_dropout={dropout}")
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{ATTENTION_NAME!r} cannot soft-cap the attention scores (softcap={kwargs['softcap']}); "
                         "this model needs attn_implementation='fastft' or 'eager'")
    if attention_mask is not None and attention_mask.dim() == 4:  # decoding with a KV cache
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, **kwargs)

    B, Hq, T, D = query.shape
    # [B, H, T, D] -> [B*T, H, D] token-major, the layout of packed sequences
    q = query.transpose(1, 2).reshape(B * T, Hq, D)
    k = key.transpose(1, 2).reshape(B * T, key.shape[1], D)
    v = value.transpose(1, 2).reshape(B * T, value.shape[1], D)

    unpadded = None if attention_mask is None else once_per_forward(attention_mask, "xformers-unpad", _unpadded,
                                                                      attention_mask)
    if unpadded is not None:
        keep, bias = unpadded
        packed = attend_packed(q[keep], k[keep], v[keep], bias, scaling, sliding_window)
        out = packed.new_zeros(B * T, Hq, D).index_copy(0, keep, packed)
        return out.view(B, T, Hq, D), None

    cu_seqlens = kwargs.get("cu_seq_lens_q")
    position_ids = kwargs.get("position_ids")
    if cu_seqlens is not None:  # packed batch from a padding-free collator
        bias = once_per_forward(cu_seqlens, "xformers", _from_cu_seqlens, cu_seqlens)
    elif position_ids is not None:  # packed when the positions restart, else one sequence per row
        bias = once_per_forward(position_ids, ("xformers", B), _from_position_ids, position_ids, B)
    else:
        bias = _block_diagonal([T] * B, query.device)
    return attend_packed(q, k, v, bias, scaling, sliding_window).view(B, T, Hq, D), None


def register() -> None:
    """Register "fastft_xformers" in transformers' attention and mask interfaces (idempotent, global; needs no
    xformers: the name only takes effect for models whose config selects it). The mask function is fastft's:
    None or the 2D padding mask in training, a 4D mask when decoding with a cache."""
    AttentionInterface.register(ATTENTION_NAME, xformers_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, fastft_mask)
