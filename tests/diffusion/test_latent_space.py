"""space=latent: a tiny autoencoder run trained by the trainer, then diffusion on its codes (cached
and uncached), sampling that decodes to NIfTI, and the one-line errors for bad autoencoder runs."""

from __future__ import annotations

import json

import nibabel as nib
import pytest
import torch

from tiny_autoencoder import TINY_AUTOENCODER_RUN
from tiny_run import TINY_RUN
from voxgen.cli import main
from voxgen.config import compose
from voxgen.data.dataset import VolumeDataset
from voxgen.diffusion.spaces import build_space
from voxgen.errors import ConfigError
from voxgen.training.trainer import train

LATENT = [
    "mode=bravo_seg_cond",
    "space=latent",
    "data.shape=[16,16,16]",
    "model.channels=[8,16]",
    "model.attention_levels=[false,false]",
    "model.num_head_channels=8",
    "model.norm_num_groups=4",
    "training.steps=2",
    "training.val_batches=1",
    "sample.steps=2",
]


@pytest.fixture(scope="module")
def autoencoder_run(cohort_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("ae") / "run"
    train(compose(overrides=[*TINY_AUTOENCODER_RUN, f"data.root={cohort_root}", f"run.dir={run}"]))
    return run


def _latent_cfg(cohort_root, autoencoder_run, run, *extra):
    return compose(
        overrides=[*LATENT, f"data.root={cohort_root}", f"space.autoencoder={autoencoder_run}", f"run.dir={run}", *extra]
    )


def test_latent_space_geometry_comes_from_the_autoencoder_run(cohort_root, autoencoder_run, tmp_path):
    cfg = _latent_cfg(cohort_root, autoencoder_run, tmp_path / "r")
    space = build_space(cfg)
    assert (space.latent_channels, space.shape([16, 16, 16])) == (2, (8, 8, 8))
    from voxgen.tasks import build_task

    net = build_task(cfg).network
    # bravo_seg_cond: the bravo code generated from the seg code, 2 + 2 channels in, 2 out
    assert (net.in_channels, net.out_channels, net.shape) == (4, 2, (8, 8, 8))


def test_cached_latent_run_trains_samples_and_reuses_its_cache(cohort_root, autoencoder_run, tmp_path, capsys):
    run = tmp_path / "latent"
    result = train(_latent_cfg(cohort_root, autoencoder_run, run))
    assert result.step == 2
    [cache] = [p for p in (autoencoder_run / "latents").iterdir() if p.is_dir()]
    index = json.loads((cache / "index.json").read_text())
    assert set(index["stats"]) == {"bravo", "seg"}
    shards = sorted(cache.rglob("*.safetensors"))
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    assert len(shards) == len(VolumeDataset(cohort_root, "train", ("bravo",), (16, 16, 16))) + len(
        VolumeDataset(cohort_root, "val", ("bravo",), (16, 16, 16))
    )
    # A second run encodes nothing: the shards are read, not written again.
    train(_latent_cfg(cohort_root, autoencoder_run, tmp_path / "again"))
    assert {p: p.stat().st_mtime_ns for p in shards} == stamps
    # The checkpoint keeps the normalisation the codes were trained with.
    state = json.loads(sorted((run / "checkpoints").glob("step_*"))[-1].joinpath("state.json").read_text())
    assert state["task"]["space"]["scale"] == pytest.approx(index["stats"] and {m: s["scale"] for m, s in index["stats"].items()})
    # Sampling decodes the codes to volumes of the data's shape, written as NIfTI.
    assert main(["sample", "--run", str(run), "--num", "2", "--out", str(tmp_path / "samples")]) == 0
    written = sorted((tmp_path / "samples").rglob("*.nii.gz"))
    bravo = [p for p in written if "bravo" in p.name]
    assert bravo and nib.load(bravo[0]).shape == (16, 16, 16)


def test_uncached_latent_run_encodes_in_the_step(cohort_root, autoencoder_run, tmp_path):
    cfg = _latent_cfg(cohort_root, autoencoder_run, tmp_path / "r", "space.cache=false", "space.cache_dir=" + str(tmp_path / "c"))
    result = train(cfg)
    assert result.step == 2
    assert not (tmp_path / "c").exists()
    # Its statistics were fitted on the training split's codes: they normalise those codes.
    from voxgen.training.runs import load_run

    _, parts, _ = load_run(tmp_path / "r", device="cpu")
    train_set = VolumeDataset(cohort_root, "train", ("bravo",), (16, 16, 16))
    codes = torch.cat([parts.space.encode(train_set[i]["bravo"][None], "bravo") for i in range(len(train_set))])
    assert float(codes.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(codes.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda tmp, ae: tmp / "missing", "no such run folder"),
        (lambda tmp, ae: tmp, "not a voxgen run folder"),
        (lambda tmp, ae: None, "needs space.autoencoder=RUN_DIR"),
    ],
    ids=["missing", "no-config", "not-given"],
)
def test_bad_autoencoder_runs_are_one_line_errors(cohort_root, autoencoder_run, tmp_path, capsys, make, words):
    out = tmp_path / "never"
    folder = make(tmp_path, autoencoder_run)
    given = [] if folder is None else [f"space.autoencoder={folder}"]
    code = main(["train", *LATENT, f"data.root={cohort_root}", *given, f"run.dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_diffusion_run_or_other_modalities_are_refused(cohort_root, autoencoder_run, tmp_path, capsys):
    pixel = tmp_path / "pixel"
    assert main(["train", *TINY_RUN, f"data.root={cohort_root}", f"run.dir={pixel}"]) == 0
    capsys.readouterr()
    code = main(["train", *LATENT, f"data.root={cohort_root}", f"space.autoencoder={pixel}", f"run.dir={tmp_path / 'x'}"])
    err = capsys.readouterr().err
    assert code == 2 and "is a task=diffusion run, not an autoencoder" in err, err
    bravo_only = tmp_path / "bravo_only"
    train(
        compose(
            overrides=[
                *TINY_AUTOENCODER_RUN,
                "autoencoder.modalities=[bravo]",
                f"data.root={cohort_root}",
                f"run.dir={bravo_only}",
            ]
        )
    )
    code = main(["train", *LATENT, f"data.root={cohort_root}", f"space.autoencoder={bravo_only}", f"run.dir={tmp_path / 'y'}"])
    err = capsys.readouterr().err
    assert code == 2 and "was trained on bravo; this mode also needs seg" in err, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_damaged_cache_shard_is_reencoded_alone(cohort_root, autoencoder_run, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    extra = f"space.cache_dir={cache_dir}"
    train(_latent_cfg(cohort_root, autoencoder_run, tmp_path / "first", extra))
    shards = sorted(cache_dir.rglob("*.safetensors"))
    damaged = shards[1]
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0xFF
    damaged.write_bytes(bytes(data))
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    capsys.readouterr()
    train(_latent_cfg(cohort_root, autoencoder_run, tmp_path / "second", extra))
    err = capsys.readouterr().err
    assert damaged.name in err, err
    changed = [p for p in shards if p.stat().st_mtime_ns != stamps[p]]
    assert changed == [damaged]
    # The repaired shard holds the code again: every shard checks out on the next start.
    train(_latent_cfg(cohort_root, autoencoder_run, tmp_path / "third", extra))
    assert damaged.name not in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["dcae_f64c128.yaml", "dcae_f128c512.yaml"])
def test_a_transformer_that_cannot_patchify_the_code_is_refused_at_compose_time(preset):
    """The seeds' exp10_2 / exp10_3: a DiT on DC-AE codes crashed in its patch embedding."""
    overrides = ["mode=bravo_seg_cond", "space=latent", f"space.autoencoder=configs/{preset}", "data.shape=[160,256,256]"]
    with pytest.raises(ConfigError) as caught:
        compose(overrides=[*overrides, "model.name=dit", "model.variant=B", "model.patch_size=4"])
    message = str(caught.value)
    assert "\n" not in message
    assert "grid [10, " in message and "not divisible by model.patch_size=4" in message and "patch sizes that tile" in message
    compose(overrides=[*overrides, "model.name=dit", "model.variant=B", "model.patch_size=2"])  # what it proposes works


def test_planning_counts_what_the_step_holds(cohort_root, autoencoder_run, tmp_path):
    """Uncached, the frozen encoder is on the device (its weights count as parameters) and runs in the
    step; cached, the step reads codes. An autoencoder's own plan includes its discriminator."""
    from voxgen.memory.planner import plan

    cached = plan(_latent_cfg(cohort_root, autoencoder_run, tmp_path / "a"))
    uncached = plan(_latent_cfg(cohort_root, autoencoder_run, tmp_path / "b", "space.cache=false"))
    weights = list(build_space(_latent_cfg(cohort_root, autoencoder_run, tmp_path / "c")).network.parameters())
    frozen = uncached.breakdown["parameters"] - cached.breakdown["parameters"]
    # fp32 weights, each block rounded up to the caching allocator's 512 bytes
    assert sum(-(-4 * p.numel() // 512) * 512 for p in weights) == frozen
    assert uncached.peak_bytes > cached.peak_bytes and cached.params == uncached.params
    ae = [*TINY_AUTOENCODER_RUN, f"data.root={cohort_root}"]
    alone = plan(compose(overrides=ae))
    adversarial = plan(
        compose(
            overrides=[
                *ae,
                "autoencoder.adversarial_weight=0.1",
                "autoencoder.adversarial_start=5",
                "autoencoder.discriminator_layers=2",
            ]
        )
    )
    assert adversarial.params > alone.params and adversarial.peak_bytes > alone.peak_bytes
