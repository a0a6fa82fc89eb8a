"""The process a worker runs in: process group, device, precision, seeds, stop signals.

Written once for every job (pretrain, lincls). A worker is started by torchrun (``mauctl``'s
own launcher, or the user's torchrun / srun); a single process without RANK/WORLD_SIZE works
too and then has no process group at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from mauctl.errors import RunError, UsageError

# SIGUSR2: what submitit asks SLURM to send before a time limit (`mauctl sweep --executor slurm`)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dtype: torch.dtype  # autocast dtype; float32 = no autocast
    distributed: bool
    stop: StopFlag = field(default_factory=lambda: StopFlag())
    host_group: object = None  # a gloo group beside NCCL: host-side agreements without waiting for the GPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's rows, in rank order (no gradient)."""
        if not self.distributed:
            return x
        x = dense(x)
        parts = [torch.empty_like(x) for _ in range(self.world_size)]  # in x's memory format
        dist.all_gather(parts, x)
        return torch.cat(parts)

    def gather_shards(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """Reassemble rows sharded as ``range(rank, total, world_size)`` (see ShardSampler) on every rank."""
        if not self.distributed:
            return local
        out = local.new_empty(total, *local.shape[1:])
        out[self.rank::self.world_size] = local
        return self.fill_shards(out)

    def fill_shards(self, rows: torch.Tensor, chunk_bytes: int = 32 << 20) -> torch.Tensor:
        """``gather_shards`` in place: each rank has written its own rows into ``rows``; the others' come in.

        The rows travel a chunk at a time, at most 1/64 of a shard and ``chunk_bytes`` a rank: the
        buffers (the backend's own too) stay a few percent of ``rows``, however large ``rows`` is.
        """
        if not self.distributed or len(rows) == 0:
            return rows
        world, total = self.world_size, len(rows)
        longest = -(-total // world)  # rows per rank; the last ranks may have one fewer
        step = max(1, min(-(-longest // 64), chunk_bytes // max(1, rows[0].numel() * rows.element_size())))
        send = rows.new_zeros(step, *rows.shape[1:])
        received = rows.new_empty(world, step, *rows.shape[1:])
        for first in range(0, longest, step):  # rows first .. first + step - 1 of every rank's shard
            mine = rows[self.rank + first * world:self.rank + (first + step) * world:world]
            send[:len(mine)] = mine
            dist.all_gather(list(received.unbind(0)), send)
            for rank in range(world):
                if rank != self.rank:
                    theirs = rows[rank + first * world:rank + (first + step) * world:world]
                    theirs.copy_(received[rank, :len(theirs)])
        return rows

    def with_own_rows(self, x_local: torch.Tensor) -> torch.Tensor:
        """The global batch with this rank's rows still attached to its autograd graph.

        Every rank then computes the same global loss, and the gradient reaching its own rows is
        the exact partial derivative of that loss; the others' rows get theirs on their rank.
        """
        if not self.distributed:
            return x_local
        parts = [torch.empty_like(x_local) for _ in range(self.world_size)]
        dist.all_gather(parts, x_local.detach().contiguous())
        parts[self.rank] = x_local
        return torch.cat(parts)

    # ---- host-side values: every collective on them is one of these methods
    # Stop flags, bad-image lists, checkpoint paths and failures live on the host. They cross the
    # ranks over host_group (gloo beside NCCL; None = the default group, gloo without CUDA) in CPU
    # tensors: over NCCL each exchange would wait for all the GPU work queued before it.

    def agreed_stop(self) -> int:
        """The stop signal any rank received (0 if none): the same number on every rank, so all stop together."""
        return self._max_over_ranks(self.stop.signum or 0)

    def main_says(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank."""
        return bool(self._max_over_ranks(int(flag and self.is_main))) if self.distributed else flag

    def _max_over_ranks(self, value: int) -> int:
        """The largest ``value`` any rank passed (asked every step)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int32, device=self.device if self.host_group is None else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        return int(t.item())

    def broadcast_object(self, obj: object) -> object:
        """Rank 0's ``obj`` (picklable) on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.host_group)
        return box[0]

    def gather_objects(self, obj: object) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, obj, group=self.host_group)
        return parts

    def close(self) -> None:
        self.stop.restore()
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` if it is dense in its memory format (contiguous or channels_last), else a contiguous copy.

    What a collective needs: ``.contiguous()`` alone would turn a channels_last batch back into NCHW.
    """
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


class StopFlag:
    """Set by SIGTERM / SIGUSR1 / SIGUSR2 / SIGINT (what SLURM and Ctrl-C send): finish the step, save, exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()


def resolve_device(requested: str, local_rank: int) -> torch.device:
    """This process's device: the GPU of its local rank, or the only GPU it sees.

    torchrun on a node shows every process all the GPUs (local rank i takes cuda:i); SLURM's
    ``--gpus-per-task=1`` shows each process its own GPU alone, as cuda:0. An explicit ``cuda:N``
    is taken as is (the launch plan refuses it with several processes per node).
    """
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"run.device = {requested!r} but CUDA is not available here", hint="Use --device cpu.")
    if requested.startswith("cuda:"):
        return torch.device(requested)
    visible = torch.cuda.device_count()
    if local_rank < visible:
        return torch.device("cuda", local_rank)
    if visible == 1:
        return torch.device("cuda", 0)
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    raise UsageError(
        f"local rank {local_rank} has no GPU of its own: this process sees {visible} GPUs "
        + (f"(CUDA_VISIBLE_DEVICES={shown})" if shown is not None else "(CUDA_VISIBLE_DEVICES is not set)"),
        hint="Start at most one process per visible GPU on each node (--nproc-per-node, srun --ntasks-per-node), "
             "or give each process exactly one GPU (srun --gpus-per-task=1).",
    )


def tune_backends(device: torch.device) -> None:
    """Speed settings for ``device``: on CUDA, cuDNN times its convolution algorithms the first time it
    meets a shape and keeps the fastest (a training step's shapes are the same from step to step)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def resolve_auto(value: bool | str, device: torch.device) -> bool:
    """A speed switch whose "auto" means: on for CUDA, off on CPU."""
    return device.type == "cuda" if value == "auto" else bool(value)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """run.precision's autocast dtype on ``device`` (float32: no autocast)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision == "bf16-native":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_computes_bf16_fast()
        return torch.bfloat16 if native else torch.float32
    return PRECISIONS[precision]


def cpu_computes_bf16_fast() -> bool:
    """Whether this CPU has bfloat16 arithmetic in hardware (x86 AVX512-BF16 or AMX-BF16).

    Only there is bf16 autocast faster than fp32 on a CPU (the demo's step: 189 vs 114 images/s on
    a 2-core Xeon with AMX); elsewhere bf16 is emulated, expected slower than fp32 (not measured).
    ``auto`` still means fp32 on every CPU; ``bf16-native`` (the demo's presets) means bf16 where this is true.
    """
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # an older torch cannot tell: fp32 then
    if capabilities is None:
        return False
    found = capabilities()
    return bool(found.get("avx512_bf16") or found.get("amx_bf16"))


def precision_name(dtype: torch.dtype) -> str:
    """"fp32", "bf16" or "fp16": run.precision's name for an autocast dtype."""
    return next(name for name, d in PRECISIONS.items() if d == dtype)


def start(device: str, precision: str, timeout_s: float = 1800.0) -> Runtime:
    """Join the process group torchrun prepared (if any) and pick this rank's device."""
    env = os.environ
    distributed = "RANK" in env and "WORLD_SIZE" in env and int(env["WORLD_SIZE"]) > 1
    rank = int(env.get("RANK", 0))
    world = int(env.get("WORLD_SIZE", 1))
    local_rank = int(env.get("LOCAL_RANK", 0))
    dev = resolve_device(device, local_rank)
    tune_backends(dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if distributed:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                    device_id=dev if dev.type == "cuda" else None)
        except Exception as exc:
            raise RunError(f"rank {rank} could not join the process group ({backend}): {exc}") from None
    runtime = Runtime(rank, world, local_rank, dev, resolve_dtype(precision, dev), distributed)
    if distributed and dev.type == "cuda":
        runtime.host_group = dist.new_group(backend="gloo")
    runtime.stop.install()
    return runtime


def restarted() -> bool:
    """Whether torchrun restarted this worker group after a failure (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of values, the same on every machine and Python run."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
