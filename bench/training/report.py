"""Ratios against ``hf``, the measurement definitions, and the Markdown table, report and plot of
``bench/run.py``'s results."""
from __future__ import annotations

from . import shared
from .config import (
    BASELINE_KEY,
    CONTENDERS,
    INIT_STD,
    LORA_ALPHA,
    LORA_R,
    LORA_TARGETS,
    LOSS_STEPS,
    LOSS_TOL_WHY,
    loss_tolerance,
)

COLORS = {"hf": "tab:gray", "fastft": "tab:orange", "liger": "tab:green", "unsloth": "tab:purple"}


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
            f"| {step} | {shared.fmt(row.get('peak_vram_gb'), '.2f')} "
            f"| {shared.fmt(row.get('peak_vram_vs_hf'), '.2f')} "
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
               f"liger-kernel {data.get('liger_kernel')}, unsloth {data.get('unsloth')}, "
               f"xformers {data.get('xformers')}")
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
    series = [(c, a) for c in CONTENDERS
              for a in sorted({r.get("attention") or "" for r in rows if r["contender"] == c})]
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
