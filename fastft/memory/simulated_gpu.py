"""A GPU simulated on the CPU for memory accounting: meta tensors stand for GPU tensors.

What ``torch.cuda.max_memory_allocated`` counts is the bytes of live tensor storages. That needs no
arithmetic: run the training step with every large tensor on the ``meta`` device (shapes, dtypes,
strides and aliasing, no data) and count the bytes of the storages created and freed on the way.
:class:`SimulatedGPU` is a ``TorchDispatchMode`` that does three things for every ATen op:

* **counts** each new meta storage's bytes when it is created and uncounts them when the storage dies
  (a ``weakref.finalize`` on the storage), keeping the current and the peak total, and where the peak
  happened (a phase label set by the caller, and the op);
* **keeps the values of small integer tensors**: a step needs some data, not only shapes (padding masks
  become sequence boundaries, ``max_seqlen`` is read with ``int()``, labels are range-checked). A meta
  storage created by an op whose tensor inputs all have known values, and whose integer or boolean
  output is small (``value_limit`` elements), gets a real CPU copy of its contents, computed by running
  the same op on the CPU values (floating-point data, the step's activations, is never computed).
  Views and in-place writes follow the storage, so aliasing is exact (a ``copy_`` of known values over a
  whole storage makes it known); ``x[mask]`` with a known mask selects known rows. An op that needs the
  values of a tensor whose values are unknown (a data-dependent shape, ``.item()``) raises
  :class:`UnknownValueError` naming the op;
* **models the host side**: ``.cpu()`` / ``.to("cpu")`` / ``copy_`` of a meta tensor without values
  (offloaded activations) gives a real CPU tensor whose pages are never written (``torch.empty`` of a
  large size costs address space, not memory), remembered as "values unknown", and pinned-memory
  requests are honoured without a CUDA runtime. Copying such a tensor back gives a new counted meta
  storage, as the host-to-device copy does on a GPU. ``torch.tensor(data, device="meta")`` (which no
  ATen op a dispatch mode sees creates) is built on the CPU and copied, so its values are known.

:func:`simulated_gpu` enters the mode together with the rest of the simulation: fastft's kernels take
their GPU path for meta tensors (``fastft.kernels._common.gpu_simulation``) and every Triton launch
is a no-op (outputs are allocated by the wrappers, which is what is counted).

What is NOT counted, here as in ``max_memory_allocated``-based figures generally: the CUDA context,
library workspaces allocated outside PyTorch's allocator, and the caching allocator's rounding and
fragmentation (``max_memory_reserved`` - ``max_memory_allocated``). Workspaces that CUDA kernels
allocate through PyTorch's allocator internally (invisible to a dispatch mode) are added per op by
the caller's ``op_workspace`` hook (``fastft.memory.cuda_paths.cuda_op_workspace``).
"""
from __future__ import annotations

import contextlib
import functools
import weakref

import torch
from torch.overrides import TorchFunctionMode

from .. import reach_ins

TorchDispatchMode = reach_ins.get(reach_ins.TORCH_DISPATCH_MODE)
tree_flatten, tree_map = reach_ins.get(reach_ins.TREE_FLATTEN), reach_ins.get(reach_ins.TREE_MAP)

aten = torch.ops.aten

_TO_COPY, _LOCAL_SCALAR_DENSE = reach_ins.get(reach_ins.ATEN_TO_COPY), reach_ins.get(reach_ins.ATEN_LOCAL_SCALAR_DENSE)
# Ops that create host-side (CPU) copies of their input: offloading, .cpu(), pinning.
_COPY_OPS = (_TO_COPY, aten.copy_.default)
_PIN_OPS = (reach_ins.get(reach_ins.ATEN_PIN_MEMORY), aten.pin_memory.default)
_INDEX_OPS = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
              reach_ins.get(reach_ins.ATEN_INDEX_PUT_IMPL))


class UnknownValueError(RuntimeError):
    """The accounted step needed the values of a tensor the simulation only knows the shape of."""


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _held(t: torch.Tensor) -> list[torch.Tensor]:
    """The tensors whose storages hold ``t``'s data. A wrapper subclass (FSDP's DTensor, a collective's
    AsyncCollectiveTensor) has a storage of its full size that holds nothing: its inner tensors hold the data."""
    if type(t) is torch.Tensor or not hasattr(t, "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    inner = [getattr(t, name) for name in names]
    return [held for x in inner if isinstance(x, torch.Tensor) for held in _held(x)]


def _is_meta(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "meta"


def _mutated_args(func, args, kwargs) -> list[torch.Tensor]:
    """The tensor arguments ``func`` writes to (in-place and ``out=`` ops)."""
    mutated = []
    schema = func._schema
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        mutated += _tensors(value)
    return mutated


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages on one device type, as ``max_memory_allocated`` does.

    ``live`` / ``peak``: bytes now / at most since the last :meth:`reset_peak`. ``peak_phase`` /
    ``peak_op``: where the peak happened. ``phase``: a label the caller sets (e.g. "forward").
    ``op_workspace(func, args, kwargs, out) -> int``: bytes an op allocates internally for its duration.
    ``overrides``: ``{op: python function}`` run instead of the op, with the mode active, so that what the
    function allocates is counted (the CUDA implementation of an op whose CPU/meta one differs).

    A storage resized in place (``UntypedStorage.resize_``, no ATen op a dispatch mode sees) is recounted at
    its new size: FSDP2 frees a gathered parameter by resizing its storage to 0 and allocates it again by
    resizing it back, which on a GPU frees and allocates memory.
    """

    def __init__(self, device_type: str = "cpu", op_workspace=None, overrides=None, explain_peak: bool = False):
        super().__init__()
        for entry in (reach_ins.STORAGE_CDATA, reach_ins.OP_SCHEMA):  # read by name below
            reach_ins.check(entry)
        self.device_type = device_type
        # explain_peak: keep what each live storage is (op, shape, phase) and a list of them at the peak
        self.explain_peak = explain_peak
        self._origins: dict[int, tuple] = {}
        self.peak_storages: list[tuple] = []
        self.op_workspace = op_workspace
        self.overrides = dict(overrides or {})
        self.live = 0
        self.peak = 0
        self.phase = ""
        self.peak_phase = self.peak_op = None
        self._counted: dict[int, int] = {}  # storage key -> bytes

    def reset_peak(self) -> None:
        self.peak, self.peak_phase, self.peak_op = self.live, self.phase, None

    def __enter__(self):
        _ResizeWatch.trackers.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ResizeWatch.trackers.remove(self)  # the innermost entry of this tracker: nesting re-enters it
        return super().__exit__(*exc)

    def _resized(self, storage) -> None:
        """``storage`` was resized in place: count it at its new size."""
        if storage.device.type != self.device_type:
            return
        key, nbytes = storage._cdata, storage.nbytes()
        if key not in self._counted:  # made before tracking began (or empty): from now on it is counted
            self._counted[key] = 0
            weakref.finalize(storage, self._forget, key)
        self.live += nbytes - self._counted[key]
        self._counted[key] = nbytes
        if self.explain_peak:
            self._origins[key] = (self.phase, "UntypedStorage.resize_", (nbytes,), "uint8")
        self._raise_peak(self.live, "UntypedStorage.resize_")

    def _raise_peak(self, nbytes: int, op) -> None:
        if nbytes > self.peak:
            self.peak, self.peak_phase, self.peak_op = nbytes, self.phase, str(op)
            if self.explain_peak:
                counted, origins = self._counted.copy(), self._origins.copy()  # finalizers may run meanwhile
                self.peak_storages = [(size, *origins.get(key, ())) for key, size in counted.items()]

    def _count(self, t: torch.Tensor, op) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._counted:
            return
        nbytes = storage.nbytes()
        self._counted[key] = nbytes
        if self.explain_peak:
            self._origins[key] = (self.phase, str(op), tuple(t.shape), str(t.dtype).replace("torch.", ""))
        self.live += nbytes
        self._raise_peak(self.live, op)
        weakref.finalize(storage, self._forget, key)

    def _forget(self, key: int) -> None:
        self.live -= self._counted.pop(key, 0)
        self._origins.pop(key, None)

    def storage_bytes(self, tensors) -> int:
        """Bytes of the distinct counted storages behind ``tensors``."""
        tensors = [inner for t in tensors if isinstance(t, torch.Tensor) for inner in _held(t)]
        keys = {_storage_key(t) for t in tensors if t.device.type == self.device_type}
        return sum(self._counted.get(k, 0) for k in keys)

    def _after(self, func, args, kwargs, out) -> None:
        for t in (inner for t in _tensors(out) for inner in _held(t)):
            if t.device.type == self.device_type:
                self._count(t, func)
        if self.op_workspace is not None:
            self._raise_peak(self.live + self.op_workspace(func, args, kwargs, out), func)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.overrides:
            with self:
                return self.overrides[func](*args, **kwargs)
        out = func(*args, **kwargs)
        self._after(func, args, kwargs, out)
        return out


class _ResizeWatch:
    """``torch.UntypedStorage.resize_`` reporting to the trackers entered (installed while any is)."""

    trackers: list = []
    _original = None

    @classmethod
    def resize_(cls, storage, size):
        out = cls._original(storage, size)
        for tracker in dict.fromkeys(cls.trackers):  # a tracker entered twice (nested) counts once
            tracker._resized(storage)
        return out


class _WatchedTrackers(list):
    """The trackers entered; the patch of ``resize_`` is in place while the list is not empty."""

    restore = None

    def append(self, tracker):
        if not self:
            _ResizeWatch._original = reach_ins.get(reach_ins.STORAGE_RESIZE)
            self.restore = reach_ins.install(reach_ins.STORAGE_RESIZE,
                                             lambda storage, size: _ResizeWatch.resize_(storage, size))
        super().append(tracker)

    def remove(self, tracker):
        super().remove(tracker)
        if not self:
            self.restore()


_ResizeWatch.trackers = _WatchedTrackers()


class SimulatedGPU(LiveTensorBytes):
    """Counts live meta-tensor bytes and keeps the values of small tensors (see the module doc)."""

    def __init__(self, value_limit: int = 1 << 24, op_workspace=None, overrides=None, explain_peak: bool = False):
        super().__init__("meta", op_workspace, overrides, explain_peak)
        self.value_limit = value_limit
        self._values: dict[int, torch.Tensor] = {}  # storage key -> real CPU bytes (uint8) of the storage
        self._unknown_host: set[int] = set()  # CPU storages that hold "copies" of unknown meta data

    def _watch_host(self, t: torch.Tensor) -> None:
        """Remember that the CPU tensor ``t`` holds unknown values (until its storage dies)."""
        storage = t.untyped_storage()
        if storage._cdata not in self._unknown_host:
            self._unknown_host.add(storage._cdata)
            weakref.finalize(storage, self._unknown_host.discard, storage._cdata)

    # ------------------------------------------------------------------ values
    def has_value(self, t: torch.Tensor) -> bool:
        if t.device.type == "meta":
            return _storage_key(t) in self._values
        return _storage_key(t) not in self._unknown_host if t.device.type == "cpu" else False

    def value(self, t: torch.Tensor) -> torch.Tensor:
        """The real CPU contents of ``t`` (a view of the recorded storage for a meta tensor)."""
        if t.device.type != "meta":
            return t
        raw = self._values[_storage_key(t)]
        return raw.view(t.dtype).as_strided(t.shape, t.stride(), t.storage_offset())

    def _record(self, meta: torch.Tensor, real: torch.Tensor) -> None:
        storage = meta.untyped_storage()
        key = storage._cdata
        if key not in self._values:
            self._values[key] = torch.zeros(storage.nbytes(), dtype=torch.uint8)
            weakref.finalize(storage, self._values.pop, key, None)  # a dead storage's key may be reused
        view = self.value(meta)
        if view.data_ptr() != real.data_ptr():  # an in-place op already wrote through the view
            view.copy_(real)

    def _forget_values(self, tensors) -> None:
        for t in tensors:
            if t.device.type == "meta":
                self._values.pop(_storage_key(t), None)
            elif t.device.type == "cpu":
                self._watch_host(t)

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.overrides:
            with self:
                return self.overrides[func](*args, **kwargs)
        inputs = _tensors((args, kwargs))
        if func in _PIN_OPS:  # no CUDA runtime to pin with: a plain host copy with the same value status
            out = torch.empty_like(inputs[0])
            if self.has_value(inputs[0]):
                return out.copy_(inputs[0])
            self._watch_host(out)
            return out
        if func is aten.is_pinned.default:
            return True
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        if func in _COPY_OPS and self._copies_to_host(func, args, kwargs):
            return self._copy_to_host(func, args, kwargs)
        if not any(_is_meta(t) for t in inputs) and kwargs.get("device") != torch.device("meta"):
            return self._host_op(func, args, kwargs, inputs)
        if func in _INDEX_OPS:
            args = self._masks_as_indices(args)
            inputs = _tensors((args, kwargs))
        if func is aten.copy_.default and self._overwrites_storage(args[0]) and self.has_value(args[1]):
            self._record(args[0], torch.zeros(args[0].shape, dtype=args[0].dtype))  # its old values do not matter

        # Only the message of a failed meta op is kept: a live exception would hold this frame, and with it
        # the op's tensors, in a reference cycle until the next garbage collection (a GPU run has none).
        try:
            out, error = func(*args, **kwargs), None
        except Exception as exc:  # noqa: BLE001 - e.g. a data-dependent shape: the values may tell it
            out, error = None, f"{type(exc).__name__}: {exc}"
        real_out = None
        if all(self.has_value(t) for t in inputs) and (out is None or self._keeps_values(out)):
            real_out = self._run_on_values(func, args, kwargs)
        if func is _LOCAL_SCALAR_DENSE and real_out is not None:
            return real_out
        if real_out is not None and not self._keeps_values(real_out):  # e.g. a data-dependent float op
            real_out = None
        if error is not None:
            if real_out is None:
                unknown = [tuple(t.shape) for t in inputs if not self.has_value(t)]
                raise UnknownValueError(f"{func} needs the values of tensors of shape {unknown}, which the memory "
                                        f"accounting only knows the shape of ({error})")
            out = tree_map(lambda r: torch.empty_strided(r.shape, r.stride(), dtype=r.dtype, device="meta")
                           if isinstance(r, torch.Tensor) else r, real_out)
        self._after(func, args, kwargs, out)
        if real_out is not None:
            for meta, real in zip(_tensors(out), _tensors(real_out)):
                if meta.device.type == "meta":
                    self._record(meta, real)
        else:
            self._forget_values(_mutated_args(func, args, kwargs))
        return out

    @staticmethod
    def _overwrites_storage(dst: torch.Tensor) -> bool:
        """Whether writing all of ``dst`` writes all of its (meta) storage."""
        return (_is_meta(dst) and dst.is_contiguous()
                and dst.numel() * dst.element_size() == dst.untyped_storage().nbytes())

    def _masks_as_indices(self, args):
        """``x[mask]`` with a boolean mask of known values: the integer indices it selects (what CUDA's
        indexing computes internally), so the result's shape is known without knowing ``x``."""
        indices = []
        for index in args[1]:
            if index is not None and index.dtype in (torch.bool, torch.uint8) and self.has_value(index):
                for column in self.value(index).nonzero().unbind(1):
                    meta = torch.empty(column.shape, dtype=column.dtype, device="meta")
                    self._record(meta, column)
                    indices.append(meta)
            else:
                indices.append(index)
        return (args[0], indices, *args[2:])

    def _keeps_values(self, out) -> bool:
        """Values are kept for small integer and boolean results: indices, lengths, masks, labels. Floating
        point data (activations, weights) is what the step computes, never what steers it."""
        outputs = _tensors(out)
        return (all(not t.is_floating_point() for t in outputs)
                and sum(t.numel() for t in outputs) <= self.value_limit)

    def _run_on_values(self, func, args, kwargs):
        """``func`` run on the CPU values of its (meta) inputs."""

        def real(x):
            if isinstance(x, torch.Tensor):
                return self.value(x)
            if isinstance(x, torch.device) and x.type == "meta":
                return torch.device("cpu")
            return x

        real_args, real_kwargs = tree_map(real, (args, kwargs))
        try:
            return func(*real_args, **real_kwargs)
        except NotImplementedError:  # an op with no CPU kernel (e.g. a CUDA attention backend)
            pass
        return None

    @staticmethod
    def _copies_to_host(func, args, kwargs) -> bool:
        if func is _TO_COPY:
            device = kwargs.get("device")
            return _is_meta(args[0]) and device is not None and torch.device(device).type == "cpu"
        return args[0].device.type == "cpu" and _is_meta(args[1])

    def _copy_to_host(self, func, args, kwargs):
        """A device-to-host copy: the values when known, else a host buffer that is never written."""
        if func is _TO_COPY:
            src = args[0]
            out = torch.empty(src.shape, dtype=kwargs.get("dtype") or src.dtype)
        else:
            out, src = args[0], args[1]
        if self.has_value(src):
            out.copy_(self.value(src))
        else:
            self._watch_host(out)
        return out

    def _host_op(self, func, args, kwargs, inputs):
        """A CPU-only op. Its results are unknown when an input is an unknown host copy."""
        out = func(*args, **kwargs)
        if not all(self.has_value(t) for t in inputs):
            self._forget_values(_mutated_args(func, args, kwargs) + _tensors(out))
        return out


class _ValuedMetaConstants(TorchFunctionMode):
    """``torch.tensor(data, device="meta")`` builds its tensor without an ATen op a dispatch mode could see:
    build it on the CPU and copy it over instead, so the simulated GPU knows its values."""

    _FACTORIES = (torch.tensor, torch.as_tensor, torch.asarray)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func in self._FACTORIES and device is not None and torch.device(device).type == "meta":
            return func(*args, **{**kwargs, "device": "cpu"}).to("meta")
        return func(*args, **kwargs)


_TRITON_LAUNCHERS = (reach_ins.TRITON_JIT_RUN, reach_ins.TRITON_INTERPRETED_RUN)  # compiled, interpreted


def _autocast_off_on_meta(autocast, device_type, *args, **kwargs):
    if device_type == "meta" and kwargs.get("enabled", args[1] if len(args) > 1 else True) is False:
        return contextlib.nullcontext()
    return autocast(device_type, *args, **kwargs)


@contextlib.contextmanager
def simulated_gpu(sm_count: int = 132, value_limit: int = 1 << 24, op_workspace=None, overrides=None,
                  explain_peak: bool = False):
    """Enter :class:`SimulatedGPU` with fastft's kernels on their GPU path for meta tensors and every
    Triton launch stubbed out. Yields the mode (``.live``, ``.peak``, ``.phase``, ...)."""
    from ..kernels import _common

    is_autocast_enabled = reach_ins.get(reach_ins.IS_AUTOCAST_ENABLED)
    autocast = reach_ins.get(reach_ins.AUTOCAST)
    mode = SimulatedGPU(value_limit=value_limit, op_workspace=op_workspace, overrides=overrides,
                        explain_peak=explain_peak)
    # the wrappers' allocations are what is counted
    launches = [(entry, lambda self, *args, **kwargs: None) for entry in _TRITON_LAUNCHERS]
    with reach_ins.patched(
            *launches,
            # fused AdamW (the Trainer's default) accepts meta parameters as it does CUDA ones
            (reach_ins.ADAM_FUSED_CHECK, lambda p, cuda_unsupported=False: None),
            # autocast has no meta device: asked about it (as TRL's kernel asks about its tensors' device), it is off
            (reach_ins.IS_AUTOCAST_ENABLED, lambda *args: (False if args and args[0] == "meta"
                                                           else is_autocast_enabled(*args))),
            # ... and turning it off there (peft's expert LoRA folds its weights under autocast(enabled=False))
            # changes nothing
            (reach_ins.AUTOCAST, functools.partial(_autocast_off_on_meta, autocast))), \
            _common.gpu_simulation("meta", sm_count=sm_count), _ValuedMetaConstants(), mode:
        yield mode
