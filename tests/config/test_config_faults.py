"""Config values that used to pass composition and then did the wrong thing: each is one error line."""

from pathlib import Path

import pytest
import torch

from voxgen.cli import main
from voxgen.config import compose, from_dict, to_dict
from voxgen.errors import ConfigError

# numpy's seed range: the run's seed seeds numpy's global generator one to one.
SEED_MAX = 2**32 - 1


def _refused(overrides, files=()) -> str:
    with pytest.raises(ConfigError) as info:
        compose(files, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- non-finite numbers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.lr=.inf", "training.lr=inf must be a finite number"),
        ("training.lr=inf", "training.lr=inf must be a finite number"),
        ("training.weight_decay=.inf", "training.weight_decay=inf must be a finite number"),
        ("rflow.logit_mean=.nan", "rflow.logit_mean=nan must be a finite number"),
        ("rflow.logit_mean=-.inf", "rflow.logit_mean=-inf must be a finite number"),
        ("guards.spike_mads=nan", "guards.spike_mads=nan must be a finite number"),
        ("training.betas=[0.9,.nan]", "training.betas=[0.9, nan] must hold only finite numbers"),
    ],
)
def test_non_finite_numbers_are_refused_by_key(override, message):
    assert _refused([override]) == message


def test_every_float_is_checked_including_untyped_lists():
    # model.num_res_blocks is untyped (a count or a list per level): nothing key by key reaches it.
    assert _refused(["model.num_res_blocks=[1,.inf]"]) == "model.num_res_blocks=[1, inf] must hold only finite numbers"


def test_non_finite_number_in_a_yaml_file_and_a_saved_config(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("training:\n  weight_decay: .inf\n")
    assert _refused([], [path]) == "training.weight_decay=inf must be a finite number"
    saved = to_dict(compose([], []))
    saved["rflow"]["logit_mean"] = float("nan")
    with pytest.raises(ConfigError, match=r"^rflow.logit_mean=nan must be a finite number$"):
        from_dict(saved)


def test_weight_decay_is_at_least_zero():
    assert _refused(["training.weight_decay=-0.1"]) == "training.weight_decay=-0.1 must be at least 0"
    assert compose([], ["training.weight_decay=0"]).training.weight_decay == 0


# ---- seed range ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", ["-1", "1180591620717411303424", str(SEED_MAX + 1)])
def test_seed_outside_its_range_is_refused(seed):
    assert _refused([f"run.seed={seed}"]) == f"run.seed={seed} must be a whole number in [0, {SEED_MAX}]"


def test_the_largest_seed_seeds_every_generator():
    # The trainer seeds torch, numpy (seed % 2**32) and random with it, and derives further seeds
    # from it (seed * 100_003 + epoch for the data order): all must stay within torch's range.
    assert compose([], [f"run.seed={SEED_MAX}"]).run.seed == SEED_MAX
    torch.manual_seed(SEED_MAX)
    torch.Generator().manual_seed(SEED_MAX * 100_003 + 10**6)
    torch.manual_seed(0)


# ---- interpolation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("training.steps=${nope.nothing}", "training.steps"),
        ("run.dir=${oc.env:HOME}/runs", "run.dir"),
        ("data.root=\\${literal}", "data.root"),
        ("model.num_res_blocks=[1, '${training.steps}']", "model.num_res_blocks"),
    ],
)
def test_interpolations_in_overrides_are_refused(override, key):
    message = _refused([override])
    assert message.startswith(f"override '{override}': {key}=")
    assert "interpolation" in message


def test_interpolations_in_yaml_files_are_refused(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("run:\n  dir: ${oc.env:HOME}/runs\n")
    message = _refused([], [path])
    assert message.startswith(f"{path}: run.dir='${{oc.env:HOME}}/runs' is an interpolation")


def test_packaged_presets_and_configs_hold_no_interpolation():
    root = Path(__file__).resolve().parents[2]
    files = [*(root / "src/voxgen/config/presets").glob("*.yaml"), *(root / "configs").rglob("*.yaml")]
    assert files and not [f for f in files if "${" in f.read_text()]


# ---- paths --------------------------------------------------------------------------------------


def test_home_is_expanded_in_path_keys(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = compose([], ["run.dir=~/runs/a", "data.root=~/data"])
    assert cfg.run.dir == f"{tmp_path}/runs/a" and cfg.data.root == f"{tmp_path}/data"
    assert to_dict(cfg)["run"]["dir"] == f"{tmp_path}/runs/a"


def test_a_home_of_an_unknown_user_is_refused():
    message = _refused(["run.dir=~no-such-user-voxgen/runs"])
    assert message.startswith("run.dir='~no-such-user-voxgen/runs'") and "no such user" in message


# ---- override parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, value",
    [
        ("run.dir=/tmp/hash #1", "/tmp/hash #1"),
        ("run.dir=runs/a: b", "runs/a: b"),
        ("run.dir=yes", "yes"),
        ("run.dir=1.0e+3", "1.0e+3"),
        ("run.dir=[a,b]", "[a,b]"),
        ('run.dir="null"', "null"),
        ("run.dir='quoted dir'", "quoted dir"),
    ],
)
def test_string_keys_keep_the_value_whole(override, value):
    assert compose([], [override]).run.dir == value


def test_other_keys_still_parse_as_yaml():
    cfg = compose([], ["data.shape=[16,16,16]", "training.lr=1e-3", "sample.solver=null", "training.grad_checkpointing=true"])
    assert list(cfg.data.shape) == [16, 16, 16] and cfg.training.lr == 1e-3
    assert cfg.sample.solver is None and cfg.training.grad_checkpointing is True
    assert compose([], ["sample.solver=euler:10"]).sample.solver == "euler:10"
    assert _refused(["model.attention=null"]) == "override 'model.attention=null': model.attention must be a string, got null"


# ---- the command line: one error line, exit 2, nothing written ----------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.lr=.inf", "training.lr=inf must be a finite number"),
        ("rflow.logit_mean=.nan", "rflow.logit_mean=nan must be a finite number"),
        ("run.seed=-1", f"run.seed=-1 must be a whole number in [0, {SEED_MAX}]"),
    ],
)
def test_train_refuses_in_one_line(override, message, tmp_path, capsys):
    assert main(["train", "--dry-run", override]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == f"error: {message}"
    run_dir = tmp_path / "run"
    assert main(["train", override, f"run.dir={run_dir}", f"data.root={tmp_path / 'data'}"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not run_dir.exists()


def test_train_refuses_an_interpolation_in_one_line(capsys):
    assert main(["train", "--dry-run", "training.steps=${nope.nothing}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: override 'training.steps=${nope.nothing}': training.steps=")
    assert "Traceback" not in err
