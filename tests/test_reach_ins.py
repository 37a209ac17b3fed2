"""The registry of reach-ins into other libraries (fastft/reach_ins.py): every registered attribute or ATen op, removed
or given other parameters, gives the clear error (required features) or one warning (optional ones); and no source of
fastft/, kernels/ or bench/ reaches into another library, or looks up a private ATen op, without it (read with
``ast``)."""
import ast
import functools
import importlib.util
import inspect
import logging
import os
import sys
import types

import pytest
import torch

from fastft import reach_ins
from fastft.kernels._common import torch_at_least
from fastft.memory.fsdp import FSDP_ACCOUNTING_TORCH
from fastft.reach_ins import REGISTRY, ReachInError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def installed(entry) -> bool:
    return entry.library == "python" or importlib.util.find_spec(entry.library) is not None


def entry_id(entry) -> str:
    return f"{entry.name}|{entry.feature.split(' (')[0]}"


def test_registry_lists_each_reach_in_once_with_its_range():
    keys = [(e.owner, e.attribute, e.feature) for e in REGISTRY]
    assert len(keys) == len(set(keys))
    for entry in REGISTRY:
        assert entry.use in reach_ins.USES and entry.feature
        if entry.library in reach_ins.REQUIREMENTS:  # the range of fastft/versions.py, as the error states it
            assert entry.versions == entry.library + reach_ins.REQUIREMENTS[entry.library]
    print("\n".join(f"{e.versions:28} {e.name:85} {e.use:7} {'required' if e.required else 'optional'}  {e.feature}"
                    for e in REGISTRY))


def skip_unless_used_here(entry) -> None:
    if not installed(entry):
        pytest.skip(f"{entry.library} is not installed")
    if entry.feature == reach_ins.MEMORY_FSDP and not torch_at_least(torch.__version__, *FSDP_ACCOUNTING_TORCH):
        pytest.skip("the FSDP accounting refuses this torch before it reaches in")


@pytest.mark.parametrize("entry", REGISTRY, ids=entry_id)
def test_every_registered_reach_in_is_usable_with_the_installed_libraries(entry):
    skip_unless_used_here(entry)
    assert reach_ins.problem(entry) is None


def _stand_in(entry, monkeypatch, **attributes):
    """Put a stand-in without ``entry``'s attribute where its owner is (a class or module of that name)."""
    owner = reach_ins._resolve(entry.owner)
    if isinstance(owner, types.ModuleType):
        stand_in = types.ModuleType(owner.__name__)
        stand_in.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, owner.__name__, stand_in)
    else:
        stand_in = type(owner.__name__, (), attributes)
    parent, _, name = entry.owner.rpartition(".")
    monkeypatch.setattr(reach_ins._resolve(parent), name, stand_in)


def _without_op(entry, monkeypatch) -> None:
    """Put a namespace that has every op of ``entry``'s but ``entry``'s in its place under ``torch.ops``."""
    namespace = reach_ins._resolve(entry.owner)

    class Without(types.ModuleType):
        def __getattr__(self, name):
            if name == entry.attribute:
                raise AttributeError(f"'{self.__name__}' has no {name}")
            return getattr(namespace, name)

    parent, _, name = entry.owner.rpartition(".")
    monkeypatch.setattr(reach_ins._resolve(parent), name, Without(namespace.__name__))


def remove(entry, monkeypatch) -> None:
    """Monkeypatch ``entry``'s attribute (and its fallback) away from its owner: deleted where it is defined; where
    the owner cannot be changed (a C type) or the attribute is an instance's (``flag``), the owner is replaced by a
    stand-in that lacks it."""
    owner = reach_ins._resolve(entry.owner)
    names = [name for name in (entry.attribute, entry.fallback) if name is not None]
    if entry.use == "flag":
        _stand_in(entry, monkeypatch)
        return
    if entry.use == "op":  # an op namespace makes any op it knows again on the next lookup: one without this op
        _without_op(entry, monkeypatch)
        return
    try:
        for name in names:
            for holder in inspect.getmro(owner) if isinstance(owner, type) else [owner]:
                if name in vars(holder):
                    monkeypatch.delattr(holder, name)
    except TypeError:  # an immutable (C) type
        monkeypatch.undo()
        _stand_in(entry, monkeypatch)
    assert reach_ins._current(entry, reach_ins._resolve(entry.owner)) == (None, None)


def expect_refusal(entry, caplog, monkeypatch, why: str, attribute: str | None = None) -> None:
    """The clear error (required) or exactly one warning and the feature off (optional), naming the library, its
    installed version, the attribute and the feature."""
    version = reach_ins.installed_version(entry.library)
    monkeypatch.setattr(reach_ins, "_warned", set())
    if entry.required:
        with pytest.raises(ReachInError) as refusal:
            reach_ins.check(entry)
        text = str(refusal.value)
    else:
        with caplog.at_level(logging.WARNING, logger="fastft"):
            assert reach_ins.check(entry) is False
            assert reach_ins.available(entry) is False and reach_ins.get(entry) is None
        warnings = [r.getMessage() for r in caplog.records if r.name == "fastft"]
        assert len(warnings) == 1, warnings
        text = warnings[0]
        assert "disabled" in text
    for part in (entry.library, version, attribute or entry.attribute, entry.feature, entry.versions, why):
        assert part in text, (part, text)


@pytest.mark.parametrize("entry", REGISTRY, ids=entry_id)
def test_a_removed_attribute_is_a_clear_error_or_one_warning(entry, monkeypatch, caplog):
    if not installed(entry):
        pytest.skip(f"{entry.library} is not installed")
    remove(entry, monkeypatch)
    expect_refusal(entry, caplog, monkeypatch, "no" if entry.use == "flag" else f"has no {entry.owner}.")


WITH_PARAMETERS = [e for e in REGISTRY if e.parameters is not None and e.use != "op"]  # ops: by their schemas below


OPS = [e for e in REGISTRY if e.use == "op"]
_CHANGED_OPS = torch.library.Library("fastft_reach_ins_test", "FRAGMENT")  # kept: the ops live as long as it does


def _op_with_schema(name: str, arguments: str):
    """A real operator (an ``OpOverloadPacket``) of the schema ``name(arguments) -> Tensor``, defined once."""
    if not hasattr(torch.ops.fastft_reach_ins_test, name):
        _CHANGED_OPS.define(f"{name}({arguments}) -> Tensor")
    return getattr(torch.ops.fastft_reach_ins_test, name)


@pytest.mark.parametrize("change", ["renamed", "shifted", "overload"])
@pytest.mark.parametrize("entry", OPS, ids=entry_id)
def test_an_op_with_another_schema_is_a_clear_error(entry, change, monkeypatch, caplog):
    """A torch release that renames or moves the leading arguments fastft passes (positionally, or by name) or drops
    the overload: the clear error, naming what the schema has now. An argument appended at the end is fine."""
    skip_unless_used_here(entry)
    expected = ", ".join(entry.parameters)
    if change == "renamed":
        arguments = ["Tensor unexpected" if i == len(entry.parameters) - 1 else f"Tensor {name}"
                     for i, name in enumerate(entry.parameters)]
    elif change == "shifted":  # every argument one position later: a positional call would silently misplace them
        arguments = ["Tensor inserted"] + [f"Tensor {name}" for name in entry.parameters]
    else:
        arguments = [f"Tensor {name}" for name in entry.parameters]
    name = f"{entry.attribute.lstrip('_')}_{len(entry.parameters)}"
    op = _op_with_schema(f"{name}_{change}", ", ".join(arguments))
    appended = _op_with_schema(f"{name}_appended", ", ".join(
        [f"Tensor {name}" for name in entry.parameters] + ["Tensor appended"]))
    namespace = reach_ins._resolve(entry.owner)
    monkeypatch.setattr(namespace, entry.attribute, appended)
    assert reach_ins.problem(entry) is None and reach_ins.get(entry) is appended.default
    if change == "overload":  # the op, under another overload name
        monkeypatch.setattr(namespace, entry.attribute, types.SimpleNamespace(other=op.default))
        why = f"has no {entry.name}.{entry.signature_of}"
    else:
        monkeypatch.setattr(namespace, entry.attribute, op)
        found = [argument.split()[1] for argument in arguments]
        why = f"with parameters ({', '.join(found)}), not starting with ({expected})"
    expect_refusal(entry, caplog, monkeypatch, why)


@pytest.mark.parametrize("entry", WITH_PARAMETERS, ids=entry_id)
def test_other_parameters_are_a_clear_error(entry, monkeypatch, caplog):
    def other(self, unexpected=None):
        pass

    owner = reach_ins._resolve(entry.owner)
    # an older library may have only the fallback name (transformers 5.17's gradient_checkpointing_enable)
    name = entry.attribute if entry.fallback is None or hasattr(owner, entry.attribute) else entry.fallback
    if entry.signature_of is not None:
        monkeypatch.setattr(owner, name, type("Changed", (), {entry.signature_of: other}))
    else:
        monkeypatch.setattr(owner, name, other)
    expect_refusal(entry, caplog, monkeypatch, "with parameters (self, unexpected)", attribute=name)


def test_a_fallback_name_serves_an_older_library(monkeypatch):
    entry = reach_ins.ACTIVATION_CHECKPOINTING_ENABLE
    model_class = reach_ins._resolve(entry.owner)
    if hasattr(model_class, entry.attribute):  # the newest library; an older one lacks it already
        monkeypatch.delattr(model_class, entry.attribute)
    assert reach_ins.get(entry) is model_class.gradient_checkpointing_enable


# ---------------------------------------------------------------------------------------------
# The features check before they change anything, and restore what they patched


def test_patched_verifies_every_swap_before_making_any_and_restores_in_finally(monkeypatch):
    sdpa = torch.nn.functional.scaled_dot_product_attention
    adam = reach_ins._resolve(reach_ins.ADAM_FUSED_CHECK.owner)
    monkeypatch.delattr(adam, reach_ins.ADAM_FUSED_CHECK.attribute)
    with pytest.raises(ReachInError, match="_device_dtype_check_for_fused"):
        with reach_ins.patched((reach_ins.SDPA, None), (reach_ins.ADAM_FUSED_CHECK, None)):
            pass
    assert torch.nn.functional.scaled_dot_product_attention is sdpa
    monkeypatch.undo()
    with pytest.raises(KeyError):
        with reach_ins.patched((reach_ins.SDPA, print)):
            assert torch.nn.functional.scaled_dot_product_attention is print
            raise KeyError
    assert torch.nn.functional.scaled_dot_product_attention is sdpa


def test_an_instance_patch_is_removed_afterwards():
    module = torch.nn.Linear(2, 2)
    with reach_ins.patched((reach_ins.MODULE_STATE_DICT, lambda *a, **k: {}, module)):
        assert module.state_dict() == {}
    assert "state_dict" not in vars(module) and set(module.state_dict()) == {"weight", "bias"}


def test_the_memory_accounting_refuses_before_it_patches(monkeypatch):
    from fastft.memory.simulated_gpu import simulated_gpu

    is_autocast_enabled = torch.is_autocast_enabled
    storage_class = reach_ins._resolve(reach_ins.TRITON_JIT_RUN.owner)
    run = storage_class.run
    monkeypatch.delattr(reach_ins._resolve(reach_ins.ADAM_FUSED_CHECK.owner), reach_ins.ADAM_FUSED_CHECK.attribute)
    with pytest.raises(ReachInError, match=r"torch.*_device_dtype_check_for_fused.*the memory accounting"):
        with simulated_gpu():
            pass
    assert torch.is_autocast_enabled is is_autocast_enabled and storage_class.run is run


def _start_cuda_code_paths():
    from fastft.memory.cuda_paths import cuda_code_paths

    with cuda_code_paths():
        pass


def _meta_op_overrides():
    from fastft.memory.cuda_paths import meta_op_overrides

    return meta_op_overrides()


def _fsdp_meta_overrides():
    from fastft.memory.fsdp import meta_overrides

    return meta_overrides()


def _moe_check():
    from fastft.moe import check_reach_ins

    check_reach_ins()


@pytest.mark.parametrize("entry, start", [
    (reach_ins.ATEN_FLASH_ATTENTION_BACKWARD, _start_cuda_code_paths),
    (reach_ins.ATEN_FLASH_ATTENTION_FOR_CPU, _start_cuda_code_paths),
    (reach_ins.ATEN_GROUPED_MM, _meta_op_overrides),
    (reach_ins.WRAP_TENSOR_AUTOGRAD, _fsdp_meta_overrides),
    (reach_ins.ATEN_TO_COPY_MOE, _moe_check),
], ids=lambda x: getattr(x, "name", getattr(x, "__name__", "")))
def test_a_feature_names_the_op_it_lacks_when_it_starts(entry, start, monkeypatch):
    """The accounting's SDPA routing, its meta overrides and the MoE experts verify the ATen ops they call or
    recognise before using any: the clear error, not an AttributeError of torch.ops in the middle of a step."""
    skip_unless_used_here(entry)
    start()
    remove(entry, monkeypatch)
    with pytest.raises(ReachInError, match=rf"has no {entry.name}, which {entry.feature.split(' (')[0]}"):
        start()


def test_the_fsdp_accounting_names_what_torch_lacks(monkeypatch):
    from fastft.memory.fsdp import fsdp_on_meta

    entry = reach_ins.FSDP_VALIDATE_NO_META
    monkeypatch.setattr(reach_ins._resolve(entry.owner), entry.attribute, lambda self, strict: None)
    with pytest.raises(ReachInError, match=r"_validate_no_meta_params with parameters \(self, strict\).*FSDP memory"):
        with fsdp_on_meta():
            pass


@pytest.mark.parametrize("present", [True, False])
def test_an_optional_feature_is_skipped_with_one_warning(present, monkeypatch, caplog):
    """patch_model keeps bitsandbytes' standard 4-bit layout on CPU (a layer's ``support_avx512bf16_for_cpu`` off)
    only while bitsandbytes has that switch; without it, one warning for any number of models."""
    import transformers
    from tiny_models import tiny_config

    from fastft.model import patch_model

    monkeypatch.setattr(reach_ins, "_warned", set())
    if not present:
        _stand_in(reach_ins.CPU_REPACKING, monkeypatch)
    layers = []
    with caplog.at_level(logging.WARNING, logger="fastft"):
        for _ in range(2):
            model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"))
            model.model.layers[0].mlp.up_proj.support_avx512bf16_for_cpu = True  # as bitsandbytes' Linear4bit has it
            layers.append(patch_model(model).model.layers[0].mlp.up_proj)
    assert [layer.support_avx512bf16_for_cpu for layer in layers] == [not present] * 2
    warned = [r.getMessage() for r in caplog.records if "support_avx512bf16_for_cpu" in r.getMessage()]
    assert len(warned) == (0 if present else 1) and all("bitsandbytes" in w and "disabled" in w for w in warned)


@pytest.mark.parametrize("present", [True, False])
def test_the_kernels_check_on_the_host_where_torch_lacks_the_device_assert(present, monkeypatch, caplog):
    """On the GPU path the label and cu_seqlens checks use ``torch._assert_async`` (on CPU tensors it raises at once,
    a RuntimeError); without it they read back and raise the host check's ValueError, and patching a model warns
    once that the sync-free checks are off."""
    import transformers
    from tiny_models import tiny_config

    from fastft.kernels import _common
    from fastft.kernels.attention import _check_cu_seqlens
    from fastft.kernels.vocab_rows import check_labels
    from fastft.model import patch_model

    monkeypatch.setattr(reach_ins, "_warned", set())
    if not present:
        monkeypatch.delattr(torch, "_assert_async")
    q = torch.zeros(5, 2, 16)
    error = RuntimeError if present else ValueError
    with _common.gpu_simulation("cpu"):
        assert int(check_labels(torch.tensor([3, -100, 49]), 3, 50, -100, rows_name="logits")) == 2
        with pytest.raises(error, match=r"labels must be in \[0, 50\) or equal ignore_index=-100"):
            check_labels(torch.tensor([3, -100, 50]), 3, 50, -100, rows_name="logits")
        offsets = _check_cu_seqlens(torch.tensor([0, 2, 5], dtype=torch.int32), 3, q, need_offsets=False)
        assert offsets == (None if present else [0, 2, 5])  # read back only without the device assert
        with pytest.raises(error, match="cu_seqlens"):
            _check_cu_seqlens(torch.tensor([0, 2, 4], dtype=torch.int32), 3, q, need_offsets=False)
    with caplog.at_level(logging.WARNING, logger="fastft"):
        for _ in range(2):
            patch_model(transformers.AutoModelForCausalLM.from_config(tiny_config("llama")))
    warned = [r.getMessage() for r in caplog.records if "_assert_async" in r.getMessage()]
    assert len(warned) == (0 if present else 1) and all("disabled" in w for w in warned)


# ---------------------------------------------------------------------------------------------
# No reach-in bypasses the registry

SCANNED = ("fastft", "kernels", "bench")
REGISTRY_FILE = os.path.join("fastft", "reach_ins.py")
# ``torch.ops`` namespaces hold operators by their schema names (``aten._to_copy``): a private one (or a private
# namespace) must be a registered op; public ones (``aten.copy_``) are torch's API
OP_NAMESPACES = ("torch.ops",)
# a NamedTuple's methods and fields that start with "_" so as not to clash with field names: public API
NAMEDTUPLE_API = ("_replace", "_asdict", "_fields", "_make", "_field_defaults")


def _sources():
    for folder in SCANNED:
        for directory, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    yield os.path.relpath(path, ROOT), open(path).read()


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _dotted(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


class _Own(ast.NodeVisitor):
    """The private names fastft defines itself (its functions, classes, variables, arguments, attributes it sets on
    ``self`` / ``cls`` or names ``_fastft_*``) and its own top-level modules."""

    def __init__(self):
        self.names = set()

    def visit_FunctionDef(self, node):
        self.names.add(node.name)
        self.names.update(a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg))
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self.names.add(node.name)
        self.generic_visit(node)

    def visit_Name(self, node):
        if isinstance(node.ctx, ast.Store):
            self.names.add(node.id)

    def visit_Attribute(self, node):
        on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
        if isinstance(node.ctx, ast.Store) and (on_self or node.attr.startswith("_fastft")):
            self.names.add(node.attr)
        self.generic_visit(node)


def _own_names(sources) -> set[str]:
    own = _Own()
    for _, text in sources:
        own.visit(ast.parse(text))
    return own.names


def bypasses(path: str, text: str, own: set[str], local_modules: set[str]) -> list[str]:
    """Reach-ins in ``text`` that do not go through fastft.reach_ins: stores into (or ``setattr`` / ``delattr`` on)
    another package's modules and classes, and reads of private attributes, names and modules of other packages
    that the registry does not list."""
    registered = {e.attribute for e in REGISTRY} | {e.fallback for e in REGISTRY if e.fallback}
    registered_owners = {e.owner for e in REGISTRY}
    # registered ops and their namespaces (``_c10d_functional`` of ``torch.ops._c10d_functional``)
    registered_ops = {e.attribute for e in REGISTRY if e.use == "op"} | {
        e.owner.rpartition(".")[2] for e in REGISTRY if e.use == "op"}
    tree = ast.parse(text)
    foreign = {}  # name -> the foreign module or object it is bound to
    # names bound to an op namespace (``aten = torch.ops.aten``, ``from torch.ops import aten``)
    op_namespaces = set(OP_NAMESPACES)
    found = []

    def is_foreign_module(module: str) -> bool:
        return module.split(".")[0] not in local_modules

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if is_foreign_module(alias.name):
                    foreign[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else \
                        alias.name.split(".")[0]
                    private = [p for p in alias.name.split(".") if _private(p)]
                    if private and alias.name not in registered_owners:
                        found.append(f"{path}:{node.lineno}: import of the private module {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and is_foreign_module(node.module):
            private_module = any(_private(p) for p in node.module.split("."))
            for alias in node.names:
                foreign[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                if node.module.startswith(OP_NAMESPACES):
                    op_namespaces.add(alias.asname or alias.name)
                if (private_module or _private(alias.name)) and \
                        f"{node.module}.{alias.name}" not in {e.name for e in REGISTRY}:
                    found.append(f"{path}:{node.lineno}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                _dotted(node.value.func) == "importlib.import_module" and node.value.args and \
                isinstance(node.value.args[0], ast.Constant) and is_foreign_module(node.value.args[0].value):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    foreign[target.id] = node.value.args[0].value
        elif isinstance(node, ast.Assign) and (_dotted(node.value) or "").startswith(OP_NAMESPACES):
            op_namespaces.update(target.id for target in node.targets if isinstance(target, ast.Name))

    def root(node):
        while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
            node = node.value if not isinstance(node, ast.Call) else node.func
        return node.id if isinstance(node, ast.Name) else None

    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            for sub in ast.walk(target):
                if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, (ast.Store, ast.Del)) and \
                        root(sub.value) in foreign:
                    found.append(f"{path}:{node.lineno}: {ast.unparse(sub)} = (patches {foreign[root(sub.value)]})")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
            name_arg = node.args[1] if len(node.args) > 1 else None
            if node.func.id in ("setattr", "delattr") and root(node.args[0]) in foreign:
                found.append(f"{path}:{node.lineno}: {node.func.id}({ast.unparse(node.args[0])}, ...)")
            if node.func.id in ("getattr", "hasattr", "setattr", "delattr") and isinstance(name_arg, ast.Constant) \
                    and isinstance(name_arg.value, str) and _private(name_arg.value) \
                    and name_arg.value not in own | registered:
                found.append(f"{path}:{node.lineno}: {node.func.id}(..., {name_arg.value!r})")
        if isinstance(node, ast.Attribute) and _private(node.attr):
            dotted = _dotted(node.value) or ""
            if dotted.split(".")[0] in op_namespaces or dotted.startswith(OP_NAMESPACES):
                if node.attr not in registered_ops:
                    found.append(f"{path}:{node.lineno}: the unregistered op {ast.unparse(node)}")
            elif node.attr not in own | registered | set(NAMEDTUPLE_API):
                found.append(f"{path}:{node.lineno}: .{node.attr} of {ast.unparse(node.value)}")
    return found


@functools.lru_cache(maxsize=1)
def _fastft_sources():
    """fastft's and bench's sources but the registry, the private names they define, and their own module names."""
    sources = [s for s in _sources() if s[0] != REGISTRY_FILE]
    local_modules = {"fastft", "kernels"} | {os.path.splitext(os.path.basename(p))[0] for p, _ in sources
                                              if p.startswith("bench")}
    return sources, _own_names(sources), local_modules


def _scan(sources=None) -> list[str]:
    fastft_sources, own, local_modules = _fastft_sources()
    return [found for path, text in (sources or fastft_sources) for found in bypasses(path, text, own, local_modules)]


def test_no_source_reaches_into_another_library_bypassing_the_registry():
    assert _scan() == []


@pytest.mark.parametrize("source", [
    "import torch\ntorch.is_autocast_enabled = lambda *args: False\n",
    "import torch\ntorch.UntypedStorage.resize_ = None\n",
    "import trl\nsetattr(trl.SFTTrainer, '__init__', None)\n",
    "from trl import SFTTrainer\nSFTTrainer._prepare_dataset = None\n",
    "import importlib\nadam = importlib.import_module('torch.optim.adam')\nadam.foo = None\n",
    "def f(config):\n    return config._unregistered_private\n",
    "def f(config):\n    return getattr(config, '_unregistered_private', None)\n",
    "from torch.utils._unregistered import helper\n",
    "from trl.trainer.utils import _unregistered\n",
    "import torch\naten = torch.ops.aten\naten._unregistered_op.default(1)\n",
    "import torch\ntorch.ops.aten._unregistered_op(1)\n",
    "import torch\ntorch.ops._private_namespace.op.default(1)\n",
    "from torch.ops import aten as ops\nops._unregistered_op.default(1)\n",
    "import torch\ntorch._assert_sync(1)\n",
])
def test_the_scan_catches_an_inserted_bypass(source):
    assert len(_scan([("inserted.py", source)])) == 1


def test_the_scan_passes_public_ops_registered_ops_and_namedtuple_methods():
    source = ("import collections\nimport torch\naten = torch.ops.aten\n"
              "ops = (aten.copy_.default, aten._to_copy.default, torch.ops.aten._grouped_mm.default)\n"
              "torch._assert_async(torch.ones(()), 'message')\n"
              "point = collections.namedtuple('Point', 'x y')(1, 2)\n"
              "point = point._replace(x=3)._asdict(), point._fields, type(point)._make((1, 2))\n")
    assert _scan([("inserted.py", source)]) == []
