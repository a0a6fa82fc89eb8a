"""`mauctl doctor`: is this machine ready for a long run? `--smoke` proves it end to end.

The report looks at what a run will ask of the machine, sized from the config a run would use
(``--preset``/``--set``, the original's defaults otherwise): versions, GPUs, cores and memory, the
open-file limit, /dev/shm, free disk under the run directory, and whether the process-group backends
start; with DATA, the images, their decode rate and bad files in a sample.

``--smoke`` then runs the real commands, as subprocesses, on a synthetic JPEG folder, once per
device type (the CPU always, CUDA when there is one), with that device's defaults: pretrain, a
stop signal and a resume, the probe per epoch and on cached features, export and reload, bench.
In this process it also times a steady-state step and checks, on CUDA, that the step never waits
for the host, that nothing recompiles after warm-up, and that nvJPEG decodes in order.

Every check prints one line, ``PASS``/``FAIL``/``SKIP name: detail``; a FAIL says what to do.
"""

from __future__ import annotations

import collections
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mauctl.config import PretrainConfig
from mauctl.errors import MauctlError
from mauctl.text import plural

FORMAT = "mauctl.doctor/1"
PREFETCH = 4  # batches each loader worker keeps ready (data/loader.py make_loader)
FILES_PER_BATCH = 8  # tensors (hence shared-memory file descriptors) in one collated batch, with margin
FILES_BASE = 256  # libraries, sockets, logs and checkpoints a training process holds open besides
SAMPLE = 64  # images decoded for the rate and the bad-file check
SMOKE_EPOCHS = 3


@dataclass
class Check:
    name: str
    status: str  # PASS, FAIL or SKIP
    detail: str
    fix: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        took = f" [{self.seconds:.0f} s]" if self.seconds >= 1 else ""
        return f"{self.status} {self.name}: {self.detail}" + (f"; {self.fix}" if self.fix else "") + took


class Doctor:
    """The checks so far, each printed as it is made."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.checks: list[Check] = []
        self.facts: dict[str, Any] = {}

    def add(self, name: str, status: str, detail: str, fix: str = "", seconds: float = 0.0) -> Check:
        check = Check(name, status, detail, fix, round(seconds, 1))
        self.checks.append(check)
        self.echo(check.line())
        return check

    def run(self, name: str, fn: Callable[[], tuple[str, str] | tuple[str, str, str]]) -> Check:
        """``fn`` returns (status, detail[, fix]); an exception is a FAIL that names it. Timed."""
        start = time.perf_counter()
        try:
            result = fn()
        except MauctlError as exc:
            result = ("FAIL", exc.message, exc.hint or "")
        except Exception as exc:  # a doctor reports every failure and goes on
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            result = ("FAIL", f"{type(exc).__name__}: {text}"[:400], "rerun with --debug for the traceback")
        status, detail, fix = (*result, "")[:3]
        return self.add(name, status, detail, fix, time.perf_counter() - start)

    @property
    def failed(self) -> bool:
        return any(c.status == "FAIL" for c in self.checks)

    def json(self) -> str:
        return json.dumps({"format": FORMAT, "ok": not self.failed, "facts": self.facts,
                           "checks": [asdict(c) for c in self.checks]}, indent=2) + "\n"


# ---------------------------------------------------------------- the report


def report(doc: Doctor, cfg: PretrainConfig, data: Path | None) -> None:
    """Everything but the smoke test, for a run of ``cfg`` (on ``data`` when given)."""
    doc.run("versions", versions)
    doc.run("gpu", lambda: gpus(doc.facts))
    doc.run("cpu", lambda: cpu(doc.facts))
    from mauctl.launch import device_type

    device = device_type(cfg.run)
    processes = _processes(cfg, device)
    pipeline = _pipeline(cfg, device)
    workers = _workers(cfg, processes)
    doc.facts.update(device=device, processes_per_node=processes, workers_per_process=workers, pipeline=pipeline)
    doc.run("open files", lambda: open_files(workers))
    doc.run("/dev/shm", lambda: shared_memory(cfg, processes, workers, pipeline))
    doc.run("disk", lambda: disk(cfg))
    doc.run("gloo", lambda: process_group("gloo"))
    if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
        doc.run("nccl", lambda: process_group("nccl"))
    else:
        doc.add("nccl", "SKIP", "needs 2 GPUs on this node" if torch.cuda.is_available() else "no GPU")
    if data is not None:
        index = {}
        doc.run("data", lambda: dataset(data, index))
        if "train" in index:
            doc.run("decode", lambda: decode_rate(index["train"], workers * processes, cfg.data.max_bad_fraction))


def versions() -> tuple[str, str]:
    import torchvision

    parts = [f"Python {platform.python_version()}", f"torch {torch.__version__}", f"torchvision {torchvision.__version__}"]
    if torch.version.cuda:
        parts.append(f"CUDA {torch.version.cuda}")
        if torch.backends.cudnn.is_available():
            parts.append(f"cuDNN {torch.backends.cudnn.version()}")
        if torch.cuda.is_available():
            parts.append("NCCL " + ".".join(map(str, torch.cuda.nccl.version())))
    else:
        parts.append("a CPU-only build of torch")
    return "PASS", ", ".join(parts)


def gpus(facts: dict[str, Any]) -> tuple[str, str] | tuple[str, str, str]:
    if not torch.version.cuda:
        return "SKIP", "this torch has no CUDA: runs use the CPU"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return "SKIP", "no GPU visible" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "") \
            + ": runs use the CPU"
    found = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        with torch.cuda.device(i):
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        found.append(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, compute {p.major}.{p.minor}, "
                     f"bf16 {'yes' if bf16 else 'no (use --set run.precision=fp16)'}")
    facts["gpus"] = found
    return "PASS", "; ".join(found)


def cpu(facts: dict[str, Any]) -> tuple[str, str]:
    from mauctl.engine.runtime import cpu_computes_bf16_fast

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    memory = _meminfo()
    facts.update(cpu=platform.processor() or platform.machine(), cores=cores,
                 memory_bytes=memory.get("MemTotal"), available_memory_bytes=memory.get("MemAvailable"))
    ram = (f", {memory['MemTotal'] / 2**30:.1f} GiB RAM ({memory['MemAvailable'] / 2**30:.1f} available)"
           if memory else "")
    bf16 = "bf16 in hardware" if cpu_computes_bf16_fast() else "no bf16 in hardware (fp32 on the CPU)"
    return "PASS", f"{plural(cores, 'core')} usable{ram}, {bf16}"


def _meminfo() -> dict[str, int]:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    values = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            values[key] = int(rest.split()[0]) * 1024
    return values if "MemTotal" in values and "MemAvailable" in values else {}


def open_files(workers: int) -> tuple[str, str] | tuple[str, str, str]:
    """Each batch a worker has ready holds a few shared-memory file descriptors in the training process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = FILES_BASE + workers * PREFETCH * FILES_PER_BATCH
    detail = (f"limit {_limit(soft)} (hard {_limit(hard)}), a training process needs about {need:,} "
              f"({plural(workers, 'loader worker')} x {PREFETCH} batches ready x {FILES_PER_BATCH} + {FILES_BASE})")
    if soft != resource.RLIM_INFINITY and soft < need:
        fix = (f"run `ulimit -n {max(need * 2, 4096)}` before mauctl" if hard == resource.RLIM_INFINITY or hard >= need
               else f"ask for a hard limit of at least {need:,} (/etc/security/limits.conf, or the container's "
                    "--ulimit nofile), or use fewer --workers")
        return "FAIL", detail, fix
    return "PASS", detail


def _limit(n: int) -> str:
    return "unlimited" if n == resource.RLIM_INFINITY else f"{n:,}"


def batch_bytes(cfg: PretrainConfig, processes: int, pipeline: str) -> int:
    """Bytes of one process's collated batch as the loader workers hand it over (shared memory)."""
    per_rank = cfg.optim.batch_size // max(processes, 1)
    pixels = 2 * 3 * cfg.data.image_size ** 2  # two views
    if pipeline == "pil":
        return per_rank * pixels * 4  # float32, normalised in the workers
    if cfg.data.gpu_decode:
        return per_rank * 200_000  # the files' bytes: a few hundred kB per ImageNet JPEG, with margin
    return per_rank * pixels  # uint8 crops


def shared_memory(cfg: PretrainConfig, processes: int, workers: int, pipeline: str
                  ) -> tuple[str, str] | tuple[str, str, str]:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return "SKIP", "no /dev/shm on this system (the loader shares batches another way)"
    free = shutil.disk_usage(shm).free
    need = processes * workers * PREFETCH * batch_bytes(cfg, processes, pipeline)
    detail = (f"{_gib(free)} free, batches in flight need about {_gib(need)} ({plural(processes, 'process', 'processes')} "
              f"x {plural(workers, 'worker')} x {PREFETCH} batches of {cfg.optim.batch_size // processes} at "
              f"{cfg.data.image_size} px, {pipeline} pipeline)")
    if free < need:
        return ("FAIL", detail, "give the container more shared memory (docker run --shm-size=16g, or the "
                                "Kubernetes emptyDir medium: Memory), or use fewer --workers")
    return "PASS", detail


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def disk(cfg: PretrainConfig) -> tuple[str, str] | tuple[str, str, str]:
    from mauctl.prepare import checkpoint_bytes

    out = Path(cfg.run.out or "runs")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    free = shutil.disk_usage(existing).free
    ckpt = checkpoint_bytes(cfg)
    need = 3 * ckpt + 2**30  # the last checkpoint, the one being written, the best probe's; logs
    detail = f"{_gib(free)} free under {existing}, a run writes checkpoints of about {_gib(ckpt)}"
    if free < need:
        return "FAIL", detail, f"free at least {_gib(need)} there, or choose another --out"
    return "PASS", detail


def process_group(backend: str) -> tuple[str, str] | tuple[str, str, str]:
    """Two processes on this node join a ``backend`` group and all-reduce; what a multi-process run does first."""
    port = _free_port()
    started = time.perf_counter()
    code = ("import os, sys, torch, torch.distributed as dist\n"
            "rank = int(sys.argv[1]); backend = sys.argv[2]\n"
            "device = torch.device('cuda', rank) if backend == 'nccl' else torch.device('cpu')\n"
            "if backend == 'nccl': torch.cuda.set_device(device)\n"
            "dist.init_process_group(backend, init_method='tcp://127.0.0.1:' + sys.argv[3], rank=rank, world_size=2)\n"
            "t = torch.tensor([rank + 1.0], device=device)\n"
            "dist.all_reduce(t)\n"
            "assert t.item() == 3.0, t.item()\n"
            "dist.destroy_process_group()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(rank), backend, str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            return ("FAIL", f"2 processes did not finish joining a {backend} group within 120 s",
                    "check that 127.0.0.1 is reachable and no firewall blocks local ports")
    if any(p.returncode for p in procs):
        last = next((o.strip().splitlines()[-1] for o in outputs if o.strip()), "no output")
        fix = ("check the NCCL installation (NCCL_DEBUG=INFO says more)" if backend == "nccl"
               else "check that 127.0.0.1 is reachable; set GLOO_SOCKET_IFNAME to the interface to use")
        return "FAIL", f"2 processes could not all-reduce over {backend}: {last[:300]}", fix
    return "PASS", f"2 processes joined and all-reduced in {time.perf_counter() - started:.1f} s"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dataset(data: Path, found: dict[str, Any]) -> tuple[str, str]:
    from mauctl.data.folder import check_splits, scan_split, scan_split_if_present

    train = scan_split(data, "train")
    val = scan_split_if_present(data, "val")
    check_splits(train, val, "pretrain")
    found["train"] = train
    text = f"{len(train.samples):,} images in {plural(len(train.classes), 'class', 'classes')} under {train.root}"
    if val is not None:
        text += f", {len(val.samples):,} in val/"
    else:
        text += "; no val/ (the probe needs one)"
    return "PASS", text


def decode_rate(train: Any, workers: int, max_bad: float) -> tuple[str, str] | tuple[str, str, str]:
    """Decode a random sample as the loader does; the rate per core, and the files that fail."""
    from mauctl.data.loader import decode_image, why_bad

    paths = [p for p, _ in random.Random(0).sample(train.samples, min(SAMPLE, len(train.samples)))]
    bad, sizes = [], []
    start = time.perf_counter()
    for path in paths:
        try:
            sizes.append(decode_image(path).size)
        except Exception as exc:
            bad.append(f"{path} ({why_bad(path, exc)})")
    seconds = time.perf_counter() - start
    rate = len(paths) / seconds
    w, h = (int(np.median([s[i] for s in sizes])) for i in (0, 1)) if sizes else (0, 0)
    detail = (f"{rate:,.0f} images/s per core on {len(paths)} sampled (median {w}x{h}): about "
              f"{rate * workers:,.0f} images/s with {plural(workers, 'loader worker')} before augmentation")
    if not bad:
        return "PASS", detail
    detail += f"; {len(bad)} of {len(paths)} sampled do not decode: " + ", ".join(bad[:3])
    if len(bad) / len(paths) > max_bad:
        return "FAIL", detail, (f"more than data.max_bad_fraction = {max_bad} of the sample: a run would stop; "
                                "repair or remove those files")
    return "PASS", detail + f" (a run skips them, up to data.max_bad_fraction = {max_bad})"


def _processes(cfg: PretrainConfig, device: str) -> int:
    if cfg.launch.nproc_per_node != "auto":
        return int(cfg.launch.nproc_per_node)
    return max(1, torch.cuda.device_count()) if device == "cuda" else 1


def _pipeline(cfg: PretrainConfig, device: str) -> str:
    from mauctl.data.pipeline import pipeline_for

    return pipeline_for(cfg, device)


def _workers(cfg: PretrainConfig, processes: int) -> int:
    from mauctl.data.loader import worker_count

    return worker_count(cfg.data.workers, processes)  # what each of the node's processes will start


# ---------------------------------------------------------------- the smoke test


@dataclass
class Smoke:
    """One device type's smoke run: a tiny config with that device's defaults."""

    device: str
    arch: str
    image_size: int
    batch_size: int
    queue_size: int
    classes: int
    per_class: int
    picture: tuple[int, int]  # the synthetic images' width and height
    in_process: bool = True  # also time steps in this process, with the checks that need their tensors
    settings: tuple[tuple[str, Any], ...] = ()  # config keys for those steps beyond the device's defaults

    def flags(self) -> list[str]:
        return ["--arch", self.arch, "--image-size", str(self.image_size), "--batch-size", str(self.batch_size),
                "--set", f"model.queue_size={self.queue_size}", "--device", self.device, "--set", "run.seed=1"]


# On the CPU `mauctl bench` already times the steps, and channels_last is off: no steps in this process.
CPU_SMOKE = Smoke("cpu", "resnet18", 32, 32, 128, classes=4, per_class=24, picture=(64, 48), in_process=False)
CUDA_SMOKE = Smoke("cuda", "resnet18", 96, 128, 1024, classes=4, per_class=160, picture=(200, 150))


def smoke(doc: Doctor, work: Path, devices: list[str]) -> None:
    for device in devices:
        started = time.perf_counter()
        smoke_device(doc, work / device, CPU_SMOKE if device == "cpu" else CUDA_SMOKE)
        doc.facts[f"{device}_smoke_s"] = round(time.perf_counter() - started, 1)


def smoke_device(doc: Doctor, folder: Path, plan: Smoke) -> None:
    """The commands end to end on one device type, in ``folder``."""
    d = plan.device
    data, run = folder / "data", folder / "run"
    doc.run(f"{d} data", lambda: synthetic_jpegs(data, plan))
    pretrain = ["pretrain", str(data), *plan.flags(), "--epochs", str(SMOKE_EPOCHS), "--out", str(run),
                "--set", "run.print_freq=1", "--set", "eval.every=0"]
    if doc.run(f"{d} stop", lambda: stop_after_first_epoch(pretrain, run)).status == "PASS":
        doc.run(f"{d} resume", lambda: resume(pretrain, run))
    # Compiling takes most of a minute per process on CUDA: the pretraining above and the steps in this
    # process compile, as runs do; the probes and the bench do not, to keep the smoke test short.
    quick = ["--set", "run.compile=false"]
    if (run / "checkpoints" / "last.pt").is_file():
        probe = ["lincls", str(run), str(data), "--preset", "lincls", "--image-size", str(plan.image_size),
                 "--batch-size", str(plan.batch_size), "--device", d, "--workers", "2", *quick]
        doc.run(f"{d} probe per-epoch", lambda: lincls([*probe, "--epochs", "1", "--name", "per-epoch"], run,
                                                       "per-epoch"))
        doc.run(f"{d} probe cached", lambda: lincls(
            [*probe, "--epochs", "2", "--name", "cached", "--set", "lincls.cached_features=true",
             "--set", "lincls.augmented_views=2"], run, "cached"))
        doc.run(f"{d} export", lambda: export_and_reload(run, folder / "encoder.safetensors", plan.image_size))
    doc.run(f"{d} bench", lambda: bench(data, plan, quick))
    if plan.in_process:
        in_process_step(doc, data, plan)


def synthetic_jpegs(root: Path, plan: Smoke) -> tuple[str, str]:
    """``root/{train,val}/c<k>/<n>.jpg``: smooth random pictures with a colour per class."""
    rng = np.random.default_rng(0)
    w, h = plan.picture
    count = 0
    for split, per_class in (("train", plan.per_class), ("val", max(4, plan.per_class // 4))):
        for c in range(plan.classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
                small[..., c % 3] = 220
                Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).save(
                    folder / f"{i:04d}.jpg", quality=90)
                count += 1
    return "PASS", f"{count} JPEGs of {w}x{h} in {plan.classes} classes under {root}"


def _mauctl(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "mauctl", *args]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MAUCTL_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    return {**env, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}


def _tail(text: str, lines: int = 3) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept)[-600:] or "no output"


def _records(run: Path) -> list[dict[str, Any]]:
    try:
        text = (run / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return records


def stop_after_first_epoch(argv: list[str], run: Path) -> tuple[str, str] | tuple[str, str, str]:
    """Pretrain; SIGTERM (what SLURM sends) once the second epoch has begun: a checkpoint and exit 75."""
    from mauctl.errors import EXIT_STOPPED

    proc = subprocess.Popen(_mauctl(argv), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if any(r.get("kind") == "step" and r.get("epoch", 0) >= 1 for r in _records(run)):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    try:
        output = proc.communicate(timeout=300)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return "FAIL", "pretraining did not stop within 300 s of SIGTERM", "rerun with --debug; report it as a bug"
    if proc.returncode != EXIT_STOPPED:
        return "FAIL", f"pretraining exited {proc.returncode}, expected {EXIT_STOPPED} after SIGTERM: {_tail(output)}"
    status = json.loads((run / "status.json").read_text())
    first = next((line for line in output.splitlines() if line.startswith("pretrain:")), "")
    return "PASS", (f"SIGTERM in epoch {status['epoch'] + 1} -> checkpoint after its step {status['step_in_epoch']}, "
                    f"exit {EXIT_STOPPED} ({first.partition(', ')[2][:200]})")


def resume(argv: list[str], run: Path) -> tuple[str, str] | tuple[str, str, str]:
    stopped = json.loads((run / "status.json").read_text())
    done = subprocess.run(_mauctl(argv), env=_env(), capture_output=True, text=True, timeout=600, check=False)
    if done.returncode:
        return "FAIL", f"the resume exited {done.returncode}: {_tail(done.stdout + done.stderr)}"
    status = json.loads((run / "status.json").read_text())
    steps = [r["step"] for r in _records(run) if r.get("kind") == "step"]
    redone = len(steps) - len(set(steps))
    if status["state"] != "finished" or status["epoch"] != SMOKE_EPOCHS or redone:
        return "FAIL", f"after the resume: {status}, {redone} steps logged twice"
    return "PASS", (f"went on from epoch {stopped['epoch'] + 1} step {stopped['step_in_epoch'] + 1} and finished "
                    f"{SMOKE_EPOCHS} epochs ({status['global_step']} steps, none redone)")


def lincls(argv: list[str], run: Path, name: str) -> tuple[str, str] | tuple[str, str, str]:
    done = subprocess.run(_mauctl(argv), env=_env(), capture_output=True, text=True, timeout=600, check=False)
    if done.returncode:
        return "FAIL", f"exited {done.returncode}: {_tail(done.stdout + done.stderr)}"
    results = json.loads((run / "lincls" / name / "results.json").read_text())
    if not results.get("finished"):
        return "FAIL", f"results.json says it did not finish: {results}"
    return "PASS", (f"{plural(results['epochs_done'], 'epoch')}, top-1 {results['top1']:.1f} % "
                    f"in {results['wall_time_s']:.1f} s")


def export_and_reload(run: Path, out: Path, image_size: int) -> tuple[str, str] | tuple[str, str, str]:
    from mauctl.export import check_batch, load_exported

    done = subprocess.run(_mauctl(["export", str(run), "--out", str(out)]), env=_env(), capture_output=True,
                          text=True, timeout=300, check=False)
    if done.returncode:
        return "FAIL", f"exited {done.returncode}: {_tail(done.stdout + done.stderr)}"
    module = load_exported(out)
    with torch.no_grad():
        features = module(check_batch(image_size, batch=2))
    if not torch.isfinite(features).all():
        return "FAIL", f"{out} reloaded, but its features are not finite"
    return "PASS", f"{out.name} ({_gib(out.stat().st_size)}) reloaded: features {tuple(features.shape)}"


def bench(data: Path, plan: Smoke, extra: list[str]) -> tuple[str, str] | tuple[str, str, str]:
    argv = ["bench", str(data), *plan.flags(), *extra, "--steps", "3", "--json"]
    done = subprocess.run(_mauctl(argv), env=_env(), capture_output=True, text=True, timeout=600, check=False)
    if done.returncode:
        return "FAIL", f"exited {done.returncode}: {_tail(done.stdout + done.stderr)}"
    rows = {r["measure"]: r for r in json.loads(done.stdout)["results"]}
    return "PASS", ", ".join(f"{m} {rows[m]['images_per_s']:,.0f} img/s" for m in ("data", "compute", "end-to-end")
                             if m in rows)


class Steps:
    """Training steps on a loader's batches, epoch after epoch, numbered on."""

    def __init__(self, training: Any, train: Any) -> None:
        from mauctl.bench import forever

        self.training, self.train, self.count = training, train, 0
        self.batches = forever(train.batches)

    def __call__(self, n: int = 1) -> dict[str, torch.Tensor]:
        for _ in range(n):
            x_q, x_k, _ = next(self.batches)
            self.count += 1
            shuffle = torch.Generator(self.training.rt.device).manual_seed(self.count)
            terms = self.training.step(x_q, x_k, shuffle, self.count)
        return terms

    def sync(self) -> None:
        if self.training.rt.device.type == "cuda":
            torch.cuda.synchronize(self.training.rt.device)


def in_process_step(doc: Doctor, data: Path, plan: Smoke) -> None:
    """Steady-state training steps in this process, with the smoke run's config; CUDA's extra checks."""
    from mauctl.config import load_config
    from mauctl.data.folder import scan_split
    from mauctl.data.pipeline import TrainData
    from mauctl.engine import runtime
    from mauctl.pretrain import Training

    d = plan.device
    cfg = load_config("pretrain", flags={"data.root": str(data), "model.arch": plan.arch,
                                         "data.image_size": plan.image_size, "optim.batch_size": plan.batch_size,
                                         "model.queue_size": plan.queue_size, "run.device": d, **dict(plan.settings)},
                      environ={}).config
    rt = runtime.start(d, cfg.run.precision)
    try:
        training, train = Training(cfg, rt), TrainData(cfg, rt, scan_split(data, "train"))
        steps = Steps(training, train)

        def warm_up() -> tuple[str, str]:
            start = time.perf_counter()
            steps(3)
            steps.sync()
            return "PASS", (f"3 warm-up steps ({training.describe()}, {train.pipeline} pipeline) in "
                            f"{time.perf_counter() - start:.1f} s")

        if doc.run(f"{d} warm-up", warm_up).status == "PASS":
            if d == "cuda":
                doc.run("cuda host syncs", lambda: host_syncs(steps))
                doc.run("cuda recompiles", lambda: recompiles(steps))
            doc.run(f"{d} channels_last", lambda: channels_last(steps))
            doc.run(f"{d} steady step", lambda: steady(steps, plan))
        if d == "cuda":
            doc.run("cuda nvJPEG ordering", lambda: nvjpeg_ordering(rt.device))
        train.close()
    finally:
        rt.close()


def host_syncs(steps: Steps) -> tuple[str, str] | tuple[str, str, str]:
    """CUDA's sync debug mode around a batch and a step: where the host waits for the GPU, if anywhere."""
    steps.sync()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            steps()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    sites = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                                if "synchroniz" in str(w.message).lower() and "prototype" not in str(w.message))
    if sites:
        return ("FAIL", "the host waited for the GPU at " + ", ".join(f"{s} ({n}x)" for s, n in sites.items()),
                "a bug in mauctl: report it with this line")
    return "PASS", "a batch and a step ran under torch.cuda.set_sync_debug_mode('warn') without a host sync"


def recompiles(steps: Steps) -> tuple[str, str] | tuple[str, str, str]:
    if not steps.training.compiled:
        return "SKIP", "run.compile is off"
    from torch._dynamo.utils import counters

    def traced() -> int:
        return sum(counters["stats"].values()) + sum(counters["recompiles"].values())

    before = traced()
    steps(3)
    steps.sync()
    if traced() != before:
        return ("FAIL", f"torch.compile traced again after warm-up ({dict(counters['recompiles'])})",
                "a bug in mauctl: report it with the output of TORCH_LOGS=recompiles")
    return "PASS", "3 more steps, no new graph and no recompile"


def channels_last(steps: Steps) -> tuple[str, str] | tuple[str, str, str]:
    training = steps.training
    if not training.channels_last:
        return "SKIP", "run.channels_last is off"
    seen: collections.Counter = collections.Counter()

    def hook(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            seen[args[0].is_contiguous(memory_format=torch.channels_last)] += 1

    layers = [m for m in training.model.encoder_q.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))]
    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        x_q, _, _ = next(steps.batches)
        with torch.no_grad(), training.rt.autocast():  # the module itself: hooks on the compiled one would recompile it
            training.model.encoder_q(x_q.contiguous(memory_format=torch.channels_last))
    finally:
        for handle in handles:
            handle.remove()
    if seen[False]:
        detail = f"{seen[False]} of {seen[False] + seen[True]} convolution/BatchNorm inputs are not channels_last"
        return "FAIL", detail, "a bug in mauctl: report it with this line"
    return "PASS", f"all {seen[True]} convolution/BatchNorm inputs of the encoder are channels_last"


def steady(steps: Steps, plan: Smoke) -> tuple[str, str] | tuple[str, str, str]:
    device = steps.training.rt.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps.sync()
    start = time.perf_counter()
    terms = steps(5)
    steps.sync()
    seconds = time.perf_counter() - start
    loss = terms["loss"].item()
    if not np.isfinite(loss):
        return "FAIL", f"the loss is {loss} after {steps.count} steps", "a bug in mauctl: report it with this line"
    text = f"5 steps at {5 * plan.batch_size / seconds:,.0f} images/s end to end, loss {loss:.4f}"
    if device.type == "cuda":
        text += f", peak GPU memory {_gib(torch.cuda.max_memory_allocated(device))}"
    return "PASS", text


def nvjpeg_ordering(device: torch.device) -> tuple[str, str] | tuple[str, str, str]:
    from mauctl.data.batch_augment import gpu_decode_ordering_errors

    trials = 20
    bad = gpu_decode_ordering_errors(device, trials)
    if bad:
        return ("FAIL", f"{bad} of {trials} reads of memory freed before a GPU decode saw it overwritten",
                "keep data.gpu_decode off (the default) and report it with this line")
    return "PASS", f"{trials} GPU decodes after queued reads of freed memory: no read corrupted"


def run_doctor(cfg: PretrainConfig, data: Path | None, smoke_test: bool, work: Path | None,
               echo: Callable[[str], None]) -> Doctor:
    doc = Doctor(echo)
    report(doc, cfg, data)
    if smoke_test:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        if work is None:
            with tempfile.TemporaryDirectory(prefix="mauctl-doctor-") as tmp:
                smoke(doc, Path(tmp), devices)
        else:
            work.mkdir(parents=True, exist_ok=True)
            smoke(doc, work, devices)
    return doc
