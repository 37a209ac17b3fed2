from setuptools import setup

setup(
    name="fastft",
    version="0.1.0",
    description=("Fast, lean QLoRA fine-tuning of Llama, Qwen2, Mistral, Qwen3 and Phi-3/Phi-4 with hand-written "
                 "Triton kernels"),
    python_requires=">=3.10",
    # The kernel library lives in ./kernels but installs as fastft.kernels: a top-level `kernels`
    # package would collide with Hugging Face's `kernels`, which transformers probes for.
    packages=["fastft", "fastft.kernels", "fastft.memory", "fastft.doctor"],
    package_dir={"fastft": "fastft", "fastft.kernels": "kernels"},
    install_requires=[
        # Any torch >= 2.4 is accepted, so a user's CUDA build stays; install.sh pins the CPU build.
        "torch>=2.4",
        "triton>=3.6",
        "transformers>=5.17,<6",
        "peft>=0.17",
        "bitsandbytes>=0.48",
        "trl>=1.16,<2",
        "accelerate",
        "datasets",
        "gguf",
        "tqdm",
    ],
    entry_points={"console_scripts": ["fastft-memory=fastft.memory.cli:main", "fastft-doctor=fastft.doctor.cli:main"]},
    extras_require={
        "test": ["pytest>=8", "matplotlib"],  # the bench scripts' plots are checked too
        "bench": ["matplotlib"],
        # attention on GPUs below sm_80 (V100, T4) and for head sizes fastft's kernel does not serve; xformers
        # builds require a matching torch: pip may pick an older xformers, or change torch (install.sh does not)
        "xformers": ["xformers"],
        "dev": ["pytest>=8", "matplotlib"],
    },
)
