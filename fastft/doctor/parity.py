"""Section 4, training parity: a small random-weight Llama, built in memory (no download), 4-bit NF4 + LoRA, trained
``STEPS`` optimizer steps with fastft and with plain transformers + peft + bitsandbytes (SDPA attention) on the
same batches from the same weights: the loss of every step and the final LoRA weights must agree within a
tolerance derived below, and the tokens/s of each are reported (a tiny model's: no figure for a real one).

Both models are built as ``fastft.memory.training_step.build_model`` builds a contender (the memory accounting's
models: the same quantization and LoRA setup as users get), from the same seed, and their LoRA weights are set to
the same random values (peft starts B at zero, which would leave A without a gradient on the first step).

The optimizer is plain SGD, ``W <- W - lr * g``: the LoRA gradients summed over the steps (in float64, outside the
step) compare the two backward passes, and the final weights differ only by those and the weights' own roundings.
(Adam divides each update by its gradient's running magnitude: near-zero gradients, where rounding decides the
sign, would move by a whole learning rate either way. And in bf16 an update below one ulp of its weight is rounded
away or up to a whole ulp, so the weights alone cannot tell two backward passes apart.)

Tolerance (:func:`tolerances`). In the model's dtype every decoder layer rounds the hidden states about
``ROUNDINGS_PER_LAYER`` times (two norms, q/k/v, RoPE, attention, o, two residual adds, gate/up, SwiGLU, down),
each by up to ``eps`` of the dtype plus, for the fp32 sums inside a matmul over the hidden size ``H``,
``4 * sqrt(H) * 2^-24``; the lm head adds two. Two implementations round at different points, so their logits
differ by about ``sqrt(k) * u * max|z|`` (``k`` roundings with random signs, ``u`` one rounding's error,
``max|z|`` the largest logit, measured). A token's cross-entropy moves by at most twice its largest logit change;
the loss is a mean over ``N`` tokens whose rounding errors are independent, so ``/ sqrt(N)``; times 4 for margin.
The summed gradients of the LoRA weights go through the backward too (twice the roundings) and are compared
normwise, all LoRA weights together (relative to the largest summed gradient of any: a weight whose gradient is
small through cancellation, q and k in a random model, keeps the absolute rounding error of the large terms it
cancelled), with the same margin: ``4 * sqrt(2k) * u``. The final weights, stored in the dtype, may round
differently at each step (at most one ulp each: ``STEPS * eps`` relative to the largest weight) on top of ``lr``
times the summed gradients' difference.
"""
from __future__ import annotations

import math
import time

import torch

from ..kernels._common import INTERPRET
from .references import EPS

STEPS = 10
ROUNDINGS_PER_LAYER = 12
HEAD_ROUNDINGS = 2
MARGIN = 4.0
SEED = 0


def parity_config(tiny: bool):
    """The small random Llama: every linear layer's in/out features a multiple of 64 (bitsandbytes' CPU dequant is
    wrong otherwise), head size 64, GQA 2:1; two layers on the CPU, four on a GPU."""
    import transformers

    if tiny:
        return transformers.LlamaConfig(vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                        max_position_embeddings=512)
    return transformers.LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                    num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                                    max_position_embeddings=2048)


def tolerances(config, dtype: torch.dtype, tokens: int, max_logit: float, lr: float, grad_to_weight: float) -> dict:
    """Loss (absolute, per step), summed LoRA gradients and final LoRA weights (normwise relative) tolerances; see
    the module docstring. ``grad_to_weight``: the largest summed gradient over the largest LoRA weight."""
    roundings = ROUNDINGS_PER_LAYER * config.num_hidden_layers + HEAD_ROUNDINGS
    one_rounding = EPS[dtype] + 4 * math.sqrt(config.hidden_size) * 2.0**-24
    logit_error = math.sqrt(roundings) * one_rounding * max_logit
    grad_rel = MARGIN * math.sqrt(2 * roundings) * one_rounding
    return {"loss_abs": MARGIN * 2 * logit_error / math.sqrt(tokens), "lora_grad_rel": grad_rel,
            "lora_weight_rel": STEPS * EPS[dtype] + lr * grad_to_weight * grad_rel, "roundings": roundings}


def _build(config, contender: str, setup_kwargs: dict, device: torch.device):
    from ..memory.training_step import StepSetup, build_model

    torch.manual_seed(SEED)
    model = build_model(config, StepSetup(contender=contender, **setup_kwargs), device)
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # A ~ 1/sqrt(in), B ~ 1/sqrt(r): the LoRA term as large as the base output
                fan_in = param.shape[1]
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(fan_in))
    return model


def _lora_weights(model) -> dict:
    return {name: param.detach().double().cpu() for name, param in model.named_parameters() if "lora_" in name}


def _normwise(actual: dict, expected: dict) -> tuple[float, str]:
    """The largest ``|actual - expected|`` over all tensors relative to the largest ``|expected|`` over all of them,
    and the tensor where it is."""
    if set(actual) != set(expected):
        raise RuntimeError(f"the two models' LoRA weights differ in names: {sorted(set(actual) ^ set(expected))}")
    scale = max(t.abs().max().item() for t in expected.values()) or 1.0
    errors = {name: (actual[name] - expected[name]).abs().max().item() / scale for name in expected}
    worst = max(errors, key=errors.get)
    return errors[worst], worst


def _batches(config, batch_size: int, seq_len: int, device: torch.device) -> list[dict]:
    gen = torch.Generator().manual_seed(SEED + 2)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=gen)
        batches.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                        "labels": ids.to(device)})
    return batches


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train(model, batches, lr: float, device: torch.device) -> dict:
    """``STEPS`` SGD steps; the losses, the step times, the LoRA gradients summed over the steps (float64, on the
    CPU, outside the timed step) and the final LoRA weights."""
    lora = {name: param for name, param in model.named_parameters() if "lora_" in name}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    grad_sums = {name: torch.zeros(param.shape, dtype=torch.float64) for name, param in lora.items()}
    losses, times = [], []
    model.train()
    for batch in batches:
        _synchronize(device)
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        _synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        for name, param in lora.items():
            grad_sums[name] += param.grad.double().cpu()
        optimizer.zero_grad(set_to_none=True)
    return {"losses": losses, "step_s": times, "grad_sums": grad_sums, "weights": _lora_weights(model)}


def run(device: torch.device, dtype: torch.dtype, tiny: bool, progress=print) -> dict:
    """Train both stacks and compare; the section's record."""
    config = parity_config(tiny)
    batch_size, seq_len = (2, 16) if tiny else (4, 256)
    tokens = batch_size * seq_len
    setup = dict(seq_len=seq_len, batch_size=batch_size, r=16, lora_alpha=16, checkpointing="off", batch="plain",
                 loss="labels", dtype=dtype)
    batches = _batches(config, batch_size, seq_len, device)
    lr = 1e-2
    results = {}
    for contender in ("hf", "fastft"):
        progress(f"  training {STEPS} steps: {contender} ...")
        model = _build(config, contender, setup, device)
        if contender == "hf":
            with torch.no_grad():
                max_logit = model(**{k: v for k, v in batches[0].items() if k != "labels"}).logits.abs().max().item()
        results[contender] = _train(model, batches, lr, device)
        del model
    hf, fast = results["hf"], results["fastft"]
    grad_scale = max(t.abs().max().item() for t in hf["grad_sums"].values())
    weight_scale = max(t.abs().max().item() for t in hf["weights"].values())
    tol = tolerances(config, dtype, tokens, max_logit, lr, grad_scale / weight_scale)
    loss_diffs = [abs(a - b) for a, b in zip(fast["losses"], hf["losses"])]
    grad_error, grad_worst = _normwise(fast["grad_sums"], hf["grad_sums"])
    weight_error, weight_worst = _normwise(fast["weights"], hf["weights"])
    timed = slice(1, None)  # the first step compiles and warms up
    tokens_per_s = {name: tokens * (STEPS - 1) / sum(r["step_s"][timed]) for name, r in results.items()}
    problems = []
    if not max(loss_diffs) <= tol["loss_abs"]:
        step = loss_diffs.index(max(loss_diffs))
        problems.append(f"step {step + 1} loss {fast['losses'][step]:.6g} vs {hf['losses'][step]:.6g} "
                        f"(|diff| {loss_diffs[step]:.3g} > tolerance {tol['loss_abs']:.3g})")
    if not grad_error <= tol["lora_grad_rel"]:
        problems.append(f"summed LoRA gradient of {grad_worst} off by {grad_error:.3g} of the largest one "
                        f"(> tolerance {tol['lora_grad_rel']:.3g})")
    if not weight_error <= tol["lora_weight_rel"]:
        problems.append(f"final LoRA weight {weight_worst} off by {weight_error:.3g} of the largest one "
                        f"(> tolerance {tol['lora_weight_rel']:.3g})")
    return {
        "status": "FAIL" if problems else "pass", "problem": "; ".join(problems) or None,
        "model": (f"random Llama: {config.num_hidden_layers} layers, hidden {config.hidden_size}, intermediate "
                  f"{config.intermediate_size}, heads {config.num_attention_heads}/{config.num_key_value_heads} x "
                  f"{config.head_dim}, vocab {config.vocab_size}; NF4 4-bit, LoRA r=16 on all linear layers"),
        "dtype": str(dtype).replace("torch.", ""), "batch": f"{batch_size} x {seq_len} tokens", "steps": STEPS,
        "optimizer": f"SGD lr={lr}", "engine": _engine(device),
        "losses_fastft": fast["losses"], "losses_hf": hf["losses"], "loss_abs_diff": loss_diffs,
        "loss_tolerance": tol["loss_abs"], "max_logit": max_logit, "roundings": tol["roundings"],
        "lora_grad_error": grad_error, "lora_grad_worst": grad_worst, "lora_grad_tolerance": tol["lora_grad_rel"],
        "lora_weight_error": weight_error, "lora_weight_worst": weight_worst,
        "lora_weight_tolerance": tol["lora_weight_rel"],
        "tokens_per_s_fastft": tokens_per_s["fastft"], "tokens_per_s_hf": tokens_per_s["hf"],
        "tokens_per_s_ratio": tokens_per_s["fastft"] / tokens_per_s["hf"],
        "tokens_per_s_note": ("a tiny model's step times (steps 2-10), not a speed figure for a real model"
                              + ("; CPU: interpreted Triton kernels" if device.type == "cpu" and INTERPRET else "")
                              + ("; CPU: fastft's PyTorch engine" if device.type == "cpu" and not INTERPRET else "")),
    }


def _engine(device: torch.device) -> str:
    if device.type == "cuda":
        return "Triton kernels (compiled)"
    return "Triton kernels, interpreted (TRITON_INTERPRET=1)" if INTERPRET else "fastft's PyTorch engine (no Triton)"
