"""fp16 training (what ``dtype=None`` picks on V100 and T4) keeps fp32 master weights of the LoRA adapters
(fastft/master_weights.py): a plain AdamW loop and TRL's SFTTrainer, 4-bit and 16-bit, with and without a
GradScaler, follow the loss curve of the Hugging Face baseline (transformers + peft in fp16, peft's fp32 adapters).

Tolerance: both sides compute the frozen model in fp16 and round its activations (unit roundoff u = 2^-11) at
different points (fastft's fused kernels, and its LoRA branch on fp16 copies of the adapters, against peft's eager
modules and fp32 LoRA branch); the optimizer updates the same fp32 weights from gradients that differ by as much.
Measured: at most 3e-5 relative over these steps. 2u relative (1e-3) allows that; the faults it guards against are
far larger: fp16 adapters give NaN at the second AdamW step, "Attempting to unscale FP16 gradients" under a
GradScaler, and under TRL leave the curve by 0.7% at the third step. (TRL's bf16 adapters of a 4-bit model stay
within 1e-4 for these few steps: the dtype checks catch those.)
"""
import peft
import pytest
import torch
import transformers
import trl
from test_trl import arithmetic_chats
from tiny_models import LORA_TARGETS, bnb_config, copy_lora, keep_bnb_standard_path, padded_batch, save_tiny_model
from tiny_tokenizer import tiny_tokenizer

from fastft import FastModel
from fastft.kernels import use_engine

RTOL = 2**-10
STEPS = 5


@pytest.fixture(autouse=True)
def _pytorch_engine():
    # the training dtypes are under test; the kernels are tested in fp16 against references in their own files
    with use_engine("torch"):
        yield


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama"), num_hidden_layers=1)


def models(path, load_in_4bit=True, baseline_dtype=torch.float16, modules_to_save=None):
    """The baseline (transformers + peft: fp32 adapters) in ``baseline_dtype`` and the fastft model in fp16, with the
    same LoRA initialisation."""
    baseline = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=baseline_dtype, quantization_config=bnb_config(baseline_dtype) if load_in_4bit else None,
        device_map="cpu", attn_implementation="eager")
    keep_bnb_standard_path(baseline)
    baseline = peft.get_peft_model(baseline, peft.LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS,
                                                             modules_to_save=modules_to_save, task_type="CAUSAL_LM"))
    model, _ = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.float16, load_in_4bit=load_in_4bit)
    model = FastModel.get_peft_model(model, r=8, lora_alpha=16, modules_to_save=modules_to_save,
                                     use_gradient_checkpointing=False)
    copy_lora(baseline, model)  # (the modules_to_save copies too)
    return baseline, model


def trainable_dtypes(model):
    return {param.dtype for param in model.parameters() if param.requires_grad}


def plain_loop(model, scaler):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if scaler else None
    ids, mask, labels = padded_batch()
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        losses.append(loss.item())
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad()
    return losses


def trl_loop(model, scaler, out):
    """SFTTrainer with fp16=True (autocast; on a GPU its GradScaler). accelerate makes no GradScaler on the CPU:
    with ``scaler`` the test gives the trainer the one a GPU run gets, before training prepares the optimizer."""
    args = trl.SFTConfig(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=3e-3,
                         logging_steps=1, report_to=[], use_cpu=True, seed=0, max_length=64, save_strategy="no",
                         lr_scheduler_type="constant", disable_tqdm=True, fp16=True, bf16=False,
                         gradient_checkpointing=False)
    before = {name: param.data for name, param in model.named_parameters() if param.requires_grad}
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=arithmetic_chats(16),
                             processing_class=tiny_tokenizer())
    if not hasattr(model, "_fastft_patched") and not hasattr(model.get_base_model(), "_fastft_patched"):
        # the baseline: undo TRL's bf16 cast of a 4-bit model's adapters, for peft's fp32 ones
        for name, param in model.named_parameters():
            if name in before:
                param.data = before[name]
    assert trainable_dtypes(model) == {torch.float32}
    if scaler:
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.slow
@pytest.mark.parametrize("scaler", [False, True], ids=["no-scaler", "grad-scaler"])
@pytest.mark.parametrize("load_in_4bit", [True, False], ids=["4bit", "16bit"])
@pytest.mark.parametrize("loop", ["plain", "trl"])
def test_fp16_training_follows_the_fp32_adapter_baseline(llama_path, tmp_path, loop, load_in_4bit, scaler):
    baseline, model = models(llama_path, load_in_4bit)
    assert trainable_dtypes(baseline) == trainable_dtypes(model) == {torch.float32}
    if loop == "plain":
        expected, got = plain_loop(baseline, scaler), plain_loop(model, scaler)
    else:
        expected, got = trl_loop(baseline, scaler, tmp_path / "baseline"), trl_loop(model, scaler, tmp_path / "fastft")
    assert len(got) == len(expected) == STEPS
    for step, (a, b) in enumerate(zip(got, expected)):
        assert abs(a - b) <= RTOL * abs(b), f"step {step}: fastft {a} vs baseline {b}\n{got}\n{expected}"
    assert trainable_dtypes(model) == {torch.float32}


@pytest.mark.slow
@pytest.mark.parametrize("scaler", [False, True], ids=["no-scaler", "grad-scaler"])
def test_fp16_model_trains_lm_head_and_embeddings_on_fp32_master_weights(llama_path, scaler):
    """modules_to_save copies of an fp16 model are fp32 master weights too, computing in fp32 and handing fp16 on.
    No fp16 baseline trains them (peft's copies are fp16: NaN, or refused by the GradScaler): the reference is the
    same training in fp32 (transformers + peft, 4-bit). fp16 rounds every activation (u = 2^-11) where fp32 does
    not; measured: the loss within 1.3e-4 relative over these steps. 4u relative (2e-3) allows that; fp16 copies
    give NaN at the second step, or "Attempting to unscale FP16 gradients"."""
    baseline, model = models(llama_path, baseline_dtype=torch.float32, modules_to_save=["lm_head", "embed_tokens"])
    assert trainable_dtypes(model) == {torch.float32}
    expected, got = plain_loop(baseline, scaler), plain_loop(model, scaler)
    for step, (a, b) in enumerate(zip(got, expected)):
        assert abs(a - b) <= 2**-9 * abs(b), f"step {step}: fastft fp16 {a} vs baseline fp32 {b}\n{got}\n{expected}"
    model.eval()
    with torch.no_grad():
        assert model(input_ids=padded_batch()[0]).logits.dtype == torch.float16
