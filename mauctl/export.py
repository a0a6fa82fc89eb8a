"""Export an encoder for downstream use, and prove that the written file computes what the source does.

Heads, i.e. what the exported module outputs:

* ``none``: backbone features, the final linear layer replaced by Identity (2048-d for a ResNet-50);
* ``mlp``: the pretraining projection head + L2 normalisation, the ``model.dim``-d embedding;
* ``linear``: the backbone + the classifier that ``mauctl lincls`` trained.

Formats:

* ``safetensors`` (default): the module's state dict with string metadata (``format = mauctl.export/1``)
  from which mauctl rebuilds the module (`load_exported`, ``hubconf.py``);
* ``torchvision``: a plain state dict for ``torchvision.models.get_model(arch, num_classes=N)``, possible
  only where the exported module is a stock torchvision model;
* ``torchscript``: ``torch.jit.trace`` of the module, loadable without mauctl;
* ``onnx``: ``torch.onnx.export`` with a dynamic batch dimension (needs the ``onnx`` extra).

Every export goes to a temporary file beside ``--out``, is read back into a fresh module (an
onnxruntime session for ONNX) and run next to the source module on a fixed random batch. Only when
the outputs agree does the file take the name ``--out``: a failed check leaves nothing behind, and a
file replaced with ``--force`` survives an export that fails.
"""

from __future__ import annotations

import errno
import os
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mauctl import __version__, files
from mauctl.backbone import build_encoder, last_linear
from mauctl.engine import checkpoint
from mauctl.errors import MauctlError, RunError, UsageError, closest
from mauctl.weights import Encoder, head_prefix, infer_arch, read_encoder

FORMAT = "mauctl.export/1"
FORMATS = ("safetensors", "torchvision", "torchscript", "onnx")
HEADS = ("none", "mlp", "linear")
# Outputs must agree to 1e-5 of their scale: exactly 1e-5 for outputs within [-1, 1] (the normalised
# embedding); backbone features of a ResNet-50 reach the hundreds, where float32 rounding in
# onnxruntime's kernels alone is ~1e-4.
TOLERANCE = 1e-5
CHECK_BATCH = 4
CHECK_SEED = 0
DEFAULT_IMAGE_SIZE = 224
ONNX_EXTRA = "install the onnx extra: pip install 'mauctl[onnx]'"
# file name endings and the formats they suggest, to point out an --out that looks like another format
SUFFIXES = {".safetensors": ("safetensors",), ".onnx": ("onnx",), ".pt": ("torchvision", "torchscript"),
            ".pth": ("torchvision", "torchscript"), ".ts": ("torchscript",), ".torchscript": ("torchscript",)}
OUTPUT_NAMES = {"none": "features", "mlp": "embedding", "linear": "logits"}


class Normalized(nn.Module):
    """The pretraining embedding: the projection network's output scaled to unit length."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder(x), dim=1)


@dataclass
class Exported:
    """What `export_encoder` wrote, for the summary the CLI prints."""

    path: Path
    format: str
    head: str
    arch: str
    source: Path
    output_shape: tuple[int, ...]
    size_bytes: int
    max_abs_diff: float
    limit: float
    top1: float | None = None
    notes: list[str] = field(default_factory=list)


def export_encoder(source: Path | str, out: Path | str, fmt: str = "safetensors", head: str | None = None,
                   lincls: str | None = None, force: bool = False) -> Exported:
    """Write the encoder at ``source`` to ``out`` (see the module docstring), checked; UsageError/RunError."""
    source, out = Path(source), Path(out)
    fmt = _choice(fmt, FORMATS, "--format")
    head = None if head is None else _choice(head, HEADS, "--head")
    files.check_new_file(out, "--out", force=force, force_flag="--force", make_parent=True)
    _require_format(fmt)
    enc, head = _resolve_source(source, head, lincls)
    if out.resolve() in (source.resolve(), enc.path.resolve()):
        raise UsageError(f"--out {out} is the checkpoint being exported", hint="Choose another --out path.")
    notes: list[str] = []
    module = build_module(enc, head)
    if fmt == "torchvision":
        _check_torchvision(enc, head, module)
        module = weights_of(module)  # the stock model; the normalisation of an mlp head is no weight
        if head == "mlp":
            notes.append("L2 normalisation is not part of a state dict: for the embedding, apply "
                         "torch.nn.functional.normalize(model(x), dim=1).")
    image_size = int((enc.config or {}).get("data", {}).get("image_size", DEFAULT_IMAGE_SIZE))
    batch = check_batch(image_size)
    with torch.no_grad():
        expected = module(batch)
    meta = metadata(enc, head, image_size, tuple(expected.shape[1:]))

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out.parent, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write in {out.parent} ({exc.strerror})") from None
    try:
        with files.replaced_atomically(out) as tmp:  # renamed to --out only once the check below passed
            notes += _write(fmt, module, tmp, meta, image_size, head)
            diff, limit = _check(expected, tmp, fmt, enc.arch, batch)
    except Exception as exc:
        if isinstance(exc, MauctlError):
            raise
        # a disk error, or an exporter that cannot handle this network: nothing was written
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        other = "--format safetensors needs no exporter; " if fmt in ("torchscript", "onnx") else ""
        raise RunError(f"writing the {fmt} file failed: {type(exc).__name__}: {first}; nothing was written",
                       hint=other + "--debug shows the traceback.") from exc
    if out.suffix.lower() in SUFFIXES and fmt not in SUFFIXES[out.suffix.lower()]:
        notes.append(f"{out.name} ends in {out.suffix} but holds a {fmt} file (--format).")
    if fmt == "torchvision":
        notes.append(f"Load with torchvision.models.get_model({enc.arch!r}, num_classes={meta['dim']}) "
                     "and load_state_dict(torch.load(path, weights_only=True)).")
    return Exported(out, fmt, head, enc.arch, enc.path, tuple(expected.shape), out.stat().st_size, diff, limit,
                    _top1(enc), notes)


# ---------------------------------------------------------------- the module to export


def build_module(enc: Encoder, head: str) -> nn.Module:
    """The exported module, float32 and in eval mode, with the source's weights."""
    if head == "none":
        model = enc.backbone_module(None)
    elif head == "mlp":
        model = Normalized(enc.projection_module())
    else:
        model = enc.backbone_module(enc.dim)
        model.load_state_dict(enc.state_dict())
    return model.float().eval()


def skeleton(arch: str, head: str, dim: int, mlp: bool, small_stem: bool) -> nn.Module:
    """A freshly initialised module of the same structure as `build_module`'s, to load weights into."""
    if head == "none":
        model = build_encoder(arch, 1, False, small_stem)
        parent, attr, _ = last_linear(model)
        setattr(parent, attr, nn.Identity())
        return model
    if head == "mlp":
        return Normalized(build_encoder(arch, dim, mlp, small_stem))
    return build_encoder(arch, dim, False, small_stem)


def weights_of(module: nn.Module) -> nn.Module:
    """The part of an exported module that holds its weights (all of it but the normalisation)."""
    return module.encoder if isinstance(module, Normalized) else module


def metadata(enc: Encoder, head: str, image_size: int, out_shape: tuple[int, ...]) -> dict[str, str]:
    """The safetensors metadata: enough to rebuild the module, and where it came from (all strings)."""
    top1 = _top1(enc)
    dim = 0 if head == "none" else enc.dim
    return {
        "format": FORMAT,
        "arch": enc.arch,
        "head": head,
        "small_stem": _flag(enc.small_stem),
        "mlp": _flag(enc.mlp),
        "dim": str(dim),
        "num_classes": str(enc.dim if head == "linear" else 0),
        "out_features": str(out_shape[0] if len(out_shape) == 1 else 0),
        "image_size": str(image_size),
        "config_digest": enc.digest or "",
        "top1": "" if top1 is None else str(top1),
        "source": str(enc.path),
        "epoch": "" if enc.epoch is None else str(enc.epoch),
        "mauctl_version": __version__,
    }


def _resolve_source(source: Path, head: str | None, lincls: str | None) -> tuple[Encoder, str]:
    """The Encoder to export and the head; ``linear`` reads the run's linear-probe result."""
    if head is None and lincls is not None:
        head = "linear"
    if lincls is not None and head != "linear":
        raise UsageError(f"--lincls {lincls} picks a linear-probe classifier, but --head is {head}",
                         hint="Drop --lincls, or use --head linear.")
    if source.is_dir() and (source / "best.pt").is_file():
        # a linear-probe result folder: its best classifier, not checkpoints/last.pt (the last epoch)
        source = source / "best.pt"
    elif source.is_dir() and head == "linear":
        return read_encoder(_lincls_checkpoint(source, lincls)), head
    enc = read_encoder(source)
    is_lincls = enc.source == "mauctl-lincls"
    if head is None:
        head = "linear" if is_lincls else "none"
    if is_lincls and lincls is not None:
        raise UsageError(f"{source} is already a linear-probe checkpoint; --lincls {lincls} picks one in a run "
                         "directory", hint="Drop --lincls.")
    if is_lincls and head == "mlp":
        raise UsageError(f"{source} is a linear-probe checkpoint: it holds the classifier, not the pretraining "
                         "projection head that --head mlp exports",
                         hint="Give the run directory (or its checkpoints/last.pt) for --head mlp.")
    if head == "linear" and not is_lincls:
        if enc.run_dir is None:
            raise UsageError(f"--head linear needs a trained linear classifier, and {source} is a {enc.source} "
                             "checkpoint outside a mauctl run directory",
                             hint="Give a linear-probe checkpoint (<run>/lincls/<name>/best.pt) or a run "
                                  "directory after `mauctl lincls`; or export --head none or mlp.")
        enc = read_encoder(_lincls_checkpoint(enc.run_dir, lincls))
    return enc, head


def _lincls_checkpoint(run: Path, name: str | None) -> Path:
    """``<run>/lincls/<name>/best.pt``; without a name, the only linear-probe result of the run."""
    root = run / "lincls"
    found = sorted(p.name for p in root.iterdir() if (p / "best.pt").is_file()) if root.is_dir() else []
    listed = ", ".join(found) if found else "none"
    if name is not None:
        path = root / name / "best.pt"
        if Path(name).name != name or not path.is_file():
            raise UsageError(f"--lincls {name}: no {path}", hint=f"Linear-probe results in {run}: {listed}.")
        return path
    if len(found) == 1:
        return root / found[0] / "best.pt"
    if not found:
        raise UsageError(f"{run} has no linear-probe result (no lincls/<name>/best.pt) for --head linear",
                         hint=f"Run `mauctl lincls {run} DATA` first, or export --head none or mlp.")
    raise UsageError(f"{run} has {len(found)} linear-probe results: {listed}",
                     hint="Pick one with --lincls NAME.")


def _check_torchvision(enc: Encoder, head: str, module: nn.Module) -> None:
    """UsageError unless the exported module is exactly a stock torchvision model."""
    reason = None
    if head == "none":
        reason = "--head none replaces the final layer by Identity, which no torchvision model has"
    elif head == "mlp" and enc.mlp:
        reason = ("the projection head is a 2-layer MLP (model.mlp = true); a torchvision model ends in one "
                  "linear layer")
    elif enc.small_stem:
        reason = ("the encoder has the small-image stem (model.small_stem = true: 3x3 conv1, no max-pool), "
                  "not torchvision's")
    else:
        import torchvision

        with torch.device("meta"):
            stock = torchvision.models.get_model(enc.arch, num_classes=enc.dim)
        want = {k: tuple(v.shape) for k, v in stock.state_dict().items()}
        have = {k: tuple(v.shape) for k, v in weights_of(module).state_dict().items()}
        if want != have:
            reason = f"its weights do not fit torchvision.models.get_model({enc.arch!r}, num_classes={enc.dim})"
    if reason:
        raise UsageError(f"--format torchvision is not possible for this export: {reason}",
                         hint="Use --format safetensors (the default; load it with mauctl.export.load_exported "
                              "or torch.hub), torchscript or onnx.")


# ---------------------------------------------------------------- writing and checking


def check_batch(image_size: int, batch: int = CHECK_BATCH, seed: int = CHECK_SEED) -> torch.Tensor:
    """The fixed random batch that the source and the written file are compared on."""
    return torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


def _write(fmt: str, module: nn.Module, path: Path, meta: dict[str, str], image_size: int, head: str) -> list[str]:
    """Write ``module`` to ``path`` in ``fmt``; returns notes for the user."""
    if fmt == "safetensors":
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous() for k, v in weights_of(module).state_dict().items()}
        save_file(tensors, path, metadata=meta)
    elif fmt == "torchvision":
        torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, path)
    elif fmt == "torchscript":
        return _write_torchscript(module, path, image_size)
    else:
        example = check_batch(image_size, batch=2, seed=CHECK_SEED + 1)  # not 1: batch must stay dynamic
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporter chatter; the check below is what counts
            torch.onnx.export(module, (example,), str(path), input_names=["images"],
                              output_names=[OUTPUT_NAMES[head]], dynamic_shapes=({0: torch.export.Dim("batch")},),
                              dynamo=True, external_data=False, verbose=False)
    return []


def _write_torchscript(module: nn.Module, path: Path, image_size: int) -> list[str]:
    example = check_batch(image_size, batch=2, seed=CHECK_SEED + 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path))
    if any("deprecat" in str(w.message).lower() for w in caught):
        return [f"torch.jit is deprecated in torch {torch.__version__}; this file was reloaded and matched, "
                "but later torch versions may not load it (safetensors or onnx last longer)."]
    return []


def _check(expected: torch.Tensor, path: Path, fmt: str, arch: str, batch: torch.Tensor) -> tuple[float, float]:
    """(max abs diff, limit) of the file read back against ``expected``; RunError when they differ."""
    try:
        model = reload(path, fmt, arch)
        with torch.no_grad():
            got = model(batch)
    except MauctlError as exc:
        raise RunError(f"the {fmt} file just written could not be read back: {exc.message}") from None
    except Exception as exc:
        raise RunError(f"the {fmt} file just written could not be read back: {type(exc).__name__}: {exc}") from None
    if tuple(got.shape) != tuple(expected.shape):
        raise RunError(f"the {fmt} file read back outputs shape {tuple(got.shape)}, the source "
                       f"{tuple(expected.shape)}; nothing was written")
    diff = (got.float() - expected).abs().max().item()
    limit = TOLERANCE * max(1.0, expected.abs().max().item())
    if not diff <= limit:  # NaN fails too
        raise RunError(f"the {fmt} file read back does not compute what the source does: max abs diff {diff:.3g} "
                       f"(limit {limit:.3g}); nothing was written",
                       hint="This is a bug in mauctl or in the exporter; rerun with --debug and report it.")
    return diff, limit


def reload(path: Path, fmt: str, arch: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A fresh model read back from a written file (an onnxruntime session for ONNX)."""
    if fmt == "onnx":
        return OnnxModel(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)  # said in the notes
        return load_exported(path, arch=arch)


class OnnxModel:
    """An onnxruntime session on CPU, called like a module on a float32 torch batch."""

    def __init__(self, path: Path) -> None:
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.numpy()})[0])


# ---------------------------------------------------------------- reading an export


def load_exported(path: Path | str, arch: str | None = None) -> nn.Module:
    """The module in a file ``mauctl export`` wrote, in eval mode, on the CPU.

    safetensors: rebuilt from its metadata. torchscript: ``torch.jit.load``. torchvision state dict:
    ``torchvision.models.get_model(arch, num_classes=N)``; the architecture is not stored in such a
    file, so give ``arch`` (ResNet-family architectures are recognised from the shapes when it is None).
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file", hint="Give a file written by `mauctl export`.")
    kind = _sniff(path)
    if kind == "safetensors":
        return _load_safetensors(path)
    if kind == "torchscript":
        return torch.jit.load(str(path), map_location="cpu").eval()
    if kind == "onnx":
        raise UsageError(f"{path} is an ONNX model, not a torch module",
                         hint="Run it with onnxruntime.InferenceSession, or export --format safetensors.")
    try:
        state = checkpoint.load(path)
    except RunError as exc:
        raise UsageError(exc.message, hint="Give a file written by `mauctl export`.") from None
    return _load_torchvision(state, arch, path)


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        start = f.read(9)
    if len(start) == 9 and start[8:9] == b"{":  # 8-byte header length, then the JSON header
        return "safetensors"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return "torchscript" if any("/code/" in n for n in z.namelist()) else "torch"
    if start[:1] == b"\x08":  # protobuf field 1 (ir_version), as every ONNX file starts
        return "onnx"
    return "torch"


def _load_safetensors(path: Path) -> nn.Module:
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file
    except ImportError:
        raise UsageError("reading safetensors exports needs the safetensors package",
                         hint="pip install safetensors") from None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(path)
    except Exception as exc:
        raise UsageError(f"{path} is not a readable safetensors file: {exc}") from None
    if meta.get("format") != FORMAT:
        raise UsageError(f"{path}: a safetensors file, but not one `mauctl export` wrote "
                         f"(its metadata has no format = {FORMAT})")
    try:
        model = skeleton(meta["arch"], meta["head"], int(meta["dim"]), meta["mlp"] == "true",
                         meta["small_stem"] == "true")
        weights_of(model).load_state_dict(state, strict=True)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise UsageError(f"{path}: its metadata and weights do not describe a module mauctl can rebuild "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    return model.eval()


def _load_torchvision(state: dict, arch: str | None, path: Path) -> nn.Module:
    import torchvision

    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path}: not a state dict (keys: {', '.join(sorted(map(str, state))[:6])})",
                         hint="Give a file written by `mauctl export`.")
    arch = arch or infer_arch(state, path)
    prefix = head_prefix(arch)
    if f"{prefix}.weight" not in state:
        raise UsageError(f"{path}: no {prefix}.weight, the final layer of {arch}",
                         hint="Is arch right? Give the architecture the file was exported from.")
    model = torchvision.models.get_model(arch, num_classes=state[f"{prefix}.weight"].shape[0])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UsageError(f"{path} does not load into torchvision's {arch}: {str(exc).splitlines()[0]}",
                         hint="Is arch right? Give the architecture the file was exported from.") from None
    return model.eval()


# ---------------------------------------------------------------- small helpers


def _choice(value: str, choices: tuple[str, ...], flag: str) -> str:
    """``value`` in lower case when it is one of ``choices``; else a UsageError that lists them once."""
    chosen = value.lower()
    if chosen in choices:
        return chosen
    match = closest(chosen, choices)
    suggestion = f"; did you mean '{match}'?" if match else ""
    raise UsageError(f"{flag} {value!r}: expected one of {', '.join(choices)}{suggestion}")


def _require_format(fmt: str) -> None:
    """UsageError naming what to install when ``fmt`` needs a package that is missing."""
    if fmt == "safetensors":
        try:
            import safetensors  # noqa: F401
        except ImportError:
            raise UsageError("--format safetensors needs the safetensors package",
                             hint="pip install safetensors, or use --format torchvision / torchscript.") from None
    elif fmt == "torchscript":
        if not callable(getattr(getattr(torch, "jit", None), "trace", None)):
            raise UsageError(f"--format torchscript: this torch ({torch.__version__}) has no torch.jit.trace",
                             hint="Use --format safetensors or onnx.")
    elif fmt == "onnx":
        for package in ("onnx", "onnxscript"):
            try:
                __import__(package)
            except ImportError:
                raise UsageError(f"--format onnx needs the {package} package: {ONNX_EXTRA}") from None
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise UsageError(f"--format onnx checks the file with onnxruntime, which is not installed: {ONNX_EXTRA}"
                             ) from None


def _top1(enc: Encoder) -> float | None:
    return enc.extra.get("lincls", {}).get("best_top1")


def _flag(value: bool) -> str:
    return "true" if value else "false"
