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

The training loop is the benchmark's own (``_train_setting`` in ``bench/training/worker.py``), the same
for every contender, and is **not** TRL's ``SFTTrainer`` loop: forward, backward, ``torch.optim.AdamW``
step, ``zero_grad``, with a CUDA synchronize before and after each step. ``--loss labels`` (default) takes the loss from
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
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections import deque

import torch


def _load_training():
    """bench/training/ as the package ``fastft_bench_training``, by path (bench/ itself is not a package)."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "training")
    spec = importlib.util.spec_from_file_location("fastft_bench_training", os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# bench/ is not a package: its scripts import _shared.py as a sibling module. Run as a script, bench/ is
# sys.path[0] already; loaded by path (the tests) it is added here. Never the repository root (clean_sys_path).
_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if _BENCH_DIR not in sys.path:
    sys.path.insert(0, _BENCH_DIR)
import _shared as shared  # noqa: E402

_load_training()
from fastft_bench_training.checkpoint import make_checkpoint  # noqa: E402 - after the loader
from fastft_bench_training.config import ATTENTION, CONTENDERS, LOSS_STEPS, MODELS, ROW_KEY  # noqa: E402
from fastft_bench_training.report import add_ratios, definitions, markdown, markdown_table, plot  # noqa: E402
from fastft_bench_training.worker import worker_main  # noqa: E402

_DROPPED_FROM_PATH: list[str] = []


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
    tail: deque[str] = deque(maxlen=40)

    def relay(line: str) -> None:
        tail.append(line)
        print(f"  {prefix} | {line}", flush=True)

    code, timed_out = shared.run_process_group(cmd, timeout, relay, env=_child_env())
    return code, "\n".join(tail), timed_out


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


def _gpu_name_without_context() -> str:
    """GPU 0's name through NVML (no CUDA context in this process); torch's as a fallback."""
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
    plan = resolve_plan(args)
    if not args.cpu_smoke and not torch.cuda.is_available():
        return shared.refuse_without_gpu("bench/run.py", "--cpu-smoke")
    shared.warn_dropped(_DROPPED_FROM_PATH, "bench/run.py")
    started = time.time()
    deadline = started + args.time_budget_s if args.time_budget_s else None
    date = shared.utc_date()
    device_name, stem, out_dir = _output_names(args, date)
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(args.cache_dir, exist_ok=True)
    env = _environment(args, device_name)
    if env is None:
        return 1
    header = {**env, "date": date, "command": shared.command_line(), "cpu_smoke": bool(args.cpu_smoke)}
    print(f"bench/run.py: {device_name}; torch {header['torch']}, transformers {header['transformers']}, "
          f"peft {header['peft']}, bitsandbytes {header['bitsandbytes']}, trl {header['trl']}", flush=True)
    print(f"plan: models {plan['models']}, settings (seq, batch) {plan['settings']}, contenders {plan['contenders']}, "
          f"warmup {plan['warmup']}, steps {plan['steps']}, loss {args.loss_path}", flush=True)

    rows, checkpoints, loads = [], {}, {}
    work = tempfile.mkdtemp(prefix="fastft-bench-")
    for model_name in plan["models"]:
        rows += _run_model(args, plan, model_name, work, deadline, checkpoints, loads)
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
    _write_results(args, os.path.join(out_dir, stem), header, run_info, rows)
    return _smoke_verdict(rows) if args.cpu_smoke else 0


def _output_names(args, date: str) -> tuple[str, str, str]:
    """(device name, result file stem, output folder)."""
    if args.cpu_smoke:
        return ("cpu (smoke run)", f"{date}-cpu-smoke",
                args.out_dir or os.path.join(tempfile.gettempdir(), "fastft-bench-cpu-smoke"))
    device_name = _gpu_name_without_context()
    return device_name, f"{date}-{shared.slug(device_name)}", args.out_dir or shared.DEFAULT_RESULTS_DIR


def _environment(args, device_name: str) -> dict | None:
    """The result header's environment (None when it could not be read). On a GPU it comes from a child
    process: the parent never creates a CUDA context, so it holds no GPU memory while the contenders run."""
    if args.cpu_smoke:
        return shared.environment(device_name)
    info_path = os.path.join(tempfile.mkdtemp(prefix="fastft-bench-env-"), "env.json")
    code, tail, _ = run_child(["--device-info", info_path, "--device-name", device_name], "env", 300)
    if code != 0:
        print(f"bench/run.py: could not read the environment:\n{tail}", file=sys.stderr)
        return None
    with open(info_path) as f:
        return json.load(f)


def _base_row(args, plan: dict, model_name: str, contender: str, seq_len: int, batch_size: int) -> dict:
    return {"contender": contender, "model": model_name, "seq_len": seq_len, "batch_size": batch_size,
            "loss_path": args.loss_path, "device_kind": plan["device_kind"], "warmup": plan["warmup"],
            "steps": plan["steps"], "tokens_per_s": None, "step_time_median_s": None,
            "step_time_spread_s": None, "peak_vram_gb": None, "peak_reserved_gb": None,
            "loss_first_steps": [], "status": "error", "message": None,
            "attention": args.attention if contender == "fastft" else None, "attention_impl": None}


def _run_model(args, plan: dict, model_name: str, work: str, deadline: float | None, checkpoints: dict,
               loads: dict) -> list[dict]:
    """The rows of one model: its random-weight checkpoint, then every contender, each in a subprocess."""
    checkpoint, failure = _checkpoint_in_child(args, model_name, work, deadline)
    if checkpoint is None:
        return [{**_base_row(args, plan, model_name, contender, seq_len, batch_size),
                 "checkpointing": args.checkpointing, "message": failure}
                for contender in plan["contenders"] for seq_len, batch_size in plan["settings"]]
    checkpoints[model_name] = checkpoint
    print(f"   checkpoint {checkpoint}", flush=True)
    rows = []
    for contender in plan["contenders"]:
        result, unfinished = _contender_in_child(args, plan, model_name, contender, checkpoint["path"], work,
                                                 deadline)
        loads[f"{model_name}/{contender}"] = result["info"]
        rows += _contender_rows(args, plan, model_name, contender, result, unfinished)
    return rows


def _checkpoint_in_child(args, model_name: str, work: str, deadline: float | None) -> tuple[dict | None, str]:
    """(checkpoint info, "") or (None, why it failed)."""
    info_path = os.path.join(work, f"checkpoint-{model_name}.json")
    remaining = None if deadline is None else max(1.0, deadline - time.time())
    print(f"== {model_name}: checkpoint", flush=True)
    code, tail, timed_out = run_child(["--make-checkpoint", model_name, "--cache-dir", args.cache_dir,
                                       "--checkpoint-info", info_path], f"ckpt {model_name}", remaining)
    if code != 0 or not os.path.exists(info_path):
        why = "timed out" if timed_out else f"exit code {code}"
        return None, f"checkpoint creation failed ({why}): {tail[-1500:]}"
    with open(info_path) as f:
        return json.load(f), ""


def _contender_in_child(args, plan: dict, model_name: str, contender: str, checkpoint_path: str, work: str,
                        deadline: float | None) -> tuple[dict, dict]:
    """Run one contender's worker. Returns its result ({rows, info}) and the status and message of the
    settings it did not finish."""
    result_path = os.path.join(work, f"result-{model_name}-{contender}.json")
    spec = {"contender": contender, "model": model_name, "checkpoint": checkpoint_path,
            "settings": plan["settings"], "seq_lens": plan["seq_lens"], "warmup": plan["warmup"],
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
    if budget_hit:
        return result, {"status": "skipped", "message": "not run: --time-budget-s exhausted"}
    why = (f"killed after --worker-timeout-s={args.worker_timeout_s:g}" if timed_out
           else f"worker exited with code {code}")
    return result, {"status": "error",
                    "message": f"{why} before this setting finished; last output:\n{tail[-1500:]}"}


def _contender_rows(args, plan: dict, model_name: str, contender: str, result: dict, unfinished: dict) -> list[dict]:
    """One row per setting: the worker's measurements, else the reason it has none."""
    info = result["info"]
    done = {(r["seq_len"], r["batch_size"]): r for r in result["rows"]}
    rows = []
    for seq_len, batch_size in plan["settings"]:
        row = _base_row(args, plan, model_name, contender, seq_len, batch_size)
        row["checkpointing"] = info.get("checkpointing", args.checkpointing)
        row["dtype"] = info.get("dtype")
        for key in ("load_seconds", "load_peak_vram_gb", "model_vram_gb", "trainable_params"):
            row[key] = info.get(key)
        row["attention_impl"] = info.get("attention")
        row.update(done.get((seq_len, batch_size), unfinished))
        rows.append(row)
    return rows


def _write_results(args, stem_path: str, header: dict, run_info: dict, rows: list[dict]) -> None:
    """Merge into the day's JSON, rewrite its Markdown (and PNG), print the table."""
    json_path = stem_path + ".json"
    data = shared.merge_results(json_path, header, run_info, rows, ROW_KEY)
    md_path = stem_path + ".md"
    with open(md_path, "w") as f:
        f.write(markdown(data))
    png_path = stem_path + ".png"
    if not args.no_plot:
        plot(data, png_path)
    print()
    print(markdown_table(rows))
    print(f"\nwrote {json_path}\n      {md_path}" + (f"\n      {png_path}" if os.path.exists(png_path) else ""))


def _smoke_verdict(rows: list[dict]) -> int:
    """A CPU smoke run fails when hf or fastft did not run cleanly or their losses disagree."""
    bad = [r for r in rows
           if r["contender"] in ("hf", "fastft") and (r["status"] != "ok" or "loss_mismatch" in r["flags"])]
    if bad:
        print("cpu smoke: FAILED rows: " + "; ".join(f"{r['contender']} {r['status']} {r['flags']}" for r in bad),
              file=sys.stderr)
        return 1
    return 0


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
