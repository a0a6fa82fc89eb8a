"""Build a class subset of ImageNet (ImageNet-100 by default) as symlinks, hard links or copies.

``make_subset`` checks the arguments, the source tree and the destination before it creates
anything, and refuses with one ``UsageError`` that names every offender. Existing entries that
already are what it would create are kept, so rerunning the same command is a no-op.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mauctl.data.folder import is_image
from mauctl.errors import RunError, UsageError, closest
from mauctl.presets import resource_text

__all__ = ["SplitSummary", "make_subset"]

LINK_MODES = ("symlink", "hardlink", "copy")
# What each link mode creates, one per class folder (symlink) or per file (hardlink, copy): the unit
# of a summary's "created" and "already there" counts, singular and plural.
ENTRY_NAMES = {"symlink": ("class symlink", "class symlinks"), "hardlink": ("hard link", "hard links"),
               "copy": ("file copy", "file copies")}
BUNDLED_CLASSES = "imagenet100_classes.txt"
WNID = re.compile(r"n[0-9]{8}")  # [0-9], not \d: \d also matches non-ASCII digits
# Split folders a destination may never lie in, even when they are not among the requested splits.
STANDARD_SPLITS = ("train", "val")
# Enough to list every class of ImageNet; file-level conflicts can number in the hundreds of
# thousands, and past this many only a count is shown.
MAX_LISTED = 1000


@dataclass(frozen=True)
class SplitSummary:
    """One split's classes and images, and how many entries of ``link`` mode were created or already there."""

    split: str
    classes: int
    images: int
    created: int
    existing: int
    link: str

    def entries(self, count: int) -> str:
        """``count`` with its unit: '100 class symlinks', '1 hard link', '0 file copies'."""
        singular, plural = ENTRY_NAMES[self.link]
        return f"{count} {singular if count == 1 else plural}"


@dataclass(frozen=True)
class Problem:
    text: str
    hint: str | None = None


@dataclass(frozen=True)
class Step:
    """One destination entry to create: a link or file, or a real folder (``make_dir``)."""

    source: Path
    target: Path
    make_dir: bool = False
    replaces_link: bool = False


@dataclass
class SplitPlan:
    split: str
    classes: int
    images: int
    steps: list[Step] = field(default_factory=list)
    existing: int = 0
    stale_links: list[str] = field(default_factory=list)
    in_the_way: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    other_filesystem: list[str] = field(default_factory=list)
    bytes_to_copy: int = 0

    @property
    def created(self) -> int:
        return sum(1 for step in self.steps if not step.make_dir)


def make_subset(imagenet_dir: Path, subset_dir: Path, *, classes_file: Path | None = None,
                splits: Sequence[str] = ("train", "val"), link: str = "symlink",
                force: bool = False) -> list[SplitSummary]:
    """Create ``subset_dir/<split>/<wnid>`` for every class and split, or refuse without creating anything."""
    imagenet_dir, subset_dir = Path(imagenet_dir), Path(subset_dir)
    splits = [splits] if isinstance(splits, str) else list(splits)
    classes, class_problems = _load_classes(classes_file)
    _refuse_if(_check_link(link) + _check_splits(splits) + class_problems)
    if not imagenet_dir.is_dir():
        raise UsageError(f"ImageNet folder {imagenet_dir} does not exist or is not a folder",
                         hint="Pass the folder that holds train/ and val/ (the PyTorch ImageNet layout).")
    problems, image_counts = _check_source(imagenet_dir, splits, classes)
    destination_problems = _check_destination(subset_dir, imagenet_dir, splits, link)
    problems += destination_problems
    plans = []
    if not destination_problems:
        for split in image_counts:
            plan = _plan_split(imagenet_dir, subset_dir, split, image_counts[split], link, force)
            problems += _plan_problems(plan, subset_dir / split, link)
            plans.append(plan)
        problems += _check_free_space(subset_dir, plans)
    _refuse_if(problems)
    _build(subset_dir, plans, link)
    return [SplitSummary(p.split, p.classes, p.images, p.created, p.existing, link) for p in plans]


# ---------------------------------------------------------------- arguments


def _load_classes(classes_file: Path | None) -> tuple[list[str], list[Problem]]:
    """The ids in ``classes_file`` (default: the bundled ImageNet-100 list) and what is wrong with it."""
    if classes_file is None:
        return _parse_classes(resource_text(BUNDLED_CLASSES), "the bundled ImageNet-100 list")
    try:
        text = Path(classes_file).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        return [], [Problem(f"classes file {classes_file} is not UTF-8 text",
                            hint="Pass a text file with one WordNet id (such as n01440764) per line.")]
    except OSError as exc:
        return [], [Problem(f"cannot read classes file {classes_file}: {exc.strerror or exc}",
                            hint="Check the path given to --classes.")]
    return _parse_classes(text, f"classes file {classes_file}")


def _parse_classes(text: str, source: str) -> tuple[list[str], list[Problem]]:
    first_line: dict[str, int] = {}
    offenders = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not WNID.fullmatch(line):
            offenders.append(f"line {number}: {line!r} is not a WordNet id")
        elif line in first_line:
            offenders.append(f"line {number}: {line} repeats line {first_line[line]}")
        else:
            first_line[line] = number
    hint = ("Write one WordNet id per line: 'n' and 8 digits, such as n01440764, each once; "
            "blank lines and lines starting with # are ignored.")
    if offenders:
        return [], [Problem(f"{source} has {len(offenders)} bad line(s):\n" + "\n".join(offenders), hint)]
    if not first_line:
        return [], [Problem(f"{source} lists no classes (only blank lines and comments)", hint)]
    return list(first_line), []


def _check_link(link: str) -> list[Problem]:
    if link in LINK_MODES:
        return []
    match = closest(link, LINK_MODES)
    return [Problem(f"unknown link mode {link!r}: valid modes are {', '.join(LINK_MODES)}",
                    hint=f"Did you mean --link {match}?" if match else None)]


def _check_splits(splits: list[str]) -> list[Problem]:
    if not splits:
        return [Problem("no splits given", hint="Pass --splits train,val (or a subset of them).")]
    offenders = []
    for split in dict.fromkeys(splits):
        if split in ("", ".", "..") or any(sep in split for sep in ("/", "\\", "\0")):
            offenders.append(f"{split!r} is not a plain folder name")
        if splits.count(split) > 1:
            offenders.append(f"{split!r} is given {splits.count(split)} times")
    if not offenders:
        return []
    return [Problem("bad --splits: " + "; ".join(offenders),
                    hint="Pass comma-separated folder names under IMAGENET_DIR, each once: train,val.")]


# ---------------------------------------------------------------- source


def _check_source(root: Path, splits: list[str], classes: list[str]
                  ) -> tuple[list[Problem], dict[str, dict[str, int]]]:
    """What is wrong with ``root``'s splits, and the image count of every class of the sound ones."""
    present = [s for s in splits if (root / s).is_dir()]
    problems = []
    if len(present) < len(splits):
        problems.append(_missing_splits_problem(root, splits, present))
    image_counts: dict[str, dict[str, int]] = {}
    missing_classes: dict[str, list[str]] = {}
    for split in present:
        folder = root / split
        loose = _loose_images(folder)
        if loose:
            problems.append(_flat_split_problem(folder, split, loose))
            continue
        missing = [c for c in classes if not (folder / c).is_dir()]
        if missing:
            missing_classes[split] = missing
            continue
        image_counts[split] = {c: _count_images(folder / c) for c in classes}
        empty = [c for c, count in image_counts[split].items() if count == 0]
        if empty:
            problems.append(Problem(
                f"{len(empty)} class folder(s) in {folder} hold no images:\n" + _wrap(empty),
                hint="Training refuses empty classes: add their images, or leave them out with --classes."))
    problems += _missing_classes_problems(root, missing_classes, len(classes), complete=list(image_counts))
    return problems, image_counts


def _missing_splits_problem(root: Path, splits: list[str], present: list[str]) -> Problem:
    missing = [s for s in splits if s not in present]
    text = f"split folder(s) missing from {root}: {', '.join(s + '/' for s in missing)}"
    if present:
        return Problem(text, hint=f"To build only the splits you have, pass --splits {','.join(present)}.")
    subfolders = sorted(e.name for e in os.scandir(root) if e.is_dir())[:10]
    holds = f" (it holds: {', '.join(subfolders)})" if subfolders else " (it holds no folders)"
    return Problem(text, hint=f"IMAGENET_DIR should be the folder holding {'/, '.join(splits)}/{holds}; "
                              "or name the splits you have with --splits.")


def _flat_split_problem(folder: Path, split: str, loose: int) -> Problem:
    hint = f"Expected the layout {folder}/<wnid>/<image>, one folder per class."
    if split == "val":
        hint += (" ImageNet's official validation images come flat, in one folder: sort them into class "
                 "folders first, for example with valprep.sh from the PyTorch ImageNet example.")
    return Problem(f"{folder} is flat: {loose} image(s) lie directly in it instead of in class folders", hint)


def _missing_classes_problems(root: Path, missing: dict[str, list[str]], total: int,
                              complete: list[str]) -> list[Problem]:
    hint = "Check that IMAGENET_DIR holds the full ImageNet, or pass --classes FILE with the classes you have"
    if complete:
        hint += f"; to build only the complete splits, pass --splits {','.join(complete)}"
    return [Problem(f"{len(ids)} of {total} classes are missing from {root / split}:\n" + _wrap(ids),
                    hint + ".") for split, ids in missing.items()]


def _loose_images(folder: Path) -> int:
    return sum(1 for e in os.scandir(folder) if is_image(e.name) and e.is_file())


def _count_images(folder: Path) -> int:
    # followlinks as torchvision's ImageFolder does, so the count is what training will see
    return sum(sum(1 for f in files if is_image(f)) for _, _, files in os.walk(folder, followlinks=True))


# ---------------------------------------------------------------- destination


def _check_destination(subset_dir: Path, root: Path, splits: list[str], link: str) -> list[Problem]:
    overlap = _source_overlap(subset_dir, root, splits)
    if overlap:
        written, folder = overlap
        which = "it" if written == subset_dir.resolve() else str(written)
        relation = "is" if written == folder else "lies in"
        return [Problem(f"building in {subset_dir} would write into your ImageNet: "
                        f"{which} {relation} {folder}",
                        hint="Pick a SUBSET_DIR that is neither IMAGENET_DIR nor inside its split folders.")]
    if os.path.lexists(subset_dir) and not subset_dir.is_dir():
        return [Problem(f"{subset_dir} exists and is not a folder",
                        hint="Pick another SUBSET_DIR, or move that entry away yourself.")]
    problems = []
    for split in splits:
        target = subset_dir / split
        kind = _kind(target)
        if kind == "link":
            problems.append(Problem(
                f"{target} is a symlink (to {os.readlink(target)}); mauctl never writes through a link "
                "out of the destination",
                hint=f"Remove the link {target} (its target is left alone) or pick another SUBSET_DIR."))
        elif kind == "file":
            problems.append(Problem(f"{target} exists and is not a folder",
                                    hint="Move it away yourself or pick another SUBSET_DIR."))
        else:
            problems += _check_writable(target, root / split, link)
    return problems


def _source_overlap(subset_dir: Path, root: Path, splits: list[str]) -> tuple[Path, Path] | None:
    """A folder we would write to and the source folder (IMAGENET_DIR or a split folder) it falls in."""
    source = root.resolve()
    split_folders = [(root / s).resolve() for s in dict.fromkeys([*splits, *STANDARD_SPLITS])]
    destination = subset_dir.resolve()
    # destination / split, not resolved: a symlinked split folder is refused on its own
    for written in (destination, *(destination / s for s in splits)):
        if written == source:
            return written, source
        for folder in split_folders:
            if written.is_relative_to(folder):
                return written, folder
    return None


def _check_writable(split_dir: Path, source_split: Path, link: str) -> list[Problem]:
    anchor = _nearest_existing(split_dir)
    if not anchor.is_dir():
        return [Problem(f"cannot create {split_dir}: {anchor} is not a folder",
                        hint="Pick another SUBSET_DIR.")]
    if not os.access(anchor, os.W_OK | os.X_OK):
        return [Problem(f"cannot create {split_dir}: no write permission in {anchor}",
                        hint="Pick a SUBSET_DIR you can write to.")]
    if link == "hardlink" and source_split.is_dir() and _device(anchor) != _device(source_split):
        return [Problem(f"{split_dir} and {source_split} are on different filesystems, "
                        "and hard links cannot cross filesystems",
                        hint="Put SUBSET_DIR on ImageNet's filesystem, or use --link symlink or copy.")]
    return []


def _check_free_space(subset_dir: Path, plans: list[SplitPlan]) -> list[Problem]:
    needed = sum(plan.bytes_to_copy for plan in plans)
    if not needed:
        return []
    anchor = _nearest_existing(subset_dir)
    free = shutil.disk_usage(anchor).free
    if needed <= free:
        return []
    return [Problem(f"copying needs {needed / 2**30:.1f} GiB but {anchor} has {free / 2**30:.1f} GiB free",
                    hint="Free some space, pick another SUBSET_DIR, or use --link symlink or hardlink.")]


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path):
        path = path.parent
    return path


def _device(path: Path) -> int:
    return os.stat(path).st_dev


def _kind(path: Path) -> str:
    """absent, link, dir or file (anything else that is not a folder), never following a link."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "absent"
    if stat.S_ISLNK(mode):
        return "link"
    return "dir" if stat.S_ISDIR(mode) else "file"


# ---------------------------------------------------------------- plan


def _plan_split(root: Path, subset_dir: Path, split: str, image_counts: dict[str, int], link: str,
                force: bool) -> SplitPlan:
    plan = SplitPlan(split, classes=len(image_counts), images=sum(image_counts.values()))
    planner = _Planner(plan, link, force, _device(_nearest_existing(subset_dir / split)))
    for wnid in image_counts:
        planner.class_folder(root / split / wnid, subset_dir / split / wnid)
    return plan


class _Planner:
    """Compares each destination entry with what ``link`` mode would put there and records the steps."""

    def __init__(self, plan: SplitPlan, link: str, force: bool, destination_device: int) -> None:
        self.plan, self.link, self.force = plan, link, force
        self.destination_device = destination_device

    def class_folder(self, source: Path, target: Path) -> None:
        if self.link == "symlink":
            self._link_to_folder(Path(os.path.realpath(source)), target)
        else:
            self._tree(source, target, parent_is_new=False)

    def _link_to_folder(self, source: Path, target: Path) -> None:
        kind = _kind(target)
        if kind == "absent":
            self.plan.steps.append(Step(source, target))
        elif kind == "link" and Path(os.path.realpath(target)) == source:
            self.plan.existing += 1
        elif kind == "link" and self._may_replace_link(target):
            self.plan.steps.append(Step(source, target, replaces_link=True))
        elif kind in ("dir", "file"):
            self.plan.in_the_way.append(f"{target} (a real {_kind_name(kind)} where the class link belongs)")

    def _tree(self, source: Path, target: Path, parent_is_new: bool) -> None:
        is_new = self._folder(source, target, parent_is_new)
        if is_new is None:
            return
        try:
            entries = sorted(os.scandir(source), key=lambda e: e.name)
        except OSError as exc:
            self.plan.unreadable.append(f"{source}: {exc.strerror or exc}")
            return
        for entry in entries:
            if entry.is_dir():
                self._tree(Path(entry.path), target / entry.name, is_new)
            else:
                self._file(Path(entry.path), target / entry.name, is_new)

    def _folder(self, source: Path, target: Path, parent_is_new: bool) -> bool | None:
        """Whether ``target`` will be a new folder; None when what lies below it cannot be planned."""
        kind = "absent" if parent_is_new else _kind(target)
        if kind == "absent":
            self.plan.steps.append(Step(source, target, make_dir=True))
            return True
        if kind == "dir":
            return False
        if kind == "link" and self._may_replace_link(target):
            self.plan.steps.append(Step(source, target, make_dir=True, replaces_link=True))
            return True
        if kind == "file":
            self.plan.in_the_way.append(f"{target} (a real file where a folder belongs)")
        return None

    def _file(self, source: Path, target: Path, parent_is_new: bool) -> None:
        try:
            source_stat = os.stat(source)
        except OSError as exc:
            self.plan.unreadable.append(f"{source}: {exc.strerror or exc}")
            return
        if not stat.S_ISREG(source_stat.st_mode):
            return  # sockets, pipes and the like are not dataset files
        kind = "absent" if parent_is_new else _kind(target)
        if kind == "link" and not self._may_replace_link(target):
            return
        if kind in ("absent", "link"):
            step = Step(self._file_to_link(source), target, replaces_link=kind == "link")
            self._add_file(step, source_stat)
        elif kind == "dir":
            self.plan.in_the_way.append(f"{target} (a real folder where a file belongs)")
        elif self._same_file(source_stat, os.lstat(target)):
            self.plan.existing += 1
        else:
            self.plan.in_the_way.append(f"{target} ({self._difference(source)})")

    def _file_to_link(self, source: Path) -> Path:
        """The file a hard link to ``source`` must name: where a source symlink leads, not the symlink.

        Linux's link(2) links a symlink itself, and os.link calls it whatever follow_symlinks says
        (python/cpython#81793, until Python 3.14): the "hard link" would be one more symlink, which a
        rerun would take for a link we did not make.
        """
        if self.link == "hardlink" and source.is_symlink():
            return Path(os.path.realpath(source))
        return source

    def _add_file(self, step: Step, source_stat: os.stat_result) -> None:
        if self.link == "hardlink" and source_stat.st_dev != self.destination_device:
            # a split folder on another filesystem is refused before planning: this is a file
            # reached through a symlink (to it or to its folder) or a mount point
            self.plan.other_filesystem.append(os.path.realpath(step.source))
            return
        self.plan.steps.append(step)
        if self.link == "copy":
            self.plan.bytes_to_copy += source_stat.st_size

    def _may_replace_link(self, target: Path) -> bool:
        """Whether the symlink at ``target``, which is not what we would create, may go (only with force)."""
        if self.force:
            return True
        self.plan.stale_links.append(f"{target} -> {os.readlink(target)}")
        return False

    def _same_file(self, source_stat: os.stat_result, target_stat: os.stat_result) -> bool:
        if self.link == "hardlink":
            return os.path.samestat(source_stat, target_stat)
        return source_stat.st_size == target_stat.st_size

    def _difference(self, source: Path) -> str:
        if self.link == "hardlink":
            return f"a different file from {source}, not a hard link to it"
        return f"differs in size from {source}"


def _kind_name(kind: str) -> str:
    return "folder" if kind == "dir" else "file"


def _plan_problems(plan: SplitPlan, split_dir: Path, link: str) -> list[Problem]:
    problems = []
    if plan.stale_links:
        # in symlink mode a link to the right class folder is already there, so these point elsewhere;
        # the other modes make real folders and files, so any symlink is in the way, wherever it points
        where = ("point elsewhere" if link == "symlink"
                 else f"stand where --link {link} puts real folders and files")
        problems.append(Problem(
            f"{len(plan.stale_links)} symlink(s) in {split_dir} {where}:\n" + _listing(plan.stale_links),
            hint="--force replaces those symlinks (what they point to is left alone); "
                 "or remove those links yourself."))
    if plan.in_the_way:
        problems.append(Problem(
            f"{len(plan.in_the_way)} real file(s) or folder(s) in {split_dir} are not what mauctl would "
            "create, and mauctl never removes or overwrites them, not even with --force:\n"
            + _listing(plan.in_the_way),
            hint="Move or delete the real files and folders listed yourself, or pick another SUBSET_DIR; "
                 "then rerun."))
    if plan.unreadable:
        problems.append(Problem(
            f"{len(plan.unreadable)} source entries cannot be read:\n" + _listing(plan.unreadable),
            hint="Fix their permissions or broken links in the ImageNet folder, then rerun."))
    if plan.other_filesystem:
        problems.append(Problem(
            f"{len(plan.other_filesystem)} source file(s), reached through symlinks, lie on another "
            f"filesystem than {split_dir}, and hard links cannot cross filesystems:\n"
            + _listing(plan.other_filesystem),
            hint="Use --link symlink or copy, or put SUBSET_DIR on the filesystem those files are on."))
    return problems


# ---------------------------------------------------------------- build


def _build(subset_dir: Path, plans: list[SplitPlan], link: str) -> None:
    where = subset_dir
    try:
        for plan in plans:
            where = subset_dir / plan.split
            where.mkdir(parents=True, exist_ok=True)
            for step in plan.steps:
                where = step.target
                _apply(step, link)
    except OSError as exc:
        raise RunError(f"failed while creating {where}: {exc.strerror or exc}",
                       hint="What was created so far is kept; fix the cause and rerun the same command."
                       ) from exc


def _apply(step: Step, link: str) -> None:
    if step.make_dir:
        if step.replaces_link:
            os.unlink(step.target)  # the link itself, never what it points to
        step.target.mkdir()
        return
    # Build under a temporary name next to the target, then rename over it: the target appears
    # whole or not at all, and a symlink in its place is replaced without being followed.
    temporary = step.target.with_name(f".{step.target.name}.{secrets.token_hex(4)}.mauctl-tmp")
    try:
        if link == "symlink":
            os.symlink(step.source, temporary, target_is_directory=True)
        elif link == "hardlink":
            os.link(step.source, temporary)
        else:
            shutil.copy2(step.source, temporary)
        os.replace(temporary, step.target)
    except BaseException:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise


# ---------------------------------------------------------------- messages


def _refuse_if(problems: list[Problem]) -> None:
    if not problems:
        return
    hints = "\n".join(dict.fromkeys(p.hint for p in problems if p.hint)) or None
    if len(problems) == 1:
        text = problems[0].text
        ending = "\nNothing was created." if "\n" in text else "; nothing was created"
        raise UsageError(text + ending, hint=hints)
    items = "\n".join("  - " + p.text.replace("\n", "\n    ") for p in problems)
    raise UsageError(f"{len(problems)} problems, nothing was created:\n{items}", hint=hints)


def _wrap(ids: list[str]) -> str:
    return textwrap.fill(", ".join(ids), width=100, initial_indent="  ", subsequent_indent="  ",
                         break_long_words=False, break_on_hyphens=False)


def _listing(lines: list[str]) -> str:
    shown = [f"  {line}" for line in lines[:MAX_LISTED]]
    if len(lines) > MAX_LISTED:
        shown.append(f"  and {len(lines) - MAX_LISTED} more")
    return "\n".join(shown)
