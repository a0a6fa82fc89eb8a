"""The built-in digits dataset: written once, atomically, as an image folder with a fixed split."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from mauctl.data import digits
from mauctl.data.digits import cache_root, digits_folder
from mauctl.data.folder import scan_split
from mauctl.errors import UsageError

# sha256 of the comma-joined sorted val indices: pins the split against numpy or sklearn changes.
VAL_SPLIT_SHA256 = "cd155e93a68bba5e8cb2aa384995fac4172b280a51877c5d19876dfe143e00a5"


@pytest.fixture(scope="module")
def sklearn_digits():
    return load_digits()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """One full build shared by the read-only tests (writing 1797 PNGs is the slow part)."""
    return digits_folder(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def few_digits(monkeypatch, sklearn_digits):
    """Build from the first 100 digits only: for tests about the build mechanics, not the data."""
    subset = sklearn_digits.images[:100], sklearn_digits.target[:100]
    monkeypatch.setattr(digits, "_load_digits", lambda: subset)


def relative_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))


def test_folder_holds_every_digit_once_with_a_stratified_20_percent_val_split(built, sklearn_digits):
    train, val = scan_split(built, "train"), scan_split(built, "val")
    assert train.classes == val.classes == [str(d) for d in range(10)]
    assert len(train.samples) + len(val.samples) == 1797
    per_class = Counter(sklearn_digits.target.tolist())
    for digit in range(10):
        assert val.counts[digit] == round(0.2 * per_class[digit])
        assert train.counts[digit] + val.counts[digit] == per_class[digit]
    indices = [int(Path(path).stem) for path, _ in train.samples + val.samples]
    assert sorted(indices) == list(range(1797))


def test_each_file_is_its_sklearn_digit_scaled_to_8_bit(built, sklearn_digits):
    for index in (0, 42, 1000, 1796):
        digit = sklearn_digits.target[index]
        [path] = list(built.glob(f"*/{digit}/{index:05d}.png"))
        with Image.open(path) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "L", (8, 8))
            pixels = np.asarray(img)
        expected = [[round(v * 255 / 16) for v in row] for row in sklearn_digits.images[index]]
        assert pixels.tolist() == expected


def test_manifest_counts_and_digest_match_the_files(built):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 1438, "val": 359}
    digest = hashlib.sha256()
    for rel in relative_files(built):
        digest.update(rel.encode() + b"\0" + (built / rel).read_bytes())
    assert manifest["sha256"] == digest.hexdigest()


def test_second_call_returns_the_folder_untouched(built):
    probes = [built, built / "manifest.json", next(built.glob("val/3/*.png"))]
    before = [p.stat().st_mtime_ns for p in probes]
    assert digits_folder(built.parent) == built
    assert [p.stat().st_mtime_ns for p in probes] == before
    assert [p.name for p in built.parent.iterdir()] == ["digits-v1"]  # no temp dirs left behind


def test_split_is_identical_in_another_cache_and_pinned(built, tmp_path):
    other = digits_folder(tmp_path)
    assert relative_files(other) == relative_files(built)
    val = sorted(int(Path(rel).stem) for rel in relative_files(built) if rel.startswith("val/"))
    assert hashlib.sha256(",".join(map(str, val)).encode()).hexdigest() == VAL_SPLIT_SHA256


def test_mauctl_cache_env_var_is_honoured(built, monkeypatch, tmp_path):
    monkeypatch.setenv("MAUCTL_CACHE", str(built.parent))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == built.parent
    assert digits_folder() == built


def test_cache_root_falls_back_to_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("MAUCTL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "mauctl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "mauctl"


def test_broken_leftover_is_moved_aside_and_rebuilt(tmp_path, few_digits):
    leftover = tmp_path / "digits-v1" / "train" / "0"
    leftover.mkdir(parents=True)
    (leftover / "00000.png").write_bytes(b"half a png")

    folder = digits_folder(tmp_path)

    assert digits.is_complete(folder)
    assert len(relative_files(folder)) == 100
    [aside] = tmp_path.glob("digits-v1.broken-*")
    assert (aside / "train" / "0" / "00000.png").read_bytes() == b"half a png"


def test_folder_missing_files_despite_its_manifest_is_rebuilt(tmp_path, few_digits):
    folder = digits_folder(tmp_path)
    next(folder.glob("val/*/*.png")).unlink()
    assert not digits.is_complete(folder)

    assert digits_folder(tmp_path) == folder
    assert len(relative_files(folder)) == 100
    assert len(list(tmp_path.glob("digits-v1.broken-*"))) == 1


def test_losing_the_race_uses_the_winners_folder(tmp_path, few_digits, monkeypatch):
    write_folder = digits._write_folder

    def another_process_finishes_first(root, images, targets):
        write_folder(root, images, targets)
        monkeypatch.setattr(digits, "_write_folder", write_folder)
        digits_folder(tmp_path)

    monkeypatch.setattr(digits, "_write_folder", another_process_finishes_first)
    folder = digits_folder(tmp_path)
    assert digits.is_complete(folder)
    assert [p.name for p in tmp_path.iterdir()] == ["digits-v1"]  # loser's temp dir removed, nothing broken


RACER = """
import sys
import numpy as np
from mauctl.data import digits
digits._load_digits = lambda: (np.zeros((100, 8, 8)), np.arange(100) % 10)  # small stand-in data
print(digits.digits_folder(sys.argv[1]))
"""


def test_concurrent_processes_agree_on_one_complete_folder(tmp_path):
    command = [sys.executable, "-c", RACER, str(tmp_path)]
    racers = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [racer.communicate(timeout=60)[0].strip() for racer in racers]
    assert [racer.returncode for racer in racers] == [0] * 4
    assert outputs == [str(tmp_path / "digits-v1")] * 4
    assert [p.name for p in tmp_path.iterdir()] == ["digits-v1"]
    assert digits.is_complete(tmp_path / "digits-v1")


def test_unwritable_cache_is_a_usage_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(UsageError, match="MAUCTL_CACHE") as err:
        digits_folder(blocker / "cache")
    assert str(blocker / "cache") in str(err.value)


def test_missing_scikit_learn_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(UsageError, match="pip install scikit-learn"):
        digits_folder(tmp_path)
    assert not (tmp_path / "digits-v1").exists()
