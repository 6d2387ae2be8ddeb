"""The memory planner: allocation bookkeeping by hand, GPU semantics, and whole-step plans."""

from __future__ import annotations

import resource

import pytest
import torch
import torch.nn.functional as F

from voxgen.config import compose
from voxgen.errors import ConfigError
from voxgen.memory.cuda_emulation import CudaSemantics, cuda_autocast
from voxgen.memory.planner import GiB, conv_required_bytes, conv_workspace_bytes, parse_memory, plan
from voxgen.memory.tracker import AllocationTracker, block_bytes

TINY = [
    "model.channels=[16,32]",
    "model.attention_levels=[false,true]",
    "model.num_head_channels=16",
    "model.norm_num_groups=8",
    "data.shape=[8,16,16]",
    "training.batch_size=1",
]


def test_tracker_counts_live_blocks_rounded_to_512_bytes():
    with AllocationTracker() as tracker:
        a = torch.empty(1000, device="meta")  # 4000 B -> 4096
        b = a * 2  # another 4096
        del a  # freed: 4096 live
        c = b[:10]  # a view allocates nothing
        d = torch.empty(1, device="meta")  # 4 B -> 512
    assert tracker.peak.bytes == 8192 and tracker.live == 4096 + 512
    assert block_bytes(0) == 0 and block_bytes(513) == 1024
    del b, c, d


def test_foreach_adamw_first_step_needs_five_copies_of_the_parameters():
    with torch.device("meta"):
        lin = torch.nn.Linear(256, 256, bias=False)  # 262144 B of weight
    opt = torch.optim.AdamW(lin.parameters(), foreach=True)
    with AllocationTracker() as tracker:
        tracker.register(lin.weight)
        lin.weight.grad = torch.empty_like(lin.weight)
        opt.step()
    # weight + grad + exp_avg + exp_avg_sq + the sqrt(exp_avg_sq) temporary
    assert tracker.peak.bytes == 5 * 262144


def test_cuda_autocast_policy_runs_norms_in_fp32_and_convs_in_bf16():
    x = torch.empty(1, 8, 4, 4, 4, device="meta")
    w = torch.empty(8, 8, 3, 3, 3, device="meta")
    with CudaSemantics(), cuda_autocast(torch.bfloat16):
        h = F.conv3d(x, w, padding=1)
        g = F.group_norm(h, 4)
        s = torch.softmax(h, dim=-1)
    assert (h.dtype, g.dtype, s.dtype) == (torch.bfloat16, torch.float32, torch.float32)


def test_sdpa_takes_the_fused_kernel_without_an_n_by_n_matrix():
    q = torch.empty(1, 2, 4096, 32, device="meta", dtype=torch.bfloat16)
    with CudaSemantics(), AllocationTracker() as tracker:
        out = F.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape
    assert tracker.peak.bytes < 4096 * 4096 * 2  # a materialised matrix would be 64 MiB for one head


def test_conv_workspace_prefers_the_unfolded_input_and_requires_input_plus_output():
    assert conv_workspace_bytes((1, 64, 8, 8, 8), (32, 64, 3, 3, 3), (1, 32, 8, 8, 8), 2) == 64 * 27 * 512 * 2
    assert conv_workspace_bytes((1, 64, 8, 8, 8), (32, 64, 1, 1, 1), (1, 32, 8, 8, 8), 2) == 0
    assert conv_required_bytes((1, 64, 8, 8, 8), (32, 64, 3, 3, 3), (1, 32, 8, 8, 8), 2) == (64 + 32) * 512 * 2
    assert conv_required_bytes((1, 64, 8, 8, 8), (32, 64, 1, 1, 1), (1, 32, 8, 8, 8), 2) == 0


def test_a_full_resolution_autoencoder_fits_on_its_required_workspaces():
    """The seeds' 4x VQ-VAE at 160x256x256 needs 40.8 GiB (measured on an H200: 40.78 GiB allocated,
    48.52 reserved) but would peak at 159 GiB if every convolution got cuDNN's preferred im2col
    workspace: PyTorch falls back to smaller workspaces when those do not fit, so the verdict is
    judged on the required figure and its reserved replay."""
    cfg = compose(["configs/autoencoders/vqvae_4x.yaml"], [])
    p = plan(cfg, 80 * GiB)
    assert p.required_bytes / GiB == pytest.approx(40.78, rel=0.02)
    assert p.reserved_bytes / GiB == pytest.approx(48.52, rel=0.03)
    assert p.peak_bytes > 3 * p.required_bytes
    assert p.verdict == "fits" and p.band_bytes[2] < 60 * GiB


def test_parse_memory():
    assert parse_memory("80GB") == 80 * GiB and parse_memory("512MiB") == 512 * 2**20 and parse_memory("2097152") == 2 * 2**20
    # A size without its unit is bytes: under 1 MiB it is refused, naming the likely meaning.
    with pytest.raises(ConfigError, match=r"^--gpu-memory '141' is 141 bytes, less than 1 MiB: give a unit, like 141GB$"):
        parse_memory("141")


@pytest.fixture(scope="module")
def tiny_plans():
    return {
        "fp32": plan(compose([], TINY + ["training.precision=fp32"])),
        "bf16": plan(compose([], TINY + ["training.precision=bf16-mixed"])),
    }


def test_plan_breakdown_adds_up_and_steady_state_includes_the_optimizer(tiny_plans):
    p = tiny_plans["fp32"]
    assert sum(p.breakdown.values()) == p.peak_bytes
    assert sum(p.breakdown_first_step.values()) == p.peak_bytes_first_step
    assert p.peak_bytes >= p.peak_bytes_first_step
    assert p.breakdown["optimizer"] == 2 * p.breakdown["parameters"]  # AdamW: exp_avg + exp_avg_sq
    assert p.breakdown["parameters"] >= 4 * p.params and p.fits and p.peak_phase in ("forward", "backward", "optimizer")


def test_a_fused_optimizer_plans_within_the_foreach_one(tiny_plans):
    """The fused AdamW kernel refuses meta tensors; the planner traces the per-tensor loop for it,
    whose temporaries are fewer than foreach's (one parameter's at a time)."""
    fused = plan(compose([], TINY + ["training.precision=fp32", "training.fused_optimizer=true"]))
    foreach = tiny_plans["fp32"]
    assert fused.breakdown["optimizer"] == foreach.breakdown["optimizer"]
    assert fused.breakdown["activations"] <= foreach.breakdown["activations"]
    assert fused.peak_bytes_first_step <= foreach.peak_bytes_first_step


def test_bf16_lowers_activations(tiny_plans):
    assert tiny_plans["bf16"].breakdown_first_step["activations"] < tiny_plans["fp32"].breakdown_first_step["activations"]


DIT = ["model.name=dit", "model.variant=S", "model.patch_size=2", "data.shape=[16,32,32]"]


@pytest.mark.parametrize("model", [TINY, TINY + DIT], ids=["unet", "dit"])
@pytest.mark.parametrize("precision", ["bf16-mixed", "fp32"])
def test_grad_checkpointing_lowers_activations(model, precision):
    # In bf16 the recompute must run under the GPU emulation again (autocast), or the traced
    # convs/linears meet bf16 inputs and fp32 weights and the plan fails.
    plans = [
        plan(compose([], model + [f"training.precision={precision}", f"training.grad_checkpointing={on}"]))
        for on in ("false", "true")
    ]
    assert plans[1].breakdown_first_step["activations"] < 0.7 * plans[0].breakdown_first_step["activations"]
    assert plans[1].peak_bytes_first_step < plans[0].peak_bytes_first_step


def test_softmax_backward_counts_the_grad_times_output_temporary():
    from voxgen.memory.planner import _kernel_workspaces

    def peak(on_op):
        x = torch.empty(1, 4, 256, 256, device="meta", requires_grad=True)
        with AllocationTracker(on_op=on_op) as tracker:
            y = torch.softmax(x, dim=-1)
            y.backward(torch.empty_like(y))
        return tracker.peak.bytes

    with_tmp, without = peak(_kernel_workspaces), peak(None)
    assert with_tmp - without == 4 * 256 * 256 * 4  # one fp32 N x N per head


def test_fits_follows_the_gpu_memory():
    p = plan(compose([], TINY), gpu_memory_bytes=2**20)
    assert not p.fits and p.gpu_memory_bytes == 2**20


def test_a_3_5b_parameter_unet_plans_without_allocating_it():
    cfg = compose(
        [],
        [
            "model.channels=[256,512,1024,2048]",
            "model.attention_levels=[false,false,true,true]",
            "model.num_res_blocks=3",
            "model.num_head_channels=64",
            "model.norm_num_groups=32",
            "model.in_channels=8",
            "model.out_channels=4",
            "model.attention=naive",
            "data.shape=[40,64,64]",
            "training.batch_size=1",
            "training.precision=bf16-mixed",
        ],
    )
    p = plan(cfg)
    assert abs(p.params / 1e6 - 3477.6) < 0.1  # unet3d_latent_a100.csv, 4L_large_d
    assert p.peak_bytes_first_step > 5 * 4 * p.params  # params, grads, two AdamW states, one temporary
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 < 4 * GiB


def test_qk_norm_keeps_about_14_bytes_per_token_channel_and_block():
    """Under bf16 on a GPU QK-norm keeps fp32 q and k for the norms (8 B), the normalised bf16 q and k
    for the kernel (4 B), a copy of the attention output for the projection (2 B: the kernel's
    output is head-major once q is dense), and the norms' statistics (16 B per head)."""
    base = [
        "mode=seg",
        "model.name=dit",
        "model.variant=S",
        "model.patch_size=2",
        "data.shape=[16,32,32]",
        "model.in_channels=1",
        "model.out_channels=1",
        "training.batch_size=1",
        "training.precision=bf16-mixed",
    ]
    on, off = (plan(compose([], [*base, f"model.qk_norm={flag}"])) for flag in ("true", "false"))
    tokens, width, blocks, head_dim = 8 * 16 * 16, 384, 12, 64
    extra = on.breakdown_first_step["activations"] - off.breakdown_first_step["activations"]
    assert extra / (tokens * width * blocks) == pytest.approx(14 + 16 / head_dim, rel=0.03)


def test_monai_materialised_attention_keeps_6_bytes_per_score_and_peaks_at_16_in_backward():
    """MONAI's naive attention (SABlock) under bf16 autocast on a GPU, per score (token pair and
    head), counted by hand: the forward keeps the fp32 softmax output (4 B; softmax runs in fp32
    under CUDA autocast) and the bf16 copy of it that the value matmul casts and saves (2 B).
    Its transient peak is 10 B: the bf16 scaled scores (2), their fp32 cast (4) and the softmax
    output (4). The backward peaks at 16 B, in the softmax backward: the saved output (4), the
    incoming fp32 gradient (4), the grad*output temporary of the CUDA kernel (4) and its result
    (4). The attention block of a MONAI UNet built by voxgen, at its second level: 16^3 = 4,096
    tokens, 2 heads of 32 channels."""
    from monai.networks.blocks.spatialattention import SpatialAttentionBlock

    from voxgen.diffusion.parts import build_parts
    from voxgen.memory.planner import _kernel_workspaces

    channels, side = 64, 16
    cfg = compose(
        [],
        [
            "data.shape=[32,32,32]",
            "model.channels=[32,64]",
            "model.attention_levels=[false,true]",
            "model.num_head_channels=32",
            "model.norm_num_groups=32",
            "model.attention=naive",
        ],
    )
    with torch.device("meta"):
        unet = build_parts(cfg, "meta").model
        block = next(m for m in unet.modules() if isinstance(m, SpatialAttentionBlock))
        x = torch.empty(1, channels, side, side, side, requires_grad=True)
    scores = (side**3) ** 2 * (channels // 32)
    saved = []

    def pack(t):
        if t.numel() >= scores:
            saved.append((t.dtype, t.numel()))
        return t

    tracker = AllocationTracker(on_op=_kernel_workspaces)
    tracker.register(x, "input")
    for p in block.parameters():
        tracker.register(p, "parameters")
    before = tracker.live
    with CudaSemantics(), tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with cuda_autocast(torch.bfloat16):
            y = block(x)
        kept = tracker.live - before
        forward_peak = tracker.peak.bytes - before
        tracker.set_phase("backward")
        tracker.reset_peak()
        y.float().sum().backward()
    assert sorted(saved, key=str) == [(torch.bfloat16, scores), (torch.float32, scores)]
    # Everything else the block keeps grows with tokens x channels: under 3% here.
    assert kept / scores == pytest.approx(6, rel=0.03)
    assert forward_peak / scores == pytest.approx(10, rel=0.03)
    assert (tracker.peak.bytes - before) / scores == pytest.approx(16, rel=0.03)
    assert tracker.peak.where.startswith("SoftmaxBackward0")


def test_plan_json_carries_verdict_band_and_versions():
    cfg = compose(
        [],
        [
            "data.shape=[16,16,16]",
            "model.channels=[8,16]",
            "model.attention_levels=[false,true]",
            "model.num_head_channels=8",
            "model.norm_num_groups=4",
            "model.attention=naive",
        ],
    )
    p = plan(cfg, 80 * GiB)
    low, expected, high = p.band_bytes
    assert low < expected <= high and expected == max(p.required_bytes, p.reserved_bytes)
    assert p.required_bytes <= p.peak_bytes
    assert p.verdict == "fits" and p.fits and p.error_class == "activations" and p.attention_tokens == 512
    assert p.versions["torch"] == torch.__version__ and "monai" in p.versions
    # The same step on a GPU whose usable memory lies inside the band is tight; below it, does not fit.
    from voxgen.memory.planner import CONTEXT_BYTES, DRIVER_SHARE

    def gpu_for(usable):
        return int((usable + CONTEXT_BYTES) / (1 - DRIVER_SHARE)) + 1

    assert plan(cfg, gpu_for((expected + high) // 2)).verdict == "tight"
    tiny = plan(cfg, gpu_for(low // 2))
    assert tiny.verdict == "does not fit" and not tiny.fits
