"""Float64 references of fastft's kernels: the math of each op written out plainly in PyTorch, independently of
the kernels, run in float64 on whatever device the inputs live on.

``fastft-doctor`` checks the kernels against these on the user's device, and the tests (``tests/test_*.py``)
check them against the same functions, so the two never disagree about what an op computes. Torch only: no
fastft, transformers, peft or bitsandbytes import here.

Two shapes of reference, as the ops need them: ``*_reference(inputs..., output_grads...)`` run the forward and
the backward (float64 autograd on float64 copies of the inputs) and return the outputs and the gradients; the
attention and LoRA references are plain forward functions of float64 tensors, differentiated by the caller.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# machine epsilon: 1 ulp at 1.0 (fp32 has 23 stored mantissa bits, fp16 10, bf16 7). Rounding to nearest is off by
# at most half of it (relative); Triton's interpreter truncates fp32 -> bf16 casts, a whole one.
EPS = {F32: 2.0**-23, F16: 2.0**-10, BF16: 2.0**-7}


def _leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    """A float64 leaf copy of ``t`` that records its gradient (None stays None)."""
    return None if t is None else t.detach().double().requires_grad_()


# ---------------------------------------------------------------------------------------------
# Elementwise and row-wise ops


def soft_cap(x, softcap):
    """Gemma 2's soft-capping ``c * tanh(x / c)`` of attention scores and final logits, as transformers writes it
    (None: no cap)."""
    return x if softcap is None else torch.tanh(x / softcap) * softcap


def rms_norm_reference(x, weight, dy, eps, unit_offset=False):
    """RMSNorm ``y = w * x / sqrt(mean(x^2) + eps)`` (Gemma's, ``unit_offset``: ``(1 + w) * ...``) without
    intermediate rounding; returns ``(y, dx, dw, xhat)``."""
    x64, w64 = _leaf(x), _leaf(weight)
    xhat = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    y = (1 + w64 if unit_offset else w64) * xhat
    y.backward(dy.double())
    return y.detach(), x64.grad, w64.grad, xhat.detach()


def rotate_half(x):
    """``[x1, x2] -> [-x2, x1]`` over the two halves of the last dimension (Llama's RoPE layout)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q, k, cos, sin, dq_embed, dk_embed):
    """RoPE of q ``[B, Hq, T, D]`` and k ``[B, Hkv, T, D]`` with ``cos``/``sin`` ``[B or 1, T, R]`` (broadcast over
    heads): the first ``R <= D`` dims of each head become ``x * cos + rotate_half(x) * sin``, the other ``D - R``
    (partial rotary, e.g. Phi-4-mini) pass through. Returns ``(q_embed, k_embed, dq, dk)``."""
    q64, k64 = _leaf(q), _leaf(k)
    c, s = cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    R = c.shape[-1]

    def rotate(x):
        return torch.cat((x[..., :R] * c + rotate_half(x[..., :R]) * s, x[..., R:]), dim=-1)

    q_embed, k_embed = rotate(q64), rotate(k64)
    torch.autograd.backward((q_embed, k_embed), (dq_embed.double(), dk_embed.double()))
    return q_embed.detach(), k_embed.detach(), q64.grad, k64.grad


def rope_tables(position_ids, head_dim, dtype, base=10000.0):
    """``(cos, sin)`` ``[B, T, D]`` in ``dtype``, as Llama's default rotary embedding builds them (equal halves)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=position_ids.device)
                               / head_dim))
    freqs = position_ids[..., None].double() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def gated_activation(gate, activation="silu"):
    """The MLP's gate activation written out: ``"silu"`` ``g / (1 + exp(-g))`` (SwiGLU), ``"gelu_tanh"``
    ``0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3)))`` (GeGLU: transformers' ``gelu_pytorch_tanh``, Gemma)."""
    if activation == "silu":
        return gate / (1 + torch.exp(-gate))
    if activation == "gelu_tanh":
        return 0.5 * gate * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (gate + 0.044715 * gate ** 3)))
    raise ValueError(f"unknown activation {activation!r}")


def swiglu_reference(gate, up, grad_out, activation="silu"):
    """``act(gate) * up`` (:func:`gated_activation`); returns ``(out, d_gate, d_up)``."""
    g64, u64 = _leaf(gate), _leaf(up)
    out = gated_activation(g64, activation) * u64
    out.backward(grad_out.double())
    return out.detach(), g64.grad, u64.grad


# ---------------------------------------------------------------------------------------------
# Losses over the vocabulary


def cross_entropy_reference(logits, labels, reduction, grad_output, ignore_index=-100, softcap=None):
    """Cross-entropy of ``[N, V]`` logits (with ``softcap``: of :func:`soft_cap`'s ``c * tanh(logits / c)``, Gemma 2's
    final logits), ``ignore_index`` labels ignored; with ``reduction="mean"`` and every label ignored the loss is 0
    (fastft's convention; PyTorch gives NaN). Returns ``(loss, dlogits)``."""
    x = _leaf(logits)
    n_valid = int((labels != ignore_index).sum())
    if reduction == "mean" and n_valid == 0:
        loss = (x * 0).sum()
    else:
        loss = F.cross_entropy(soft_cap(x, softcap), labels.long(), ignore_index=ignore_index, reduction=reduction)
    loss.backward(grad_output.double())
    return loss.detach(), x.grad


def linear_cross_entropy_reference(hidden, weight, labels, reduction, grad_output, softcap=None):
    """``cross_entropy(hidden @ weight.T, labels)`` (-100 ignored; with ``softcap``, of the capped logits), the
    logits materialised in float64. Returns ``(loss, dhidden, dweight)``."""
    h, w = _leaf(hidden), _leaf(weight)
    loss = F.cross_entropy(soft_cap(h @ w.T, softcap), labels, ignore_index=-100, reduction=reduction)
    loss.backward(grad_output.double())
    return loss.detach(), h.grad, w.grad


def linear_log_probs_reference(hidden, weight, bias, labels, grad_log_probs, grad_entropy=None, *,
                               temperature=1.0, logit_scale=1.0, softcap=None, ignore_index=-100):
    """TRL's per-token statistics of ``z = (hidden @ weight.T + bias) * logit_scale / temperature`` (with a
    ``softcap`` c, TRL's order for Gemma 2: ``z = c * tanh((hidden @ weight.T + bias) * logit_scale / c) /
    temperature``): the label's
    log-probability, the entropy, ``log sum p^2``, the mean logit and whether the label is the (first) argmax;
    ignored rows are 0 (False). Returns ``((log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1),
    (dhidden, dweight, dbias))`` for the loss ``sum(log_probs * grad_log_probs) + sum(entropy * grad_entropy)``
    (``dbias`` None without a bias)."""
    h, w, b = _leaf(hidden), _leaf(weight), _leaf(bias)
    z = h @ w.T
    if b is not None:
        z = z + b
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    valid = labels != ignore_index
    y = labels.clamp(min=0)
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    log_probs = torch.where(valid, log_p.gather(1, y.unsqueeze(1)).squeeze(1), 0.0)
    entropy = torch.where(valid, -(p * torch.where(p > 0, log_p, 0.0)).sum(-1), 0.0)  # 0 log 0 = 0 (-inf logits)
    loss = (log_probs * grad_log_probs.double()).sum()
    if grad_entropy is not None:
        loss = loss + (entropy * grad_entropy.double()).sum()
    loss.backward()
    with torch.no_grad():
        log_sum_sq = torch.where(valid, (p * p).sum(-1).log(), 0.0)
        mean_logits = torch.where(valid, z.mean(-1), 0.0)
        is_top1 = (z.argmax(-1) == y) & valid  # torch.argmax returns the first maximum
    grads = (h.grad, w.grad, None if b is None else b.grad)
    return (log_probs.detach(), entropy.detach(), log_sum_sq, mean_logits, is_top1), grads


# ---------------------------------------------------------------------------------------------
# NF4 and LoRA


def nf4_reference(w) -> torch.Tensor:
    """A bitsandbytes NF4 weight from the definition, in float64: value = ``code[nibble] * absmax[block]``, two
    nibbles per byte (the high one first), blocks of ``blocksize`` over the flattened row-major weight; with double
    quantization ``absmax = nested_code[absmax_code] * nested_absmax[block of nested_blocksize] + offset``.

    ``w`` has the fields of :class:`fastft.kernels.nf4.NF4Weight` (``packed``, ``absmax``, ``code``, ``blocksize``,
    ``shape``; ``nested_absmax``, ``nested_code``, ``nested_blocksize``, ``offset`` when ``absmax`` is uint8)."""
    absmax = w.absmax.double()
    if w.absmax.dtype == torch.uint8:
        scales = w.nested_absmax.double().repeat_interleave(w.nested_blocksize)[: absmax.numel()]
        offset = w.offset.double().reshape(()) if isinstance(w.offset, torch.Tensor) else float(w.offset)
        absmax = w.nested_code.double()[w.absmax.long()] * scales + offset
    n = w.shape[0] * w.shape[1]
    byte = w.packed.reshape(-1).long()
    nibbles = torch.stack([byte >> 4, byte & 15], dim=1).reshape(-1)[:n]
    return (w.code.double()[nibbles] * absmax.repeat_interleave(w.blocksize)[:n]).reshape(w.shape)


def lora_projection_reference(x, weight, bias, A, B, scaling, multipliers=None):
    """One frozen linear layer plus LoRA on float64 tensors: ``x @ W.T (+ bias) + s * ((M * x) @ A.T) @ B.T``, ``M``
    the dropout multipliers (``1 / (1 - p)`` kept, 0 dropped; None: no dropout); ``A = B = None``: no adapter."""
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    if A is not None:
        dropped = x if multipliers is None else x * multipliers
        y = y + scaling * (dropped @ A.T) @ B.T
    return y


def lora_mlp_reference(x, gate, up, down, activation="silu"):
    """Llama's MLP with LoRA on float64 tensors: ``down(silu(gate(x)) * up(x))`` (Gemma's GeGLU with
    ``activation="gelu_tanh"``), each projection a tuple of :func:`lora_projection_reference`'s arguments after
    ``x``."""
    g, u = lora_projection_reference(x, *gate), lora_projection_reference(x, *up)
    return lora_projection_reference(gated_activation(g, activation) * u, *down)


def lora_mlp_gate_up_reference(x, gate_up, down):
    """Phi-3's MLP with LoRA on float64 tensors: ``[g | u] = gate_up(x)`` (the first half of the columns the gate),
    then ``down(silu(g) * u)``."""
    g, u = lora_projection_reference(x, *gate_up).chunk(2, dim=-1)
    return lora_projection_reference(gated_activation(g) * u, *down)


def moe_experts_reference(x, index, weights, gate_up, down):
    """The routed experts' MLPs with LoRA on float64 tensors: every (token, slot) through its expert's
    ``down(silu(gate_up(x)))``, weighted by its routing weight and summed per token. ``gate_up`` / ``down``: ``(W [E,
    out, in], A [E, r, in], B [E, out, r], scaling)``; ``index`` / ``weights``: ``[T, k]``. One expert at a time (no
    ``[T, k, out, in]`` gather of the weights)."""
    out = torch.zeros_like(x)
    for e in range(gate_up[0].shape[0]):
        tokens, slots = (index == e).nonzero(as_tuple=True)
        if tokens.numel():
            (W, A, B, s), h = gate_up, x[tokens]
            g, u = lora_projection_reference(h, W[e], None, A[e], B[e], s).chunk(2, dim=-1)
            (W, A, B, s), h = down, gated_activation(g) * u
            y = lora_projection_reference(h, W[e], None, A[e], B[e], s)
            out = out.index_add(0, tokens, weights[tokens, slots, None] * y)
    return out


# ---------------------------------------------------------------------------------------------
# Attention


def softmax_with_empty_rows(scores, allowed):
    """Explicit softmax over the last axis, restricted to ``allowed``; a row with nothing allowed is 0 (as in
    flash-attn and PyTorch's SDPA)."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(scores - row_max) * allowed
    denom = e.sum(dim=-1, keepdim=True)
    return e / torch.where(denom > 0, denom, torch.ones_like(denom))


def dense_mask(seqlen_q, seqlen_k, causal, window, device=None):
    """``allowed[i, j]``: query ``i`` (at key position ``i + S - T``: causal masks align bottom-right) may attend key
    ``j``; a sliding ``window`` keeps ``i - j < window`` (transformers: kv_idx > q_idx - sliding_window)."""
    i = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=device)[None, :]
    allowed = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= (i - j) < window
    return allowed


def attention_reference(q, k, v, causal, scale, window, softcap=None):
    """Attention on float64 q ``[B, Hq, T, D]``, k/v ``[B, Hkv, S, D]``: the full score matrix (soft-capped after the
    scale, with ``softcap``), an explicit mask and softmax; grouped-query attention by repeating k/v (query head
    ``h`` reads kv head ``h // (Hq // Hkv)``)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = soft_cap((q @ k.transpose(-1, -2)) * scale, softcap)
    p = softmax_with_empty_rows(scores, dense_mask(q.shape[2], k.shape[2], causal, window, q.device))
    return p @ v


def attention_varlen_reference(q, k, v, cu_seqlens, causal, scale, window, softcap=None):
    """Attention over packed sequences on float64 q ``[N, Hq, D]``, k/v ``[N, Hkv, D]``: the whole pack with a
    block-diagonal mask from ``cu_seqlens`` (int32 boundaries), positions restarting in each sequence."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_id = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths.to(q.device))
    pos = torch.arange(q.shape[0], device=q.device) - cu_seqlens[:-1].long().to(q.device)[seq_id]
    allowed = seq_id[:, None] == seq_id[None, :]
    if causal:
        allowed &= pos[None, :] <= pos[:, None]
    if window is not None:
        allowed &= (pos[:, None] - pos[None, :]) < window
    group = q.shape[1] // k.shape[1]
    qh = q.transpose(0, 1)  # [Hq, N, D]
    kh = k.transpose(0, 1).repeat_interleave(group, dim=0)
    vh = v.transpose(0, 1).repeat_interleave(group, dim=0)
    p = softmax_with_empty_rows(soft_cap((qh @ kh.transpose(-1, -2)) * scale, softcap), allowed)
    return (p @ vh).transpose(0, 1)
