"""The worker: one contender, one model, all its settings, in its own process (``bench/run.py --worker
SPEC_JSON``), so that one contender's patches cannot leak into another. It writes its rows to the spec's
``result_path`` after every setting, so a crash or a kill loses only the setting that was running."""
from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch

from . import shared
from .config import ATTENTION, LORA_ALPHA, LORA_R, LORA_SEED, LORA_TARGETS, MODELS


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
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _error_text(exc: BaseException) -> str:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    text = "".join(tb[-4:]).strip()
    return text[-2000:]


def make_batches(seed: int, seq_len: int, batch_size: int, vocab: int, n: int):
    """The same random token ids for every contender (CPU generator, fixed seed per setting)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + seq_len * 1_009 + batch_size)
    return [torch.randint(0, vocab, (batch_size, seq_len), generator=gen) for _ in range(n)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_setting(model, spec: dict, seq_len: int, batch_size: int, trainable, snapshot, device, dtype) -> dict:
    """Warm-up + timed steps of one (seq_len, batch_size) setting; returns the row's measurements."""
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
        loss = None  # noqa: F841 - drops the graph (and its activations) before the next setting
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


class _Result:
    """The worker's result file: its rows and load facts, rewritten after every change."""

    def __init__(self, path: str):
        self.path, self.data = path, {"rows": [], "info": {}}

    def save(self):
        shared.write_json_atomic(self.path, self.data)

    def add_row(self, seq_len, batch_size, **fields):
        self.data["rows"].append({"seq_len": seq_len, "batch_size": batch_size, **fields})
        self.save()


def _device_and_dtype(spec: dict):
    """GPU: bf16 where supported, else fp16; CPU (smoke run): fp32."""
    if spec["device_kind"] != "cuda":
        return torch.device("cpu"), torch.float32
    return torch.device("cuda", 0), torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _load_for_training(contender: str, spec: dict, device, dtype):
    """The contender's model, ready to train: (model, checkpointing mode, trainable parameters, a CPU
    snapshot of them that every setting starts from)."""
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
    return model, checkpointing, trainable, snapshot


def _load_failure(contender: str, device, exc: BaseException) -> tuple[str, str]:
    """(status, message) of every row of a contender that could not be loaded."""
    if isinstance(exc, ImportError) and contender in ("liger", "unsloth"):
        return "not_installed", f"{contender} is installed but does not import: {exc}"
    if device.type == "cuda" and _is_oom(exc):
        return "oom", "at load: " + str(exc).splitlines()[0][:500]
    return "error", "at load: " + _error_text(exc)


def _record_load(info: dict, model, checkpointing: str, trainable, device, seconds: float) -> None:
    info.update(load_seconds=round(seconds, 2), checkpointing=checkpointing,
                trainable_params=sum(p.numel() for p in trainable),
                trainable_dtype=str(trainable[0].dtype).replace("torch.", ""),
                attention=getattr(model.config, "_attn_implementation", None))
    if "fastft" in sys.modules:
        info["fastft_path"] = os.path.dirname(sys.modules["fastft"].__file__)
    if device.type == "cuda":
        info["load_peak_vram_gb"] = torch.cuda.max_memory_allocated(device) / shared.GIB
        info["model_vram_gb"] = torch.cuda.memory_allocated(device) / shared.GIB


def _print_setting(tag: str, seq_len: int, batch_size: int, row: dict) -> None:
    print(f"{tag} T={seq_len} B={batch_size}: {row['status']}"
          + (f" {row['tokens_per_s']:.0f} tok/s, step {row['step_time_median_s']:.3f} s"
             if row["status"] == "ok" else f" ({(row['message'] or '').splitlines()[-1][:200]})")
          + (f", peak {row['peak_vram_gb']:.2f} GB" if row.get("peak_vram_gb") is not None else "")
          + f", losses {[round(v, 4) for v in row['losses']]}", flush=True)


def _run_settings(result: _Result, tag: str, spec: dict, settings, model, trainable, snapshot, device,
                  dtype) -> None:
    """Every (seq_len, batch_size) setting in turn; after a broken CUDA context or past the deadline the
    remaining ones get rows saying why they did not run."""
    fatal = None
    for seq_len, batch_size in settings:
        if fatal:
            result.add_row(seq_len, batch_size, status="error",
                           message=f"not run: an earlier setting broke the CUDA context ({fatal})")
            continue
        if spec.get("deadline") and time.time() > spec["deadline"]:
            result.add_row(seq_len, batch_size, status="skipped", message="not run: --time-budget-s exhausted")
            continue
        row = _train_setting(model, spec, seq_len, batch_size, trainable, snapshot, device, dtype)
        if row.pop("fatal", False):
            fatal = (row["message"] or "").splitlines()[-1][:200]
        result.add_row(seq_len, batch_size, **row)
        _print_setting(tag, seq_len, batch_size, row)


def worker_main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    contender, tag = spec["contender"], f"[{spec['contender']}] {spec['model']}"
    settings = [tuple(s) for s in spec["settings"]]
    result = _Result(spec["result_path"])
    try:
        _import_peer(contender)
    except NotInstalled as exc:
        for seq_len, batch_size in settings:
            result.add_row(seq_len, batch_size, status="not_installed", message=str(exc))
        return 0

    device, dtype = _device_and_dtype(spec)
    info = result.data["info"]
    info["dtype"] = str(dtype).replace("torch.", "")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        model, checkpointing, trainable, snapshot = _load_for_training(contender, spec, device, dtype)
    except Exception as exc:  # noqa: BLE001 - recorded in every row
        status, message = _load_failure(contender, device, exc)
        print(f"{tag}: load failed: {message}", flush=True)
        for seq_len, batch_size in settings:
            result.add_row(seq_len, batch_size, status=status, message=message)
        return 0
    _record_load(info, model, checkpointing, trainable, device, time.perf_counter() - t0)
    result.save()
    print(f"{tag}: loaded in {info['load_seconds']} s, {info['trainable_params'] / 1e6:.1f}M trainable "
          f"({info['trainable_dtype']}), checkpointing {checkpointing}, attention {info['attention']}", flush=True)
    _run_settings(result, tag, spec, settings, model, trainable, snapshot, device, dtype)
    return 0
