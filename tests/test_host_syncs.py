"""Device-to-host synchronisations per training step of a patched model, counted on the GPU code path.

A host sync (``.item()``, ``.tolist()``, ``nonzero``, boolean-mask indexing, ...) stalls Python until the GPU has
run everything queued before it; one in the middle of a step (say, a label check after the whole forward)
leaves the GPU idle while the rest of the step is queued. This file counts them with dispatch / function modes
and asserts the exact list, by the code that caused each, so a new sync fails here.

Which path is counted: the one a GPU takes. The step runs on CPU tensors with ``"cpu"`` in
``fastft.kernels._common.gpu_simulation("cpu")`` (fastft's GPU branches, its Triton kernels interpreted) and inside
``fastft.memory.cuda_paths.cuda_code_paths()`` (TRL's fused lm head takes its Triton branch, which scores only the
labelled tokens). What counts as a sync on a GPU:

* ``aten._local_scalar_dense`` (``.item()``, ``int()`` / ``bool()`` / ``float()`` of a tensor, ``if tensor:``);
* ``Tensor.tolist`` (a device-to-host copy; on CPU it dispatches nothing, so a function mode sees it);
* ops whose output size depends on the data: ``nonzero``, ``masked_select``, ``unique*``, ``repeat_interleave``
  without ``output_size``, and indexing with a boolean mask (``index`` / ``index_put`` run ``nonzero``);
* ``aten.equal``, and ``torch.cuda.synchronize``;
* ``torch.tensor(data, device=...)`` (``aten.lift_fresh``): a host-to-device copy from pageable memory, which
  PyTorch makes synchronous unless ``non_blocking`` from pinned memory.

Not syncs: ``nonzero_static`` (fixed output size), ``masked_scatter`` (its CUDA size check is asynchronous),
``torch._assert_async`` (a device-side assert).

The counts are compared with the Hugging Face + peft baseline's (eager attention) in the module constants below.
"""
import collections
import os
import traceback

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
import trl
from tiny_models import save_tiny_model
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from trl.trainer.utils import add_fused_lm_head

import fastft
import fastft.kernels as fastft_kernels
import fastft.kernels._common as common
from fastft import FastModel
from fastft.memory.cuda_paths import cuda_code_paths

aten = torch.ops.aten
_SYNC_OPS = {
    aten._local_scalar_dense.default: "item", aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique2.default: "unique", aten.unique_dim.default: "unique", aten.unique_consecutive.default: "unique",
    aten.equal.default: "equal", aten.lift_fresh.default: "host-to-device tensor",
}
_INDEX_OPS = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default)
# fastft.kernels lives outside fastft/ (setup.py's package_dir): its own root
_ROOTS = {os.path.dirname(m.__file__) + os.sep: m.__name__.replace(".", "/")
          for m in (fastft_kernels, fastft, trl, transformers, peft)}


def _site() -> str:
    """The innermost frame of fastft / TRL / transformers / peft code on the stack, as ``module.py:function``;
    ``backward`` when there is none (an op that autograd's engine runs)."""
    for frame in reversed(traceback.extract_stack()):
        for root, package in _ROOTS.items():
            if frame.filename.startswith(root):
                return f"{package}/{frame.filename[len(root):]}:{frame.name}"
    return "backward"


class SyncCounter(TorchDispatchMode):
    """Records ``(kind, site)`` of every host sync in its block (see the module docstring for what counts)."""

    def __init__(self):
        super().__init__()
        self.syncs = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _SYNC_OPS.get(func)
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            kind = "repeat_interleave"
        elif func in _INDEX_OPS and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                        for i in args[1] if i is not None):
            kind = "boolean-mask index"
        if kind is not None:
            self.syncs[(kind, _site())] += 1
        return func(*args, **kwargs)


class _ToList(TorchFunctionMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            self.counter.syncs[("tolist", _site())] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def count_syncs(monkeypatch):
    """``with count_syncs() as counter:`` counts the block's host syncs on the GPU code path."""

    class Counting:
        def __enter__(self):
            self.counter = SyncCounter()
            monkeypatch.setattr(torch.cuda, "synchronize", self._synchronize)
            self.modes = [cuda_code_paths(), _ToList(self.counter), self.counter]
            for mode in self.modes:
                mode.__enter__()
            return self.counter

        def _synchronize(self, *args, **kwargs):
            self.counter.syncs[("cuda.synchronize", _site())] += 1

        def __exit__(self, *exc):
            for mode in reversed(self.modes):
                mode.__exit__(*exc)

    with common.gpu_simulation("cpu"):
        yield Counting


# ---------------------------------------------------------------------------------------------
# The syncs, by the code that makes them

# transformers' own: find_packed_sequence_indices asks whether position_ids restart (every model, the baseline too)
HF_PACKING = ("item", "transformers/masking_utils.py:find_packed_sequence_indices")
# TRL's fused lm head (Triton branch) gathers the labelled tokens: hidden[mask], labels[mask], and the backward of the
# first (index_put with the mask). The baseline has them too; fastft serves the kernel call, not the gather.
TRL_GATHER = [("boolean-mask index", "trl/trainer/utils.py:_fused_forward")] * 2
TRL_GATHER_BACKWARD = [("boolean-mask index", "backward")]
# fastft: one read of (tokens, longest row) of a padding mask, one of (starts, longest, largest position) of restarting
# position_ids: the kernel grid needs the longest sequence on the host. (The attention kernel checks the cu_seqlens
# it is given with a device-side assert, no read back.)
FASTFT_PADDING = ("tolist", "fastft/attention.py:padding_metadata")
FASTFT_PACKING = ("tolist", "fastft/attention.py:packing_metadata")

EXPECTED = {
    "plain": [HF_PACKING],
    "padded": [FASTFT_PADDING],
    "packed": [FASTFT_PACKING, HF_PACKING],
}
# The Hugging Face + peft baseline (eager attention) on the same steps, measured with the same counter: plain 1,
# padded 0 (eager attention takes a dense mask), packed 1 (HF_PACKING); plus TRL_GATHER (+ its backward) on TRL's path.


# ---------------------------------------------------------------------------------------------
# The steps

@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tmp_path_factory):
    path = save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    model, _ = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.float32)
    model = FastModel.get_peft_model(model, r=8, lora_alpha=16)  # gradient checkpointing on (the default)
    model.train()
    return model


def make_batch(kind, seed=0):
    """Fresh tensors (fastft memoises packing metadata on them): 2 rows of 12, the second right-padded from 8 (padded),
    or one row of sequences of 5, 9 and 10 tokens with restarting position_ids (TRL's padding-free packing)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 211, (2, 12), generator=gen)
    if kind == "packed":
        ids = ids.reshape(1, 24)
        positions = torch.cat([torch.arange(n) for n in (5, 9, 10)]).unsqueeze(0)
        return {"input_ids": ids, "position_ids": positions, "labels": ids.clone()}
    batch = {"input_ids": ids, "labels": ids.clone()}
    if kind == "padded":
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 8:] = 0
        batch.update(attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    return batch


@pytest.fixture
def fused_lm_head(model):
    """``fused(outputs)``: TRL's fused lm head on the model, as SFTTrainer / DPOTrainer add it; removed afterwards."""
    base = model.get_base_model()
    saved = base.__dict__.get("forward")

    def fused(outputs):
        add_fused_lm_head(base, outputs=outputs)

    yield fused
    if saved is None:
        base.__dict__.pop("forward", None)
    else:
        base.forward = saved


def labels_step(model, batch):
    # A plain training loop (or the Trainer without TRL): the model's own loss, fastft's fused linear cross-entropy.
    model(**batch, use_cache=False).loss.backward()


def sft_step(model, batch):
    # SFTTrainer.compute_loss (trl 1.16): -sum(log_probs) / tokens from the fused lm head.
    out = model(**batch, use_cache=False, fused_lm_head=True)
    (-out.log_probs.sum() / out.label_mask.sum().clamp(min=1)).backward()


def dpo_step(model, batch):
    # DPOTrainer._compute_loss: rows [chosen, rejected], reference log-probs with the adapter disabled, sigmoid loss.
    with torch.no_grad(), model.disable_adapter():
        ref = model(**batch, use_cache=False, fused_lm_head=True).log_probs.sum(1)
    logps = model(**batch, use_cache=False, fused_lm_head=True).log_probs.sum(1)
    ratios = logps - ref
    (-F.logsigmoid(0.1 * (ratios[0] - ratios[1]))).backward()


SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")  # sft_trainer.py
DPO_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")  # dpo_trainer.py

# (step, fused lm-head outputs or None, the TRL syncs it adds beyond EXPECTED, the forwards it runs)
STEPS = {
    "labels": (labels_step, None, [], 1),
    "sft": (sft_step, SFT_OUTPUTS, TRL_GATHER + TRL_GATHER_BACKWARD, 1),
    "dpo": (dpo_step, DPO_OUTPUTS, TRL_GATHER * 2 + TRL_GATHER_BACKWARD, 2),
}


def _listing(syncs):
    return "\n".join(f"  {n} x {kind} at {site}" for (kind, site), n in sorted(syncs.items())) or "  none"


# trl 1.16's DPOTrainer has no padding-free batches (it turns padding_free off): no packed DPO case
CASES = [(loss, kind) for loss in STEPS for kind in ("plain", "padded", "packed") if (loss, kind) != ("dpo", "packed")]


@pytest.mark.parametrize("loss,kind", CASES)
def test_host_syncs_per_training_step(model, fused_lm_head, count_syncs, loss, kind):
    step, outputs, trl_syncs, forwards = STEPS[loss]
    if outputs is not None:
        fused_lm_head(outputs)
    # every forward (DPO's reference pass too) makes the model's syncs; TRL's come on top
    expected = collections.Counter(EXPECTED[kind] * forwards + trl_syncs)
    model.zero_grad(set_to_none=True)
    batch = make_batch(kind)
    with count_syncs() as counter:
        step(model, batch)
    assert counter.syncs == expected, (
        f"host syncs of a {loss} step on a {kind} batch:\n{_listing(counter.syncs)}\nexpected:\n{_listing(expected)}")
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)  # the step really trained


def test_counter_sees_each_kind_of_sync(count_syncs):
    # the counter itself: each listed kind is seen once, nothing else is
    x = torch.arange(6)
    mask = x > 2
    with count_syncs() as counter:
        int(x.max())
        x.tolist()
        x.nonzero()
        x[mask]
        x.repeat_interleave(x)
        x.repeat_interleave(x, output_size=15)  # sized: no sync
        x.nonzero_static(size=3)  # sized: no sync
        torch.zeros(6).masked_scatter(mask, torch.ones(6))  # asynchronous size check: no sync
        torch.tensor([1, 2])
        torch.cuda.synchronize()
    kinds = collections.Counter(kind for kind, _ in counter.syncs.elements())
    assert kinds == collections.Counter(["item", "tolist", "nonzero", "boolean-mask index", "repeat_interleave",
                                         "host-to-device tensor", "cuda.synchronize"])


@pytest.mark.parametrize("op", ["cross_entropy", "fused_linear_cross_entropy", "linear_log_probs"])
def test_lm_head_ops_check_labels_on_the_device(count_syncs, op):
    """On the GPU path the label check reads nothing back (the mean's 1 / n_valid stays on the device too); a bad
    label fails the device-side assert (on a GPU: "device-side assert triggered" at the next sync; on CPU tensors
    torch._assert_async raises at once, with the message)."""
    from fastft.kernels import cross_entropy, fused_linear_cross_entropy, linear_log_probs

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen)
    labels = torch.tensor([3, -100, 49, 0, 7, -100, 12])

    def run(y):
        if op == "cross_entropy":
            return cross_entropy(hidden @ weight.T, y)
        if op == "fused_linear_cross_entropy":
            return fused_linear_cross_entropy(hidden, weight, y)
        return linear_log_probs(hidden, weight, y).sum()

    with count_syncs() as counter:
        loss = run(labels)
        loss.backward()
    assert not counter.syncs, _listing(counter.syncs)
    reference = F.cross_entropy(hidden @ weight.T, labels) if op != "linear_log_probs" else \
        -F.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    bad = labels.clone()
    bad[4] = 50
    with count_syncs(), pytest.raises(RuntimeError, match=r"labels must be in \[0, 50\) or equal ignore_index=-100"):
        run(bad)
