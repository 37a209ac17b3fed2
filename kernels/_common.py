"""Shared plumbing of the kernel library: which engine runs an op, and argument checks.

Every public op in ``fastft.kernels`` has three engines:

* a CUDA tensor runs the compiled Triton kernel;
* a CPU tensor with ``TRITON_INTERPRET=1`` (set before triton is imported) runs the same
  Triton kernel in Triton's interpreter -- this is how the kernels are tested without a GPU;
* a CPU tensor otherwise runs a plain PyTorch implementation, so fastft works everywhere.

Any op can be switched to its PyTorch engine on every device by name (:data:`KERNEL_NAMES`): the environment
variable ``FASTFT_DISABLE_KERNELS`` (read at every call, so it may be set after import) or a
:func:`disabled` block. That PyTorch engine runs on CUDA tensors as on CPU ones: it is the way around a kernel
that fails on a user's GPU.

This module imports only torch and triton.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""True when Triton kernels run in the CPU interpreter. Kernels use it as a ``tl.constexpr``
flag to upcast ``tl.dot`` operands to fp32: the interpreter's bf16 ``tl.dot`` is wrong."""

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The names fastft's kernels go by wherever a user picks them out: ``FASTFT_DISABLE_KERNELS``,
# ``FastModel.from_pretrained(disable_kernels=...)`` and ``fastft-doctor``'s report (one name per kernel file;
# ``attention`` covers ``attention`` and ``attention_varlen``). Groups a user may name too: "lora", "all".
KERNEL_NAMES = ("rms_norm", "rope", "swiglu", "cross_entropy", "fused_linear_cross_entropy", "linear_log_probs",
                "nf4", "lora_linear", "lora_qkv", "lora_mlp", "moe_experts", "attention")
KERNEL_GROUPS = {"lora": ("lora_linear", "lora_qkv", "lora_mlp", "moe_experts"), "all": KERNEL_NAMES}
DISABLE_ENV = "FASTFT_DISABLE_KERNELS"

_forced_engine: str | None = None
# .names: the names disabled by this thread's enclosing `disabled` blocks. Per thread: autograd runs a CUDA backward
# in a thread of its own, where the fused LoRA ops re-enter the names their forward ran under.
_scope = threading.local()



@dataclasses.dataclass(frozen=True)
class _SimulatedGPU:
    """What :func:`gpu_simulation` makes the kernels see: device types besides "cuda" whose tensors take the GPU
    code path, and the SM count and compute capability such a device reports (CUDA devices report their own)."""
    device_types: frozenset[str] = frozenset()
    sm_count: int = 132
    compute_capability: int = 90


_simulation = _SimulatedGPU()


@contextlib.contextmanager
def gpu_simulation(device_type: str | None = None, *, sm_count: int | None = None,
                   compute_capability: int | None = None):
    """Inside the block, tensors on ``device_type`` take the kernels' GPU code path, and a device that is not CUDA
    reports ``sm_count`` streaming multiprocessors and ``compute_capability`` (major * 10 + minor); what is not
    given stays as the enclosing block set it. Process-wide (as :func:`use_engine`: an autograd backward may run in
    another thread), restored on exit, nestable. For the memory accounting (meta tensors on the GPU path, Triton
    launches stubbed), the compile check (tiles per architecture) and tests that run the GPU branches on CPU."""
    global _simulation
    previous = _simulation
    _simulation = _SimulatedGPU(
        previous.device_types | ({device_type} if device_type is not None else frozenset()),
        previous.sm_count if sm_count is None else sm_count,
        previous.compute_capability if compute_capability is None else compute_capability)
    try:
        yield
    finally:
        _simulation = previous


@contextlib.contextmanager
def use_engine(engine: str):
    """Force every op to one engine (``"triton"`` or ``"torch"``) inside the block; for tests and
    benchmarks that compare the two paths on the same machine (it overrides the disabled names too)."""
    global _forced_engine
    if engine not in ("triton", "torch"):
        raise ValueError(f"engine must be 'triton' or 'torch', got {engine!r}")
    previous, _forced_engine = _forced_engine, engine
    try:
        yield
    finally:
        _forced_engine = previous


def kernel_names(names, source: str) -> frozenset[str]:
    """The kernel names ``names`` selects: a comma-separated string (whitespace and case ignored; empty: none) or
    an iterable of names, each one of :data:`KERNEL_NAMES` or a group of :data:`KERNEL_GROUPS`. Anything else is a
    ValueError naming ``source`` (where the names came from) and the valid names."""
    if isinstance(names, str):
        items = [name.strip().lower() for name in names.split(",")]
        items = [name for name in items if name]
    elif names is None:
        items = []
    else:
        try:
            items = list(names)
        except TypeError:
            raise TypeError(f"{source}: expected kernel names (a list of str or a comma-separated str), "
                            f"got {type(names).__name__}") from None
        for name in items:
            if not isinstance(name, str):
                raise TypeError(f"{source}: kernel names are strings, got {name!r}")
        items = [name.strip().lower() for name in items]
    selected = set()
    for name in items:
        if name in KERNEL_GROUPS:
            selected.update(KERNEL_GROUPS[name])
        elif name in KERNEL_NAMES:
            selected.add(name)
        else:
            raise ValueError(f"{source}: unknown kernel name {name!r}; valid names: {', '.join(KERNEL_NAMES)}, "
                             f"or the groups {', '.join(KERNEL_GROUPS)}")
    return frozenset(selected)


@functools.lru_cache(maxsize=8)
def _parse_env(value: str) -> frozenset[str]:
    return kernel_names(value, f"{DISABLE_ENV}={value!r}")


def env_disabled_kernels() -> frozenset[str]:
    """The names ``FASTFT_DISABLE_KERNELS`` disables now (parsed once per distinct value)."""
    return _parse_env(os.environ.get(DISABLE_ENV, ""))


def _scoped() -> frozenset[str]:
    return getattr(_scope, "names", frozenset())


def disabled_kernels() -> frozenset[str]:
    """The names disabled now: ``FASTFT_DISABLE_KERNELS`` and every enclosing :func:`disabled` block."""
    return env_disabled_kernels() | _scoped()


@contextlib.contextmanager
def disabled(*names: str):
    """Run the named ops (or groups: "lora", "all") on their PyTorch engine inside the block (in this thread), on
    every device, on top of ``FASTFT_DISABLE_KERNELS``; :func:`use_engine` overrides it. An op picks its engine
    when its forward runs: a backward outside the block runs the engines of its forward::

        with fastft.kernels.disabled("attention", "rms_norm"):
            loss = model(**batch).loss
    """
    with _disabled_scope(kernel_names(names, "fastft.kernels.disabled")):
        yield


@contextlib.contextmanager
def _disabled_scope(names: frozenset[str]):
    previous = _scoped()
    _scope.names = previous | names
    try:
        yield
    finally:
        _scope.names = previous


def disabled_scope(names: frozenset[str]):
    """:func:`disabled` for already checked names (a no-op context for none): how an autograd Function's backward
    re-enters the names its forward ran under, so both run the same engines."""
    return _disabled_scope(names) if names else contextlib.nullcontext()


def composite_op(tensor: torch.Tensor, op: str):
    """The context a composite op (the fused LoRA ops) runs in: when ``op`` itself is disabled, every kernel it
    calls inside (NF4 dequantization, SwiGLU, the dropout kernels) takes its PyTorch engine."""
    return contextlib.nullcontext() if use_triton(tensor, op) else _disabled_scope(frozenset(KERNEL_NAMES))


def torch_at_least(version: str, major: int, minor: int) -> bool:
    """Whether a torch version string (``"2.10.0a0+git1234"``, ``"2.5.1+cu124"``) is ``major.minor`` or later."""
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2]) >= (major, minor)


def on_gpu(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` lives on a GPU (or on a device :func:`gpu_simulation` makes one)."""
    return gpu_device(tensor.device)


def device_assert():
    """``torch._assert_async(condition, message)``: a device-side assert, no host sync; None where torch lacks it (a
    private function: fastft's registry of reach-ins lists it, ``ASSERT_ASYNC``), and the callers check on the host
    (one sync). Looked up at each call."""
    return getattr(torch, "_assert_async", None)


def gpu_device(device: torch.device) -> bool:
    """Whether ``device`` is a GPU (or a device :func:`gpu_simulation` makes one)."""
    return device.type == "cuda" or device.type in _simulation.device_types


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a GPU device (launch grids that fill the GPU are sized by it)."""
    return _cuda_sm_count(_cuda_index(device)) if device.type == "cuda" else _simulation.sm_count


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def compute_capability(device: torch.device) -> int:
    """Compute capability of a GPU device as ``major * 10 + minor`` (70: V100, 90: H100), e.g. to pick tile
    sizes for ``tl.dot``, which has no tensor-core path below 80 since Triton 3.3."""
    return _cuda_capability(_cuda_index(device)) if device.type == "cuda" else _simulation.compute_capability


@functools.lru_cache(maxsize=None)
def _cuda_capability(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


@triton.jit
def mma_operand(x, INTERPRET: tl.constexpr):
    """A ``tl.dot`` operand tile: bf16 ``tl.dot`` is wrong in Triton's CPU interpreter, so upcast there to
    fp32; on a GPU keep the 16-bit tile so ``tl.dot`` runs on tensor cores."""
    if INTERPRET:
        if x.dtype == tl.bfloat16:
            x = x.to(tl.float32)
    return x


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` casts to on ``device_type`` now, or None when it is off (or has no
    autocast there, e.g. the meta device of the memory accounting)."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


_KERNEL_NAME_SET = frozenset(KERNEL_NAMES)


def use_triton(tensor: torch.Tensor, op: str) -> bool:
    """Whether the op ``op`` (one of :data:`KERNEL_NAMES`) on ``tensor`` runs its Triton kernel (True) or its
    PyTorch engine (False). :func:`use_engine` decides first, then a disabled name (``FASTFT_DISABLE_KERNELS``,
    :func:`disabled`), then the device."""
    if op not in _KERNEL_NAME_SET:
        raise ValueError(f"use_triton: unknown op {op!r}; kernel names: {', '.join(KERNEL_NAMES)}")
    if _forced_engine == "torch":
        return False
    if _forced_engine is None and (op in _scoped() or op in env_disabled_kernels()):
        return False
    if on_gpu(tensor):
        return True
    if tensor.device.type == "cpu" and (INTERPRET or _forced_engine == "triton"):
        if not INTERPRET:
            raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported")
        return True
    return False


def check_tensor(name: str, tensor, *, dtypes=FLOAT_DTYPES, ndim: int | None = None, min_ndim: int | None = None):
    """Raise a TypeError/ValueError naming ``name`` when ``tensor`` is not a tensor of an accepted
    dtype and rank."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if dtypes is not None and tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(tensor.dtype).replace('torch.', '')}; expected one of {allowed}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if min_ndim is not None and tensor.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(tensor.shape)}")


def check_same_device(**tensors):
    """Raise a ValueError when the named tensors are not on one device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"tensors must be on one device: {listed}")


_poison_outputs = False


@contextlib.contextmanager
def poison_outputs():
    """Inside the block, buffers from :func:`empty` are filled with NaN (integers: -1) instead of
    left uninitialised, so a test sees any element a kernel failed to write. Tests turn it on."""
    global _poison_outputs
    previous, _poison_outputs = _poison_outputs, True
    try:
        yield
    finally:
        _poison_outputs = previous


def empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs and scratch buffers; poisoned under :func:`poison_outputs`."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison_outputs:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return empty(t.shape, dtype=dtype or t.dtype, device=t.device)


@triton.jit
def tanh_and_slope(x):
    """``(tanh(x), 1 - tanh(x)**2)`` of an fp32 ``x``, each to a few ulp (for logit soft-capping, ``c * tanh(s / c)``,
    and its derivative). From ``e = exp(-2|x|)``: ``tanh|x| = (1 - e) / (1 + e)`` and ``1 - tanh^2 = 4e / (1 + e)^2``,
    neither of which cancels, except ``1 - e`` near 0: there (``|x| < 1/8``) tanh is its Taylor series to x^9
    (truncation < 1e-11 relative). ``2 sigmoid(2x) - 1`` would lose the relative precision of small values."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    a2 = a * a
    series = a * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333 + a2 * (-0.05396825396825397
                                                                                      + a2 * 0.021869488536155203))))
    t = tl.where(a < 0.125, series, t)
    return tl.where(x < 0.0, -t, t), 4.0 * e / ((1.0 + e) * (1.0 + e))
