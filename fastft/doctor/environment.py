"""Section 1, environment: Python and the libraries fastft runs with (each against the version fastft is tested
with and the range it accepts), whether bitsandbytes' and xformers' native libraries work on this device, the
device itself, and what fastft would choose here: the attention route per head size and the dtype of
``dtype=None``."""
from __future__ import annotations

import copy
import importlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys

import torch

from .. import reach_ins

# The versions CI tests with (requirements-cpu.txt pins them; tests/test_doctor.py keeps the two equal).
TESTED_VERSIONS = {"torch": "2.13.0", "triton": "3.9.0", "transformers": "5.23.0", "peft": "0.21.2",
                   "trl": "1.16.0", "bitsandbytes": "0.50.2", "accelerate": "1.15.0", "xformers": "0.0.35"}
TESTED_PYTHON = "3.11"
HEAD_SIZES = (64, 80, 96, 128, 256)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _accepted_ranges() -> dict[str, str]:
    """The version ranges fastft's installed metadata accepts (setup.py's install_requires and extras)."""
    from packaging.requirements import Requirement

    ranges = {}
    for line in importlib.metadata.requires("fastft") or []:
        req = Requirement(line)
        ranges.setdefault(req.name.lower(), str(req.specifier) or "any")
    return ranges


def library_versions() -> list[dict]:
    """One row per library: installed version, the tested one, the accepted range, and a verdict."""
    from packaging.specifiers import SpecifierSet

    ranges = _accepted_ranges()
    rows = []
    for name, tested in TESTED_VERSIONS.items():
        installed = _version(name)
        accepted = ranges.get(name, "any")
        if installed is None:
            verdict = "not installed" + (" (optional)" if name == "xformers" else "")
        elif accepted != "any" and not SpecifierSet(accepted).contains(installed.split("+")[0], prereleases=True):
            verdict = f"OUTSIDE the accepted range {accepted}"
        elif installed.split("+")[0] != tested:
            verdict = f"accepted, but not the tested {tested}"
        else:
            verdict = "tested"
        rows.append({"library": name, "installed": installed, "tested": tested, "accepted": accepted,
                     "verdict": verdict})
    return rows


# ---------------------------------------------------------------------------------------------
# The device


def _driver_version() -> str:
    """The GPU driver's version as nvidia-smi (or rocm-smi) reports it; torch does not expose it."""
    for command in (["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    ["rocm-smi", "--showdriverversion"]):
        if shutil.which(command[0]) is None:
            continue
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"unknown ({command[0]} failed: {exc})"
        lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        if out.returncode == 0 and lines:
            return lines[0] if command[0] == "nvidia-smi" else lines[-1]
    return "unknown (no nvidia-smi or rocm-smi found)"


def device_facts(device: torch.device) -> dict:
    """Name, compute capability, memory, SMs, bf16, driver, CUDA / ROCm version of ``device`` (or the CPU's)."""
    if device.type != "cuda":
        return {"type": device.type, "name": platform.processor() or platform.machine(),
                "cpu_count": torch.get_num_threads(), "torch_build": "CPU" if torch.version.cuda is None else
                f"CUDA {torch.version.cuda} build, no GPU visible"}
    props = torch.cuda.get_device_properties(device)
    return {"type": "cuda", "index": device.index, "name": props.name,
            "compute_capability": f"{props.major}.{props.minor}", "total_memory_gib": props.total_memory / 2**30,
            "sm_count": props.multi_processor_count,
            "bf16": torch.cuda.is_bf16_supported(including_emulation=False),
            "memory_clock_khz": getattr(props, "memory_clock_rate", None),
            "memory_bus_width_bits": getattr(props, "memory_bus_width", None),
            "driver": _driver_version(), "cuda_runtime": torch.version.cuda, "rocm": torch.version.hip,
            "gpu_count": torch.cuda.device_count()}


def supported_dtypes(device: torch.device) -> tuple[list[torch.dtype], list[str]]:
    """The dtypes the kernels are checked in on ``device``, and notes on those left out."""
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return dtypes[:2], ["bfloat16: this GPU has no native bf16 (fastft uses fp16 here)"]
    return dtypes, []


# ---------------------------------------------------------------------------------------------
# Native libraries


def bitsandbytes_status(device: torch.device) -> dict:
    """Whether bitsandbytes imports, which native library it loaded, and whether its NF4 quantize / dequantize
    runs on ``device`` and gives the NF4 definition back (``references.nf4_reference``)."""
    from .references import nf4_reference

    status = {"version": _version("bitsandbytes")}
    try:
        import bitsandbytes.functional as bnb_functional
        from bitsandbytes import cextension
    except Exception as exc:  # noqa: BLE001 - reported
        status.update(ok=False, problem=f"import failed: {type(exc).__name__}: {exc}")
        return status
    lib = getattr(cextension, "lib", None)
    native = reach_ins.read(reach_ins.BNB_NATIVE_LIBRARY, lib) if lib is not None else None
    name = reach_ins.read(reach_ins.CTYPES_LIBRARY_NAME, native) if native is not None else None
    status["native_library"] = name or type(lib).__name__
    status["native_library_error"] = getattr(lib, "error_msg", None)
    try:
        weight = torch.randn(128, 128, device=device, generator=torch.Generator(device).manual_seed(0)) * 0.05
        packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        got = bnb_functional.dequantize_4bit(packed, state)
        nested = state.state2
        expected = nf4_reference(_Fields(packed=packed.view(torch.uint8), absmax=state.absmax, code=state.code,
                                         blocksize=state.blocksize, shape=tuple(state.shape),
                                         nested_absmax=nested.absmax, nested_code=nested.code,
                                         nested_blocksize=nested.blocksize, offset=state.offset))
        error = ((got.double() - expected).abs().max() / expected.abs().max()).item()
        # one fp32 rounding of the dequantized value, up to three of its double-quantized scale
        status.update(ok=error <= 2.0**-21, nf4_roundtrip_error=error)
        if error > 2.0**-21:
            status["problem"] = f"dequantize_4bit differs from the NF4 definition by {error:.3g} (relative)"
    except Exception as exc:  # noqa: BLE001 - reported
        status.update(ok=False, problem=f"quantize/dequantize on {device} failed: {type(exc).__name__}: {exc}")
    return status


class _Fields:
    def __init__(self, **fields):
        self.__dict__.update(fields)


def _fmha_ops():
    from xformers.ops import fmha

    for module in ("cutlass", "flash", "flash3", "ck", "cutlass_blackwell"):
        found = getattr(fmha, module, None)
        for kind in ("FwOp", "BwOp"):
            op = getattr(found, kind, None) if found is not None else None
            if op is not None:
                yield f"{module}.{kind}", op


def xformers_status(device: torch.device, dtype: torch.dtype, head_dim: int) -> dict:
    """Whether xformers imports, whether its compiled library loaded beside this torch, and which of its attention
    operators accept a training-shaped input (packed causal, ``head_dim``, ``dtype``) on ``device``."""
    status = {"version": _version("xformers")}
    if status["version"] is None:
        status["problem"] = "not installed (optional: pip install 'fastft[xformers]')"
        return status
    try:
        from xformers.ops import fmha
    except Exception as exc:  # noqa: BLE001 - reported
        status["problem"] = f"import failed: {type(exc).__name__}: {exc}"
        return status
    cpp_lib = reach_ins.get(reach_ins.XFORMERS_CPP_LIB)
    load_error = reach_ins.read(reach_ins.XFORMERS_LOAD_EXCEPTION, cpp_lib) if cpp_lib is not None else None
    build = reach_ins.read(reach_ins.XFORMERS_BUILD_METADATA, cpp_lib) if cpp_lib is not None else None
    status["compiled_library"] = "loaded" if load_error is None else f"did not load: {load_error}"
    if build is not None:
        status["built_for"] = {"torch": build.torch_version, "cuda": build.cuda_version, "hip": build.hip_version}
    probe = torch.zeros(1, 2, 1, head_dim, device=device, dtype=dtype)
    bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens([2], device=device)
    inputs = fmha.Inputs(query=probe, key=probe, value=probe, attn_bias=bias, scale=1.0)
    status["ops"] = {}
    for name, op in _fmha_ops():
        try:
            reasons = op.not_supported_reasons(inputs)
        except Exception as exc:  # noqa: BLE001 - reported
            reasons = [f"{type(exc).__name__}: {exc}"]
        status["ops"][name] = "accepts" if not reasons else "; ".join(dict.fromkeys(reasons))
    return status


# ---------------------------------------------------------------------------------------------
# fastft's choices on this device


def fastft_choices(config, device: torch.device) -> dict:
    """The dtype ``dtype=None`` resolves to, and the attention route (with its reason) for the model's head size and
    for the common ones."""
    from ..attention import _head_dim, choose_attention
    from ..model import resolve_dtype

    dtype = resolve_dtype(None, device)
    routes = {}
    for head_dim in dict.fromkeys((_head_dim(config), *HEAD_SIZES)):
        probe = copy.deepcopy(config)
        probe.head_dim = head_dim
        name, why = choose_attention(probe, device, dtype)
        routes[head_dim] = {"attention": name, "why": why or "fastft's kernel serves this head size here"}
    return {"dtype_none": str(dtype).replace("torch.", ""), "model_head_dim": _head_dim(config),
            "attention_routes": routes}


def disable_switch() -> dict | None:
    """``FASTFT_DISABLE_KERNELS`` as training here would read it (None when unset or empty): the ops it routes around
    and where a model then runs each, or the problem with its value. The doctor itself runs with it unset (it checks
    the kernels themselves)."""
    from ..kernels._common import DISABLE_ENV, kernel_names
    from ..patch import model_routes

    value = os.environ.get(DISABLE_ENV, "")
    if not value.strip():
        return None
    try:
        names = kernel_names(value, f"{DISABLE_ENV}={value!r}")
    except (TypeError, ValueError) as exc:
        return {"value": value, "routes_around": [], "routes": {}, "problem": str(exc)}
    routes = model_routes(names)
    return {"value": value, "routes_around": list(routes), "routes": routes, "problem": None}


def collect(config, device: torch.device, model_name: str, switch: dict | None = None) -> dict:
    """Everything section 1 reports; ``switch``: :func:`disable_switch`'s report."""
    from .. import __version__ as fastft_version
    from ..attention import _head_dim
    from ..model import resolve_dtype

    dtype = resolve_dtype(None, device)
    python = platform.python_version()
    return {
        "fastft": fastft_version, "python": python, "python_verdict": (
            "tested" if python.startswith(TESTED_PYTHON + ".") else f"accepted, but not the tested {TESTED_PYTHON}"),
        "platform": platform.platform(), "executable": sys.executable,
        "torch_cuda": torch.version.cuda, "torch_rocm": torch.version.hip,
        "libraries": library_versions(), "device": device_facts(device),
        "bitsandbytes": bitsandbytes_status(device),
        "xformers": xformers_status(device, dtype, _head_dim(config)),
        "choices": fastft_choices(config, device), "model": model_name,
        # fp32 matmuls run in TF32 when these say so: the fp32 rows of section 2 then show TF32's error (~1e-3)
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "NVIDIA_TF32_OVERRIDE": os.environ.get("NVIDIA_TF32_OVERRIDE"),
        "triton_interpret": importlib.import_module("fastft.kernels._common").INTERPRET,
        "FASTFT_DISABLE_KERNELS": switch,  # disable_switch(), read before the doctor unset it
    }
