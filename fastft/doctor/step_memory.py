"""Section 5, memory: one QLoRA training step of the parity section's model (fastft, gradient checkpointing on,
TRL's fused lm-head loss as ``SFTTrainer`` runs it) measured on this device against fastft's accounting of the same
step (``fastft.memory.accounting``: meta tensors along the GPU code path), as ``fastft-memory`` computes it.

On a GPU the measurement is ``torch.cuda.max_memory_allocated`` (``measure_step_on_gpu``) and the accounting is for
this GPU's multiprocessor count, in the model's dtype. On the CPU it is the live tensor bytes of the same step run
with the interpreted Triton kernels (``measure_step_on_cpu``, which needs ``TRITON_INTERPRET=1``: without it fastft
takes its PyTorch paths, whose buffers are not the GPU's), in fp32, where the CPU and GPU code paths allocate the
same buffers (as ``tests/test_memory.py`` validates the accounting).
"""
from __future__ import annotations

import torch

from ..kernels._common import INTERPRET


def run(config, device: torch.device, dtype: torch.dtype, tiny: bool) -> dict:
    from ..memory.accounting import account_step, measure_step_on_cpu, measure_step_on_gpu
    from ..memory.training_step import StepSetup

    batch_size, seq_len = (2, 16) if tiny else (4, 256)
    if device.type == "cuda":
        setup = StepSetup(seq_len=seq_len, batch_size=batch_size, checkpointing="on", loss="trl", dtype=dtype)
        with torch.cuda.device(device):
            measured = measure_step_on_gpu(config, setup)
        accounted = account_step(config, setup, sm_count=torch.cuda.get_device_properties(device).multi_processor_count)
        how = "torch.cuda.max_memory_allocated of the step (random weights)"
    elif INTERPRET:
        setup = StepSetup(seq_len=seq_len, batch_size=batch_size, checkpointing="on", loss="trl", dtype=torch.float32)
        measured = measure_step_on_cpu(config, setup)
        # the CPU's kernels have no CUDA-internal workspaces, and one multiprocessor's launch grids
        accounted = account_step(config, setup, sm_count=1, cuda_workspaces=False)
        how = "live tensor bytes of the step on the CPU, Triton kernels interpreted (fp32)"
    else:
        return {"status": "skipped",
                "problem": ("without a GPU the measured step must run the GPU code path: run with TRITON_INTERPRET=1 "
                            "(the interpreted Triton kernels allocate what the GPU's do; fastft's PyTorch paths "
                            "do not)")}
    return {
        "status": "ok", "measured": how, "setup": (f"fastft, batch {batch_size} x {seq_len} tokens, LoRA r=16, "
                                                   f"checkpointing on, TRL's loss, {str(setup.dtype)[6:]}"),
        "measured_peak_bytes": measured.peak_bytes, "accounted_peak_bytes": accounted.peak_bytes,
        "peak_ratio": measured.peak_bytes / accounted.peak_bytes,
        "measured_resident_bytes": measured.resident_bytes, "accounted_resident_bytes": accounted.resident_bytes,
        "resident_ratio": measured.resident_bytes / accounted.resident_bytes,
        "accounted_peak_phase": accounted.peak_phase,
    }
