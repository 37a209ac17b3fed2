"""use_gradient_checkpointing as a number of layers and "auto" (fastft/checkpointing.py, fastft/memory/plan.py):
the plan equals what the accounting says fits, and a model trained with it computes the same gradients."""
from __future__ import annotations

import logging

import pytest
import torch
from kernel_testing import assert_close
from tiny_models import lora_grads, padded_batch, randomize_lora, save_tiny_model, tiny_config

from fastft import FastModel, estimate_memory
from fastft.memory.plan import plan_memory

LAYERS = 6
SEQ = 256  # what the plan is made for (the test batches are shorter)
LORA = dict(r=4, lora_alpha=8)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama6"), num_hidden_layers=LAYERS,
                           max_position_embeddings=4096)


@pytest.fixture(scope="module")
def llama3_path(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama3"), num_hidden_layers=3)


def _model(path, max_seq_length=SEQ, **peft_kwargs):
    model, _ = FastModel.from_pretrained(path, max_seq_length=max_seq_length, dtype=torch.float32)
    model = FastModel.get_peft_model(model, **LORA, **peft_kwargs)
    randomize_lora(model)
    return model


def _flags(model):
    return [layer.gradient_checkpointing for layer in model.get_base_model().model.layers]


def _peak(layers, **kwargs):
    config = tiny_config("llama", num_hidden_layers=LAYERS, max_position_embeddings=4096)
    return estimate_memory(config, SEQ, use_gradient_checkpointing=layers, **LORA, **kwargs).peak_gb


def test_a_number_of_layers_checkpoints_the_first_ones_and_survives_reenabling(llama_path):
    model = _model(llama_path, use_gradient_checkpointing=2)
    assert _flags(model) == [True, True] + [False] * (LAYERS - 2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as TRL does
    assert _flags(model) == [True, True] + [False] * (LAYERS - 2)
    assert _flags(_model(llama_path, use_gradient_checkpointing=0)) == [False] * LAYERS


def test_auto_checkpoints_the_fewest_layers_that_fit_the_budget(llama_path, caplog):
    peaks = [_peak(k) for k in range(LAYERS + 1)]
    assert all(a > b for a, b in zip(peaks, peaks[1:]))  # each checkpointed layer saves memory
    budget = (peaks[2] + peaks[3]) / 2  # 3 layers fit, 2 do not
    with caplog.at_level(logging.WARNING, logger="fastft"):
        model = _model(llama_path, use_gradient_checkpointing="auto", memory_budget_gb=budget)
    assert _flags(model) == [True] * 3 + [False] * (LAYERS - 3)
    assert "checkpointing 3 of 6 layers" in caplog.text and "fits the budget" in caplog.text
    assert (_flags(_model(llama_path, use_gradient_checkpointing="auto", memory_budget_gb=peaks[0] + 0.01))
            == [False] * LAYERS)


def test_auto_offloads_then_chunks_the_mlp_when_checkpointing_is_not_enough():
    # an MLP much wider than the hidden size and the vocabulary, as in real models, so its [T, I] tensors dominate
    config = tiny_config("llama", num_hidden_layers=LAYERS, intermediate_size=1024, vocab_size=128,
                         max_position_embeddings=8192)
    tokens = 4096
    every = estimate_memory(config, tokens, use_gradient_checkpointing=True, **LORA).peak_gb
    offloaded = estimate_memory(config, tokens, use_gradient_checkpointing="offload", **LORA).peak_gb
    chunked = {chunk: estimate_memory(config, tokens, use_gradient_checkpointing="offload", mlp_chunk_tokens=chunk,
                                      **LORA).peak_gb for chunk in (2048, 1024)}
    assert every > offloaded > chunked[2048] > chunked[1024]
    plan = plan_memory(config, tokens, 1, (every + offloaded) / 2, **LORA)
    assert (plan.checkpointed_layers, plan.offload, plan.mlp_chunk_tokens) == (LAYERS, True, None)
    for chunk, budget in ((2048, (offloaded + chunked[2048]) / 2), (1024, (chunked[2048] + chunked[1024]) / 2)):
        plan = plan_memory(config, tokens, 1, budget, **LORA)  # the largest chunk that fits
        assert (plan.offload, plan.mlp_chunk_tokens, plan.peak_gb) == (True, chunk, chunked[chunk]) and plan.fits
    hopeless = plan_memory(config, tokens, 1, chunked[1024] / 2, **LORA)
    assert not hopeless.fits and "does NOT fit" in hopeless.describe()


@pytest.mark.parametrize("settings", [dict(use_gradient_checkpointing=2), dict(mlp_chunk_tokens=5),
                                      dict(use_gradient_checkpointing="offload", mlp_chunk_tokens=4)],
                         ids=["2-of-3-layers", "mlp-chunks", "offload-and-chunks"])
def test_partial_checkpointing_and_mlp_chunks_give_the_gradients_of_full_checkpointing(llama3_path, settings):
    full = _model(llama3_path, max_seq_length=64, use_gradient_checkpointing=True)
    other = _model(llama3_path, max_seq_length=64, **settings)
    ids, mask, labels = padded_batch()
    results = []
    for model in (full, other):
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), lora_grads(model)))
    (loss_full, grads_full), (loss_other, grads_other) = results
    assert_close(loss_other, loss_full, atol=1e-6, rtol=1e-6, name="loss")
    assert grads_other.keys() == grads_full.keys() and len(grads_full) == 3 * 14
    for name in grads_full:
        assert_close(grads_other[name], grads_full[name], atol=1e-6, rtol=1e-5, name=name)


@pytest.mark.parametrize("kwargs, message", [
    (dict(use_gradient_checkpointing="auto"), "needs memory_budget_gb"),
    (dict(use_gradient_checkpointing=True, memory_budget_gb=8), "memory_budget_gb is read only with"),
    (dict(use_gradient_checkpointing="auto", memory_budget_gb=8, mlp_chunk_tokens=512), "chosen by the plan"),
    (dict(use_gradient_checkpointing=LAYERS + 1), "a number of layers in \\[0, 6\\]"),
    (dict(use_gradient_checkpointing="sometimes"), "use_gradient_checkpointing must be"),
    (dict(mlp_chunk_tokens=0), "mlp_chunk_tokens must be a positive int"),
    (dict(use_gradient_checkpointing="auto", memory_budget_gb=-1), "memory_budget_gb must be positive"),
])
def test_bad_memory_settings_are_clear_errors(llama_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _model(llama_path, **kwargs)


def test_adapters_of_a_16bit_model_take_its_dtype_and_the_step_makes_no_fp32_activation(llama3_path):
    """peft makes fp32 adapters; on a bf16 model they would take the unfused path, with fp32 copies of the
    [tokens, intermediate] activations (issue 12.3). get_peft_model casts them, as TRL does for 4-bit models."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model, _ = FastModel.from_pretrained(llama3_path, max_seq_length=64, dtype=torch.bfloat16)
    model = FastModel.get_peft_model(model, **LORA, use_gradient_checkpointing=False)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    intermediate = model.config.intermediate_size

    class Fp32Activations(TorchDispatchMode):
        found = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape[-1:] == (intermediate,):
                    self.found.append((str(func), tuple(t.shape)))
            return out

    ids = torch.randint(0, 211, (2, 13))
    with Fp32Activations() as mode:
        model(input_ids=ids, labels=ids).loss.backward()
    assert mode.found == []
