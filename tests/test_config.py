"""The configuration a user builds from presets, files, environment variables and flags.

Precedence, highest first: flags and ``--set`` > ``MAUCTL_<SECTION>__<KEY>`` > ``--config`` /
preset > defaults. Every test passes ``environ=`` so the real environment never leaks in.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mauctl.compat import tomllib
from mauctl.config import (
    LossConfig,
    OptimConfig,
    PretrainConfig,
    config_digest,
    load_config,
    loss_name,
    parse_set,
    read_toml,
    saved_config,
    to_toml,
)
from mauctl.engine.schedule import describe_schedule, lr_at
from mauctl.errors import UsageError

PRETRAIN_PRESETS = ["v1-b128", "v1-b256", "v1-b256-lr0.06", "v2-b128", "v2-b256", "v2-b256-lr0.06",
                    "in1k-v2-b256", "demo"]
LOSSES = ["contr-t0.07", "contr-t0.2", "align2-unif2", "align3-unif3", "align4-unif4"]


def load(**kwargs) -> PretrainConfig:
    kwargs.setdefault("environ", {})
    return load_config("pretrain", **kwargs).config


def origin(**kwargs) -> dict[str, str]:
    kwargs.setdefault("environ", {})
    return load_config("pretrain", **kwargs).origin


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def usage_error(**kwargs) -> str:
    with pytest.raises(UsageError) as info:
        load(**kwargs)
    return str(info.value)


# ---------------------------------------------------------------- precedence, one pair at a time


def test_preset_overrides_the_defaults():
    assert load().optim.batch_size == 256
    assert load(preset="v1-b128").optim.batch_size == 128


def test_config_file_is_laid_over_the_preset(tmp_path):
    config = write(tmp_path / "mine.toml", "[optim]\nlr = 0.1\n")
    c = load(preset="v2-b128", config_file=config)
    assert c.optim.lr == 0.1  # from the file
    assert c.optim.batch_size == 128 and c.optim.cos is True  # the rest of the preset survives


def test_env_overrides_the_config_file_key_by_key(tmp_path):
    config = write(tmp_path / "mine.toml", "[optim]\nlr = 0.1\nbatch_size = 64\n")
    resolved = load_config("pretrain", config_file=config, environ={"MAUCTL_OPTIM__LR": "0.2"})
    assert resolved.config.optim.lr == 0.2
    assert resolved.config.optim.batch_size == 64  # the env layer does not reset the rest of [optim]
    assert resolved.origin["optim.lr"] == "environment (MAUCTL_OPTIM__LR)"


def test_env_overrides_the_preset():
    c = load(preset="v2-b256", environ={"MAUCTL_OPTIM__BATCH_SIZE": "128", "MAUCTL_MODEL__MLP": "false"})
    assert c.optim.batch_size == 128
    assert c.model.mlp is False


def test_env_overrides_the_defaults():
    assert load(environ={"MAUCTL_OPTIM__EPOCHS": "7"}).optim.epochs == 7


def test_flags_override_env():
    env = {"MAUCTL_OPTIM__LR": "0.2"}
    assert load(environ=env, flags={"optim.lr": 0.3}).optim.lr == 0.3
    assert origin(environ=env, flags={"optim.lr": 0.3})["optim.lr"] == "command-line flags"


def test_flags_not_given_leave_env_alone():
    assert load(environ={"MAUCTL_OPTIM__LR": "0.2"}, flags={"optim.lr": None}).optim.lr == 0.2


def test_set_overrides_env():
    assert load(environ={"MAUCTL_OPTIM__LR": "0.2"}, sets=["optim.lr=0.4"]).optim.lr == 0.4


def test_set_overrides_the_specific_flag():
    resolved = load_config("pretrain", flags={"optim.lr": 0.3}, sets=["optim.lr=0.4"], environ={})
    assert resolved.config.optim.lr == 0.4
    assert resolved.origin["optim.lr"] == "--set optim.lr=0.4"


def test_a_later_set_wins_over_an_earlier_one():
    assert load(sets=["optim.lr=0.1", "optim.lr=0.2"]).optim.lr == 0.2
    assert load(sets=["optim.lr=0.2", "optim.lr=0.1"]).optim.lr == 0.1


def test_set_overrides_the_loss_column():
    c = load(loss="align2-unif2", sets=["loss.unif_t=5"])
    assert c.loss.unif_t == 5.0
    assert c.loss.align_w == 2.0  # the rest of the column stays


def test_loss_column_overrides_env_and_config_file(tmp_path):
    config = write(tmp_path / "mine.toml", "[loss]\nunif_t = 9.0\n")
    c = load(config_file=config, loss="align4-unif4", environ={"MAUCTL_LOSS__ALIGN_W": "7"})
    assert (c.loss.align_w, c.loss.unif_t) == (4.0, 4.0)


def test_env_names_are_case_insensitive_and_lists_are_json():
    c = load(environ={"mauctl_optim__lr": "0.5", "MAUCTL_OPTIM__SCHEDULE": "[30, 40]"})
    assert c.optim.lr == 0.5
    assert c.optim.schedule == [30, 40]


def test_mauctl_variables_without_a_section_are_not_config():
    assert load(environ={"MAUCTL_DEBUG": "1", "MAUCTL_CACHE": "/tmp/x"}) == load()


# ---------------------------------------------------------------- unknown keys


def test_unknown_section_in_config_file_names_it_and_suggests_the_closest(tmp_path):
    config = write(tmp_path / "mine.toml", "[optimm]\nlr = 0.1\n")
    message = usage_error(config_file=config)
    assert str(config) in message
    assert "unknown section 'optimm'" in message and "did you mean 'optim'?" in message


def test_unknown_key_in_config_file_names_it_and_suggests_the_closest(tmp_path):
    config = write(tmp_path / "mine.toml", "[optim]\nlrr = 0.1\n[model]\nqueue_sise = 4096\n")
    message = usage_error(config_file=config)
    assert "unknown key 'optim.lrr' (did you mean 'optim.lr'?)" in message
    assert "unknown key 'model.queue_sise' (did you mean 'model.queue_size'?)" in message


def test_bare_top_level_key_suggests_the_section_it_belongs_to(tmp_path):
    config = write(tmp_path / "mine.toml", "lr = 0.1\n")
    assert "optim.lr" in usage_error(config_file=config)


def test_unknown_key_in_preset_table_suggests_the_closest(tmp_path):
    config = write(tmp_path / "mine.toml", '[preset]\ndescripton = "x"\n')
    assert "'preset.descripton' (did you mean 'description'?)" in usage_error(config_file=config)


def test_unknown_key_in_set_suggests_the_closest():
    message = usage_error(sets=["optim.lrr=0.1"])
    assert "--set optim.lrr=0.1" in message
    assert "unknown key 'optim.lrr' (did you mean 'optim.lr'?)" in message


def test_unknown_section_in_set_suggests_the_closest():
    assert "unknown section 'optimm' (did you mean 'optim'?)" in usage_error(sets=["optimm.lr=0.1"])


def test_unknown_key_in_env_names_the_variable_and_suggests_the_closest():
    message = usage_error(environ={"MAUCTL_OPTIM__LRR": "0.1"})
    assert "MAUCTL_OPTIM__LRR" in message
    assert "unknown key 'optim.lrr' (did you mean 'optim.lr'?)" in message


def test_unknown_section_in_env_suggests_the_closest():
    message = usage_error(environ={"MAUCTL_OPTIMM__LR": "0.1"})
    assert "MAUCTL_OPTIMM__LR" in message and "unknown section 'optimm' (did you mean 'optim'?)" in message


# ---------------------------------------------------------------- wrong types and values


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"flags": {"optim.lr": -0.5}}, ["optim.lr = -0.5", "command-line flags", "greater than 0"]),
        ({"sets": ["optim.lr=0"]}, ["optim.lr = 0", "--set optim.lr=0", "greater than 0"]),
        ({"sets": ["optim.epochs=0"]}, ["optim.epochs = 0", "greater than or equal to 1"]),
        ({"sets": ["model.queue_size=1000"]},
         ["model.queue_size 1000", "must be a multiple of the global batch", "optim.batch_size 256"]),
        ({"loss": "contr-t0.07", "sets": ["loss.contr_w=0"]},
         ["contr_w, align_w and unif_w are all 0", "at least one loss weight must be positive"]),
        ({"flags": {"model.arch": "resnet5"}},
         ["model.arch = 'resnet5'", "not a torchvision classification model", "did you mean 'resnet50'?"]),
        ({"sets": ["optim.epochs=ten"]}, ["optim.epochs = 'ten'", "valid integer"]),
        ({"sets": ["optim.lr=abc"]}, ["optim.lr = 'abc'", "valid number"]),
        ({"sets": ["optim.schedule=[160,120]"]}, ["optim.schedule = [160, 120]", "strictly increasing"]),
        ({"sets": ["optim.schedule=[120,120]"]}, ["optim.schedule = [120, 120]", "strictly increasing"]),
        ({"flags": {"launch.nnodes": 2, "launch.node_rank": 2, "launch.rdzv_endpoint": "head:29500"}},
         ["node_rank 2 must be below nnodes 2"]),
        ({"flags": {"launch.nnodes": 2}}, ["rdzv_endpoint (host:port) is required when nnodes > 1"]),
        ({"flags": {"launch.nnodes": 2, "launch.rdzv_endpoint": "head"}}, ["'head' is not host:port"]),
        ({"flags": {"run.device": "gpu"}}, ["run.device = 'gpu'", "expected auto, cpu, cuda or cuda:N"]),
        ({"sets": ["data.aug=v3"]}, ["data.aug = 'v3'", "'v1' or 'v2'"]),
        ({"sets": ["model.key_momentum=1.0"]}, ["model.key_momentum = 1.0", "less than 1"]),
        ({"environ": {"MAUCTL_OPTIM__BATCH_SIZE": "abc"}},
         ["optim.batch_size = 'abc'", "MAUCTL_OPTIM__BATCH_SIZE", "valid integer"]),
    ],
    ids=["negative-lr", "zero-lr", "zero-epochs", "queue-not-multiple", "all-weights-zero", "unknown-arch",
         "string-for-int", "string-for-float", "decreasing-schedule", "repeated-milestone", "node-rank",
         "nnodes-without-rdzv", "bad-rdzv", "bad-device", "bad-aug", "key-momentum-1", "env-string-for-int"],
)
def test_invalid_value_names_key_value_and_rule(kwargs, expected):
    message = usage_error(**kwargs)
    for fragment in expected:
        assert fragment in message


def test_valid_devices_are_accepted():
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        assert load(flags={"run.device": device}).run.device == device


def test_boolean_for_batch_size_is_an_error():
    usage_error(sets=["optim.batch_size=true"])


def test_unknown_preset_suggests_the_closest():
    message = usage_error(preset="v2-b265")
    assert "unknown preset 'v2-b265' (did you mean 'v2-b256'?)" in message


def test_unknown_loss_suggests_the_closest_and_lists_the_columns():
    message = usage_error(loss="align3-unif5")
    assert "unknown loss 'align3-unif5' (did you mean 'align3-unif3'?)" in message
    assert all(name in message for name in LOSSES)


def test_lincls_preset_is_refused_by_pretrain_and_vice_versa():
    assert "preset 'lincls' is a lincls preset, not a pretrain one" in usage_error(preset="lincls")
    with pytest.raises(UsageError, match="preset 'v1-b128' is a pretrain preset, not a lincls one"):
        load_config("lincls", preset="v1-b128", environ={})
    with pytest.raises(UsageError, match="--loss only applies to pretraining"):
        load_config("lincls", loss="align3-unif3", environ={})


@pytest.mark.parametrize("assignment", ["optim.lr", "optim=0.1", "optim.lr.x=1", "=0.1", ".lr=1"])
def test_set_needs_section_dot_key_equals_value(assignment):
    with pytest.raises(UsageError, match="expected section.key=value"):
        parse_set(assignment)


@pytest.mark.parametrize(
    "assignment, value",
    [
        ("optim.lr=0.06", 0.06),
        ("optim.schedule=[30, 40]", [30, 40]),
        ("model.mlp=true", True),
        (" optim.epochs = 5 ", 5),
        ("data.root=my images/x", "my images/x"),
        ('data.root="123"', "123"),
        ("data.root=/a=b", "/a=b"),
        ("data.root=C:\\data\\new", "C:\\data\\new"),
    ],
)
def test_set_reads_the_value_as_toml_else_as_a_string(assignment, value):
    layer = parse_set(assignment)
    section, key = assignment.split("=")[0].strip().split(".")
    assert layer.values == {section: {key: value}}


@pytest.mark.parametrize("value", ["[30,", "30,40"])
def test_malformed_env_list_is_a_usage_error(value):
    message = usage_error(environ={"MAUCTL_OPTIM__SCHEDULE": value})
    assert "MAUCTL_OPTIM__SCHEDULE" in message


def test_toml_syntax_error_names_file_and_line(tmp_path):
    config = write(tmp_path / "bad.toml", "[optim]\nlr = 0.1\nbatch_size = \n")
    message = usage_error(config_file=config)
    assert f"{config}:3" in message and "TOML syntax error" in message


def test_missing_config_file_is_a_usage_error(tmp_path):
    assert "no such file" in usage_error(config_file=tmp_path / "nope.toml")


# ---------------------------------------------------------------- the resolved TOML round trip


def round_trip(config: PretrainConfig, tmp_path: Path) -> PretrainConfig:
    path = write(tmp_path / "resolved.toml", to_toml(config, header="resolved by a test\nsecond line"))
    return load(config_file=path)


@pytest.mark.parametrize("preset", PRETRAIN_PRESETS)
@pytest.mark.parametrize("loss", ["contr-t0.07", "align4-unif4"])
def test_resolved_toml_reads_back_to_the_identical_config(preset, loss, tmp_path):
    config = load(preset=preset, loss=loss)
    back = round_trip(config, tmp_path)
    assert back == config
    assert tomllib.loads(to_toml(back)) == tomllib.loads(to_toml(config)) == config.model_dump()


TRICKY = ["my images", 'say "cheese"', "it's", "back\\slash", "C:\\new\\table", "dätä ✓ 日本", "tab\tx",
          "two\nlines", "#not a comment", "a = b", '"""', "'''", "${HOME}", "\u2028"]


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_strings_survive_the_round_trip(text, tmp_path):
    config = load(preset="v2-b128", flags={"data.root": text, "run.out": text + "/out"},
                  sets=["optim.schedule=[30,40]", "loss.unif_t=2.5"])
    back = round_trip(config, tmp_path)
    assert back == config
    assert (back.data.root, back.run.out, back.optim.schedule) == (text, text + "/out", [30, 40])


def test_delete_character_survives_the_round_trip(tmp_path):
    config = load(flags={"data.root": "odd\x7fname"})
    assert round_trip(config, tmp_path) == config


def test_extreme_numbers_survive_the_round_trip(tmp_path):
    config = load(flags={"optim.lr": 1e-20}, sets=["optim.weight_decay=5e-324", "loss.unif_t=0.1",
                                                   "model.queue_size=1099511627776"])
    assert round_trip(config, tmp_path) == config


def test_header_lines_are_toml_comments():
    text = to_toml(PretrainConfig(), header="line one\nline two")
    assert text.splitlines()[:2] == ["# line one", "# line two"]
    assert tomllib.loads(text) == PretrainConfig().model_dump()


def test_read_toml_returns_the_tables(tmp_path):
    path = write(tmp_path / "x.toml", "[optim]\nschedule = [1, 2]\n")
    assert read_toml(path) == {"optim": {"schedule": [1, 2]}}


# ---------------------------------------------------------------- run directory and loss name


def test_run_directory_is_named_after_preset_loss_and_seed():
    assert load(preset="v1-b128").run.out == "runs/v1-b128_align3-unif3"
    assert load(preset="v2-b256", loss="contr-t0.2", flags={"run.seed": 3}).run.out == \
        "runs/v2-b256_contr-t0.2_seed3"
    assert load(sets=["loss.unif_t=2.5"]).run.out == "runs/custom_custom-loss"
    assert load(preset="v1-b128", flags={"run.out": "elsewhere"}).run.out == "elsewhere"


@pytest.mark.parametrize("column", LOSSES)
def test_loss_name_recognises_each_column(column):
    assert loss_name(load(loss=column).loss) == column


def test_default_loss_is_align3_unif3():
    assert loss_name(LossConfig()) == "align3-unif3"


def test_loss_name_is_none_for_a_custom_loss():
    assert loss_name(LossConfig(unif_t=2.5)) is None
    assert loss_name(LossConfig(align_w=3.5)) is None
    assert loss_name(LossConfig(contr_w=1.0)) is None


def test_loss_name_is_none_for_queue_only_uniformity():
    assert loss_name(LossConfig(intra_batch=False)) is None


def test_loss_name_ignores_parameters_of_zero_weight_terms():
    contrastive = load(loss="contr-t0.2", sets=["loss.unif_t=5", "loss.intra_batch=false"]).loss
    assert loss_name(contrastive) == "contr-t0.2"


def test_every_published_preset_and_loss_takes_uniformity_per_bn_group_as_the_original_per_gpu():
    for preset in PRETRAIN_PRESETS:
        for loss in LOSSES:
            expected = "global" if preset == "demo" else "bn"  # the CPU demo is no table row (presets/demo.toml)
            assert load(preset=preset, loss=loss).loss.unif_groups == expected, (preset, loss)


def test_uniformity_over_the_global_batch_is_no_published_loss_and_has_its_own_digest():
    per_group = load(preset="v2-b256", loss="align3-unif3")
    global_form = load(preset="v2-b256", loss="align3-unif3", sets=["loss.unif_groups='global'"])
    assert loss_name(global_form.loss) is None
    assert config_digest(global_form) != config_digest(per_group)
    # a contrastive loss takes no uniformity: how it would be taken does not matter
    assert loss_name(load(loss="contr-t0.2", sets=["loss.unif_groups='global'"]).loss) == "contr-t0.2"


def test_a_config_saved_without_unif_groups_reads_as_the_global_form_it_computed(tmp_path):
    """A run of a mauctl from before the key: one log-mean-exp over the global batch."""
    config = load(preset="v2-b256", loss="align3-unif3")
    text = to_toml(config)
    assert 'unif_groups = "bn"' in text
    old = read_toml(write(tmp_path / "config.toml", text.replace('unif_groups = "bn"\n', "")))
    assert "unif_groups" not in old["loss"]
    read = saved_config(old)
    assert PretrainConfig.model_validate(read).loss.unif_groups == "global"
    # its digest is the one it had, which is the explicit global form's and not the per-group one's
    global_form = load(preset="v2-b256", loss="align3-unif3", sets=["loss.unif_groups='global'"])
    assert config_digest(old) == config_digest(read) == config_digest(global_form) != config_digest(config)
    assert saved_config({"lincls": {"epochs": 100}}) == {"lincls": {"epochs": 100}}  # no [loss]: nothing to add


# ---------------------------------------------------------------- learning-rate schedule


@pytest.mark.parametrize(
    "epoch, lr",
    [(0, 0.03), (119, 0.03), (120, 0.003), (159, 0.003), (160, 0.0003), (199, 0.0003)],
)
def test_step_schedule_divides_by_ten_from_each_milestone(epoch, lr):
    assert lr_at(OptimConfig(lr=0.03, schedule=[120, 160], cos=False), epoch) == pytest.approx(lr, rel=1e-12)


@pytest.mark.parametrize("epoch, factor",
                         [(0, 1.0), (50, 0.5 * (1 + math.sqrt(0.5))), (100, 0.5), (200, 0.0)])
def test_cosine_schedule_halves_at_mid_training(epoch, factor):
    optim = OptimConfig(lr=0.06, epochs=200, cos=True)
    assert lr_at(optim, epoch) == pytest.approx(0.06 * factor, rel=1e-12, abs=1e-15)


def test_schedule_description():
    assert describe_schedule(OptimConfig()) == "0.03, x0.1 from epoch 120, 160, 200 epochs"
    assert describe_schedule(OptimConfig(cos=True)) == "cosine from 0.03 to 0 over 200 epochs (per epoch)"
