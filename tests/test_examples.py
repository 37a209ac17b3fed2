"""Each example runs with small settings, as a user would start it (a subprocess, CPU, fastft's PyTorch
engine: no TRITON_INTERPRET), and has a --help; and unchanged on 2 ranks under torchrun and accelerate launch."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = ["sft.py", "dpo.py", "trl_sft_dropin.py", "trl_dpo_dropin.py", "task_data.py"]


def run(script, *args, cwd, launcher=(sys.executable,)):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="1")
    return subprocess.run([*launcher, os.path.join(ROOT, "examples", script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("script", EXAMPLES)
def test_help(script, tmp_path):
    out = run(script, "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script, args", [
    ("sft.py", ["--steps", "2", "--batch-size", "2", "--eval-records", "4"]),
    ("dpo.py", ["--steps", "2", "--batch-size", "2", "--eval-records", "4"]),
    ("trl_sft_dropin.py", ["--max-steps", "2"]),
    ("trl_dpo_dropin.py", ["--max-steps", "2"]),
])
def test_example_runs(script, args, tmp_path):
    out = run(script, *args, "--output-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    if script in ("sft.py", "dpo.py"):
        assert "held-out exact match before" in out.stdout and "held-out exact match after" in out.stdout
    assert os.path.exists(tmp_path / "out" / "adapter_config.json")


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
