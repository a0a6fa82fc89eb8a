"""HostDataWatch: what in a piece of code would, on a GPU, copy host data to the device or wait for it.

Not a test module itself (pytest collects test_*.py only); tests/test_device_step.py uses it.

On this CPU every tensor lives on the host, so the watch cannot see device transfers; it keeps the
split itself. A tensor made from Python or NumPy data (``aten.lift_fresh``: what ``torch.tensor``,
``torch.as_tensor`` and ``torch.from_numpy`` dispatch), or computed from such tensors alone, counts
as a *host* tensor; every other one (the inputs, parameters and buffers, what factories such as
``zeros`` or ``randn`` make on the device) counts as a *device* tensor. Recorded:

* an op where a host tensor meets a device tensor: on a GPU, a blocking copy of the host value;
* ``.item()``, ``float()``, ``bool()`` of a device tensor: on a GPU, a wait for all queued work;
* a blocking copy from the CPU to another device, and a random draw from a generator on another
  device than its result. Neither can happen when everything is on the CPU: these two are for a run
  of the same test on a GPU.

``Tensor.tolist()`` does not dispatch an op and is not seen. The host arithmetic of a host tensor
(``int(torch.tensor(2.0) ** 2)``) is not recorded: it never touches the device.
"""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
LIFTS = {aten.lift_fresh, aten.lift_fresh_copy, aten.lift}


class HostDataWatch(TorchDispatchMode):
    """``with HostDataWatch() as watch: ...``, then ``watch.found``: one line per finding, with where it was."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._host: dict[int, torch.Tensor] = {}  # id -> tensor (held, so that no id is reused meanwhile)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        host = [id(t) in self._host for t in inputs]
        if packet in LIFTS or (inputs and all(host)):
            self._host.update((id(t), t) for t in outputs)
        elif any(host):
            self._record(f"{func}: a tensor made from host data meets device tensors (a host-to-device copy)")
        if packet is aten._local_scalar_dense and not host[0]:
            self._record(f"{func}: a device value read on the host (a wait for the device)")
        if packet in (aten._to_copy, aten.copy_):
            source = args[1] if packet is aten.copy_ else args[0]
            target = outputs[0].device
            if source.device.type == "cpu" and target.type != "cpu" and not kwargs.get("non_blocking", False) \
                    and not (packet is aten.copy_ and len(args) > 2 and args[2]):
                self._record(f"{func}: a blocking copy from the CPU to {target}")
        generator = kwargs.get("generator")
        if generator is not None and outputs and generator.device.type != outputs[0].device.type:
            self._record(f"{func}: drawn from a {generator.device} generator for a {outputs[0].device} tensor")
        return out

    def _record(self, what: str) -> None:
        mine = [f for f in traceback.extract_stack() if "/mauctl/" in f.filename]
        where = f" at mauctl/{mine[-1].filename.rsplit('/mauctl/', 1)[1]}:{mine[-1].lineno}" if mine else ""
        self.found.append(what + where)
