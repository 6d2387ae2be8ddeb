"""`task=regress`: direct regression of one modality from another (X-ray to CT, seed 004).

A case holds the input (`regress.input`: the two X-ray images of a CT, one file of shape
(2, rows, columns) on a grid of its own, `data.grids`) and the target (`regress.target`: the CT
volume on the data set's grid). The network maps the input's planes, as channels, to the target:

    x        batch[input] (B, 1, V, H, W) -> (B, V, H, W): the V views as channels
    predict  model(x) -> (B, 1, D, H, W) on the target's grid
    loss     L1 or MSE (`regress.loss`) of prediction and target, in model space ([-1, 1])

Validation reports the loss (which picks the best checkpoint) and, as scores, PSNR and 3D SSIM of
the predictions over model space's range 2 (for `data.intensity=fixed`: the HU range of
`data.intensity_range`). Nothing is random in a step, so resume is exact as for every task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from voxgen.diffusion.parts import NetworkShape
from voxgen.draws import Draws
from voxgen.errors import ConfigError
from voxgen.precision import Autocast, autocast_policy
from voxgen.tasks import Stateless

LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss}
# Model space is [-1, 1]: PSNR and SSIM take its width as the data range.
DATA_RANGE = 2.0
# SSIM's 3D Gaussian window (voxgen.evaluation.pixel.ssim); smaller volumes get no SSIM score.
SSIM_WINDOW = 7


@dataclass
class RegressTask(Stateless):
    # The loss runs the model only as `model(x)`: DDP and FSDP can wrap it.
    parallel: ClassVar[bool] = True
    model: nn.Module
    input: str
    target: str
    loss_name: str
    autocast: Autocast
    network: NetworkShape
    # [V, H, W] of the input modality's own grid.
    input_grid: tuple[int, int, int]

    @property
    def modalities(self) -> tuple[str, ...]:
        return (self.input, self.target)

    @property
    def frozen(self) -> tuple[nn.Module, ...]:
        return ()

    def predict(self, batch: dict) -> torch.Tensor:
        """{input: (B, 1, V, H, W)} -> the network's prediction (B, 1, D, H, W), float32."""
        x = batch[self.input].float()[:, 0]  # (B, V, H, W)
        with self.autocast(x.device):
            return self.model(x).float()

    def loss(self, batch: dict, draws: Draws | torch.Generator | None, step: int) -> torch.Tensor:
        return LOSSES[self.loss_name](self.predict(batch), batch[self.target].float())

    def evaluate(self, batch: dict, draws: Draws | torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prediction = self.predict(batch)
        target = batch[self.target].float()
        return LOSSES[self.loss_name](prediction, target), prediction, target

    def scores(self, prediction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """Mean PSNR and 3D SSIM (dB, unitless) of the batch's volumes over model space's range."""
        from voxgen.evaluation.pixel import psnr, ssim

        pred = prediction.float().clamp(-1.0, 1.0)
        out = {"psnr": float(np.mean(psnr(pred, target, data_range=DATA_RANGE)))}
        if min(pred.shape[2:]) >= SSIM_WINDOW:
            out["ssim"] = float(np.mean(ssim(pred, target, data_range=DATA_RANGE, win_size=SSIM_WINDOW)))
        return out

    def preview(self, batch: dict, seed: int) -> list[np.ndarray]:
        """[prediction, target] of the first case (D, H, W)."""
        one = {m: batch[m][:1] for m in self.modalities}
        return [self.predict(one)[0, 0].cpu().numpy(), one[self.target][0, 0].float().cpu().numpy()]

    @torch.no_grad()
    def predict_file(self, volume: np.ndarray) -> torch.Tensor:
        """An input file's array (V, H, W), as read from disk -> the prediction (D, H, W) in model
        space: scaled and resampled as the data sets do for training (voxgen.data.dataset)."""
        from voxgen.data.dataset import resample, scale_image

        x = resample(torch.from_numpy(scale_image(volume))[None], self.input_grid, is_mask=False)  # (1, V, H, W)
        device = next(self.model.parameters()).device
        # Clamped to model space: the targets never leave it, so a prediction beyond is overshoot.
        return self.predict({self.input: x[None].to(device)})[0, 0].clamp(-1.0, 1.0).cpu()

    def meta_batch(self, batch_size: int) -> tuple[RegressTask, dict]:
        return self, {
            self.input: torch.empty((batch_size, 1, *self.input_grid), device="meta"),
            self.target: torch.empty((batch_size, 1, *self.network.data_shape), device="meta"),
        }


def build_regress_task(
    cfg, device: torch.device | str = "cpu", *, training: bool = False, model: nn.Module | None = None
) -> RegressTask:
    """The regress task of `cfg` with its network on `device` (`model`, a network mapping (B, V, H, W)
    to (B, 1, D, H, W), in place of xray2ct); ConfigError when the input has no grid of its own
    (data.grids) or the loss is unknown."""
    rc = cfg.regress
    if rc.loss not in LOSSES:
        raise ConfigError(f"regress.loss={rc.loss!r} is not one of {', '.join(LOSSES)}")
    if rc.input == rc.target:
        raise ConfigError(f"regress.input and regress.target are both {rc.input!r}: name two modalities")
    if rc.input not in cfg.data.grids:
        raise ConfigError(
            f"task=regress: the input {rc.input!r} needs a grid of its own, data.grids.{rc.input}=[views, rows, columns] "
            "(e.g. [2, 64, 64] for two X-ray images of 64 x 64)"
        )
    input_grid = tuple(int(s) for s in cfg.data.grids[rc.input])
    shape = tuple(int(s) for s in cfg.data.shape)
    if model is None:
        model = _xray2ct(cfg, shape, input_grid)
    views = input_grid[0]
    return RegressTask(
        model=model.to(device),
        input=rc.input,
        target=rc.target,
        loss_name=rc.loss,
        autocast=autocast_policy(cfg.training.precision),
        network=NetworkShape(views, 1, shape, views, 1, shape),
        input_grid=input_grid,
    )


def _xray2ct(cfg, shape: tuple[int, int, int], input_grid: tuple[int, int, int]) -> nn.Module:
    """The config's xray2ct network (config validation admits only regression families for
    task=regress): a cube of data.shape from square X-ray images."""
    from voxgen.models.xray2ct import build_xray2ct

    if len(set(shape)) != 1 or input_grid[1] != input_grid[2]:
        raise ConfigError(
            f"model.name=xray2ct makes a cube from square X-ray images: data.shape={list(shape)} and "
            f"data.grids.{cfg.regress.input}={list(input_grid)} are not"
        )
    return build_xray2ct(cfg.xray2ct, shape[0], input_grid[1], cfg.training.grad_checkpointing)
