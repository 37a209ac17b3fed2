import os
import subprocess
import sys

import pytest


def test_kernel_library_imports_only_torch_and_triton():
    code = (
        "import sys, fastft.kernels; "
        "bad = [m for m in ('transformers', 'peft', 'bitsandbytes', 'trl') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "", f"fastft.kernels imported {out.stdout.strip()}"


def test_kernels_is_not_a_top_level_package():
    code = "import importlib.util, fastft.kernels; print(importlib.util.find_spec('kernels'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "None"


KERNELS_HINT = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _stderr_of(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/",
                          env={**os.environ, **env}).stderr


def test_bitsandbytes_kernels_hint_is_hidden_but_real_failures_are_not(tmp_path):
    # bitsandbytes alone prints the "pip install kernels" line (on CPUs where it tries that optional kernel)
    if KERNELS_HINT not in _stderr_of("import bitsandbytes"):
        pytest.skip("this CPU's bitsandbytes backend does not try the optional kernels package")
    assert KERNELS_HINT not in _stderr_of("import fastft, peft")
    # an installed but broken `kernels` package is a real failure: still reported
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text(
        "def get_kernel(*args, **kwargs):\n    raise RuntimeError('broken kernels install')\n")
    err = _stderr_of("import fastft, bitsandbytes", PYTHONPATH=str(tmp_path))
    assert KERNELS_HINT in err and "broken kernels install" in err
