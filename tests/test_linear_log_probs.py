"""linear_log_probs: Triton (interpreted) and PyTorch paths against float64 autograd, and against TRL's
ChunkedLogProbFunction (the op it replaces)."""
import math

import pytest
import torch
from kernel_testing import ENGINES, assert_close, check_grad, leaf
from torch.utils._python_dispatch import TorchDispatchMode
from trl.kernels.chunked_logprob import ChunkedLogProbFunction

from fastft.doctor.references import linear_log_probs_reference
from fastft.kernels._common import use_engine
from fastft.kernels.linear_log_probs import OUTPUTS, linear_log_probs

N, H, V = 23, 40, 32003
TEMPERATURE, LOGIT_SCALE = 0.7, 1.3
# 2 token chunks (16 + 7 rows) x 4 vocabulary chunks (3 x 8192 + 7427): the running lse crosses
# chunk borders and labels land in every chunk.
CHUNKS = dict(token_chunk_size=16, vocab_chunk_size=8192)

# Tolerances (reference: float64 math on the same, already rounded, inputs).
# - log-probs: fp32 GEMM over H = 40 then fp32 log-sum-exp over 32k terms, ~1e-6 relative on values ~10,
#   in every dtype (the logits are formed in fp32 from the stored operands). log p = z_y - lse subtracts two
#   such values, so a log-prob near 0 keeps both errors: 2 x 1e-6 x 10 = 2e-5 absolute (the CPU BLAS's
#   blocking, which varies with its thread count, moves the torch engine's error within that).
# - grads, fp32: sums over V = 32k (dhidden) or N products, fp32 rounding ~ sqrt(V) * 2**-24 ~ 1e-5 of
#   the summed magnitudes: 1e-5 relative + 1e-5 of the largest gradient (cancellation between the
#   label term and sum_j p_j W_j leaves small elements with the large terms' absolute error).
# - grads, bf16: dz is rounded to bf16 (< 2**-7, interpreter truncation) before the GEMMs, the result
#   rounded to bf16 again (2**-8): 2**-6 relative, 2**-7 of the largest gradient absolute.
GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2**-6, 2**-7), torch.float16: (2**-9, 2**-10)}
LOGP_TOL = dict(atol=2e-5, rtol=2e-6)


def _inputs(dtype, seed=0, n=N, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.4).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.5).to(dtype) if with_bias else None
    labels = torch.randint(0, V, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.3] = -100
    labels[0], labels[1] = V - 1, 8191  # the last column; the last column of the first vocabulary chunk
    return hidden, weight, bias, labels


def _reference(hidden, weight, bias, labels, grad_output):
    """The float64 log-probs and their gradients (dhidden, dweight, dbias) at the test's temperature and scale."""
    (log_probs, *_), grads = linear_log_probs_reference(hidden, weight, bias, labels, grad_output,
                                                        temperature=TEMPERATURE, logit_scale=LOGIT_SCALE)
    return (log_probs, *grads)


def _check_grad(actual, expected, dtype, name):
    check_grad(actual, expected, dtype, GRAD_TOL[dtype], name)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_float64_reference(engine, dtype, with_bias):
    hidden, weight, bias, labels = _inputs(dtype, with_bias=with_bias)
    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    with use_engine(engine):
        logp = linear_log_probs(h, w, labels, bias=b, temperature=TEMPERATURE, logit_scale=LOGIT_SCALE, **CHUNKS)
    assert logp.dtype == torch.float32 and logp.shape == (N,)
    grad_output = torch.randn(N, generator=torch.Generator().manual_seed(1))
    logp.backward(grad_output)
    ref, ref_dh, ref_dw, ref_db = _reference(hidden, weight, bias, labels, grad_output)
    assert_close(logp, ref, **LOGP_TOL, name="log_probs")
    assert (logp[labels == -100] == 0).all()
    _check_grad(h.grad, ref_dh, dtype, "dhidden")
    _check_grad(w.grad, ref_dw, dtype, "dweight")
    if with_bias:
        _check_grad(b.grad, ref_db, dtype, "dbias")


def test_matches_trl_chunked_logprob_fp32():
    # TRL's op on the same inputs (its CPU path folds whole tiles in torch); it takes no ignore_index,
    # so feed it clamped labels and mask afterwards, as TRL's add_fused_lm_head does.
    hidden, weight, bias, labels = _inputs(torch.float32, seed=2)
    grad_output = torch.randn(N, generator=torch.Generator().manual_seed(3))
    valid = labels != -100

    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    ours = linear_log_probs(h, w, labels, bias=b, temperature=TEMPERATURE, logit_scale=LOGIT_SCALE)  # default tiles
    ours.backward(grad_output)

    th, tw, tb = leaf(hidden), leaf(weight), leaf(bias)
    trl = ChunkedLogProbFunction.apply(th, tw, tb, labels.clamp(min=0), TEMPERATURE, 8192, None, LOGIT_SCALE, ())[0]
    trl = trl.masked_fill(~valid, 0.0)
    trl.backward(grad_output)

    # Two fp32 implementations of the same math; they differ only in summation order.
    assert_close(ours, trl, **LOGP_TOL, name="log_probs vs TRL")
    for mine, theirs, name in ((h.grad, th.grad, "dhidden"), (w.grad, tw.grad, "dweight"), (b.grad, tb.grad, "dbias")):
        assert_close(mine, theirs, atol=1e-5 * theirs.abs().max().item(), rtol=1e-5, name=f"{name} vs TRL")


@pytest.mark.parametrize("engine", ENGINES)
def test_frozen_weight_and_bias(engine):
    # LoRA training: only the hidden states need a gradient.
    hidden, weight, bias, labels = _inputs(torch.float32, seed=4, n=9)
    h, w, b = leaf(hidden), leaf(weight, False), leaf(bias, False)
    with use_engine(engine):
        logp = linear_log_probs(h, w, labels, bias=b, temperature=TEMPERATURE, logit_scale=LOGIT_SCALE,
                                token_chunk_size=4, vocab_chunk_size=10000)
    grad_output = torch.randn(9, generator=torch.Generator().manual_seed(5))
    logp.backward(grad_output)
    ref, ref_dh, _, _ = _reference(hidden, weight, bias, labels, grad_output)
    assert w.grad is None and b.grad is None
    assert_close(logp, ref, **LOGP_TOL, name="log_probs")
    _check_grad(h.grad, ref_dh, torch.float32, "dhidden")


def test_fp16_trainable_bias_frozen_hidden():
    hidden, weight, bias, labels = _inputs(torch.float16, seed=6, n=11)
    h, w, b = leaf(hidden, False), leaf(weight), leaf(bias)
    logp = linear_log_probs(h, w, labels, bias=b, temperature=TEMPERATURE, logit_scale=LOGIT_SCALE, **CHUNKS)
    grad_output = torch.randn(11, generator=torch.Generator().manual_seed(7))
    logp.backward(grad_output)
    ref, _, ref_dw, ref_db = _reference(hidden, weight, bias, labels, grad_output)
    assert h.grad is None
    assert_close(logp, ref, **LOGP_TOL, name="log_probs")
    _check_grad(w.grad, ref_dw, torch.float16, "dweight")
    _check_grad(b.grad, ref_db, torch.float16, "dbias")


@pytest.mark.parametrize("engine", ENGINES)
def test_all_labels_ignored(engine):
    hidden, weight, bias, _ = _inputs(torch.float32, seed=8, n=5)
    labels = torch.full((5,), -100)
    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    with use_engine(engine):
        logp = linear_log_probs(h, w, labels, bias=b, token_chunk_size=3, vocab_chunk_size=20000)
    logp.backward(torch.ones(5))
    assert (logp == 0).all()
    for grad in (h.grad, w.grad, b.grad):
        assert torch.isfinite(grad).all() and (grad == 0).all()


@pytest.mark.parametrize("engine", ENGINES)
def test_out_of_range_labels_raise(engine):
    hidden, weight, bias, labels = _inputs(torch.float32, n=5)
    labels[2] = V + 7
    with use_engine(engine), pytest.raises(ValueError, match=r"labels .*\[0, 32003\).*index 2 is 32010"):
        linear_log_probs(hidden, weight, labels, bias=bias)


def test_bad_arguments_raise_clear_errors():
    hidden, weight, bias, labels = _inputs(torch.float32, n=5)
    with pytest.raises(ValueError, match="temperature"):
        linear_log_probs(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match="bias must have V = 32003"):
        linear_log_probs(hidden, weight, labels, bias=bias[:-1])
    with pytest.raises(ValueError, match="weight must be \\[V, H\\]"):
        linear_log_probs(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError, match="labels has 4 elements"):
        linear_log_probs(hidden, weight, labels[:4])
    with pytest.raises(TypeError, match="bias"):
        linear_log_probs(hidden, weight, labels, bias=bias.long())
    with pytest.raises(ValueError, match="vocab_chunk_size"):
        linear_log_probs(hidden, weight, labels, vocab_chunk_size=0)


@pytest.mark.parametrize("engine", ENGINES)
def test_empty_batch(engine):
    h, w = torch.randn(0, H, requires_grad=True), torch.randn(10, H, requires_grad=True)
    with use_engine(engine):
        logp = linear_log_probs(h, w, torch.zeros(0, dtype=torch.long))
    assert logp.shape == (0,)
    logp.sum().backward()
    assert h.grad.shape == (0, H) and (w.grad == 0).all()


# ---- TRL's extra outputs: entropy, log_sum_sq_probs, mean_logits, is_top1 -------------------------------------
# Tolerances of the statistics (fp32 one-pass sums over V = 32k terms against float64 on the same inputs):
# - entropy = log s - sum(e (z - m)) / s, both terms ~10 and summed over 32k fp32 values (~1e-6 relative), each
#   also carrying the logits' own fp32 error (a few ulps of |z| ~ 10 with an AVX2 BLAS; CI's CPU measured 2.2e-5
#   in all): 4e-5 abs;
# - log_sum_sq_probs ~ -1..-10 = lse(2z) - 2 lse(z): the same kind of sums, each carrying the logits' own fp32
#   error (a few ulps of |z| ~ 10, ~4e-6 with an AVX2 BLAS), four times over: 3e-5 abs;
# - mean_logits: an fp32 sum of 32k values ~3 (error ~ sqrt(V) * 2**-24 * 3 ~ 3e-5), then / V: ~1e-9; 1e-7 abs.
ENTROPY_TOL = dict(atol=4e-5, rtol=2e-6)
STATS_TOL = {"log_sum_sq_probs": dict(atol=3e-5, rtol=2e-6), "mean_logits": dict(atol=1e-7, rtol=1e-6)}
SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")  # what TRL's SFTTrainer asks for
DPO_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")  # DPOTrainer, use_weighting


def _inputs_with_top1(dtype, seed, n=N):
    # Random labels are almost never the argmax over 32k entries: label rows 2-4 with their argmax, so
    # is_top1 is True on some rows and False on others.
    hidden, weight, bias, labels = _inputs(dtype, seed=seed, n=n)
    z = hidden.double() @ weight.double().T + bias.double()
    labels[2:5] = z[2:5].argmax(-1)
    labels[5] = -100
    return hidden, weight, bias, labels


def _reference_all(hidden, weight, bias, labels, grad_lp, grad_ent):
    """float64 autograd: the five outputs, and the gradients of (lp * grad_lp).sum() + (H * grad_ent).sum()."""
    return linear_log_probs_reference(hidden, weight, bias, labels, grad_lp, grad_ent, temperature=TEMPERATURE,
                                      logit_scale=LOGIT_SCALE)


def _check_outputs(results, expected, labels, name=""):
    lp, ent, lss, mean, top1 = results
    assert_close(lp, expected[0], **LOGP_TOL, name=f"log_probs{name}")
    assert_close(ent, expected[1], **ENTROPY_TOL, name=f"entropy{name}")
    assert_close(lss, expected[2], **STATS_TOL["log_sum_sq_probs"], name=f"log_sum_sq_probs{name}")
    assert_close(mean, expected[3], **STATS_TOL["mean_logits"], name=f"mean_logits{name}")
    assert top1.dtype == torch.bool and torch.equal(top1, expected[4]), f"is_top1{name}: {top1} != {expected[4]}"
    ignored = labels == -100
    for value in (lp, ent, lss, mean):
        assert value.dtype == torch.float32 and (value[ignored] == 0).all()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_outputs_match_float64_reference(engine, dtype):
    hidden, weight, bias, labels = _inputs_with_top1(dtype, seed=10)
    gen = torch.Generator().manual_seed(11)
    grad_lp, grad_ent = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    with use_engine(engine):
        results = linear_log_probs(h, w, labels, bias=b, temperature=TEMPERATURE, logit_scale=LOGIT_SCALE,
                                   outputs=OUTPUTS, **CHUNKS)
    assert isinstance(results, tuple) and len(results) == 5
    lp, ent, lss, mean, top1 = results
    assert lp.requires_grad and ent.requires_grad
    assert not (lss.requires_grad or mean.requires_grad or top1.requires_grad)  # TRL: mark_non_differentiable
    ((lp * grad_lp).sum() + (ent * grad_ent).sum()).backward()

    expected, (ref_dh, ref_dw, ref_db) = _reference_all(hidden, weight, bias, labels, grad_lp, grad_ent)
    assert expected[4][[2, 3, 4]].all() and expected[4].sum() == 3  # the test data has top-1 rows
    _check_outputs(results, expected, labels)
    _check_grad(h.grad, ref_dh, dtype, "dhidden")
    _check_grad(w.grad, ref_dw, dtype, "dweight")
    _check_grad(b.grad, ref_db, dtype, "dbias")


@pytest.mark.parametrize("engine", ENGINES)
def test_all_outputs_match_trl_chunked_logprob_fp32(engine):
    # TRL's op on the same inputs (its CPU path folds whole tiles in torch), every output and every gradient,
    # with a loss that uses both log-probs and entropy (TRL's entropy is differentiable). TRL takes no
    # ignore_index: feed it clamped labels and mask afterwards, as its add_fused_lm_head does.
    hidden, weight, bias, labels = _inputs_with_top1(torch.float32, seed=12)
    gen = torch.Generator().manual_seed(13)
    grad_lp, grad_ent = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    valid = labels != -100

    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    with use_engine(engine):
        ours = linear_log_probs(h, w, labels, bias=b, temperature=TEMPERATURE, logit_scale=LOGIT_SCALE,
                                outputs=OUTPUTS, token_chunk_size=16, vocab_chunk_size=5000)
    ((ours[0] * grad_lp).sum() + (ours[1] * grad_ent).sum()).backward()

    th, tw, tb = leaf(hidden), leaf(weight), leaf(bias)
    trl = ChunkedLogProbFunction.apply(th, tw, tb, labels.clamp(min=0), TEMPERATURE, 8192, None, LOGIT_SCALE, OUTPUTS)
    trl = [x.masked_fill(~valid, 0) for x in trl]
    ((trl[0] * grad_lp).sum() + (trl[1] * grad_ent).sum()).backward()

    assert [x.dtype for x in ours] == [x.dtype for x in trl]
    assert trl[4].sum() == 3
    # Two fp32 implementations of the same math; they differ only in summation order (and TRL's entropy
    # cancels two ~10-sized terms, ours does not: 1e-5 absolute covers both).
    _check_outputs(ours, trl, labels, name=" vs TRL")
    for mine, theirs, name in ((h.grad, th.grad, "dhidden"), (w.grad, tw.grad, "dweight"), (b.grad, tb.grad, "dbias")):
        assert_close(mine, theirs, atol=1e-5 * theirs.abs().max().item(), rtol=1e-5, name=f"{name} vs TRL")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("grad_of", ["entropy", "log_probs"])
def test_gradient_of_one_output_only(engine, grad_of):
    # Only one differentiable output reaches the loss: the other's incoming gradient is None (TRL's
    # set_materialize_grads(False)), e.g. entropy computed for logging only.
    hidden, weight, bias, labels = _inputs(torch.float32, seed=14, n=9)
    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    with use_engine(engine):
        lp, ent, *_ = linear_log_probs(h, w, labels, bias=b, temperature=TEMPERATURE, logit_scale=LOGIT_SCALE,
                                       outputs=SFT_OUTPUTS, token_chunk_size=4, vocab_chunk_size=10000)
    g = torch.randn(9, generator=torch.Generator().manual_seed(15))
    (ent if grad_of == "entropy" else lp).mul(g).sum().backward()
    zeros = torch.zeros(9)
    _, ref_grads = _reference_all(hidden, weight, bias, labels, *((zeros, g) if grad_of == "entropy" else (g, zeros)))
    for actual, expected, name in zip((h.grad, w.grad, b.grad), ref_grads, ("dhidden", "dweight", "dbias")):
        _check_grad(actual, expected, torch.float32, name)


# ---- The frozen-head gradient saved in the forward -----------------------------------------------------------------
class MatmulCounter(TorchDispatchMode):
    """Counts the GEMMs (``mm`` / ``addmm`` in any overload) run in its block."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_)
        return func(*args, **(kwargs or {}))


# dhidden of the frozen-head path: p_j is rounded to the compute dtype before its GEMM and the gradient is rounded
# twice (its direction in the forward, times the incoming gradient in the backward), as tight as GRAD_TOL otherwise.
FROZEN_GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2**-6, 2**-7), torch.float16: (2**-8, 2**-9)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("outputs", [("log_probs",), SFT_OUTPUTS], ids=["log_probs", "sft"])
def test_frozen_head_saves_the_gradient_and_skips_the_recompute(dtype, outputs):
    """QLoRA's case: frozen head and bias, only log-probs reach the loss (SFT asks for entropy too, only to log it).
    The forward saves the gradient direction, so the backward runs no GEMM; dhidden still matches float64 with
    ignored labels, labels in every vocabulary chunk (the first and last columns of chunks) and masked logits,
    one of them a label's (log-prob -inf, finite gradient)."""
    hidden, weight, bias, labels = _inputs(dtype, seed=30)
    bias[8000:8300] = float("-inf")  # across the border of the first two vocabulary chunks
    labels[6] = 8100
    # rows 2-4: confident predictions (p_y near 1), where W_y - sum_j p_j W_j is small and 1 - p_y matters
    hidden[2:5] *= 5
    labels[2:5] = (hidden[2:5].double() @ weight.double().T + bias.double()).argmax(-1)
    h, w, b = leaf(hidden), leaf(weight, False), leaf(bias, False)
    results = linear_log_probs(h, w, labels, bias=b, temperature=TEMPERATURE, logit_scale=LOGIT_SCALE,
                               outputs=outputs, **CHUNKS)
    lp = results if isinstance(results, torch.Tensor) else results[0]
    grad_output = torch.randn(N, generator=torch.Generator().manual_seed(31))
    grad_output[labels == -100] = float("nan")  # must not leak into ignored rows
    with MatmulCounter() as gemms:
        lp.backward(grad_output)
    assert gemms.calls == 0, f"{gemms.calls} GEMMs in the frozen-head backward"
    assert lp[6] == float("-inf") and w.grad is None and b.grad is None

    expected, (ref_dh, _, _) = _reference_all(hidden, weight, bias, labels, grad_output.nan_to_num(0.0),
                                              torch.zeros(N))
    assert_close(lp, expected[0], **LOGP_TOL, name="log_probs")
    assert (expected[0][2:5] > math.log(0.85)).all()  # the data has confident rows (p_y 0.90 to 0.9998)
    rtol, atol_rel = FROZEN_GRAD_TOL[dtype]
    assert h.grad.dtype == dtype and torch.isfinite(h.grad).all()
    assert_close(h.grad, ref_dh, atol=atol_rel * ref_dh.abs().max().item(), rtol=rtol, name="dhidden")
    assert (h.grad[labels == -100] == 0).all()


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen_head", "trainable_head"])
def test_entropy_gradient_and_trainable_head_recompute_exactly(frozen):
    """The gradient of the entropy (or of a trainable head) needs every p_j: the backward recomputes the logits
    (one GEMM per tile, plus one per gradient it forms), exactly as before, also when the forward saved the
    log-probs' gradient direction (frozen head: it cannot know whether the entropy will get a gradient)."""
    hidden, weight, bias, labels = _inputs_with_top1(torch.float32, seed=32)
    gen = torch.Generator().manual_seed(33)
    grad_lp, grad_ent = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    h, w, b = leaf(hidden), leaf(weight, not frozen), leaf(bias, not frozen)
    lp, ent, *_ = linear_log_probs(h, w, labels, bias=b, temperature=TEMPERATURE, logit_scale=LOGIT_SCALE,
                                   outputs=SFT_OUTPUTS, **CHUNKS)
    with MatmulCounter() as gemms:
        ((lp * grad_lp).sum() + (ent * grad_ent if frozen else 0 * ent).sum()).backward()
    tiles = 2 * 4  # 2 token chunks x 4 vocabulary chunks
    assert gemms.calls == tiles * (2 if frozen else 3)  # recompute + dhidden (+ dweight)
    _, ref_grads = _reference_all(hidden, weight, bias, labels, grad_lp, grad_ent if frozen else torch.zeros(N))
    _check_grad(h.grad, ref_grads[0], torch.float32, "dhidden")
    if not frozen:
        _check_grad(w.grad, ref_grads[1], torch.float32, "dweight")
        _check_grad(b.grad, ref_grads[2], torch.float32, "dbias")


def test_frozen_head_dead_rows_and_a_second_backward():
    # No finite logit: zero gradient on the saved-direction path too. The saved direction is scaled in place, so
    # a second backward of the same graph must be refused (autograd's version check), not return a wrong gradient.
    hidden, weight, bias, labels = _inputs(torch.float32, seed=34, n=9)
    bias[:] = float("-inf")
    h = leaf(hidden)
    lp = linear_log_probs(h, weight, labels, bias=bias, token_chunk_size=4, vocab_chunk_size=10000)
    lp.backward(torch.ones(9), retain_graph=True)
    assert (h.grad == 0).all()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        lp.backward(torch.ones(9))


def _tie_inputs():
    """Logits chosen exactly: hidden row i is the unit vector e_i, so z[i] = weight[:, i] + bias, all small
    integers (exact in fp32 whatever the summation order), and equal logits stay equal after the scaling."""
    n, vocab = 12, 9001
    gen = torch.Generator().manual_seed(16)
    hidden = torch.eye(n, 16)
    weight = torch.randint(-4, 5, (vocab, 16), generator=gen).float()
    bias = torch.randint(-2, 3, (vocab,), generator=gen).float()
    labels, expected = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.bool)
    cases = [  # (columns holding the row's max, label, is_top1)
        ((100, 5000), 5000, False),  # tie with an earlier column in an earlier vocabulary chunk
        ((100, 5000), 100, True),  # tie with a later column in a later chunk: argmax is the label
        ((300, 301), 301, False),  # tie inside one block
        ((300, 301), 300, True),
        ((4095, 4096), 4096, False),  # tie across the kernel's 4096-column blocks (one-chunk case)
        ((4095, 4096), 4095, True),
        ((0, 9000), 0, True),  # the first column, tied with the last
        ((0, 9000), 9000, False),
        ((8999,), 8999, True),  # unique max in the short last chunk
        ((7,), 8, False),  # label is not the max
        ((7,), -100, False),  # ignored
        ((2000, 2001, 2002), 2002, False),
    ]
    for row, (max_cols, label, top1) in enumerate(cases):
        weight[list(max_cols), row] = 10.0 - bias[list(max_cols)]  # z = 10 there, < 10 elsewhere (|w| + |b| <= 6)
        labels[row], expected[row] = label, top1
    return hidden, weight, bias, labels, expected


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("vocab_chunk_size", [1280, 16384])  # 8 chunks (7 x 1280 + 41), or one chunk of 3 blocks
def test_is_top1_ties_go_to_the_first_index(engine, vocab_chunk_size):
    hidden, weight, bias, labels, expected = _tie_inputs()
    with use_engine(engine):
        lp, ent, lss, mean, top1 = linear_log_probs(hidden, weight, labels, bias=bias, temperature=TEMPERATURE,
                                                    logit_scale=LOGIT_SCALE, outputs=("is_top1",),
                                                    vocab_chunk_size=vocab_chunk_size)
    assert ent is None and lss is None and mean is None and lp.shape == (12,)
    assert torch.equal(top1, expected), f"{top1.int().tolist()} != {expected.int().tolist()}"
    trl = ChunkedLogProbFunction.apply(hidden, weight, bias, labels.clamp(min=0), TEMPERATURE, vocab_chunk_size,
                                       None, LOGIT_SCALE, ("is_top1",))[4]
    assert torch.equal(top1, trl & (labels != -100))


@pytest.mark.parametrize("engine", ENGINES)
def test_output_subsets_and_return_convention(engine):
    hidden, weight, bias, labels = _inputs_with_top1(torch.float32, seed=17)
    kwargs = dict(bias=bias, temperature=TEMPERATURE, logit_scale=LOGIT_SCALE, **CHUNKS)
    with use_engine(engine):
        full = linear_log_probs(hidden, weight, labels, outputs=OUTPUTS, **kwargs)
        for outputs in (SFT_OUTPUTS, DPO_OUTPUTS[:4], ("entropy",), ("mean_logits", "log_sum_sq_probs")):
            # each subset is computed by its own kernel variant: same values as the full set, None elsewhere
            part = linear_log_probs(hidden, weight, labels, outputs=outputs, **kwargs)
            assert isinstance(part, tuple) and len(part) == 5
            for name, a, b in zip(OUTPUTS, part, full):
                if name == "log_probs" or name in outputs:
                    assert torch.equal(a, b), f"{name} with outputs={outputs}"
                else:
                    assert a is None, f"{name} not requested but returned"
        # nothing beyond log-probs requested: the plain tensor, as before
        for outputs in (("log_probs",), ()):
            plain = linear_log_probs(hidden, weight, labels, outputs=outputs, **kwargs)
            assert isinstance(plain, torch.Tensor) and torch.equal(plain, full[0])


@pytest.mark.parametrize("engine", ENGINES)
def test_all_labels_ignored_every_output(engine):
    hidden, weight, bias, _ = _inputs(torch.float32, seed=8, n=5)
    labels = torch.full((5,), -100)
    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    with use_engine(engine):
        lp, ent, lss, mean, top1 = linear_log_probs(h, w, labels, bias=b, outputs=OUTPUTS, token_chunk_size=3,
                                                    vocab_chunk_size=20000)
    (lp.sum() + ent.sum()).backward()
    for value in (lp, ent, lss, mean):
        assert (value == 0).all()
    assert not top1.any()
    for grad in (h.grad, w.grad, b.grad):
        assert torch.isfinite(grad).all() and (grad == 0).all()


def test_bad_outputs_raise_clear_errors():
    hidden, weight, bias, labels = _inputs(torch.float32, n=5)
    with pytest.raises(TypeError, match="outputs must be a tuple"):
        linear_log_probs(hidden, weight, labels, outputs="entropy")
    with pytest.raises(ValueError, match=r"outputs has unknown names \['logits'\]"):
        linear_log_probs(hidden, weight, labels, outputs=("entropy", "logits"))


@pytest.mark.parametrize("engine", ENGINES)
def test_autocast_bf16_outputs_stay_fp32(engine):
    # TRL trains under CPU/GPU autocast: the GEMMs then take bf16 operands, but every output stays fp32 (a bf16
    # log-prob would round the loss) and is as accurate as fp32 math on the bf16-rounded operands.
    hidden, weight, bias, labels = _inputs_with_top1(torch.float32, seed=18)
    gen = torch.Generator().manual_seed(19)
    grad_lp, grad_ent = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    with use_engine(engine), torch.autocast("cpu", dtype=torch.bfloat16):
        results = linear_log_probs(h, w, labels, bias=b, temperature=TEMPERATURE, logit_scale=LOGIT_SCALE,
                                   outputs=OUTPUTS, **CHUNKS)
        ((results[0] * grad_lp).sum() + (results[1] * grad_ent).sum()).backward()
    expected, ref_grads = _reference_all(hidden.bfloat16(), weight.bfloat16(), bias, labels, grad_lp, grad_ent)
    _check_outputs(results, expected, labels)
    for actual, ref, name in zip((h.grad, w.grad, b.grad), ref_grads, ("dhidden", "dweight", "dbias")):
        assert actual.dtype == torch.float32
        rtol, atol_rel = GRAD_TOL[torch.bfloat16]  # dz or the gradient itself is rounded to bf16 once
        assert_close(actual, ref, atol=atol_rel * ref.abs().max().item(), rtol=rtol, name=name)


# ---- Masked vocabularies: -inf biases ----------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_vocabulary_every_output(engine, dtype):
    """-inf bias on the whole first vocabulary chunk (so the running max is still -inf when the second starts)
    and on a middle range. Row 6's label is masked: log-prob -inf, gradients still finite."""
    hidden, weight, bias, labels = _inputs(dtype, seed=19)
    masked = torch.zeros(V, dtype=torch.bool)
    masked[:8192 + 50], masked[20000:26000] = True, True
    bias[masked] = float("-inf")
    z = hidden.double() @ weight.double().T + bias.double()
    labels[masked[labels.clamp(min=0)] & (labels >= 0)] = 9000
    labels[2:5] = z[2:5].argmax(-1)
    labels[5], labels[6] = -100, 17
    gen = torch.Generator().manual_seed(20)
    grad_lp, grad_ent = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    with use_engine(engine):
        results = linear_log_probs(h, w, labels, bias=b, temperature=TEMPERATURE, logit_scale=LOGIT_SCALE,
                                   outputs=OUTPUTS, **CHUNKS)
    ((results[0] * grad_lp).sum() + (results[1] * grad_ent).sum()).backward()

    expected, ref_grads = _reference_all(hidden, weight, bias, labels, grad_lp, grad_ent)
    for name, got, ref in zip(OUTPUTS[:4], results, expected):  # assert_close passes inf == inf and NaN vs inf
        assert not got.isnan().any() and torch.equal(got.isinf(), ref.isinf()), f"{name}: {got} vs {ref}"
    assert results[0][6] == float("-inf") and (results[3][labels != -100] == float("-inf")).all()
    _check_outputs(results, expected, labels)
    for actual, ref, name in zip((h.grad, w.grad, b.grad), ref_grads, ("dhidden", "dweight", "dbias")):
        _check_grad(actual, ref, dtype, name)
    masked[17] = False  # row 6's label: d log p_y / d z_y = 1 - p_y = 1 there
    assert (b.grad[masked] == 0).all()


@pytest.mark.parametrize("engine", ENGINES)
def test_every_logit_masked_every_output(engine):
    """No finite logit: the row is read as p = 0 everywhere (log-prob -inf, entropy 0, log sum p^2 -inf,
    is_top1 False; mean_logits is the logits' mean, -inf) and gets a zero gradient."""
    hidden, weight, bias, labels = _inputs(torch.float32, seed=21)
    bias[:] = float("-inf")
    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    with use_engine(engine):
        lp, ent, lss, mean, top1 = linear_log_probs(h, w, labels, bias=b, outputs=OUTPUTS, **CHUNKS)
    (lp.sum() + ent.sum()).backward()
    valid = labels != -100
    ninf = float("-inf")
    assert (lp[valid] == ninf).all() and (ent == 0).all() and (lss[valid] == ninf).all()
    assert (mean[valid] == ninf).all() and not top1.any()
    assert (lp[~valid] == 0).all() and (lss[~valid] == 0).all() and (mean[~valid] == 0).all()
    for grad in (h.grad, w.grad, b.grad):
        assert (grad == 0).all()


def test_recompute_after_autocast_uses_the_forwards_dtype():
    """AMP runs the forward under autocast and the backward after leaving it. A trainable head (or an entropy
    gradient) recomputes the logits in the backward: in the forward's compute dtype (bf16 here), or they no
    longer match the saved log-sum-exp. Same gradients as a backward inside autocast."""
    hidden, weight, bias, labels = _inputs(torch.float32, seed=20)
    gen = torch.Generator().manual_seed(21)
    grad_lp, grad_ent = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    grads = []
    for inside in (True, False):
        h, w, b = leaf(hidden), leaf(weight), leaf(bias)
        with use_engine("triton"):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                results = linear_log_probs(h, w, labels, bias=b, outputs=("log_probs", "entropy"), **CHUNKS)
                loss = (results[0] * grad_lp).sum() + (results[1] * grad_ent).sum()
                if inside:
                    loss.backward()
            if not inside:
                loss.backward()
        grads.append((h.grad, w.grad, b.grad))
    for inside, outside, name in zip(*grads, ("dhidden", "dweight", "dbias")):
        assert torch.equal(inside, outside), f"{name}: max diff {(inside - outside).abs().max().item():.3e}"
