"""Typed configuration: every option of the original scripts, grouped by concern.

Where a value comes from, highest priority first::

    1. command-line flags and ``--set section.key=value`` (a later ``--set`` wins)
    2. ``MAUCTL_<SECTION>__<KEY>`` environment variables (e.g. ``MAUCTL_OPTIM__LR=0.06``)
    3. ``--config FILE.toml``, laid over the ``--preset`` it may be combined with
    4. the defaults below (the original scripts' defaults)

The layers are merged key by key and validated once (``resolve``). A key unknown to
the schema is an error in any layer, named with the layer it came from and the
closest valid key. The resolved config is written to the run directory as TOML
(``to_toml``) and reading that file back gives the identical config.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsError

from mauctl import presets
from mauctl.compat import tomllib
from mauctl.errors import UsageError, did_you_mean

ENV_PREFIX = "MAUCTL_"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode would read true as 1; a boolean is never a number here
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and annotation is not bool and bool not in get_args(annotation):
            raise ValueError(f"expected {_kind(cls.model_fields[info.field_name].annotation)}, got a boolean")
        return value


def auto_or_int(n: Any, minimum: int, message: str) -> int | str:
    """For an ``int | "auto"`` key: "auto", or an integer (digits in a string too) of at least ``minimum``."""
    if isinstance(n, str) and n.strip().isdigit():
        n = int(n)
    if n == "auto" or (isinstance(n, int) and not isinstance(n, bool) and n >= minimum):
        return n
    raise ValueError(message)


def _kind(annotation: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string"}.get(annotation, "a value of another type")


class DataConfig(Section):
    root: str = Field("", description="Image folder with train/ (and val/ for lincls), one subfolder per class.")
    builtin: Literal["", "digits"] = Field(
        "", description="Built-in dataset used when no folder is given: 'digits' (scikit-learn's 8x8 digits)."
    )
    image_size: int = Field(224, ge=8, description="Side of the square training crop, in pixels.")
    workers: int | Literal["auto"] = Field(
        "auto", description="Data-loading processes per training process: auto = this process's share of the CPU "
        "cores, at most 8; 0 = load in the training process.",
    )
    aug: Literal["v1", "v2"] = Field(
        "v1", description="Augmentation recipe: v1 = MoCo v1, v2 = MoCo v2 strong augmentation (main_moco.py --aug-plus)."
    )
    pipeline: Literal["auto", "pil", "tensor"] = Field(
        "auto",
        description="Augmentation pipeline: pil = PIL in the loader workers (the reference); tensor = decode and "
        "crop in the workers, colour/blur/flip on whole batches on the device; auto = tensor on CUDA, and on CPU "
        "up to 64 px; pil otherwise.",
    )
    gpu_decode: bool = Field(
        False, description="With the tensor pipeline on CUDA: decode JPEGs on the GPU (nvJPEG) in batches, on a side "
        "stream the training stream waits for (nvJPEG does not wait for work queued on the training stream).",
    )
    max_bad_fraction: float = Field(
        0.001, ge=0.0, le=1.0,
        description="Share of undecodable images (per split, per epoch) that are skipped; above it the run stops.",
    )


    @field_validator("workers", mode="before")
    @classmethod
    def _auto_or_count(cls, n: Any) -> int | str:
        return auto_or_int(n, 0, "expected 'auto' or a number of processes (0 = none)")


class ModelConfig(Section):
    arch: str = Field("resnet50", description="torchvision architecture of both encoders (main_moco.py -a).")
    dim: int = Field(128, ge=1, description="Feature (embedding) dimension (main_moco.py --moco-dim).")
    mlp: bool = Field(False, description="2-layer MLP projection head instead of a linear one (main_moco.py --mlp).")
    queue_size: int = Field(65536, ge=1, description="Queue length K; a multiple of the global batch (main_moco.py --moco-k).")
    key_momentum: float = Field(0.999, ge=0.0, lt=1.0, description="Momentum of the key encoder update (main_moco.py --moco-m).")
    bn_splits: int = Field(
        0,
        ge=0,
        description="BatchNorm groups per process (emulated shuffle BN); 0 = auto, groups of about 32 images.",
    )
    small_stem: bool = Field(
        False, description="ResNet stem for small images: 3x3 stride-1 first convolution, no max-pool."
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        known = torchvision_archs()
        if arch not in known:
            raise ValueError(f"not a torchvision classification model ({did_you_mean(arch, known)})")
        return arch


class LossConfig(Section):
    contr_w: float = Field(0.0, ge=0.0, description="Weight of the contrastive (InfoNCE) loss (main_moco.py --moco-contr-w).")
    contr_tau: float = Field(0.07, gt=0.0, description="Temperature of the contrastive loss (main_moco.py --moco-contr-tau).")
    align_w: float = Field(3.0, ge=0.0, description="Weight of the alignment loss (main_moco.py --moco-align-w).")
    align_alpha: float = Field(2.0, gt=0.0, description="Exponent alpha of the alignment loss (main_moco.py --moco-align-alpha).")
    unif_w: float = Field(1.0, ge=0.0, description="Weight of the uniformity loss (main_moco.py --moco-unif-w).")
    unif_t: float = Field(3.0, gt=0.0, description="Temperature t of the uniformity loss (main_moco.py --moco-unif-t).")
    intra_batch: bool = Field(
        True,
        description="Uniformity also over query pairs within the batch (Eq. 18); false = queue only (Eq. 17).",
    )
    unif_groups: Literal["bn", "global"] = Field(
        "bn",
        description="How L_uniform groups the queries: bn = one log-mean-exp per BatchNorm group (a GPU of the "
        "original), averaged over the groups, as the original; global = one over the whole global batch.",
    )

    @model_validator(mode="after")
    def _some_weight(self) -> LossConfig:
        if self.contr_w == 0 and self.align_w == 0 and self.unif_w == 0:
            raise ValueError("contr_w, align_w and unif_w are all 0: at least one loss weight must be positive")
        return self


class OptimConfig(Section):
    lr: float = Field(0.03, gt=0.0, description="Initial learning rate for the global batch (main_moco.py --lr).")
    batch_size: int = Field(256, ge=1, description="Global batch size, all processes together (main_moco.py -b).")
    epochs: int = Field(200, ge=1, description="Number of training epochs (main_moco.py --epochs).")
    schedule: list[int] = Field(
        [120, 160], description="Epochs (0-based) from which the step schedule multiplies the LR by 0.1 (main_moco.py --schedule)."
    )
    cos: bool = Field(False, description="Cosine LR schedule instead of the step schedule (main_moco.py --cos).")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (main_moco.py --momentum).")
    weight_decay: float = Field(1e-4, ge=0.0, description="SGD weight decay (main_moco.py --wd).")

    @field_validator("schedule")
    @classmethod
    def _increasing(cls, schedule: list[int]) -> list[int]:
        if any(m < 1 for m in schedule):
            raise ValueError("milestones must be positive epoch numbers")
        if any(b <= a for a, b in zip(schedule, schedule[1:])):
            raise ValueError("milestones must be strictly increasing")
        return schedule


class RunConfig(Section):
    out: str = Field("", description="Run directory (default: runs/<preset>_<loss>).")
    seed: int = Field(0, ge=0, description="Random seed for weights, data order and augmentation.")
    device: str = Field(
        "auto", description="auto, cpu, cuda (each process the GPU of its local rank, or the only one it sees) "
        "or cuda:N (that GPU: one process per node)."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16", "bf16-native"] = Field(
        "auto", description="Compute precision: auto = bf16 on CUDA, fp32 on CPU; bf16-native = bf16 where the "
        "hardware computes it (CUDA GPUs with bf16, CPUs with AVX512-BF16 or AMX), fp32 elsewhere."
    )
    print_freq: int = Field(10, ge=1, description="Log every N steps (main_moco.py -p).")
    resume: str = Field("auto", description="auto (continue from last.pt if any), none, or a checkpoint path.")
    save_every: int = Field(20, ge=0, description="Keep a checkpoint every N epochs besides last.pt (0 = none).")
    save_minutes: float = Field(
        30.0, ge=0.0,
        description="Also write last.pt within an epoch once this many minutes have passed since the last write "
        "(checked at logging steps; 0 = at epoch ends only): a crash loses at most about that much training.",
    )
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the encoders: auto = on CUDA, off on CPU (compiling takes a minute there)."
    )
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="channels_last memory format for the encoders and their inputs: auto = on CUDA."
    )
    tensorboard: bool = Field(
        False, description="Also log metrics.jsonl's records to TensorBoard (<run>/tensorboard; needs mauctl[tensorboard])."
    )
    stop_on_collapse: bool = Field(
        False, description="Pretraining: stop (exit 1, last checkpoint kept) when the embeddings collapse, instead "
        "of warning and going on.",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ValueError("expected auto, cpu, cuda or cuda:N")
        return device


class LaunchConfig(Section):
    nproc_per_node: int | Literal["auto"] = Field(
        "auto", description="Processes per node: auto = one per visible GPU (1 with run.device = cuda:N), or 1 on CPU."
    )
    nnodes: int = Field(1, ge=1, description="Number of nodes.")
    node_rank: int = Field(0, ge=0, description="Rank of this node, 0 to nnodes-1.")
    rdzv_endpoint: str = Field("", description="host:port of the rendezvous, needed when nnodes > 1.")
    max_restarts: int = Field(0, ge=0, description="Times torchrun restarts the workers after a failure.")

    @field_validator("nproc_per_node", mode="before")
    @classmethod
    def _auto_or_positive(cls, n: Any) -> int | str:
        return auto_or_int(n, 1, "expected 'auto' or a positive integer")

    @model_validator(mode="after")
    def _nodes(self) -> LaunchConfig:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("rdzv_endpoint (host:port) is required when nnodes > 1")
        if self.rdzv_endpoint and not re.fullmatch(r"[\w.\-\[\]:]+:\d+", self.rdzv_endpoint):
            raise ValueError(f"rdzv_endpoint {self.rdzv_endpoint!r} is not host:port")
        if self.rdzv_endpoint and not 1 <= int(self.rdzv_endpoint.rpartition(":")[2]) <= 65535:
            raise ValueError(f"rdzv_endpoint {self.rdzv_endpoint!r}: the port must be 1 to 65535")
        return self


AUTO_EVAL_LIMIT = 50_000  # training images up to which eval.every = "auto" means every epoch


class EvalConfig(Section):
    every: int | Literal["auto"] = Field(
        "auto",
        description="Representation diagnostics every N epochs (align/unif metrics, kNN top-1); 0 = never; "
        "auto = every epoch up to 50,000 training images, else every 10.",
    )
    images: int = Field(
        10000, ge=2, description="Held-out images for the metrics: from val/, or without val/ up to a fifth of train/."
    )
    bank_images: int = Field(50000, ge=0, description="Training images in the kNN feature bank (0 = no kNN monitor).")
    knn_k: int = Field(200, ge=1, description="Neighbours that vote in the kNN monitor.")
    knn_t: float = Field(0.07, gt=0.0, description="Temperature of the kNN vote weights exp(similarity / t).")

    def every_for(self, train_images: int) -> int:
        """Epochs between diagnostics passes for a training set of this size (0 = never)."""
        if self.every != "auto":
            return self.every
        return 1 if train_images <= AUTO_EVAL_LIMIT else 10

    @field_validator("every", mode="before")
    @classmethod
    def _auto_or_count(cls, n: Any) -> int | str:
        return auto_or_int(n, 0, "expected 'auto' or a number of epochs (0 = never)")


class PretrainConfig(BaseModel):
    """Everything `mauctl pretrain` needs; the defaults are the original main_moco.py's."""

    model_config = ConfigDict(extra="forbid")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()
    launch: LaunchConfig = LaunchConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _batch_and_queue(self) -> PretrainConfig:
        queue, batch = self.model.queue_size, self.optim.batch_size
        if queue % batch:
            below = max((b for b in range(1, batch) if queue % b == 0), default=None)
            above = next((b for b in range(batch + 1, queue + 1) if queue % b == 0), None)
            batches = " or ".join(str(b) for b in (below, above) if b is not None)
            near = max(batch, queue // batch * batch)
            raise ValueError(
                f"model.queue_size {queue} must be a multiple of the global batch optim.batch_size {batch}: "
                f"use --batch-size {batches}, or --set model.queue_size={near}"
            )
        return self


LINCLS_OPTIM = OptimConfig(lr=30.0, batch_size=256, epochs=100, schedule=[60, 80], momentum=0.9, weight_decay=0.0)


class ProbeConfig(Section):
    cached_features: bool = Field(
        False,
        description="Extract the frozen features once and train the linear layer on them: much faster, "
        "but another protocol than the published one (report keeps such results apart).",
    )
    augmented_views: int = Field(
        0, ge=0, le=64,
        description="With cached_features: augmented training views (random crop + flip) cached per image; "
        "0 = train on the centre crop.",
    )
    crop_scale: float = Field(
        0.08, gt=0.0, le=1.0,
        description="Smallest area fraction of the training RandomResizedCrop (main_lincls: 0.08).",
    )
    flip: bool = Field(
        True,
        description="Random horizontal flip of the training views (main_lincls: on). Turn it off for "
        "classes a mirror changes, such as digits or text.",
    )


class LinclsConfig(BaseModel):
    """Everything `mauctl lincls` needs; the defaults are the original main_lincls.py's protocol."""

    model_config = ConfigDict(extra="forbid")
    data: DataConfig = DataConfig()
    lincls: ProbeConfig = ProbeConfig()
    optim: OptimConfig = LINCLS_OPTIM
    run: RunConfig = RunConfig()
    launch: LaunchConfig = LaunchConfig()


AnyConfig = PretrainConfig | LinclsConfig


def torchvision_archs() -> list[str]:
    """Names of torchvision's classification models (imported lazily: torchvision is slow to import)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def describe(schema: type[BaseModel], dotted: str) -> str:
    """One-line help for ``section.key``: the field description and its default."""
    section, key = dotted.split(".")
    section_model = schema.model_fields[section].default
    info = type(section_model).model_fields[key]
    default = getattr(section_model, key)
    shown = "" if default == "" else f", default {_toml_value(default)}"
    return f"{(info.description or '').rstrip('.')}; {dotted}{shown}."


# ---------------------------------------------------------------- layers and merge


@dataclass
class Layer:
    """One source of values: a label for messages ("--set", "presets/v1-b128.toml", ...) and nested values."""

    label: str
    values: dict[str, Any]


@dataclass
class Resolved:
    config: AnyConfig
    origin: dict[str, str] = field(default_factory=dict)  # "section.key" -> label of the layer that set it
    preset: str | None = None  # --preset, or the [preset] base of a --config file written by mauctl


def known_keys(schema: type[BaseModel]) -> dict[str, list[str]]:
    return {
        name: list(type(info.default).model_fields) for name, info in schema.model_fields.items()
    }


def check_keys(schema: type[BaseModel], layer: Layer) -> None:
    """Every key of the layer exists in the schema; otherwise name each unknown one and its closest match."""
    sections = known_keys(schema)
    problems = []
    for section, values in layer.values.items():
        if section not in sections:
            owners = [f"{s}.{section}" for s, keys in sections.items() if section in keys]
            if owners:
                problems.append(f"'{section}' belongs in a section: did you mean '{owners[0]}'?")
            else:
                problems.append(f"unknown section '{section}' ({did_you_mean(section, sections)})")
            continue
        if not isinstance(values, Mapping):
            problems.append(f"'{section}' must be a table of keys, got {values!r}")
            continue
        all_dotted = [f"{s}.{k}" for s, keys in sections.items() for k in keys]
        for key in values:
            if key not in sections[section]:
                problems.append(f"unknown key '{section}.{key}' ({did_you_mean(f'{section}.{key}', all_dotted)})")
    if problems:
        raise UsageError(f"{layer.label}: " + "; ".join(problems))


def resolve(schema: type[BaseModel], layers: Iterable[Layer]) -> Resolved:
    """Merge the layers (later ones win, key by key) over the defaults and validate once."""
    merged: dict[str, dict[str, Any]] = {}
    origin: dict[str, str] = {}
    for layer in layers:
        check_keys(schema, layer)
        for section, values in layer.values.items():
            for key, value in values.items():
                merged.setdefault(section, {})[key] = value
                origin[f"{section}.{key}"] = layer.label
    try:
        config = schema.model_validate(merged)
    except ValidationError as exc:
        raise UsageError(validation_message(exc, merged, origin)) from None
    return Resolved(config, origin)


def validation_message(exc: ValidationError, merged: Mapping, origin: Mapping[str, str]) -> str:
    lines = ["invalid configuration:"]
    for err in exc.errors():
        loc = [str(part) for part in err["loc"] if not str(part).startswith(("function-", "literal["))]
        # pydantic puts the failing branch of a union in the location; keep section.key
        loc = [p for p in loc if p not in ("int", "str", "float", "bool")][:2]
        dotted = ".".join(loc)
        msg = err["msg"].removeprefix("Value error, ")
        if len(loc) == 2:
            value = merged.get(loc[0], {}).get(loc[1], "<default>")
            source = origin.get(dotted, "defaults")
            lines.append(f"  {dotted} = {value!r} (from {source}): {msg}")
        elif loc:
            lines.append(f"  {dotted}: {msg}")
        else:
            lines.append(f"  {msg}")
    return "\n".join(dict.fromkeys(lines))


# ---------------------------------------------------------------- layer readers


def read_toml(path: Path, label: str | None = None) -> dict[str, Any]:
    label = label or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{label}: no such file", hint="Check the path given to --config.") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise UsageError(f"{label}: cannot read it as a TOML file ({exc.__class__.__name__})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None) or _line_from_message(str(exc))
        where = f"{label}:{line}" if line else label
        raise UsageError(f"{where}: TOML syntax error: {exc}") from None


def _line_from_message(message: str) -> int | None:
    match = re.search(r"line (\d+)", message)
    return int(match.group(1)) if match else None


def parse_set(assignment: str, schema: type[BaseModel] | None = None) -> Layer:
    """``section.key=value`` -> a layer. The value is read as TOML (numbers, booleans, lists), else as a
    string; for a key whose type is a string (given ``schema``) it stays the text as written."""
    label = f"--set {assignment}"
    dotted, sep, raw = assignment.partition("=")
    parts = dotted.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise UsageError(f"{label}: expected section.key=value, e.g. --set optim.lr=0.06")
    value = parse_value(raw.strip())
    if schema is not None and _annotation(schema, *parts) is str and not isinstance(value, str):
        value = raw.strip()
    return Layer(label, {parts[0]: {parts[1]: value}})


def field_annotation(schema: type[BaseModel], dotted: str) -> Any:
    """The type of ``section.key`` in ``schema`` (None for an unknown key)."""
    return _annotation(schema, *dotted.split("."))


def _annotation(schema: type[BaseModel], section: str, key: str) -> Any:
    section_info = schema.model_fields.get(section)
    if section_info is None:
        return None
    field_info = type(section_info.default).model_fields.get(key)
    return field_info.annotation if field_info else None


def parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def env_layer(schema: type[BaseModel], environ: Mapping[str, str] | None = None) -> Layer:
    """``MAUCTL_<SECTION>__<KEY>`` variables, read by pydantic-settings (case-insensitive; lists as JSON).

    Other ``MAUCTL_`` names without ``__`` (``MAUCTL_DEBUG``, ``MAUCTL_CACHE``) are not config.
    """
    environ = dict(os.environ if environ is None else environ)
    settings_cls = create_model(
        f"{schema.__name__}Env",
        __base__=BaseSettings,
        **{name: (info.annotation, info.default) for name, info in schema.model_fields.items()},
    )
    source = EnvSettingsSource(
        settings_cls, env_prefix=ENV_PREFIX, env_nested_delimiter="__", case_sensitive=False
    )
    source.env_vars = {name.lower(): value for name, value in environ.items()}
    names = sorted(n for n in environ if n.upper().startswith(ENV_PREFIX) and "__" in n)
    try:
        values = source()
    except SettingsError as exc:
        shown = ", ".join(f"{n}={environ[n]!r}" for n in names) or "MAUCTL_* variables"
        raise UsageError(f"environment ({shown}): {exc}",
                         hint="Lists are written as JSON, e.g. MAUCTL_OPTIM__SCHEDULE='[120, 160]'.") from None
    for name in names:  # pydantic-settings skips unknown sections; they are errors here
        section = name[len(ENV_PREFIX) :].lower().partition("__")[0]
        values.setdefault(section, {})
    label = "environment (" + ", ".join(names) + ")" if names else "environment"
    return Layer(label, values)


# ---------------------------------------------------------------- TOML output


def to_toml(config: BaseModel, header: str = "", preset: str | None = None) -> str:
    """The config as TOML that `read_toml` + `resolve` turn back into the identical config.

    ``preset``: the preset it started from, written as ``[preset] base`` so that a run of this file
    says which preset it is (the values below are complete without it).
    """
    lines = [f"# {line}" for line in header.splitlines()]
    if preset:
        command = "pretrain" if isinstance(config, PretrainConfig) else "lincls"
        lines += ["", "[preset]", f"command = {_toml_value(command)}", f"base = {_toml_value(preset)}"]
    for section, model in config:
        lines += ["", f"[{section}]"]
        for key, value in model:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # JSON escapes are TOML escapes, but JSON leaves DEL raw and TOML forbids it
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


# ---------------------------------------------------------------- from command line to config


def loss_name(loss: LossConfig) -> str | None:
    """The published loss column this loss config is, else None."""
    for name, values in presets.loss_columns().items():
        if _same_loss(LossConfig.model_validate(values), loss):
            return name
    return None


def _same_loss(a: LossConfig, b: LossConfig) -> bool:
    """Equal where it matters: a zero-weight term's own parameters do not change the loss."""
    if a.unif_w > 0 and (a.intra_batch != b.intra_batch or a.unif_groups != b.unif_groups):
        return False
    for weight, param in (("contr_w", "contr_tau"), ("align_w", "align_alpha"), ("unif_w", "unif_t")):
        if getattr(a, weight) != getattr(b, weight):
            return False
        if getattr(a, weight) > 0 and getattr(a, param) != getattr(b, param):
            return False
    return True


def load_config(
    command: Literal["pretrain", "lincls"],
    *,
    preset: str | None = None,
    config_file: Path | None = None,
    loss: str | None = None,
    flags: Mapping[str, Any] | None = None,
    sets: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Resolved:
    """Build the layers of the module docstring and resolve them.

    ``flags`` maps ``section.key`` to the values of the flags that were given (None = not given).
    ``--loss NAME`` sets the loss.* values of that column; it is a flag, below the specific flags
    and ``--set``. For pretraining, an empty ``run.out`` becomes ``runs/<preset>_<loss>``.
    """
    schema: type[BaseModel] = PretrainConfig if command == "pretrain" else LinclsConfig
    layers: list[Layer] = []
    names = []
    if preset is not None:
        p = presets.load_preset(preset)
        if p.command != command:
            raise UsageError(f"preset '{preset}' is a {p.command} preset, not a {command} one",
                             hint=f"{command} presets: " + ", ".join(_presets_for(command)) + ".")
        layers.append(Layer(f"preset {preset} ({p.path})", p.values))
        names.append(preset)
    base = None
    if config_file is not None:
        data = read_toml(config_file)
        declared = "command" in data.get("preset", {})
        base = data.get("preset", {}).pop("base", None)
        p = presets.preset_from_toml(data, config_file)
        if declared and p.command != command:
            raise UsageError(f"{config_file} is a {p.command} config, not a {command} one")
        layers.append(Layer(str(config_file), p.values))
        names.append(config_file.stem)
    layers.append(env_layer(schema, environ))
    if loss is not None:
        if command != "pretrain":
            raise UsageError("--loss only applies to pretraining")
        layers.append(Layer(f"--loss {loss}", {"loss": presets.loss_values(loss)}))
    cli = {}
    for dotted, value in (flags or {}).items():
        if value is not None:
            section, key = dotted.split(".")
            cli.setdefault(section, {})[key] = value
    if cli:
        layers.append(Layer("command-line flags", cli))
    layers += [parse_set(s, schema) for s in sets]
    resolved = resolve(schema, layers)
    resolved.preset = preset or (str(base) if base else None)
    config = resolved.config
    if command == "pretrain" and not config.run.out:
        name = names[-1] if names else "custom"
        run = f"{name}_{loss_name(config.loss) or 'custom-loss'}"
        if config.run.seed:
            run += f"_seed{config.run.seed}"
        config.run.out = str(Path("runs") / run)
        resolved.origin["run.out"] = "derived from the preset and loss"
    return resolved


def _presets_for(command: str) -> list[str]:
    return [p.name for p in presets.all_presets() if p.command == command]


# Keys that say where or how fast a run ran, not what it computed: left out of the digest.
NOT_IN_DIGEST = {"data.root", "data.workers", "data.max_bad_fraction", "run.out", "run.print_freq", "run.resume",
                 "run.save_every", "run.save_minutes", "run.device", "run.precision", "run.tensorboard",
                 "run.compile", "run.channels_last", "run.stop_on_collapse", "data.pipeline",
                 "data.gpu_decode"}
NOT_IN_DIGEST_SECTIONS = {"launch", "eval"}  # how it was launched and watched

# Keys added after runs were first saved, with what a saved config without them computed.
ADDED_KEYS = {"loss.unif_groups": "global"}  # before it, L_uniform was one log-mean-exp over the global batch


def saved_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """A config that mauctl saved (a run's config.toml, a checkpoint's), with the values of the keys it
    was saved without (ADDED_KEYS): an older run reads as what it computed."""
    out = {section: dict(values) if isinstance(values, Mapping) else values for section, values in data.items()}
    for dotted, value in ADDED_KEYS.items():
        section, key = dotted.split(".")
        if isinstance(out.get(section), dict):  # a lincls config has no [loss]
            out[section].setdefault(key, value)
    return out


def config_digest(config: BaseModel | Mapping[str, Any]) -> str:
    """sha256 of what a config computes (sections and keys sorted; paths, speed and launch left out).

    An added key at the value its absence meant is left out too: a saved config keeps the digest it had.
    """
    import hashlib

    data = config.model_dump() if isinstance(config, BaseModel) else config
    kept = {
        section: {k: v for k, v in values.items() if _in_digest(f"{section}.{k}", v)}
        for section, values in data.items() if section not in NOT_IN_DIGEST_SECTIONS
    }
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def _in_digest(dotted: str, value: Any) -> bool:
    return dotted not in NOT_IN_DIGEST and not (dotted in ADDED_KEYS and value == ADDED_KEYS[dotted])
