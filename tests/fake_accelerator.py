"""A fake accelerator for tests: code that mixes host and accelerator tensors fails on this
CPU-only machine where real CUDA would raise "Expected all tensors to be on the same device".

Why: on CPU every tensor is on one device, so a basis kept in host memory and subtracted from a
weight that lives on the GPU goes unnoticed until the first GPU run. Inside :func:`fake_device`
the device :data:`DEVICE` (``meta:0``) acts as an accelerator. Tensors that go there become
:class:`FakeTensor`\\ s: wrappers that say they are on ``meta:0``, hold a real CPU tensor
(``elem``) and run every op on it. They get there through ``.to(DEVICE)``, ``nn.Module.to``,
``device=DEVICE`` factories and Lightning's batch transfer on :func:`fake_trainer`.

Allowed, as on CUDA:
- mixing in 0-dim CPU tensors;
- indexing with host index or mask tensors (``x[idx]``, ``x[mask]``, ``x[idx] = v``);
- ``copy_`` across devices (``dev[:] = cpu``, ``cpu.copy_(dev)``);
- ``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``;
- ``.cpu()`` / ``.to("cpu")``, which give plain tensors;
- autograd, through transfers too, and ``torch.linalg``;
- ``torch.save`` and Lightning checkpoints, which write the host tensor, as
  ``map_location="cpu"`` would load it.

Refused with CUDA's message (as :class:`DeviceMismatch`, a RuntimeError): any other op whose
arguments include a CPU tensor of dim > 0 (``matmul``, ``add``, ``cat``, ``index_select``,
``embedding``…) or a real meta tensor.

Use: the ``fake_device`` and ``fake_trainer`` fixtures of ``conftest.py``, or
``with fake_device(): …`` and :func:`fake_trainer` (also a ``make_trainer`` factory for the
training stages).

Why ``meta``: it is a real device type whose device guard does nothing, so the autograd engine
runs on it without a C++ backend (a ``privateuseone`` device aborts in autograd). The index 0
keeps it apart from real meta tensors. ``with torch.device("meta")`` (transformers' empty init,
``sieve_pl.models.hf.layout``) still builds real meta tensors without storage. Mixing one of
those with a fake-device tensor raises too. Inside :func:`fake_device`, transformers' hub-kernel
swap (on by default in ``from_pretrained``, redone by ``model.train()``) reads the device as
``cpu``, because the kernels library refuses ``meta``.

Limits:
- ``torch.cuda.is_available()`` stays False, so code that branches on CUDA (memory stats) takes
  its CPU branch;
- ``param.data = t`` across devices raises "incompatible tensor type", where CUDA would move the
  parameter (``nn.Module.to`` swaps tensors instead inside :func:`fake_device`);
- ``.numpy()`` raises (as on CUDA), but ``data_ptr()`` is 0 and the storage is a data-less meta
  one; libraries that treat ``meta`` as "not loaded" take that branch (safetensors skips its
  shared-memory check, transformers' ``save_pretrained`` ties weights by parameter identity);
- a device of type ``meta`` built without the index (``torch.device(x.device.type)``) makes real
  meta tensors. That is an artefact of this harness: on CUDA it is the current GPU;
- ``torch.compile``, bitsandbytes' kernels and other ops that read data pointers or need a
  device backend are not supported;
- every op pays a Python dispatch (roughly 40 µs), fine for tiny models.
"""
from __future__ import annotations

import contextlib
from typing import Any

import lightning as L
import torch
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta", 0)
"""The fake accelerator; ``trainer.strategy.root_device`` of :func:`fake_trainer`."""

_CPU = torch.device("cpu")
aten = torch.ops.aten
# the argument that holds index tensors, which may stay on the host (as CUDA allows x[cpu_idx])
_INDEX_OPS = {aten.index.Tensor: 1, aten.index_put.default: 1, aten.index_put_.default: 1,
              aten._index_put_impl_.default: 1, aten._unsafe_index.Tensor: 1,
              aten._unsafe_index_put.default: 1}
_COPY_OPS = {aten.copy_.default, aten.copy.default, aten._to_copy.default,
             aten._copy_from.default, aten._copy_from_and_resize.default}


def _is_fake(device) -> bool:
    return device is not None and torch.device(device) == DEVICE


class FakeTensor(torch.Tensor):
    """A tensor on the fake accelerator: reports :data:`DEVICE`, holds a CPU tensor ``elem``."""

    elem: torch.Tensor
    __torch_function__ = torch._C._disabled_torch_function_impl  # the modes still see calls

    @staticmethod
    def __new__(cls, elem: torch.Tensor, requires_grad: bool = False):
        return torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, layout=elem.layout, device=DEVICE, requires_grad=requires_grad)

    def __init__(self, elem: torch.Tensor, requires_grad: bool = False):
        self.elem = elem

    def __repr__(self, **kwargs) -> str:
        return f"FakeTensor({self.elem!r}, device='{DEVICE}')"

    def __reduce_ex__(self, protocol):
        """Pickled (``torch.save``, Lightning checkpoints) as the host tensor it holds."""
        return self.elem.detach().__reduce_ex__(protocol)

    def tolist(self):
        return self.elem.tolist()

    def __format__(self, spec: str) -> str:  # f"{loss:.3f}" (torch formats no meta tensor)
        return self.elem.__format__(spec)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._has_compatible_shallow_copy_type.default:
            # nn.Module.to asks before replacing a parameter's data: a host and a device
            # tensor are not compatible (CUDA answers False, and a new Parameter is made)
            return all(isinstance(t, FakeTensor) for t in args)
        if func not in _COPY_OPS:
            index = _INDEX_OPS.get(func)
            for i, arg in enumerate(args):
                if i != index:
                    for t in (tree_flatten(arg)[0] if isinstance(arg, (list, tuple)) else (arg,)):
                        _check(t, func)
            for t in tree_flatten(kwargs)[0]:
                _check(t, func)
        return _run(func, args, kwargs)


class DeviceMismatch(RuntimeError):
    """What the fake accelerator raises where CUDA would: a RuntimeError with CUDA's message."""


def _check(t: Any, func) -> None:
    if (isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor)
            and (t.dim() > 0 or t.device.type != "cpu")):
        raise DeviceMismatch(f"Expected all tensors to be on the same device, but found at least "
                           f"two devices, {DEVICE} and {t.device}! (fake accelerator: {func})")


def _wrap(t: torch.Tensor, requires_grad: bool = False) -> FakeTensor:
    if torch.is_inference_mode_enabled():
        # a wrapper made here would be an inference tensor, but a view of a normal tensor may
        # not be one (autograd sets its version counter): the wrapper is normal, its data not
        with torch.inference_mode(False):
            return FakeTensor(t, requires_grad)
    return FakeTensor(t, requires_grad)


def _run(func, args, kwargs):
    """``func`` on the host tensors of the arguments (``DEVICE`` read as the CPU); its new
    tensors wrapped, unless the op names another device (``.cpu()``, ``empty(…, device=cpu)``)."""
    seen, targets = {}, []

    def unwrap(x):
        if isinstance(x, FakeTensor):
            seen[id(x.elem)] = x
            return x.elem
        if isinstance(x, torch.Tensor):
            seen[id(x)] = x
        elif isinstance(x, torch.device):
            targets.append(x)
            return _CPU if x == DEVICE else x
        return x

    out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
    wrap = not targets or targets[0] == DEVICE

    def rewrap(t):
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) in seen:  # in-place and out= ops return their argument
            if isinstance(seen[id(t)], FakeTensor) or not (targets and wrap):
                return seen[id(t)]
            t = t.clone()  # host.to(DEVICE), run as host.to("cpu"), a no-op: copy, as CUDA
        return _wrap(t) if wrap and t.device.type == "cpu" else t
    return tree_map(rewrap, out)


class FakeDeviceMode(TorchDispatchMode):
    """Ops that make a tensor on :data:`DEVICE` from host tensors or from nothing give a
    FakeTensor: ``_to_copy`` of a host tensor, factories, and the scalars C++ makes on the
    target's device (``x[i] = 1.0``, ``torch.where(c, x, 0.)``). Ops on FakeTensors go on to
    ``FakeTensor.__torch_dispatch__``."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (kwargs.get("device") == DEVICE
                or any(type(x) is torch.device and x == DEVICE for x in args)) and not any(
                isinstance(x, FakeTensor) for x in tree_flatten((args, kwargs))[0]):
            return _run(func, args, kwargs)
        return func(*args, **kwargs)


class FakeFactoryMode(TorchFunctionMode):
    """``device=DEVICE`` in Python calls: ``torch.tensor(data, device=…)`` builds its tensor
    where dispatch modes do not see it (as a data-less meta tensor), so it is built on the host
    here and wrapped."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to or not _is_fake(kwargs.get("device")):
            return func(*args, **kwargs)
        out = func(*args, **{**kwargs, "device": _CPU})
        return tree_map(lambda t: _wrap(t.detach(), t.requires_grad)
                        if isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor)
                        else t, out)


@contextlib.contextmanager
def _kernels_on_cpu():
    """transformers' hub-kernel swap asks for the model's device type, and the kernels library
    refuses ``meta``: it is told ``cpu`` (what the plain CPU tests run)."""
    try:
        from transformers.integrations import hub_kernels
    except ImportError:
        yield
        return
    original = hub_kernels.get_device_type
    hub_kernels.get_device_type = lambda device=None: (
        "cpu" if device is not None and _is_fake(device) else original(device))
    try:
        yield
    finally:
        hub_kernels.get_device_type = original


@contextlib.contextmanager
def fake_device():
    """The fake accelerator works inside the block; yields :data:`DEVICE`.

    ``nn.Module.to`` swaps each parameter's contents in place (``swap_tensors``), as CUDA's
    ``param.data = moved`` keeps the Parameter objects: tied weights stay tied both ways."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with _kernels_on_cpu(), FakeFactoryMode(), FakeDeviceMode():
            yield DEVICE
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


@contextlib.contextmanager
def paused():
    """Plain CPU semantics inside the block (device tensors made before still are FakeTensors)."""
    from torch.overrides import _get_current_function_mode_stack
    from torch.overrides import _pop_mode as pop_function, _push_mode as push_function
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    from torch.utils._python_dispatch import _pop_mode as pop_dispatch, _push_mode as push_dispatch

    popped = []
    while any(isinstance(m, FakeDeviceMode) for m in _get_current_dispatch_mode_stack()):
        popped.append((push_dispatch, pop_dispatch()))
    while any(isinstance(m, FakeFactoryMode) for m in _get_current_function_mode_stack()):
        popped.append((push_function, pop_function()))
    try:
        yield
    finally:
        for push, mode in reversed(popped):
            push(mode)


class FakeAccelerator(Accelerator):
    """A Lightning accelerator whose one device is :data:`DEVICE`."""

    def setup_device(self, device: torch.device) -> None:
        if not _is_fake(device):
            raise RuntimeError(f"FakeAccelerator: {device} is not {DEVICE}")

    def get_device_stats(self, device) -> dict[str, Any]:
        return {}

    def teardown(self) -> None:
        pass

    @staticmethod
    def parse_devices(devices: Any) -> int:
        return 1

    @staticmethod
    def get_parallel_devices(devices: Any) -> list[torch.device]:
        return [DEVICE]

    @staticmethod
    def auto_device_count() -> int:
        return 1

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def name() -> str:
        return "fake"


def fake_trainer(**kwargs) -> L.Trainer:
    """A Trainer on the fake accelerator (use it inside :func:`fake_device`), without logger,
    progress bar, model summary or checkpoints unless ``kwargs`` say otherwise.

    Lightning moves the module and every batch to :data:`DEVICE`, and the module back to the
    CPU at the end of each ``fit`` / ``validate`` / ``predict``, as on a GPU.
    """
    defaults = dict(logger=False, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False)
    strategy = SingleDeviceStrategy(device=DEVICE, accelerator=FakeAccelerator())
    return L.Trainer(strategy=strategy, **{**defaults, **kwargs})
