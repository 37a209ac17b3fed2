#!/usr/bin/env bash
# Run the benchmark suite on a lent GPU machine (the `device` tool's `run`), in ONE call, from the repo root:
#
#   bash bench/device_run.sh MODE [extra arguments for bench/run.py]
#
# MODE (each sized for one call of at most 10 minutes; set BUDGET_S to change the time budget):
#   record    THE one call for a record: bench/device_session.py installs the carried wheels, runs fastft-doctor
#             (all sections), then the headline comparison (hf vs fastft, Llama-3-8B shape, seq 2048, batch 1 and 4,
#             r=16, --loss trl), then the MoE expert benchmark (bench/moe_experts.py: fastft's NF4 experts vs
#             transformers' eager and grouped_mm, when the budget leaves it its estimate) into ONE folder
#             $OUT/<stamp>-<gpu>/ with manifest.json, within --budget-s (default 540 s); extra arguments go to it
#             (--budget-s, --steps, --dry-run on CPU; --steps moe for the MoE benchmark alone). carry [".whl"],
#             timeout_s 600
#   check     environment only: versions, imports, GPU; then a 1-step --quick run of hf and fastft (~2 min)
#   quick     bench/run.py --quick (the ~0.5B 'small' model, seq 512/2048, batch 1, all contenders)
#   kernels   bench/microbench.py (all micro-benchmarks)
#   llama     bench/run.py --models llama3-8b (seq 512/2048/4096, batch 1/4, all contenders)
#   qwen      bench/run.py --models qwen2-7b
#   main      kernels (at most KERNELS_BUDGET_S) then llama, in one call
#   xformers  bench/attention_backends.py: fastft's attention kernel, xformers and SDPA at seq 2048, packed and
#             padded (agreement, time, memory; ~1 min); needs the xformers wheel in .whl (see below). Extra
#             arguments go to attention_backends.py (e.g. --dtype bfloat16); a T4/V100 training row per backend:
#             `bash bench/device_run.sh quick --attention xformers` (then --attention sdpa)
#   memory    bench/memory.py --gpu-check: Qwen2.5-1.5B steps (hf and fastft, 1k/4k tokens, checkpointing on and
#             offload) run for real, torch.cuda.max_memory_allocated beside the CPU accounting of the same step
#             (a few minutes); needs bitsandbytes + trl (+ datasets, dill, multiprocess for the trl loss path)
#
# Before the call, on the machine without a GPU (repo root):
#   ../shared/device-wheels.sh [liger]      # bitsandbytes + trl wheels (+ liger-kernel) into ./.whl
# then call `run` with carry [".whl"] and a timeout_s of at least BUDGET_S + 60, e.g.
#   command: "bash bench/device_run.sh llama", carry: [".whl"], timeout_s: 600
# Optional wheels, also dropped into .whl: xformers (for the `xformers` mode and `--attention xformers`:
#   pip download --no-deps xformers==0.0.35 -d .whl ; its CUDA extension must load beside the image's torch, else
#   its rows say not_available and why), datasets, dill, multiprocess (for `--loss trl`, which imports
# trl.trainer.utils, which imports datasets). unsloth cannot be carried usefully (it needs network); its rows say
# not_installed.
#
# The results are written into bench/results/ of the machine's copy of the tree -- merging with the files of the
# same day and GPU that travelled with the tree -- and copied to $OUT, so they come back with the reply. Copy them
# into bench/results/ here and commit them (the next call then carries them, and merges into them).
#
# How fastft is made importable there without `pip install` (the GPU image has torch, triton, transformers and
# peft but not fastft, bitsandbytes or trl): the package tree fastft/ with kernels/ as fastft/kernels is COPIED
# to /tmp/fastft-src, which goes on PYTHONPATH. The repository root itself must never be on sys.path (its
# kernels/ folder would shadow Hugging Face's `kernels` package that transformers probes for); bench/*.py also
# remove it from sys.path if it is there.
set -uo pipefail
MODE=${1:-check}
shift || true
case "$MODE" in record|check|quick|kernels|llama|qwen|main|xformers|memory) ;; *) echo "unknown MODE $MODE (record, check, quick, kernels, llama, qwen, main, xformers, memory)"; exit 2 ;; esac
cd "$(dirname "$0")/.." || exit 1
# record: the driver does every step itself (wheels, fastft's tree, budget, results folder); stdlib only
# (PYTHON: another interpreter, e.g. .venv/bin/python for `record --dry-run` on a CPU machine)
[ "$MODE" = record ] && PYTHONUNBUFFERED=1 exec "${PYTHON:-python3}" bench/device_session.py "$@"
REPO=$PWD
OUT=${OUT:-/tmp/fastft-bench-out}
mkdir -p "$OUT" bench/results
BUDGET_S=${BUDGET_S:-520}          # stop starting work after this; results are written before the call's limit
KERNELS_BUDGET_S=${KERNELS_BUDGET_S:-150}
START=$(date +%s)
LOG="$OUT/device_run.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

echo "== device_run.sh $MODE $* ($(date -u +%FT%TZ))"
nvidia-smi -L || true

# 1. carried wheels -> /tmp/site
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
else
  echo "WARNING: no .whl/*.whl carried: bitsandbytes and trl will be missing (run ../shared/device-wheels.sh first)"
fi

# 2. fastft as a package tree (a copy, so the repo root never goes on sys.path)
rm -rf /tmp/fastft-src && mkdir -p /tmp/fastft-src
cp -r "$REPO/fastft" /tmp/fastft-src/fastft && cp -r "$REPO/kernels" /tmp/fastft-src/fastft/kernels || exit 1
find /tmp/fastft-src -name __pycache__ -prune -exec rm -rf {} +
export PYTHONPATH=/tmp/site:/tmp/fastft-src

# (run from / : `python3 -` puts the cwd on sys.path, which here would be the repo root)
(cd / && python3 - <<'EOF') || { echo "environment check failed"; exit 1; }
import importlib.metadata as md, importlib.util, sys
import torch, triton, fastft, fastft.kernels
assert fastft.__file__.startswith("/tmp/fastft-src/"), fastft.__file__
spec = importlib.util.find_spec("kernels")
assert spec is None or "fastft" not in (spec.origin or ""), f"a top-level kernels module from this repo: {spec.origin}"
print("python", sys.version.split()[0], sys.executable)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("torch", "triton", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "safetensors",
             "liger-kernel", "xformers", "datasets", "matplotlib"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} MISSING")
print("fastft", fastft.__version__, fastft.__file__, "kernels:", fastft.kernels.__file__)
EOF

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

collect() {
  # at most 8 files come back: the day's result files for this GPU (json, md, png, kernels json/md) and the log
  for f in bench/results/*; do
    [ -f "$f" ] && [ "$f" -nt "$MARK" ] && cp "$f" "$OUT/" && echo "collected $f"
  done
  ls -la "$OUT"
}
MARK=$(mktemp); sleep 1

# each benchmark's output goes to the terminal (the reply's output_tail) and to $OUT/device_run.log
bench() { python3 "$@" 2>&1 | tee -a "$LOG"; return "${PIPESTATUS[0]}"; }

case "$MODE" in
  check)  # not figures worth committing: results stay in $OUT
    bench bench/run.py --quick --contenders hf,fastft --seq-lens 512 --batch-sizes 1 --warmup 1 --steps 1 \
      --time-budget-s "$(left)" --out-dir "$OUT" "$@"
    ;;
  quick)
    bench bench/run.py --quick --time-budget-s "$(left)" "$@"
    ;;
  kernels)
    bench bench/microbench.py --time-budget-s "$(left)" "$@"
    ;;
  llama)
    bench bench/run.py --models llama3-8b --time-budget-s "$(left)" "$@"
    ;;
  qwen)
    bench bench/run.py --models qwen2-7b --time-budget-s "$(left)" "$@"
    ;;
  main)
    bench bench/microbench.py --time-budget-s "$KERNELS_BUDGET_S"
    bench bench/run.py --models llama3-8b --time-budget-s "$(left)" "$@"
    ;;
  xformers)
    bench bench/attention_backends.py --time-budget-s "$(left)" "$@"
    ;;
  memory)
    bench bench/memory.py --gpu-check "$@"
    ;;
  *)
    echo "unknown MODE $MODE (check, quick, kernels, llama, qwen, main, xformers, memory)"; exit 2
    ;;
esac
rc=$?
collect
echo "== done: exit $rc after $(( $(date +%s) - START )) s"
rm -f "$MARK"
exit $rc
