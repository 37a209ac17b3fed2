"""fused_linear_cross_entropy: Triton (interpreted) and PyTorch paths against float64 autograd of
cross_entropy(hidden @ weight.T, labels)."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import ENGINES, assert_close, check_grad

from fastft.doctor.references import linear_cross_entropy_reference
from fastft.kernels._common import use_engine
from fastft.kernels.fused_linear_cross_entropy import _default_chunk_rows, fused_linear_cross_entropy

REDUCTIONS = ["mean", "sum", "none"]
N, H, V = 23, 48, 32003  # 23 tokens in chunks of 16 (the last one partial); V not a block multiple

# Tolerances (reference: float64 math on the same, already rounded, inputs).
# - loss: the logits GEMM accumulates in fp32 and all softmax math is fp32 in every dtype: ~1e-6
#   relative on values of ~10 (sums of ~25 of them).
# - grads, fp32: dhidden is an fp32 sum of V = 32k products: rounding grows like sqrt(V) * 2**-24 ~ 1e-5
#   of the summed magnitudes, so 1e-5 relative plus 1e-5 of the largest gradient (elements that are small
#   through cancellation of the -W[label] and sum_j p_j W_j terms keep the large terms' absolute error).
# - grads, bf16/fp16: dlogits is rounded once to the compute dtype (bf16 under the interpreter truncates:
#   < 2**-7), the GEMM result is rounded once (2**-8) and so is the scaling by grad_output (2**-8): 2**-6
#   relative; elements that are small through cancellation carry the absolute error of the large terms,
#   2**-7 of the largest gradient. fp16 has 3 more mantissa bits.
GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2**-6, 2**-7), torch.float16: (2**-9, 2**-10)}
LOSS_TOL = dict(atol=2e-6, rtol=2e-6)


def _inputs(dtype, seed=0, n=N, ignore_share=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.4).to(dtype)
    labels = torch.randint(0, V, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_share] = -100
    labels[0] = V - 1
    return hidden, weight, labels


def _check_grad(actual, expected, dtype, name):
    check_grad(actual, expected, dtype, GRAD_TOL[dtype], name)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_float64_reference(engine, dtype, reduction):
    hidden, weight, labels = _inputs(dtype)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with use_engine(engine):
        loss = fused_linear_cross_entropy(h, w, labels, reduction=reduction, chunk_size=16)
    assert loss.dtype == torch.float32
    grad_output = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1))
    loss.backward(grad_output)
    ref_loss, ref_dh, ref_dw = linear_cross_entropy_reference(hidden, weight, labels, reduction, grad_output)
    assert_close(loss, ref_loss, **LOSS_TOL, name="loss")
    _check_grad(h.grad, ref_dh, dtype, "dhidden")
    _check_grad(w.grad, ref_dw, dtype, "dweight")
    assert (h.grad[labels == -100] == 0).all()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_softcap_matches_float64_reference(engine, dtype, reduction):
    """Gemma 2's soft-capped logits, ``30 * tanh(z / 30)``, with logits of size ~20 (the cap bends them): the loss and
    both gradients through the cap's slope, on the precomputed-gradient path (mean) and the recompute path (none).
    Tolerances as above: the fp32 tanh adds a few ulp of c to the logits (~1e-5 of the loss)."""
    hidden, weight, labels = _inputs(dtype, seed=5)
    hidden = (hidden.float() * 8).to(dtype)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with use_engine(engine):
        loss = fused_linear_cross_entropy(h, w, labels, reduction=reduction, chunk_size=16, softcap=30.0)
    grad_output = torch.rand(loss.shape, generator=torch.Generator().manual_seed(6)) + 0.5
    loss.backward(grad_output)
    ref_loss, ref_dh, ref_dw = linear_cross_entropy_reference(hidden, weight, labels, reduction, grad_output,
                                                              softcap=30.0)
    assert_close(loss, ref_loss, atol=2e-5, rtol=2e-6, name="loss")
    _check_grad(h.grad, ref_dh, dtype, "dhidden")
    _check_grad(w.grad, ref_dw, dtype, "dweight")
    uncapped = linear_cross_entropy_reference(hidden, weight, labels, reduction, grad_output)[0]
    assert (uncapped - ref_loss).abs().max() > 0.1  # the cap matters at these logits


def test_fp16_and_default_chunk_size():
    hidden, weight, labels = _inputs(torch.float16, seed=2)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels)  # default chunking: one chunk of 23 rows here
    loss.backward()
    ref_loss, ref_dh, ref_dw = linear_cross_entropy_reference(hidden, weight, labels, "mean", torch.tensor(1.0))
    assert_close(loss, ref_loss, **LOSS_TOL, name="loss")
    _check_grad(h.grad, ref_dh, torch.float16, "dhidden")
    _check_grad(w.grad, ref_dw, torch.float16, "dweight")


def test_default_chunk_rows_fit_the_byte_budget_whatever_the_length():
    assert _default_chunk_rows(37, V, 2) == 37  # short inputs: one chunk
    # Llama-3's 128k vocabulary, bf16: 256 rows of fp32 logits + bf16 gradient (188 MiB) per chunk, at 2k or 1M tokens
    assert _default_chunk_rows(2048, 128256, 2) == _default_chunk_rows(1 << 20, 128256, 2) == 256
    assert _default_chunk_rows(2048, 128256, 4) == 512  # fp32: the gradient overwrites the logits
    assert _default_chunk_rows(0, V, 2) == 1


def test_second_backward_is_refused():
    """The backward scales the gradients the forward saved in place: a second backward would scale them twice."""
    hidden, weight, labels = _inputs(torch.float32, seed=3, n=13)
    h = hidden.clone().requires_grad_(True)
    loss = fused_linear_cross_entropy(h, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once per forward"):
        loss.backward()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("trainable", ["hidden", "weight"])
def test_frozen_weight_or_hidden(engine, reduction, trainable):
    hidden, weight, labels = _inputs(torch.float32, seed=3, n=13)
    h = hidden.clone().requires_grad_(trainable == "hidden")
    w = weight.clone().requires_grad_(trainable == "weight")
    with use_engine(engine):
        loss = fused_linear_cross_entropy(h, w, labels, reduction=reduction, chunk_size=5)
    grad_output = torch.randn(loss.shape, generator=torch.Generator().manual_seed(4))
    loss.backward(grad_output)
    _, ref_dh, ref_dw = linear_cross_entropy_reference(hidden, weight, labels, reduction, grad_output)
    if trainable == "hidden":
        assert w.grad is None
        _check_grad(h.grad, ref_dh, torch.float32, "dhidden")
    else:
        assert h.grad is None
        _check_grad(w.grad, ref_dw, torch.float32, "dweight")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_labels_ignored(engine, reduction):
    hidden, weight, _ = _inputs(torch.float32, seed=5, n=7)
    labels = torch.full((7,), -100)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with use_engine(engine):
        loss = fused_linear_cross_entropy(h, w, labels, reduction=reduction, chunk_size=4)
    loss.backward(torch.ones_like(loss))
    assert torch.isfinite(loss).all() and (loss == 0).all()
    for grad in (h.grad, w.grad):
        assert torch.isfinite(grad).all() and (grad == 0).all()


def test_mixed_dtypes_and_no_grad():
    # bf16 hidden states with an fp32 head (peft's prepare_model_for_kbit_training upcasts lm_head):
    # the GEMMs run in fp32, each gradient comes back in its input's dtype.
    hidden, weight, labels = _inputs(torch.float32, seed=6, n=11)
    hidden = hidden.bfloat16()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels, reduction="sum", chunk_size=8)
    loss.backward()
    ref_loss, ref_dh, ref_dw = linear_cross_entropy_reference(hidden, weight, labels, "sum", torch.tensor(1.0))
    assert_close(loss, ref_loss, **LOSS_TOL, name="loss")
    _check_grad(h.grad, ref_dh, torch.bfloat16, "dhidden")  # fp32 math, one rounding to bf16
    _check_grad(w.grad, ref_dw, torch.float32, "dweight")
    with torch.no_grad():
        again = fused_linear_cross_entropy(h, w, labels, reduction="sum", chunk_size=8)
    assert not again.requires_grad
    assert_close(again, ref_loss, **LOSS_TOL, name="loss under no_grad")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_bf16_logits_stay_fp32(engine, reduction):
    """Under autocast the GEMMs take bf16 operands (as nn.Linear would), but the logits and all that follows stay
    fp32 in BOTH engines, as in linear_log_probs: loss and gradients are fp32 math on the bf16-rounded operands.
    (The PyTorch engine used to run the matmul in bf16 there, rounding every logit to 8 bits: loss ~1e-2 off.)"""
    hidden, weight, labels = _inputs(torch.float32, seed=7)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    grad_output = torch.randn(() if reduction == "mean" else (N,), generator=torch.Generator().manual_seed(8))
    with use_engine(engine), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h, w, labels, reduction=reduction, chunk_size=16)
        loss.backward(grad_output)
    ref_loss, ref_dh, ref_dw = linear_cross_entropy_reference(hidden.bfloat16(), weight.bfloat16(), labels, reduction,
                                                              grad_output)
    assert loss.dtype == torch.float32
    assert_close(loss, ref_loss, **LOSS_TOL, name="loss")
    # fp32 leaves, each gradient rounded to bf16 once on the way (dz, or the GEMM's operands)
    check_grad(h.grad, ref_dh, torch.float32, GRAD_TOL[torch.bfloat16], "dhidden")
    check_grad(w.grad, ref_dw, torch.float32, GRAD_TOL[torch.bfloat16], "dweight")


@pytest.mark.parametrize("engine", ENGINES)
def test_out_of_range_labels_raise(engine):
    hidden, weight, labels = _inputs(torch.float32, n=5)
    labels[3] = V
    with use_engine(engine), pytest.raises(ValueError, match=r"labels .*\[0, 32003\).*index 3 is 32003"):
        fused_linear_cross_entropy(hidden, weight, labels)
    labels[3] = -1
    with use_engine(engine), pytest.raises(ValueError, match=r"labels .*index 3 is -1"):
        fused_linear_cross_entropy(hidden, weight, labels)


def test_bad_arguments_raise_clear_errors():
    hidden, weight, labels = _inputs(torch.float32, n=5)
    with pytest.raises(ValueError, match="weight must be \\[V, H\\]"):
        fused_linear_cross_entropy(hidden, weight[:, :7], labels)
    with pytest.raises(ValueError, match="labels has 4 elements"):
        fused_linear_cross_entropy(hidden, weight, labels[:4])
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(TypeError, match="hidden"):
        fused_linear_cross_entropy(hidden.long(), weight, labels)
    with pytest.raises(ValueError, match="hidden"):
        fused_linear_cross_entropy(hidden[None], weight, labels)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(hidden, weight, labels, chunk_size=0)


@pytest.mark.parametrize("engine", ENGINES)
def test_empty_batch(engine):
    h, w = torch.randn(0, H, requires_grad=True), torch.randn(10, H, requires_grad=True)
    with use_engine(engine):
        losses = [fused_linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long), reduction=r) for r in REDUCTIONS]
    assert [loss.shape for loss in losses] == [(), (), (0,)] and losses[0] == 0 and losses[1] == 0
    sum(loss.sum() for loss in losses).backward()
    assert h.grad.shape == (0, H) and (w.grad == 0).all()


def test_fp32_output_gemm_only_from_torch_2_10():
    from fastft.kernels.fused_linear_cross_entropy import _torch_has_fp32_output_gemm

    assert not _torch_has_fp32_output_gemm("2.4.1")
    assert not _torch_has_fp32_output_gemm("2.9.1+cu128")  # has the overload, rejects mixed dtypes on CUDA
    assert _torch_has_fp32_output_gemm("2.10.0a0+git1234")
    assert _torch_has_fp32_output_gemm("2.13.0+cpu")


@pytest.mark.parametrize("fp32_output_gemm", [True, False])
def test_gpu_gemms_never_copy_the_head_to_fp32(monkeypatch, fp32_output_gemm):
    """On a GPU (simulated: the memory accounting's meta device) the lm-head GEMMs with bf16 operands allocate
    nothing (torch >= 2.10) or one bf16 product (older torch), never an fp32 copy of the [V, H] head (2 GB for
    Llama-3-8B, which torch < 2.8's fallback made in every chunk)."""
    from fastft.memory.simulated_gpu import simulated_gpu

    flce = importlib.import_module("fastft.kernels.fused_linear_cross_entropy")  # not the function of that name
    monkeypatch.setattr(flce, "FP32_OUTPUT_GEMM", fp32_output_gemm)
    with simulated_gpu() as gpu:
        h = torch.empty(64, 512, dtype=torch.bfloat16, device="meta")
        w = torch.empty(4096, 512, dtype=torch.bfloat16, device="meta")
        out = torch.empty(64, 4096, dtype=torch.float32, device="meta")
        acc = torch.zeros(4096, 512, dtype=torch.float32, device="meta")
        dlogits = torch.empty(64, 4096, dtype=torch.bfloat16, device="meta")
        gpu.reset_peak()
        start = gpu.live
        flce.mm_fp32(h, w.t(), out=out)
        flce.addmm_fp32(acc, dlogits.t(), h)
        extra = gpu.peak - start
    assert extra == (0 if fp32_output_gemm else 4096 * 512 * 2)  # at most the bf16 [V, H] product of addmm


def test_older_torch_gemms_on_a_gpu_are_16bit_products_summed_in_fp32(monkeypatch, gpu_path_on_cpu):
    flce = importlib.import_module("fastft.kernels.fused_linear_cross_entropy")
    monkeypatch.setattr(flce, "FP32_OUTPUT_GEMM", False)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(33, 70, generator=gen).bfloat16(), torch.randn(70, 45, generator=gen).bfloat16()
    exact = a.double() @ b.double()
    out = flce.mm_fp32(a, b, out=torch.empty(33, 45))
    acc = torch.ones(33, 45)
    flce.addmm_fp32(acc, a, b)
    # the product rounded once to bf16 (2^-9 relative to each element, so at most 2^-9 of the largest), no worse
    bf16_rounding = dict(atol=2.0**-8 * exact.abs().max().item(), rtol=0)
    assert_close(out, exact, **bf16_rounding, name="mm_fp32")
    assert_close(acc, exact + 1, **bf16_rounding, name="addmm_fp32")


def test_fp16_gradients_under_a_loss_scale_keep_the_small_probabilities():
    """GradScaler multiplies the loss by 65536 after the forward; the forward must not have rounded p / n to
    fp16 by then (p ~ 1/V, n tokens): with 4096 tokens and 8192 logits each, p / n is below fp16's smallest
    subnormal and flushed to zero: the gradient was 4% off. Now within fp16 rounding of float64."""
    gen = torch.Generator().manual_seed(0)
    N, V, H = 4096, 8192, 16
    hidden = torch.randn(N, H, generator=gen).half()
    weight = (torch.randn(V, H, generator=gen) / H**0.5).half()
    labels = torch.randint(0, V, (N,), generator=gen)
    h = hidden.clone().requires_grad_(True)
    (fused_linear_cross_entropy(h, weight, labels) * 65536).backward()
    h64 = hidden.double().requires_grad_(True)
    (F.cross_entropy(h64 @ weight.double().t(), labels) * 65536).backward()
    worst = (h.grad.double() - h64.grad).abs().max() / h64.grad.abs().max()
    assert worst < 2e-3, f"fp16 gradient {worst:.2%} off float64 (of the largest element)"


def _masked_head(dtype, masked_columns):
    """Inputs whose logits are -inf on `masked_columns` of the vocabulary: the last hidden feature is 1 on every
    row and the last weight column -inf there (0 elsewhere), so those logits are finite + (-inf)."""
    hidden, weight, labels = _inputs(dtype, seed=3)
    hidden[:, -1] = 1.0
    weight[:, -1] = 0.0
    weight[masked_columns, -1] = float("-inf")
    return hidden, weight, labels


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_masked_vocabulary(engine, dtype, reduction):
    """A masked prefix (the whole first 4096-column block) and a masked middle; labels avoid them. hidden is
    frozen here: its gradient dz @ W would multiply the masked logits' zero gradient by the -inf weights."""
    masked = torch.zeros(V, dtype=torch.bool)
    masked[:4100], masked[10000:20000] = True, True
    hidden, weight, labels = _masked_head(dtype, masked)
    labels[(labels >= 0) & masked[labels.clamp(min=0)]] = 5000
    w = weight.clone().requires_grad_()
    with use_engine(engine):
        loss = fused_linear_cross_entropy(hidden, w, labels, reduction=reduction, chunk_size=16)
    grad_output = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    loss.backward(grad_output)

    hd, wd = hidden.double(), weight.double().requires_grad_()
    ref = F.cross_entropy(hd @ wd.T, labels, ignore_index=-100, reduction=reduction)
    ref.backward(grad_output.double())
    assert_close(loss, ref.detach(), **LOSS_TOL, name="loss")
    assert torch.isfinite(w.grad).all() and (w.grad[masked] == 0).all()
    _check_grad(w.grad, wd.grad, dtype, "dweight")


@pytest.mark.parametrize("engine", ENGINES)
def test_every_logit_masked(engine):
    """No finite logit in a row: loss +inf (mean: +inf), zero gradient; ignored rows stay 0."""
    hidden, weight, labels = _masked_head(torch.float32, slice(None))
    w = weight.clone().requires_grad_()
    with use_engine(engine):
        rows = fused_linear_cross_entropy(hidden, w, labels, reduction="none", chunk_size=16)
        mean = fused_linear_cross_entropy(hidden, w, labels, reduction="mean", chunk_size=16)
    valid = labels != -100
    assert (rows[valid] == float("inf")).all() and (rows[~valid] == 0).all() and mean == float("inf")
    (rows.sum() + mean).backward()
    assert (w.grad == 0).all()


def test_recompute_after_autocast_uses_the_forwards_dtype():
    """AMP runs the forward under autocast and the backward after leaving it. reduction="none" recomputes the logits
    in the backward: in the forward's compute dtype (bf16 here), or they no longer match the saved log-sum-exp
    (fp32 recomputed: dhidden ~0.4% of its largest element off). Same gradients as a backward inside autocast."""
    hidden, weight, labels = _inputs(torch.float32, seed=9)
    grad_output = torch.randn(N, generator=torch.Generator().manual_seed(10))
    grads = []
    for inside in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with use_engine("triton"):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = fused_linear_cross_entropy(h, w, labels, reduction="none", chunk_size=16)
                if inside:
                    loss.backward(grad_output)
            if not inside:
                loss.backward(grad_output)
        grads.append((h.grad, w.grad))
    for inside, outside, name in zip(*grads, ("dhidden", "dweight")):
        assert torch.equal(inside, outside), f"{name}: max diff {(inside - outside).abs().max().item():.3e}"
