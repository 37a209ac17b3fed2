"""fastft's attention, registered through transformers' attention and mask interfaces as "fastft".

transformers builds the attention mask once per forward through ``AttentionMaskInterface`` and calls the
attention through ``AttentionInterface`` (both keyed by ``config._attn_implementation``). fastft
registers a function in each:

* the mask function returns what a flash-attention kernel wants: ``None`` for a plain causal batch, the
  2D boolean padding mask ``[B, S]`` for a padded batch (the attention un-pads it into packed
  sequences), and a full 4D boolean mask only when decoding with a KV cache (queries offset from keys),
  where the attention falls back to PyTorch SDPA -- generation speed is not this kernel's job;
* the attention function routes a batch to ``fastft.kernels.attention`` (dense causal),
  ``attention_varlen`` (padded batches, and packed batches described by ``cu_seq_lens_q`` from
  padding-free collators or by restarting ``position_ids``), or SDPA with the 4D mask.

Which attention a model gets (``patch_model(attn_implementation=None)``, :func:`choose_attention`): this
kernel where it serves the model on the device; else, on a GPU (below sm_80, or a head size the kernel lacks),
xformers' kernel ("fastft_xformers", ``xformers_attention.py``, same mask function) when it can run there;
else PyTorch SDPA. A model whose scores are soft-capped (Gemma 2) gets only attentions that cap them: this kernel,
else transformers' "eager" one (neither SDPA nor xformers can).
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .kernels._common import torch_at_least
from .kernels.attention import attention, attention_varlen

logger = logging.getLogger("fastft")
ATTENTION_NAME = "fastft"
SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)


def fastft_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """Mask interface entry: None / 2D padding mask for training-shaped calls, 4D bool mask when decoding.

    A 2D mask is sliced as ``flash_attention_mask`` does; its padding metadata (:func:`padding_metadata`, one
    sync) is computed here, once per forward, and memoised on the returned mask for every layer. A mask
    without padding gives None (dense causal attention)."""
    decoding = int(q_offset) != 0 or int(kv_offset) != 0 or q_length != kv_length
    if decoding:
        kwargs["allow_is_causal_skip"] = False
        return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask, **kwargs)
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and once_per_forward(attention_mask, "unpad", padding_metadata,
                                                                 attention_mask) is None:
        return None
    return attention_mask


def once_per_forward(source: torch.Tensor, key, compute, *args):
    """``compute(*args)``, memoised on ``source`` under ``key``: the mask / position_ids tensor that every
    decoder layer of one forward receives as the same object. The first call derives the packing metadata
    (with a device-to-host sync), the others reuse it; an in-place change of ``source`` (its version
    counter) recomputes it."""
    memo = source.__dict__.setdefault("_fastft_memo", {})
    entry = memo.get(key)
    if entry is None or entry[0] != source._version:
        entry = memo[key] = (source._version, compute(*args))
    return entry[1]


def remember(source: torch.Tensor, key, value) -> None:
    """Memoise ``value`` as :func:`once_per_forward` would have computed it (for metadata known on the host)."""
    source.__dict__.setdefault("_fastft_memo", {})[key] = (source._version, value)


def _has_cuda_nonzero_static(version: str) -> bool:
    """``nonzero_static`` got its CUDA kernel in torch 2.6 (pytorch#141838); before, only CPU and meta have one."""
    return torch_at_least(version, 2, 6)


# device types without nonzero_static: there ``nonzero``, one more sync
NO_NONZERO_STATIC = set() if _has_cuda_nonzero_static(torch.__version__) else {"cuda"}


def true_indices(flags: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` nonzero entries of 1-D ``flags``, with no sync where torch can size the result
    from ``count``."""
    if flags.device.type in NO_NONZERO_STATIC:
        return flags.nonzero().flatten()
    return flags.nonzero_static(size=count).flatten()


def longest_sequence(cu_seqlens: torch.Tensor) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def padding_metadata(attention_mask: torch.Tensor):
    """``(keep, cu_seqlens, max_seqlen)`` of a 2D padding mask: flat indices of the real tokens, int32
    boundaries of each row's real tokens once packed, the longest row; None when nothing is padded.

    One sync: the token count and the longest row are read together (``keep`` needs the count as its size,
    the kernel's grid the longest row); :func:`true_indices` then gathers the indices without another."""
    lengths = attention_mask.sum(-1)
    total, longest = torch.stack([lengths.sum(), lengths.max()]).tolist()
    if total == attention_mask.numel():
        return None
    keep = true_indices(attention_mask.flatten(), total)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return keep, cu_seqlens, longest


class Packing(NamedTuple):
    """Sequences of a batch described by restarting position_ids: int32 ``cu_seqlens`` over the flattened
    ``[B*T]`` tokens (None when no row holds more than one sequence), the longest sequence, the largest
    position (what RoPE sees: the length check's)."""

    cu_seqlens: torch.Tensor | None
    max_seqlen: int
    largest_position: int


def packing_metadata(position_ids: torch.Tensor) -> Packing:
    """:class:`Packing` of ``[B, T]`` position_ids: a new sequence starts at every row start and wherever the
    position does not follow the previous one by 1.

    One sync: the number of sequences (the size of ``cu_seqlens``), the longest one (the kernel's grid) and
    the largest position are read together; :func:`true_indices` then finds the starts without another."""
    if position_ids.numel() == 0:
        return Packing(None, 0, -1)
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = torch.diff(position_ids, dim=-1) != 1
    starts = starts.flatten()
    index = torch.arange(starts.numel(), device=starts.device)
    # each token's distance from the start of its sequence: the longest sequence is the largest, plus one
    from_start = index - torch.where(starts, index, 0).cummax(0).values
    n_seqs, longest, largest = torch.stack([starts.sum(), from_start.max() + 1, position_ids.max().long()]).tolist()
    if n_seqs == position_ids.shape[0]:
        return Packing(None, longest, largest)
    start_idx = true_indices(starts, n_seqs)
    cu_seqlens = torch.cat([start_idx, start_idx.new_full((1,), starts.numel())]).to(torch.int32)
    return Packing(cu_seqlens, longest, largest)


def batch_packing(position_ids: torch.Tensor, batch_size: int) -> Packing:
    """:func:`packing_metadata` of ``position_ids`` (``[B, T]`` or ``[1, T]`` for every row), once per forward."""
    return once_per_forward(position_ids, ("packed", batch_size), packing_metadata,
                            position_ids.expand(batch_size, -1))


def plain_position_ids(batch_size: int, length: int, device) -> torch.Tensor:
    """``[[0, 1, .., length - 1]]``, the position_ids transformers makes for a batch without them (and without
    a cache), already known to hold one sequence per row: no sync to find out."""
    position_ids = torch.arange(length, device=device).unsqueeze(0)
    remember(position_ids, ("packed", batch_size), Packing(None, length, length - 1))
    return position_ids


def _varlen(query, key, value, cu_seqlens, max_seqlen, scaling, sliding_window, softcap):
    # [B, H, T, D] -> [B*T, H, D] token-major, the layout of packed sequences.
    B, Hq, T, D = query.shape
    q = query.transpose(1, 2).reshape(B * T, Hq, D)
    k = key.transpose(1, 2).reshape(B * T, key.shape[1], D)
    v = value.transpose(1, 2).reshape(B * T, value.shape[1], D)
    out = attention_varlen(q, k, v, cu_seqlens, max_seqlen, causal=True, scale=scaling, sliding_window=sliding_window,
                           softcap=softcap)
    return out.view(B, T, Hq, D)


def _softcapped_masked_attention(query, key, value, mask, scaling, softcap):
    """Decoding with a cache under a soft-cap (SDPA has none): ``[B, H, T, D]`` in, ``[B, T, H, D]`` out, ``mask`` the
    boolean 4D mask (True: attend). The math of transformers' eager attention: scores in the inputs' dtype, the
    softmax in fp32."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = torch.tanh(query @ key.transpose(-1, -2) * scaling / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return (probs @ value).transpose(1, 2)


def fastft_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                     softcap=None, **kwargs):
    """Attention interface entry. query ``[B, Hq, T, D]``, key/value ``[B, Hkv, S, D]``; returns
    ``([B, T, Hq, D], None)`` like every transformers attention function. ``softcap``: Gemma 2's soft-capping of the
    scores (``attn_logit_softcapping``)."""
    if dropout:
        raise ValueError(f"fastft's attention kernel has no attention dropout; "
                         f"the config sets attention_dropout={dropout}")
    if attention_mask is not None and attention_mask.dim() == 4:
        if softcap is not None:
            return _softcapped_masked_attention(query, key, value, attention_mask, scaling, softcap), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, **kwargs)

    B, Hq, T, D = query.shape
    padding = None
    if attention_mask is not None:
        padding = once_per_forward(attention_mask, "unpad", padding_metadata, attention_mask)
    # The host syncs of a forward here: padding_metadata / packing_metadata read their metadata once (fastft_mask or
    # the length check, before the first layer), and attention_varlen reads a cu_seqlens tensor back once to
    # validate it (kernels/attention.py); every layer and the checkpointed recomputation reuse both.
    if padding is not None:
        # Padded batch: gather the real tokens into packed sequences, attend, scatter back (pads get 0).
        keep, cu_seqlens, max_seqlen = padding
        q = query.transpose(1, 2).reshape(B * T, Hq, D)[keep]
        k = key.transpose(1, 2).reshape(B * T, key.shape[1], D)[keep]
        v = value.transpose(1, 2).reshape(B * T, value.shape[1], D)[keep]
        packed = attention_varlen(q, k, v, cu_seqlens, max_seqlen, causal=True, scale=scaling,
                                  sliding_window=sliding_window, softcap=softcap)
        out = packed.new_zeros(B * T, Hq, D).index_copy(0, keep, packed)
        return out.view(B, T, Hq, D), None

    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is not None:  # packed batch from a padding-free collator
        max_seqlen = kwargs.get("max_length_q")
        if max_seqlen is None:  # (the kernel's grid needs it on the host: one sync per forward)
            max_seqlen = once_per_forward(cu_seqlens, "max", longest_sequence, cu_seqlens)
        return _varlen(query, key, value, cu_seqlens.to(torch.int32), int(max_seqlen), scaling, sliding_window,
                       softcap), None
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        packing = batch_packing(position_ids, B)
        if packing.cu_seqlens is not None:
            return _varlen(query, key, value, packing.cu_seqlens, packing.max_seqlen, scaling, sliding_window,
                           softcap), None

    out = attention(query, key, value, causal=True, scale=scaling, sliding_window=sliding_window, softcap=softcap)
    return out.transpose(1, 2), None


def register() -> None:
    """Register "fastft" and "fastft_xformers" in transformers' attention and mask interfaces (idempotent,
    global: a name only takes effect for models whose config selects it)."""
    from . import xformers_attention  # imported here: that module builds on this one

    AttentionInterface.register(ATTENTION_NAME, fastft_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, fastft_mask)
    xformers_attention.register()


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def fastft_attention_supported(config, device: torch.device) -> str | None:
    """None when fastft's attention kernel serves this model on this device, else the reason it cannot."""
    head_dim = _head_dim(config)
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim={head_dim} (the kernel serves {SUPPORTED_HEAD_DIMS})"
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        # Triton's tl.dot has no tensor-core path below sm80: xformers' or SDPA's kernels are faster there.
        return (f"compute capability {torch.cuda.get_device_capability(device)} < 8.0 "
                "(Triton's tl.dot runs without tensor cores)")
    if getattr(config, "attention_dropout", 0.0):
        return f"attention_dropout={config.attention_dropout}"
    return None


def choose_attention(config, device: torch.device, dtype: torch.dtype) -> tuple[str, str | None]:
    """The attention ``attn_implementation=None`` picks, and the log line saying which and why (None when it is
    fastft's kernel): fastft's kernel where it serves the model on this device; else, on a GPU, xformers'
    memory-efficient kernel when it is installed and can run there (it takes packed and padded batches without a
    dense mask); else PyTorch SDPA."""
    from . import xformers_attention

    reason = fastft_attention_supported(config, device)
    if reason is None:
        return ATTENTION_NAME, None
    dropout = getattr(config, "attention_dropout", 0.0)
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:  # only transformers' eager attention caps the scores too
        return "eager", (f"fastft: attention runs on transformers' eager attention (the scores are soft-capped, "
                         f"attn_logit_softcapping={softcap}, which SDPA and xformers cannot do), not fastft's kernel: "
                         f"{reason}")
    if dropout:  # neither kernel has attention dropout
        reason = f"attention_dropout={dropout}"
    elif device.type == "cuda":
        why_not = xformers_attention.unavailable_reason(device, dtype, _head_dim(config))
        if why_not is None:
            return xformers_attention.ATTENTION_NAME, (
                f"fastft: attention runs on xformers' memory-efficient kernel ({xformers_attention.ATTENTION_NAME!r}), "
                f"not fastft's: {reason}")
        reason = f"{reason}; not on xformers either: {why_not}"
    return "sdpa", f"fastft: attention runs on PyTorch SDPA, not fastft's kernel: {reason}"


def resolve_attention(config, device: torch.device, dtype: torch.dtype, attn_implementation: str | None,
                      disabled: bool = False) -> str:
    """``attn_implementation`` as given to ``patch_model``: None routes (:func:`choose_attention`, logged);
    "fastft_xformers" is checked to run here, so a wrong choice fails at load time, not in the first forward.
    ``disabled`` (the "attention" kernel name disabled): PyTorch SDPA (eager for soft-capped scores) instead of
    fastft's attention or its xformers route; another implementation named explicitly (e.g. "eager") is kept."""
    from . import xformers_attention

    softcap = getattr(config, "attn_logit_softcapping", None)
    if disabled and attn_implementation in (None, ATTENTION_NAME, xformers_attention.ATTENTION_NAME):
        return "sdpa" if softcap is None else "eager"  # only eager soft-caps the scores too
    if attn_implementation is None:
        attn_implementation, log_line = choose_attention(config, device, dtype)
        if log_line is not None:
            logger.warning(log_line)
    elif softcap is not None and attn_implementation not in (ATTENTION_NAME, "eager"):
        raise ValueError(f"attn_implementation={attn_implementation!r} cannot soft-cap the attention scores this model "
                         f"needs (attn_logit_softcapping={softcap}); use attn_implementation=None, 'fastft' or 'eager'")
    elif attn_implementation == xformers_attention.ATTENTION_NAME:
        why_not = xformers_attention.unavailable_reason(device, dtype, _head_dim(config))
        if why_not is not None:
            raise ValueError(f"attn_implementation={attn_implementation!r} cannot run on {device} in {dtype}: "
                             f"{why_not}; use attn_implementation=None to let fastft choose")
    return attn_implementation
