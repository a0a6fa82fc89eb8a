"""`mauctl subset`: build ImageNet-100 (or any class list) from a real, tiny ImageNet tree."""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner, Result

from mauctl.cli import app
from mauctl.errors import UsageError
from mauctl.presets import resource_text
from mauctl.subset import SplitSummary, make_subset

IMAGENET100 = resource_text("imagenet100_classes.txt").split()
EXTRA = ["n00000001", "n00000002", "n00000003"]  # in the fake ImageNet, not in ImageNet-100
ALL_CLASSES = IMAGENET100 + EXTRA
IMAGES_PER_CLASS = {"train": 2, "val": 1}
# What the summary counts in each link mode: one symlink per class folder, or one entry per file.
UNITS = {"symlink": "class symlinks", "hardlink": "hard links", "copy": "file copies"}


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 40)).save(buffer, "JPEG")
    return buffer.getvalue()


def build_imagenet(root: Path, train: Iterable[str] = ALL_CLASSES, val: Iterable[str] = ALL_CLASSES) -> Path:
    """ROOT/<split>/<wnid>/<wnid>_<i>.JPEG, as the PyTorch ImageNet example lays it out."""
    jpeg = _jpeg()
    for split, classes in (("train", train), ("val", val)):
        (root / split).mkdir(parents=True)
        for wnid in classes:
            (root / split / wnid).mkdir()
            for i in range(1, IMAGES_PER_CLASS[split] + 1):
                (root / split / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg)
    return root


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by the whole module: tests must leave it as it is."""
    return build_imagenet(tmp_path_factory.mktemp("imagenet"))


def subset(*args: object) -> Result:
    return CliRunner().invoke(app, ["subset", *map(str, args)])


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under ``root`` without following links: link target, or type, inode and size."""
    entries: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            info = path.lstat()
            described = (stat.S_IFMT(info.st_mode), info.st_ino, info.st_size)
            entries[str(path.relative_to(root))] = os.readlink(path) if path.is_symlink() else described
    return entries


def summary_row(output: str, split: str, *cells: int | str) -> bool:
    """Whether the summary table has a row ``split | cells...`` (numbers, or counts with their unit)."""
    pattern = re.escape(split) + "".join(rf"\W+{re.escape(str(cell))}" for cell in cells) + r"\b"
    return re.search(pattern, output) is not None


def symlink_farm(store: Path, farm: Path) -> Path:
    """``farm`` with the folders of ``store``, each file a symlink to the one in ``store``."""
    for dirpath, _, filenames in os.walk(store):
        folder = farm / Path(dirpath).relative_to(store)
        folder.mkdir(parents=True, exist_ok=True)
        for name in filenames:
            (folder / name).symlink_to(Path(dirpath, name))
    return farm


def write_classes(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def assert_refused(result: Result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


# ---------------------------------------------------------------- building


def test_default_links_every_imagenet100_class_folder(imagenet: Path, tmp_path: Path) -> None:
    destination = tmp_path / "in100"
    result = subset(imagenet, destination)
    assert result.exit_code == 0, result.output
    for split in ("train", "val"):
        assert sorted(os.listdir(destination / split)) == sorted(IMAGENET100)
        for wnid in IMAGENET100:
            link = destination / split / wnid
            assert link.is_symlink()
            assert os.readlink(link) == str((imagenet / split / wnid).resolve())
    assert summary_row(result.output, "train", 100, 200, "100 class symlinks", "0 class symlinks"), result.output
    assert summary_row(result.output, "val", 100, 100, "100 class symlinks", "0 class symlinks"), result.output


# (link mode, entries per split): one symlink per class folder, or one hard link or copy per file
@pytest.mark.parametrize("link, entries", [
    ("symlink", {"train": 100, "val": 100}), ("hardlink", {"train": 200, "val": 100}),
    ("copy", {"train": 200, "val": 100}),
])
def test_summary_counts_what_the_mode_creates_and_a_rerun_creates_nothing(
        imagenet: Path, tmp_path: Path, link: str, entries: dict[str, int]) -> None:
    destination = tmp_path / "in100"
    unit = UNITS[link]
    first = subset(imagenet, destination, "--link", link)
    assert first.exit_code == 0, first.output
    before = snapshot(destination)
    rerun = subset(imagenet, destination, "--link", link)
    assert rerun.exit_code == 0, rerun.output
    for split, images in (("train", 200), ("val", 100)):
        created = f"{entries[split]} {unit}"
        assert summary_row(first.output, split, 100, images, created, f"0 {unit}"), first.output
        assert summary_row(rerun.output, split, 100, images, f"0 {unit}", created), rerun.output
    assert snapshot(destination) == before


@pytest.mark.parametrize("link", ["symlink", "hardlink", "copy"])
def test_rerun_over_an_imagenet_of_file_symlinks_creates_nothing(tmp_path: Path, link: str) -> None:
    """Clusters often share ImageNet as a tree of symlinks into a dataset store: hard links and copies
    are of the files those symlinks lead to, so a rerun finds them already there."""
    chosen = IMAGENET100[:3]
    store = build_imagenet(tmp_path / "store", train=chosen, val=chosen)
    source = symlink_farm(store, tmp_path / "imagenet")
    classes = write_classes(tmp_path / "three.txt", *chosen)
    destination = tmp_path / "out"
    first = subset(source, destination, "--classes", classes, "--link", link)
    assert first.exit_code == 0, first.output
    if link != "symlink":
        for real in store.rglob("*.JPEG"):
            built = destination / real.relative_to(store)
            assert not built.is_symlink() and built.read_bytes() == real.read_bytes()
            assert os.path.samestat(real.stat(), built.lstat()) == (link == "hardlink")
    before = snapshot(destination)
    rerun = subset(source, destination, "--classes", classes, "--link", link)
    assert rerun.exit_code == 0, rerun.output
    train_entries = 3 if link == "symlink" else 6
    assert summary_row(rerun.output, "train", 3, 6, f"0 {UNITS[link]}", f"{train_entries} {UNITS[link]}"), \
        rerun.output
    assert snapshot(destination) == before


def test_make_subset_reports_per_split_summaries(imagenet: Path, tmp_path: Path) -> None:
    summaries = make_subset(imagenet, tmp_path / "in100", splits=["val"])
    assert summaries == [SplitSummary("val", classes=100, images=100, created=100, existing=0, link="symlink")]
    assert summaries[0].entries(100) == "100 class symlinks" and summaries[0].entries(1) == "1 class symlink"


def _source_files(imagenet: Path, split: str, wnid: str) -> list[Path]:
    return sorted((imagenet / split / wnid).iterdir())


def test_hardlink_mode_links_every_file(imagenet: Path, tmp_path: Path) -> None:
    destination = tmp_path / "in100"
    result = subset(imagenet, destination, "--link", "hardlink")
    assert result.exit_code == 0, result.output
    for wnid in IMAGENET100:
        class_dir = destination / "train" / wnid
        assert class_dir.is_dir() and not class_dir.is_symlink()
        for source in _source_files(imagenet, "train", wnid):
            assert os.path.samestat(source.stat(), (class_dir / source.name).lstat())


def test_copy_mode_copies_every_file(imagenet: Path, tmp_path: Path) -> None:
    destination = tmp_path / "in100"
    result = subset(imagenet, destination, "--link", "copy")
    assert result.exit_code == 0, result.output
    for wnid in IMAGENET100:
        for source in _source_files(imagenet, "val", wnid):
            copy = destination / "val" / wnid / source.name
            assert not copy.is_symlink()
            assert copy.read_bytes() == source.read_bytes()
            assert not os.path.samestat(source.stat(), copy.stat())


def test_hardlink_mode_adds_missing_files_and_keeps_extra_ones(imagenet: Path, tmp_path: Path) -> None:
    wnid = IMAGENET100[0]
    class_dir = tmp_path / "in100" / "train" / wnid
    class_dir.mkdir(parents=True)
    first = _source_files(imagenet, "train", wnid)[0]
    os.link(first, class_dir / first.name)
    (class_dir / "notes.txt").write_text("mine")
    result = subset(imagenet, tmp_path / "in100", "--link", "hardlink", "--splits", "train")
    assert result.exit_code == 0, result.output
    assert summary_row(result.output, "train", 100, 200, "199 hard links", "1 hard link"), result.output
    assert (class_dir / "notes.txt").read_text() == "mine"


def test_failure_while_creating_is_a_run_error(imagenet: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def cross_device(source: str, target: str) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    result = subset(imagenet, tmp_path / "in100", "--link", "hardlink")
    assert result.exit_code == 1, result.output
    assert "failed while creating" in result.output and "rerun the same command" in result.output
    assert not list((tmp_path / "in100").rglob("*mauctl-tmp"))


def test_unknown_link_mode_names_it_and_the_valid_ones(imagenet: Path, tmp_path: Path) -> None:
    result = subset(imagenet, tmp_path / "in100", "--link", "softlink")
    assert_refused(result, "'softlink'", "symlink, hardlink, copy")
    assert not (tmp_path / "in100").exists()


@pytest.mark.parametrize("splits, fragment", [
    (",", "no splits"), ("train,train", "'train' is given 2 times"), ("..", "'..'"), ("train/x", "'train/x'"),
])
def test_bad_splits_are_refused(imagenet: Path, tmp_path: Path, splits: str, fragment: str) -> None:
    assert_refused(subset(imagenet, tmp_path / "in100", "--splits", splits), fragment)
    assert not (tmp_path / "in100").exists()


def test_unknown_link_mode_via_the_api() -> None:
    with pytest.raises(UsageError, match="softlink"):
        make_subset(Path("/nonexistent"), Path("/nonexistent-too"), link="softlink")


# ---------------------------------------------------------------- class lists


def test_custom_class_list(imagenet: Path, tmp_path: Path) -> None:
    chosen = [IMAGENET100[0], IMAGENET100[1], EXTRA[0]]
    classes = write_classes(tmp_path / "mine.txt", "# three classes", "", f"  {chosen[0]}  ", *chosen[1:])
    result = subset(imagenet, tmp_path / "mine", "--classes", classes)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / "mine" / "train")) == sorted(chosen)
    assert summary_row(result.output, "train", 3, 6, "3 class symlinks", "0 class symlinks"), result.output
    assert summary_row(result.output, "val", 3, 3, "3 class symlinks", "0 class symlinks"), result.output


def test_malformed_ids_are_all_listed_with_line_numbers(imagenet: Path, tmp_path: Path) -> None:
    bad = ["../n01440764", "/etc", "n123", "N01440764", "n01440764x"]
    classes = write_classes(tmp_path / "bad.txt", "# header", IMAGENET100[0], *bad)
    result = subset(imagenet, tmp_path / "out", "--classes", classes)
    assert_refused(result, *(f"line {number}: '{wnid}'" for number, wnid in enumerate(bad, start=3)))
    assert "5 bad line(s)" in result.output
    assert not (tmp_path / "out").exists()


def test_duplicate_ids_name_the_line_they_repeat(imagenet: Path, tmp_path: Path) -> None:
    first, second = IMAGENET100[:2]
    classes = write_classes(tmp_path / "dup.txt", first, second, first, "", second)
    result = subset(imagenet, tmp_path / "out", "--classes", classes)
    assert_refused(result, f"line 3: {first} repeats line 1", f"line 5: {second} repeats line 2")
    assert not (tmp_path / "out").exists()


def test_class_list_with_only_comments_is_refused(imagenet: Path, tmp_path: Path) -> None:
    classes = write_classes(tmp_path / "empty.txt", "# nothing here", "", "   ")
    assert_refused(subset(imagenet, tmp_path / "out", "--classes", classes), "lists no classes")
    assert not (tmp_path / "out").exists()


def test_missing_class_list_is_refused(imagenet: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    assert_refused(subset(imagenet, tmp_path / "out", "--classes", missing), str(missing))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- source checks


def test_every_missing_class_is_listed_per_split(tmp_path: Path) -> None:
    missing_train = IMAGENET100[5:7]
    source = build_imagenet(tmp_path / "imagenet",
                            train=[c for c in ALL_CLASSES if c not in missing_train], val=EXTRA)
    result = subset(source, tmp_path / "out")
    assert_refused(result, f"2 of 100 classes are missing from {source / 'train'}",
                   f"100 of 100 classes are missing from {source / 'val'}")
    train_part, val_part = result.output.split(f"missing from {source / 'val'}")
    assert all(wnid in train_part for wnid in missing_train)
    assert all(wnid in val_part for wnid in IMAGENET100)
    assert not (tmp_path / "out").exists()


def test_splits_option_builds_the_complete_split_only(tmp_path: Path) -> None:
    source = build_imagenet(tmp_path / "imagenet", val=IMAGENET100[1:])
    assert_refused(subset(source, tmp_path / "out"), IMAGENET100[0], "--splits train")
    result = subset(source, tmp_path / "out", "--splits", "train")
    assert result.exit_code == 0, result.output
    assert os.listdir(tmp_path / "out") == ["train"]


def test_missing_split_folder_is_refused(tmp_path: Path) -> None:
    source = build_imagenet(tmp_path / "imagenet", val=[])
    os.rmdir(source / "val")
    assert_refused(subset(source, tmp_path / "out"), "val/", "--splits train")
    assert not (tmp_path / "out").exists()


def test_missing_imagenet_folder_is_refused(tmp_path: Path) -> None:
    assert_refused(subset(tmp_path / "nowhere", tmp_path / "out"), str(tmp_path / "nowhere"))
    assert not (tmp_path / "out").exists()


def test_flat_val_folder_explains_the_expected_layout(tmp_path: Path) -> None:
    source = build_imagenet(tmp_path / "imagenet", val=[])
    for i in range(1, 4):
        (source / "val" / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(_jpeg())
    result = subset(source, tmp_path / "out")
    assert_refused(result, f"{source / 'val'} is flat", "3 image(s)", "/<wnid>/<image>", "valprep.sh")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- destination checks


def _point_elsewhere(tmp_path: Path, wnid: str) -> tuple[Path, Path]:
    """SUBSET/train/<wnid> as a symlink to a folder outside both trees; returns (link, that folder)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.JPEG").write_bytes(b"not mine to delete")
    link = tmp_path / "out" / "train" / wnid
    link.parent.mkdir(parents=True)
    link.symlink_to(elsewhere, target_is_directory=True)
    return link, elsewhere


def test_link_pointing_elsewhere_needs_force(imagenet: Path, tmp_path: Path) -> None:
    wnid = IMAGENET100[0]
    link, elsewhere = _point_elsewhere(tmp_path, wnid)
    before = snapshot(tmp_path / "out")
    assert_refused(subset(imagenet, tmp_path / "out"), str(link), str(elsewhere), "--force")
    assert snapshot(tmp_path / "out") == before
    result = subset(imagenet, tmp_path / "out", "--force")
    assert result.exit_code == 0, result.output
    assert os.readlink(link) == str((imagenet / "train" / wnid).resolve())
    assert (elsewhere / "keep.JPEG").read_bytes() == b"not mine to delete"
    assert summary_row(result.output, "train", 100, 200, "100 class symlinks", "0 class symlinks"), result.output


def _real_folder(path: Path) -> None:
    path.mkdir()
    (path / "keep.txt").write_text("mine")


def _real_file(path: Path) -> None:
    path.write_text("mine")


@pytest.mark.parametrize("make_entry", [_real_folder, _real_file], ids=["folder", "file"])
def test_real_entry_at_a_class_name_is_never_replaced(imagenet: Path, tmp_path: Path,
                                                      make_entry: Callable[[Path], None]) -> None:
    entry = tmp_path / "out" / "val" / IMAGENET100[3]
    entry.parent.mkdir(parents=True)
    make_entry(entry)
    before = snapshot(tmp_path / "out")
    result = subset(imagenet, tmp_path / "out", "--force")
    assert_refused(result, str(entry), "not even with --force", "Move or delete the real files and folders")
    assert snapshot(tmp_path / "out") == before


@pytest.mark.parametrize("link_mode, difference", [
    ("hardlink", "not a hard link to it"), ("copy", "differs in size"),
])
def test_different_file_inside_a_class_folder_is_never_replaced(
        imagenet: Path, tmp_path: Path, link_mode: str, difference: str) -> None:
    wnid = IMAGENET100[0]
    source = _source_files(imagenet, "train", wnid)[0]
    impostor = tmp_path / "out" / "train" / wnid / source.name
    impostor.parent.mkdir(parents=True)
    impostor.write_bytes(b"a different picture")
    before = snapshot(tmp_path / "out")
    result = subset(imagenet, tmp_path / "out", "--link", link_mode, "--force")
    assert_refused(result, str(impostor), difference)
    assert snapshot(tmp_path / "out") == before


def test_symlinks_where_hard_links_belong_are_named_as_such_and_replaced_with_force(
        imagenet: Path, tmp_path: Path) -> None:
    # A symlink to the right file is still not a hard link: mauctl made such "hard links" from an
    # ImageNet of symlinks before it linked the files they lead to.
    wnid = IMAGENET100[0]
    source = _source_files(imagenet, "train", wnid)[0]
    stray = tmp_path / "out" / "train" / wnid / source.name
    stray.parent.mkdir(parents=True)
    stray.symlink_to(source)
    before = snapshot(tmp_path / "out")
    refused = subset(imagenet, tmp_path / "out", "--link", "hardlink", "--splits", "train")
    assert_refused(refused, f"1 symlink(s) in {tmp_path / 'out' / 'train'} stand where --link hardlink puts "
                            "real folders and files", str(stray), "--force")
    assert "point elsewhere" not in refused.output
    assert snapshot(tmp_path / "out") == before
    forced = subset(imagenet, tmp_path / "out", "--link", "hardlink", "--splits", "train", "--force")
    assert forced.exit_code == 0, forced.output
    assert not stray.is_symlink() and os.path.samestat(source.stat(), stray.lstat())
    assert summary_row(forced.output, "train", 100, 200, "200 hard links", "0 hard links"), forced.output


@pytest.fixture
def other_filesystem(tmp_path: Path):
    """A new folder in /dev/shm when that is another filesystem than the test's folder; removed afterwards."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)) or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a writable /dev/shm on another filesystem than the temporary folder")
    folder = Path(tempfile.mkdtemp(prefix="mauctl-test-", dir=shm))
    yield folder
    shutil.rmtree(folder)


def test_hard_links_to_files_on_another_filesystem_are_refused_before_anything_is_created(
        tmp_path: Path, other_filesystem: Path) -> None:
    chosen = IMAGENET100[:2]
    store = build_imagenet(other_filesystem / "store", train=chosen, val=chosen)
    source = symlink_farm(store, tmp_path / "imagenet")
    classes = write_classes(tmp_path / "two.txt", *chosen)
    result = subset(source, tmp_path / "out", "--classes", classes, "--link", "hardlink")
    refusal = "source file(s), reached through symlinks, lie on another filesystem than"
    assert_refused(result, "2 problems, nothing was created", f"4 {refusal} {tmp_path / 'out' / 'train'}",
                   f"2 {refusal} {tmp_path / 'out' / 'val'}",
                   str(store / "train" / chosen[0] / f"{chosen[0]}_1.JPEG"), "--link symlink or copy")
    assert not (tmp_path / "out").exists()
    copied = subset(source, tmp_path / "out", "--classes", classes, "--link", "copy")
    assert copied.exit_code == 0, copied.output


def test_split_folder_that_is_a_symlink_is_refused(imagenet: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train").symlink_to(outside, target_is_directory=True)
    result = subset(imagenet, tmp_path / "out", "--force")
    assert_refused(result, f"{tmp_path / 'out' / 'train'} is a symlink")
    assert list(outside.iterdir()) == []
    assert sorted(os.listdir(tmp_path / "out")) == ["train"]


def test_destination_that_is_a_file_is_refused(imagenet: Path, tmp_path: Path) -> None:
    (tmp_path / "out").write_text("mine")
    assert_refused(subset(imagenet, tmp_path / "out"), "is not a folder")
    assert (tmp_path / "out").read_text() == "mine"


@pytest.mark.parametrize("inside", [".", "train/in100", f"val/{IMAGENET100[0]}/in100"])
def test_destination_inside_the_source_is_refused(imagenet: Path, inside: str) -> None:
    before = snapshot(imagenet)
    assert_refused(subset(imagenet, imagenet / inside), "would write into your ImageNet: ")
    assert snapshot(imagenet) == before


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    source = build_imagenet(tmp_path / "imagenet", train=IMAGENET100[1:])
    (tmp_path / "out" / "val").mkdir(parents=True)
    _real_file(tmp_path / "out" / "val" / IMAGENET100[2])
    result = subset(source, tmp_path / "out")
    assert_refused(result, "2 problems, nothing was created",
                   f"1 of 100 classes are missing from {source / 'train'}",
                   str(tmp_path / "out" / "val" / IMAGENET100[2]))
    assert not (tmp_path / "out" / "val" / IMAGENET100[1]).exists()
