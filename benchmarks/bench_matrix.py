"""The standard `mauctl bench` matrix: pipelines x precisions (x torch.compile on CUDA), as a markdown table.

    python benchmarks/bench_matrix.py --preset demo --out bench-cpu.md          # this CPU, the demo config
    python benchmarks/bench_matrix.py --make-jpegs /tmp/jpegs 2000               # ImageNet-like JPEGs, once
    python benchmarks/bench_matrix.py --data /tmp/jpegs --preset v2-b256 --arch resnet50 --image-size 224 \
        --out bench-gpu.md                                                       # one GPU

Each configuration runs `mauctl bench --json --compare-pil` in its own process (so peak memory and
compile caches do not leak from one to the next) and becomes rows of the table. Any option it
does not know (--preset, --arch, --batch-size, --workers, --set ...) goes to `mauctl bench`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_jpegs(folder: Path, count: int, classes: int = 10, seed: int = 0) -> None:
    """``folder/train/c<k>/<n>.jpg``: ``count`` smooth random images of about 500x375, JPEG quality 90.

    Written by every core (each image from its own seed, so the folder is the same however many)."""
    with multiprocessing.Pool() as pool:
        pool.starmap(_make_jpeg, [(folder, n, classes, seed) for n in range(count)], chunksize=16)


def _make_jpeg(folder: Path, n: int, classes: int, seed: int) -> None:
    rng = np.random.default_rng([seed, n])
    out = folder / "train" / f"c{n % classes}" / f"{n:05d}.jpg"
    out.parent.mkdir(parents=True, exist_ok=True)
    w, h = int(rng.integers(400, 600)), int(rng.integers(300, 450))
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)  # photo-like low frequencies
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 8, (h, w, 3))
    pixels = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(out, quality=90)


def configurations(cuda: bool) -> list[tuple[str, list[str]]]:
    rows = [("fp32", ["--set", "run.precision='fp32'", "--set", "run.compile=false"]),
            ("bf16", ["--set", "run.precision='bf16'", "--set", "run.compile=false"])]
    if cuda:
        rows.append(("bf16 + compile", ["--set", "run.precision='bf16'", "--set", "run.compile=true"]))
    return rows


def bench(data: str | None, extra: list[str], setting: list[str], pipeline: str) -> dict | None:
    """One configuration's `mauctl bench --json`, or None (its error printed) if it failed."""
    argv = [sys.executable, "-m", "mauctl", "bench", *([data] if data else []), *extra, *setting,
            "--pipeline", pipeline, "--compare-pil", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode:
        print(f"{' '.join(argv)} failed:\n{done.stderr}", file=sys.stderr)
        return None
    return json.loads(done.stdout)


def table(reports: list[tuple[str, dict]]) -> str:
    first = reports[0][1]
    m = first["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cpu_cores']} cores"
    lines = [f"`mauctl bench` on {time.strftime('%Y-%m-%d')}: {first['arch']} at {first['image_size']} px, batch "
             f"{first['batch_size']}, {first['workers']} loader workers, on {first['device']} ({where}), "
             f"torch {m['torch']}.", "",
             "| setting | pipeline | data only (img/s) | per worker | compute only (img/s) | end to end (img/s) "
             "| end to end / compute | peak GPU memory |",
             "|---|---|---|---|---|---|---|---|"]
    for name, report in reports:
        rows = {(r["measure"], r["pipeline"]): r for r in report["results"]}
        compute = rows[("compute", None)]
        peak = compute["peak_memory_bytes"]
        for pipeline in ("pil", "tensor"):
            data, e2e = rows.get(("data", pipeline)), rows.get(("end-to-end", pipeline))
            if data is None:
                continue
            lines.append(f"| {name} | {pipeline} | {data['images_per_s']:,.0f} | {data['per_core']:,.0f} | "
                         f"{compute['images_per_s']:,.0f} | {e2e['images_per_s']:,.0f} | {e2e['ratio']:.2f} | "
                         f"{'-' if peak is None else f'{peak / 2**30:.1f} GiB'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="image folder (leave out with a preset that has built-in data)")
    parser.add_argument("--make-jpegs", nargs=2, metavar=("FOLDER", "COUNT"), help="write test JPEGs and stop")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args, extra = parser.parse_known_args()
    if args.make_jpegs:
        make_jpegs(Path(args.make_jpegs[0]), int(args.make_jpegs[1]))
        return
    import torch

    reports = []
    for name, setting in configurations(torch.cuda.is_available()):
        report = bench(args.data, extra, setting, "tensor")
        if report is not None:
            reports.append((name, report))
            if args.out:  # after each configuration: a later one that fails or runs out of time loses only itself
                args.out.write_text(table(reports), encoding="utf-8")
    if not reports:
        raise SystemExit("every configuration failed")
    print(table(reports), end="")


if __name__ == "__main__":
    main()
