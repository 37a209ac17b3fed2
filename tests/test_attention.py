"""Flash attention (kernels/attention.py) against an independent float64 reference (fastft.doctor.references,
which fastft-doctor checks the kernel against on a GPU).

The reference materialises the full score matrix, applies an explicit mask (causal bottom-right,
sliding window, block-diagonal for packed sequences) and an explicit softmax, and gets dq/dk/dv
from float64 autograd. Grouped-query attention is done there by repeating k/v (the kernel never
does). Rows that see no key are defined as 0, as in flash-attn and PyTorch's SDPA.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import triton
import triton.language as tl
from kernel_testing import assert_close

from fastft.doctor.references import attention_reference, attention_varlen_reference, dense_mask
from fastft.kernels import use_engine
from fastft.kernels.attention import attention, attention_varlen

# the module, not the function of the same name that fastft.kernels re-exports
attention_module = importlib.import_module("fastft.kernels.attention")

# Tolerances, for O(1) random inputs (outputs and gradients are O(0.1..10)):
# - fp32: the kernel computes in fp32 with exact (ieee) fp32 dots; observed errors are <= 2e-6
#   (sums of a few hundred terms); 1e-5 leaves 5x room and still catches any mask, scale or
#   gradient-term bug (those show as errors > 1e-2).
# - fp16: inputs are fp16 in both; the kernel rounds P and dS to fp16 for the tensor-core dots
#   (rel. 2^-11 = 4.9e-4 each) and rounds the result to fp16; observed max errors ~1e-3 on
#   values of size ~2 and 4e-3 on dv of size ~10, so atol = rtol = 3e-3 (about 6 fp16 ulps at 1).
# - bf16 (interpreter: tiles upcast to fp32 before tl.dot, see _mma_operand): only the stores
#   round, and the interpreter truncates instead of rounding, so up to 1 bf16 ulp
#   (2^-7 = 7.8e-3 relative) per stored value plus fp32 noise: atol = rtol = 1.6e-2 (2 ulps).
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def _run_and_compare(fn, ref_fn, q, k, v, dtype, tol=None):
    """Forward + backward of `fn` in `dtype` vs `ref_fn` in float64 on the same (rounded) inputs."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out.backward(grad_out)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_out = ref_fn(*ref_leaves)
    ref_out.backward(grad_out.double())

    tol = tol or TOLERANCES[dtype]
    assert out.dtype == dtype
    assert_close(out, ref_out, name="out", **tol)
    for name, leaf, ref in zip(("dq", "dk", "dv"), leaves, ref_leaves):
        assert_close(leaf.grad, ref.grad, name=name, **tol)


def _randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# Dense batches, Triton path (interpreted)
# ----------------------------------------------------------------------------------------------
DENSE_CASES = [
    # B, Hq, Hkv, T, S, D, causal, window, dtype
    pytest.param(1, 2, 2, 1, 1, 16, True, None, torch.float32, id="T1-gqa1"),
    pytest.param(2, 4, 1, 17, 17, 64, True, None, torch.float32, id="T17-gqa4-D64"),
    pytest.param(1, 7, 1, 17, 17, 32, True, None, torch.float16, id="T17-gqa7-fp16"),
    pytest.param(1, 4, 2, 23, 40, 80, False, None, torch.float32, id="noncausal-T<S-D80"),
    pytest.param(1, 2, 1, 40, 23, 80, False, None, torch.float16, id="noncausal-T>S-D80-fp16"),
    pytest.param(1, 2, 1, 23, 70, 32, True, None, torch.float32, id="causal-T<S-bottom-right"),
    pytest.param(1, 2, 1, 40, 23, 32, True, None, torch.float32, id="causal-T>S-empty-rows"),
    pytest.param(1, 2, 1, 37, 37, 96, True, None, torch.bfloat16, id="bf16-D96"),
    pytest.param(1, 2, 1, 17, 17, 128, True, None, torch.float16, id="fp16-D128"),
    pytest.param(2, 3, 1, 70, 70, 32, True, 9, torch.float32, id="window9"),
    pytest.param(1, 2, 1, 50, 90, 64, True, 40, torch.bfloat16, id="window40-T<S-bf16"),
    pytest.param(1, 2, 2, 50, 70, 32, False, 20, torch.float32, id="window20-noncausal"),
    pytest.param(1, 2, 1, 300, 300, 64, True, None, torch.float16, id="T300-fp16"),
]


@pytest.mark.parametrize("B, Hq, Hkv, T, S, D, causal, window, dtype", DENSE_CASES)
def test_attention_matches_reference(B, Hq, Hkv, T, S, D, causal, window, dtype):
    torch.manual_seed(0)
    q, k, v = _randn(B, Hq, T, D), _randn(B, Hkv, S, D), _randn(B, Hkv, S, D)
    scale = 1.0 / math.sqrt(D)
    _run_and_compare(
        lambda q, k, v: attention(q, k, v, causal=causal, sliding_window=window),
        lambda q, k, v: attention_reference(q, k, v, causal, scale, window),
        q, k, v, dtype,
    )


# Gemma: head size 256 and soft-capped scores (Gemma 2: c = 50, scale = query_pre_attn_scalar**-0.5, not D**-0.5).
# Inputs scaled so the scores reach the cap's bend (|scale * q.k| ~ c) and its flat part, where a missing
# (1 - tanh^2) in the backward would show; few tokens: head 256 is slow in the interpreter.
# fp32 tolerance: scores of size ~c carry an absolute fp32 error of ~c * 2^-23 * (a few ulp of tanh, the dot's
# rounding): ~2e-5 at c = 50, which P = exp(s - lse) turns into a relative error of the same size in every output
# and gradient; 1e-4 leaves 5x room (a missing slope or a wrong scale moves them by > 1e-2). 16-bit: as above.
SOFTCAP_FP32_TOL = dict(atol=1e-4, rtol=1e-4)
SOFTCAP_CASES = [
    # B, Hq, Hkv, T, S, D, causal, window, softcap, input std, dtype
    pytest.param(1, 2, 1, 19, 19, 256, True, None, None, 1.0, torch.float32, id="D256"),
    pytest.param(1, 4, 2, 21, 21, 256, True, 6, 50.0, 9.0, torch.float32, id="D256-window6-cap50"),
    pytest.param(2, 2, 1, 13, 29, 64, True, None, 5.0, 3.0, torch.float32, id="T<S-cap5"),
    pytest.param(1, 2, 2, 23, 17, 80, False, None, 2.0, 2.0, torch.float16, id="noncausal-cap2-fp16"),
    # 16-bit: inputs of size 1 (larger ones make dS = P (dP - delta) cancel on the rounded O's delta, an error of
    # the input scale that any flash attention has); a cap of 2 bends the scores at that size
    pytest.param(1, 2, 1, 17, 17, 256, True, None, 2.0, 1.0, torch.bfloat16, id="D256-cap2-bf16"),
    pytest.param(1, 4, 2, 18, 18, 256, True, 7, 2.0, 1.0, torch.float16, id="D256-window7-cap2-fp16"),
]


@pytest.mark.parametrize("B, Hq, Hkv, T, S, D, causal, window, softcap, std, dtype", SOFTCAP_CASES)
def test_attention_softcap_and_head_256_match_reference(B, Hq, Hkv, T, S, D, causal, window, softcap, std, dtype):
    torch.manual_seed(0)
    q, k, v = std * _randn(B, Hq, T, D), std * _randn(B, Hkv, S, D), _randn(B, Hkv, S, D)
    scale = 256 ** -0.5  # Gemma's query_pre_attn_scalar**-0.5
    _run_and_compare(
        lambda q, k, v: attention(q, k, v, causal=causal, scale=scale, sliding_window=window, softcap=softcap),
        lambda q, k, v: attention_reference(q, k, v, causal, scale, window, softcap),
        q, k, v, dtype, SOFTCAP_FP32_TOL if dtype == torch.float32 and softcap is not None else None,
    )


def test_attention_varlen_softcap_head_256():
    torch.manual_seed(0)
    lengths = [3, 17, 1, 9]
    cu_seqlens, n = _cu_seqlens(lengths), sum(lengths)
    q, k, v = 8 * _randn(n, 4, 256), 8 * _randn(n, 2, 256), _randn(n, 2, 256)
    _run_and_compare(
        lambda q, k, v: attention_varlen(q, k, v, cu_seqlens, max(lengths), scale=1 / 16, sliding_window=5,
                                         softcap=50.0),
        lambda q, k, v: attention_varlen_reference(q, k, v, cu_seqlens, True, 1 / 16, 5, 50.0),
        q, k, v, torch.float32, SOFTCAP_FP32_TOL,
    )


@pytest.mark.parametrize("engine", ["torch", "triton"])
def test_softcap_changes_the_result_and_is_checked(engine):
    """The cap matters at these inputs (so the comparisons above can fail), and a bad cap is refused."""
    torch.manual_seed(1)
    q, k, v = 9 * torch.randn(1, 2, 11, 64), 9 * torch.randn(1, 1, 11, 64), torch.randn(1, 1, 11, 64)
    with use_engine(engine):
        capped = attention(q, k, v, scale=0.125, softcap=20.0)
        plain = attention(q, k, v, scale=0.125)
        assert (capped - plain).abs().max() > 0.1
        assert_close(capped, attention_reference(q.double(), k.double(), v.double(), True, 0.125, None, 20.0).float(),
                     name="capped", **TOLERANCES[torch.float32])
        for bad in (0.0, -1.0, float("inf"), True):
            with pytest.raises(ValueError, match="softcap must be None or a positive finite number"):
                attention(q, k, v, softcap=bad)


def test_attention_small_blocks_multi_block_masking(monkeypatch):
    """Tiny tiles make every kernel walk many blocks: masked window edge, unmasked middle, masked
    diagonal and a partial last block all in one call, with BLOCK_M != BLOCK_N."""
    def tiny_blocks(head_dim, kernel, dtype, device):
        block_m, block_n = {"fwd": (16, 32), "dkdv": (32, 16), "dq": (16, 32)}[kernel]
        return dict(BLOCK_D=triton_next_pow2(head_dim), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=1)

    monkeypatch.setattr(attention_module, "_block_sizes", tiny_blocks)
    torch.manual_seed(0)
    q, k, v = _randn(1, 4, 75, 16), _randn(1, 2, 99, 16), _randn(1, 2, 99, 16)
    _run_and_compare(
        lambda q, k, v: attention(q, k, v, causal=True, sliding_window=37),
        lambda q, k, v: attention_reference(q, k, v, True, 0.25, 37),
        q, k, v, torch.float32,
    )


def triton_next_pow2(n):
    return 1 << (n - 1).bit_length()


def test_attention_strided_inputs_and_custom_scale():
    """Hugging Face hands q/k/v as transpose(1, 2) views of [B, T, H, D] slices of one projection."""
    torch.manual_seed(0)
    B, T, D = 2, 33, 80
    fused = _randn(B, T, 4 + 1 + 1, D)
    q = fused[:, :, :4].transpose(1, 2)
    k = fused[:, :, 4:5].transpose(1, 2)
    v = fused[:, :, 5:].transpose(1, 2)
    assert not q.is_contiguous()
    _run_and_compare(
        lambda q, k, v: attention(q, k, v, causal=True, scale=0.3),
        lambda q, k, v: attention_reference(q, k, v, True, 0.3, None),
        q, k, v, torch.float32,
    )


def test_attention_output_keeps_query_layout():
    """Output (and gradients) are allocated in q's memory order, so the caller's
    transpose(1, 2).reshape(B, T, H * D) needs no copy."""
    q = torch.randn(1, 5, 2, 16).transpose(1, 2)
    k = torch.randn(1, 5, 1, 16).transpose(1, 2)
    out = attention(q, k, k)
    assert out.transpose(1, 2).is_contiguous()
    assert_close(out, attention_reference(q.double(), k.double(), k.double(), True, 0.25, None),
                 name="out", **TOLERANCES[torch.float32])


# ----------------------------------------------------------------------------------------------
# Packed variable-length sequences, Triton path
# ----------------------------------------------------------------------------------------------
def _cu_seqlens(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


VARLEN_CASES = [
    # lengths, Hq, Hkv, D, causal, window, dtype
    pytest.param([1, 5, 64, 129], 4, 1, 64, True, None, torch.float32, id="causal-gqa4"),
    pytest.param([1, 5, 64, 129], 2, 2, 80, True, None, torch.float16, id="causal-D80-fp16"),
    pytest.param([129, 1, 64, 5], 7, 1, 32, False, None, torch.bfloat16, id="noncausal-gqa7-bf16"),
    pytest.param([5, 100, 1, 37], 2, 1, 64, True, 16, torch.float32, id="window16"),
]


@pytest.mark.parametrize("lengths, Hq, Hkv, D, causal, window, dtype", VARLEN_CASES)
def test_attention_varlen_matches_reference(lengths, Hq, Hkv, D, causal, window, dtype):
    torch.manual_seed(0)
    cu_seqlens = _cu_seqlens(lengths)
    total = sum(lengths)
    # q/k/v as slices of one packed projection [N, Hq + 2 Hkv, D]: strided, not contiguous
    qkv = _randn(total, Hq + 2 * Hkv, D)
    q, k, v = qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]
    scale = 1.0 / math.sqrt(D)
    max_seqlen = max(lengths) + 3  # a loose bound is allowed (extra programs exit at once)
    _run_and_compare(
        lambda q, k, v: attention_varlen(q, k, v, cu_seqlens, max_seqlen, causal=causal, sliding_window=window),
        lambda q, k, v: attention_varlen_reference(q, k, v, cu_seqlens, causal, scale, window),
        q, k, v, dtype,
    )


# ----------------------------------------------------------------------------------------------
# The tiles GPUs launch (the interpreter otherwise runs its own 64x32): every architecture's row of
# the tile table, forced here (the interpreter ignores warps and stages, and has no architecture)
# ----------------------------------------------------------------------------------------------
def _force_gpu_tiles(monkeypatch, arch):
    tile_config = attention_module._tile_config
    monkeypatch.setattr(attention_module, "_block_sizes",
                        lambda head_dim, kernel, dtype, device: tile_config(arch, head_dim, kernel, dtype))


GPU_TILE_CASES = [
    # B, Hq, Hkv, T, S, D, causal, window, dtype: odd lengths over several 128-row and 16-row blocks
    pytest.param(1, 4, 2, 300, 300, 128, True, None, torch.bfloat16, id="causal-gqa2-D128-bf16"),
    pytest.param(2, 2, 1, 150, 333, 80, True, None, torch.float16, id="causal-T<S-D80-fp16"),
    pytest.param(1, 2, 2, 270, 270, 64, True, 100, torch.float16, id="window100-D64-fp16"),
    pytest.param(1, 3, 1, 200, 140, 32, False, None, torch.bfloat16, id="noncausal-T>S-gqa3-D32-bf16"),
]


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("B, Hq, Hkv, T, S, D, causal, window, dtype", GPU_TILE_CASES)
def test_attention_with_gpu_tiles(monkeypatch, arch, B, Hq, Hkv, T, S, D, causal, window, dtype):
    _force_gpu_tiles(monkeypatch, arch)
    torch.manual_seed(0)
    q, k, v = _randn(B, Hq, T, D), _randn(B, Hkv, S, D), _randn(B, Hkv, S, D)
    _run_and_compare(
        lambda q, k, v: attention(q, k, v, causal=causal, sliding_window=window),
        lambda q, k, v: attention_reference(q, k, v, causal, 1.0 / math.sqrt(D), window),
        q, k, v, dtype,
    )


@pytest.mark.parametrize("arch", [80, 90])
def test_attention_head_256_softcap_with_gpu_tiles(monkeypatch, arch):
    """Gemma's D=256 tiles (sm_90: 128x32 forward, 16x32 dK/dV, 128x16 dQ) over several blocks, soft-capped, GQA."""
    _force_gpu_tiles(monkeypatch, arch)
    torch.manual_seed(0)
    q, k, v = _randn(1, 2, 45, 256), _randn(1, 1, 45, 256), _randn(1, 1, 45, 256)
    _run_and_compare(
        lambda q, k, v: attention(q, k, v, causal=True, scale=1 / 16, softcap=2.0, sliding_window=20),
        lambda q, k, v: attention_reference(q, k, v, True, 1 / 16, 20, 2.0),
        q, k, v, torch.float16,
    )


@pytest.mark.parametrize("arch", [80, 90])
def test_attention_varlen_with_gpu_tiles(monkeypatch, arch):
    _force_gpu_tiles(monkeypatch, arch)
    _compare_causal_varlen([1, 130, 257, 16], 4, 1, 128, torch.float16)


def _compare_causal_varlen(lengths, q_heads, kv_heads, head_dim, dtype):
    """Causal attention_varlen over packed sequences of ``lengths``, forward and backward, vs the reference."""
    torch.manual_seed(0)
    cu_seqlens, n = _cu_seqlens(lengths), sum(lengths)
    q, k, v = _randn(n, q_heads, head_dim), _randn(n, kv_heads, head_dim), _randn(n, kv_heads, head_dim)
    _run_and_compare(
        lambda q, k, v: attention_varlen(q, k, v, cu_seqlens, max(lengths), causal=True),
        lambda q, k, v: attention_varlen_reference(q, k, v, cu_seqlens, True, 1 / math.sqrt(head_dim), None),
        q, k, v, dtype,
    )


# ----------------------------------------------------------------------------------------------
# Launch order: heaviest blocks first, by sections of (batch, head) pairs
# ----------------------------------------------------------------------------------------------
@triton.jit
def _record_program_tiles(OUT, n_blocks, n_heads, section, HEAVY_LAST: tl.constexpr):
    block, head, batch = attention_module._program_tile(n_blocks, n_heads, section, HEAVY_LAST)
    pid = tl.program_id(0)
    tl.store(OUT + 3 * pid, block)
    tl.store(OUT + 3 * pid + 1, head)
    tl.store(OUT + 3 * pid + 2, batch)


@pytest.mark.parametrize("heavy_last", [True, False])
@pytest.mark.parametrize("n_blocks, n_heads, batch, section", [(5, 7, 2, 3), (4, 3, 1, 8), (1, 2, 3, 1),
                                                               (6, 4, 2, 4), (3, 5, 1, 1)])
def test_launch_order_starts_heaviest_blocks_first(heavy_last, n_blocks, n_heads, batch, section):
    """Program ids are the order GPUs start programs in. Every (block, head, batch) gets exactly one program;
    pairs (head fastest) come in sections of `section`; inside a section every pair gets its heaviest block
    (the last under HEAVY_LAST: forward, dQ; the first: dK/dV) before any pair gets its next one."""
    n = n_blocks * n_heads * batch
    out = torch.full((n, 3), -1, dtype=torch.int32)
    _record_program_tiles[(n,)](out, n_blocks, n_heads, section, heavy_last)
    tiles = [tuple(row) for row in out.tolist()]
    assert sorted(tiles) == [(blk, h, b) for blk in range(n_blocks) for h in range(n_heads) for b in range(batch)]
    pairs_in_order = []
    for start in range(0, n, section * n_blocks):
        chunk = tiles[start:start + section * n_blocks]
        width = len(chunk) // n_blocks
        ranks = [n_blocks - 1 - blk if heavy_last else blk for blk, _, _ in chunk]  # 0 = heaviest
        assert ranks == [r for r in range(n_blocks) for _ in range(width)], (start, chunk)
        assert all(chunk[i][1:] == chunk[i % width][1:] for i in range(len(chunk))), chunk  # same pairs each round
        pairs_in_order += [(b, h) for _, h, b in chunk[:width]]
    assert pairs_in_order == sorted(pairs_in_order)  # (batch, head) pairs in order, head fastest


@pytest.mark.parametrize("varlen", [False, True])
def test_attention_with_small_launch_sections(monkeypatch, varlen):
    """Sections of 3 pairs (the last one narrower) on GQA, odd lengths and packed sequences, forward and backward."""
    tile_grid = attention_module._tile_grid
    monkeypatch.setattr(attention_module, "_tile_grid", lambda *args: (tile_grid(*args)[0], 3, tile_grid(*args)[2]))
    if varlen:
        _compare_causal_varlen([5, 70, 1, 33], 4, 2, 32, torch.float32)
    else:
        torch.manual_seed(0)
        q, k, v = _randn(2, 7, 67, 32), _randn(2, 1, 67, 32), _randn(2, 1, 67, 32)
        _run_and_compare(
            lambda q, k, v: attention(q, k, v, causal=True),
            lambda q, k, v: attention_reference(q, k, v, True, 1 / math.sqrt(32), None),
            q, k, v, torch.float32,
        )


def test_launch_sections_fit_half_the_l2_cache():
    """Forward sections hold as many query heads (whole GQA groups) as keep their kv heads' K and V in half of
    the (stand-in H100's 50 MiB) L2; dK/dV sections as many kv heads as keep their groups' Q and dO there."""
    q = torch.empty(1, 32, 8192, 128, dtype=torch.bfloat16)  # Llama-3-8B at 8k tokens: K + V of a kv head 4 MiB
    k = torch.empty(1, 8, 8192, 128, dtype=torch.bfloat16)
    p = attention_module._Problem(q, k, None, None, True, 0.1, None)
    grid, section, _ = attention_module._tile_grid(p, "fwd", dict(BLOCK_M=128), q.device)
    assert grid == (64 * 32,) and section == 6 * 4  # 6 whole GQA groups: K and V of 6 kv heads, 24 MiB
    grid, section, _ = attention_module._tile_grid(p, "dkdv", dict(BLOCK_N=128), q.device)
    assert grid == (64 * 8,) and section == 1  # Q + dO of a 4-head group: 16 MiB
    small = attention_module._Problem(q[:, :, :64], k[:, :, :64], None, None, True, 0.1, None)
    assert attention_module._tile_grid(small, "dq", dict(BLOCK_M=64), q.device)[:2] == ((32,), 32)  # one section


@pytest.mark.parametrize("T, S", [(300, 300), (100, 260)])
def test_launch_direction_starts_the_most_work(T, S):
    """Under causal masking the launcher's HEAVY_LAST puts each kernel's heaviest block first: the work of a
    forward / dQ query block (key blocks it reaches) and of a dK/dV key block (query blocks), from the mask."""
    allowed = dense_mask(T, S, True, None)
    q, k = torch.empty(1, 2, T, 64), torch.empty(1, 1, S, 64)
    p = attention_module._Problem(q, k, None, None, True, 0.125, None)
    for kernel, cfg in (("fwd", dict(BLOCK_M=64)), ("dq", dict(BLOCK_M=32)), ("dkdv", dict(BLOCK_N=64))):
        _, _, heavy_last = attention_module._tile_grid(p, kernel, cfg, q.device)
        if kernel == "dkdv":  # query blocks of 16 rows (sm_90's dK/dV tile) that reach each key block
            work = [sum(bool(blk.any()) for blk in allowed[:, n:n + 64].split(16)) for n in range(0, S, 64)]
        else:
            work = [sum(bool(blk.any()) for blk in allowed[m:m + cfg["BLOCK_M"]].split(64, dim=1))
                    for m in range(0, T, cfg["BLOCK_M"])]
        in_launch_order = work[::-1] if heavy_last else work
        assert in_launch_order == sorted(in_launch_order, reverse=True) and work[0] != work[-1], (kernel, work)


# ----------------------------------------------------------------------------------------------
# PyTorch path (CPU without the interpreter)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T, S, causal, window", [(17, 17, True, None), (40, 23, True, None),
                                                   (23, 40, True, 7), (23, 40, False, 7)])
def test_attention_torch_path(T, S, causal, window):
    torch.manual_seed(0)
    q, k, v = _randn(2, 4, T, 80), _randn(2, 1, S, 80), _randn(2, 1, S, 80)
    with use_engine("torch"):
        _run_and_compare(
            lambda q, k, v: attention(q, k, v, causal=causal, sliding_window=window),
            lambda q, k, v: attention_reference(q, k, v, causal, 1 / math.sqrt(80), window),
            q, k, v, torch.float32,
        )


@pytest.mark.parametrize("window", [None, 3])
def test_attention_varlen_torch_path(window):
    torch.manual_seed(0)
    lengths = [1, 5, 64, 129]
    cu_seqlens = _cu_seqlens(lengths)
    q, k, v = _randn(sum(lengths), 4, 64), _randn(sum(lengths), 2, 64), _randn(sum(lengths), 2, 64)
    with use_engine("torch"):
        _run_and_compare(
            lambda q, k, v: attention_varlen(q, k, v, cu_seqlens, 129, sliding_window=window),
            lambda q, k, v: attention_varlen_reference(q, k, v, cu_seqlens, True, 0.125, window),
            q, k, v, torch.float32,
        )


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
def _qkv(Hq=4, Hkv=2, D=64, T=5, dtype=torch.float32):
    return (torch.randn(1, Hq, T, D, dtype=dtype), torch.randn(1, Hkv, T, D, dtype=dtype),
            torch.randn(1, Hkv, T, D, dtype=dtype))


def test_attention_rejects_bad_input():
    q, k, v = _qkv(Hq=3, Hkv=2)
    with pytest.raises(ValueError, match=r"q has 3 heads, not a multiple of the 2 heads of k"):
        attention(q, k, v)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"k has head dim 32 but q has 64"):
        attention(q, k[..., :32], v)
    with pytest.raises(ValueError, match=r"v has head dim 32 but q has 64"):
        attention(q, k, v[..., :32])
    q, k, v = _qkv(D=48)
    with pytest.raises(ValueError,
                       match=r"head dim 48 of q is not supported; supported head dims: 16, 32, 64, 80, 96, 128"):
        attention(q, k, v)
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"q has dtype float64"):
        attention(q.double(), k, v)
    with pytest.raises(TypeError, match=r"k has dtype float16 but q has float32"):
        attention(q, k.half(), v)
    with pytest.raises(TypeError, match=r"v has dtype int64"):
        attention(q, k, v.long())
    with pytest.raises(ValueError, match=r"q must be \[B, H, T, D\]"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"v has shape .* but k has"):
        attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match=r"k has batch size 2 but q has 1"):
        attention(q, torch.cat([k, k]), torch.cat([v, v]))
    with pytest.raises(ValueError, match=r"sliding_window must be None or a positive int"):
        attention(q, k, v, sliding_window=0)
    with pytest.raises(TypeError, match=r"causal must be a bool"):
        attention(q, k, v, causal=None)
    with pytest.raises(TypeError, match=r"scale must be None or a finite float"):
        attention(q, k, v, scale=float("nan"))


def test_attention_varlen_rejects_bad_input():
    q, k, v = torch.randn(10, 4, 64), torch.randn(10, 2, 64), torch.randn(10, 2, 64)
    with pytest.raises(TypeError, match=r"cu_seqlens has dtype int64; expected one of int32"):
        attention_varlen(q, k, v, torch.tensor([0, 4, 10]), 6)
    with pytest.raises(ValueError, match=r"cu_seqlens must start at 0, got cu_seqlens\[0\] = 1"):
        attention_varlen(q, k, v, torch.tensor([1, 4, 10], dtype=torch.int32), 6)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] = 9 but q has 10 tokens"):
        attention_varlen(q, k, v, torch.tensor([0, 4, 9], dtype=torch.int32), 6)
    with pytest.raises(ValueError, match=r"cu_seqlens must be non-decreasing"):
        attention_varlen(q, k, v, torch.tensor([0, 6, 4, 10], dtype=torch.int32), 6)
    with pytest.raises(ValueError, match=r"max_seqlen = 5 is smaller than the longest sequence in cu_seqlens \(6\)"):
        attention_varlen(q, k, v, torch.tensor([0, 4, 10], dtype=torch.int32), 5)
    with pytest.raises(ValueError, match=r"cu_seqlens must hold n_seqs \+ 1 >= 2 offsets"):
        attention_varlen(q, k, v, torch.tensor([0], dtype=torch.int32), 5)
    with pytest.raises(ValueError, match=r"k has 9 tokens but q has 10"):
        attention_varlen(q, k[:9], v[:9], torch.tensor([0, 4, 10], dtype=torch.int32), 6)
    with pytest.raises(ValueError, match=r"q must be \[total_tokens, H, D\]"):
        attention_varlen(q[None], k, v, torch.tensor([0, 4, 10], dtype=torch.int32), 6)
    with pytest.raises(ValueError, match=r"q has 4 heads, not a multiple of the 3 heads"):
        attention_varlen(q, torch.randn(10, 3, 64), torch.randn(10, 3, 64),
                         torch.tensor([0, 10], dtype=torch.int32), 10)

    # validation is cached per cu_seqlens tensor, but an in-place change is seen again
    cu_seqlens = torch.tensor([0, 4, 10], dtype=torch.int32)
    with use_engine("torch"):
        attention_varlen(q, k, v, cu_seqlens, 6)
        cu_seqlens[1] = 11
        with pytest.raises(ValueError, match=r"non-decreasing"):
            attention_varlen(q, k, v, cu_seqlens, 6)


def test_attention_varlen_checks_cu_seqlens_on_the_gpu_without_reading_them_back(gpu_path_on_cpu):
    """The GPU branch (run on CPU tensors here) checks a pack with a device-side assert instead of reading it back
    (a host sync per forward); a bad pack still fails, a good one gives the reference result."""
    torch.manual_seed(0)
    q, k, v = _randn(10, 4, 32).float(), _randn(10, 2, 32).float(), _randn(10, 2, 32).float()
    for bad, max_seqlen in (([1, 4, 10], 6), ([0, 4, 9], 6), ([0, 6, 4, 10], 6), ([0, 4, 10], 5)):
        with pytest.raises(RuntimeError, match=r"cu_seqlens: not from 0 to q's token count, decreasing, or a sequence"):
            attention_varlen(q, k, v, torch.tensor(bad, dtype=torch.int32), max_seqlen)
    cu_seqlens = torch.tensor([0, 4, 10], dtype=torch.int32)
    out = attention_varlen(q, k, v, cu_seqlens, 6)
    assert attention_module._check_cu_seqlens(cu_seqlens, 6, q, need_offsets=False) is None  # nothing read back
    assert_close(out, attention_varlen_reference(q, k, v, cu_seqlens, True, 1 / math.sqrt(32), None).to(out.dtype),
                 atol=1e-5, rtol=1e-5, name="out")


@pytest.mark.parametrize("varlen", [False, True])
def test_autograd_context_holds_no_input_outside_saved_tensors(varlen):
    """Under gradient checkpointing autograd drops what a Function saves with save_for_backward; anything the
    Function keeps elsewhere on its context survives every layer's forward. q (RoPE's fresh output in a
    model) must be freed once the caller drops it (it was kept alive through ctx.problem: one [T, hidden]
    tensor per layer, 8 GiB for Llama-3-8B at 32k tokens)."""
    import gc
    import weakref

    q = torch.randn(1, 4, 24, 64, requires_grad=True) * 1.0  # not a leaf: only the graph would hold it
    k = torch.randn(1, 2, 24, 64, requires_grad=True)
    v = torch.randn(1, 2, 24, 64, requires_grad=True)
    alive = weakref.ref(q)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: None, lambda packed: packed):  # as checkpointing
        if varlen:
            cu = torch.tensor([0, 10, 24], dtype=torch.int32)
            out = attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, 14)
        else:
            out = attention(q, k, v)
    del q
    gc.collect()
    assert out.grad_fn is not None
    assert alive() is None, "the attention's autograd context keeps q alive outside its saved tensors"
