"""Diffusion rejection sampling (DiffRS; Na, Kim, Park, Shin, Kang, Moon, ICML 2024, "Diffusion
Rejection Sampling"): a time-dependent discriminator corrects a sampler's transitions.

A discriminator d(x_t, t) trained to tell real volumes (noised to time t) from the model's own
(`task=diffrs-head`, `voxgen.tasks.diffrs_head`) estimates the density ratio of the true marginal
q_t to the model's p_t through its logit: l(x_t, t) = log d / (1 - d) ~ log q_t(x_t) / p_t(x_t).
Since the true and the model's reverse transitions share the forward process, the ratio of the
transition kernels is the ratio of marginals at both ends:

    q(x_s | x_t) / p(x_s | x_t) = exp(l(x_s, s) - l(x_t, t))            (s < t)

Each step of the base sampler (an Euler step of the rectified flow) is a proposal accepted with
probability min(1, exp(l(x_s, s) - l(x_t, t) - c_s)); a rejected one is thrown away and the
volume jumps back `backsteps` grid points by the forward process (fresh noise,
`rflow_samplers.restart_jump`), where it is re-checked against the marginal ratio,
min(1, exp(l(x, t) - m_t)), jumping further back while that fails; at t = 1 the marginals agree
(both are the noise) and the volume restarts from fresh noise. c and m are the rejection
constants log M of the paper, per grid point: the `percentile` quantile of the transitions' and
marginals' log ratios, clamped at 0 as the authors' code does. The paper measures them on
trajectories of the base sampler; here they are measured on the head's cached generated volumes
noised along straight paths (`Head.thresholds`), which costs no network evaluation. A volume
that has used `budget * steps` network evaluations finishes its grid unchecked, so sampling
always ends.

Every network call counts (`generate.CountedModel`): the NFE includes the rejected work.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from voxgen import checkpoint as store
from voxgen.diffusion.noise import Generators, randn_like
from voxgen.diffusion.rflow_samplers import restart_jump
from voxgen.diffusion.run_inputs import read_saved_config
from voxgen.diffusion.shapes import append_dims
from voxgen.errors import CheckpointError, ConfigError
from voxgen.precision import autocast_policy

NAME = "diffrs"
TASK = "diffrs-head"
# Where `voxgen train --run RUN` puts the head and `voxgen sample --solver diffrs` looks for it.
HEAD_FOLDER = "diffrs-head"
# The generated volumes a head trains on, with the identity of the model that made them.
GENERATED = "generated.safetensors"
# Sampling reads the diffusion run's EMA weights; the head's own raw weights (a short run's EMA lags).
RUN_WEIGHTS = "ema/"
HEAD_WEIGHTS = "model/"
# The thresholds are measured on at most this many cached volumes, with this noise seed.
CALIBRATION_VOLUMES = 32
CALIBRATION_SEED = 7_000_003


# ---- the head --------------------------------------------------------------------------------


def time_embedding(t: torch.Tensor, size: int) -> torch.Tensor:
    """(B,) times in [0, 1] -> (B, size) sinusoids of 1000 t (the scale the diffusion network sees)."""
    half = size // 2
    frequencies = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * frequencies[None]  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def _groups(width: int) -> int:
    return next(g for g in (8, 4, 2, 1) if width % g == 0)


class _Level(nn.Module):
    """3D convolution (stride 1 or 2), GroupNorm, scale and shift from the time embedding, SiLU."""

    def __init__(self, in_channels: int, out_channels: int, embedding: int, stride: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(_groups(out_channels), out_channels)
        self.film = nn.Linear(embedding, 2 * out_channels)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(x))  # (B, C, D_i, H_i, W_i)
        scale, shift = self.film(e).chunk(2, dim=1)  # (B, C) each
        return nn.functional.silu(h * (1 + append_dims(scale, h.ndim)) + append_dims(shift, h.ndim))


class DiffRSHead(nn.Module):
    """The time-dependent discriminator: (x, t, vector) -> logit (B,), positive for "real".

    x (B, in_channels, D', H', W') is what the diffusion network sees (x_t joined by the volume
    conditions, `Mode.network_inputs`), t (B,) the rectified-flow time in [0, 1], vector
    (B, vector_size) a condition vector or None. Levels of 3D convolutions (each after the first
    halves the grid) modulated by the time embedding, the global mean and maximum of each
    channel, one linear logit.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], vector_size: int = 0, embedding: int = 64):
        super().__init__()
        self.embedding = embedding
        self.time = nn.Sequential(nn.Linear(embedding, embedding), nn.SiLU(), nn.Linear(embedding, embedding))
        self.vector = nn.Linear(vector_size, embedding) if vector_size else None
        widths = [in_channels, *(int(c) for c in channels)]
        self.levels = nn.ModuleList(
            _Level(a, b, embedding, stride=1 if i == 0 else 2) for i, (a, b) in enumerate(zip(widths, widths[1:]))
        )
        # PyTorch's default initialisation: a logit layer started at zero leaves the levels without
        # gradient at first, and on phantoms such a head had not left chance after 300 steps.
        self.logit = nn.Linear(2 * widths[-1], 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, vector: torch.Tensor | None = None) -> torch.Tensor:
        e = self.time(time_embedding(t, self.embedding))  # (B, E)
        if self.vector is not None and vector is not None:
            e = e + self.vector(vector.to(e.dtype))
        for level in self.levels:
            x = level(x, e)  # (B, C_i, D_i, H_i, W_i)
        # The mean and the maximum over the grid: a generated volume may differ from real ones in a
        # few voxels (values no real volume takes), which a mean alone dilutes away.
        pooled = torch.cat([x.mean(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4))], dim=1)  # (B, 2 C)
        return self.logit(pooled).squeeze(1)  # (B,)


def build_head(network, channels: Sequence[int]) -> DiffRSHead:
    """The head for a diffusion network of geometry `network` (`parts.NetworkShape`); ConfigError
    for widths that are not positive."""
    widths = [int(c) for c in channels]
    if not widths or min(widths) < 1:
        raise ConfigError(f"diffrs.channels={widths} must be positive widths, one per level")
    return DiffRSHead(network.in_channels, widths, network.vector_size)


def head_logits(model: Callable, mode, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """The head's logits (B,) at x_t (B, C, D', H', W') and times t (B,), given the mode's condition."""
    x, vector = mode.network_inputs(x_t, cond)
    return model(x, t, vector)


def straight_path(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, per sample t (B,): the rectified-flow forward process."""
    t = append_dims(t.to(x0.dtype), x0.ndim)
    return (1 - t) * x0 + t * noise


@dataclass
class Head:
    """A trained head as the sampler uses it: its log density ratio and rejection constants.

    `calibration` (N, C, D', H', W') are generated volumes in the model's space (the head's
    cached training fakes) with their conditions `calibration_cond`, from which `thresholds`
    measures the constants.
    """

    model: Callable  # (x, t, vector) -> (B,) logits: a DiffRSHead
    mode: object  # the diffusion run's Mode
    autocast: Callable  # device -> context manager (voxgen.precision)
    calibration: torch.Tensor
    calibration_cond: torch.Tensor | None = None
    _thresholds: dict = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        """Where the head runs (the CPU for a head without parameters)."""
        parameter = next(iter(self.model.parameters()), None) if isinstance(self.model, nn.Module) else None
        return parameter.device if parameter is not None else torch.device("cpu")

    @torch.no_grad()
    def log_ratio(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """log q_t / p_t estimated at x_t (B, C, D', H', W'), times t (B,): float32 (B,) on the CPU."""
        with self.autocast(x_t.device):
            return head_logits(self.model, self.mode, x_t, t, cond).float().cpu()

    def thresholds(self, timesteps: torch.Tensor, percentile: float) -> tuple[list[float], list[float]]:
        """(marginal m_i, transition c_i) log rejection constants for each point of `timesteps`
        (c_0 = 0: nothing leads to the first point): the `percentile` quantiles, clamped at 0, of
        l(x_{t_i}) and l(x_{t_i}) - l(x_{t_{i-1}}) over the calibration volumes noised along
        straight paths with a fixed seed. Measured once per grid and percentile."""
        key = (tuple(timesteps.tolist()), float(percentile))
        if key not in self._thresholds:
            ratios = self._calibration_ratios(timesteps)  # (S + 1, N)
            marginal = torch.quantile(ratios, percentile, dim=1).clamp(min=0)
            steps = torch.quantile(ratios[1:] - ratios[:-1], percentile, dim=1).clamp(min=0)
            self._thresholds[key] = (marginal.tolist(), [0.0, *steps.tolist()])
        return self._thresholds[key]

    def _calibration_ratios(self, timesteps: torch.Tensor) -> torch.Tensor:
        codes = self.calibration[:CALIBRATION_VOLUMES].float()
        cond = None if self.calibration_cond is None else self.calibration_cond[: len(codes)]
        noise = torch.randn(codes.shape, generator=torch.Generator().manual_seed(CALIBRATION_SEED))
        device = self.device
        rows = []
        for t in timesteps.tolist():
            ratio = []
            for start in range(0, len(codes), 8):
                x0, n = codes[start : start + 8].to(device), noise[start : start + 8].to(device)
                times = torch.full((len(x0),), t, dtype=torch.float32, device=device)
                c = None if cond is None else cond[start : start + 8].to(device)
                ratio.append(self.log_ratio(straight_path(x0, n, times), times, c))
            rows.append(torch.cat(ratio))
        return torch.stack(rows).double()  # (S + 1, N)


# ---- the sampler -----------------------------------------------------------------------------


@dataclass
class Tally:
    """What DiffRS did, summed over the volumes it sampled."""

    volumes: int = 0
    evaluations: int = 0  # velocity evaluations, rejected work included (each volume's own)
    checks: int = 0  # steps put to the head
    accepted: int = 0  # ... and accepted
    backtracks: int = 0  # jumps back by the forward process (per rejection, and per failed re-check)
    restarts: int = 0  # jumps that went back to t = 1 (fresh noise)
    unchecked: int = 0  # steps taken without a check, after a volume used its budget
    head_evaluations: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted steps over checked steps (1 when none was checked)."""
        return self.accepted / self.checks if self.checks else 1.0

    def as_dict(self) -> dict:
        per_volume = self.evaluations / self.volumes if self.volumes else 0.0
        return {**asdict(self), "acceptance_rate": self.acceptance_rate, "evaluations_per_volume": per_volume}


def _per_sample(generator: Generators, n: int) -> list:
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * n
    if len(generator) != n:
        raise ValueError(f"{len(generator)} generators for a batch of {n} samples")
    return list(generator)


def _accept(excess: float, generator: torch.Generator | None) -> bool:
    """True with probability min(1, exp(excess)), drawn from the sample's own generator."""
    u = float(torch.rand(1, generator=generator))
    return u < math.exp(min(excess, 0.0))


def _times(x: torch.Tensor, times: Sequence[float]) -> torch.Tensor:
    """Per-sample times (B,), at least float32 as `rflow_samplers` gives them."""
    return torch.tensor(list(times), dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)


def _euler(x: torch.Tensor, v: torch.Tensor, steps: Sequence[float]) -> torch.Tensor:
    """x + h v with per-sample step h; one Python float when the batch moves together, which is
    exactly `rflow_samplers.euler`'s update."""
    if len(set(steps)) == 1:
        return x + (steps[0] * 1.0) * v
    return x + append_dims(torch.tensor(list(steps), dtype=x.dtype, device=x.device), x.ndim) * v


def _rows(cond: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if cond is None else cond[rows.to(cond.device)]


def diffrs(
    model: Callable,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    cond=None,
    generator=None,
    callback=None,
    head: Head,
    tally: Tally,
    percentile: float = 0.75,
    backsteps: int = 1,
    budget: float = 4.0,
) -> torch.Tensor:
    """DiffRS over Euler steps of the rectified flow (see the module docstring).

    model(x, t, cond) is the velocity, x (B, C, D, H, W) the noise at timesteps[0] = 1, `head`
    the trained discriminator, `tally` what the run did (added to). Settings: `percentile`
    (q) of the rejection constants, `backsteps` (back) grid points to jump back on a rejection,
    `budget`: evaluations per volume, as a multiple of the steps, after which a volume finishes
    unchecked. Volumes of a batch leave lock-step as they are rejected: each network call
    evaluates the volumes still sampling, each at its own time. Per-volume draws (acceptance,
    backtracking noise) come from that volume's generator. `callback` is not called: the grid
    is not walked in order.
    """
    grid = timesteps.tolist()
    steps, n = len(grid) - 1, x.shape[0]
    marginal, transition = head.thresholds(timesteps, percentile)
    generators = _per_sample(generator, n)
    index, used = [0] * n, [0] * n
    limit = budget * steps
    x = x.clone()
    ratio = head.log_ratio(x, _times(x, [grid[0]] * n), cond).tolist()
    tally.volumes += n
    tally.head_evaluations += n
    while live := [b for b in range(n) if index[b] < steps]:
        rows = torch.tensor(live)
        now = [grid[index[b]] for b in live]
        then = [grid[index[b] + 1] for b in live]
        here = x[rows.to(x.device)]
        v = model(here, _times(x, now), _rows(cond, rows)).to(x.dtype)
        proposal = _euler(here, v, [b - a for a, b in zip(now, then)])
        for b in live:
            index[b], used[b] = index[b] + 1, used[b] + 1
        tally.evaluations += len(live)
        checked = [k for k, b in enumerate(live) if used[b] <= limit]
        for k, b in enumerate(live):
            if used[b] > limit:
                x[b] = proposal[k]
                tally.unchecked += 1
        if not checked:
            continue
        ks = torch.tensor(checked)
        new = head.log_ratio(proposal[ks.to(x.device)], _times(x, [then[k] for k in checked]), _rows(cond, rows[ks]))
        tally.head_evaluations += len(checked)
        rejected = []
        for r, k in zip(new.tolist(), checked):
            b = live[k]
            tally.checks += 1
            if _accept(r - ratio[b] - transition[index[b]], generators[b]):
                x[b], ratio[b] = proposal[k], r
                tally.accepted += 1
            else:
                rejected.append((b, proposal[k]))
        _backtrack(rejected, x, cond, grid, index, ratio, marginal, head, generators, backsteps, tally)
    return x


def _backtrack(pending, x, cond, grid, index, ratio, marginal, head, generators, backsteps, tally) -> None:
    """Move rejected volumes back by the forward process until the marginal check accepts one
    (or it reaches t = 1); `pending` holds (volume, its rejected proposal)."""
    while pending:
        moved = []
        for b, xb in pending:
            target = max(index[b] - backsteps, 0)
            noise = randn_like(xb[None], generators[b])
            moved.append((b, restart_jump(xb[None], grid[index[b]], grid[target], noise)[0]))
            index[b] = target
        tally.backtracks += len(moved)
        rows = torch.tensor([b for b, _ in moved])
        jumped = torch.stack([xb for _, xb in moved])
        ratios = head.log_ratio(jumped, _times(x, [grid[index[b]] for b, _ in moved]), _rows(cond, rows))
        tally.head_evaluations += len(moved)
        pending = []
        for (b, xb), r in zip(moved, ratios.tolist()):
            # At t = 1 the true and the model's marginals are both the noise: nothing to check.
            if index[b] == 0 or _accept(r - marginal[index[b]], generators[b]):
                x[b], ratio[b] = xb, r
                tally.restarts += int(index[b] == 0)
            else:
                pending.append((b, xb))


def is_diffrs(solver: str | None) -> bool:
    """Whether a solver text names this sampler."""
    return solver is not None and str(solver).split(",")[0].partition(":")[0].strip() == NAME


# ---- sampling a run --------------------------------------------------------------------------


@torch.no_grad()
def sample_codes(
    parts,
    seeds: Sequence[int],
    cond: torch.Tensor | None,
    sampler: Callable,
    grid: torch.Tensor,
    *,
    guidance_scale: float = 1.0,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, float]:
    """(codes (N, C, D', H', W') in the model's space on the CPU, network calls per volume) of a
    prepared `sampler` over `grid`; the noise of seed i and the wrapping of the network (counted,
    guided) are those of `generate.generate`, whose codes these are before decoding."""
    from voxgen.diffusion.generate import CountedModel, guided, prediction_fn
    from voxgen.diffusion.noise import seeded_generators

    parts.model.eval()
    device = next(parts.model.parameters()).device
    out, calls = [], 0
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        generators = seeded_generators(chunk)
        x = torch.stack([torch.randn(tuple(parts.network.sample_shape), generator=g) for g in generators]).to(device)
        c = cond[start : start + len(chunk)].to(device) if cond is not None else None
        counted = CountedModel(prediction_fn(parts))
        x = sampler(guided(counted, guidance_scale, parts.mode.null_condition), x, grid, cond=c, generator=generators)
        out.append(x.float().cpu())
        calls += counted.calls * len(chunk)
        if progress is not None:
            progress(len(chunk))
    return torch.cat(out), calls / len(seeds)


def sample_with_head(
    parts,
    head: Head,
    seeds: Sequence[int],
    cond: torch.Tensor | None = None,
    *,
    solver,
    batch_size: int = 4,
    guidance_scale: float = 1.0,
    progress: Callable[[int], None] | None = None,
):
    """(`generate.Generation`, `Tally`) of `solver` (a `diffrs` spec) with `head`: what
    `generate.generate` does for the other samplers, with the same seeds, conditions and NFE."""
    import functools
    import time

    from voxgen.diffusion.generate import Generation
    from voxgen.diffusion.samplers import prepare
    from voxgen.diffusion.spaces import decode_channels

    if not seeds:
        raise ValueError("sample_with_head needs at least one seed")
    if guidance_scale != 1.0 and cond is None:
        raise ConfigError(
            f"guidance scale {guidance_scale:g} needs a conditional mode; mode {parts.mode.name!r} has none (use 1)"
        )
    sampler, grid = prepare(solver, parts.strategy)
    tally = Tally()
    started = time.perf_counter()
    bound = functools.partial(sampler, head=head, tally=tally)
    codes, nfe = sample_codes(
        parts, seeds, cond, bound, grid, guidance_scale=guidance_scale, batch_size=batch_size, progress=progress
    )
    device = next(parts.model.parameters()).device
    with torch.no_grad():
        volumes = torch.cat(
            [
                decode_channels(parts.space, codes[i : i + batch_size].to(device), parts.mode.generated).cpu()
                for i in range(0, len(codes), batch_size)
            ]
        )
    seconds = (time.perf_counter() - started) / len(seeds)
    return Generation(volumes, round(nfe), seconds), tally


# ---- the run a head belongs to ---------------------------------------------------------------


@dataclass
class OpenRun:
    """A diffusion run opened for DiffRS: its saved config, its task (`Parts`) with the chosen
    weights, and the identity of those weights."""

    cfg: object
    parts: object
    step: int
    identity: dict  # {"path", "step", "weights"}: which weights a head was trained against


def weights_digest(model: nn.Module) -> str:
    """A short SHA-256 of a network's tensors: a head is valid for exactly these weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def read_run_config(run_dir: str | Path, key: str):
    """The saved config of a diffusion run, read as the ControlNet's base is; ConfigError (one
    line, naming `key`) for a folder that is missing, is not a run, or not a rectified-flow
    diffusion run."""
    from omegaconf import OmegaConf

    path = Path(run_dir)
    if not str(run_dir) or not path.is_dir():
        raise ConfigError(f"{key}={path}: no such run folder")
    cfg = OmegaConf.create(read_saved_config(key, path, path / "config.yaml", ("model", "data"), "a voxgen run"))
    task = cfg.get("task", "diffusion")
    if task != "diffusion":
        raise ConfigError(f"{key}={path} is a task={task} run, not a diffusion run: DiffRS samples diffusion runs")
    if cfg.get("strategy") != "rflow":
        raise ConfigError(f"{key}={path} was trained with strategy={cfg.get('strategy')}; DiffRS samples strategy=rflow runs")
    return cfg


def open_run(run_dir: str | Path, device, *, key: str, weights: str = RUN_WEIGHTS) -> OpenRun:
    """The diffusion run at `run_dir` with the `weights` of its newest checkpoint that reads back."""
    from voxgen.diffusion.parts import build_parts

    cfg = read_run_config(run_dir, key)
    parts = build_parts(cfg, device)

    missing = f"{key}={run_dir}: the run has no checkpoint yet"
    _, state = store.load_weights(run_dir, parts.model, weights, missing, lambda s: parts.load_state_dict(s.get("task", {})))
    step = int(state["step"])
    parts.model.eval()
    identity = {"path": str(Path(run_dir).resolve()), "step": step, "weights": weights_digest(parts.model)}
    return OpenRun(cfg, parts, step, identity)


# ---- the generated volumes a head trains on --------------------------------------------------


def write_generated(path: Path, tensors: dict[str, torch.Tensor], about: dict) -> None:
    """The cache of generated codes {split/x0, split/cond}, with `about` (the identity of the
    model that made them, the solver, the seeds) as metadata; written whole or not at all."""
    import json

    from safetensors.torch import save

    from voxgen.files import write_atomic

    data = {k: v.contiguous() for k, v in tensors.items()}
    write_atomic(path, save(data, metadata={"about": json.dumps(about, sort_keys=True)}))


def read_generated(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, about) of a cache `write_generated` wrote."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            about = json.loads((f.metadata() or {}).get("about", "{}"))
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: the generated volumes do not read back ({type(exc).__name__}); delete it to regenerate"
        ) from None
    return tensors, about


# ---- a trained head --------------------------------------------------------------------------


def load_head(head_dir: str | Path, run: OpenRun, run_dir: str | Path) -> tuple[Head, dict]:
    """(the head trained in `head_dir` for the run's weights, ready to sample; its checkpoint's
    state). CheckpointError when there is no trained head, ConfigError when `head_dir` holds no
    head or one trained for other weights (another run, or another checkpoint of this one)."""
    head_dir = Path(head_dir)
    retrain = f"train one with `voxgen train --run {run_dir}`"
    saved = head_dir / "config.yaml"
    if not saved.is_file():
        raise CheckpointError(f"{run_dir} has no trained DiffRS head ({head_dir} is not a run folder): {retrain}")
    head_cfg = read_saved_config("--head", head_dir, saved, ("model", "data"), "a voxgen run")
    if head_cfg.get("task") != TASK:
        raise ConfigError(f"{head_dir} is a task={head_cfg.get('task')} run, not a DiffRS head (task={TASK}): {retrain}")
    model = build_head(run.parts.network, head_cfg.get("diffrs", {}).get("channels", [16, 32, 64]))
    device = next(run.parts.model.parameters()).device

    _, state = store.load_weights(head_dir, model, HEAD_WEIGHTS, f"{head_dir}: the DiffRS head has no checkpoint yet: {retrain}")
    trained_for = state.get("task", {}).get("trained_for", {})
    if trained_for.get("weights") != run.identity["weights"]:
        raise ConfigError(
            f"{head_dir} is a DiffRS head for {trained_for.get('path', '?')} (step {trained_for.get('step', '?')}), "
            f"not for the weights of {run_dir} (step {run.step}): {retrain}"
        )
    tensors, _ = read_generated(head_dir / GENERATED)
    model.to(device).eval()
    precision = head_cfg.get("training", {}).get("precision", "fp32")
    head = Head(model, run.parts.mode, autocast_policy(precision), tensors["train/x0"], tensors.get("train/cond"))
    return head, state
