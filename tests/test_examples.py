"""Each example runs with small settings, as a user would start it (a subprocess, CPU, fastft's PyTorch
engine: no TRITON_INTERPRET), and has a --help; and unchanged on 2 ranks under torchrun and accelerate launch."""
import os
import subprocess
import sys

import pytest
from kernel_testing import assert_help_documents, env_without_interpreter, script_help

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = ["sft.py", "dpo.py", "trl_sft_dropin.py", "trl_dpo_dropin.py", "task_data.py", "moe_sft.py"]


# Loaded into each example's interpreter (sitecustomize): every host lookup or connection is written to a log
# and refused, so the test sees any network call, from any thread.
NETWORK_GUARD = """
import os
import socket


def _refuse(name):
    def refused(*args, **kwargs):
        with open(os.environ["FASTFT_NETWORK_LOG"], "a") as log:
            log.write(f"{name}{args[:1]}\\n")
        raise OSError(f"network call refused by the test: {name}{args[:1]}")
    return refused


socket.getaddrinfo = _refuse("socket.getaddrinfo")
socket.create_connection = _refuse("socket.create_connection")
"""


def run(script, *args, cwd, network_log=None, launcher=(sys.executable,)):
    env = env_without_interpreter()
    if network_log is not None:
        guard = os.path.join(cwd, "network_guard")
        os.makedirs(guard, exist_ok=True)
        with open(os.path.join(guard, "sitecustomize.py"), "w") as f:
            f.write(NETWORK_GUARD)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [guard, env.get("PYTHONPATH")]))
        env["FASTFT_NETWORK_LOG"] = str(network_log)
    return subprocess.run([*launcher, os.path.join(ROOT, "examples", script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


TRAINING = {"--steps": "optimizer steps", "--lr": "learning rate", "--rank": "LoRA rank",
            "--eval-records": "held-out records scored before/after", "--seed": "SEED"}
DROPIN = ("A standard TRL {} script, as TRL's documentation writes it, with only the model loading lines changed",
          {"--max-steps": "MAX_STEPS", "--output-dir": "OUTPUT_DIR"})
HELP = {  # per example: its description and, per option, words of the option's help
    "sft.py": ("fastft's main job: QLoRA fine-tune of the bundled SmolLM2-135M-Instruct", {
        **TRAINING, "--batch-size": "sequences per step", "--output-dir": "checkpoints and the final adapter",
        "--gguf": "also write the fine-tuned model, LoRA merged, as one GGUF file",
        "--gguf-quantization": "tensor type of the GGUF file"}),
    "dpo.py": ("Preference tuning (DPO) of the bundled SmolLM2-135M-Instruct with fastft", {
        **TRAINING, "--batch-size": "preference pairs per step", "--beta": "DPO beta",
        "--output-dir": "where the adapter is saved"}),
    "trl_sft_dropin.py": (DROPIN[0].format("SFT"), DROPIN[1]),
    "trl_dpo_dropin.py": (DROPIN[0].format("DPO"), DROPIN[1]),
    "task_data.py": ("A small, deterministic fine-tuning task for the bundled SmolLM2-135M-Instruct", {
        "--data-dir": "where to write train.jsonl and eval.jsonl", "--n-train": "training records",
        "--n-eval": "held-out records", "--seed": "random seed", "--check": "write nothing; exit 1 if the files in"}),
    "moe_sft.py": ("Mixture-of-experts QLoRA with fastft: 4-bit experts, LoRA on attention and on every expert", {
        "--model": "a Qwen3-MoE / Qwen2-MoE / Mixtral directory or hub id", "--arch": "tiny random-weight model",
        "--max-steps": "optimizer steps", "--output-dir": "where the adapter is saved"}),
}


@pytest.mark.parametrize("script", EXAMPLES)
def test_help_documents_every_option(script, tmp_path):
    description, options = HELP[script]
    assert_help_documents(script_help(os.path.join(ROOT, "examples", script), cwd=tmp_path), description, options)


@pytest.mark.slow
@pytest.mark.parametrize("script, args", [
    ("sft.py", ["--steps", "2", "--batch-size", "2", "--eval-records", "4", "--gguf", "sft.gguf"]),
    ("dpo.py", ["--steps", "2", "--batch-size", "2", "--eval-records", "4"]),
    ("trl_sft_dropin.py", ["--max-steps", "2"]),
    ("trl_dpo_dropin.py", ["--max-steps", "2"]),
    ("moe_sft.py", ["--max-steps", "2", "--arch", "qwen2_moe"]),
])
def test_example_runs(script, args, tmp_path):
    """... and makes no network call (the README promises that of the main job): TRL's telemetry is off."""
    log = tmp_path / "network.log"
    out = run(script, *args, "--output-dir", str(tmp_path / "out"), cwd=tmp_path, network_log=log)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert not log.exists(), f"network calls: {log.read_text()}"
    if script in ("sft.py", "dpo.py"):
        assert "held-out exact match before" in out.stdout and "held-out exact match after" in out.stdout
    assert os.path.exists(tmp_path / "out" / "adapter_config.json")
    if script == "sft.py":  # the export itself is tested in test_gguf.py
        with open(tmp_path / "sft.gguf", "rb") as f:
            assert f.read(4) == b"GGUF"


BIN = os.path.dirname(sys.executable)  # the launchers installed beside this Python


@pytest.mark.slow
@pytest.mark.parametrize("launcher, script, args", [
    ([os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", "2"], "sft.py",
     ["--steps", "2", "--batch-size", "1", "--eval-records", "2"]),
    ([os.path.join(BIN, "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0"],
     "trl_sft_dropin.py", ["--max-steps", "1"]),
], ids=["torchrun", "accelerate"])
def test_example_runs_on_two_ranks(launcher, script, args, tmp_path):
    """The README's DDP commands (gloo on CPU): both ranks train, rank 0 prints and saves the adapter."""
    out = run(script, *args, "--output-dir", str(tmp_path / "out"), cwd=tmp_path, launcher=launcher)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stderr.count("fastft: no CUDA GPU found") == 2  # one per rank
    if script == "sft.py":
        assert out.stdout.count("held-out exact match after") == 1
    assert os.path.exists(tmp_path / "out" / "adapter_model.safetensors")
