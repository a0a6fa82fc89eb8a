"""`mauctl pretrain --dry-run`: what a user sees before any training starts.

Each test runs the real Typer app in-process; the printed TOML (the plan lines are comments)
is parsed with tomllib. Errors must exit with 2, print a short message on stderr, show no
traceback and write nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from mauctl import cli
from mauctl.cli import app
from mauctl.compat import tomllib
from mauctl.config import OptimConfig, PretrainConfig, load_config
from mauctl.errors import UsageError
from mauctl.moco import bn_splits


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No MAUCTL_* or torchrun variable of the real environment, and --debug off (it is process-global)."""
    for name in list(os.environ):
        if name.upper().startswith("MAUCTL_") or name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(name)
    monkeypatch.setitem(cli._debug, "on", False)


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    """An empty working directory: a dry run or a refused command must leave it empty (no runs/)."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def make_image_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 16) -> Path:
    """ROOT/train/class_<i>/img_<j>.png, small real PNGs of distinct colours."""
    for c in range(classes):
        folder = root / "train" / f"class_{c}"
        folder.mkdir(parents=True)
        for j in range(per_class):
            Image.new("RGB", (size, size), (40 * c, 10 * j, 128)).save(folder / f"img_{j}.png")
    return root


def mauctl(*args, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def dry_run(*args, env: dict[str, str] | None = None) -> tuple[dict, str]:
    result = mauctl("pretrain", "--dry-run", *args, env=env)
    assert result.exit_code == 0, result.output
    return tomllib.loads(result.stdout), result.stdout


def assert_usage_error(result, cwd: Path, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    message = result.stderr
    for fragment in fragments:
        assert fragment in message, message
    assert len(message.strip().splitlines()) <= 6 and "\n\n" not in message.strip()
    assert list(cwd.iterdir()) == []


def plan_lines(stdout: str) -> list[str]:
    return [line[2:] for line in stdout.splitlines() if line.startswith("# ")]


# ---------------------------------------------------------------- precedence end to end


def test_every_layer_in_its_place(tmp_path, cwd):
    config = tmp_path / "mine.toml"
    config.write_text("[optim]\nweight_decay = 0.0005\nepochs = 50\n", encoding="utf-8")
    env = {"MAUCTL_OPTIM__EPOCHS": "60", "MAUCTL_OPTIM__LR": "0.2", "MAUCTL_OPTIM__MOMENTUM": "0.8"}
    table, _ = dry_run(
        "--preset", "v1-b128", "--config", config, "--lr", "0.3", "--workers", "3", "--device", "cpu",
        "--loss", "align2-unif2", "--set", "loss.unif_t=5", "--set", "optim.momentum=0.7",
        "--set", "data.workers=5", "--set", "model.queue_size=1024", "--set", "model.queue_size=2048",
        env=env,
    )
    optim = table["optim"]
    assert optim["batch_size"] == 128  # preset over defaults
    assert optim["weight_decay"] == 0.0005  # --config over preset
    assert optim["epochs"] == 60  # env over --config
    assert optim["lr"] == 0.3  # flag over env
    assert optim["momentum"] == 0.7  # --set over env
    assert table["data"]["workers"] == 5  # --set over the specific flag
    assert (table["loss"]["align_w"], table["loss"]["unif_t"]) == (2.0, 5.0)  # --set over --loss
    assert table["model"]["queue_size"] == 2048  # the later --set wins
    assert list(cwd.iterdir()) == []


# ---------------------------------------------------------------- save the dry run, pass it back


def save_and_rerun(stdout: str, path: Path, *extra) -> tuple[dict, str]:
    path.write_text(stdout, encoding="utf-8")
    return dry_run("--config", path, *extra)


@pytest.mark.parametrize("preset", ["v1-b128", "v2-b256-lr0.06", "in1k-v2-b256", "demo"])
@pytest.mark.parametrize("loss", ["contr-t0.07", "contr-t0.2", "align4-unif4"])
def test_dry_run_output_passed_back_with_config_is_the_same_config(preset, loss, tmp_path, cwd):
    first, stdout = dry_run("--preset", preset, "--loss", loss)
    second, stdout2 = save_and_rerun(stdout, tmp_path / "resolved.toml")
    assert second == first
    assert first["preset"] == {"command": "pretrain", "base": preset}  # the file says which preset it is ...
    # ... and a run of it says so too; the demo's L_uniform is over the whole batch, no table column's
    column = "custom" if preset == "demo" and not loss.startswith("contr") else loss
    assert any(line.startswith(f"preset: {preset}; loss column: {column}") for line in plan_lines(stdout2))
    assert load_config("pretrain", config_file=tmp_path / "resolved.toml", environ={}).config == \
        PretrainConfig.model_validate({k: v for k, v in first.items() if k != "preset"})
    assert first["run"]["out"] == f"runs/{preset}_{loss if column == loss else 'custom-loss'}"
    config_text = [line for line in stdout.splitlines() if not line.startswith("#")]
    assert [line for line in stdout2.splitlines() if not line.startswith("#")] == config_text


TRICKY_FOLDERS = ["my images", 'say "cheese"', "it's", "back\\slash", "dätä ✓ 日本"]


@pytest.mark.parametrize("name", TRICKY_FOLDERS)
def test_round_trip_with_overrides_and_tricky_folder_names(name, tmp_path, cwd):
    data = make_image_folder(tmp_path / name, classes=2, per_class=4, size=8)
    first, stdout = dry_run(
        "--preset", "v2-b128", "--batch-size", "8", "--set", "model.queue_size=64",
        "--set", "optim.schedule=[30,40]", "--set", f"data.root={data}",
        "--out", str(tmp_path / name / "run"),
    )
    assert first["data"]["root"] == str(data)
    assert first["optim"]["schedule"] == [30, 40]
    second, _ = save_and_rerun(stdout, tmp_path / "resolved.toml")
    assert second == first
    assert list(cwd.iterdir()) == []


# ---------------------------------------------------------------- refused, with exit 2 and nothing written


@pytest.mark.parametrize(
    "args, env, fragments",
    [
        (["--lr", "-1"], None, ["optim.lr = -1.0", "greater than 0"]),
        (["--lr", "0"], None, ["optim.lr = 0.0", "greater than 0"]),
        (["--epochs", "0"], None, ["optim.epochs = 0", "greater than or equal to 1"]),
        (["--set", "model.queue_size=1000"], None, ["model.queue_size 1000", "multiple", "batch_size 256",
                                                     "use --batch-size 250 or 500, or --set model.queue_size=768"]),
        (["--nproc-per-node", "3", "--device", "cpu"], None,
         ["optim.batch_size = 256 is not divisible by the world size 3"]),
        (["--loss", "contr-t0.07", "--set", "loss.contr_w=0"], None,
         ["contr_w, align_w and unif_w are all 0"]),
        (["--arch", "resnet5"], None, ["model.arch = 'resnet5'", "did you mean 'resnet50'?"]),
        (["--preset", "v2-b265"], None, ["unknown preset 'v2-b265'", "did you mean 'v2-b256'?"]),
        (["--loss", "align3-unif5"], None, ["unknown loss 'align3-unif5'", "did you mean 'align3-unif3'?"]),
        (["--set", "optim.lr"], None, ["--set optim.lr", "expected section.key=value"]),
        (["--set", "optim.epochs=ten"], None, ["optim.epochs = 'ten'", "valid integer"]),
        (["--lr", "abc"], None, ["'--lr'"]),
        (["--set", "optim.schedule=[160,120]"], None, ["optim.schedule = [160, 120]", "strictly increasing"]),
        (["--node-rank", "1"], None, ["node_rank 1 must be below nnodes 1"]),
        (["--nnodes", "2"], None, ["rdzv_endpoint (host:port) is required when nnodes > 1"]),
        (["--device", "gpu"], None, ["run.device = 'gpu'", "expected auto, cpu, cuda or cuda:N"]),
        (["--preset", "lincls"], None, ["preset 'lincls' is a lincls preset, not a pretrain one"]),
        (["--set", "optim.lrr=1"], None, ["unknown key 'optim.lrr' (did you mean 'optim.lr'?)"]),
        (["--set", "optimm.lr=1"], None, ["unknown section 'optimm' (did you mean 'optim'?)"]),
        ([], {"MAUCTL_OPTIM__LRR": "1"}, ["MAUCTL_OPTIM__LRR", "did you mean 'optim.lr'?"]),
        ([], {"MAUCTL_OPTIMM__LR": "1"}, ["MAUCTL_OPTIMM__LR", "did you mean 'optim'?"]),
        (["--preset", "v1-b256", "--set", "model.bn_splits=3", "--device", "cpu"], None,
         ["model.bn_splits = 3 does not divide the per-process batch 256"]),
    ],
    ids=["negative-lr", "zero-lr", "zero-epochs", "queue-not-multiple", "batch-vs-world", "all-weights-zero",
         "unknown-arch", "unknown-preset", "unknown-loss", "set-without-equals", "string-for-int",
         "flag-string-for-float", "decreasing-schedule", "node-rank", "nnodes-without-rdzv", "bad-device",
         "lincls-preset", "set-unknown-key", "set-unknown-section", "env-unknown-key", "env-unknown-section",
         "bn-splits-non-divisor"],
)
def test_bad_input_exits_2_with_a_short_message(args, env, fragments, cwd):
    assert_usage_error(mauctl("pretrain", "--dry-run", *args, env=env), cwd, *fragments)


def test_unknown_keys_in_config_file(tmp_path, cwd):
    config = tmp_path / "mine.toml"
    config.write_text("[optimm]\nlr = 0.1\n", encoding="utf-8")
    assert_usage_error(mauctl("pretrain", "--dry-run", "--config", config), cwd,
                       str(config), "unknown section 'optimm' (did you mean 'optim'?)")
    config.write_text("[optim]\nlrr = 0.1\n", encoding="utf-8")
    assert_usage_error(mauctl("pretrain", "--dry-run", "--config", config), cwd,
                       "unknown key 'optim.lrr' (did you mean 'optim.lr'?)")


def test_toml_syntax_error_names_file_and_line(tmp_path, cwd):
    config = tmp_path / "bad.toml"
    config.write_text("# my settings\n[optim]\nlr = 0.1\nbatch_size = \n", encoding="utf-8")
    assert_usage_error(mauctl("pretrain", "--dry-run", "--config", config), cwd,
                       f"{config}:4", "TOML syntax error")


def test_a_real_run_is_refused_too_before_writing_anything(cwd):
    assert_usage_error(mauctl("pretrain", "--lr", "-1"), cwd, "optim.lr = -1.0")


def test_debug_shows_the_traceback_and_keeps_exit_status_2(cwd):
    result = mauctl("--debug", "pretrain", "--dry-run", "--lr", "-1")
    assert result.exit_code == 2, result.output
    assert "Traceback" in result.stderr and "UsageError" in result.stderr and "optim.lr = -1.0" in result.stderr
    assert list(cwd.iterdir()) == []


# ---------------------------------------------------------------- the plan, on a real image folder


def test_dry_run_counts_classes_images_and_steps(tmp_path, cwd):
    data = make_image_folder(tmp_path / "pets")
    table, stdout = dry_run(data, "--preset", "v1-b256", "--batch-size", "8", "--set", "model.queue_size=64",
                            "--device", "cpu")
    plan = plan_lines(stdout)
    assert f"data: {data / 'train'}: 3 classes, 36 images, 4 steps per epoch (800 in all)" in plan
    assert "world size: 1 = 1 node x 1 process on cpu" in plan
    assert "batch: global 8, per process 8, 1 BatchNorm group of 8 per process" in plan
    assert "LR schedule: 0.03, x0.1 from epoch 120, 160, 200 epochs" in plan
    assert "preset: v1-b256; loss column: align3-unif3" in plan
    assert table["data"]["root"] == str(data)
    assert list(cwd.iterdir()) == []


def test_dry_run_shows_the_cosine_schedule_for_v2(tmp_path, cwd):
    data = make_image_folder(tmp_path / "pets")
    _, stdout = dry_run(data, "--preset", "v2-b128", "--batch-size", "8", "--set", "model.queue_size=64")
    assert "LR schedule: cosine from 0.03 to 0 over 200 epochs (per epoch)" in plan_lines(stdout)


@pytest.mark.parametrize(
    "sets, line",
    [
        ((), "checkpoints: last.pt after every epoch, every 30 minutes within one, and on a stop signal; "
             "epoch_NNNN.pt kept every 20 epochs"),
        (("run.save_minutes=0", "run.save_every=0"), "checkpoints: last.pt after every epoch, not within one, "
                                                      "and on a stop signal; no others kept"),
        (("run.save_minutes=7.5",), "checkpoints: last.pt after every epoch, every 7.5 minutes within one, "
                                    "and on a stop signal; epoch_NNNN.pt kept every 20 epochs"),
    ],
)
def test_plan_says_when_checkpoints_are_written(sets, line, cwd):
    _, stdout = dry_run("--preset", "v1-b256", *(a for s in sets for a in ("--set", s)))
    assert line in plan_lines(stdout)


@pytest.mark.parametrize(
    "args, world, batch",
    [
        (["--preset", "v1-b256"], "world size: 1 = 1 node x 1 process on cpu",
         "batch: global 256, per process 256, 8 BatchNorm groups of 32 per process"),
        (["--preset", "v1-b128"], "world size: 1 = 1 node x 1 process on cpu",
         "batch: global 128, per process 128, 4 BatchNorm groups of 32 per process"),
        (["--preset", "v1-b256", "--nproc-per-node", "2"], "world size: 2 = 1 node x 2 processes on cpu",
         "batch: global 256, per process 128, 4 BatchNorm groups of 32 per process"),
        (["--preset", "v1-b256", "--nproc-per-node", "8"], "world size: 8 = 1 node x 8 processes on cpu",
         "batch: global 256, per process 32, 1 BatchNorm group of 32 per process"),
        (["--preset", "v1-b256", "--set", "model.bn_splits=2"],
         "world size: 1 = 1 node x 1 process on cpu",
         "batch: global 256, per process 256, 2 BatchNorm groups of 128 per process"),
        (["--preset", "v1-b256", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "head:29500",
          "--nproc-per-node", "4"], "world size: 8 = 2 nodes x 4 processes on cpu",
         "batch: global 256, per process 32, 1 BatchNorm group of 32 per process"),
    ],
)
def test_plan_shows_world_size_batches_and_bn_groups(args, world, batch, cwd):
    _, stdout = dry_run(*args, "--device", "cpu")
    plan = plan_lines(stdout)
    assert world in plan and batch in plan


def test_plan_inside_a_torchrun_worker_uses_its_world_size(cwd):
    env = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}
    _, stdout = dry_run("--preset", "v1-b256", "--device", "cpu", env=env)
    plan = plan_lines(stdout)
    assert "world size: 4 = 1 node x 4 processes on cpu (inside an existing torchrun/SLURM worker)" \
        in plan
    assert "batch: global 256, per process 64, 2 BatchNorm groups of 32 per process" in plan


@pytest.mark.parametrize("per_process, groups", [(256, 8), (128, 4), (64, 2), (32, 1), (48, 1), (100, 2),
                                                 (8, 1), (1, 1), (96, 3)])
def test_auto_bn_splits_makes_groups_of_about_32(per_process, groups):
    assert bn_splits(0, per_process) == groups


def test_explicit_bn_splits_must_divide_the_batch():
    assert bn_splits(4, 256) == 4
    with pytest.raises(UsageError, match="model.bn_splits = 3 does not divide the per-process batch 256"):
        bn_splits(3, 256)


def test_missing_data_folder(tmp_path, cwd):
    missing = tmp_path / "nowhere"
    assert_usage_error(mauctl("pretrain", "--dry-run", missing), cwd, str(missing), "does not exist")


def test_data_folder_without_train_shows_the_expected_layout(tmp_path, cwd):
    data = tmp_path / "flat"
    (data / "cats").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(data / "cats" / "a.png")
    assert_usage_error(mauctl("pretrain", "--dry-run", data), cwd,
                       f"{data / 'train'} does not exist", f"Expected {data}/train/<class>/<image>")


def test_empty_class_folder_is_named(tmp_path, cwd):
    data = make_image_folder(tmp_path / "pets")
    (data / "train" / "empty_class").mkdir()
    result = mauctl("pretrain", "--dry-run", data, "--batch-size", "8", "--set", "model.queue_size=64")
    assert_usage_error(result, cwd, "1 class folder without images: empty_class")


def test_fewer_images_than_one_batch(tmp_path, cwd):
    data = make_image_folder(tmp_path / "pets")
    assert_usage_error(mauctl("pretrain", "--dry-run", data, "--batch-size", "64"), cwd,
                       "has 36 images, fewer than one global batch (optim.batch_size = 64)")


# ---------------------------------------------------------------- help


def flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


@pytest.mark.parametrize(
    "args, usage, summary",
    [
        (["--help"], "Usage: mauctl [OPTIONS] COMMAND", "Pretrain image encoders with MoCo"),
        (["pretrain", "--help"], "Usage: mauctl pretrain [OPTIONS]", "MoCo pretraining with the contrastive"),
        (["subset", "--help"], "Usage: mauctl subset [OPTIONS]", "Build ImageNet-100 (or any class subset)"),
        (["presets", "--help"], "Usage: mauctl presets [OPTIONS]", "List the presets and the published"),
    ],
)
def test_help_exits_0(args, usage, summary):
    result = mauctl(*args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert usage in flat(result.output) and summary in flat(result.output)


def test_top_level_help_lists_the_commands():
    text = flat(mauctl("--help", env={"COLUMNS": "200"}).output)
    assert all(name in text for name in ("pretrain", "presets", "subset"))


def test_pretrain_help_uses_the_config_descriptions():
    text = flat(mauctl("pretrain", "--help", env={"COLUMNS": "200"}).output)
    for key in ("epochs", "lr", "batch_size"):
        description = OptimConfig.model_fields[key].description
        assert flat(description).rstrip(".") in text


def test_pretrain_help_names_the_config_key_and_default():
    text = flat(mauctl("pretrain", "--help", env={"COLUMNS": "200"}).output)
    assert "optim.epochs, default 200." in text


def test_malformed_env_list_exits_2(cwd):
    result = mauctl("pretrain", "--dry-run", env={"MAUCTL_OPTIM__SCHEDULE": "30,40"})
    assert_usage_error(result, cwd, "MAUCTL_OPTIM__SCHEDULE")


def test_one_of_anything_is_singular(tmp_path, cwd):
    data = make_image_folder(tmp_path / "pets", classes=2, per_class=4)
    _, stdout = dry_run(data, "--batch-size", "8", "--set", "model.queue_size=64", "--epochs", "1",
                        "--set", "eval.every=1", "--set", "run.save_every=1", "--device", "cpu")
    plan = "\n".join(plan_lines(stdout))
    assert "2 classes, 8 images, 1 step per epoch (1 in all)" in plan
    assert "LR schedule: 0.03, x0.1 from epoch" not in plan and "constant 0.03" in plan and ", 1 epoch\n" in plan
    assert "every 1 epoch" in plan and "kept every 1 epoch" in plan
    assert not any(word in plan for word in ("(s)", "1 epochs", "1 steps", "1 classes", "1 images"))


@pytest.mark.parametrize("command", ["pretrain", "lincls", "bench", "export", "report", "subset", "presets", "demo"])
def test_help_reads_like_a_usual_command_line_at_80_columns(command):
    """No type placeholders such as <bool> or <list[str]>, no {argument}, no option forms that don't exist."""
    text = mauctl(command, "--help", env={"COLUMNS": "80"}).output
    assert all(len(line) <= 80 for line in text.splitlines()), text
    for oddity in ("<bool>", "<list", "<str>", "<int>", "{", "[-b]", "[-a]", "[--"):
        assert oddity not in text, (oddity, text)


def test_help_lists_every_preset_of_the_command():
    from mauctl.presets import all_presets

    for command in ("pretrain", "lincls"):
        text = flat(mauctl(command, "--help", env={"COLUMNS": "200"}).output)
        for p in all_presets():
            assert (p.name in text) == (p.command == command or p.name in ("lincls",)) or p.command != command, p
        assert all(p.name in text for p in all_presets() if p.command == command), text
    assert "Usage: mauctl lincls [OPTIONS] SOURCE [DATA]" in flat(mauctl("lincls", "--help").output)
