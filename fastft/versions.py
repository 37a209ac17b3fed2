"""The dependency versions fastft supports: one table, read by setup.py (``install_requires``), by fastft when it
loads a model (:func:`check_installed`: an unsupported version is an ImportError naming the range, never a silent
misbehaviour) and by CI (``requirements-oldest.txt`` pins every lower bound; tests/test_package.py checks that).

A lower bound is the oldest release CI tests (the "oldest" environment of ``.ci/run``); an upper bound is the next
major release known to break what fastft hooks into. This file imports only the standard library at the top:
setup.py executes it before anything is installed.
"""

PYTHON = ">=3.11"  # trl's own floor (1.15 and later), and transformers 5.23's

REQUIREMENTS = {
    # torch 2.10 is the oldest release whose wheels pin a Triton fastft's kernels run on (2.10 and 2.11 pin triton
    # 3.6.0; 2.9.1 pins 3.5.1, so an older torch cannot be installed beside triton>=3.6). One feature needs more: the
    # FSDP memory accounting, torch 2.13 (fastft/memory/fsdp.py)
    "torch": ">=2.10",
    "triton": ">=3.6",  # the kernels use no Triton API newer than 3.6
    # 5.17: the oldest tested; 6 drops the gradient_checkpointing_enable entry point fastft's checkpointing overrides
    "transformers": ">=5.17,<6",
    # peft 0.17 does not import under transformers 5 (HybridCache); transformers 5.18-5.23 refuse peft below 0.20
    # in their own PEFT integration (MIN_PEFT_VERSION)
    "peft": ">=0.20",
    # 0.50 added the gemm_4bit op whose CUDA allocations fastft's memory accounting models; 0.48's CPU quantization
    # crashes (a segmentation fault in quantize_blockwise)
    "bitsandbytes": ">=0.50",
    # 1.15 added the fused lm-head path (add_fused_lm_head, _ChunkedLogProbFunction) fastft serves; those names are
    # private: a new major may move them
    "trl": ">=1.16,<2",
    "accelerate": ">=1.10.1",  # trl 1.16's floor
    "datasets": ">=4.7",  # trl's floor
    "gguf": ">=0.16.2",  # the first with llama.cpp's Qwen3 architecture
    "tqdm": "",
}

# what fastft patches or reaches into, checked by check_installed (the rest are used through public APIs)
CHECKED = ("torch", "triton", "transformers", "peft", "bitsandbytes", "trl")


def install_requires() -> list[str]:
    return [name + spec for name, spec in REQUIREMENTS.items()]


def lower_bound(name: str) -> str:
    """The oldest supported version of ``name`` (``"5.17"`` for ``">=5.17,<6"``)."""
    return next(part[2:] for part in REQUIREMENTS[name].split(",") if part.startswith(">="))


def unsupported(name: str, version: str) -> str | None:
    """Why ``version`` of ``name`` is outside the supported range, or None. Local and pre-release builds count as
    their release (a ``2.10.0a0+git`` torch build is 2.10)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    release = Version(Version(version).base_version)
    if release in SpecifierSet(REQUIREMENTS[name]):
        return None
    return f"fastft supports {name}{REQUIREMENTS[name]}; found {name} {version}. Install a supported {name}."


def check_installed() -> None:
    """An ImportError naming the supported range for each package of :data:`CHECKED` that is installed in an
    unsupported version (a missing one fails where it is imported)."""
    import importlib.metadata
    import sys

    problems = []
    for name in CHECKED:
        module = sys.modules.get(name)
        try:  # the imported module's own version first: the one that runs
            version = getattr(module, "__version__", None) or importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        problem = unsupported(name, str(version))
        if problem:
            problems.append(problem)
    if problems:
        raise ImportError("\n".join(problems))
