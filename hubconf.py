"""torch.hub entry point for encoders written by ``mauctl export``.

    model = torch.hub.load("path/to/this/repo", "encoder", source="local", path="encoder.safetensors")

Works offline: ``source="local"`` puts this folder on ``sys.path``, so ``mauctl`` is imported from it.
"""

from __future__ import annotations

import torch.nn as nn

dependencies = ["torch", "torchvision", "safetensors"]


def encoder(path: str, arch: str | None = None, **kwargs) -> nn.Module:
    """The exported encoder at ``path``, in eval mode on the CPU.

    path: a safetensors or torchscript file written by ``mauctl export`` (or its ``--format
    torchvision`` state dict, for which give ``arch``, e.g. "resnet50"; ResNets are recognised without it).
    """
    from mauctl.export import load_exported

    return load_exported(path, arch=arch, **kwargs).eval()
