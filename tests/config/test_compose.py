import pytest

from voxgen.config import compose, from_dict, to_dict
from voxgen.errors import ConfigError


def test_defaults_and_overrides():
    cfg = compose([], ["training.steps=7", "data.shape=[8,16,24]", "model.attention=naive", "mode=seg"])
    assert cfg.training.steps == 7
    assert list(cfg.data.shape) == [8, 16, 24]
    assert cfg.model.attention == "naive"
    assert cfg.mode == "seg"


def test_yaml_file_then_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  steps: 11\n  lr: 0.5\n")
    cfg = compose([path], ["training.lr=0.25"])
    assert cfg.training.steps == 11 and cfg.training.lr == 0.25


def test_round_trip_through_plain_data():
    cfg = compose([], ["run.seed=5"])
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)


@pytest.mark.parametrize(
    "override, words",
    [
        ("training.stepz=3", ["unknown config key", "training.stepz", "did you mean 'training.steps'"]),
        ("training.steps=abc", ["training.steps"]),
        ("mode=bravoo", ["mode='bravoo'", "did you mean 'bravo'"]),
        ("model.attention=flash", ["model.attention"]),
        ("data.shape=[4,4]", ["data.shape"]),
        ("training.batch_size=0", ["training.batch_size"]),
        ("noequals", ["key=value"]),
    ],
)
def test_bad_config_names_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        compose([], [override])
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_missing_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        compose([tmp_path / "nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        compose([bad])
