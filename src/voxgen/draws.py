"""The random numbers of one training batch, drawn per sample.

Every sample of a step draws its noise, time, condition dropout and augmentation from a
generator of its own, seeded from (run seed, step, the sample's place in the global batch). What
sample i of step s sees therefore does not depend on how the global batch is split over the
processes of a torchrun job: a 2-process run with 2 samples each draws exactly what a 1-process
run with 4 samples draws, and a resumed run draws what the uninterrupted one would have, without
saving any generator state. Draws made once per batch (an autoencoder's patch position) come
from a generator of the process's own (`batch`), seeded from (run seed, step, rank).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Salt of the per-process generator's seed, so it never equals a sample's.
_BATCH_STREAM = 2**31


def _seed(*words: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence mixes them: nearby inputs give unrelated seeds)."""
    low, high = np.random.SeedSequence([int(w) for w in words]).generate_state(2)
    return (int(high) << 32 | int(low)) & (2**63 - 1)


class Draws:
    """Per-sample generators of one local batch (`samples[i]` for row i) and one for the batch."""

    def __init__(self, samples: Sequence[torch.Generator | None], batch: torch.Generator | None, device):
        self.samples = list(samples)
        self.batch = batch
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.samples)

    @classmethod
    def for_step(cls, seed: int, step: int, batch_size: int, device, rank: int = 0, world: int = 1, attempt: int = 0) -> Draws:
        """The draws of step `step` for process `rank` of `world`, each holding `batch_size` samples
        of the global batch (rank r holds samples r * batch_size ...). `attempt` (the run's rollback
        count) gives a step replayed after a rollback new noise instead of the failure it met."""
        device = torch.device(device)
        if device.type == "meta":
            return cls([None] * batch_size, None, device)
        first = rank * batch_size
        samples = [_generator(device, _seed(seed, attempt, step, first + i)) for i in range(batch_size)]
        return cls(samples, _generator(device, _seed(seed, attempt, step, _BATCH_STREAM + rank)), device)

    @classmethod
    def of(cls, source: Draws | torch.Generator | None, batch_size: int, device) -> Draws:
        """`source` as the draws of a batch of `batch_size`: Draws as they are; a generator seeds
        one generator per sample (callers outside the trainer); None draws from torch's global
        generator (the planner, on the meta device)."""
        if isinstance(source, Draws):
            return source
        if source is None:
            return cls([None] * batch_size, None, device)
        seeds = torch.randint(0, 2**62, (batch_size + 1,), generator=source, device=source.device).tolist()
        device = torch.device(device)
        return cls([_generator(device, s) for s in seeds[:-1]], _generator(device, seeds[-1]), device)

    def part(self, start: int, stop: int) -> Draws:
        """The draws of rows start..stop-1 (one micro-batch of an accumulated step); the batch
        generator is shared."""
        return Draws(self.samples[start:stop], self.batch, self.device)

    def _rows(self, rows: Sequence[int] | None) -> Sequence[int]:
        return range(len(self.samples)) if rows is None else rows

    def normal(self, shape: Sequence[int] = (), dtype=torch.float32, rows: Sequence[int] | None = None) -> torch.Tensor:
        """(len(rows), *shape) standard normal; row k from sample rows[k]'s generator (default: one
        row per sample). A sample named twice draws twice from its stream."""
        return self._fill(shape, dtype, rows, lambda out, g: out.normal_(generator=g))

    def uniform(self, shape: Sequence[int] = (), dtype=torch.float32, rows: Sequence[int] | None = None) -> torch.Tensor:
        """(len(rows), *shape) uniform on [0, 1)."""
        return self._fill(shape, dtype, rows, lambda out, g: out.uniform_(generator=g))

    def integers(self, high: int, rows: Sequence[int] | None = None) -> torch.Tensor:
        """(len(rows),) int64 uniform on {0, ..., high - 1}."""
        return self._fill((), torch.int64, rows, lambda out, g: out.random_(0, high, generator=g))

    def _fill(self, shape, dtype, rows, draw) -> torch.Tensor:
        rows = self._rows(rows)
        out = torch.empty((len(rows), *shape), device=self.device, dtype=dtype)
        if self.device.type != "meta":
            for k, i in enumerate(rows):
                draw(out[k], self.samples[i])
        return out


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)
