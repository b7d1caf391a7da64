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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batch_size=0", r"train\.batch_size=0: must be > 0; .* train\.batch_size=256"),
        ("train.steps=-5", r"train\.steps=-5: must be > 0"),
        ("train.steps=0", r"train\.steps=0: must be > 0"),
        ("train.lr=0", r"train\.lr=0: must be > 0"),
        ("train.lr=nan", r"train\.lr=nan: must be > 0"),
        ("train.grad_accum=0", r"train\.grad_accum=0: must be > 0"),
        ("train.log_every=0", r"train\.log_every=0: must be > 0"),
        ("train.warmup_steps=-1", r"train\.warmup_steps=-1: must be >= 0"),
        ("train.weight_decay=-0.1", r"train\.weight_decay=-0.1: must be >= 0"),
        ("train.min_lr_ratio=1.5", r"train\.min_lr_ratio=1\.5: must be in \[0, 1\]"),
        ("train.betas=0.9,1.0", r"train\.betas=0\.9,1\.0: must be in \[0, 1\)"),
        ("train.unlock_text_at=-2", r"train\.unlock_text_at=-2: must be >= -1"),
        ("data.limit=-1", r"data\.limit=-1: must be >= 0"),
        ("data.num_workers=-2", r"data\.num_workers=-2: must be >= 0"),
        ("model.embed_dim=0", r"model\.embed_dim=0: must be > 0"),
        ("model.vision.patch_size=0", r"model\.vision\.patch_size=0: must be > 0"),
        ("model.vision.dropout=1", r"model\.vision\.dropout=1: must be in \[0, 1\)"),
        ("model.text.heads=0", r"model\.text\.heads=0: must be > 0"),
        ("model.text.context_length=-3", r"model\.text\.context_length=-3: must be > 0"),
        ("model.audio.n_mels=0", r"model\.audio\.n_mels=0: must be > 0"),
        ("model.video.num_frames=0", r"model\.video\.num_frames=0: must be > 0"),
        ("model.audio.norm_mean=inf", r"model\.audio\.norm_mean=inf: must be a finite number"),
    ],
)
def test_out_of_range_values_fail_when_applied(override, message):
    """Each value is refused by `apply_overrides` itself, naming the full key, the allowed range
    and a valid value; none reaches the trainer (batch_size=0 divided by zero there, steps=-5
    'trained' and exited 0)."""
    with pytest.raises(ConfigError, match=message):
        apply_overrides(get_preset("clip-tiny"), [override])


def test_range_edges_that_mean_something_are_accepted():
    cfg = apply_overrides(
        get_preset("clip-tiny"),
        [
            "model.text.layers=0",  # clip-tiny's bag of word embeddings
            "train.ckpt_every=0",  # only at the end
            "train.eval_every=0",
            "train.unlock_text_at=-1",  # never
            "train.min_lr_ratio=1",
            "train.warmup_steps=0",
            "train.grad_clip=0",  # no clipping
            "model.vision.dropout=0.5",
            "model.init_logit_bias=-10",
        ],
    )
    assert cfg.model.text.layers == 0 and cfg.train.min_lr_ratio == 1.0


def test_a_config_built_directly_is_checked_too():
    from polysense.config import TrainConfig

    with pytest.raises(ConfigError, match=r"TrainConfig\.batch_size=0: must be > 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"TrainConfig\.batch_size=-1: must be > 0"):
        from_dict(RunConfig, {**to_dict(get_preset("clip-tiny")), "train": {"batch_size": -1}})


def test_every_preset_satisfies_the_range_checks():
    """Every registered preset builds (its dataclasses run the checks) and survives a JSON round
    trip, so no preset holds a value the checks refuse."""
    for name in available_presets():
        cfg = get_preset(name)
        assert from_dict(type(cfg), json.loads(dumps(cfg))) == cfg, name


@pytest.mark.parametrize("preset", ["fusion-early-tiny", "lm-tiny", "vlm-tiny-stage2", "t2i-tiny"])
@pytest.mark.parametrize("override", ["train.batch_size=0", "train.steps=-5"])
def test_other_families_train_configs_are_checked_too(preset, override):
    """The fusion, LM/VLM and t2i train configs use the same checks."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}=-?\d+: must be > 0"):
        apply_overrides(get_preset(preset), [override])


@pytest.mark.parametrize(
    ("preset", "override", "message"),
    [
        ("fusion-early-tiny", "model.heads=0", r"model\.heads=0: must be > 0"),
        ("lm-tiny", "model.vocab_size=0", r"model\.vocab_size=0: must be > 0"),
        ("vlm-tiny-stage1", "model.num_queries=0", r"model\.num_queries=0: must be > 0"),
        ("t2i-tiny", "model.cond_drop=1.5", r"model\.cond_drop=1\.5: must be in \[0, 1\]"),
        ("t2i-tiny", "eval.steps=0", r"eval\.steps=0: must be > 0"),
    ],
)
def test_other_families_model_configs_are_checked_too(preset, override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(get_preset(preset), [override])


def test_scst_fraction_is_a_fraction():
    with pytest.raises(ConfigError, match=r"train\.scst\.fraction=1\.5: must be in \[0, 1\]"):
        apply_overrides(get_preset("vlm-tiny-stage2"), ["train.scst.fraction=1.5"])
