"""The one place that knows checkpoint layouts, for lincls and export alike.

Accepted wherever a checkpoint is:

* a mauctl run directory (its ``checkpoints/last.pt``) or a mauctl pretraining checkpoint;
* a mauctl linear-probe checkpoint (``<run>/lincls/<name>/best.pt`` or ``last.pt``);
* an original MoCo / moco_align_uniform checkpoint: ``{"arch": ..., "state_dict": {"module.encoder_q.*": ...}}``;
* a plain torchvision state dict of a ResNet-family model (the architecture is recognised from its shapes).

Everything is read with ``torch.load(weights_only=True)``: no file can run code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mauctl.backbone import build_encoder, last_linear, last_linear_path
from mauctl.config import config_digest
from mauctl.engine import checkpoint
from mauctl.engine.checkpoint import LINCLS_FORMAT, PRETRAIN_FORMATS
from mauctl.engine.rundir import RunDir
from mauctl.errors import MauctlError, UsageError

EXPECTED = (
    "expected a mauctl run directory or checkpoint, an original MoCo checkpoint (a dict with 'arch' and a "
    "'state_dict' of 'module.encoder_q.*' keys), or a torchvision ResNet state dict (conv1.weight, bn1.*, "
    "layer1.0.*, …, fc.weight)"
)
# torchvision families whose state dicts are recognised by shape alone
KNOWN_FAMILIES = ("resnet", "resnext", "wide_resnet")


@dataclass
class Encoder:
    """A pretrained encoder: its architecture, its weights split into backbone and final layer."""

    arch: str
    small_stem: bool
    mlp: bool
    dim: int  # outputs of the final layer (the projection, or the classes of a trained classifier)
    head_prefix: str  # where the final layer lives, e.g. "fc"
    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]  # keys relative to head_prefix ("weight", "0.weight", ...)
    source: str  # mauctl, mauctl-lincls, moco, torchvision
    path: Path
    run_dir: Path | None = None
    config: dict[str, Any] | None = None  # the pretraining config, when known
    epoch: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str | None:
        return config_digest(self.config) if self.config else None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.backbone, **{f"{self.head_prefix}.{k}": v for k, v in self.head.items()}}

    def projection_module(self) -> nn.Module:
        """The pretraining network as it was trained: backbone + projection head (no normalisation)."""
        if self.source == "mauctl-lincls":
            raise UsageError(f"{self.path} is a linear-probe checkpoint: its final layer is a classifier, "
                             "not the pretraining projection head")
        model = build_encoder(self.arch, self.dim, self.mlp, self.small_stem)
        _load(model, self.state_dict(), self.path, strict=True)
        return model

    def backbone_module(self, num_classes: int | None = None) -> nn.Module:
        """The backbone with a new final linear layer for ``num_classes`` (N(0, 0.01), bias 0), or Identity."""
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        model = build_encoder(self.arch, num_classes or 1, False, self.small_stem)
        missing, unexpected = _load(model, self.backbone, self.path, strict=False)
        missing = [k for k in missing
                   if not k.startswith(self.head_prefix + ".") and not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise UsageError(f"{self.path}: the backbone weights do not fit {self.arch} "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        parent, attr, fc = last_linear(model)
        if num_classes is None:
            setattr(parent, attr, nn.Identity())
        else:
            nn.init.normal_(fc.weight, mean=0.0, std=0.01)
            nn.init.zeros_(fc.bias)
        return model


def _load(model: nn.Module, state: dict[str, torch.Tensor], path: Path, strict: bool):
    try:
        return model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise UsageError(f"{path}: the weights do not fit the architecture it names: "
                         f"{str(exc).splitlines()[0]}", hint=EXPECTED + ".") from None


def read_encoder(path: Path | str) -> Encoder:
    """Read any accepted checkpoint (see the module docstring); UsageError for anything else."""
    path = Path(path)
    if path.is_dir() and (path / "best.pt").is_file():  # a linear probe's folder: its best classifier
        return read_encoder(path / "best.pt")
    if path.is_dir():
        return _from_run_dir(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file or directory", hint=EXPECTED + ".")
    try:
        obj = checkpoint.load(path)
    except MauctlError as exc:  # RunError for unreadable files; at this boundary it is the user's input
        raise UsageError(exc.message, hint=exc.hint or EXPECTED + ".") from None
    fmt = obj.get("format")
    try:
        if fmt in PRETRAIN_FORMATS:
            return _from_mauctl(obj, path)
        if fmt == LINCLS_FORMAT:
            return _from_lincls(obj, path)
    except (KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"{path}: a {fmt} checkpoint with missing or malformed parts ({exc!r})",
                         hint="The file is damaged or was not written by this version of mauctl.") from None
    if isinstance(obj.get("state_dict"), dict) and any(k.startswith("module.encoder_q.") for k in obj["state_dict"]):
        return _from_moco(obj, path)
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _from_torchvision(obj, path)
    shown = ", ".join(sorted(map(str, obj))[:8])
    raise UsageError(f"{path}: not a checkpoint mauctl can read (its keys: {shown})", hint=EXPECTED + ".")


def check_resume_file(resume: str, fmt: str) -> None:
    """``run.resume`` = PATH must be a readable checkpoint of this kind, checked before any worker starts.

    Read with ``weights_only=True`` (and memory-mapped: no tensor is copied), so a file that would run
    code is refused here too.
    """
    if resume in ("auto", "none"):
        return
    path = Path(resume)
    if not path.is_file():
        raise UsageError(f"--resume {resume}: no such checkpoint file")
    try:
        obj = checkpoint.load(path, mmap=True)
    except MauctlError as exc:
        raise UsageError(f"--resume {resume}: {exc.message}", hint=exc.hint) from None
    what = checkpoint.WHAT[fmt]
    if checkpoint.upgrade(obj).get("format") != fmt:
        kind = obj.get("format") or ("an original MoCo checkpoint" if "state_dict" in obj else "no mauctl format")
        raise UsageError(f"--resume {resume} is not a mauctl {what} checkpoint ({kind})",
                         hint="--resume PATH continues a run from its own checkpoints/last.pt or epoch_NNNN.pt; "
                              "pretrained weights from elsewhere are probed with `mauctl lincls CHECKPOINT`.")


def _from_run_dir(run: Path) -> Encoder:
    last = RunDir(run).last
    if not last.is_file():
        raise UsageError(f"{run} has no checkpoints/last.pt", hint="Pretrain first, or give a checkpoint file.")
    return read_encoder(last)


def _run_dir_of(path: Path) -> Path | None:
    parent = path.resolve().parent
    if parent.name == "checkpoints" and (parent.parent / "config.toml").exists():
        return parent.parent
    return None


def _from_mauctl(obj: dict, path: Path) -> Encoder:
    model_cfg = obj["config"]["model"]
    prefix = head_prefix(obj["arch"])
    backbone, head = _split(obj["encoder_q"], prefix)
    return Encoder(obj["arch"], model_cfg["small_stem"], model_cfg["mlp"], model_cfg["dim"], prefix, backbone, head,
                   "mauctl", path, _run_dir_of(path), obj["config"], obj.get("epoch"))


def _from_lincls(obj: dict, path: Path) -> Encoder:
    source = obj["source"]
    prefix = head_prefix(source["arch"])
    backbone, head = _split(obj["model"], prefix)
    run = Path(source["run_dir"]) if source.get("run_dir") else None
    if run is not None and not (run / "config.toml").is_file():
        run = None  # the run was moved or deleted since the probe was trained
    return Encoder(source["arch"], source["small_stem"], False, head["weight"].shape[0], prefix, backbone, head,
                   "mauctl-lincls", path, run, source.get("config"), source.get("epoch"),
                   extra={"lincls": obj.get("summary", {})})


def _from_moco(obj: dict, path: Path) -> Encoder:
    arch = obj.get("arch")
    if not isinstance(arch, str):
        raise UsageError(f"{path}: an original MoCo checkpoint needs its 'arch' field", hint=EXPECTED + ".")
    q = {k.removeprefix("module.encoder_q."): v for k, v in obj["state_dict"].items()
         if k.startswith("module.encoder_q.")}
    return _from_state(q, arch, path, "moco", epoch=obj.get("epoch"))


def _from_torchvision(state: dict[str, torch.Tensor], path: Path) -> Encoder:
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return _from_state(state, infer_arch(state, path), path, "torchvision")


def _from_state(state: dict[str, torch.Tensor], arch: str, path: Path, source: str, epoch: int | None = None) -> Encoder:
    prefix = head_prefix(arch)
    backbone, head = _split(state, prefix)
    if not head:
        raise UsageError(f"{path}: no '{prefix}.*' weights (the final layer of {arch})", hint=EXPECTED + ".")
    mlp = "0.weight" in head and "2.weight" in head
    out = head["2.weight" if mlp else "weight"]
    conv1 = state.get("conv1.weight")
    small_stem = conv1 is not None and tuple(conv1.shape[-2:]) == (3, 3)
    return Encoder(arch, small_stem, mlp, out.shape[0], prefix, backbone, head, source, path, epoch=epoch)


def _split(state: dict[str, torch.Tensor], prefix: str) -> tuple[dict, dict]:
    backbone = {k: v for k, v in state.items() if not k.startswith(prefix + ".")}
    head = {k.removeprefix(prefix + "."): v for k, v in state.items() if k.startswith(prefix + ".")}
    return backbone, head


@cache
def head_prefix(arch: str) -> str:
    """The module path of the architecture's final linear layer ("fc" for ResNets)."""
    with torch.device("meta"):
        return last_linear_path(build_encoder(arch, 8))


@cache
def _family_shapes() -> dict[str, dict[str, tuple]]:
    import torchvision

    shapes = {}
    for arch in torchvision.models.list_models(module=torchvision.models):
        if arch.startswith(KNOWN_FAMILIES):
            with torch.device("meta"):
                model = build_encoder(arch, 8)
            shapes[arch] = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("fc.")}
    return shapes


def infer_arch(state: dict[str, torch.Tensor], path: Path) -> str:
    """The ResNet-family architecture whose backbone has exactly these keys and shapes."""
    def backbone_shapes(shapes: dict[str, tuple]) -> dict[str, tuple]:
        # older torchvision weights have no num_batches_tracked; the stem may be the small one
        return {k: s for k, s in shapes.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}

    given = backbone_shapes({k: tuple(v.shape) for k, v in state.items()})
    for arch, shapes in _family_shapes().items():
        shapes = backbone_shapes(shapes)
        stemless = {k: s for k, s in shapes.items() if k != "conv1.weight"}
        if given.keys() == shapes.keys() and all(given[k] == s for k, s in stemless.items()):
            return arch
    raise UsageError(f"{path}: a state dict, but not of a torchvision ResNet-family model mauctl recognises",
                     hint=EXPECTED + ".")
