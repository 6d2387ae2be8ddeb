"""DRRs: closed-form line integrals of a sphere and a cube, cone-beam magnification, flips, bad geometry."""

from __future__ import annotations

import time

import numpy as np
import pytest

from voxgen.data.ct import MU_WATER_PER_MM
from voxgen.data.drr import (
    VIEWS,
    Geometry,
    detector_pixels,
    fitted,
    isocentre,
    line_integrals,
    project_point,
    render,
    source_position,
)
from voxgen.errors import ConfigError, DataError

# A short source distance makes the cone beam's perspective strong: magnification 2 at the isocentre.
CONE = Geometry(sid=300.0, sdd=600.0, rows=96, cols=96)


def _grid(shape_dhw, spacing_xyz=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Axis-aligned RAS affine with the volume's centre at the world origin."""
    spacing = np.asarray(spacing_xyz, dtype=np.float64)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -spacing * (np.array(shape_dhw[::-1]) - 1) / 2.0
    return affine


def _rays(shape, affine, geometry, view) -> tuple[np.ndarray, np.ndarray]:
    """The view's source (3,) and the vectors from it to every pixel centre (rows, cols, 3), in world mm."""
    source = source_position(shape, affine, geometry, view)
    return source, detector_pixels(shape, affine, geometry, view) - source


def sphere_fraction(n: int, radius: float, centre, subsamples: int = 16) -> np.ndarray:
    """(n, n, n) fraction of each 1 mm voxel inside a sphere (world mm, volume centred at 0).

    Exact along z (the chord of each sub-column), `subsamples`^2 sub-columns per voxel in x and y;
    computed only for voxels the surface can cross (within sqrt(3) / 2 of it).
    """
    idx = np.arange(n) - (n - 1) / 2.0
    cx, cy, cz = centre
    z, y, x = np.meshgrid(idx - cz, idx - cy, idx - cx, indexing="ij", sparse=True)
    r = np.sqrt(x * x + y * y + z * z)
    frac = (r < radius).astype(np.float64)
    edge = np.nonzero(np.abs(r - radius) < 0.9)
    sub = (np.arange(subsamples) + 0.5) / subsamples - 0.5
    ez = (idx[edge[0]] - cz)[:, None, None]
    ey = (idx[edge[1]] - cy)[:, None, None] + sub[None, :, None]
    ex = (idx[edge[2]] - cx)[:, None, None] + sub[None, None, :]
    half = np.sqrt(np.clip(radius**2 - ex**2 - ey**2, 0.0, None))
    frac[edge] = np.clip(np.minimum(ez + 0.5, half) - np.maximum(ez - 0.5, -half), 0.0, 1.0).mean(axis=(1, 2))
    return frac


def test_water_sphere_integrals_match_the_closed_form_inside_the_projection():
    """A water sphere (0 HU in -1000 HU air), radius 44 mm in a 96^3 volume of 1 mm voxels, off the grid.

    The exact line integral is mu_water * 2 sqrt(R^2 - b^2), b the ray's distance from the centre.
    Inside the projection = rays passing within R / 2 of the centre (chord >= sqrt(3) R = 76 voxels,
    >= 22 voxels inside the silhouette): there the voxelisation's partial volumes, not the projector,
    set the error (measured max 3.6e-4 AP, 4.1e-4 lateral). Near the silhouette the voxelised surface
    is no sphere (1e-3 at b = 0.7 R), so it is left out; rays clear of the voxelised sphere read 0.
    """
    n, radius, centre = 96, 44.0, np.array([1.3, -2.7, 0.6])
    hu = (sphere_fraction(n, radius, centre) * 1000.0 - 1000.0).astype(np.float32)
    affine = _grid(hu.shape)
    geometry = fitted(hu.shape, affine, CONE)
    views = render(hu, affine, geometry)
    assert views.shape == (2, 96, 96) and views.dtype == np.float32
    for image, view in zip(views, VIEWS):
        source, rays = _rays(hu.shape, affine, geometry, view)
        unit = rays / np.linalg.norm(rays, axis=-1, keepdims=True)
        to_centre = centre - source
        b = np.sqrt(np.clip(to_centre @ to_centre - (unit @ to_centre) ** 2, 0.0, None))
        chord = 2.0 * np.sqrt(np.clip(radius**2 - b**2, 0.0, None))
        inside = b <= radius / 2.0
        assert inside.sum() > 1000
        error = np.abs(image[inside] / MU_WATER_PER_MM - chord[inside]) / chord[inside]
        assert error.max() <= 1e-3, f"{view}: max relative error {error.max():.2e}"
        # Partial volumes reach 0.87 voxel beyond the surface, bilinear sampling one voxel more.
        assert np.all(image[b >= radius + 2.5] == 0.0)


def _box_chords(source, rays, low, high) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each ray enters and leaves an axis-aligned box (0 at the source, 1 at the pixel), and its chord (mm)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (low - source) / rays, (high - source) / rays
    enter, leave = np.minimum(t1, t2).max(axis=-1), np.maximum(t1, t2).min(axis=-1)
    return enter, leave, np.clip(leave - enter, 0.0, None) * np.linalg.norm(rays, axis=-1)


def test_cube_integrals_are_exact_away_from_its_edges_whatever_the_voxel_axes():
    """A 40 mm cube (mu 0.02 / mm) on voxels of 0.8 x 1.0 x 1.25 mm, off-centre, its faces on voxel faces.

    The exact integral is mu times the ray's chord through the cube. Trilinear interpolation keeps each
    face a ramp symmetric about it (no change to a crossing ray's integral) but rounds the cube's
    edges where two ramps meet. Inside the projection = pixels whose ray's chord is >= 10 mm and
    that never come within one voxel (on each axis) of two faces at once, anywhere in the volume:
    there the error must be <= 1e-3 (measured 8.5e-5 AP, 4.8e-5 lateral; 1e-7 for rays through the
    front and back faces). The same cube stored with x running right to left gives the same DRRs.
    """
    shape, spacing = (48, 60, 75), np.array([0.8, 1.0, 1.25])
    low_index, high_index = np.array([10, 8, 6]), np.array([60, 48, 38])  # voxel ranges [low, high) on (x, y, z)
    mu = np.zeros(shape)
    mu[low_index[2] : high_index[2], low_index[1] : high_index[1], low_index[0] : high_index[0]] = 0.02
    affine = _grid(shape, spacing)
    low, high = affine[:3, :3] @ (low_index - 0.5) + affine[:3, 3], affine[:3, :3] @ (high_index - 0.5) + affine[:3, 3]
    assert np.allclose(high - low, 40.0)
    volume_low, volume_high = affine[:3, 3] - spacing / 2, affine[:3, :3] @ (np.array(shape[::-1]) - 0.5) + affine[:3, 3]
    geometry = fitted(shape, affine, CONE)
    views = line_integrals(mu, affine, geometry)
    for image, view in zip(views, VIEWS):
        source, rays = _rays(shape, affine, geometry, view)
        _, _, chord = _box_chords(source, rays, low, high)
        enter, leave, _ = _box_chords(source, rays, volume_low, volume_high)
        t = enter[..., None] + (leave - enter)[..., None] * np.linspace(0.0, 1.0, 601)
        points = source + t[..., None] * rays[..., None, :]  # (rows, cols, 601, 3) along each ray in the volume
        near_face = (np.abs(points - low) < spacing) | (np.abs(points - high) < spacing)
        near_edge = (near_face.sum(axis=-1) >= 2).any(axis=-1)
        inside = (chord >= 10.0) & ~near_edge
        assert inside.sum() > 2000
        error = np.abs(image[inside] / 0.02 - chord[inside]) / chord[inside]
        assert error.max() <= 1e-3, f"{view}: max relative error {error.max():.2e}"
        # Interpolation spreads each face over one voxel: rays clear of the cube grown by a voxel read 0.
        assert np.all(image[_box_chords(source, rays, low - spacing, high + spacing)[2] == 0] == 0.0)
    mirrored = affine.copy()
    mirrored[0, 0], mirrored[0, 3] = -affine[0, 0], -affine[0, 3]  # x index now runs from the right
    assert np.allclose(line_integrals(mu[:, :, ::-1].copy(), mirrored, geometry), views, rtol=1e-5, atol=1e-6)


def test_a_small_object_lands_where_the_cone_beam_magnifies_it():
    """A 3 mm ball 25 mm right, 30 mm anterior and 20 mm below the isocentre: each view puts it at
    sdd / depth times its offset, depth its distance from that view's source along the beam."""
    n, offset = 80, np.array([25.0, 30.0, -20.0])
    mu = sphere_fraction(n, 3.0, offset) * 0.05
    affine = _grid(mu.shape)
    geometry = fitted(mu.shape, affine, CONE)
    views = line_integrals(mu, affine, geometry)
    centre = ((geometry.rows - 1) / 2.0, (geometry.cols - 1) / 2.0)
    sdd, sid, pixel = geometry.sdd, geometry.sid, geometry.spacing
    # AP: source anterior (+y); columns along +x, rows along +z. Lateral: source at the right (+x); columns along +y.
    ap_depth, lateral_depth = sid - offset[1], sid - offset[0]
    expected = {
        "ap": (centre[0] + sdd * offset[2] / ap_depth / pixel, centre[1] + sdd * offset[0] / ap_depth / pixel),
        "lateral": (centre[0] + sdd * offset[2] / lateral_depth / pixel, centre[1] + sdd * offset[1] / lateral_depth / pixel),
    }
    found = {}
    for image, view in zip(views, VIEWS):
        rows, cols = np.indices(image.shape)
        found[view] = ((image * rows).sum() / image.sum(), (image * cols).sum() / image.sum())
        assert found[view] == pytest.approx(expected[view], abs=0.05), view
        assert project_point(offset, mu.shape, affine, geometry, view) == pytest.approx(expected[view], abs=1e-9)
    # A parallel beam (or the isocentre's magnification at every depth) would put it pixels away.
    assert abs(found["ap"][1] - (centre[1] + sdd / sid * offset[0] / pixel)) > 2.5
    # The ball is nearer the AP source (270 mm) than the lateral one (275 mm): the AP view magnifies it more.
    assert found["ap"][0] < found["lateral"][0] - 0.3


def test_vertical_flip_reverses_the_rows_and_the_isocentre_is_the_volume_centre():
    mu = np.zeros((20, 24, 28))
    mu[3:9, 10:14, 12:20] = 0.03  # near the bottom: an asymmetric image
    affine = _grid(mu.shape, (1.0, 1.5, 2.0))
    affine[:3, 3] += [40.0, -7.0, 12.5]  # the isocentre follows the volume, wherever it lies
    assert isocentre(mu.shape, affine) == pytest.approx([40.0, -7.0, 12.5])
    plain = line_integrals(mu, affine, Geometry(rows=30, cols=34))
    flipped = line_integrals(mu, affine, Geometry(rows=30, cols=34, vertical_flip=True))
    assert np.array_equal(flipped, plain[:, ::-1, :])
    # Inferior anatomy sits in the low rows without the flip, in the high rows with it.
    rows = np.arange(30)[:, None]
    assert (plain[0] * rows).sum() / plain[0].sum() < 12 < (flipped[0] * rows).sum() / flipped[0].sum()


def test_hounsfield_units_become_attenuation_clamped_at_air():
    hu = np.full((16, 16, 16), -3000.0, dtype=np.float32)  # scanner padding: below air, must add nothing
    assert np.all(render(hu, _grid(hu.shape), Geometry(rows=8, cols=8)) == 0.0)
    hu[:, :, :] = 1000.0  # twice water's attenuation through 16 mm, along the central rays
    views = render(hu, _grid(hu.shape), Geometry(rows=9, cols=9))
    assert views[:, 4, 4] == pytest.approx(2 * MU_WATER_PER_MM * 16.0, rel=1e-5)


def test_a_64_cube_renders_to_two_128_views_well_under_a_second():
    hu = np.random.default_rng(0).normal(0.0, 300.0, (64, 64, 64)).astype(np.float32)
    affine = _grid(hu.shape)
    render(hu, affine, Geometry(rows=8, cols=8))  # imports and first-call set-up
    start = time.perf_counter()
    views = render(hu, affine, Geometry(rows=128, cols=128))
    assert views.shape == (2, 128, 128)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    "geometry, error, match",
    [
        (Geometry(sid=10.0, sdd=600.0), ConfigError, "sid: the source .* lies inside the volume"),
        (Geometry(sid=300.0, sdd=310.0), ConfigError, "sdd: the detector .* cuts through the volume"),
        (Geometry(sid=300.0, sdd=200.0), ConfigError, "sdd: the detector .* must lie beyond the isocentre"),
        (Geometry(rows=32, cols=32, spacing=0.5), ConfigError, "spacing: .* smaller than the volume's shadow"),
        (Geometry(sid=0.0), ConfigError, "sid: must be a positive"),
        (Geometry(sdd=float("nan")), ConfigError, "sdd: must be a positive"),
        (Geometry(rows=0), ConfigError, "rows: the detector needs at least 1 pixel"),
        (Geometry(spacing=-1.0), ConfigError, "spacing: detector pixel spacing must be a positive"),
    ],
)
def test_impossible_geometries_are_one_line_errors(geometry, error, match):
    mu = np.ones((32, 32, 32))
    with pytest.raises(error, match=match) as caught:
        line_integrals(mu, _grid(mu.shape), geometry)
    assert "\n" not in str(caught.value)


def test_a_volume_without_geometry_or_with_bad_voxels_is_a_data_error():
    mu = np.ones((8, 8, 8))
    flat = _grid(mu.shape)
    flat[:3, 2] = flat[:3, 0]  # z runs along x: the voxel axes span a plane
    for affine in (flat, np.zeros((4, 4))):
        with pytest.raises(DataError, match="affine is not invertible"):
            render(mu, affine)
    mu[2, 3, 4] = np.nan
    with pytest.raises(DataError, match="1 NaN or Inf voxels"):
        line_integrals(mu, _grid(mu.shape), Geometry())
