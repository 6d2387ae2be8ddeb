"""Plan any importable `nn.Module` factory: `voxgen plan --factory MODULE:FUNCTION --input-shape C,D,H,W`.

With `--output-shape D,H,W` the network is a regression from images to a volume instead (X-ray to
CT): f(x) for x of shape (B, C, H, W) (`--input-shape C,H,W`: C images, views or channels) with an
output of shape (B, 1, D, H, W), planned as `task=regress` (an L1 loss against a target volume).

The network is planned through the same path as every registered family: `plan()` builds the
parts of the config with this network in place of the registry's and traces the real
`train_step` (rectified-flow loss, backward, AdamW) around it with the CUDA emulation and the
allocation tracker unchanged; the registry is not touched. The factory is called with no arguments under the meta device and must
return a module computing f(x) or f(x, t) for x of shape (B, C, D, H, W) and t of shape (B,),
with an output of shape (B, N, D, H, W). With C > N the last C - N input channels are the
condition (mode `bravo`), with C == N there is none (mode `seg`).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from voxgen.errors import ConfigError


def parse_input_shape(text: str) -> tuple[int, int, int, int]:
    """'2,160,256,256' -> (C, D, H, W)."""
    return parse_sizes(text, "C,D,H,W", "--input-shape")


def parse_sizes(text: str, names: str, flag: str) -> tuple[int, ...]:
    """'2,512,512' -> (2, 512, 512): as many positive sizes as `names` ('C,H,W') has letters."""
    try:
        sizes = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        sizes = ()
    count = len(names.split(","))
    if len(sizes) != count or any(s < 1 for s in sizes):
        raise ConfigError(f"{flag} {text!r} must be {count} positive sizes {names}")
    return sizes


def build_regression_module(spec: str, input_shape: Sequence[int], output_shape: Sequence[int]) -> nn.Module:
    """Call the factory on the meta device and check, with one meta forward, that it maps
    (1, C, H, W) to (1, 1, D, H, W)."""
    net = _call_factory(spec)
    x = torch.empty(1, *input_shape, device="meta")
    try:
        with torch.no_grad():
            y = net(x)
    except Exception as exc:  # noqa: BLE001 - user code: report it in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--factory {spec}: forward of an input {tuple(x.shape)} failed ({first})") from None
    expected = (1, 1, *output_shape)
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != expected:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ConfigError(f"--factory {spec}: output {got} for input {tuple(x.shape)}; expected {expected} (--output-shape)")
    return net


def regression_overrides(input_shape: Sequence[int], output_shape: Sequence[int]) -> list[str]:
    """The config of a regression from `input_shape` (C, H, W) images to an `output_shape` (D, H, W) volume."""
    c, h, w = input_shape
    d, vh, vw = output_shape
    return [
        "task=regress",
        "model.name=xray2ct",  # the task's network family; the factory's network replaces it
        "data.modalities=[xray,ct]",
        "data.masks=[]",
        f"data.grids={{xray: [{c}, {h}, {w}]}}",
        f"data.shape=[{d},{vh},{vw}]",
    ]


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """'package.module:function' (or :Class, or :obj.attr) -> the callable."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--factory {spec!r} is not of the form MODULE:FUNCTION")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # as `python -m` does: modules of the working folder import
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--factory {spec}: cannot import {module_name} ({exc})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"--factory {spec}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"--factory {spec}: {attr} is not callable")
    return obj


def takes_time(module: nn.Module) -> bool:
    """Whether `module.forward` takes a second positional argument (t)."""
    params = list(inspect.signature(module.forward).parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2


class TimeAdapter(nn.Module):
    """voxgen's f(x, t) around a network computing f(x) or f(x, t)."""

    def __init__(self, net: nn.Module, with_time: bool):
        super().__init__()
        self.net = net
        self.with_time = with_time

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t) if self.with_time else self.net(x)


def _call_factory(spec: str) -> nn.Module:
    """The factory's network, built on the meta device."""
    factory = load_factory(spec)
    with torch.device("meta"):
        try:
            net = factory()
        except Exception as exc:  # noqa: BLE001 - user code: report it in one line
            raise ConfigError(f"--factory {spec}: calling it failed ({type(exc).__name__}: {exc})") from None
    if not isinstance(net, nn.Module):
        raise ConfigError(f"--factory {spec} returned {type(net).__name__}, not an nn.Module")
    return net


def build_factory_module(spec: str, input_shape: Sequence[int], out_channels: int) -> TimeAdapter:
    """Call the factory on the meta device and check, with one meta forward, that it maps
    (1, C, D, H, W) to (1, N, D, H, W)."""
    net = _call_factory(spec)
    model = TimeAdapter(net, takes_time(net))
    x = torch.empty(1, *input_shape, device="meta")
    try:
        with torch.no_grad():
            y = model(x, torch.empty(1, device="meta"))
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--factory {spec}: forward of an input {tuple(x.shape)} failed ({first})") from None
    expected = (1, out_channels, *input_shape[1:])
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != expected:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ConfigError(
            f"--factory {spec}: output {got} for input {tuple(x.shape)}; expected {expected} (--output-channels {out_channels})"
        )
    return model


def factory_overrides(input_shape: Sequence[int], out_channels: int) -> list[str]:
    c, d, h, w = input_shape
    if out_channels > c:
        raise ConfigError(
            f"--output-channels {out_channels} is more than the {c} input channels: the training step "
            "feeds the noised target (N channels) plus conditions (C - N) to the network"
        )
    mode = "seg" if out_channels == c else "bravo"
    return [
        "space=pixel",
        f"mode={mode}",
        f"model.in_channels={c}",
        f"model.out_channels={out_channels}",
        f"data.shape=[{d},{h},{w}]",
    ]


def plan_factory(
    spec: str,
    input_shape: Sequence[int],
    out_channels: int | None = None,
    overrides: Sequence[str] = (),
    files: Sequence[str] = (),
    gpu_memory_bytes: int | None = None,
    world_size: int = 1,
    output_shape: Sequence[int] | None = None,
):
    """Plan of one training step of the factory's network; `overrides` set batch size, precision...;
    per rank of `world_size` processes when more than one. With `output_shape` (D, H, W) the network
    regresses a volume from `input_shape` (C, H, W) images."""
    from voxgen.config import compose
    from voxgen.memory.planner import DEFAULT_GPU_MEMORY, plan

    if output_shape is not None:
        shape_overrides = regression_overrides(input_shape, output_shape)
        model = build_regression_module(spec, input_shape, output_shape)
    else:
        out_channels = input_shape[0] if out_channels is None else out_channels
        shape_overrides = factory_overrides(input_shape, out_channels)  # checks the channels first
        model = build_factory_module(spec, input_shape, out_channels)
    cfg = compose(files, [*overrides, *shape_overrides], network=False)
    gpu = DEFAULT_GPU_MEMORY if gpu_memory_bytes is None else gpu_memory_bytes
    result = plan(cfg, gpu, model=model, world_size=world_size)
    return dataclasses.replace(result, model=spec)
