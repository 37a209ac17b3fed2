"""Account (meta tensors) or measure (CPU) the memory of one training step."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import warnings

import torch

from .. import reach_ins
from .cuda_paths import cuda_code_paths, cuda_op_overrides, cuda_op_workspace, meta_op_overrides
from .fsdp import MESH_DIM, fake_process_group, fsdp_on_meta, meta_overrides, shard_model
from .simulated_gpu import LiveTensorBytes, simulated_gpu
from .training_step import (
    StepSetup,
    build_model,
    fresh_workspaces,
    make_batch,
    make_optimizer,
    resident_tensors,
    train_step,
)

GIB = float(1 << 30)
WARMUP_TOKENS = 16  # the warm-up step only creates the optimizer state and the persistent workspaces


@dataclasses.dataclass
class StepMemory:
    setup: StepSetup
    resident: dict[str, int]  # bytes by category, with the gradients and optimizer state
    peak_bytes: int
    peak_phase: str
    peak_op: str | None
    peak_storages: list = dataclasses.field(default_factory=list)  # (bytes, phase, op, shape, dtype) at the peak

    @property
    def resident_bytes(self) -> int:
        return sum(self.resident.values())

    @property
    def resident_gb(self) -> float:
        return self.resident_bytes / GIB

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / GIB


@contextlib.contextmanager
def _quiet():
    """The accounted model is a stand-in: what building and stepping it warns about (library deprecations, fastft's
    own notes on the simulated device) is not news to the user of the figures."""
    fastft_logger = logging.getLogger("fastft")
    level = fastft_logger.level
    fastft_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        fastft_logger.setLevel(level)


def _run(config, setup: StepSetup, tracker, device: torch.device, mesh=None) -> StepMemory:
    with _quiet():
        return _step(config, setup, tracker, device, mesh)


def _step(config, setup: StepSetup, tracker, device: torch.device, mesh) -> StepMemory:
    model = build_model(config, setup, device)
    if mesh is not None:  # the optimizer over the shards, as accelerate switches it to them
        model = shard_model(model, mesh, setup.dtype)
    optimizer = make_optimizer(model)
    vocab = config.vocab_size
    train_step(model, optimizer, make_batch(setup, vocab, device, seq_len=min(setup.seq_len, WARMUP_TOKENS)))
    gc.collect()
    batch = make_batch(setup, vocab, device)
    resident = {}

    def on_grads():
        groups = resident_tensors(model, optimizer)
        resident.update({name: tracker.storage_bytes(tensors) for name, tensors in groups.items()})

    tracker.reset_peak()
    train_step(model, optimizer, batch, tracker, on_grads)
    return StepMemory(setup, resident, tracker.peak, tracker.peak_phase, tracker.peak_op, tracker.peak_storages)


@contextlib.contextmanager
def _bitsandbytes_caches_kept():
    """bitsandbytes caches its quantization code tables on the device of the first tensor it quantizes;
    tables made for meta tensors must not outlive the accounting."""
    cache = reach_ins.get(reach_ins.BNB_QMAP_CACHE)
    saved = dict(cache)
    try:
        yield
    finally:
        cache.clear()
        cache.update(saved)


def account_step(config, setup: StepSetup, sm_count: int = 132, cuda_workspaces: bool = True,
                 explain_peak: bool = False) -> StepMemory:
    """The step's memory on a GPU, accounted on meta tensors (no GPU, no real weights).

    ``sm_count``: the GPU's multiprocessors (a few launch grids are sized by it). ``cuda_workspaces``: add
    what CUDA kernels allocate internally (``cuda_paths.cuda_op_workspace``); the CPU validation turns it
    off, the CPU kernels' internals being invisible too. ``explain_peak``: list the storages alive at the
    peak in ``peak_storages`` (slower). ``setup.fsdp_world_size`` > 1: rank 0 of an FSDP2 job of that many
    ranks, over a fake process group (``fastft.memory.fsdp``)."""
    workspace = cuda_op_workspace if cuda_workspaces else None
    with contextlib.ExitStack() as stack:
        mesh, overrides = None, {**cuda_op_overrides(), **meta_op_overrides()}
        if setup.fsdp_world_size > 1:
            mesh = stack.enter_context(fake_process_group(setup.fsdp_world_size))
            stack.enter_context(fsdp_on_meta())
            overrides.update(meta_overrides())
        stack.enter_context(_bitsandbytes_caches_kept())
        stack.enter_context(fresh_workspaces())
        stack.enter_context(cuda_code_paths())
        gpu = stack.enter_context(simulated_gpu(sm_count, op_workspace=workspace, overrides=overrides,
                                                explain_peak=explain_peak))
        return _run(config, setup, gpu, torch.device("meta"), mesh)


@contextlib.contextmanager
def _collect_after_interpreted_launches():
    """Triton's interpreter leaves reference cycles (recursive closures over the arguments' storages) that
    hold a launch's arguments until the next garbage collection; a GPU launch holds nothing. Collect them
    right after each interpreted launch."""
    run = reach_ins.get(reach_ins.TRITON_INTERPRETED_RUN)

    def run_then_collect(self, *args, **kwargs):
        result = run(self, *args, **kwargs)
        gc.collect(0)  # the cycles are new: the youngest generation holds them, and is cheap to collect
        return result

    with reach_ins.patched((reach_ins.TRITON_INTERPRETED_RUN, run_then_collect)):
        yield


def measure_step_on_cpu(config, setup: StepSetup) -> StepMemory:
    """The same step run for real on the CPU (fastft's and TRL's Triton kernels interpreted: run with
    ``TRITON_INTERPRET=1``), its live tensor bytes counted: the reference the accounting is validated
    against at small sizes. ``setup.fsdp_world_size`` > 1: this rank's part of an FSDP2 job, run in each rank
    of an initialised (gloo) process group of that many ranks."""
    mesh = _cpu_mesh(setup.fsdp_world_size) if setup.fsdp_world_size > 1 else None
    with fresh_workspaces(), cuda_code_paths(), _collect_after_interpreted_launches(), \
            LiveTensorBytes("cpu", overrides=cuda_op_overrides()) as tracker:
        return _run(config, setup, tracker, torch.device("cpu"), mesh)


def _cpu_mesh(world_size: int):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized() or dist.get_world_size() != world_size:
        raise RuntimeError(f"measuring an FSDP step of {world_size} ranks needs a process group of {world_size} "
                           "ranks (torchrun, or init_process_group in each rank)")
    return init_device_mesh("cpu", (world_size,), mesh_dim_names=(MESH_DIM,))


class _CudaAllocatorStats:
    """The tracker interface of ``_run`` over the CUDA caching allocator's own statistics."""

    peak_phase = peak_op = None
    peak_storages: list = []

    def __init__(self):
        self.phase = ""

    def reset_peak(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    @property
    def peak(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    @staticmethod
    def storage_bytes(tensors) -> int:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())


def measure_step_on_gpu(config, setup: StepSetup) -> StepMemory:
    """The step run for real on the current CUDA device (random weights), its peak from
    ``torch.cuda.max_memory_allocated``: what the accounting predicts (``bench/memory.py --gpu-check``)."""
    if setup.fsdp_world_size > 1:
        raise ValueError("the GPU check runs one process on one GPU; an FSDP step (fsdp_world_size > 1) is "
                         "validated on CPU ranks (tests/test_memory_fsdp.py)")
    with fresh_workspaces():
        return _run(config, setup, _CudaAllocatorStats(), torch.device("cuda", torch.cuda.current_device()))
