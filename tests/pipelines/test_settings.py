"""The settings boundary: one table of constraints, one message shape, no coercion."""
from __future__ import annotations

from dataclasses import fields

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transferkit.errors import ConfigError
from transferkit.pipelines.settings import CONSTRAINTS, FitConfig


def test_yaml_strings_are_not_coerced_and_the_message_names_key_value_type_and_expectation(tmp_path):
    path = tmp_path / "c.yaml"
    for text, message in [
        ('fit: {epochs: "ten"}', f'config {path} fit.epochs: "ten" is a string; expected an integer >= 1'),
        ('fit: {image_size: "32"}', f'config {path} fit.image_size: "32" is a string; expected an integer in'
                                    " [16, 2048] (or null for the default)"),
        ("fit: {batch_size: 4.5}", f"config {path} fit.batch_size: 4.5 is a number; expected an integer >= 1"),
        ('fit: {pretrained: "false"}', f'config {path} fit.pretrained: "false" is a string; expected true or false'),
        ('fit: {aug: "erasing.p=0.5"}', f'config {path} fit.aug: "erasing.p=0.5" is a string; expected a list of'
                                        " strings"),
        ("fit: 5", f"config file {path}: `fit:` holds an integer, not a mapping of settings"),
        ("[1, 2]", f"config file {path} is not a mapping of settings (it holds a list)"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError) as err:
            FitConfig.load(path)
        assert str(err.value).startswith(message), str(err.value)


def test_flags_and_the_api_name_the_setting_their_own_way():
    with pytest.raises(ConfigError, match=r"^--epochs: 0 is out of range; expected an integer >= 1$"):
        FitConfig.build({"epochs": 0}, source="cli")
    with pytest.raises(ConfigError, match=r"^epochs=: True is a boolean; expected an integer >= 1$"):
        FitConfig.build({"epochs": True}, source="api")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\): --epoch;"):
        FitConfig.build({"epoch": 3}, source="cli")
    with pytest.raises(ConfigError, match="--finetune: \"most\" is not a choice; expected one of auto, freeze"):
        FitConfig.build({"finetune": "most"}, source="cli")


def test_settings_that_contradict_each_other_are_one_line_errors():
    cases = [({"epochs": 3, "snapshots": 5}, r"--snapshots 5 needs .* --epochs 5 or more"),
             ({"ema": True, "ema_decay": 1.5}, r"--ema-decay: 1.5 is out of range; expected a number in \(0, 1\)"),
             ({"epochs": 6, "snapshots": 3, "schedule": "step"}, "drop --schedule step"),
             ({"pretrained": False, "weights": "w.pth"}, "contradict each other"),
             ({"augment": "none", "aug": ["noise=off"]}, "overrides need an --augment preset"),
             ({"mixup": 0.2, "epochs": 4, "mixup_off_epoch": 4}, "--mixup-off-epoch 4 must be 0"),
             ({"finetune": "lp-ft", "snapshots": 2, "epochs": 4}, "cannot be combined")]
    for values, message in cases:
        with pytest.raises(ConfigError, match=message):
            FitConfig.build(values, source="cli")
    FitConfig.build({"epochs": 6, "snapshots": 3, "ema": True, "swa": True}, source="cli")


def test_old_mixing_names_still_work_and_mean_what_they_meant(caplog):
    cfg = FitConfig.build({"epochs": 10, "mix_prob": 0.5, "mix_mode": "elem", "mix_off_epoch": 2, "mixup": 0.2})
    assert (cfg.mixup_prob, cfg.mixup_mode) == (0.5, "elem")
    assert cfg.mixup_off_epoch == 8  # "off for the last 2 of 10 epochs" is "off from epoch 8"
    assert "mix_prob= is deprecated" in caplog.text
    with pytest.raises(ConfigError, match="are the same setting"):
        FitConfig.build({"mix_prob": 0.5, "mixup_prob": 0.4})


def test_a_valid_config_round_trips_through_yaml(tmp_path):
    cfg = FitConfig.build({"data": "/d", "epochs": 3, "aug": ["noise=off"], "lr": 1e-3}, source="api")
    cfg.save(tmp_path / "config.yaml")
    assert FitConfig.load(tmp_path / "config.yaml") == cfg
    with pytest.raises(Exception):
        cfg.epochs = 4  # frozen: nothing mutates a checked config


_ANY = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                 st.text(max_size=8), st.lists(st.text(max_size=4), max_size=3),
                 st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(CONSTRAINTS) + ["mix_prob", "mix_off_epoch"]), _ANY, max_size=6))
def test_any_mapping_of_known_keys_validates_or_fails_with_config_error(values):
    try:
        cfg = FitConfig.build(values, source="api")
    except ConfigError:
        return
    for f in fields(FitConfig):
        CONSTRAINTS[f.name].check(getattr(cfg, f.name), f.name)  # what passed is what the table allows


def test_a_key_given_twice_and_an_empty_file_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("fit:\n  epochs: 2\n  epochs: 3\n")  # PyYAML alone would keep 3 without a word
    with pytest.raises(ConfigError, match=r"gives 'epochs' \(line 3\) twice; keep one of them"):
        FitConfig.load(path)
    path.write_text("")
    with pytest.raises(ConfigError, match="is empty; pass the config.yaml of a run"):
        FitConfig.load(path)


@pytest.mark.parametrize("extra, message", [
    ({"finetune": "full"}, "head_solver= lbfgs solves the head of a frozen backbone: it applies to finetune= freeze,"
                           " lp-ft and auto, not full; drop it"),
    ({"mixup": 0.2}, "head_solver= lbfgs fits cached features and Mixup/CutMix mix images; use head_solver= sgd"
                     " to mix"),
    ({"ema": True, "snapshots": 2}, "ema=, snapshots= average(s) weights over training steps and head_solver= lbfgs"
                                    " takes none; use head_solver= sgd"),
    ({"cache_views": 0}, "head_solver= lbfgs needs the feature cache; drop cache_views= 0"),
    ({"sampler": "balanced"}, "head_solver= lbfgs sees every image once, so sampler= balanced draws nothing; weigh"
                              " the classes with class_weights= balanced, or use head_solver= sgd"),
])
def test_a_solved_head_is_refused_where_it_cannot_be_solved(extra, message):
    with pytest.raises(ConfigError) as err:
        FitConfig.build({"data": "d", "head_solver": "lbfgs", "finetune": "freeze", **extra})
    assert str(err.value) == message


def test_the_head_is_solved_by_default_unless_something_needs_steps():
    assert FitConfig.build({"data": "d"}).solved_head
    assert not FitConfig.build({"data": "d", "ema": True}).solved_head
    assert not FitConfig.build({"data": "d", "head_solver": "sgd"}).solved_head
    assert not FitConfig.build({"data": "d", "cutmix": 1.0}).solved_head
    assert not FitConfig.build({"data": "d", "sampler": "balanced"}).solved_head
    assert FitConfig.build({"data": "d", "class_weights": "balanced"}).solved_head


def test_step_settings_need_the_step_schedule():
    with pytest.raises(ConfigError, match="--step-epochs and --step-gamma shape --schedule step; add it, or drop them"
                                          " for cosine"):
        FitConfig.build({"data": "d", "step_epochs": 3}, source="cli")
    cfg = FitConfig.build({"data": "d", "schedule": "step", "step_epochs": 3, "step_gamma": 0.5})
    assert (cfg.step_epochs, cfg.step_gamma) == (3, 0.5)


def test_gradual_unfreezing_refuses_what_would_reshape_its_stages():
    with pytest.raises(ConfigError, match=r"--finetune gradual restarts a warmed-up cosine at every stage; drop --swa,"
                                          r" --snapshots$"):
        FitConfig.build({"data": "d", "finetune": "gradual", "swa": True, "snapshots": 2, "epochs": 4}, source="cli")
    with pytest.raises(ConfigError, match=r"drop --schedule step$"):
        FitConfig.build({"data": "d", "finetune": "gradual", "schedule": "step"}, source="cli")
    with pytest.raises(ConfigError, match="head_solver= lbfgs solves the head of a frozen backbone"):
        FitConfig.build({"data": "d", "finetune": "gradual", "head_solver": "lbfgs"})
    assert FitConfig.build({"data": "d", "finetune": "gradual", "unfreeze_every": 3}).unfreeze_every == 3
