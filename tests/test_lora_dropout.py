"""fastft.kernels.lora_dropout: the dropout mask drawn inside the kernels, and the three products that use it,
against float64 math applying the same mask (materialised by ``dropout_mask``).

Tolerances: the kernels round ``M * x`` to the operand dtype, accumulate in fp32 and round the result once
(the interpreter's bf16 casts truncate: 1 ulp). So each element may be off by a few ulps of the sum of the
ABSOLUTE values of its terms (``|M x| @ |A|.T``, ...), plus fp32 accumulation (n * 2^-24 of it). That bound
is checked element by element. In fp32 it is ~1e-5 of the terms: one wrong mask element (a term of O(1))
fails it; in 16-bit the bound is looser and these tests check the dtype plumbing.
"""
import math

import pytest
import torch
from kernel_testing import BF16, ENGINES, EPS, F16, F32

from fastft.kernels import use_engine
from fastft.kernels.lora_dropout import (
    DropoutMask,
    dropout_lora_a,
    dropout_lora_grad_a,
    dropout_lora_grad_x_,
    dropout_mask,
)

SEED = 0x5EED_1234_ABCD  # a 64-bit seed: both halves of Philox's key are used


def assert_within(actual, expected, bound, name):
    """|actual - expected| <= bound, element by element (float64), reporting the worst element."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected).abs()
    over = ~(err <= bound)  # NaN (an unwritten, poisoned element) counts as over
    if over.any():
        worst = int(torch.argmax(torch.where(over, err - bound, torch.zeros_like(err)).nan_to_num(math.inf)))
        raise AssertionError(f"{name}: {int(over.sum())}/{err.numel()} elements off; worst flat index {worst}: got "
                             f"{actual.flatten()[worst].item():.6e}, expected {expected.flatten()[worst].item():.6e}, "
                             f"bound {bound.flatten()[worst].item():.3e}")


def _inputs(T, K, R, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=gen).to(dtype)
    A = (torch.randn(R, K, generator=gen) * 0.3).to(dtype)
    dyB = torch.randn(T, R, generator=gen).to(dtype)
    dx = torch.randn(T, K, generator=gen).to(dtype)
    return x, A, dyB, dx


# (T, in, r, row0): odd token counts, in not a multiple of the 32-column tile, r below 16 and not a power of
# two, r above 64 (two r-tiles); 13 tokens reduce dA in one pass, 37 in three token splits.
SHAPES = [(13, 72, 5, 0), (37, 72, 20, 3), (21, 40, 80, 64)]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("T, K, R, row0", SHAPES)
def test_products_match_float64_with_the_kernels_own_mask(T, K, R, row0, dtype, engine):
    x, A, dyB, dx = _inputs(T, K, R, dtype)
    mask = DropoutMask(0.3, SEED, row0)
    alpha = 0.75
    with use_engine(engine):
        M = dropout_mask(mask, (T, K), x.device).double()
        xa = dropout_lora_a(x, A, mask)
        dA = dropout_lora_grad_a(dyB, x, mask, alpha)
        dx_out = dropout_lora_grad_x_(dx.clone(), dyB, A, mask, alpha)
    assert xa.dtype == A.dtype and dA.dtype == dyB.dtype and dx_out.dtype == dx.dtype
    xd, a, g = M * x.double(), A.double(), dyB.double()
    slack = 4 * EPS[dtype]
    assert_within(xa, xd @ a.t(), (slack + K * 2.0**-24) * (xd.abs() @ a.abs().t()), f"{engine} xa")
    assert_within(dA, alpha * g.t() @ xd, (slack + T * 2.0**-24) * alpha * (g.abs().t() @ xd.abs()), f"{engine} dA")
    term = alpha * M * (g @ a)
    bound = slack * (dx.double().abs() + alpha * M * (g.abs() @ a.abs())) + R * 2.0**-24 * term.abs()
    assert_within(dx_out, dx.double() + term, bound, f"{engine} dx")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("p", [0.05, 0.5])
def test_mask_statistics(engine, p):
    """Keep rate within binomial bounds, kept elements scaled by exactly 1/(1-p), no correlation between
    neighbouring elements (an offset that mixed up rows and columns would repeat draws along a diagonal)."""
    T, K = 257, 300
    with use_engine(engine):
        M = dropout_mask(DropoutMask(p, SEED), (T, K), "cpu")
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
    assert set(M.unique().tolist()) == {0.0, scale.item()}
    kept = (M > 0).double()
    n = kept.numel()
    assert abs(kept.sum().item() - n * (1 - p)) < 5 * math.sqrt(n * p * (1 - p))  # 5 sigma: ~1e-6 false alarms
    z = (kept - (1 - p)) / math.sqrt(p * (1 - p))  # standardised: correlations below ~5/sqrt(n) are noise
    for name, a, b in (("right", z[:, :-1], z[:, 1:]), ("below", z[:-1, :], z[1:, :]),
                       ("anti-diagonal", z[:-1, 1:], z[1:, :-1])):
        assert abs((a * b).mean().item()) < 5 / math.sqrt(a.numel()), f"{name} neighbours correlated"


@pytest.mark.parametrize("engine", ENGINES)
def test_mask_belongs_to_global_rows_and_seeds(engine):
    """Rows ``row0 ..`` of a mask are the same draws whoever asks (a token chunk sees its part of the whole
    mask); another seed draws another mask; a mask is the same each time it is drawn."""
    T, K = 150, 37
    mask = DropoutMask(0.4, SEED)
    with use_engine(engine):
        whole = dropout_mask(mask, (T, K), "cpu")
        assert torch.equal(dropout_mask(mask, (T, K), "cpu"), whole)
        for start in (1, 63, 64, 100):
            assert torch.equal(dropout_mask(mask.rows_from(start), (T - start, K), "cpu"), whole[start:]), start
        other = dropout_mask(DropoutMask(0.4, SEED + 1), (T, K), "cpu")
    agree = ((whole > 0) == (other > 0)).double().mean().item()
    assert abs(agree - (0.4**2 + 0.6**2)) < 0.03, "two seeds should draw independent masks"


def test_seeds_come_from_torch_rng():
    """A seed is drawn from torch's CPU generator: the same generator state gives the same seed (what
    gradient checkpointing's preserve_rng_state relies on), consecutive draws differ."""
    torch.manual_seed(7)
    first, second = DropoutMask.draw(0.1, torch.device("cpu")), DropoutMask.draw(0.1, torch.device("cpu"))
    torch.manual_seed(7)
    assert DropoutMask.draw(0.1, torch.device("cpu")) == first
    assert first.seed != second.seed and first.p == 0.1 and first.row0 == 0
