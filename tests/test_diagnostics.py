"""The representation diagnostics: the metrics against their formulas, sharding, and a run that logs them."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, mauctl_env, run_mauctl
from mauctl.diagnostics import align_metric, held_out, knn_top1, unif_metric
from mauctl.data.folder import FolderIndex

HERE = Path(__file__).parent


def circle(n: int) -> torch.Tensor:
    angles = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def test_identical_pairs_have_zero_alignment_and_opposite_pairs_four():
    x = torch.randn(50, 8)
    assert align_metric(x, x).item() == 0.0
    assert align_metric(x, -x).item() == pytest.approx(4.0, abs=1e-5)  # ||u - (-u)||^2 = 4 on the sphere
    assert align_metric(x, -x, alpha=1).item() == pytest.approx(2.0, abs=1e-5)


def test_uniformity_of_points_evenly_on_a_circle_is_the_closed_form():
    n = 360
    # pairs at angular distance 2*pi*d/n: ||x_i - x_j||^2 = 2 - 2 cos(2*pi*d/n); n pairs (i, j) per d != 0
    mean = sum(math.exp(-2 * (2 - 2 * math.cos(2 * math.pi * d / n))) for d in range(1, n)) / (n - 1)
    assert unif_metric(circle(n).float()).item() == pytest.approx(math.log(mean), abs=1e-5)
    # and the continuous limit: E exp(-t ||x - y||^2) = e^{-2t} I0(2t) for x, y uniform on the circle, t = 2
    i0_of_4 = sum((2.0 ** (2 * m)) / math.factorial(m) ** 2 for m in range(40))
    assert unif_metric(circle(4000).float(), chunk=512).item() == pytest.approx(math.log(math.exp(-4) * i0_of_4),
                                                                                abs=1e-3)


def test_uniformity_normalises_its_input_and_is_the_same_in_any_chunking():
    x = torch.randn(257, 16)
    whole = unif_metric(x, chunk=4096).item()
    assert unif_metric(x * 7.5).item() == pytest.approx(whole, abs=1e-6)  # an unnormalised feature: same value
    assert unif_metric(x, chunk=10).item() == pytest.approx(whole, abs=1e-6)
    assert unif_metric(torch.ones(10, 4)).item() == pytest.approx(0.0, abs=1e-6)  # collapse: every pair at 0


def test_uniformity_never_takes_the_log_of_zero():
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # exp(-200 * 4) underflows float32 to 0
    assert unif_metric(x, t=200).item() == pytest.approx(-800.0)


def test_too_few_embeddings_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="at least 2 embeddings"):
        unif_metric(torch.randn(1, 8))
    with pytest.raises(ValueError, match="positive pairs"):
        align_metric(torch.randn(3, 8), torch.randn(4, 8))


def test_knn_finds_separable_classes_and_guesses_random_labels():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 32, generator=g) * 10
    bank_labels = torch.arange(1000) % 10
    query_labels = torch.arange(500) % 10
    bank = centres[bank_labels] + torch.randn(1000, 32, generator=g)
    query = centres[query_labels] + torch.randn(500, 32, generator=g)
    assert knn_top1(query, query_labels, bank, bank_labels, 10) == 100.0
    noise_bank, noise_query = torch.randn(1000, 32, generator=g), torch.randn(2000, 32, generator=g)
    noise_labels = torch.randint(10, (2000,), generator=g)  # labels unrelated to the features
    chance = knn_top1(noise_query, noise_labels, noise_bank, bank_labels, 10, chunk=64)
    assert 6.0 <= chance <= 14.0  # 10 classes: 10% +- about 6 standard deviations over 2000 queries


def test_the_held_out_set_is_fixed_and_the_kNN_bank_never_contains_it():
    train = FolderIndex(Path("t"), ["a", "b"], [(f"t/{i}.png", i % 2) for i in range(100)])
    first, again = held_out(train, None, 10000, 50000, seed=3), held_out(train, None, 10000, 50000, seed=3)
    assert first == again and first.source == "train"
    assert len(first.metric) == 20 and len(first.bank) == 80  # without val/: a fifth of train/ at most
    assert not {p for p, _ in first.metric} & {p for p, _ in first.bank}
    val = FolderIndex(Path("v"), ["b", "c"], [("v/0.png", 0), ("v/1.png", 1)])
    with_val = held_out(train, val, 10000, 30, seed=3)
    assert with_val.source == "val" and len(with_val.bank) == 30
    assert with_val.metric == [("v/0.png", 1), ("v/1.png", -1)]  # by class name; "c" is not a train class


@pytest.mark.slow
def test_two_ranks_give_exactly_the_single_process_values(tiny_images, tmp_path):
    script = HERE / "dist_diagnostics.py"
    env = mauctl_env()
    single = subprocess.run([sys.executable, str(script), str(tiny_images), str(tmp_path / "one.json")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script), str(tiny_images), str(tmp_path / "two.json")], env=env,
                         capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    one, both = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (one["world_size"], both["world_size"]) == (1, 2)
    assert both["fixed"] == one["fixed"]  # the same gathered embeddings, the same arithmetic: bit for bit
    for name, value in one["images"].items():  # images through an encoder: conv arithmetic may differ by batch
        assert both["images"][name] == pytest.approx(value, abs=1e-5), name


@pytest.mark.slow
def test_a_run_logs_the_diagnostics_before_training_and_after_each_epoch(tiny_images, tmp_path):
    out = tmp_path / "run"
    result = run_mauctl("pretrain", str(tiny_images), *TINY, "--epochs", "2", "--out", str(out),
                        "--set", "eval.knn_k=5", "--set", "run.tensorboard=true", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["epochs_done"] for r in evals] == [0, 1, 2]
    for r in evals:
        assert 0 <= r["align_metric"] <= 4 and -4 <= r["unif_metric"] <= 0 and 0 <= r["knn_top1"] <= 100
        assert (r["eval_images"], r["bank_images"], r["eval_source"]) == (12, 48, "val")
    assert "diagnostics before training: align_metric" in result.stdout
    assert "epoch 2/2 done" in result.stdout and "knn_top1" in result.stdout.split("epoch 2/2 done")[1]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    assert [e.value for e in board.Scalars("eval/unif_metric")] == pytest.approx([r["unif_metric"] for r in evals])
    assert [e.step for e in board.Scalars("eval/unif_metric")] == [r["step"] for r in evals]
    steps = [r for r in records if r["kind"] == "step"]
    assert [e.value for e in board.Scalars("step/loss")] == pytest.approx([r["loss"] for r in steps])


def test_tensorboard_without_the_package_is_refused_before_anything_starts(tiny_images, tmp_path):
    # a Python path entry that hides the tensorboard package, as on a machine without it
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\nclass Hide:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'tensorboard' or name.startswith('tensorboard.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n")
    result = run_mauctl("pretrain", str(tiny_images), *TINY, "--epochs", "1", "--out", str(tmp_path / "run"),
                        "--set", "run.tensorboard=true", cwd=tmp_path, PYTHONPATH=str(hide))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "pip install 'mauctl[tensorboard]'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
