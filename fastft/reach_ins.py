"""Every place fastft replaces or reads a private attribute of another library, in one table, and the one way to
do it.

fastft hooks into torch (FSDP included), Triton, transformers, peft, TRL and bitsandbytes where they have no public
API for what it needs: the memory accounting swaps a dozen functions for the duration of an accounted step, the
patching layer wraps two TRL trainers and serves TRL's fused lm-head loss, the MoE loader uses transformers'
checkpoint conversions. Each such attribute is a :class:`ReachIn` of :data:`REGISTRY`: its owner (module or class,
by dotted path), its name, the feature of fastft that needs it, whether that feature is required, and where it
matters the parameter names fastft relies on. The versions it was checked against are the library's range in
``fastft/versions.py`` (what CI tests at both ends).

Before a feature uses one (at import of the module that needs it, or when the feature starts: the memory
accounting's when an accounting starts, not at ``import fastft``) it is verified by :func:`check` / :func:`get` /
:func:`patched`: the owner imports, the attribute exists, and its parameters are the expected ones. When a library
release has removed or changed it, a required feature raises :class:`ReachInError` (an ``ImportError``) naming
the library, its installed version, the attribute and the feature; an optional feature is disabled with one
warning (:func:`available` returns False). So the next release fails loudly at the reach-in, never silently
somewhere else.

Replacements go through :func:`patched` (a context manager that restores every attribute in ``finally``) or
:func:`install` (returns the function that restores it). ``tests/test_reach_ins.py`` removes each registered
attribute and checks the error or the warning, and reads fastft's sources (``ast``) for reach-ins that bypass
this module.

Kinds of use (``use``): ``"replace"``: fastft's function takes the attribute's place with the same parameters
(``parameters`` are then exactly the attribute's); ``"wrap"``: a wrapper calling the original takes its place;
``"read"``: fastft reads or calls it (``parameters``: those fastft passes by name, at least these, or a
``**kwargs``); a ``"wrap"``'s ``parameters`` are those its wrapper reads from the call (named); ``"flag"``: an
attribute of the library's *instances* that fastft reads or sets, verified in the source of the owner that
defines or reads it (no class attribute to look up); ``"op"``: an operator looked up by its schema name in a
``torch.ops`` namespace (the owner, ``torch.ops.aten``), called, overridden or recognised in a dispatch mode:
``signature_of`` names the overload (``"default"``), ``parameters`` are the leading arguments of its schema, in
order, up to the last one fastft passes or reads (by position or by name; a release that renames or reorders
them fails the check, one that appends an argument does not), and :func:`get` returns the overload.

fastft's kernel library (``kernels/``, installed as ``fastft.kernels``) imports only torch and triton, so it
cannot call this module: its reach-ins are listed here too and verified where fastft patches a model
(``fastft.patch.patch_decoder``); the kernels themselves fall back where the attribute is missing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import inspect
import logging
import platform
import sys

from .versions import PYTHON, REQUIREMENTS

logger = logging.getLogger("fastft")

USES = ("replace", "wrap", "read", "flag", "op")

MEMORY = "the memory accounting (estimate_memory, max_context, fastft-memory, use_gradient_checkpointing='auto')"
MEMORY_FSDP = "the FSDP memory accounting (fsdp_world_size > 1)"
TRL_LOSS = "TRL's fused lm-head loss served by fastft's linear_log_probs kernel"
TRL_DATASETS = "the dataset checks of SFTTrainer / DPOTrainer for fastft models"
TRL_MASTER_WEIGHTS = "fastft's trainable dtypes under SFTTrainer / DPOTrainer (fp32 master adapters of fp16 models)"
MOE = "4-bit mixture-of-experts experts (NF4ExpertsTensor, quantized while loading)"
ATTENTION = "fastft's attention forward (the model's attention implementation)"
CHECKPOINTING = "fastft's gradient checkpointing plan (use_gradient_checkpointing)"
CPU_LAYOUT = "keeping bitsandbytes' standard 4-bit layout on CPU (no AVX512-bf16 repacking)"
DOCTOR = "the doctor's environment report (native library and build details)"
MOE_BENCH = "bench/moe_experts.py's transformers contenders (grouped_mm / eager expert paths on one experts module)"
DEVICE_CHECKS = ("the sync-free checks of labels and cu_seqlens on a GPU (device-side asserts; without them each "
                 "check reads back to the host: one sync)")


class ReachInError(ImportError):
    """A library fastft reaches into lacks the attribute a required feature needs, or it has other parameters."""


@dataclasses.dataclass(frozen=True)
class ReachIn:
    library: str  # the distribution: "torch", "triton", "transformers", "peft", "trl", "bitsandbytes", ...
    owner: str  # dotted path of the module or class that holds the attribute
    attribute: str
    feature: str  # what of fastft needs it
    use: str  # one of USES (see the module doc)
    parameters: tuple[str, ...] | None = None  # None: not checked (a builtin has no signature to read)
    required: bool = True  # False: the feature is disabled with one warning when the attribute is unusable
    signature_of: str | None = None  # the parameters are those of this attribute of it (a class's "forward", an op's
    # overload)
    fallback: str | None = None  # an older name of the attribute, within the supported range
    registered_by: str | None = None  # an op's: the module whose import registers it (not torch's own ATen ops)

    def __post_init__(self):
        if self.use not in USES:
            raise ValueError(f"use must be one of {USES}, got {self.use!r}")
        if self.use == "op" and (self.signature_of is None or self.parameters is None):
            raise ValueError(f"an op ({self.name}) needs its overload (signature_of) and its leading parameters")

    @property
    def name(self) -> str:
        return f"{self.owner}.{self.attribute}"

    @property
    def versions(self) -> str:
        """The range it was checked against (``fastft/versions.py``; an optional extra has none)."""
        if self.library == "python":
            return f"Python{PYTHON}"
        return f"{self.library}{REQUIREMENTS[self.library]}" if self.library in REQUIREMENTS else \
            f"{self.library} (optional; not pinned)"


def _torch(owner, attribute, feature, use, parameters=None, **kwargs) -> ReachIn:
    return ReachIn("torch", owner, attribute, feature, use, parameters, **kwargs)


_FSDP = "torch.distributed.fsdp._fully_shard"


def _aten(op, feature, parameters, overload="default", namespace="aten", registered_by=None) -> ReachIn:
    return ReachIn("torch", f"torch.ops.{namespace}", op, feature, "op", parameters, signature_of=overload,
                   registered_by=registered_by)


# ---------------------------------------------------------------------------------------------
# The memory accounting (fastft/memory): verified when an accounting starts

STORAGE_RESIZE = _torch("torch.UntypedStorage", "resize_", MEMORY, "wrap")
STORAGE_CDATA = _torch("torch.UntypedStorage", "_cdata", MEMORY, "read")
TRITON_JIT_RUN = ReachIn("triton", "triton.runtime.jit.JITFunction", "run", MEMORY, "replace")
TRITON_INTERPRETED_RUN = ReachIn("triton", "triton.runtime.interpreter.InterpretedFunction", "run", MEMORY, "wrap")
ADAM_FUSED_CHECK = _torch("torch.optim.adam", "_device_dtype_check_for_fused", MEMORY, "replace",
                          ("p", "cuda_unsupported"))
IS_AUTOCAST_ENABLED = _torch("torch", "is_autocast_enabled", MEMORY, "wrap")
AUTOCAST = _torch("torch", "autocast", MEMORY, "wrap", ("device_type", "enabled"), signature_of="__init__")
SDPA = _torch("torch.nn.functional", "scaled_dot_product_attention", MEMORY, "replace")
TORCH_DISPATCH_MODE = _torch("torch.utils._python_dispatch", "TorchDispatchMode", MEMORY, "read")
GROUPED_MM_META_OUTPUT = _torch("torch._meta_registrations", "_create_grouped_mm_output_tensor", MEMORY, "read",
                                ("mat1", "mat2", "offs", "out_dtype"))
TREE_FLATTEN = _torch("torch.utils._pytree", "tree_flatten", MEMORY, "read")
TREE_MAP = _torch("torch.utils._pytree", "tree_map", MEMORY, "read")
OP_SCHEMA = _torch("torch._ops.OpOverload", "_schema", MEMORY, "flag")
DTENSOR_LOCAL = _torch("torch.distributed.tensor.DTensor", "_local_tensor", MEMORY_FSDP, "read")
FSDP_DEVICE_HANDLES = tuple(_torch(f"{_FSDP}.{module}", "_get_device_handle", MEMORY_FSDP, "replace", ("device_type",))
                            for module in ("_fsdp_collectives", "_fsdp_init", "_fsdp_param_group", "_fsdp_state"))
MESH_DEVICE_HANDLE = _torch("torch.distributed.device_mesh", "_get_device_handle", MEMORY_FSDP, "read",
                            ("device_type",))
FSDP_DEVICE_FROM_MESH = _torch(f"{_FSDP}._fully_shard", "_get_device_from_mesh", MEMORY_FSDP, "replace", ("mesh",))
FSDP_VALIDATE_NO_META = _torch(f"{_FSDP}._fsdp_param_group.FSDPParamGroup", "_validate_no_meta_params", MEMORY_FSDP,
                               "replace", ("self",))
FAKE_STORE = _torch("torch.testing._internal.distributed.fake_pg", "FakeStore", MEMORY_FSDP, "read")
MODULE_STATE_DICT = _torch("torch.nn.Module", "state_dict", MEMORY_FSDP, "replace")  # on one model instance
# ATen ops by schema name, recognised in its dispatch modes or called positionally (memory/simulated_gpu.py: host
# copies, pinning, mask indexing, .item(); memory/cuda_paths.py: the CUDA attention backends and their backward
# workspaces, torch._grouped_mm's meta output)
ATEN_TO_COPY = _aten("_to_copy", MEMORY, ("self", "dtype", "layout", "device", "pin_memory"))
ATEN_PIN_MEMORY = _aten("_pin_memory", MEMORY, ("self",))
ATEN_INDEX_PUT_IMPL = _aten("_index_put_impl_", MEMORY, ("self", "indices"))
ATEN_LOCAL_SCALAR_DENSE = _aten("_local_scalar_dense", MEMORY, ("self",))
ATEN_FLASH_ATTENTION_FOR_CPU = _aten("_scaled_dot_product_flash_attention_for_cpu", MEMORY, (
    "query", "key", "value", "dropout_p", "is_causal", "attn_mask", "scale"))
ATEN_FLASH_ATTENTION = _aten("_scaled_dot_product_flash_attention", MEMORY, (
    "query", "key", "value", "dropout_p", "is_causal", "return_debug_mask", "scale"))
ATEN_EFFICIENT_ATTENTION = _aten("_scaled_dot_product_efficient_attention", MEMORY, (
    "query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal", "scale"))
ATEN_FLASH_ATTENTION_BACKWARD = _aten("_scaled_dot_product_flash_attention_backward", MEMORY,
                                      ("grad_out", "query", "key"))
ATEN_EFFICIENT_ATTENTION_BACKWARD = _aten("_scaled_dot_product_efficient_attention_backward", MEMORY,
                                          ("grad_out_", "query"))
ATEN_GROUPED_MM = _aten("_grouped_mm", MEMORY, ("self", "mat2", "offs", "bias", "out_dtype"))  # overridden
WRAP_TENSOR_AUTOGRAD = _aten("_wrap_tensor_autograd", MEMORY_FSDP, ("input",), namespace="_c10d_functional",
                             registered_by="torch.distributed._functional_collectives")  # overridden on meta
TRL_USE_TRITON = ReachIn("trl", "trl.kernels.chunked_logprob", "_use_triton", MEMORY, "replace", ("device",))
TRL_UTILS_USE_TRITON = ReachIn("trl", "trl.trainer.utils", "_use_triton", MEMORY, "replace", ("device",))
TRL_ADDMM_FP32 = ReachIn("trl", "trl.kernels.chunked_logprob", "_addmm_fp32", MEMORY, "replace", ("acc", "a", "b"))
BNB_QMAP_CACHE = ReachIn("bitsandbytes", "bitsandbytes.functional", "name2qmap", MEMORY, "read")
PARAMS4BIT_QUANTIZE = ReachIn("bitsandbytes", "bitsandbytes.nn.Params4bit", "_quantize", MEMORY, "read",
                              ("self", "device"))

# ---------------------------------------------------------------------------------------------
# The patching layer: verified when a model is patched / loaded, or when TRL's hooks are installed

TRL_CHUNKED_LOG_PROB = ReachIn(
    "trl", "trl.trainer.utils", "_ChunkedLogProbFunction", TRL_LOSS, "replace", signature_of="forward",
    parameters=("ctx", "hidden", "weight", "bias", "targets", "temperature", "chunk_size", "final_logit_softcapping",
                "logit_scale", "outputs"))
TRL_ADD_FUSED_LM_HEAD = ReachIn("trl", "trl.trainer.utils", "add_fused_lm_head", TRL_LOSS, "read", ("model", "outputs"))
SFT_PREPARE_DATASET = ReachIn("trl", "trl.SFTTrainer", "_prepare_dataset", TRL_DATASETS, "wrap",
                              ("dataset_name", "args"))
DPO_PREPARE_DATASET = ReachIn("trl", "trl.DPOTrainer", "_prepare_dataset", TRL_DATASETS, "wrap",
                              ("dataset_name", "args"))
SFT_INIT_DATASETS = ReachIn("trl", "trl.SFTTrainer", "__init__", TRL_DATASETS, "wrap",
                            ("model", "args", "train_dataset", "eval_dataset", "processing_class", "formatting_func"))
DPO_INIT_DATASETS = ReachIn("trl", "trl.DPOTrainer", "__init__", TRL_DATASETS, "wrap",
                            ("model", "train_dataset", "eval_dataset", "processing_class"))
SFT_INIT_DTYPES = ReachIn("trl", "trl.SFTTrainer", "__init__", TRL_MASTER_WEIGHTS, "wrap", ("model",))
DPO_INIT_DTYPES = ReachIn("trl", "trl.DPOTrainer", "__init__", TRL_MASTER_WEIGHTS, "wrap", ("model",))
ATTN_IMPLEMENTATION = ReachIn("transformers", "transformers.PretrainedConfig", "_attn_implementation", ATTENTION,
                              "read")
# transformers' experts forward dispatches on it at every call; the benchmark switches one module between paths
EXPERTS_IMPLEMENTATION = ReachIn("transformers", "transformers.PretrainedConfig", "_experts_implementation",
                                 MOE_BENCH, "read")
ACTIVATION_CHECKPOINTING_ENABLE = ReachIn(
    "transformers", "transformers.PreTrainedModel", "_activation_checkpointing_enable", CHECKPOINTING, "read",
    ("offload",), fallback="gradient_checkpointing_enable")  # transformers < 5.23: the public name
CONVERSION_MAPPING_GET = ReachIn("transformers", "transformers.conversion_mapping",
                                 "get_checkpoint_conversion_mapping", MOE, "read")
CONVERSION_MAPPING_REGISTER = ReachIn("transformers", "transformers.conversion_mapping",
                                      "register_checkpoint_conversion_mapping", MOE, "read", ("mapping", "overwrite"))
CONVERSION_MAPPING_USER = ReachIn("transformers", "transformers.conversion_mapping", "USER_REGISTERED_MAPPINGS", MOE,
                                  "read")
WEIGHT_CONVERTER_OPERATIONS = ReachIn("transformers", "transformers.core_model_loading.WeightConverter", "operations",
                                      MOE, "flag")
HF_INITIALIZED = ReachIn("transformers", "transformers.modeling_utils", "_is_hf_initialized", MOE, "flag")
DISABLED_TORCH_FUNCTION = _torch("torch._C", "_disabled_torch_function_impl", MOE, "read")
MAKE_WRAPPER_SUBCLASS = _torch("torch.Tensor", "_make_wrapper_subclass", MOE, "read")
OP_SCHEMA_MOE = _torch("torch._ops.OpOverload", "_schema", MOE, "flag")
TREE_MAP_ONLY = _torch("torch.utils._pytree", "tree_map_only", MOE, "read")
TENSOR_VERSION = _torch("torch.Tensor", "_version", ATTENTION, "read")
ATEN_TO_COPY_MOE = _aten("_to_copy", MOE, ("self", "dtype", "layout", "device"))  # NF4ExpertsTensor's .to()
# kernels/vocab_rows.py (check_labels) and kernels/attention.py (_check_cu_seqlens); builtin: no signature to read
ASSERT_ASYNC = _torch("torch", "_assert_async", DEVICE_CHECKS, "read", required=False)
CPU_REPACKING = ReachIn("bitsandbytes", "bitsandbytes.nn.Linear4bit", "support_avx512bf16_for_cpu", CPU_LAYOUT,
                        "flag", required=False)
CONFIG_NAME_OR_PATH = ReachIn("transformers", "transformers.PretrainedConfig", "_name_or_path",
                              "the memory figures' model name (else its model_type)", "flag", required=False)

# ---------------------------------------------------------------------------------------------
# The doctor (diagnostics: what it cannot read it reports as unknown)

BNB_NATIVE_LIBRARY = ReachIn("bitsandbytes", "bitsandbytes.cextension.BNBNativeLibrary", "_lib", DOCTOR, "flag",
                             required=False)
CTYPES_LIBRARY_NAME = ReachIn("python", "ctypes.CDLL", "_name", DOCTOR, "flag", required=False)
XFORMERS_CPP_LIB = ReachIn("xformers", "xformers", "_cpp_lib", DOCTOR, "read", required=False)
XFORMERS_LOAD_EXCEPTION = ReachIn("xformers", "xformers._cpp_lib", "_cpp_library_load_exception", DOCTOR, "read",
                                  required=False)
XFORMERS_BUILD_METADATA = ReachIn("xformers", "xformers._cpp_lib", "_build_metadata", DOCTOR, "read", required=False)

REGISTRY: tuple[ReachIn, ...] = tuple(
    value for name, value in sorted(globals().items())
    if isinstance(value, ReachIn) and not name.startswith("_")) + FSDP_DEVICE_HANDLES

# ---------------------------------------------------------------------------------------------
# Verification


def installed_version(library: str) -> str:
    if library == "python":
        return platform.python_version()
    module = sys.modules.get(library)
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            return "(not installed)"
    return str(version)


def _resolve(path: str):
    """The module or class at dotted ``path``: the longest importable module prefix, then attributes."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not (module_name + ".").startswith(exc.name + "."):
                raise  # a module that exists failed to import one of its own imports
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise ModuleNotFoundError(path)


def _parameters(value) -> tuple[str, ...] | None:
    try:
        return tuple(inspect.signature(value).parameters)
    except (TypeError, ValueError):  # a builtin without a signature
        return None


def _schema_arguments(op) -> tuple[str, ...] | None:
    """The argument names of an operator overload's schema (``aten::_to_copy(Tensor self, *, ...)``), in order."""
    schema = getattr(op, "_schema", None)
    return tuple(argument.name for argument in schema.arguments) if hasattr(schema, "arguments") else None


def _source_mentions(owner, attribute: str) -> bool:
    try:
        return attribute in inspect.getsource(owner)
    except (OSError, TypeError):
        return False


_MISSING = object()


def _current(entry: ReachIn, owner):
    """(name present, its value) of ``entry`` on ``owner``: the attribute or its fallback (``object``'s own, as a
    class's ``__init__`` is where the class defines none, do not count)."""
    for name in (entry.attribute, entry.fallback):
        if name is not None and hasattr(owner, name) and getattr(owner, name) is not getattr(object, name, _MISSING):
            return name, getattr(owner, name)
    return None, None


def problem(entry: ReachIn) -> str | None:
    """Why ``entry`` is unusable with the installed library (what the library lacks or has instead), or None."""
    for path in filter(None, (entry.registered_by, entry.owner)):  # an op's registering module, then its namespace
        try:
            owner = _resolve(path)
        except (ImportError, AttributeError):
            return f"has no {path}"
    if entry.use == "flag":
        return None if _source_mentions(owner, entry.attribute) else \
            f"no longer defines or reads {entry.attribute} in {entry.owner}"
    name, value = _current(entry, owner)
    if name is None:
        return f"has no {entry.name}"
    if entry.use == "op":
        return _op_problem(entry, getattr(value, entry.signature_of, None))
    if entry.parameters is None:
        return None
    if entry.signature_of is not None:
        value = getattr(value, entry.signature_of, None)
    found = _parameters(value)
    if found is None:
        return f"has {entry.owner}.{name} without a readable signature"
    exact = entry.use == "replace"
    # what fastft passes by name to a function it calls, ``**kwargs`` takes too
    takes_any_keyword = entry.use == "read" and inspect.Parameter.VAR_KEYWORD in [
        p.kind for p in inspect.signature(value).parameters.values()]
    if (found != entry.parameters) if exact else not (takes_any_keyword or set(entry.parameters) <= set(found)):
        where = f"{entry.owner}.{name}" + (f".{entry.signature_of}" if entry.signature_of else "")
        return (f"has {where} with parameters ({', '.join(found)}), not "
                f"{'' if exact else 'including '}({', '.join(entry.parameters)})")
    return None


def _op_problem(entry: ReachIn, overload) -> str | None:
    """What is wrong with an ``"op"`` entry's overload: missing, or its schema's leading arguments are others."""
    where = f"{entry.name}.{entry.signature_of}"
    if overload is None:
        return f"has no {where}"
    found = _schema_arguments(overload) or _parameters(overload)  # a Python stand-in has a signature, no schema
    if found is None:
        return f"has {where} without a readable schema"
    if found[:len(entry.parameters)] != entry.parameters:
        return f"has {where} with parameters ({', '.join(found)}), not starting with ({', '.join(entry.parameters)})"
    return None


def message(entry: ReachIn, why: str) -> str:
    return (f"fastft supports {entry.versions}; the installed {entry.library} {installed_version(entry.library)} "
            f"{why}, which {entry.feature} needs. Install a supported {entry.library}.")


_warned: set[ReachIn] = set()


def check(entry: ReachIn) -> bool:
    """True when ``entry`` is usable. Otherwise a required entry raises :class:`ReachInError`; an optional one
    warns (once per entry and process) that its feature is disabled and returns False."""
    why = problem(entry)
    if why is None:
        return True
    if entry.required:
        raise ReachInError(message(entry, why))
    if entry not in _warned:
        _warned.add(entry)
        logger.warning(message(entry, why).replace(" needs. Install", " needs: it is disabled. Install"))
    return False


def available(entry: ReachIn) -> bool:
    """Whether an optional feature's reach-in is usable (one warning when not; see :func:`check`)."""
    return check(entry)


def get(entry: ReachIn):
    """The attribute's current value (its fallback's on an older library; an ``"op"``'s overload), verified first
    (:func:`check`); None for an optional entry that is unusable."""
    if not check(entry):
        return None
    value = _current(entry, _resolve(entry.owner))[1]
    return getattr(value, entry.signature_of) if entry.use == "op" else value


def read(entry: ReachIn, obj):
    """``entry``'s attribute (or its fallback) as ``obj`` has it (an instance or subclass of the owner), verified
    first; None for an optional entry that is unusable."""
    if not check(entry):
        return None
    return _current(entry, obj)[1]


def install(entry: ReachIn, value, on=None):
    """Put ``value`` in place of ``entry``'s attribute (on its owner, or on the instance ``on``), verified first;
    returns the function that restores what was there (the owner's own entry, or none: inherited again)."""
    check(entry)
    target = _resolve(entry.owner) if on is None else on
    name = entry.attribute
    had_own, own = name in vars(target), vars(target).get(name)
    setattr(target, name, value)

    def restore():
        if had_own:
            setattr(target, name, own)
        else:
            delattr(target, name)

    return restore


@contextlib.contextmanager
def patched(*swaps):
    """Inside the block, each ``(entry, value)`` or ``(entry, value, instance)`` of ``swaps`` is in place; every one
    is verified before any is made, and all are restored in ``finally``."""
    for swap in swaps:
        check(swap[0])
    restores = []
    try:
        for swap in swaps:
            restores.append(install(*swap))
        yield
    finally:
        for restore in reversed(restores):
            restore()
