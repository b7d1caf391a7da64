import dataclasses
import json

import pytest

from polysense.config import ConfigError, RunConfig, apply_overrides, dumps, from_dict, to_dict
from polysense.presets import available_presets, get_preset


def test_presets_registry_has_tiny_and_small_clip():
    names = available_presets()
    assert {"clip-tiny", "clip-small", "siglip-tiny", "lit-minilm"} <= set(names)
    for name in names:
        cfg = get_preset(name)
        assert cfg.name == name
        assert dataclasses.is_dataclass(cfg) and cfg.__dataclass_params__.frozen


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match="clip-tiny"):
        get_preset("clip-huge")


def test_overrides_are_typed_and_leave_original_untouched():
    base = get_preset("clip-tiny")
    cfg = apply_overrides(
        base,
        [
            "train.lr=3e-4",
            "train.steps=7",
            "train.lock_text=false",
            "model.vision.pool=map",
            "train.betas=0.9,0.95",
            "model.init_logit_bias=none",
        ],
    )
    assert cfg.train.lr == 3e-4 and cfg.train.steps == 7 and cfg.train.lock_text is False
    assert cfg.model.vision.pool == "map" and cfg.train.betas == (0.9, 0.95)
    assert cfg.model.init_logit_bias is None
    assert base.train.lr != 3e-4 and base.model.vision.pool == "cls_mean"
    assert base.train.lock_text is True


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "unknown config key 'train.lrr'.*train.lr"),
        ("bogus=1", "unknown config key 'bogus'"),
        ("train.steps=abc", "expected an integer"),
        ("model.vision.pool=max", r"expected one of \['cls', 'map', 'mean', 'cls_mean'\]"),
        ("train.lock_text=maybe", "expected true or false"),
        ("model.vision=3", "is a group"),
        ("train.lr", "key=value"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(get_preset("clip-tiny"), [override])


def test_json_round_trip():
    cfg = apply_overrides(get_preset("siglip-tiny"), ["train.betas=0.8,0.9"])
    again = from_dict(RunConfig, json.loads(dumps(cfg)))
    assert again == cfg
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(RunConfig, {**to_dict(cfg), "extra": 1})
