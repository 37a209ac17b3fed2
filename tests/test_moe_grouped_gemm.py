"""The Triton engine of the expert op (``kernels/moe_grouped_gemm.py``, a grouped GEMM over the expert groups with
NF4 dequantized in its tile loads) against float64 references and against the PyTorch engine (the loop over hit
experts of ``kernels/moe_experts.py``), on awkward routings, NF4 and dense experts, fp32 / bf16 / fp16.

Tolerances. fp32: both sides compute in fp32 from the same weights; only summation order differs (a few ulps of
the largest magnitude per GEMM), so 16 ulps forward and 64 for the gradients (three chained GEMMs and the
recompute) leave room while a wrong term (a LoRA product off by its scaling, a routing weight missed, a row of
another expert) moves results by more than 1e-2 relative. 16-bit: each rounding to the compute dtype costs at most
half an ulp (``EPS / 2`` relative) of the value rounded; an expert's output passes ~6 of them (the weight tile,
``gu``, ``silu(g) * u``, ``y``, the weighted contribution, the sum) and its gradients ~10, so 8 and 16 ulps of the
largest expected magnitude bound them with margin (the same bounds as ``test_moe.py``'s loop engine). Engine against
engine: each is within that bound of float64, so they are within twice it of each other.
The NF4 tile loads are checked bit for bit against ``dequantize_nf4`` (a product with identity rows is exact).
The grouped LoRA-gradient kernel alone has an elementwise bound of its own (see its test).
"""
import pytest
import torch
from kernel_testing import EPS, assert_close
from moe_references import decode_nf4, random_lora, reference_moe

from fastft.kernels import use_engine
from fastft.kernels._common import poison_outputs
from fastft.kernels.moe_experts import ExpertLora, NF4Experts, moe_experts, route
from fastft.kernels.moe_grouped_gemm import _row_tiles, expert_groups, grouped_lora_grad, grouped_matmul
from fastft.kernels.nf4 import dequantize_nf4

F16, BF16 = torch.float16, torch.bfloat16
ULPS = {torch.float32: (16, 64), BF16: (8, 16), F16: (8, 16)}  # (forward, gradients), see the module doc


@pytest.fixture(autouse=True)
def _poisoned():
    """Unwritten output elements show up as NaN."""
    with poison_outputs():
        yield


def routing(case, tokens, experts, k, gen):
    """``(top_k_index, top_k_weights)``: distinct experts per token."""
    if case == "expert_without_tokens":  # the last expert gets nothing
        index = torch.stack([torch.randperm(experts - 1, generator=gen)[:k] for _ in range(tokens)])
    elif case == "all_to_one_expert":
        index = torch.full((tokens, 1), 1)
    else:  # "random", "top_k_equals_experts" (k = E), "many_experts"
        index = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    return index, torch.softmax(torch.randn(index.shape, generator=gen), dim=-1)


# (E, H, I, T, k, r): tokens odd; "odd_sizes" has H and I that are not powers of two (NF4: blocks of 64 elements
# cross the rows of a 40-wide down expert), "many_experts" E = 128 with top-8
CASES = {
    "random": (4, 64, 64, 13, 2, 4),
    "expert_without_tokens": (5, 64, 32, 9, 2, 4),
    "all_to_one_expert": (4, 64, 32, 7, 1, 4),
    "top_k_equals_experts": (3, 64, 32, 5, 3, 4),
    "odd_sizes": (5, 48, 40, 11, 3, 3),
    "many_experts": (128, 32, 16, 3, 8, 2),
}


def random_nf4_experts(E, out_features, in_features, gen) -> NF4Experts:
    """Random NF4 codes with double quantization in bitsandbytes' layout (blocks of 64, nested blocks of 256):
    faster than quantizing 128 experts through bitsandbytes (``test_moe.py`` does that) and as good a test of
    where the kernel reads each nibble and scale."""
    n = out_features * in_features
    blocks = -(-n // 64)
    return NF4Experts(packed=torch.randint(0, 256, (E, -(-n // 2)), dtype=torch.uint8, generator=gen),
                      absmax=torch.randint(0, 256, (E, blocks), dtype=torch.uint8, generator=gen),
                      nested_absmax=0.1 + 0.1 * torch.rand(E, -(-blocks // 256), generator=gen),
                      offset=0.02 * torch.rand(E, generator=gen), code=torch.linspace(-1, 1, 16),
                      nested_code=torch.rand(256, generator=gen), blocksize=64, nested_blocksize=256,
                      shape=(out_features, in_features), dtype=torch.float32)


def run_case(case, nf4, dtype, engine):
    E, H, inter, T, k, r = CASES[case]
    gen = torch.Generator().manual_seed(0)
    W_gu, W_d = torch.randn(E, 2 * inter, H, generator=gen) * 0.1, torch.randn(E, H, inter, generator=gen) * 0.1
    if nf4:
        gate_up, down = random_nf4_experts(E, 2 * inter, H, gen), random_nf4_experts(E, H, inter, gen)
        W_gu, W_d = decode_nf4(gate_up), decode_nf4(down)
    else:
        gate_up, down = W_gu.to(dtype), W_d.to(dtype)
        W_gu, W_d = gate_up.double(), down.double()
    index, weights = routing(case, T, E, k, gen)
    x = torch.randn(T, H, generator=gen).to(dtype)
    (A_gu, B_gu), (A_d, B_d) = random_lora(E, 2 * inter, H, r, seed=1), random_lora(E, H, inter, r, seed=2)
    leaves = [t.to(dtype).requires_grad_() for t in (x, A_gu, B_gu, A_d, B_d)] + [weights.requires_grad_()]
    x, A_gu, B_gu, A_d, B_d, weights = leaves
    with use_engine(engine):
        out = moe_experts(x, index, weights, gate_up, down, ExpertLora(A_gu, B_gu, 2.0), ExpertLora(A_d, B_d, 0.5))
        dout = torch.randn(out.shape, generator=gen).to(dtype)
        out.backward(dout)
    return index, dout, (W_gu, W_d), out, leaves


# Every routing in fp32 and bf16, dense and NF4 where it matters most; fp16 (bf16's roundings with 3 more bits) on
# two. Not the full product: the interpreter runs ~40 ms per program and the file must stay well under two minutes.
F32 = torch.float32
GRID = [("random", nf4, dtype) for nf4 in (False, True) for dtype in (F32, BF16, F16)]
GRID += [("expert_without_tokens", nf4, dtype) for nf4 in (False, True) for dtype in (F32, BF16)]
GRID += [("all_to_one_expert", False, F32), ("all_to_one_expert", True, BF16)]
GRID += [("top_k_equals_experts", False, BF16), ("top_k_equals_experts", True, F32)]
GRID += [("odd_sizes", False, F32), ("odd_sizes", False, F16), ("odd_sizes", True, F32), ("odd_sizes", True, BF16)]
GRID += [("many_experts", False, F32), ("many_experts", True, BF16)]


@pytest.mark.parametrize("case,nf4,dtype", GRID,
                         ids=[f"{c}-{'nf4' if n else 'dense'}-{str(d)[6:]}" for c, n, d in GRID])
def test_grouped_engine_matches_float64_and_the_pytorch_engine(case, nf4, dtype):
    index, dout, (W_gu, W_d), out, leaves = run_case(case, nf4, dtype, "triton")
    x, A_gu, B_gu, A_d, B_d, weights = leaves
    E = W_gu.shape[0]

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rx, rA_gu, rB_gu, rA_d, rB_d, rw = ref_leaves
    ref = reference_moe(rx, index, rw, W_gu, W_d, ExpertLora(rA_gu, rB_gu, 2.0), ExpertLora(rA_d, rB_d, 0.5))
    ref.backward(dout.double())
    _, _, _, torch_out, torch_leaves = run_case(case, nf4, dtype, "torch")

    fwd_ulps, grad_ulps = ULPS[dtype]
    eps = EPS[dtype]
    names = ["dx", "dA_gu", "dB_gu", "dA_d", "dB_d", "d_weights"]
    assert out.dtype == dtype
    results = [(out, ref, torch_out, fwd_ulps, "out")]
    results += [(t.grad, r.grad, o.grad, grad_ulps, n) for t, r, o, n in zip(leaves, ref_leaves, torch_leaves, names)]
    unused = [e for e in range(E) if not (index == e).any()]
    assert bool(unused) == (case in ("expert_without_tokens", "all_to_one_expert", "many_experts"))
    for got, expected, pytorch_engine, ulps, name in results:
        scale = expected.abs().max().item()
        assert scale > 0, f"{name}: zero reference, the test would prove nothing"
        assert got.dtype == (torch.float32 if name == "d_weights" else dtype)
        assert_close(got, expected, atol=ulps * eps * scale, rtol=ulps * eps, name=name)
        assert_close(got, pytorch_engine, atol=2 * ulps * eps * scale, rtol=2 * ulps * eps, name=f"{name} vs torch")
        if name[:2] in ("dA", "dB") and unused:
            assert (got[unused] == 0).all(), f"{name} of experts without tokens"


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("transposed", [False, True], ids=["W.T", "W"])
def test_nf4_tile_loads_equal_the_dequantization_kernel_bit_for_bit(transposed, dtype):
    """Identity rows through each expert: ``I @ W.T = W.T`` and ``I @ W = W`` exactly (one product of 1 per
    output, fp32 accumulation), so every dequantized element of the tile loads is seen, in both access orders, and
    equals ``dequantize_nf4`` (bit-equal to bitsandbytes, ``test_nf4.py``) bit for bit. 40-wide rows: blocks of 64
    cross rows."""
    gen = torch.Generator().manual_seed(3)
    E, out_features, in_features = 3, 24, 40
    experts = random_nf4_experts(E, out_features, in_features, gen)
    K = out_features if transposed else in_features
    eye = torch.eye(K, dtype=dtype)
    rows = torch.arange(K).repeat(E)  # every expert gets the K identity rows
    bounds = [e * K for e in range(E + 1)]
    with use_engine("triton"):
        out, _ = grouped_matmul(eye, experts, bounds, rows=rows, transposed=transposed)
    for e in range(E):
        with use_engine("torch"):
            W = dequantize_nf4(experts.expert(e), dtype=dtype)
        expected = W if transposed else W.t()
        assert torch.equal(out[e * K:(e + 1) * K], expected), f"expert {e}"


@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
def test_grouped_matmul_with_lora_matches_float64(transposed):
    """The launcher alone: a gather index, an expert without rows, a group longer than one row tile, rank 5, and the
    kept LoRA product ``X @ P``; dense fp32 weights with non-contiguous (transposed-view) strides."""
    gen = torch.Generator().manual_seed(4)
    E, out_features, in_features, r, s = 4, 40, 24, 5, 0.75
    weights = torch.randn(E, in_features, out_features, generator=gen).transpose(1, 2)  # [E, out, in] view
    A, B = random_lora(E, out_features, in_features, r, seed=5)
    P, Q = (B, A) if transposed else (A.transpose(1, 2), B.transpose(1, 2))
    K = P.shape[1]
    sizes = [3, 0, 37, 2]  # 37 rows: three row tiles of the interpreter's 16
    bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    T = 11
    x = torch.randn(T, K, generator=gen)
    rows = torch.randint(0, T, (bounds[-1],), generator=gen)
    with use_engine("triton"):
        out, xp = grouped_matmul(x, weights, bounds, rows=rows, transposed=transposed, lora=(P, Q, s),
                                 keep_lora_product=True)
    W = weights.double()
    for e in range(E):
        if not sizes[e]:
            continue
        x_e = x[rows[bounds[e]:bounds[e + 1]]].double()
        op_w = W[e] if transposed else W[e].t()
        ref_xp = x_e @ P[e].double()
        ref = x_e @ op_w + s * ref_xp @ Q[e].double()
        tol = 16 * EPS[torch.float32] * max(ref.abs().max().item(), 1.0)
        assert_close(out[bounds[e]:bounds[e + 1]], ref, atol=tol, rtol=0, name=f"out of expert {e}")
        assert_close(xp[bounds[e]:bounds[e + 1]], ref_xp, atol=tol, rtol=0, name=f"X @ P of expert {e}")


def test_row_tiles_are_cut_at_the_group_bounds_and_skip_empty_experts():
    experts, starts = _row_tiles([0, 3, 3, 40, 40], 16, "cpu")
    assert experts.tolist() == [0, 2, 2, 2] and starts.tolist() == [0, 3, 19, 35]
    assert route(torch.tensor([[2, 0], [2, 3]]), 5).bounds == [0, 1, 1, 3, 4, 4]


def test_grouped_matmul_rejects_rows_of_the_wrong_width():
    with pytest.raises(ValueError, match=r"x must be \[rows, 24\]"):
        grouped_matmul(torch.randn(3, 23), torch.randn(2, 8, 24), [0, 1, 3])


# (rows per expert, M, N): 70 rows, two row blocks of the interpreter's 64, beside an expert without rows; M = 37,
# three output tiles of 16; r = 5 and N = 40, not powers of two; all rows to one expert; E = 128 with the group
# sizes of a top-8 routing of 5 tokens (most experts without rows); no rows at all
GRAD_CASES = {
    "expert_without_rows": ([3, 0, 70, 1, 5], 37, 5),
    "all_rows_to_one_expert": ([0, 0, 9], 5, 40),
    "many_experts": (torch.bincount(torch.stack([torch.randperm(128, generator=torch.Generator().manual_seed(6))[:8]
                                                 for _ in range(5)]).flatten(), minlength=128).tolist(), 3, 24),
    "no_rows": ([0, 0, 0], 4, 16),
}
GRAD_GRID = [(case, dtype, True, True) for case in GRAD_CASES for dtype in (F32, BF16, F16)]
GRAD_GRID += [("expert_without_rows", F32, gather, weighted) for gather, weighted in ((False, False), (True, False),
                                                                                        (False, True))]


@pytest.mark.parametrize("case,dtype,gather,weighted", GRAD_GRID,
                         ids=[f"{c}-{str(d)[6:]}-{'gather' if g else 'rows'}-{'w' if w else 'no_w'}"
                              for c, d, g, w in GRAD_GRID])
def test_grouped_lora_grad_matches_float64(case, dtype, gather, weighted):
    """``G[e] = s * L_e.T @ diag(w_e) @ R_e`` per expert against float64. Bound per element, from the operations:
    16-bit ``w * L`` rounded (``EPS / 2`` of each term), fp32 accumulation of ``n`` terms (Higham's ``n * EPS32`` of
    the sum of their magnitudes), the scaling's product and the rounding of the result (``EPS / 2`` of ``|G|``): at
    most ``(EPS + (n + 2) * EPS32) * s * sum |w L R|``. A row missed or taken from another expert, a weight or the
    scaling left out moves an element by a whole term, far beyond that."""
    sizes, M, N = GRAD_CASES[case]
    gen = torch.Generator().manual_seed(7)
    bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    R, T, s = bounds[-1], 11, 0.75
    left = torch.randn(R, M, generator=gen).to(dtype)
    right = torch.randn(T if gather else R, N, generator=gen).to(dtype)
    rows = torch.randint(0, T, (R,), generator=gen) if gather else None
    w = torch.rand(R, generator=gen) + 0.1 if weighted else None
    with use_engine("triton"):
        got = grouped_lora_grad(left, right, expert_groups(bounds, left.device), rows=rows, row_weights=w,
                                scaling=s)
    assert got.dtype == dtype and got.shape == (len(sizes), M, N)

    L, Rr = left.double(), (right[rows] if gather else right).double()
    W = w.double()[:, None] if weighted else torch.ones(R, 1, dtype=torch.float64)
    for e, n in enumerate(sizes):
        if not n:
            assert (got[e] == 0).all(), f"expert {e} has no rows: its gradient is zero"
            continue
        part = slice(bounds[e], bounds[e + 1])
        expected = s * (W[part] * L[part]).t() @ Rr[part]
        magnitude = s * (W[part] * L[part]).abs().t() @ Rr[part].abs()
        bound = (EPS[dtype] + (n + 2) * EPS[torch.float32]) * magnitude.clamp_min(1e-30)
        assert_close(got[e].double() / bound, expected / bound, atol=1.0, rtol=0, name=f"G of expert {e} / bound")
