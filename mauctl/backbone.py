"""Encoders built from torchvision architectures, as the original: ``models.<arch>(num_classes=dim)``.

The network's last linear layer becomes the projection to ``dim`` features (with ``mlp``, a
hidden layer + ReLU in front of it, like MoCo v2). For ResNets the key names are the
original's (``fc.0``, ``fc.2``), so upstream checkpoints load into the same modules.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mauctl.errors import UsageError


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over ``num_splits`` contiguous groups of the batch, each with its own statistics.

    One process then normalises like ``num_splits`` GPUs of the reference would: the groups
    [0, n/s), [n/s, 2n/s), ... are what each GPU's BatchNorm would see. The running statistics
    are the mean over the groups. State-dict compatible with ``nn.BatchNorm2d``.

    Each group is one batch_norm call on a slice of the batch: a slice copies nothing and keeps
    the memory format (channels_last stays channels_last), where one call on the groups laid side
    by side along the channels would copy every input and output, in NCHW.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.num_splits
        if not self.training or s == 1:
            return super().forward(x)
        n = x.shape[0]
        if n % s:
            raise RuntimeError(f"batch of {n} does not split into {s} BatchNorm groups")
        # each group updates its own copy of the running statistics; the layer keeps their mean
        means, variances = self.running_mean.repeat(s, 1), self.running_var.repeat(s, 1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
        out = torch.cat([F.batch_norm(group, means[g], variances[g], self.weight, self.bias, True, momentum, self.eps)
                         for g, group in enumerate(x.chunk(s))])
        with torch.no_grad():
            self.running_mean.copy_(means.mean(0))
            self.running_var.copy_(variances.mean(0))
            self.num_batches_tracked += 1
        return out


def split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d (in place) by a SplitBatchNorm2d with the same state."""
    if num_splits == 1:
        return module
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm2d):
            split = SplitBatchNorm2d(child.num_features, num_splits, eps=child.eps, momentum=child.momentum,
                                     affine=child.affine, track_running_stats=child.track_running_stats)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            split_batchnorm(child, num_splits)
    return module


def last_linear_path(model: nn.Module) -> str:
    """Module path of the network's final nn.Linear: "fc", "classifier.1", "heads.head", ..."""
    found = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            found = name
    if found is None:
        raise UsageError(f"{type(model).__name__} has no linear output layer to turn into a projection head")
    return found


def last_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """(parent, attribute, layer) of the network's final nn.Linear."""
    parent_name, _, attr = last_linear_path(model).rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, attr, getattr(parent, attr)


def build_encoder(arch: str, dim: int, mlp: bool = False, small_stem: bool = False) -> nn.Module:
    import torchvision

    kwargs = {"num_classes": dim, "weights": None}
    if arch in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    model = torchvision.models.get_model(arch, **kwargs)
    if small_stem:
        if not (isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(model, "maxpool")):
            raise UsageError(f"model.small_stem needs a ResNet-style network (conv1 + maxpool); {arch} has none")
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    if mlp:
        parent, attr, fc = last_linear(model)
        hidden = fc.in_features
        setattr(parent, attr, nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), fc))
    return model


def check_encoder(arch: str, dim: int, mlp: bool, small_stem: bool, image_size: int) -> None:
    """Build on the meta device and run a fake batch: catches unusable arch/stem/size before launching."""
    with torch.device("meta"):
        model = build_encoder(arch, dim, mlp, small_stem)
        try:
            out = model.eval()(torch.empty(2, 3, image_size, image_size))
        except Exception as exc:  # the message of a shape error is the most useful thing to show
            raise UsageError(
                f"model.arch = {arch!r} cannot encode {image_size}x{image_size} images: {exc}",
                hint="Change data.image_size or model.arch.",
            ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, dim):
        raise UsageError(f"model.arch = {arch!r} does not produce one {dim}-d feature row per image")
