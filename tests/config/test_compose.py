import pytest

from voxgen.config import compose, from_dict, to_dict
from voxgen.errors import ConfigError


def test_defaults_and_overrides():
    cfg = compose([], ["training.steps=7", "data.shape=[8,16,24]", "model.attention=naive", "mode=seg"])
    assert cfg.training.steps == 7
    assert list(cfg.data.shape) == [8, 16, 24]
    assert cfg.model.attention == "naive"
    assert cfg.mode.name == "seg"


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


def test_boundary_values_are_accepted():
    cfg = compose(
        [],
        [
            "training.cond_dropout=0.0",
            "guards.rollback_lr_factor=1.0",
            "guards.collapse_std_ratio=0.0",
            "checkpoint.max_shard_bytes=1048576",
            "sample.guidance_scale=0",
            "guards.max_consecutive_skips=0",
            "guards.collapse_patience=0",
            "guards.spike_min_history=200",
            "sample.eta=1.0",
            "training.grad_clip=0",
        ],
    )
    assert cfg.checkpoint.max_shard_bytes == 2**20 and cfg.guards.rollback_lr_factor == 1.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["checkpoint.max_shard_bytes=1048575"], "checkpoint.max_shard_bytes=1048575 must be at least 1 MiB (1048576 bytes)"),
        (["guards.spike_min_history=201"], "guards.spike_min_history=201 exceeds guards.spike_window=200"),
        (["training.cond_dropout=-0.1"], "training.cond_dropout=-0.1 must be in [0, 1)"),
        (["guards.rollback_lr_factor=0"], "guards.rollback_lr_factor=0.0 must be in (0, 1]"),
        (["ddpm.schedule=cosinee"], "ddpm.schedule='cosinee' is not one of linear, cosine (did you mean 'cosine'?)"),
        (["model.channels=[16,0]"], "model.channels=[16, 0] must be positive sizes, one per level"),
        (["model.in_channels=0"], "model.in_channels=0 must be at least 1"),
        (["training.betas=[0.9,1.0]"], "training.betas=[0.9, 1.0] must be two values in [0, 1)"),
    ],
)
def test_ranges_and_combinations(overrides, message):
    with pytest.raises(ConfigError) as info:
        compose([], overrides)
    assert str(info.value).startswith(message), str(info.value)


def test_every_registered_model_validates_on_a_divisible_shape():
    from voxgen.models.registry import names_of

    for name in names_of("denoiser"):
        assert compose([], [f"model.name={name}", "data.shape=[32,32,32]"]).model.name == name
    # Regression families validate under their task (xray2ct's defaults: the seed's 256^3 network).
    grids = "data.grids={xray: [2, 512, 512]}"
    for name in names_of("regression"):
        overrides = ["task=regress", f"model.name={name}", "data.shape=[256,256,256]", "data.modalities=[xray,ct]", grids]
        assert compose([], [*overrides, "data.masks=[]"]).model.name == name
    with pytest.raises(ConfigError, match="model.name='xray2ct' is not one of"):
        compose([], ["model.name=xray2ct", "data.shape=[32,32,32]"])  # not a denoiser


def test_a_factory_failing_with_a_foreign_error_is_one_config_line(monkeypatch):
    from voxgen.models.registry import MODELS, ModelEntry

    def broken(cfg, **kwargs):
        raise ValueError("channels must be\nmultiples of 7")

    monkeypatch.setitem(MODELS, "broken", ModelEntry("broken", broken, "raises"))
    with pytest.raises(ConfigError) as info:
        compose([], ["model.name=broken", "data.shape=[16,16,16]"])
    assert str(info.value) == (
        "model.name='broken' cannot be built for data.shape [16, 16, 16] (2 -> 1 channels): channels must be multiples of 7"
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.lr=fast", "training.lr must be a number, got 'fast'"),
        (
            "model.attention_levels=[true,maybe]",
            'model.attention_levels must be a list of true/false values, got [true, "maybe"]',
        ),
        ("model.in_channels=x", "model.in_channels must be an integer or null, got 'x'"),
        ("run=5", "run must be a section of keys (dir, seed, report), got 5"),
        ("training..steps=3", "key 'training..steps' has an empty part between dots"),
    ],
)
def test_type_errors_name_key_expected_type_and_value(override, message):
    with pytest.raises(ConfigError) as info:
        compose([], [override])
    assert str(info.value) == f"override '{override}': {message}"


def test_type_error_in_a_yaml_section_is_located(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  name: unet\n  channels: 64\n")
    with pytest.raises(ConfigError) as info:
        compose([path])
    assert str(info.value) == f"{path}: model.channels must be a list of integers, got 64"
