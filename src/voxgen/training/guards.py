"""Stability guards: skip non-finite and spiking steps, ask for rollbacks, stop on mean collapse.

Three failures cost the seed runs days: non-finite losses, gradient spikes, and models that
degenerate to predicting the mean. `Guards` decides per step whether an update may be applied
(`check_step`, or `accept` for `train_step(..., accept=guards.accept)`), tells the trainer when
to roll back (`should_roll_back`), and raises `TrainingCollapsed` at validation when predictions
have lost their spread (`check_collapse`, with `spread` to measure it).

Spike detection
    A step is a spike when its total gradient norm (before clipping) exceeds

        median + spike_mads * max(1.4826 * MAD, MAD_FLOOR * median)

    over a window of the last `spike_window` ACCEPTED norms, once `spike_min_history` of them
    exist. The MAD is scaled by 1.4826 so that for normally distributed norms it estimates the
    standard deviation: `spike_mads` reads as "robust standard deviations". The floor keeps a
    flat history (all norms nearly equal, MAD ~ 0) from flagging a change of a few per cent:
    whatever the spread, a step is only a spike above median * (1 + spike_mads * MAD_FLOOR).
    Median and MAD are used instead of mean and std (or an EMA) because one spike moves them
    by one rank, not by its size.

Recovery (why the detector cannot freeze training)
    The seeds' detector kept an EMA of accepted norms only; when the norm level moved up for
    good, every step was a spike, the EMA never saw a new value, and 26,000 steps were skipped.
    Here the window only learns from accepted steps too (so spikes cannot raise their own
    threshold), but two rules bound any run of skipped steps:

    1. Rollback: after `max_consecutive_skips` skips in a row (0 disables), `should_roll_back()`
       is true. The trainer restores the last good checkpoint, lowers the LR, and calls
       `rolled_back()`, which empties the window: norms measured on the old weights and LR no
       longer describe the new ones. The next `spike_min_history` steps are then guarded only
       against non-finite values (the lowered LR and gradient clipping are the protection
       meanwhile) and rebuild the baseline. A level shift that survives the rollback is
       therefore accepted right after it, instead of causing a rollback loop.
    2. Re-baseline: when `spike_min_history` spikes were skipped without an accepted step
       between them (no rollback happened: disabled, not yet due, or no checkpoint to go back
       to) and the next step is a spike too, the level has moved for good. The rejected norms
       and this one become the new window and this step is accepted. So, without rollbacks, at
       most spike_min_history steps in a row are skipped as spikes, and the window keeps spike
       protection at the new level.

    Non-finite steps are never learned from: they count towards the rollback but not towards
    a re-baseline, and their norms never enter the window.

Collapse
    `check_collapse(step, prediction_std, target_std)` counts consecutive checks (validations)
    whose predictions' spatial std is below `collapse_std_ratio` of the target's, and raises
    after `collapse_patience` of them (0 for either disables it). A model that predicts the
    mean outputs nearly the same value everywhere, so its spread falls far below the target's
    even when its loss looks merely bad.

`state_dict()` holds the window, the pending rejected norms and all counters as plain JSON
values, so a resumed run makes the same decisions as an uninterrupted one.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

import torch

from voxgen.errors import TrainingCollapsed

OK, NONFINITE, SPIKE = "ok", "nonfinite", "spike"

MAD_SCALE = 1.4826  # 1 / Phi^-1(3/4): MAD -> standard deviation of a normal distribution
MAD_FLOOR = 0.05  # lower bound of the scaled MAD as a fraction of the median (flat histories)


class Guards:
    """Per-step accept/skip decisions, rollback requests and collapse detection for one run.

    Build it from the `guards` section of the config: `Guards(cfg.guards)`.
    """

    def __init__(self, settings) -> None:
        # The ranges of these settings are checked with the rest of the config (config.compose).
        self.settings = settings
        self.window: deque[float] = deque(maxlen=settings.spike_window)
        self.rejected: list[float] = []  # spike norms since the last accepted step
        self.consecutive_skips = 0
        self.skipped_nonfinite = 0
        self.skipped_spike = 0
        self.rollbacks = 0
        self.rebaselines = 0
        self.low_spread_checks = 0
        # Whether a validation has seen the predictions spread (see check_collapse).
        self.spread_seen = False
        self.last_decision = OK

    # ----------------------------------------------------------------- steps

    def threshold(self) -> float | None:
        """The gradient norm above which a step is a spike; None while the history is too short."""
        if len(self.window) < self.settings.spike_min_history:
            return None
        median = statistics.median(self.window)
        mad = statistics.median(abs(x - median) for x in self.window)
        scale = max(MAD_SCALE * mad, MAD_FLOOR * abs(median))
        return median + self.settings.spike_mads * scale

    def check_step(self, loss: float, grad_norm: float) -> str:
        """Decide about one step: "ok" (apply it), "nonfinite" or "spike" (skip it); counts it.

        `grad_norm` is the total norm before clipping; nan means it was not computed (the loss
        was already non-finite).
        """
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            if self.settings.skip_nonfinite:
                self.skipped_nonfinite += 1
                return self._skip(NONFINITE)
            # Allowed through on purpose; nothing to learn from, and it does not end a skip run.
            self.last_decision = OK
            return OK
        limit = self.threshold()
        if limit is not None and grad_norm > limit:
            if len(self.rejected) < self.settings.spike_min_history:
                self.rejected.append(grad_norm)
                self.skipped_spike += 1
                return self._skip(SPIKE)
            # As many spikes in a row as it takes to trust a baseline: the level has moved.
            self.window.clear()
            self.window.extend(self.rejected)
            self.rebaselines += 1
        self.window.append(grad_norm)
        self.rejected.clear()
        self.consecutive_skips = 0
        self.last_decision = OK
        return OK

    def accept(self, loss: float, grad_norm: float) -> bool:
        """`check_step(...) == "ok"`: the callback for `train_step(..., accept=guards.accept)`."""
        return self.check_step(loss, grad_norm) == OK

    def _skip(self, decision: str) -> str:
        self.consecutive_skips += 1
        self.last_decision = decision
        return decision

    def should_roll_back(self) -> bool:
        """True once `max_consecutive_skips` (> 0) steps in a row were skipped."""
        limit = self.settings.max_consecutive_skips
        return limit > 0 and self.consecutive_skips >= limit

    def new_phase(self) -> None:
        """A training phase began (voxgen.training.phases): other parts train, so the gradient
        norm has another level; the spike history restarts rather than refuse the new level."""
        self.rejected.clear()
        self.window.clear()

    def rolled_back(self) -> None:
        """Record a rollback: the skip run ends and the window restarts (see the module doc)."""
        self.rollbacks += 1
        self.consecutive_skips = 0
        self.rejected.clear()
        self.window.clear()

    # -------------------------------------------------------------- collapse

    def check_collapse(self, step: int, prediction_std: float, target_std: float, after_warmup: bool = True) -> None:
        """Count a validation whose predictions lost their spread; raise after `collapse_patience`.

        Raises TrainingCollapsed when prediction_std < collapse_std_ratio * target_std for
        collapse_patience checks in a row; a check above the ratio resets the count. Checks
        count once the predictions have had their spread at an earlier check, or after warm-up
        (`after_warmup`): a network whose output layer starts at zero (MONAI's UNet) predicts a
        constant at first, which is where training starts, not where it collapsed to; without
        warm-up, that start would otherwise be taken for a collapse at the first checks.
        """
        ratio, patience = self.settings.collapse_std_ratio, self.settings.collapse_patience
        if ratio <= 0 or patience <= 0:
            return
        if prediction_std >= ratio * target_std:
            self.low_spread_checks = 0
            self.spread_seen = True
            return
        if not (self.spread_seen or after_warmup):
            return
        self.low_spread_checks += 1
        if self.low_spread_checks >= patience:
            share = 100.0 * prediction_std / target_std
            raise TrainingCollapsed(
                f"training collapsed at step {step}: predictions' std {prediction_std:.3g} is "
                f"{share:.1f}% of the target's {target_std:.3g} for {self.low_spread_checks} "
                "validations in a row; lower training.lr or check the data"
            )

    # ----------------------------------------------------------- bookkeeping

    def scalars(self) -> dict[str, float]:
        """Totals for TensorBoard, keyed `guards/...`; median and threshold once they exist."""
        out = {
            "guards/skipped_nonfinite": float(self.skipped_nonfinite),
            "guards/skipped_spike": float(self.skipped_spike),
            "guards/rollbacks": float(self.rollbacks),
            "guards/rebaselines": float(self.rebaselines),
            "guards/consecutive_skips": float(self.consecutive_skips),
        }
        if self.window:
            out["guards/grad_norm_median"] = float(statistics.median(self.window))
        limit = self.threshold()
        if limit is not None:
            out["guards/spike_threshold"] = float(limit)
        return out

    def state_dict(self) -> dict:
        """Everything the decisions depend on, as JSON values (lists, ints, floats, str)."""
        return {
            "window": list(self.window),
            "rejected": list(self.rejected),
            "consecutive_skips": self.consecutive_skips,
            "skipped_nonfinite": self.skipped_nonfinite,
            "skipped_spike": self.skipped_spike,
            "rollbacks": self.rollbacks,
            "rebaselines": self.rebaselines,
            "low_spread_checks": self.low_spread_checks,
            "spread_seen": self.spread_seen,
            "last_decision": self.last_decision,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`; a window longer than the configured one keeps its newest norms."""
        self.window = deque((float(x) for x in state["window"]), maxlen=self.settings.spike_window)
        self.rejected = [float(x) for x in state["rejected"]]
        self.consecutive_skips = int(state["consecutive_skips"])
        self.skipped_nonfinite = int(state["skipped_nonfinite"])
        self.skipped_spike = int(state["skipped_spike"])
        self.rollbacks = int(state["rollbacks"])
        self.rebaselines = int(state["rebaselines"])
        self.low_spread_checks = int(state["low_spread_checks"])
        # Checkpoints written before this entry existed: a run that was checking was past warm-up.
        self.spread_seen = bool(state.get("spread_seen", False))
        self.last_decision = str(state["last_decision"])


def spread(prediction: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(prediction std, target std): per-sample std over all but the batch axis, batch mean.

    prediction, target: (B, C, D, H, W) (any rank >= 2), e.g. the model's output and the
    strategy's target for one validation batch. Population std (no Bessel correction), in
    float32, so a constant sample has exactly 0.
    """

    def per_sample(x: torch.Tensor) -> float:
        return float(x.detach().float().flatten(1).std(dim=1, correction=0).mean())

    return per_sample(prediction), per_sample(target)
