"""`mauctl sweep`: many table cells, each a pretraining then the published probe, run or submitted at once.

A cell is (preset, loss, seed). Its commands are the ones a user would type: ``mauctl pretrain DATA
--preset P --loss L --seed S --out OUT/<cell>`` then ``mauctl lincls OUT/<cell> --preset lincls``; a
task runs them in turn through the usual launcher (torchrun), and both resume by themselves, so
running a cell again goes on from its last checkpoint, and a finished pretraining is not redone.

The plan file (``OUT/sweep.json``, see plan.py) makes a sweep idempotent: a finished cell is
skipped and never rewritten; a cell whose SLURM job is queued or running is not submitted again; a
stopped or failed one is submitted again and resumes; other presets or seeds add cells.

Executors:
* ``local``: the cells one after another on this machine (``--max-parallel N`` at once), in this
  process's foreground; Ctrl-C or SIGTERM stops them after a checkpoint, and the same command goes on.
* ``slurm``: one submitit job array, a task per cell (``--nodes`` x ``--gpus-per-node``). SLURM sends
  SIGUSR2 to every process of a task ``--signal-delay`` seconds before its time limit (and on
  preemption): mauctl's launcher and workers save and exit 75, and the task requeues itself
  (submitit's checkpoint/requeue); a task that fails (a bug, bad data) ends failed and is not
  requeued; more than ``--max-requeues`` time limits end it too.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mauctl import plan as planfile
from mauctl.config import config_digest, load_config, saved_config
from mauctl.engine.rundir import RunDir, config_differences
from mauctl.errors import EXIT_STOPPED, RunError, UsageError, did_you_mean
from mauctl.plan import Cell, Plan
from mauctl.presets import TABLES, all_presets, load_preset, loss_columns, reference_table
from mauctl.text import plural

# Train images of the published datasets, for a dry run without DATA: ImageNet's ILSVRC-2012 train split,
# and the ImageNet-100 of the CMC class list (the bundled one) built from it.
PUBLISHED_TRAIN_IMAGES = {"imagenet100": 126_689, "imagenet": 1_281_167}
PROBE_PRESETS = {"imagenet": "lincls-in1k"}  # the probe of each table's rows; "lincls" otherwise
STOP_GRACE_S = 110  # how long a stopped cell may take to save (SLURM's signal comes --signal-delay s early)


@dataclass
class Resources:
    """Where each cell runs: the executor and, on SLURM, what every array task asks for."""

    executor: str = "local"
    nodes: int = 1
    gpus_per_node: int | None = None  # None: local: every visible GPU; slurm: 4, the original's ImageNet-100 runs
    cpus_per_task: int | None = None
    time_min: int = 24 * 60
    partition: str | None = None
    account: str | None = None
    max_parallel: int | None = None
    sbatch: dict[str, str] = field(default_factory=dict)
    max_requeues: int = 20
    signal_delay_s: int = 120

    @property
    def gpus(self) -> int | None:
        if self.gpus_per_node is None and self.executor == "slurm":
            return 4
        return self.gpus_per_node

    def launch_args(self) -> list[str]:
        """The launcher's flags of a cell's commands (the multi-node ones are added in the task)."""
        if self.gpus == 0:
            return ["--device", "cpu"]
        return [] if self.gpus is None else ["--nproc-per-node", str(self.gpus)]

    def cpus(self) -> int:
        return self.cpus_per_task or max(2, 8 * (self.gpus or 0))


# ---------------------------------------------------------------- the cells


def parse_list(text: str | None, option: str) -> list[str] | None:
    if text is None:
        return None
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise UsageError(f"{option} {text!r}: give one or more names, separated by commas")
    return list(dict.fromkeys(items))


def parse_seeds(text: str | None) -> list[int]:
    """``0``, ``0,1,2`` or ``0-4``."""
    if text is None:
        return [0]
    seeds: list[int] = []
    for item in parse_list(text, "--seeds") or []:
        first, dash, last = item.partition("-")
        try:
            lo, hi = int(first), int(last if dash else first)
        except ValueError:
            raise UsageError(f"--seeds {text!r}: expected seeds like 0,1,2 or 0-4") from None
        if lo < 0 or hi < lo:
            raise UsageError(f"--seeds {text!r}: {item} is not a range of seeds ≥ 0")
        seeds += range(lo, hi + 1)
    return list(dict.fromkeys(seeds))


def default_presets() -> list[str]:
    """The rows of the ImageNet-100 table, in the table's order."""
    rows = [r["row"] for r in reference_table()["imagenet100"]]
    by_row = {p.reference[1]: p.name for p in all_presets() if p.reference and p.reference[0] == "imagenet100"}
    return [by_row[r] for r in rows if r in by_row]


def check_presets(names: list[str]) -> list[Any]:
    presets = []
    for name in names:
        preset = load_preset(name)
        if preset.command != "pretrain":
            raise UsageError(f"--presets: '{name}' is a {preset.command} preset, not a pretraining one",
                             hint="`mauctl presets` lists the pretraining presets (the table's rows).")
        presets.append(preset)
    tables = {p.reference[0] if p.reference else None for p in presets}
    if len(tables) > 1:
        raise UsageError("--presets mixes datasets: " + ", ".join(
            f"{p.name} ({TABLES[p.reference[0]] if p.reference else 'no table'})" for p in presets),
            hint="One sweep trains on one DATA folder: run one sweep per dataset (they may share --out).")
    return presets


def check_losses(names: list[str]) -> list[str]:
    columns = loss_columns()
    for name in names:
        if name not in columns:
            raise UsageError(f"--losses: unknown loss '{name}' ({did_you_mean(name, columns)})",
                             hint="Loss columns: " + ", ".join(columns) + ".")
    return names


def cell_id(preset: str, loss: str, seed: int) -> str:
    """The run directory's name, as `mauctl pretrain` names it without --out."""
    return f"{preset}_{loss}" + (f"_seed{seed}" if seed else "")


def make_cells(data: Path | None, presets: list[Any], losses: list[str], seeds: list[int], out: Path,
               sets: Sequence[str], probe_sets: Sequence[str], probe_preset: str | None,
               resources: Resources, train_images: int | None) -> list[Cell]:
    """Resolve every cell's config (as `mauctl pretrain` would) and its commands."""
    cells = []
    for preset in presets:
        table, row = preset.reference if preset.reference else (None, None)
        probe = probe_preset or (PROBE_PRESETS.get(table, "lincls") if preset.name != "demo" else "lincls-demo")
        probe_config = load_config("lincls", preset=probe, sets=probe_sets).config
        for loss in losses:
            for seed in seeds:
                ident = cell_id(preset.name, loss, seed)
                run = out / ident
                flags = {"run.seed": seed, "run.out": str(run)}
                if data is not None:
                    flags.update({"data.root": str(data), "data.builtin": ""})
                config = load_config("pretrain", preset=preset.name, loss=loss, flags=flags, sets=sets).config
                pretrain = ["pretrain", str(data) if data is not None else "DATA", "--preset", preset.name,
                            "--loss", loss, "--seed", str(seed), "--out", str(run),
                            *[a for s in sets for a in ("--set", s)], *resources.launch_args()]
                lincls = ["lincls", str(run), "--preset", probe, *[a for s in probe_sets for a in ("--set", s)],
                          *resources.launch_args()]
                n = train_images or 0
                steps = {"pretrain": config.optim.epochs * (n // config.optim.batch_size),
                         "probe": probe_config.optim.epochs * (n // probe_config.optim.batch_size)}
                cells.append(Cell(id=ident, preset=preset.name, loss=loss, seed=seed, table=table, row=row,
                                  data=str(data) if data is not None else "", run=str(run),
                                  probe=str(run / "lincls" / probe), probe_preset=probe,
                                  config=config.model_dump(), digest=config_digest(config),
                                  commands=[pretrain, lincls], steps=steps))
    return cells


# ---------------------------------------------------------------- where each cell stands


def probe_finished(cell: Cell) -> bool:
    return RunDir(Path(cell.probe)).read_status().get("state") == "finished"


def active_jobs(cells: Sequence[Cell]) -> dict[str, str]:
    """Cell id -> SLURM state, for the cells whose last job is queued or running."""
    from mauctl import slurm

    jobs = {c.last_job["id"]: c.id for c in cells if c.last_job and c.last_job.get("executor") == "slurm"}
    if not jobs:
        return {}
    try:
        states = slurm.job_states(jobs)
    except slurm.SlurmUnavailable as exc:
        raise UsageError(f"cannot ask SLURM whether this sweep's jobs are still queued or running ({exc})",
                         hint="Run mauctl sweep where squeue works (a login node), so that no cell is submitted "
                              "twice.") from None
    return {jobs[j]: s for j, s in states.items() if slurm.is_active(s)}


def merge(plan: Plan, cells: list[Cell], notes: list[str]) -> list[Cell]:
    """Put ``cells`` into ``plan``: new ones added, unfinished ones updated; the plan's cells, in order.

    A finished cell is kept as it is (with a note if the new config differs); an unfinished cell
    whose run directory holds a run of another config is an error, as `mauctl pretrain` would say.
    """
    merged = []
    for cell in cells:
        old = plan.cells.get(cell.id)
        if old is not None and probe_finished(old):
            if old.digest != cell.digest:
                notes.append(f"{cell.id} finished with another config; kept as it is (a new --out runs the new one)")
            merged.append(old)
            continue
        run = RunDir(Path(cell.run))
        if run.config.is_file():
            differences = config_differences(saved_config(run.read_toml_config()), cell.config)
            if differences:
                raise UsageError(f"cell {cell.id}: {run.path} holds a run with a different configuration: "
                                 + "; ".join(differences[:3]) + ("; …" if len(differences) > 3 else ""),
                                 hint="Use another --out for the new cells, or give the options of the earlier "
                                      "sweep (sweep.json in --out has its configs).")
        if old is not None:
            cell.jobs = old.jobs
        plan.cells[cell.id] = cell
        merged.append(cell)
    return merged


# ---------------------------------------------------------------- running a cell


class CellTask:
    """One cell's commands, run in turn in subprocesses: what a local slot or a SLURM array task runs.

    Picklable (submitit sends it to the task). Under SLURM, submitit calls ``checkpoint`` from its
    SIGUSR2 handler: by then SLURM has signalled every process of the task, so the launcher and its
    workers are saving; ``checkpoint`` waits for them to exit and returns this task for the requeue.
    """

    def __init__(self, cell_id: str, commands: list[list[str]], nodes: int = 1, log: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.cell_id = cell_id
        self.commands = commands
        self.nodes = nodes
        self.log = log
        self.env = env or {}
        self._child: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_child": None}  # a running process does not travel

    def __call__(self) -> str:
        """Run the commands; "finished", or "stopped" (after a checkpoint); raises RunError if one failed."""
        for argv in self.commands:
            code = self._run([*argv, *self._node_args()])
            if code == EXIT_STOPPED:  # (under submitit's requeue, its handler exits before this is reached)
                return "stopped"
            if code != 0:
                raise RunError(f"cell {self.cell_id}: `mauctl {argv[0]}` failed (exit status {code}); "
                               "its output above says why",
                               hint="Fix the cause, then run the same mauctl sweep again: it resumes the cell.")
        return "finished"

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's preemption / time-limit hook: wait until the cell has saved, then requeue it as it is."""
        from submitit.helpers import DelayedSubmission

        deadline = time.monotonic() + STOP_GRACE_S
        while self._child is not None and self._child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)  # poll, not wait(): a wait() in a signal handler can deadlock with the one it interrupts
        return DelayedSubmission(self, *args, **kwargs)

    def _run(self, argv: list[str]) -> int:
        out = open(self.log, "a", encoding="utf-8") if self.log else None  # noqa: SIM115 (closed below)
        try:
            if out is not None:
                out.write(f"$ mauctl {shlex.join(argv)}\n")
                out.flush()
            self._child = subprocess.Popen([sys.executable, "-m", "mauctl", *argv], stdout=out, stderr=out,
                                           env={**os.environ, **self.env})
            while (code := self._child.poll()) is None:
                time.sleep(0.5)
            return code
        finally:
            if out is not None:
                out.close()

    def _node_args(self) -> list[str]:
        """A multi-node cell's launcher flags, from SLURM's variables in the task (one task per node)."""
        if self.nodes <= 1:
            return []
        head = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], check=True,
                              capture_output=True, text=True).stdout.split()[0]
        return ["--nnodes", str(self.nodes), "--node-rank", os.environ.get("SLURM_NODEID", "0"),
                "--rdzv-endpoint", f"{head}:29500"]


def run_local(plan: Plan, cells: list[Cell], resources: Resources, say: Callable[[str], None]) -> int:
    """Run the cells here, ``max_parallel`` at a time; 0 when all finished, EXIT_STOPPED after a stop."""
    slots = max(1, resources.max_parallel or 1)
    gpu_sets = _gpu_sets(slots, resources.gpus)
    job = {"executor": "local", "id": f"local-{os.getpid()}", "pid": os.getpid(), "host": socket.gethostname(),
           "time": planfile.now()}
    for cell in cells:
        cell.jobs.append(dict(job))
    planfile.write_plan(plan)
    logs = Path(plan.out) / "logs"
    if slots > 1:
        logs.mkdir(exist_ok=True)
    stop = {"signal": None}
    threads: dict[str, tuple[threading.Thread, CellTask]] = {}  # the cells running now

    def forward(signum: int, _frame: Any) -> None:
        stop["signal"] = signum
        if signum == signal.SIGINT:
            return  # Ctrl-C reached every process of the terminal's group, the cells' too: sending it again
            # would make their workers quit without saving
        for _, task in threads.values():
            if task._child is not None and task._child.poll() is None:
                task._child.send_signal(signum)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
    previous = {s: signal.signal(s, forward) for s in handled}
    failed, stopped, queue, free_gpus = [], [], list(cells), list(gpu_sets)
    try:
        results: dict[str, str | Exception] = {}

        def run_one(task: CellTask, gpus: str | None) -> None:
            try:
                results[task.cell_id] = task()
            except Exception as exc:  # noqa: BLE001 (reported below)
                results[task.cell_id] = exc
            finally:
                if gpus is not None:
                    free_gpus.append(gpus)

        while queue or threads:
            while queue and len(threads) < slots and stop["signal"] is None:
                cell = queue.pop(0)
                gpus = free_gpus.pop(0) if free_gpus else None
                env = {"CUDA_VISIBLE_DEVICES": gpus} if gpus is not None else {}
                task = CellTask(cell.id, cell.commands, log=str(logs / f"{cell.id}.log") if slots > 1 else None,
                                env=env)
                say(f"sweep: cell {cell.id} started" + (f" (log {task.log})" if task.log else ""))
                thread = threading.Thread(target=run_one, args=(task, gpus), daemon=True)
                threads[cell.id] = (thread, task)
                thread.start()
            for ident, (thread, _) in list(threads.items()):
                if not thread.is_alive():
                    del threads[ident]
                    outcome = results[ident]
                    if isinstance(outcome, Exception):
                        failed.append(ident)
                        say(f"sweep: cell {ident} failed: {outcome}")
                    else:
                        say(f"sweep: cell {ident} {outcome}")
                        if outcome == "stopped":
                            stopped.append(ident)
            if stop["signal"] is not None and not threads:
                break
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if failed:
        raise RunError(f"{plural(len(failed), 'cell')} failed: {', '.join(failed)}",
                       hint="Fix the cause, then run the same mauctl sweep again: finished cells are skipped and "
                            "the others resume.")
    return EXIT_STOPPED if stop["signal"] is not None or stopped else 0


def _gpu_sets(slots: int, gpus: int | None) -> list[str]:
    """CUDA_VISIBLE_DEVICES for each parallel slot, when several cells share this machine's GPUs."""
    if slots == 1 or not gpus:
        return []
    import torch

    visible = torch.cuda.device_count()
    if visible == 0:
        return []
    if slots * gpus > visible:
        raise UsageError(f"--max-parallel {slots} x --gpus-per-node {gpus} needs {slots * gpus} GPUs; "
                         f"{plural(visible, 'GPU')} visible", hint="Lower --max-parallel or --gpus-per-node.")
    return [",".join(str(g) for g in range(i * gpus, (i + 1) * gpus)) for i in range(slots)]


def submit_slurm(plan: Plan, cells: list[Cell], resources: Resources) -> dict[str, str]:
    """One job array, a task per cell; each cell's job id recorded in the plan. Cell id -> job id."""
    import submitit

    folder = Path(plan.out) / ".submitit"
    executor = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=resources.max_requeues)
    parameters: dict[str, Any] = {
        "job_name": f"mauctl-{Path(plan.out).name}", "nodes": resources.nodes, "ntasks_per_node": 1,
        "cpus_per_task": resources.cpus(), "time": resources.time_min, "signal_delay_s": resources.signal_delay_s,
        "stderr_to_stdout": True, "array_parallelism": resources.max_parallel or 256,
        "additional_parameters": {"requeue": True, **resources.sbatch},
    }
    if resources.gpus:
        parameters["gpus_per_node"] = resources.gpus
    if resources.partition:
        parameters["partition"] = resources.partition
    if resources.account:
        parameters["account"] = resources.account
    executor.update_parameters(**parameters)
    try:
        with executor.batch():
            jobs = [executor.submit(CellTask(c.id, c.commands, nodes=resources.nodes)) for c in cells]
    except (submitit.core.utils.FailedJobError, OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        raise RunError(f"sbatch refused the job array: {str(exc).strip().splitlines()[-1]}",
                       hint="Check that this machine can submit (sinfo), and --partition, --account, --time and "
                            "--sbatch against the cluster's limits.") from None
    ids = {}
    for cell, job in zip(cells, jobs):
        ids[cell.id] = job.job_id
        cell.jobs.append({"executor": "slurm", "id": job.job_id, "time": planfile.now()})
    return ids


# ---------------------------------------------------------------- the command


@dataclass
class SweepRequest:
    data: Path | None
    presets: list[str] | None
    losses: list[str] | None
    seeds: list[int]
    out: Path
    sets: list[str]
    probe_sets: list[str]
    probe_preset: str | None
    resources: Resources
    dry_run: bool = False
    bench: Path | None = None
    argv: list[str] = field(default_factory=list)


def check_request(req: SweepRequest) -> tuple[list[Any], list[str], int | None, str]:
    """Everything a user can get wrong, before anything is written or submitted."""
    r = req.resources
    if r.executor not in ("local", "slurm"):
        raise UsageError(f"--executor {r.executor!r}: expected local or slurm")
    if r.nodes < 1 or (r.gpus_per_node is not None and r.gpus_per_node < 0) or (r.max_parallel or 1) < 1:
        raise UsageError("--nodes and --max-parallel must be at least 1, --gpus-per-node at least 0")
    if r.nodes > 1 and r.executor != "slurm":
        raise UsageError("--nodes > 1 needs --executor slurm",
                         hint="On one machine, cells use its GPUs (--gpus-per-node).")
    given = [flag for flag, value in (("--partition", r.partition), ("--account", r.account), ("--sbatch", r.sbatch),
                                      ("--cpus-per-task", r.cpus_per_task)) if value]
    if r.executor == "local" and given:
        raise UsageError(f"{', '.join(given)}: only for --executor slurm",
                         hint="Add --executor slurm to submit the cells as a job array.")
    if r.executor == "slurm" and not req.dry_run:
        import shutil

        missing = [tool for tool in ("sbatch", "srun", "squeue", "scontrol") if shutil.which(tool) is None]
        if missing:
            raise UsageError(f"--executor slurm: {', '.join(missing)} not found on the PATH",
                             hint="Run mauctl sweep on a SLURM login node, or use --executor local.")
    if req.bench is not None and not req.dry_run:
        raise UsageError("--bench is for --dry-run (it estimates the GPU-hours of the cells)")
    presets = check_presets(req.presets or default_presets())
    losses = check_losses(req.losses or list(loss_columns()))
    if req.probe_preset is not None and load_preset(req.probe_preset).command != "lincls":
        raise UsageError(f"--probe-preset {req.probe_preset}: not a probe (lincls) preset")
    if req.data is not None:
        from mauctl.data.folder import scan_split

        index = scan_split(req.data, "train")
        scan_split(req.data, "val")  # every cell ends with the probe, which measures top-1 on val/
        line = f"{req.data.resolve()}: {len(index.samples):,} train images in {plural(len(index.classes), 'class', 'classes')}"
        return presets, losses, len(index.samples), line
    if not req.dry_run:
        raise UsageError("no DATA: give the image folder (train/ and val/) the cells train on",
                         hint="Only --dry-run may leave it out (it then counts steps on the published dataset).")
    table = presets[0].reference[0] if presets[0].reference else None
    if table is None:
        return presets, losses, None, "no DATA given: steps are not counted"
    n = PUBLISHED_TRAIN_IMAGES[table]
    return presets, losses, n, f"no DATA given: steps counted on {TABLES[table]}'s {n:,} train images"


def run_sweep(req: SweepRequest, say: Callable[[str], None]) -> int:
    presets, losses, train_images, data_line = check_request(req)
    out = req.out.resolve()
    data = req.data.resolve() if req.data is not None else None
    cells = make_cells(data, presets, losses, req.seeds, out, req.sets, req.probe_sets, req.probe_preset,
                       req.resources, train_images)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file", hint="Give a folder for the sweep's runs.")
    bench = read_bench(req.bench) if req.bench is not None else None
    if req.dry_run:
        plan = planfile.read_plan(out) or Plan(out=str(out))
        notes: list[str] = []
        selected = merge(Plan(out=plan.out, cells=dict(plan.cells)), cells, notes)
        active = active_jobs(selected)
        for line in dry_run_lines(selected, active, req.resources, data_line, bench, notes):
            say(line)
        return 0
    with planfile.locked(out):
        plan = planfile.read_plan(out) or Plan(out=str(out))
        notes = []
        selected = merge(plan, cells, notes)
        active = active_jobs(selected)
        todo = [c for c in selected if not probe_finished(c) and c.id not in active]
        for note in notes:
            say(f"note: {note}")
        done = sum(probe_finished(c) for c in selected)
        say(f"sweep: {plural(len(selected), 'cell')} in {out}: {done} finished, {len(active)} queued or running, "
            f"{len(todo)} to {'run' if req.resources.executor == 'local' else 'submit'}")
        plan.sweeps.append({"time": planfile.now(), "argv": req.argv, "executor": req.resources.executor,
                            "submitted": [c.id for c in todo]})
        if not todo:
            planfile.write_plan(plan)
            return 0
        if req.resources.executor == "slurm":
            ids = submit_slurm(plan, todo, req.resources)
            planfile.write_plan(plan)
            first = next(iter(ids.values())).split("_")[0]
            say(f"submitted job array {first}: " + ", ".join(f"{c} ({j})" for c, j in ids.items()))
            say(f"watch it with: mauctl status {out} --watch")
            return 0
        return run_local(plan, todo, req.resources, say)


# ---------------------------------------------------------------- --dry-run


def dry_run_lines(cells: list[Cell], active: dict[str, str], resources: Resources, data_line: str,
                  bench: dict[str, Any] | None, notes: list[str]) -> list[str]:
    r = resources
    where = ("this machine, " + ("one cell at a time" if not r.max_parallel or r.max_parallel == 1
                                 else f"{r.max_parallel} cells at a time")) if r.executor == "local" else (
        f"SLURM job array, a task per cell: {plural(r.nodes, 'node')} x {plural(r.gpus or 0, 'GPU')}, "
        f"{r.cpus()} CPUs per task, time limit {r.time_min // 60}:{r.time_min % 60:02d}:00"
        + (f", partition {r.partition}" if r.partition else "") + (f", account {r.account}" if r.account else "")
        + (f", at most {r.max_parallel} at once" if r.max_parallel else ""))
    lines = [f"mauctl sweep --dry-run: {plural(len(cells), 'cell')}; nothing was run, submitted or written.",
             f"data: {data_line}", f"executor: {r.executor}: {where}", ""]
    width = max(len("cell"), *(len(c.id) for c in cells))
    lines.append(f"{'cell':<{width}}  {'now':<9} {'pretrain':>10} {'probe':>9}")
    todo = []
    for c in cells:
        state = "finished" if probe_finished(c) else (active[c.id].lower() if c.id in active else (
            "resume" if RunDir(Path(c.run)).is_run() else "new"))
        if state in ("new", "resume"):
            todo.append(c)
        lines.append(f"{c.id:<{width}}  {state:<9} {c.steps['pretrain']:>10,} {c.steps['probe']:>9,}")
    pre, probe = sum(c.steps["pretrain"] for c in todo), sum(c.steps["probe"] for c in todo)
    lines += ["", (f"to run: {plural(len(todo), 'cell')}, {pre:,} pretraining steps and {probe:,} probe steps "
                   "(optimizer steps of the global batch)")]
    if bench is not None:
        lines += gpu_hours_lines(todo, bench)
    lines += [f"note: {n}" for n in notes]
    lines += ["", (f"runs in {Path(cells[0].run).parent}/<cell>, probes in <cell>/lincls/<probe preset>; "
                   "each cell runs:")]
    for c in cells:
        lines.append(f"  {c.id}:")
        lines += [f"    mauctl {shlex.join(argv)}" + _node_hint(r) for argv in c.commands]
    return lines


def _node_hint(r: Resources) -> str:
    return " --nnodes N --node-rank $SLURM_NODEID --rdzv-endpoint FIRST_NODE:29500" if r.nodes > 1 else ""


def read_bench(path: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        end_to_end = [r for r in data["results"] if r["measure"] == "end-to-end"]
        rate = end_to_end[0]["images_per_s"] if end_to_end else next(
            r["images_per_s"] for r in data["results"] if r["measure"] == "compute")
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as exc:
        raise UsageError(f"--bench {path}: not a `mauctl bench --json` result ({exc})",
                         hint="Write one with: mauctl bench DATA --preset v2-b256 --json > bench.json") from None
    return {**data, "rate": float(rate), "rate_kind": "end to end" if end_to_end else "compute only",
            "path": str(path)}


def gpu_hours_lines(cells: list[Cell], bench: dict[str, Any]) -> list[str]:
    """GPU-hours at the bench's images/s per GPU (a pretraining step is 2 views, as the bench times it)."""
    rate, pre_images, probe_images = bench["rate"], 0, 0
    for c in cells:
        pre_images += c.steps["pretrain"] * c.config["optim"]["batch_size"]
        probe_images += c.steps["probe"] * 256
    pre_h, probe_h = pre_images / rate / 3600, probe_images / rate / 3600
    where = bench["machine"].get("gpu") or bench["device"]
    lines = [(f"GPU-hours at {rate:,.0f} images/s per GPU ({bench['rate_kind']}, {bench['arch']} at "
              f"{bench['image_size']} px, {bench['precision']}, on {where}: {bench['path']}): "
              f"{pre_h:,.0f} pretraining + {probe_h:,.0f} probe (at the same rate: an upper bound) = "
              f"{pre_h + probe_h:,.0f}")]
    differ = {f"{k} {c.config[s][k]}" for c in cells for s, k in (("model", "arch"), ("data", "image_size"))
              if c.config[s][k] != bench[k]}
    if differ:
        lines.append(f"note: the bench measured {bench['arch']} at {bench['image_size']} px; the cells use "
                     + ", ".join(sorted(differ)) + ": the estimate is off by their cost ratio")
    return lines


def parse_time(text: str) -> int:
    """SLURM's time formats as minutes: MM, H:MM:SS, D-H, D-H:MM(:SS)."""
    days, _, rest = text.strip().rpartition("-") if "-" in text else ("", "", text.strip())
    try:
        parts = [int(p) for p in rest.split(":")]
        d = int(days) if days else 0
        if days:  # D-H, D-H:MM, D-H:MM:SS
            h, m, s = (parts + [0, 0])[:3]
        elif len(parts) == 1:
            h, m, s = 0, parts[0], 0
        elif len(parts) == 2:
            h, m, s = 0, parts[0], parts[1]
        else:
            h, m, s = parts[-3:]
        minutes = d * 1440 + h * 60 + m + (1 if s else 0)
    except ValueError:
        minutes = 0
    if minutes <= 0:
        raise UsageError(f"--time {text!r}: expected a time limit such as 24:00:00, 90 (minutes) or 2-00:00:00")
    return minutes
