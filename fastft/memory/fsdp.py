"""FSDP2 in the memory accounting: one rank of an ``N``-rank job, sharded by torch's own ``fully_shard``.

The model is wrapped exactly as the Trainer's accelerate FSDP2 plugin wraps it (``fsdp=True``,
``fsdp_config={"version": 2}``): accelerate's own ``fsdp2_prepare_model`` is called with the plugin the Trainer
builds (transformer-based wrapping of ``_no_split_modules``: one unit per decoder layer; the embedding in its
own unit; ``reshard_after_forward=True``; the root unit; the mixed-precision policy of ``bf16=True`` /
``fp16=True``). The optimizer is then made over the sharded parameters, as accelerate's ``_prepare_fsdp2``
switches it to them before its first step, so its state is sharded too.

What the rank then holds is what torch's FSDP2 allocates, counted by the same tracker as everything else: its
shards (padded to equal size on every rank), the all-gathered unsharded parameters of the units running (and of
the next one prefetched), the reduce-scatter buffers of the gradients. In the accounting the collectives run on
a *fake* process group of ``N`` ranks in this one process (``torch.testing._internal.distributed.fake_pg``):
they move no data, which meta tensors have none of anyway.

FSDP2 does not run on meta tensors unaided (torch 2.13, ``torch/distributed/fsdp/_fully_shard/``):

* it takes its device from the mesh (``_get_device_from_mesh``: "cpu" for a CPU mesh) and allocates the
  all-gather and reduce-scatter buffers there: real CPU memory, not counted. :func:`fsdp_on_meta` makes it
  ``meta``, so the buffers are meta tensors and counted;
* its streams and events come from the device's module (``_get_device_handle``), which ``meta`` has none of:
  the CPU's no-op ones stand in (a CPU mesh uses them too);
* its lazy init refuses parameters still on meta (``FSDPParamGroup._validate_no_meta_params``, meant to catch
  a forgotten ``to_empty``): the accounting's parameters are meta on purpose.

And one op of torch's functional collectives has a meta kernel that allocates where the op itself does not:
``_c10d_functional._wrap_tensor_autograd`` wraps its input (``AsyncCollectiveTensor``, no new memory), its meta
kernel returns ``empty_like(input)``. TRL's fused lm head gathers the head with ``DTensor.full_tensor()``, which
calls it: :func:`meta_overrides` makes it a view of its input, as the wrapper is.
"""
from __future__ import annotations

import contextlib
import types

import torch

from .. import reach_ins
from ..kernels._common import torch_at_least

# The oldest torch the FSDP accounting runs on, of those tested: torch 2.10's c10d collectives have no meta kernels
# (``_allgather_base_`` fails on meta tensors; nor has it the ``_wrap_tensor_autograd`` op below); 2.11 and 2.12 are
# unchecked.
FSDP_ACCOUNTING_TORCH = (2, 13)
_FSDP_ACCOUNTING_TORCH_NAME = ".".join(map(str, FSDP_ACCOUNTING_TORCH))
MESH_DIM = "dp_shard"  # accelerate's name for the FSDP dimension


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """A fake default process group of ``world_size`` ranks (this process is rank 0) and its 1-D CPU mesh, torn
    down on the way out. Refuses to run inside a job whose process group is already initialised: there is one
    default group per process, and the caller's must not be replaced."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not torch_at_least(torch.__version__, *FSDP_ACCOUNTING_TORCH):
        raise NotImplementedError(
            f"the FSDP memory accounting (fsdp_world_size > 1) needs torch>={_FSDP_ACCOUNTING_TORCH_NAME}; "
            f"found torch {torch.__version__}, whose collectives have no meta kernels (c10d::_allgather_base_). "
            "Upgrade torch, or account one GPU (fsdp_world_size=1)")
    if dist.is_initialized():
        raise RuntimeError("the FSDP memory accounting runs its own fake process group of fsdp_world_size ranks, and "
                           "this process already has a default process group (torch.distributed is initialised); "
                           "run the accounting in a process of its own (e.g. `fastft-memory --fsdp-world-size N`) "
                           "or before init_process_group")
    dist.init_process_group("fake", store=reach_ins.get(reach_ins.FAKE_STORE)(), rank=0, world_size=world_size)
    try:
        yield init_device_mesh("cpu", (world_size,), mesh_dim_names=(MESH_DIM,))
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def fsdp_on_meta():
    """FSDP2 over meta parameters: its device meta, the CPU's streams, no refusal of meta (see the module doc)."""
    get_device_handle = reach_ins.get(reach_ins.MESH_DEVICE_HANDLE)

    def device_handle(device_type: str):
        return get_device_handle("cpu" if device_type == "meta" else device_type)

    with reach_ins.patched(*[(entry, device_handle) for entry in reach_ins.FSDP_DEVICE_HANDLES],
                           (reach_ins.FSDP_DEVICE_FROM_MESH, lambda mesh: torch.device("meta")),
                           (reach_ins.FSDP_VALIDATE_NO_META, lambda self: None)):
        yield


def meta_overrides() -> dict:
    """``{op: function}`` for the simulated GPU: collectives' ops whose meta kernel allocates what they do not."""
    return {reach_ins.get(reach_ins.WRAP_TENSOR_AUTOGRAD): lambda input: input.view_as(input)}


def mixed_precision(dtype: torch.dtype) -> str:
    """accelerate's mixed-precision name for the Trainer's ``bf16=True`` / ``fp16=True`` (fp32: "no")."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def shard_model(model, mesh, dtype: torch.dtype):
    """``model`` wrapped by accelerate's ``fsdp2_prepare_model`` over ``mesh`` as the Trainer's FSDP2 plugin
    wraps it (see the module doc); returns the wrapped model."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    # transformers' TrainingArguments(fsdp=True, fsdp_config={"version": 2})._process_fsdp_args(), defaults
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="TRANSFORMER_BASED_WRAP",
                                            cpu_ram_efficient_loading=False, state_dict_type="FULL_STATE_DICT",
                                            reshard_after_forward=True)
    reach_ins.check(reach_ins.DTENSOR_LOCAL)  # the accounting reads each rank's shards by it
    precision = mixed_precision(dtype)
    if precision != "no":  # what AcceleratorState does with the Trainer's bf16 / fp16 flag
        plugin.set_mixed_precision(precision)
    accelerator = types.SimpleNamespace(
        state=types.SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=mesh, mixed_precision=precision,
        parallelism_config=types.SimpleNamespace(fsdp_dim_names=[MESH_DIM]), is_main_process=False,
        device=mesh.device_type)
    # fsdp2_prepare_model keeps model.state_dict() for cpu_ram_efficient_loading only (off): bitsandbytes' state
    # dict reads the quantization offset with .item(), which a meta tensor has no value for.
    with reach_ins.patched((reach_ins.MODULE_STATE_DICT, lambda *args, **kwargs: {}, model)):
        return fsdp2_prepare_model(accelerator, model)
