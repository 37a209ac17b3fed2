#!/usr/bin/env python3
"""End-to-end QLoRA training benchmark: fastft against the Hugging Face baseline and its peers.

    python bench/run.py                      # Llama-3-8B and Qwen2-7B configs, all settings (GPU)
    python bench/run.py --quick              # a ~0.5B config, two sequence lengths (GPU)
    python bench/run.py --cpu-smoke --out-dir /tmp/smoke   # harness check on CPU: no figures

What is compared (each contender in its own subprocess, so one's patches cannot leak into another):

* ``hf``: transformers + peft + bitsandbytes NF4 with double quantization, SDPA attention, gradient
  checkpointing (non-reentrant), LoRA weights cast to bf16 -- the QLoRA configuration TRL 1.16 builds.
* ``fastft``: ``FastModel.from_pretrained(..., load_in_4bit=True, dtype=None)`` then
  ``FastModel.get_peft_model(...)`` with the same LoRA settings.
* ``liger``: ``hf`` with ``liger_kernel.transformers.apply_liger_kernel_to_{llama,qwen2}()`` applied before
  loading (``not_installed`` when liger-kernel is missing).
* ``unsloth``: ``FastLanguageModel`` (``not_installed`` when unsloth is missing).

Models have random weights built from configs (nothing is downloaded): the checkpoint is written once in
bf16 safetensors under ``--cache-dir`` and loaded in 4-bit by every contender (its cost is in the JSON).

The training loop is this file's (``_train_setting``), the same for every contender, and is **not**
TRL's ``SFTTrainer`` loop: forward, backward, ``torch.optim.AdamW`` step, ``zero_grad``, with a CUDA
synchronize before and after each step. ``--loss labels`` (default) takes the loss from
``model(input_ids, attention_mask, labels=labels).loss`` (the model's own forward, as Unsloth's and
Liger's published comparisons do); ``--loss trl`` takes it from TRL 1.16's fused lm-head path
(``add_fused_lm_head`` + ``model(..., fused_lm_head=True)``), which is what an ``SFTTrainer`` user runs
(needs ``trl.trainer.utils`` importable, i.e. trl and its ``datasets`` dependency).

Measurement definitions (also in the output files):

* Data: uniformly random token ids (same seed, hence the same batches, for every contender), no padding,
  labels = input ids; tokens/s counts ``batch * seq_len`` tokens per step over the *median* step time.
* Warm-up steps are excluded from the timing; ``step_time_spread_s`` gives min, p25, p75, max of the
  timed steps.
* Peak VRAM: ``torch.cuda.reset_peak_memory_stats()`` after the model is loaded and before the first
  warm-up step of each setting, so ``peak_vram_gb`` (``max_memory_allocated``) and ``peak_reserved_gb``
  (``max_memory_reserved``) include the resident 4-bit model, LoRA weights, optimizer state and the
  training step's transients, but not the loading transients (``load_peak_vram_gb`` has those).
  GB here are GiB (2**30 bytes), as PyTorch's memory summaries and Unsloth's notebooks print them.
* Every setting starts from the same LoRA weights (restored from a snapshot taken after loading) with a
  fresh optimizer, so the losses of the first steps are comparable across contenders and settings.
  A contender whose first-step losses differ from ``hf``'s (same run) by more than the stated tolerance
  is flagged ``loss_mismatch``: a fast wrong kernel is not a win.
* A setting that runs out of memory is recorded as ``oom`` and the suite continues; a crash is ``error``
  with its message; settings not run within ``--time-budget-s`` are ``skipped``.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque


def _load_shared():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_shared.py")
    spec = importlib.util.spec_from_file_location("fastft_bench_shared", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shared = _load_shared()

from fastft.memory.configs import KNOWN_MODELS  # noqa: E402 - plain data (no transformers import); after the loader
_DROPPED_FROM_PATH: list[str] = []

CONTENDERS = ("hf", "fastft", "liger", "unsloth")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R = 16
LORA_ALPHA = 16
LORA_SEED = 3407  # FastModel.get_peft_model's default random_state; hf and liger seed the same
CHECKPOINT_RECIPE = "v1"
INIT_STD = 0.02  # transformers' initializer_range for Llama/Qwen2
LOSS_STEPS = 3  # "the first steps" whose losses are compared
LOSS_TOL_FP32 = 1e-3
LOSS_TOL_WHY = (
    "absolute, on each of the first {k} steps, per row: fp32 (CPU smoke) 1e-3 -- correct paths agree to ~1e-6 "
    "there; 16-bit max(0.005, 0.65 / sqrt(tokens per step)). Why: with these random weights (std 0.02) the logits "
    "have std ~1.3, so the per-token loss has std ~1.3 and a kernel that scrambles the hidden states moves the "
    "batch's mean loss by ~sqrt(2) * 1.3 / sqrt(tokens) (0.08 at 512 tokens, 0.014 at 16k): the tolerance is about "
    "half of that. Correct bf16 implementations are expected to differ by a few 1e-3 (first-order rounding "
    "differences average out over the tokens); this is an estimate to be confirmed by the measured diffs, which "
    "every row records (loss_max_abs_diff_vs_hf)."
)


def loss_tolerance(dtype: str | None, tokens: int) -> float:
    if dtype == "float32":
        return LOSS_TOL_FP32
    return max(0.005, 0.65 / math.sqrt(max(1, tokens)))


MODELS = {
    # the published configs of meta-llama/Llama-3.1-8B (llama3 RoPE scaling) and Qwen/Qwen2-7B (q/k/v bias, untied
    # head, RoPE base 1e6), as fastft's memory accounting knows them
    "llama3-8b": KNOWN_MODELS["llama-3.1-8b"],
    "qwen2-7b": KNOWN_MODELS["qwen2-7b"],
    # ~0.5B Llama-shaped model for quick GPU runs
    "small": ("llama", dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                            num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                            max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
                            rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    # CPU smoke: tiny but the same code paths (GQA 2:1, head_dim 64)
    "tiny": ("llama", dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                           rms_norm_eps=1e-5, tie_word_embeddings=False,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "tiny-qwen2": ("qwen2", dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                 max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
                                 use_sliding_window=False,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}
COLORS = {"hf": "tab:gray", "fastft": "tab:orange", "liger": "tab:green", "unsloth": "tab:purple"}
# --attention (fastft's backend, None for the others) is part of a row's identity, not of its hf baseline
ROW_KEY = ("contender", "model", "seq_len", "batch_size", "loss_path", "checkpointing", "device_kind", "attention")
BASELINE_KEY = tuple(k for k in ROW_KEY if k not in ("contender", "attention"))
# --attention -> FastModel.from_pretrained(attn_implementation=...)
ATTENTION = {"auto": None, "fastft": "fastft", "xformers": "fastft_xformers", "sdpa": "sdpa"}


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------
def _csv(kind):
    def parse(text):
        items = [s.strip() for s in text.split(",") if s.strip()]
        return [kind(s) for s in items]
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="QLoRA training benchmark: fastft vs Hugging Face (transformers+peft+bitsandbytes) and peers, "
                    "each contender in its own process, same model shape/data/settings. Needs a CUDA GPU "
                    "(except --cpu-smoke). Writes <out-dir>/<date>-<gpu>.json/.md/.png, merging with earlier "
                    "runs of the same day and GPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the 'small' model, seq 512 and 2048, batch 1")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="harness check on CPU: 'tiny' model, hf and fastft, a few steps; results are marked as a "
                        "smoke run, not figures")
    p.add_argument("--models", type=_csv(str), default=None,
                   help=f"comma-separated, from {', '.join(MODELS)} (default: llama3-8b,qwen2-7b)")
    p.add_argument("--seq-lens", type=_csv(int), default=None, help="default 512,2048,4096")
    p.add_argument("--batch-sizes", type=_csv(int), default=None, help="default 1,4")
    p.add_argument("--contenders", type=_csv(str), default=None, help=f"default {','.join(CONTENDERS)}")
    p.add_argument("--steps", type=int, default=None, help="timed steps per setting (default 5; cpu smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 2; cpu smoke 1)")
    p.add_argument("--loss", dest="loss_path", choices=("labels", "trl"), default="labels",
                   help="labels: model(..., labels=).loss; trl: TRL 1.16's fused lm-head path")
    p.add_argument("--checkpointing", choices=("on", "offload"), default="on",
                   help="on: gradient checkpointing per decoder layer for every contender; offload: fastft "
                        "'offload', unsloth 'unsloth', hf/liger offload=True where transformers has it")
    p.add_argument("--attention", choices=tuple(ATTENTION), default="auto",
                   help="attention of the fastft contender: auto = fastft's own choice (its kernel, else xformers "
                        "below sm_80 or for head sizes it lacks, else SDPA); fastft, xformers, sdpa force one, e.g. "
                        "to measure a T4/V100 row on each backend")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument("--loss-tol", type=float, default=None,
                   help="absolute loss tolerance vs hf on the first steps (default: per row, see the "
                        "definitions in the output: 16-bit max(0.005, 0.65/sqrt(tokens)), fp32 1e-3)")
    p.add_argument("--out-dir", default=None,
                   help=f"where results go (default {os.path.relpath(shared.DEFAULT_RESULTS_DIR, shared.REPO_ROOT)}; "
                        "cpu smoke: a folder under the system temp dir)")
    p.add_argument("--cache-dir", default=os.environ.get("FASTFT_BENCH_CACHE",
                                                         os.path.join(tempfile.gettempdir(), "fastft-bench")),
                   help="where the random-weight checkpoints are written once and reused (env FASTFT_BENCH_CACHE)")
    p.add_argument("--worker-timeout-s", type=float, default=1800.0,
                   help="a contender's process is killed after this long (its unfinished settings: error)")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="stop starting settings after this many seconds from launch (rest: skipped)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    # internal: subprocess entry points
    p.add_argument("--worker", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    p.add_argument("--make-checkpoint", metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint-info", metavar="JSON", help=argparse.SUPPRESS)
    p.add_argument("--device-info", metavar="JSON", help=argparse.SUPPRESS)
    p.add_argument("--device-name", help=argparse.SUPPRESS)
    return p


# --------------------------------------------------------------------------------------------------------
# Random-weight checkpoints
# --------------------------------------------------------------------------------------------------------
def make_config(name: str):
    import transformers

    arch, kwargs = MODELS[name]
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    return cls(**json.loads(json.dumps(kwargs)))


def _save_tokenizer(path: str) -> None:
    """A 3-token word-level tokenizer: FastModel.from_pretrained loads a tokenizer with the model; the
    benchmark feeds token ids directly, so its vocabulary does not matter."""
    import tokenizers
    import transformers

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", pad_token="</s>")
    fast.save_pretrained(path)


def make_checkpoint(name: str, cache_dir: str) -> dict:
    """Write (once) a bf16 safetensors checkpoint of ``name`` with random weights: normal(0, 0.02) for
    every matrix and bias, ones for the norms. The model is built on the meta device only to list the
    parameter names and shapes, and each tensor is drawn on the GPU and written shard by shard, so the
    fp32 model is never materialised. Returns {path, reused, seconds, bytes}."""
    import torch
    import transformers
    from safetensors.torch import save_file

    path = os.path.join(cache_dir, f"{name}-{CHECKPOINT_RECIPE}")
    marker = os.path.join(path, "bench_checkpoint.json")
    recipe = {"recipe": CHECKPOINT_RECIPE, "model": name, "arch": MODELS[name][0], "config": MODELS[name][1],
              "init_std": INIT_STD, "dtype": "bfloat16", "seed": 1234}
    recipe = json.loads(json.dumps(recipe))
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == recipe:
                return {"path": path, "reused": True, "seconds": 0.0, "bytes": _dir_bytes(path)}
    t0 = time.perf_counter()
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    config = make_config(name)
    with torch.device("meta"):
        meta_model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = [(key, tuple(t.shape)) for key, t in meta_model.state_dict().items()]
    del meta_model
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed(recipe["seed"])
    shard, shard_bytes, shard_id, weight_map, total = {}, 0, 0, {}, 0

    def flush():
        nonlocal shard, shard_bytes, shard_id
        if shard:
            shard_id += 1
            file = f"model-{shard_id:05d}.safetensors"
            save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
            weight_map.update({key: file for key in shard})
            shard, shard_bytes = {}, 0

    for key, shape in shapes:
        if key.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
            tensor = tensor.mul_(INIT_STD).to(torch.bfloat16).cpu()
        shard[key] = tensor
        nbytes = tensor.numel() * tensor.element_size()
        shard_bytes += nbytes
        total += nbytes
        if shard_bytes >= 4 << 30:
            flush()
    flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    config.save_pretrained(path)
    _save_tokenizer(path)
    with open(marker, "w") as f:
        json.dump(recipe, f, indent=1)
    return {"path": path, "reused": False, "seconds": round(time.perf_counter() - t0, 2), "bytes": _dir_bytes(path)}


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


# --------------------------------------------------------------------------------------------------------
# Worker: one contender, one model, all its settings, in its own process
# --------------------------------------------------------------------------------------------------------
class NotInstalled(Exception):
    pass


def _import_peer(contender: str):
    """Peers are optional. unsloth must be imported before transformers to patch it."""
    if contender == "unsloth":
        if importlib.util.find_spec("unsloth") is None:
            raise NotInstalled("unsloth is not installed")
        import unsloth  # noqa: F401
    elif contender == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            raise NotInstalled("liger-kernel is not installed")
        import liger_kernel.transformers  # noqa: F401


def _bnb_config(dtype):
    import transformers

    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)


def _lora_config():
    import peft

    return peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
                           target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")


def _hf_checkpointing(model, mode: str) -> str:
    if mode == "offload" and hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False}, offload=True)
        return "offload"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return "on"


def build_model(contender: str, spec: dict, device, dtype):
    """Load the checkpoint in 4-bit and wrap it in LoRA the way each contender's users do.
    Returns (model, checkpointing mode actually used)."""
    import torch

    path, arch = spec["checkpoint"], MODELS[spec["model"]][0]
    device_map = {"": device.index if device.type == "cuda" else "cpu"}
    if contender in ("hf", "liger"):
        import peft
        import transformers

        if contender == "liger":
            from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_qwen2

            {"llama": apply_liger_kernel_to_llama, "qwen2": apply_liger_kernel_to_qwen2}[arch]()
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, quantization_config=_bnb_config(dtype), device_map=device_map,
            attn_implementation="sdpa")
        model.config.use_cache = False
        torch.manual_seed(LORA_SEED)
        model = peft.get_peft_model(model, _lora_config())
        mode = _hf_checkpointing(model, spec["checkpointing"])
        model.enable_input_require_grads()  # as TRL does for quantized models
        return model, mode
    if contender == "fastft":
        from fastft import FastModel

        model, _ = FastModel.from_pretrained(path, max_seq_length=max(spec["seq_lens"]), load_in_4bit=True,
                                             dtype=None if device.type == "cuda" else dtype,
                                             attn_implementation=ATTENTION[spec["attention"]])
        mode = "offload" if spec["checkpointing"] == "offload" else True
        model = FastModel.get_peft_model(model, r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                         target_modules=list(LORA_TARGETS), use_gradient_checkpointing=mode,
                                         random_state=LORA_SEED)
        return model, "offload" if mode == "offload" else "on"
    if contender == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(model_name=path, max_seq_length=max(spec["seq_lens"]),
                                                     load_in_4bit=True, dtype=None)
        mode = "unsloth" if spec["checkpointing"] == "offload" else True
        model = FastLanguageModel.get_peft_model(model, r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0,
                                                 target_modules=list(LORA_TARGETS), bias="none",
                                                 use_gradient_checkpointing=mode, random_state=LORA_SEED)
        return model, "offload" if mode == "unsloth" else "on"
    raise ValueError(f"unknown contender {contender!r}")


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _error_text(exc: BaseException) -> str:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    text = "".join(tb[-4:]).strip()
    return text[-2000:]


def make_batches(seed: int, seq_len: int, batch_size: int, vocab: int, n: int):
    """The same random token ids for every contender (CPU generator, fixed seed per setting)."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + seq_len * 1_009 + batch_size)
    return [torch.randint(0, vocab, (batch_size, seq_len), generator=gen) for _ in range(n)]


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_setting(model, spec: dict, seq_len: int, batch_size: int, trainable, snapshot, device, dtype) -> dict:
    """Warm-up + timed steps of one (seq_len, batch_size) setting; returns the row's measurements."""
    import torch

    row = {"status": "ok", "message": None}
    with torch.no_grad():  # same starting LoRA weights for every setting and contender
        for param, saved in zip(trainable, snapshot):
            param.copy_(saved)
    vocab = model.config.vocab_size
    n_steps = spec["warmup"] + spec["steps"]
    batches = [b.to(device) for b in make_batches(spec["seed"], seq_len, batch_size, vocab, n_steps)]
    mask = torch.ones_like(batches[0])
    torch.manual_seed(spec["seed"])
    optimizer = torch.optim.AdamW(trainable, lr=spec["lr"], weight_decay=0.0)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, losses, loss = [], [], None
    try:
        for step, ids in enumerate(batches):
            _sync(device)
            t0 = time.perf_counter()
            if spec["loss_path"] == "trl":
                loss = model(input_ids=ids, attention_mask=mask, labels=ids, fused_lm_head=True).loss
            else:
                loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            elapsed = time.perf_counter() - t0
            losses.append(loss.detach().float())
            del loss
            if step >= spec["warmup"]:
                times.append(elapsed)
    except Exception as exc:  # noqa: BLE001 - recorded in the row
        loss = None  # drop the graph (and its activations) before the next setting
        row["status"] = "oom" if _is_oom(exc) else "error"
        row["message"] = _error_text(exc) if row["status"] == "error" else str(exc).splitlines()[0][:500]
        if "CUDA error" in str(exc) or "illegal memory access" in str(exc):
            row["fatal"] = True  # the CUDA context is gone: later settings cannot run in this process
    losses = [float(v) for v in losses]
    tokens = batch_size * seq_len
    row.update(tokens_per_step=tokens, losses=losses, loss_first_steps=losses[:spec["loss_steps"]],
               step_times_s=[round(t, 6) for t in times])
    if times and row["status"] == "ok":
        median = statistics.median(times)
        q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
        row.update(tokens_per_s=tokens / median, step_time_median_s=median,
                   step_time_spread_s={"min": min(times), "p25": q[0], "p75": q[2], "max": max(times)})
        if not all(math.isfinite(v) for v in losses):
            row["status"], row["message"] = "error", f"non-finite loss: {losses}"
    if device.type == "cuda":
        row["peak_vram_gb"] = torch.cuda.max_memory_allocated(device) / shared.GIB
        row["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / shared.GIB
    optimizer.zero_grad(set_to_none=True)
    del optimizer, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def worker_main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    contender, result_path = spec["contender"], spec["result_path"]
    settings = [tuple(s) for s in spec["settings"]]
    result = {"rows": [], "info": {}}

    def save():
        shared.write_json_atomic(result_path, result)

    def add_row(seq_len, batch_size, **fields):
        result["rows"].append({"seq_len": seq_len, "batch_size": batch_size, **fields})
        save()

    try:
        _import_peer(contender)
    except NotInstalled as exc:
        for seq_len, batch_size in settings:
            add_row(seq_len, batch_size, status="not_installed", message=str(exc))
        return 0

    import torch

    device = torch.device("cuda", 0) if spec["device_kind"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32
    result["info"]["dtype"] = str(dtype).replace("torch.", "")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        if spec["loss_path"] == "trl":
            import trl.trainer.utils  # noqa: F401 - fail early and clearly when TRL (or datasets) is missing
        model, checkpointing = build_model(contender, spec, device, dtype)
        if spec["loss_path"] == "trl":
            from trl.trainer.utils import add_fused_lm_head

            add_fused_lm_head(model.get_base_model())  # as SFTTrainer does for a PeftModel
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise RuntimeError("the model has no trainable parameters after LoRA wrapping")
        if dtype == torch.bfloat16:
            # TRL 1.16 casts the LoRA weights of 4-bit models to bf16 (QLoRA paper); fp16 keeps fp32 masters
            # for the GradScaler
            for param in trainable:
                param.data = param.data.to(torch.bfloat16)
        snapshot = [p.detach().to("cpu", copy=True) for p in trainable]
    except Exception as exc:  # noqa: BLE001
        status = "oom" if device.type == "cuda" and _is_oom(exc) else "error"
        message = ("at load: " + str(exc).splitlines()[0][:500]) if status == "oom" else "at load: " + _error_text(exc)
        if isinstance(exc, ImportError) and contender in ("liger", "unsloth"):
            status, message = "not_installed", f"{contender} is installed but does not import: {exc}"
        print(f"[{contender}] {spec['model']}: load failed: {message}", flush=True)
        for seq_len, batch_size in settings:
            add_row(seq_len, batch_size, status=status, message=message)
        return 0
    info = result["info"]
    info["load_seconds"] = round(time.perf_counter() - t0, 2)
    info["checkpointing"] = checkpointing
    info["trainable_params"] = sum(p.numel() for p in trainable)
    info["trainable_dtype"] = str(trainable[0].dtype).replace("torch.", "")
    info["attention"] = getattr(model.config, "_attn_implementation", None)
    if "fastft" in sys.modules:
        info["fastft_path"] = os.path.dirname(sys.modules["fastft"].__file__)
    if device.type == "cuda":
        info["load_peak_vram_gb"] = torch.cuda.max_memory_allocated(device) / shared.GIB
        info["model_vram_gb"] = torch.cuda.memory_allocated(device) / shared.GIB
    save()
    print(f"[{contender}] {spec['model']}: loaded in {info['load_seconds']} s, "
          f"{info['trainable_params'] / 1e6:.1f}M trainable ({info['trainable_dtype']}), checkpointing {checkpointing}, "
          f"attention {info['attention']}",
          flush=True)

    fatal = None
    for seq_len, batch_size in settings:
        if fatal:
            add_row(seq_len, batch_size, status="error", message=f"not run: an earlier setting broke the CUDA "
                                                                  f"context ({fatal})")
            continue
        if spec.get("deadline") and time.time() > spec["deadline"]:
            add_row(seq_len, batch_size, status="skipped", message="not run: --time-budget-s exhausted")
            continue
        row = _train_setting(model, spec, seq_len, batch_size, trainable, snapshot, device, dtype)
        if row.pop("fatal", False):
            fatal = (row["message"] or "").splitlines()[-1][:200]
        add_row(seq_len, batch_size, **row)
        print(f"[{contender}] {spec['model']} T={seq_len} B={batch_size}: {row['status']}"
              + (f" {row['tokens_per_s']:.0f} tok/s, step {row['step_time_median_s']:.3f} s"
                 if row["status"] == "ok" else f" ({(row['message'] or '').splitlines()[-1][:200]})")
              + (f", peak {row['peak_vram_gb']:.2f} GB" if row.get("peak_vram_gb") is not None else "")
              + f", losses {[round(v, 4) for v in row['losses']]}", flush=True)
    return 0


# --------------------------------------------------------------------------------------------------------
# Parent: checkpoints, subprocesses, ratios, files
# --------------------------------------------------------------------------------------------------------
def _child_env() -> dict:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


def run_child(argv: list[str], prefix: str, timeout: float | None) -> tuple[int | None, str, bool]:
    """Run ``python bench/run.py <argv>`` in its own process group, relaying its output line by line.
    Returns (exit code or None when killed, last lines of output, timed_out)."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_child_env(),
                            start_new_session=True, errors="replace")
    tail: deque[str] = deque(maxlen=40)

    def relay():
        for line in proc.stdout:
            tail.append(line.rstrip())
            print(f"  {prefix} | {line.rstrip()}", flush=True)

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)  # the process group this call started
        proc.wait()
    reader.join(timeout=10)
    return (None if timed_out else proc.returncode), "\n".join(tail), timed_out


def resolve_plan(args) -> dict:
    if args.cpu_smoke:
        models = args.models or ["tiny"]
        plan = dict(models=models, seq_lens=args.seq_lens or [32], batch_sizes=args.batch_sizes or [2],
                    contenders=args.contenders or ["hf", "fastft"], steps=args.steps or 2,
                    warmup=1 if args.warmup is None else args.warmup, device_kind="cpu")
    elif args.quick:
        plan = dict(models=args.models or ["small"], seq_lens=args.seq_lens or [512, 2048],
                    batch_sizes=args.batch_sizes or [1], contenders=args.contenders or list(CONTENDERS),
                    steps=args.steps or 5, warmup=2 if args.warmup is None else args.warmup, device_kind="cuda")
    else:
        plan = dict(models=args.models or ["llama3-8b", "qwen2-7b"], seq_lens=args.seq_lens or [512, 2048, 4096],
                    batch_sizes=args.batch_sizes or [1, 4], contenders=args.contenders or list(CONTENDERS),
                    steps=args.steps or 5, warmup=2 if args.warmup is None else args.warmup, device_kind="cuda")
    for model in plan["models"]:
        if model not in MODELS:
            raise SystemExit(f"bench/run.py: unknown model {model!r}; choose from {', '.join(MODELS)}")
    for contender in plan["contenders"]:
        if contender not in CONTENDERS:
            raise SystemExit(f"bench/run.py: unknown contender {contender!r}; choose from {', '.join(CONTENDERS)}")
    if plan["steps"] < 1 or plan["warmup"] < 0:
        raise SystemExit("bench/run.py: --steps must be >= 1 and --warmup >= 0")
    if any(v < 1 for v in plan["seq_lens"] + plan["batch_sizes"]):
        raise SystemExit("bench/run.py: sequence lengths and batch sizes must be >= 1")
    # hf first: the others' ratios and loss checks are against it
    plan["contenders"] = sorted(dict.fromkeys(plan["contenders"]), key=CONTENDERS.index)
    # small settings first, so that an OOM at a large one cannot hide the small ones
    plan["settings"] = sorted(((t, b) for t in plan["seq_lens"] for b in plan["batch_sizes"]),
                              key=lambda s: (s[0] * s[1], s[0]))
    return plan


def add_ratios(rows: list[dict], loss_tol_override: float | None = None) -> None:
    """Ratios against hf and the loss check, within this run's rows."""
    hf = {tuple(r[k] for k in BASELINE_KEY): r for r in rows if r["contender"] == "hf"}
    for row in rows:
        row.setdefault("flags", [])
        for field in ("tokens_per_s_vs_hf", "step_time_vs_hf", "peak_vram_vs_hf", "peak_reserved_vs_hf",
                      "loss_max_abs_diff_vs_hf"):
            row.setdefault(field, None)
        tokens = row["seq_len"] * row["batch_size"]
        tolerance = loss_tol_override if loss_tol_override is not None else loss_tolerance(row.get("dtype"), tokens)
        row["loss_tol"] = tolerance
        if row["contender"] == "hf" or row["status"] != "ok":
            continue
        base = hf.get(tuple(row[k] for k in BASELINE_KEY))
        if base is None or base["status"] != "ok":
            row["flags"].append("no_hf_baseline")
            continue

        def ratio(a, b):
            return a / b if a is not None and b else None

        row["tokens_per_s_vs_hf"] = ratio(row.get("tokens_per_s"), base.get("tokens_per_s"))
        row["step_time_vs_hf"] = ratio(row.get("step_time_median_s"), base.get("step_time_median_s"))
        row["peak_vram_vs_hf"] = ratio(row.get("peak_vram_gb"), base.get("peak_vram_gb"))
        row["peak_reserved_vs_hf"] = ratio(row.get("peak_reserved_gb"), base.get("peak_reserved_gb"))
        pairs = list(zip(row["loss_first_steps"], base["loss_first_steps"]))
        if pairs:
            diff = max(abs(a - b) for a, b in pairs)
            row["loss_max_abs_diff_vs_hf"] = diff
            if not diff <= tolerance:
                row["flags"].append("loss_mismatch")


def _gpu_name_without_context() -> str:
    """GPU 0's name through NVML (no CUDA context in this process); torch's as a fallback."""
    import torch

    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        index = int(visible) if visible.isdigit() else 0
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(index))
        return name.decode() if isinstance(name, bytes) else name
    except Exception:  # noqa: BLE001 - no NVML bindings: ask torch (creates a context, costs a little memory)
        return torch.cuda.get_device_name(0)


def orchestrate(args) -> int:
    import torch

    plan = resolve_plan(args)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench/run.py: no CUDA GPU found. The benchmark's figures exist only when measured on a GPU "
              "(see bench/README.md); use --cpu-smoke to check the harness itself on CPU.", file=sys.stderr)
        return 2
    shared.warn_dropped(_DROPPED_FROM_PATH, "bench/run.py")
    started = time.time()
    deadline = started + args.time_budget_s if args.time_budget_s else None
    date = shared.utc_date()
    if args.cpu_smoke:
        device_name, stem = "cpu (smoke run)", f"{date}-cpu-smoke"
        out_dir = args.out_dir or os.path.join(tempfile.gettempdir(), "fastft-bench-cpu-smoke")
    else:
        device_name = _gpu_name_without_context()
        stem = f"{date}-{shared.slug(device_name)}"
        out_dir = args.out_dir or shared.DEFAULT_RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(args.cache_dir, exist_ok=True)
    # the GPU's name and properties come from a child process: the parent never creates a CUDA context, so
    # it holds no GPU memory while the contenders run
    if args.cpu_smoke:
        env = shared.environment(device_name)
    else:
        info_path = os.path.join(tempfile.mkdtemp(prefix="fastft-bench-env-"), "env.json")
        code, tail, _ = run_child(["--device-info", info_path, "--device-name", device_name], "env", 300)
        if code != 0:
            print(f"bench/run.py: could not read the environment:\n{tail}", file=sys.stderr)
            return 1
        with open(info_path) as f:
            env = json.load(f)
    header = {**env, "date": date, "command": shared.command_line(), "cpu_smoke": bool(args.cpu_smoke)}
    print(f"bench/run.py: {device_name}; torch {header['torch']}, transformers {header['transformers']}, "
          f"peft {header['peft']}, bitsandbytes {header['bitsandbytes']}, trl {header['trl']}", flush=True)
    print(f"plan: models {plan['models']}, settings (seq, batch) {plan['settings']}, contenders {plan['contenders']}, "
          f"warmup {plan['warmup']}, steps {plan['steps']}, loss {args.loss_path}", flush=True)

    rows, checkpoints, loads = [], {}, {}
    work = tempfile.mkdtemp(prefix="fastft-bench-")
    for model_name in plan["models"]:
        settings = plan["settings"]

        def base_row(contender, seq_len, batch_size):
            return {"contender": contender, "model": model_name, "seq_len": seq_len, "batch_size": batch_size,
                    "loss_path": args.loss_path, "device_kind": plan["device_kind"], "warmup": plan["warmup"],
                    "steps": plan["steps"], "tokens_per_s": None, "step_time_median_s": None,
                    "step_time_spread_s": None, "peak_vram_gb": None, "peak_reserved_gb": None,
                    "loss_first_steps": [], "status": "error", "message": None,
                    "attention": args.attention if contender == "fastft" else None, "attention_impl": None}

        # 1. the random-weight checkpoint, in a subprocess of its own
        info_path = os.path.join(work, f"checkpoint-{model_name}.json")
        remaining = None if deadline is None else max(1.0, deadline - time.time())
        print(f"== {model_name}: checkpoint", flush=True)
        code, tail, timed_out = run_child(["--make-checkpoint", model_name, "--cache-dir", args.cache_dir,
                                           "--checkpoint-info", info_path], f"ckpt {model_name}", remaining)
        if code != 0 or not os.path.exists(info_path):
            why = "timed out" if timed_out else f"exit code {code}"
            for contender in plan["contenders"]:
                for seq_len, batch_size in settings:
                    rows.append({**base_row(contender, seq_len, batch_size), "checkpointing": args.checkpointing,
                                 "message": f"checkpoint creation failed ({why}): {tail[-1500:]}"})
            continue
        with open(info_path) as f:
            checkpoints[model_name] = json.load(f)
        print(f"   checkpoint {checkpoints[model_name]}", flush=True)

        # 2. one process per contender
        for contender in plan["contenders"]:
            result_path = os.path.join(work, f"result-{model_name}-{contender}.json")
            spec = {"contender": contender, "model": model_name, "checkpoint": checkpoints[model_name]["path"],
                    "settings": settings, "seq_lens": plan["seq_lens"], "warmup": plan["warmup"],
                    "steps": plan["steps"], "seed": args.seed, "lr": args.lr, "loss_path": args.loss_path,
                    "checkpointing": args.checkpointing, "loss_steps": LOSS_STEPS, "attention": args.attention,
                    "device_kind": plan["device_kind"], "result_path": result_path, "deadline": deadline}
            spec_path = os.path.join(work, f"spec-{model_name}-{contender}.json")
            shared.write_json_atomic(spec_path, spec)
            timeout = args.worker_timeout_s
            if deadline is not None:
                timeout = min(timeout, max(0.0, deadline - time.time()))
            if timeout <= 0:
                code, tail, timed_out, budget_hit = None, "", False, True
            else:
                print(f"== {model_name}: {contender}", flush=True)
                code, tail, timed_out = run_child(["--worker", spec_path], f"{contender:>7}", timeout)
                budget_hit = timed_out and deadline is not None and time.time() >= deadline - 1
            result = {"rows": [], "info": {}}
            if os.path.exists(result_path):
                with open(result_path) as f:
                    result = json.load(f)
            loads[f"{model_name}/{contender}"] = result["info"]
            done = {(r["seq_len"], r["batch_size"]): r for r in result["rows"]}
            for seq_len, batch_size in settings:
                row = base_row(contender, seq_len, batch_size)
                row["checkpointing"] = result["info"].get("checkpointing", args.checkpointing)
                row["dtype"] = result["info"].get("dtype")
                for key in ("load_seconds", "load_peak_vram_gb", "model_vram_gb", "trainable_params"):
                    row[key] = result["info"].get(key)
                row["attention_impl"] = result["info"].get("attention")
                if (seq_len, batch_size) in done:
                    row.update(done[(seq_len, batch_size)])
                elif budget_hit:
                    row.update(status="skipped", message="not run: --time-budget-s exhausted")
                else:
                    why = (f"killed after --worker-timeout-s={args.worker_timeout_s:g}" if timed_out
                           else f"worker exited with code {code}")
                    row.update(status="error", message=f"{why} before this setting finished; last output:\n"
                                                       f"{tail[-1500:]}")
                rows.append(row)

    add_ratios(rows, args.loss_tol)
    run_info = {"date": date, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                "seconds": round(time.time() - started, 1), "command": header["command"],
                **{k: header[k] for k in ("gpu", "torch", "triton", "transformers", "peft", "bitsandbytes", "trl",
                                          "liger_kernel", "unsloth", "xformers", "fastft")},
                "plan": {k: plan[k] for k in ("models", "seq_lens", "batch_sizes", "contenders", "steps", "warmup")},
                "loss_path": args.loss_path, "attention": args.attention, "lr": args.lr, "seed": args.seed,
                "checkpoints": checkpoints,
                "loads": loads}
    header["definitions"] = definitions(args)
    json_path = os.path.join(out_dir, stem + ".json")
    data = shared.merge_results(json_path, header, run_info, rows, ROW_KEY)
    md_path = os.path.join(out_dir, stem + ".md")
    with open(md_path, "w") as f:
        f.write(markdown(data))
    png_path = os.path.join(out_dir, stem + ".png")
    if not args.no_plot:
        plot(data, png_path)
    print()
    print(markdown_table(rows))
    print(f"\nwrote {json_path}\n      {md_path}" + (f"\n      {png_path}" if os.path.exists(png_path) else ""))
    if args.cpu_smoke:
        bad = [r for r in rows if r["contender"] in ("hf", "fastft") and (r["status"] != "ok" or "loss_mismatch" in r["flags"])]
        if bad:
            print("cpu smoke: FAILED rows: " + "; ".join(f"{r['contender']} {r['status']} {r['flags']}"
                                                         for r in bad), file=sys.stderr)
            return 1
    return 0


def definitions(args) -> dict:
    return {
        "loop": "bench/run.py's own loop, not TRL's SFTTrainer: forward, backward, torch.optim.AdamW step, "
                "zero_grad; cuda synchronize before and after each step; same loop for every contender",
        "loss_path": {"labels": "model(input_ids, attention_mask, labels=labels).loss",
                      "trl": "TRL 1.16 add_fused_lm_head + model(..., fused_lm_head=True).loss"}[args.loss_path],
        "data": "uniform random token ids, same seed for every contender; no padding; labels = input ids",
        "tokens_per_s": "batch_size * seq_len / median timed step time",
        "step_time_spread_s": "min, p25, p75, max of the timed steps (warm-up excluded)",
        "peak_vram_gb": "torch.cuda.max_memory_allocated / 2**30, peak stats reset after loading, before the "
                        "setting's first warm-up step (includes the resident 4-bit model and optimizer state)",
        "peak_reserved_gb": "torch.cuda.max_memory_reserved / 2**30, same window",
        "load_peak_vram_gb": "max_memory_allocated during loading and LoRA wrapping",
        "loss_first_steps": f"losses of the first {LOSS_STEPS} steps (warm-up included), from the same LoRA init "
                            "and data for every contender",
        "loss_tol": "flag loss_mismatch when max |loss - loss_hf| over the first steps exceeds it; "
                    + LOSS_TOL_WHY.format(k=LOSS_STEPS),
        "lora": f"r={LORA_R}, alpha={LORA_ALPHA}, dropout 0, all linear layers {LORA_TARGETS}, LoRA weights bf16 "
                "(as TRL casts them for 4-bit models; fp32 on fp16 GPUs and in CPU smoke runs)",
        "quantization": "bitsandbytes NF4, double quantization, blocksize 64, compute dtype = training dtype",
        "weights": f"random: normal(0, {INIT_STD}) matrices and biases, norms 1; bf16 checkpoint",
        "statuses": "ok, oom, not_installed, error (message), skipped (time budget)",
        "ratios": "*_vs_hf = contender / hf for the same model, seq_len, batch_size in the same run",
        "attention": "--attention given for the fastft contender (auto: fastft's choice), None for the others; "
                     "attention_impl: the config's attn_implementation the contender trained with (fastft = its "
                     "Triton kernel, fastft_xformers = xformers' memory-efficient kernel, sdpa = PyTorch SDPA)",
    }


# --------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------
def _status_cell(row) -> str:
    text = row["status"]
    if row.get("flags"):
        text += " (" + ", ".join(row["flags"]) + ")"
    return text


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | seq | batch | contender | status | tokens/s | x hf | step s median (min-max) | "
             "peak alloc GB | x hf | peak reserved GB | loss, first steps | max abs loss diff vs hf | loss path, "
             "checkpointing | attention |",
             "|---|---:|---:|---|---|---:|---:|---|---:|---:|---:|---|---:|---|---|"]
    order = {c: i for i, c in enumerate(CONTENDERS)}
    for row in sorted(rows, key=lambda r: (r["model"], r.get("loss_path", ""), r["seq_len"], r["batch_size"],
                                           order.get(r["contender"], 99))):
        spread = row.get("step_time_spread_s") or {}
        step = (f"{row['step_time_median_s']:.3f} ({spread.get('min', 0):.3f}-{spread.get('max', 0):.3f})"
                if row.get("step_time_median_s") is not None else "-")
        losses = ", ".join(f"{v:.4f}" for v in row.get("loss_first_steps") or []) or "-"
        lines.append(
            f"| {row['model']} | {row['seq_len']} | {row['batch_size']} | {row['contender']} | {_status_cell(row)} "
            f"| {shared.fmt(row.get('tokens_per_s'), '.0f')} | {shared.fmt(row.get('tokens_per_s_vs_hf'), '.2f')} "
            f"| {step} | {shared.fmt(row.get('peak_vram_gb'), '.2f')} | {shared.fmt(row.get('peak_vram_vs_hf'), '.2f')} "
            f"| {shared.fmt(row.get('peak_reserved_gb'), '.2f')} | {losses} "
            f"| {shared.fmt(row.get('loss_max_abs_diff_vs_hf'), '.2g')} "
            f"| {row.get('loss_path')}, {row.get('checkpointing')} | {shared.fmt(row.get('attention_impl'))} |")
    return "\n".join(lines) + "\n"


def markdown(data: dict) -> str:
    out = []
    if data.get("cpu_smoke"):
        out.append("# CPU SMOKE RUN: a check of the benchmark harness, NOT performance figures\n")
    else:
        out.append(f"# fastft QLoRA training benchmark: {data['gpu']}, {data['date']}\n")
    fastft = data.get("fastft") or {}
    out.append(f"- GPU: {data['gpu']}" + (f" ({data.get('gpu_memory_gb')} GiB)" if data.get("gpu_memory_gb") else ""))
    out.append(f"- torch {data['torch']} (CUDA {data.get('cuda')}), triton {data['triton']}, transformers "
               f"{data['transformers']}, peft {data['peft']}, bitsandbytes {data['bitsandbytes']}, trl {data['trl']}, "
               f"liger-kernel {data.get('liger_kernel')}, unsloth {data.get('unsloth')}, xformers {data.get('xformers')}")
    out.append(f"- fastft {fastft.get('version')}, source digest {fastft.get('source_digest')} "
               f"(`python bench/_shared.py` prints a checkout's), git commit {fastft.get('git_commit')}"
               + (" (uncommitted changes)" if fastft.get("git_dirty") else ""))
    out.append("- runs merged into this file:")
    for i, run in enumerate(data["runs"]):
        out.append(f"  {i}. `{run['command']}` ({run['started']}, {run['seconds']} s, loss path {run['loss_path']})")
        for name, ckpt in (run.get("checkpoints") or {}).items():
            out.append(f"     - checkpoint {name}: {ckpt.get('bytes', 0) / 1e9:.1f} GB, "
                       + ("reused" if ckpt.get("reused") else f"written in {ckpt.get('seconds')} s"))
        for name, load in (run.get("loads") or {}).items():
            if load.get("load_seconds") is not None:
                out.append(f"     - {name}: loaded in {load['load_seconds']} s"
                           + (f", load peak {load['load_peak_vram_gb']:.2f} GB, resident {load['model_vram_gb']:.2f} GB"
                              if load.get("load_peak_vram_gb") is not None else ""))
    if data.get("mixed_versions"):
        out.append(f"- WARNING: runs with different versions merged: {data['mixed_versions']}")
    out.append("")
    out.append(markdown_table(data["rows"]))
    out.append("\n## Definitions\n")
    for key, value in (data.get("definitions") or {}).items():
        out.append(f"- **{key}**: {value}")
    problems = [r for r in data["rows"] if r["status"] in ("error", "oom") and r.get("message")]
    if problems:
        out.append("\n## Messages\n")
        for row in problems:
            first = (row["message"] or "").strip().splitlines()
            out.append(f"- {row['contender']} {row['model']} T={row['seq_len']} B={row['batch_size']} "
                       f"({row['status']}): {first[-1][:300] if first else ''}")
    return "\n".join(out) + "\n"


def plot(data: dict, path: str) -> None:
    plt = shared.pyplot("bench/run.py")
    if plt is None:
        return
    rows = data["rows"]
    models = sorted({r["model"] for r in rows})
    # one bar series per contender and --attention (fastft measured with a forced backend is its own series)
    series = [(c, a) for c in CONTENDERS for a in sorted({r.get("attention") or "" for r in rows if r["contender"] == c})]
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 3.8 * len(models)), squeeze=False)
    width = 0.8 / max(1, len(series))
    for m, model in enumerate(models):
        settings = sorted({(r["seq_len"], r["batch_size"], r.get("loss_path", "labels"))
                           for r in rows if r["model"] == model}, key=lambda s: (s[2], s[1], s[0]))
        labels = [f"T={t}\nB={b}" + ("" if lp == "labels" else f"\n{lp}") for t, b, lp in settings]
        for c, (contender, attention) in enumerate(series):
            found = {(r["seq_len"], r["batch_size"], r.get("loss_path", "labels")): r for r in rows
                     if r["model"] == model and r["contender"] == contender and (r.get("attention") or "") == attention}
            label = contender if attention in ("", "auto") else f"{contender} (attention {attention})"
            for ax, field in ((axes[m][0], "tokens_per_s"), (axes[m][1], "peak_vram_gb")):
                xs, ys = [], []
                for i, setting in enumerate(settings):
                    row = found.get(setting)
                    x = i + (c - (len(series) - 1) / 2) * width
                    if row is None:
                        continue
                    value = row.get(field) if row["status"] == "ok" else None
                    if value is None and row["status"] != "ok":
                        ax.text(x, 0, row["status"].upper().replace("_", "\n"), rotation=90, ha="center",
                                va="bottom", fontsize=6)
                    elif value is not None:
                        xs.append(x)
                        ys.append(value)
                if xs:
                    ax.bar(xs, ys, width, label=label if ax is axes[m][0] else None, color=COLORS.get(contender),
                           hatch=None if attention in ("", "auto") else "//")
        for ax, title in ((axes[m][0], "tokens/s (higher is better)"),
                          (axes[m][1], "peak VRAM allocated, GiB (lower is better)")):
            ax.set_title(f"{model}: {title}", fontsize=10)
            ax.set_xticks(range(len(settings)))
            ax.set_xlim(-0.6, len(settings) - 0.4)
            ax.set_xticklabels(labels, fontsize=8)
            ax.grid(axis="y", alpha=0.3)
        axes[m][0].legend(fontsize=8)
    title = ("CPU SMOKE RUN (not figures)" if data.get("cpu_smoke") else
             f"{data['gpu']}, {data['date']}, torch {data['torch']}, transformers {data['transformers']}")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    _DROPPED_FROM_PATH[:] = shared.clean_sys_path()  # before anything imports transformers
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.device_info:
        shared.write_json_atomic(args.device_info, shared.environment(args.device_name))
        return 0
    if args.make_checkpoint:
        info = make_checkpoint(args.make_checkpoint, args.cache_dir)
        shared.write_json_atomic(args.checkpoint_info, info)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
