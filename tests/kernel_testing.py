"""Helpers shared by the tests: the dtypes and engines the kernels are tested in, their rounding units,
comparisons against a float64 reference, and running a script the way a user does. (Output poisoning is on
for every test: see conftest.py.)"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import torch

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = (F32, F16, BF16)
# machine epsilon = 1 ulp relative at 1.0 (fp32 23 mantissa bits, fp16 10, bf16 7)
EPS = {F32: 2.0**-23, F16: 2.0**-10, BF16: 2.0**-7}
# fastft.kernels.use_engine: the Triton kernels (run by Triton's CPU interpreter here) and the plain PyTorch path
ENGINES = ("triton", "torch")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, name: str = "tensor"):
    """Like torch.testing.assert_close, but compares in float64, treats any NaN/inf in ``actual``
    as a failure (an unwritten, poisoned element shows up that way), and reports the worst
    elements by index."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad_values = ~torch.isfinite(a) & torch.isfinite(e)
    if bad_values.any():
        idx = bad_values.nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int(bad_values.sum())} non-finite elements where finite expected, "
                             f"first at {idx}")
    err = (a - e).abs()
    allowed = atol + rtol * e.abs()
    over = err > allowed
    if over.any():
        idx = over.nonzero()[:5].tolist()
        worst = int(torch.argmax(err - allowed))
        flat_a, flat_e = a.flatten(), e.flatten()
        raise AssertionError(
            f"{name}: {int(over.sum())}/{a.numel()} elements outside atol={atol} rtol={rtol}; "
            f"max abs err {err.max().item():.3e}; first bad at {idx}; worst flat index {worst}: "
            f"got {flat_a[worst].item():.6e}, expected {flat_e[worst].item():.6e}"
        )



def check_grad(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, tol: tuple[float, float], name: str):
    """A gradient in ``dtype`` against its float64 reference: ``tol = (rtol, atol relative to the largest
    expected magnitude)``."""
    rtol, atol_rel = tol
    assert actual.dtype == dtype, f"{name} dtype {actual.dtype}"
    assert_close(actual, expected, atol=atol_rel * expected.abs().max().item(), rtol=rtol, name=name)


def leaf(t: torch.Tensor | None, requires_grad: bool = True) -> torch.Tensor | None:
    """A fresh leaf copy of ``t`` (None stays None), so each engine's run gets its own ``.grad``."""
    return None if t is None else t.clone().requires_grad_(requires_grad)


def greedy_generate(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int = 6) -> torch.Tensor:
    """Batched greedy generation (pad token 0, no gradients): prompts and the ``new_tokens`` after them."""
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0)


def env_without_interpreter(**extra: str) -> dict:
    """The environment for a script started as a user starts it: no TRITON_INTERPRET (fastft runs its PyTorch
    engine on CPU), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


def script_help(script: str, cwd: str | os.PathLike) -> str:
    """``python <script> --help``'s output (it must exit 0)."""
    out = subprocess.run([sys.executable, str(script), "--help"], cwd=cwd, env=env_without_interpreter(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def assert_help_documents(text: str, description: str, options: dict[str, str]) -> None:
    """An argparse ``--help`` text starts with usage, states ``description`` and documents every option with
    its help: ``options`` maps each option to words of its help text (line wrapping is ignored)."""
    assert text.startswith("usage:"), text[:200]
    flat = " ".join(text.split())
    assert " ".join(description.split()) in flat, f"description {description!r} not in --help:\n{text}"
    for option, words in options.items():
        # the option's own entry: "--name", its metavar, then its help (up to the next option's entry)
        entry = re.search(rf"(?:^|, | ){re.escape(option)}(?![\w-])(.*?)(?= -[-\w]|$)", flat[flat.find("options:"):])
        assert entry, f"{option} not documented in --help:\n{text}"
        assert " ".join(words.split()) in entry.group(1), f"{option}: {words!r} not in its help {entry.group(1)!r}"
