"""Typed configs: defaults, profiles, overrides, errors and the round trip through YAML."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from utils.config import config_hash, from_dict, load_config, parse_set, run_dir, to_yaml
from utils.errors import ConfigError
from utils.stage_configs import STAGE_CONFIGS, Stage1Config, Stage2Config, Stage3Config, Stage5Config, Stage6Config


def test_paper_defaults_are_the_papers_values():
    s1, s2 = load_config(Stage1Config, "paper"), load_config(Stage2Config, "paper")
    assert (s1.train.batch_size, s1.train.num_epochs, s1.train.max_lr, s1.train.mixup_pct) == (120, 30, 5e-5, 1.0)
    assert (s1.train.temp_image, s1.train.temp_text, s1.train.text_weight) == (0.006, 0.1, 0.25)
    assert (s2.train.batch_size, s2.train.num_epochs, s2.loss_weights.prior) == (10, 50, 30.0)
    assert s2.progressive.starts == {"dice": 0, "concepts": 10, "caption": 20, "latent": 30}
    s3, s5 = load_config(Stage3Config, "paper"), load_config(Stage5Config, "paper")
    assert (s3.sample.unclip_steps, s3.sample.unclip_guidance, s3.sample.batch_size) == (38, 5.0, 20)
    assert (s5.video.steps, s5.video.guidance, s5.video.num_frames) == (25, 8.5, 16)
    assert load_config(Stage6Config, "paper").eval.protocol == "standard"


@pytest.mark.parametrize("profile", ["paper", "toy", "smoke"])
@pytest.mark.parametrize("stage", list(STAGE_CONFIGS))
def test_every_profile_builds_every_stage(profile, stage):
    cfg = load_config(STAGE_CONFIGS[stage], profile)
    assert cfg.run.profile == profile
    assert cfg.model.size == profile


def test_smoke_extends_toy():
    toy, smoke = load_config(Stage2Config, "toy"), load_config(Stage2Config, "smoke")
    assert smoke.train.max_lr == toy.train.max_lr  # inherited
    assert smoke.train.batch_size != toy.train.batch_size  # overridden
    assert smoke.paths.data_root.endswith("toy_cortex_smoke")


def test_overrides_are_typed_and_applied_in_order():
    cfg = load_config(
        Stage1Config, "toy", ["train.batch_size=8", "train.max_lr=1e-3", "train.batch_size=4", "run.use_wandb=true"]
    )
    assert cfg.train.batch_size == 4 and cfg.train.max_lr == 1e-3 and cfg.run.use_wandb is True
    assert isinstance(load_config(Stage1Config, "toy", ["train.max_lr=1"]).train.max_lr, float)  # int widens to float
    cfg = load_config(Stage2Config, "paper", ["progressive.starts.dice=3"])
    assert cfg.progressive.starts == {"dice": 3, "concepts": 10, "caption": 20, "latent": 30}


def test_cli_arguments_fill_the_run_section():
    cfg = load_config(Stage3Config, "toy", cli={"subj": 2, "exp": "abc", "mode": "motion"})
    assert (cfg.run.subj, cfg.run.exp, cfg.run.mode) == (2, "abc", "motion")
    assert run_dir(cfg).parts[-2:] == ("exp_abc", "subj_2")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.batchsize=3", "did you mean 'train.batch_size'"),
        ("trian.batch_size=3", "did you mean 'train'"),
        ("progressive.starts.dcie=3", "did you mean 'progressive.starts.dice'"),
        ("train.batch_size=abc", "expected int"),
        ("train.max_lr=fast", "expected float"),
        ("run.use_wandb=3", "expected bool"),
        ("run.mode=slow", "use one of 'enhance', 'motion'"),
        ("run.subj=4", "expected 1 | 2 | 3, or a list of 1 | 2 | 3"),
        ("run.subj=[1,1]", "names a subject twice"),
        ("train=3", "must be a mapping"),
        ("batch_size", "write overrides as --set section.key=value"),
    ],
)
def test_bad_overrides_give_one_line_errors(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(Stage2Config, "paper", [override])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    assert info.value.exit_code == 2


def test_unknown_profile_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown profile 'papr'.*paper, paper_upstream, toy, smoke, smoke_upstream"):
        load_config(Stage1Config, "papr")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  seed: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad YAML in .*bad.yaml at line \d+"):
        load_config(Stage1Config, str(bad))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("extends: smoke\ntrain:\n  batch_size: 3\n")
    with pytest.raises(ConfigError, match="stage-specific.*stage1"):
        load_config(Stage1Config, str(wrong))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("extends: smoke\npahts:\n  data_root: x\n")
    with pytest.raises(ConfigError, match="unknown section 'pahts'.*did you mean 'paths'"):
        load_config(Stage1Config, str(unknown))


def test_profile_file_extends_a_builtin(tmp_path):
    prof = tmp_path / "mine.yaml"
    prof.write_text("extends: smoke\nstage1:\n  train:\n    num_epochs: 7\npaths:\n  exp_root: somewhere\n")
    cfg = load_config(Stage1Config, str(prof))
    assert cfg.train.num_epochs == 7 and cfg.train.batch_size == load_config(Stage1Config, "smoke").train.batch_size
    assert cfg.paths.exp_root == "somewhere"
    assert load_config(Stage2Config, str(prof)).train.num_epochs == load_config(Stage2Config, "smoke").train.num_epochs


@pytest.mark.parametrize("stage", list(STAGE_CONFIGS))
def test_yaml_round_trip_and_hash(stage):
    cfg = load_config(STAGE_CONFIGS[stage], "smoke", ["run.seed=7"])
    back = from_dict(type(cfg), yaml.safe_load(to_yaml(cfg)))
    assert back == cfg
    assert config_hash(back) == config_hash(cfg)
    assert config_hash(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=8))) != config_hash(cfg)


def test_configs_are_frozen():
    cfg = load_config(Stage1Config, "paper")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.batch_size = 3  # type: ignore[misc]


def test_parse_set_nests_keys():
    assert parse_set(["a.b.c=1"]) == [("--set a.b.c=1", {"a": {"b": {"c": 1}}})]


def test_stage_prefixed_overrides_reach_only_their_stage():
    sets = ["stage1.train.num_epochs=3", "stage3.sample.batch_size=5", "run.seed=9"]
    s1, s2, s3 = (load_config(STAGE_CONFIGS[k], "smoke", sets) for k in ("1", "2", "3"))
    assert s1.train.num_epochs == 3 and s2.train.num_epochs == load_config(Stage2Config, "smoke").train.num_epochs
    assert s3.sample.batch_size == 5 and s1.run.seed == s2.run.seed == s3.run.seed == 9
    with pytest.raises(ConfigError, match="unknown config key 'train.num_epoch'"):
        load_config(Stage1Config, "smoke", ["stage1.train.num_epoch=3"])


def test_profile_diff_lists_the_differing_keys_of_every_stage(tmp_path, capsys):
    """``train_neurons.py --profile smoke --diff OTHER`` prints each stage's differing resolved keys and exits 0."""
    import train_neurons
    from utils.cli import run_stage

    other = tmp_path / "smoke_up.yaml"
    other.write_text(
        "extends: smoke\nstage2:\n  upstream: {text_attention_null_kv: false, prior_condition: backbone}\n"
        "stage3:\n  sample: {unclip_uncond: random_noise}\n  upstream: {text_attention_null_kv: false}\n"
    )
    assert run_stage(Stage1Config, train_neurons.main, argv=["--profile", "smoke", "--diff", str(other)]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert sorted(lines) == sorted([
        "stage2 upstream.prior_condition: 'clip_proj' -> 'backbone'",
        "stage2 upstream.text_attention_null_kv: True -> False",
        "stage3 sample.unclip_uncond: 'null' -> 'random_noise'",
        "stage3 upstream.text_attention_null_kv: True -> False",
    ])


def test_set_takes_several_values_per_flag_and_repeats(capsys):
    """``--set a=1 b=2 --set c=3`` gives three overrides, in order, on every parser that has ``--set``."""
    import argparse

    import download_dataset
    import train_neurons
    from tasks_construction import gen_GT_clip_embeds
    from utils.cli import add_data_root_args, run_stage, stage_parser

    argv = ["--set", "train.batch_size=3", "train.num_epochs=2", "--set", "train.batch_size=5", "--profile", "smoke"]
    expected = ["train.batch_size=3", "train.num_epochs=2", "train.batch_size=5"]
    data_root_parser = argparse.ArgumentParser()
    add_data_root_args(data_root_parser)
    for parser in (stage_parser("1", None), gen_GT_clip_embeds.build_parser(), data_root_parser):
        assert parser.parse_args(argv).overrides == expected
    assert download_dataset.parse_args(argv).overrides == expected
    assert run_stage(Stage1Config, train_neurons.main, argv=[*argv, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["train"]["batch_size"], printed["train"]["num_epochs"]) == (5, 2)


def test_a_stage_log_file_ends_with_the_error_line_it_printed(tmp_path, capsys):
    """The one-line ``error:`` of a failed stage goes to stderr and into the stage's own log file."""
    import logging

    from utils.cli import run_stage
    from utils.errors import DataError

    def fails(cfg: Stage1Config) -> None:
        logging.getLogger("test").info("stage body started")
        raise DataError("missing frames.pt", "download it")

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    argv = ["--profile", "smoke", "--subj", "1", "--exp", "logged", "--set", f"paths.exp_root={tmp_path}"]
    try:
        assert run_stage(Stage1Config, fails, argv=argv) == 1
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level
    line = "error: DataError: missing frames.pt; fix: download it"
    assert capsys.readouterr().err.strip() == line
    (log_file,) = (tmp_path / "exp_logged" / "subj_1" / "logs").glob("stage1_*.log")
    text = log_file.read_text().splitlines()
    assert "stage body started" in text[-2] and text[-1].endswith(line)
