"""Each example runs with small settings, as a user would start it (a subprocess, CPU, fastft's PyTorch
engine: no TRITON_INTERPRET), and has a --help; and unchanged on 2 ranks under torchrun and accelerate launch."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = ["sft.py", "dpo.py", "trl_sft_dropin.py", "trl_dpo_dropin.py", "task_data.py"]


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
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if network_log is not None:
        guard = os.path.join(cwd, "network_guard")
        os.makedirs(guard, exist_ok=True)
        with open(os.path.join(guard, "sitecustomize.py"), "w") as f:
            f.write(NETWORK_GUARD)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [guard, env.get("PYTHONPATH")]))
        env["FASTFT_NETWORK_LOG"] = str(network_log)
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
    """... and makes no network call (the README promises that of the main job): TRL's telemetry is off."""
    log = tmp_path / "network.log"
    out = run(script, *args, "--output-dir", str(tmp_path / "out"), cwd=tmp_path, network_log=log)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert not log.exists(), f"network calls: {log.read_text()}"
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
