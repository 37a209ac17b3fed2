import os
import runpy

from setuptools import setup

# The supported versions live in fastft/versions.py (fastft checks them at run time too); read without importing
# fastft, whose dependencies are not installed yet.
versions = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastft", "versions.py"))
# llama.cpp's runtime for the tests (tests/test_llama_cpp_runtime.py runs the GGUF exports in it): CFFI bindings and a
# prebuilt CPU libllama of llama.cpp 0ce8cd114, with wheels for x86-64 Linux only
LLAMA_CPP_RUNTIME = "llama_cpp_py_sync==0.11739; sys_platform == 'linux' and platform_machine == 'x86_64'"

setup(
    name="fastft",
    version="0.1.0",
    description=("Fast, lean QLoRA fine-tuning of Llama, Qwen2, Mistral, Qwen3 and Phi-3/Phi-4 with hand-written "
                 "Triton kernels"),
    python_requires=versions["PYTHON"],
    # The kernel library lives in ./kernels but installs as fastft.kernels: a top-level `kernels`
    # package would collide with Hugging Face's `kernels`, which transformers probes for.
    packages=["fastft", "fastft.kernels", "fastft.memory", "fastft.doctor"],
    package_dir={"fastft": "fastft", "fastft.kernels": "kernels"},
    # A range, not pins, so a user's CUDA torch stays (install.sh pins the CPU build on machines without a GPU).
    install_requires=versions["install_requires"](),
    entry_points={"console_scripts": ["fastft-memory=fastft.memory.cli:main", "fastft-doctor=fastft.doctor.cli:main"]},
    extras_require={
        # (matplotlib: the bench scripts' plots are checked too)
        "test": ["pytest>=8", "pytest-xdist>=3", "matplotlib", LLAMA_CPP_RUNTIME],
        "bench": ["matplotlib"],
        # attention on GPUs below sm_80 (V100, T4) and for head sizes fastft's kernel does not serve; xformers
        # builds require a matching torch: pip may pick an older xformers, or change torch (install.sh does not)
        "xformers": ["xformers"],
        "dev": ["pytest>=8", "pytest-xdist>=3", "matplotlib", LLAMA_CPP_RUNTIME],
    },
)
