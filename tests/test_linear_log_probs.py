"""linear_log_probs: Triton (interpreted) and PyTorch paths against float64 autograd, and against TRL's
ChunkedLogProbFunction (the op it replaces)."""
import pytest
import torch
from kernel_testing import assert_close
from trl.kernels.chunked_logprob import ChunkedLogProbFunction

from fastft.kernels._common import use_engine
from fastft.kernels.linear_log_probs import linear_log_probs

ENGINES = ["triton", "torch"]
N, H, V = 23, 40, 32003
TEMPERATURE, LOGIT_SCALE = 0.7, 1.3
# 2 token chunks (16 + 7 rows) x 4 vocabulary chunks (3 x 8192 + 7427): the running lse crosses
# chunk borders and labels land in every chunk.
CHUNKS = dict(token_chunk_size=16, vocab_chunk_size=8192)

# Tolerances (reference: float64 math on the same, already rounded, inputs).
# - log-probs: fp32 GEMM over H = 40 then fp32 log-sum-exp over 32k terms, ~1e-6 relative on values ~10,
#   in every dtype (the logits are formed in fp32 from the stored operands).
# - grads, fp32: sums over V = 32k (dhidden) or N products, fp32 rounding ~ sqrt(V) * 2**-24 ~ 1e-5 of
#   the summed magnitudes: 1e-5 relative + 1e-5 of the largest gradient (cancellation between the
#   label term and sum_j p_j W_j leaves small elements with the large terms' absolute error).
# - grads, bf16: dz is rounded to bf16 (< 2**-7, interpreter truncation) before the GEMMs, the result
#   rounded to bf16 again (2**-8): 2**-6 relative, 2**-7 of the largest gradient absolute.
GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2**-6, 2**-7), torch.float16: (2**-9, 2**-10)}
LOGP_TOL = dict(atol=5e-6, rtol=2e-6)


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
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = bias.detach().double().requires_grad_() if bias is not None else None
    z = h @ w.T + (b if b is not None else 0)
    z = z * LOGIT_SCALE / TEMPERATURE
    valid = labels != -100
    logp = torch.log_softmax(z, dim=-1).gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    logp = torch.where(valid, logp, 0.0)
    logp.backward(grad_output.double())
    return logp.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def _leaf(t, requires_grad=True):
    return None if t is None else t.clone().requires_grad_(requires_grad)


def _check_grad(actual, expected, dtype, name):
    rtol, atol_rel = GRAD_TOL[dtype]
    assert actual.dtype == dtype, f"{name} dtype {actual.dtype}"
    assert_close(actual, expected, atol=atol_rel * expected.abs().max().item(), rtol=rtol, name=name)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_float64_reference(engine, dtype, with_bias):
    hidden, weight, bias, labels = _inputs(dtype, with_bias=with_bias)
    h, w, b = _leaf(hidden), _leaf(weight), _leaf(bias)
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

    h, w, b = _leaf(hidden), _leaf(weight), _leaf(bias)
    ours = linear_log_probs(h, w, labels, bias=b, temperature=TEMPERATURE, logit_scale=LOGIT_SCALE)  # default tiles
    ours.backward(grad_output)

    th, tw, tb = _leaf(hidden), _leaf(weight), _leaf(bias)
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
    h, w, b = _leaf(hidden), _leaf(weight, False), _leaf(bias, False)
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
    h, w, b = _leaf(hidden, False), _leaf(weight), _leaf(bias)
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
    h, w, b = _leaf(hidden), _leaf(weight), _leaf(bias)
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
