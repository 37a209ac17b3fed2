import subprocess
import sys


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
