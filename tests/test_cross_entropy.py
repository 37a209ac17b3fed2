"""cross_entropy: Triton (interpreted) and PyTorch paths against float64 torch.nn.functional.cross_entropy."""
import pytest
import torch
from kernel_testing import DTYPES, ENGINES, assert_close

from fastft.doctor.references import cross_entropy_reference
from fastft.kernels._common import use_engine
from fastft.kernels.cross_entropy import cross_entropy

REDUCTIONS = ["mean", "sum", "none"]

# Tolerances. The kernel reads the logits as given and does all math in fp32, and the reference
# runs in float64 on the *same* (already rounded) logits, so input rounding is not an error source:
# - loss: fp32 log-sum-exp over 32k terms, ~1e-6 relative (sums of ~25 rows of ~10: 1e-5 abs);
# - grads: fp32 softmax, then ONE rounding to the logits' dtype: bf16 has 8 mantissa bits, and the
#   interpreter truncates instead of rounding (TRITON-ON-CPU.md), so < 1 ulp <= 2**-7 relative (plus
#   the fp32 error); fp16 rounds correctly (half ulp 2**-11, we allow 2**-10) and softmax values
#   ~1e-6 fall in fp16's subnormal range (spacing 2**-24), hence its atol.
GRAD_TOL = {torch.float32: (1e-5, 0.0), torch.bfloat16: (2**-7 + 1e-5, 0.0), torch.float16: (2**-10, 2**-24)}
LOSS_TOL = dict(atol=1e-6, rtol=4e-6)


def _labels(n, vocab, seed, ignore_share=0.3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_share] = -100
    labels[0] = vocab - 1  # the last column (in the partial last block)
    return labels


def _logits(n, vocab, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab, generator=g) * 3
    # Later vocabulary blocks hold larger logits, so the online max moves and every earlier
    # partial sum must be rescaled (a missing rescale is then a large error, not a tiny one).
    x[:, 20000:] += 5.0
    return x.to(dtype)


def _run(engine, logits, labels, **kw):
    x = logits.detach().clone().requires_grad_()
    with use_engine(engine):
        loss = cross_entropy(x, labels, **kw)
    return x, loss


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_float64_reference(engine, dtype, reduction):
    n, vocab = 23, 32003  # V not a multiple of the 4096-column block; ~30% of labels ignored
    logits, labels = _logits(n, vocab, dtype, seed=1), _labels(n, vocab, seed=2)
    x, loss = _run(engine, logits, labels, reduction=reduction)
    assert loss.dtype == torch.float32
    grad_output = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3))
    loss.backward(grad_output)
    ref_loss, ref_grad = cross_entropy_reference(logits, labels, reduction, grad_output)

    assert_close(loss, ref_loss, **LOSS_TOL, name="loss")
    rtol, atol = GRAD_TOL[dtype]
    assert x.grad.dtype == dtype
    assert_close(x.grad, ref_grad, atol=atol, rtol=rtol, name="dlogits")
    assert (x.grad[labels == -100] == 0).all()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_labels_ignored(engine, reduction):
    logits = _logits(7, 5000, torch.float32, seed=4)
    labels = torch.full((7,), -100)
    x, loss = _run(engine, logits, labels, reduction=reduction)
    loss.backward(torch.ones_like(loss))
    assert torch.isfinite(loss).all() and (loss == 0).all()
    assert torch.isfinite(x.grad).all() and (x.grad == 0).all()


@pytest.mark.parametrize("engine", ENGINES)
def test_small_vocab_int32_labels_and_row_stride(engine):
    # V smaller than the smallest block, int32 labels, rows read through a padded row stride.
    vocab = 5
    storage = torch.randn(9, vocab + 3, generator=torch.Generator().manual_seed(5)).requires_grad_()
    labels = torch.tensor([0, 4, -100, 2, 1, -100, 3, 4, 0], dtype=torch.int32)
    logits = storage[:, :vocab]  # row stride 8, columns contiguous
    with use_engine(engine):
        loss = cross_entropy(logits, labels, reduction="sum")
    loss.backward()
    ref_loss, ref_grad = cross_entropy_reference(logits, labels, "sum", torch.tensor(1.0))
    assert_close(loss, ref_loss, **LOSS_TOL, name="loss")
    assert_close(storage.grad[:, :vocab], ref_grad, atol=1e-7, rtol=1e-5, name="dlogits")
    assert (storage.grad[:, vocab:] == 0).all()


def test_qwen2_sized_vocab_bf16():
    # V = 152064 (Qwen2): 38 blocks per row in the forward loop, 38 column programs per row backward.
    n, vocab = 3, 152064
    logits = (torch.randn(n, vocab, generator=torch.Generator().manual_seed(6)) * 4).bfloat16()
    labels = torch.tensor([vocab - 1, -100, 12345])
    x, loss = _run("triton", logits, labels, reduction="mean")
    loss.backward()
    ref_loss, ref_grad = cross_entropy_reference(logits, labels, "mean", torch.tensor(1.0))
    assert_close(loss, ref_loss, **LOSS_TOL, name="loss")
    assert_close(x.grad, ref_grad, atol=0.0, rtol=GRAD_TOL[torch.bfloat16][0], name="dlogits")


def test_ignored_rows_get_zero_grad_even_for_nonfinite_grad_output():
    logits = _logits(6, 300, torch.float32, seed=7)
    labels = torch.tensor([1, -100, 2, -100, 299, 0])
    x, loss = _run("triton", logits, labels, reduction="none")
    grad_output = torch.tensor([1.0, float("inf"), 2.0, float("nan"), -1.0, 0.5])
    loss.backward(grad_output)
    assert (x.grad[labels == -100] == 0).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("bad", [5000, -5, 1 << 40])
def test_out_of_range_labels_raise(engine, bad):
    logits = torch.randn(4, 5000)
    labels = torch.tensor([0, bad, -100, 3])
    with use_engine(engine), pytest.raises(ValueError, match=r"labels .*\[0, 5000\).*index 1"):
        cross_entropy(logits, labels)


def test_bad_arguments_raise_clear_errors():
    logits, labels = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, labels, reduction="avg")
    with pytest.raises(ValueError, match="labels has 3 elements"):
        cross_entropy(logits, labels[:3])
    with pytest.raises(TypeError, match="logits"):
        cross_entropy(logits.long(), labels)
    with pytest.raises(ValueError, match="logits"):
        cross_entropy(logits.reshape(2, 2, 10), labels)
    with pytest.raises(TypeError, match="labels"):
        cross_entropy(logits, labels.float())
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(logits, labels.reshape(2, 2))


@pytest.mark.parametrize("engine", ENGINES)
def test_empty_batch(engine):
    x = torch.randn(0, 10, requires_grad=True)
    with use_engine(engine):
        losses = [cross_entropy(x, torch.zeros(0, dtype=torch.long), reduction=r) for r in REDUCTIONS]
    assert [loss.shape for loss in losses] == [(), (), (0,)] and losses[0] == 0 and losses[1] == 0
    sum(loss.sum() for loss in losses).backward()
    assert x.grad.shape == (0, 10)


# ---- Masked vocabularies: -inf logits (constrained decoding, -inf biases) ---------------------------------------
MASKED_VOCAB = 8200  # two full 4096-column blocks and a partial third


def _masked_logits(dtype):
    """Rows with -inf logits where the online log-sum-exp starts from -inf; row 5 has no finite logit at all."""
    x = torch.randn(8, MASKED_VOCAB, generator=torch.Generator().manual_seed(8)) * 3
    ninf = float("-inf")
    x[0, :4096] = ninf  # masked prefix: the whole first block
    x[1, 3000:7000] = ninf  # masked middle, across a block border
    x[2, :-1] = ninf  # one finite logit, in the partial last block
    x[3, :5000], x[3, 5001:] = ninf, ninf  # one finite logit, in a middle block
    x[4, :8192] = ninf  # two masked blocks, and the label sits on a -inf logit: loss +inf
    x[5] = ninf  # no finite logit: loss +inf and zero gradient (the documented convention)
    x[7] = ninf  # an ignored row
    labels = torch.tensor([5000, 2000, MASKED_VOCAB - 1, 5000, 17, 3, 42, -100])
    return x.to(dtype), labels


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_logits_match_float64_reference(engine, dtype):
    logits, labels = _masked_logits(dtype)
    x, loss = _run(engine, logits, labels, reduction="none")
    grad_output = torch.rand(8, generator=torch.Generator().manual_seed(9)) + 0.5
    loss.backward(grad_output)
    ref_loss, ref_grad = cross_entropy_reference(logits, labels, "none", grad_output)  # row 5 of the reference is NaN

    assert not loss.isnan().any(), loss
    assert loss[4] == float("inf") and loss[5] == float("inf") and loss[7] == 0
    finite = [0, 1, 2, 3, 6, 7]
    assert_close(loss[finite], ref_loss[finite], **LOSS_TOL, name="loss")
    assert torch.isfinite(x.grad).all()
    rtol, atol = GRAD_TOL[dtype]
    rows = [0, 1, 2, 3, 4, 6, 7]
    assert_close(x.grad[rows], ref_grad[rows], atol=atol, rtol=rtol, name="dlogits")
    # masked logits get exactly zero gradient, except a label's own (d loss / d z_y = p_y - 1 = -1)
    masked = logits.isinf()
    masked[torch.arange(8), labels.clamp(min=0)] = False
    assert (x.grad[masked] == 0).all()
    assert (x.grad[5] == 0).all() and (x.grad[7] == 0).all()


def test_masked_vocabulary_chunks_fold_like_one_pass():
    """ce_forward_rows over vocabulary chunks (first/last): a chunk with no finite logit folds in as -inf."""
    from fastft.kernels.cross_entropy import ce_forward_rows

    logits, labels = _masked_logits(torch.float32)
    n = logits.shape[0]
    whole_lse, whole_loss = torch.empty(n), torch.empty(n)
    ce_forward_rows(logits, labels, whole_lse, whole_loss, ignore_index=-100)
    lse, loss, target = torch.empty(n), torch.empty(n), torch.empty(n)
    bounds = [0, 4096, 8192, MASKED_VOCAB]
    for start, end in zip(bounds[:-1], bounds[1:]):
        ce_forward_rows(logits[:, start:end], labels, lse, loss, target, ignore_index=-100, vocab_start=start,
                        first=start == 0, last=end == MASKED_VOCAB)
    ref = torch.logsumexp(logits.double(), dim=-1)
    valid = labels != -100
    for name, got in (("one pass", whole_lse), ("chunked", lse)):
        assert torch.equal(got[valid].isinf(), ref[valid].isinf()) and not got.isnan().any(), (name, got)
        finite = valid & ref.isfinite()
        assert_close(got[finite], ref[finite], **LOSS_TOL, name=f"lse ({name})")
    assert not loss.isnan().any() and torch.equal(loss.isinf(), whole_loss.isinf())
    assert_close(loss[loss.isfinite()], whole_loss[loss.isfinite()], **LOSS_TOL, name="chunked loss")
