"""fastft models under unchanged TRL SFTTrainer / DPOTrainer scripts, against the Hugging Face + peft baseline.

Convergence tests in the spirit of Liger-Kernel's: the same tiny model, seed, data and LoRA initialisation,
trained with and without fastft (fp32 compute on CPU), must log the same loss at every step.
Tolerance: both sides compute in fp32, but TRL casts the baseline's LoRA weights (a 4-bit model's) to bf16,
where fastft keeps its fp32 model's in fp32 (fastft/master_weights.py), so each of the baseline's updates
is rounded to bf16 (rel. 4e-3 per weight); over 30 steps the losses agree to ~7e-4 relative (measured).
rtol=2e-3 allows that drift and still fails on any real bug (a wrong mask, a missing LoRA term or a wrong
loss normalisation changes the loss by >1e-2 within a few steps).

Speed: under the Triton interpreter a training step of fastft takes seconds, so these tests run fastft's
PyTorch engine (what a user without a GPU runs; the fused LoRA autograd functions are the same), and
`test_sft_and_dpo_on_interpreted_triton_kernels` runs a few steps of each trainer on the Triton kernels.
The kernels themselves are tested against float64 references in their own files, and the patched model
against Hugging Face in test_model_parity.py, both on the Triton path.
"""
import datasets
import peft
import pytest
import torch
import trl
from tiny_models import copy_lora, load_baseline, save_tiny_model
from tiny_tokenizer import tiny_tokenizer

import fastft.trl_compat
from fastft import FastModel
from fastft.kernels import use_engine

RTOL = 2e-3


@pytest.fixture(autouse=True)
def _pytorch_engine(request):
    if request.node.get_closest_marker("triton"):
        yield
    else:
        with use_engine("torch"):
            yield


def arithmetic_chats(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for a, b in torch.randint(0, 50, (n, 2), generator=gen).tolist():
        rows.append({"messages": [{"role": "user", "content": f"{a}+{b}="},
                                  {"role": "assistant", "content": str(a + b)}]})
    return datasets.Dataset.from_list(rows)


def preference_pairs(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for a, b in torch.randint(0, 50, (n, 2), generator=gen).tolist():
        rows.append({"prompt": [{"role": "user", "content": f"{a}+{b}="}],
                     "chosen": [{"role": "assistant", "content": str(a + b)}],
                     "rejected": [{"role": "assistant", "content": str(a + b + 7)}]})
    return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def arch_path(request, tmp_path_factory):
    return save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


class LogProbSpy:
    """Counts the calls TRL's fused lm-head path makes into fastft's log-prob kernel."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = fastft.trl_compat.linear_log_probs

        def spy(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(fastft.trl_compat, "linear_log_probs", spy)


def models(path, gradient_checkpointing=False, lora_dropout=0.0):
    baseline = load_baseline(path, r=8, lora_alpha=16, lora_dropout=lora_dropout)
    model, _ = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.float32)
    model = FastModel.get_peft_model(model, r=8, lora_alpha=16, lora_dropout=lora_dropout,
                                     use_gradient_checkpointing=gradient_checkpointing)
    copy_lora(baseline, model)  # same LoRA initialisation
    return baseline, model


def sft_config(out, **overrides):
    cfg = dict(output_dir=str(out), max_steps=30, per_device_train_batch_size=4, learning_rate=3e-3,
               logging_steps=1, report_to=[], use_cpu=True, seed=0, max_length=64, save_strategy="no",
               lr_scheduler_type="constant", dataloader_num_workers=0, disable_tqdm=True)
    cfg.update(overrides)
    return trl.SFTConfig(**cfg)


def losses(trainer, key="loss"):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def assert_curves_match(got, expected, rtol=RTOL, atol=1e-6):
    assert len(got) == len(expected) > 0
    for step, (a, b) in enumerate(zip(got, expected)):
        assert abs(a - b) <= rtol * abs(b) + atol, f"step {step}: fastft {a} vs baseline {b}\n{got}\n{expected}"


# DPO rewards are beta * (sum log p_policy - sum log p_ref): a difference of two sums of size ~20, so they sit
# near 0 and only an absolute tolerance means anything. Measured |fastft - baseline|: up to 5e-4 by step 30, as
# the baseline's bf16 LoRA weights drift from fastft's fp32 ones; the rewards themselves swing between -0.15
# and 0.1, and a reference pass that wrongly used the policy adapter would make every one 0.
REWARD_ATOL = 3e-3


def fp32_adapters(trainer):
    """Undo TRL's bf16 cast of a 4-bit baseline's trainable parameters, as fastft does for its models: the two then
    train the same fp32 adapters, and their curves differ only by the computation."""
    for param in trainer.model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return trainer


def train_sft(model, dataset, out, keep_fp32_adapters=False, **overrides):
    trainer = trl.SFTTrainer(model=model, args=sft_config(out, **overrides), train_dataset=dataset,
                             processing_class=tiny_tokenizer())
    if keep_fp32_adapters:
        fp32_adapters(trainer)
    trainer.train()
    return trainer


@pytest.mark.slow
def test_sft_chat_convergence_matches_baseline(arch_path, tmp_path, monkeypatch):
    """Chat data, assistant-only loss, gradient accumulation and checkpointing, 30 steps."""
    data = arithmetic_chats(240)
    cfg = dict(assistant_only_loss=True, gradient_accumulation_steps=2, per_device_train_batch_size=2,
               gradient_checkpointing=True)
    baseline, model = models(arch_path, gradient_checkpointing=True)
    ref = train_sft(baseline, data, tmp_path / "hf", **cfg)
    spy = LogProbSpy(monkeypatch)
    ours = train_sft(model, data, tmp_path / "fastft", **cfg)
    assert spy.calls > 0, "TRL's fused lm-head path did not reach fastft's log-prob kernel"
    assert_curves_match(losses(ours), losses(ref))
    assert losses(ours)[-1] < losses(ours)[0] - 0.3, "training did not learn: the comparison proves little"


# Mean loss over a 30-step run with lora_dropout=0.05, the recipe's setting: peft's runs with 3 seeds gave 4.836,
# 4.862, 4.845 and fastft's (its own masks) 4.844, 4.862: a standard deviation of ~0.011 from the masks alone, so
# two runs differ by ~0.016 typically. 0.05 is 3 of those; a LoRA branch that lost its dropout scaling or a
# base matmul that saw the dropped input moves the mean far more (the curves start at 5.33 and learn 0.7).
DROPOUT_MEAN_LOSS_ATOL = 0.05


@pytest.mark.slow
def test_sft_with_lora_dropout_matches_peft_within_mask_noise(tmp_path, monkeypatch):
    """lora_dropout=0.05 on the fused path: fastft and peft draw different masks, so their curves differ step by
    step; the mean loss over the run agrees within the noise two different masks give. (That fastft applies
    exactly peft's dropout, mask for mask, is checked in test_lora_layers.py and test_model_parity.py; at
    p=0.05 a run without dropout lands within this noise too.)"""
    path = save_tiny_model("llama", tmp_path / "m")
    data = arithmetic_chats(240)
    baseline, model = models(path, lora_dropout=0.05)
    ref = losses(train_sft(baseline, data, tmp_path / "hf"))

    def peft_forward(*args, **kwargs):
        raise AssertionError("peft's LoRA forward ran: the fused path did not serve lora_dropout")

    monkeypatch.setattr(peft.tuners.lora.bnb.Linear4bit, "forward", peft_forward)
    ours = losses(train_sft(model, data, tmp_path / "fastft"))
    assert len(ours) == len(ref) == 30
    assert ours != ref, "fastft drew the very masks peft drew: the comparison proves nothing about mask noise"
    mean_ours, mean_ref = sum(ours) / len(ours), sum(ref) / len(ref)
    assert abs(mean_ours - mean_ref) <= DROPOUT_MEAN_LOSS_ATOL, (f"mean loss {mean_ours} vs peft's {mean_ref}\n"
                                                                 f"{ours}\n{ref}")
    assert ours[-1] < ours[0] - 0.5, "training did not learn: the comparison proves little"


@pytest.mark.parametrize("kind", ["text", "prompt_completion", "packing"])
def test_sft_dataset_kinds_match_baseline(arch_path, tmp_path, kind):
    """Plain text; prompt/completion with completion-only loss; packing with padding-free batches
    (the packed rows carry restarting position_ids and no attention mask)."""
    chats = arithmetic_chats(48)
    if kind == "text":
        data = datasets.Dataset.from_list([{"text": f"{m['messages'][0]['content']}{m['messages'][1]['content']}"}
                                           for m in chats])
        cfg = {}
    elif kind == "prompt_completion":
        data = datasets.Dataset.from_list([{"prompt": m["messages"][:1], "completion": m["messages"][1:]}
                                           for m in chats])
        cfg = dict(completion_only_loss=True)
    else:
        data = chats
        cfg = dict(packing=True, padding_free=True, per_device_train_batch_size=2)
    baseline, model = models(arch_path)
    ref = train_sft(baseline, data, tmp_path / "hf", max_steps=8, **cfg)
    ours = train_sft(model, data, tmp_path / "fastft", max_steps=8, **cfg)
    assert_curves_match(losses(ours), losses(ref))


@pytest.mark.slow
def test_phi3_sft_and_dpo_curves_match_baseline(tmp_path, monkeypatch):
    """Phi-4-mini's shape (fused qkv_proj / gate_up_proj with one LoRA each, partial rotary, LongRoPE: the chats are
    longer than its 16 original positions, so batches cross its switch): SFT with packing and DPO with its `ref`
    adapter log the baseline's losses (and DPO's rewards) step by step."""
    path = save_tiny_model("phi3_longrope", tmp_path / "m")
    baseline, model = models(path)
    data = arithmetic_chats(96)
    cfg = dict(max_steps=12, packing=True, padding_free=True, per_device_train_batch_size=2)
    ref = train_sft(baseline, data, tmp_path / "hf", **cfg)
    spy = LogProbSpy(monkeypatch)
    ours = train_sft(model, data, tmp_path / "fastft", **cfg)
    assert spy.calls > 0
    assert_curves_match(losses(ours), losses(ref))
    assert losses(ours)[-1] < losses(ours)[0] - 0.3, "training did not learn: the comparison proves little"

    baseline, model = models(path)
    pairs = preference_pairs(60)
    ref = train_dpo(baseline, pairs, tmp_path / "hf-dpo", max_steps=12)
    ours = train_dpo(model, pairs, tmp_path / "fastft-dpo", max_steps=12)
    assert "ref" in model.peft_config
    assert_curves_match(losses(ours), losses(ref), rtol=5e-3)
    for key in ("rewards/chosen", "rewards/rejected"):
        assert_curves_match(losses(ours, key), losses(ref, key), rtol=5e-3, atol=REWARD_ATOL)
    assert max(abs(r) for r in losses(ours, "rewards/chosen")) > 3 * REWARD_ATOL


def test_sft_save_and_resume_continues_the_same_curve(tmp_path):
    path = save_tiny_model("llama", tmp_path / "m")
    data = arithmetic_chats(64)
    _, model = models(path)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    full = train_sft(model, data, tmp_path / "full", max_steps=6)

    _, model = models(path)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in start:
                p.copy_(start[n])
    train_sft(model, data, tmp_path / "part", max_steps=6, save_strategy="steps", save_steps=3)
    _, model = models(path)  # a fresh process would start like this
    resumed = trl.SFTTrainer(model=model, args=sft_config(tmp_path / "part", max_steps=6, save_strategy="steps",
                                                          save_steps=3),
                             train_dataset=data, processing_class=tiny_tokenizer())
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-3"))
    # Resuming restores LoRA weights, optimizer and data order: the curves agree exactly (measured; the LoRA
    # weights stay fp32); resuming from a wrong state moves them by >1e-2.
    assert_curves_match(losses(resumed)[-3:], losses(full)[-3:], rtol=2e-4)


def dpo_config(out, **overrides):
    cfg = dict(output_dir=str(out), max_steps=30, per_device_train_batch_size=4, learning_rate=3e-3,
               logging_steps=1, report_to=[], use_cpu=True, seed=0, max_length=64, save_strategy="no",
               lr_scheduler_type="constant", dataloader_num_workers=0, disable_tqdm=True, beta=0.1)
    cfg.update(overrides)
    return trl.DPOConfig(**cfg)


def train_dpo(model, data, out, peft_config=None, keep_fp32_adapters=False, **overrides):
    trainer = trl.DPOTrainer(model=model, args=dpo_config(out, **overrides), train_dataset=data,
                             processing_class=tiny_tokenizer(), peft_config=peft_config)
    if keep_fp32_adapters:
        fp32_adapters(trainer)
    trainer.train()
    return trainer


@pytest.mark.slow
def test_dpo_convergence_matches_baseline(arch_path, tmp_path, monkeypatch):
    """A PeftModel handed to DPOTrainer gets a `ref` adapter; the reference log-probs must come from it
    through fastft's fused LoRA path (else rewards would be 0 and nothing would be learned)."""
    data = preference_pairs(120)
    baseline, model = models(arch_path)
    ref = train_dpo(baseline, data, tmp_path / "hf")
    spy = LogProbSpy(monkeypatch)
    ours = train_dpo(model, data, tmp_path / "fastft")
    assert spy.calls > 0
    assert "ref" in model.peft_config
    assert_curves_match(losses(ours), losses(ref), rtol=5e-3)
    for key in ("rewards/chosen", "rewards/rejected"):
        assert_curves_match(losses(ours, key), losses(ref, key), rtol=5e-3, atol=REWARD_ATOL)
    # the reference pass really used the `ref` adapter: rewards move well beyond the tolerance above
    assert max(abs(r) for r in losses(ours, "rewards/chosen")) > 10 * REWARD_ATOL


def test_dpo_precomputed_reference_and_disabled_adapter(tmp_path):
    """An unwrapped fastft model + peft_config: TRL wraps it and takes the reference with the adapter
    disabled; and precompute_ref_log_probs runs that reference pass up front."""
    path = save_tiny_model("qwen2", tmp_path / "m")
    data = preference_pairs(24)
    import peft

    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"], task_type="CAUSAL_LM")
    runs = {}
    for name, precompute in (("live", False), ("precomputed", True)):
        torch.manual_seed(0)
        model, _ = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.float32)
        runs[name] = train_dpo(model, data, tmp_path / name, peft_config=lora, max_steps=6,
                               precompute_ref_log_probs=precompute)
    # At step 1 policy == reference (B = 0), so the DPO loss is exactly log 2 with zero rewards.
    first = runs["live"].state.log_history[0]
    assert abs(first["loss"] - 0.6931472) < 1e-5 and abs(first["rewards/chosen"]) < 1e-6
    assert_curves_match(losses(runs["precomputed"]), losses(runs["live"]), rtol=1e-4)
    assert losses(runs["live"], "rewards/margins")[-1] != 0.0


def test_fp16_training_with_trl(tmp_path):
    """V100-style: fp16 weights. TRL casts the LoRA weights of a 4-bit model to bf16 anyway; fastft gives them back
    as fp32 master weights (fastft/master_weights.py; tests/test_fp16_master_weights.py compares the curves with
    the baseline's). Training must run and learn."""
    path = save_tiny_model("llama", tmp_path / "m")
    model, _ = FastModel.from_pretrained(path, max_seq_length=64, dtype=torch.float16)
    model = FastModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    trainer = train_sft(model, arithmetic_chats(96), tmp_path / "fp16", max_steps=12)
    curve = losses(trainer)
    assert all(torch.isfinite(torch.tensor(curve)))
    assert curve[-1] < curve[0]
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}


@pytest.mark.triton
def test_sft_and_dpo_on_interpreted_triton_kernels(tmp_path, monkeypatch):
    path = save_tiny_model("llama", tmp_path / "m")
    spy = LogProbSpy(monkeypatch)
    baseline, model = models(path)
    ref = train_sft(baseline, arithmetic_chats(24), tmp_path / "hf", max_steps=4)
    ours = train_sft(model, arithmetic_chats(24), tmp_path / "fastft", max_steps=4)
    assert_curves_match(losses(ours), losses(ref))
    baseline, model = models(path)
    ref = train_dpo(baseline, preference_pairs(12), tmp_path / "hf-dpo", max_steps=3, per_device_train_batch_size=2)
    ours = train_dpo(model, preference_pairs(12), tmp_path / "fastft-dpo", max_steps=3, per_device_train_batch_size=2)
    assert_curves_match(losses(ours), losses(ref), rtol=5e-3)
    for key in ("rewards/chosen", "rewards/rejected"):
        assert_curves_match(losses(ours, key), losses(ref, key), rtol=5e-3, atol=REWARD_ATOL)
    assert spy.calls > 0


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_sft_and_dpo_curves_match_baseline(arch, tmp_path, monkeypatch):
    """Gemma 2 (soft-capped logits: TRL hands final_logit_softcapping to the fused lm-head path, which fastft now
    serves) and Gemma 3 (text), SFT on chats and DPO with the `ref` adapter, against the baseline step by step.
    fp32 compute (bf16=False; TRL's default is bf16 autocast even on the CPU, where bitsandbytes keeps the baseline's
    4-bit matmuls in fp32 while fastft's fused projections give autocast's bf16, as on a GPU: Gemma 3's q/k norms
    then see differently rounded inputs, and the curves drift apart by ~4e-3 by step 4)."""
    path = save_tiny_model(arch, tmp_path / "m")
    calls = []
    real = fastft.trl_compat.linear_log_probs
    monkeypatch.setattr(fastft.trl_compat, "linear_log_probs",
                        lambda *args, **kwargs: calls.append(kwargs.get("softcap")) or real(*args, **kwargs))
    baseline, model = models(path)
    # the baseline keeps fp32 adapters as fastft does (TRL casts a 4-bit model's to bf16: a 2.6% difference in
    # Gemma 3's DPO loss by step 5)
    ref = train_sft(baseline, arithmetic_chats(48), tmp_path / "hf", keep_fp32_adapters=True, max_steps=10, bf16=False)
    ours = train_sft(model, arithmetic_chats(48), tmp_path / "fastft", max_steps=10, bf16=False)
    assert_curves_match(losses(ours), losses(ref))
    assert losses(ours)[-1] < losses(ours)[0] - 0.1, "training did not learn: the comparison proves little"
    assert calls and set(calls) == {3.0 if arch == "gemma2" else None}  # the tiny Gemma 2's final cap

    baseline, model = models(path)
    # 4 steps: AdamW's first steps move each weight by about lr * sign(gradient), so fp32 rounding in near-zero
    # gradients flips whole updates and the two runs drift apart: Gemma 3's DPO loss measured 1.3e-4 relative apart
    # after one step, 4e-3 after four, 9e-3 after five (rewards: 4.8e-3 absolute after five)
    ref = train_dpo(baseline, preference_pairs(24), tmp_path / "hf-dpo", keep_fp32_adapters=True, max_steps=4,
                    bf16=False)
    ours = train_dpo(model, preference_pairs(24), tmp_path / "fastft-dpo", max_steps=4, bf16=False)
    assert_curves_match(losses(ours), losses(ref), rtol=1e-2)
    for key in ("rewards/chosen", "rewards/rejected"):
        assert_curves_match(losses(ours, key), losses(ref, key), rtol=5e-3, atol=REWARD_ATOL)
