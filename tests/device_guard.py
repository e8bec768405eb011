"""A virtual accelerator for CPU tests: catches tensors made explicitly on the CPU (or from numpy) in device code.

The `meta` default-device guard (test_device.py) sees tensors created *without* a device. It cannot see
`torch.zeros(n, device="cpu")`, `torch.from_numpy(a)` or `torch.tensor([...])` next to a model that also sits
on the CPU. Here the model and the batch live on a second, virtual device:

- `VirtualAccelerator.device` (shown as `cpu:1`) is what code sees as `x.device` of a tensor on it; storage is
  really the CPU, so every op computes real values;
- a factory or `.to()` given that device makes a tensor on it; whatever an op computes from tensors on it is
  on it too (gradients and optimizer state included);
- an op that mixes a tensor on it with a CPU tensor of one element or more raises, as CUDA does. 0-d CPU
  tensors may mix, as they may with CUDA tensors.

A TorchFunctionMode, so it sees every torch call: functions, methods and the `device`/`grad`/`data`
properties. Autograd's own backward kernels are not torch calls, so inside a custom Function's backward
only what the Python code does is checked.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

VIRTUAL = torch.device("cpu", 1)  # what code sees as the device: a CPU type (autocast, generators), another index
_TAG = "_on_virtual_accelerator"
_FACTORY_KW = "device"


def on_virtual(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _TAG, False)


def _tag(out):
    def mark(x):
        if isinstance(x, torch.Tensor):
            try:
                setattr(x, _TAG, True)
            except (AttributeError, RuntimeError):
                pass
        return x
    return tree_map(mark, out)


def _is_virtual(device) -> bool:
    if device is None:
        return False
    try:
        return torch.device(device) == VIRTUAL
    except (RuntimeError, TypeError):
        return False


def _property(func) -> tuple[str, str] | None:
    """('device', '__get__') for the getter of Tensor.device, and so on; None for other functions."""
    owner = getattr(func, "__self__", None)
    if getattr(owner, "__objclass__", None) is torch._C.TensorBase and func.__name__ in ("__get__", "__set__"):
        return owner.__name__, func.__name__
    return None


# calls CUDA allows across devices: a copy between host and device, and type checks
CROSS_DEVICE = {"copy_", "_has_compatible_shallow_copy_type", "is_same_size", "set_"}


class VirtualAccelerator(TorchFunctionMode):
    device = VIRTUAL

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        prop = _property(func)
        if prop == ("device", "__get__"):
            return VIRTUAL if on_virtual(args[0]) else func(*args)
        if prop in (("is_cuda", "__get__"), ("is_meta", "__get__")):
            return False if on_virtual(args[0]) else func(*args)
        if prop in (("data", "__set__"), ("grad", "__set__")):
            out = func(*args, **kwargs)
            if on_virtual(args[1]):
                _tag(args[0])
            return out
        if prop in (("grad", "__get__"), ("data", "__get__")):
            out = func(*args)
            return _tag(out) if on_virtual(args[0]) and out is not None else out
        if prop is not None:  # .T, .mT, .real, ...: a view on the same device
            out = func(*args, **kwargs)
            return _tag(out) if prop[1] == "__get__" and on_virtual(args[0]) else out
        to_virtual = _is_virtual(kwargs.get(_FACTORY_KW))
        if to_virtual:
            kwargs[_FACTORY_KW] = "cpu"
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu):
            return self._moved(func, args, kwargs, to_virtual)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        virtual = [t for t in tensors if on_virtual(t)]
        host = [t for t in tensors if not on_virtual(t) and t.dim() > 0 and t.device.type == "cpu"]
        if virtual and host and getattr(func, "__name__", "") not in CROSS_DEVICE:
            raise RuntimeError(
                f"{getattr(func, '__name__', func)} mixes tensors on the worker's device with a CPU tensor of shape "
                f"{tuple(host[0].shape)}: it was created with device='cpu', from numpy or from a Python list, "
                "where the device of the step's tensors was needed")
        out = func(*args, **kwargs)
        return _tag(out) if virtual or to_virtual else out

    def _moved(self, func, args, kwargs, to_virtual):
        target = [a for a in args[1:] if isinstance(a, (str, torch.device))]
        if func is torch.Tensor.cuda or (target and _is_virtual(target[0])):
            to_virtual = True
            args = (args[0],) + tuple("cpu" if isinstance(a, (str, torch.device)) else a for a in args[1:])
        if func is torch.Tensor.cuda:
            func, args = torch.Tensor.to, (args[0], "cpu")
        moving_to_host = func is torch.Tensor.cpu or (target and not _is_virtual(target[0])) \
            or (_FACTORY_KW in kwargs and not to_virtual)
        out = func(*args, **kwargs)
        if to_virtual or (on_virtual(args[0]) and not moving_to_host):
            if out is args[0] and not on_virtual(out):
                out = out.clone()
            return _tag(out)
        if moving_to_host and out is args[0]:
            out = out.clone()  # a host copy, untagged (the original stays on the device)
            setattr(out, _TAG, False)
        return out


def to_virtual(module_or_tensor):
    """Put a module's parameters and buffers (or a tensor) on the virtual device, in place for modules."""
    if isinstance(module_or_tensor, torch.Tensor):
        return _tag(module_or_tensor.clone())
    for t in list(module_or_tensor.parameters()) + list(module_or_tensor.buffers()):
        _tag(t)
    return module_or_tensor
