"""`mauctl demo` end to end, as a newcomer runs it: no arguments, a fresh cache, a CPU."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import run_mauctl
from mauctl.config import load_config
from mauctl.engine.runtime import cpu_computes_bf16_fast, resolve_dtype


@pytest.mark.slow
def test_demo_runs_the_whole_chain_and_the_pretrained_encoder_beats_random_init(tmp_path):
    # two threads, as a user gets (the other tests pin one thread for their tiny runs)
    result = run_mauctl("demo", cwd=tmp_path, timeout=900, MAUCTL_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="2")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    runs = tmp_path / "runs"
    trained = json.loads((runs / "demo" / "lincls" / "demo" / "results.json").read_text())
    random = json.loads((runs / "demo-random-init" / "lincls" / "results.json").read_text())
    assert trained["finished"] and random["finished"]
    assert trained["protocol"] == random["protocol"]  # the same probe for both encoders
    assert trained["protocol"]["kind"] == "cached-features" and trained["protocol"]["augmented_views"] == 4
    assert trained["best_top1"] > random["best_top1"]
    assert f"{trained['best_top1']:.2f}" in result.stdout and f"{random['best_top1']:.2f}" in result.stdout

    epochs = [json.loads(line) for line in (runs / "demo" / "metrics.jsonl").read_text().splitlines()]
    last_epoch = [r for r in epochs if r.get("kind") == "epoch"][-1]
    assert last_epoch["unif"] < -2.0  # no collapse: a collapsed encoder has L_uniform = 0
    assert not [r for r in epochs if r.get("kind") == "warning"] and "WARNING" not in result.stdout  # nor a warning
    assert min(r["q_std"] for r in epochs if r.get("kind") == "step") > 0.3 / 128**0.5  # 3x the guard's threshold
    evals = [r for r in epochs if r.get("kind") == "eval"]
    assert [r["epochs_done"] for r in evals] == [0, 10]  # before training and after the last epoch
    first, last = evals[0], evals[-1]
    assert last["unif_metric"] < first["unif_metric"]  # the held-out embeddings spread out
    assert last["knn_top1"] > first["knn_top1"]  # epochs_done 0 is the random initialisation
    assert f"{last['knn_top1']:.2f}" in result.stdout and f"{first['knn_top1']:.2f}" in result.stdout

    summary = json.loads((runs / "demo-summary.json").read_text())
    assert (summary["pretrained_top1"], summary["random_top1"]) == (trained["best_top1"], random["best_top1"])
    assert set(summary["timings_s"]) == {"pretrain", "lincls", "export", "random init", "report"}
    assert summary["precision"] == ("bf16" if cpu_computes_bf16_fast() else "fp32")

    with safe_open(runs / "demo" / "export" / "encoder.safetensors", "pt") as f:
        assert f.metadata()["arch"] == "resnet18" and f.metadata()["head"] == "none"
    assert "Other runs" in result.stdout  # the report placed the demo apart from the published cells


def test_the_demo_asks_for_bf16_only_on_a_cpu_that_computes_it_in_hardware():
    native = torch.bfloat16 if cpu_computes_bf16_fast() else torch.float32
    for command, preset in (("pretrain", "demo"), ("lincls", "lincls-demo")):
        assert load_config(command, preset=preset, environ={}).config.run.precision == "bf16-native"
        mine = load_config(command, preset=preset, environ={"MAUCTL_RUN__PRECISION": "fp32"}).config
        assert mine.run.precision == "fp32"  # the user's choice stands
    assert resolve_dtype("bf16-native", torch.device("cpu")) == native
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32  # for everyone else, auto is fp32 on a CPU
