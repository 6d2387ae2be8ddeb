"""The report's 3-plane volume viewer: NiiVue (@niivue/niivue), inlined into the page.

NiiVue is pinned in `web/package.json` / `web/package-lock.json` and installed by `make install`
(`npm ci --prefix src/voxgen/reports/web`). Its `dist/niivue.umd.js` is one self-contained
browser bundle (its dependencies are bundled in; it defines the global `niivue`), so the page
inlines it in a classic <script> and needs no module loader and no network.

Volumes travel inside the page as base64 NIfTI (.nii.gz) bytes, which NiiVue decodes from memory
(`NVImage.loadFromBase64`): no file is fetched. To keep a report small they are stored as 8-bit
voxels: images scaled over their own range (scl_slope / scl_inter keep the values NiiVue shows
in the volume's units, to 1/255 of its range), masks as 0/1.

Two NiiVue views (a sample, and a held-out real case) show axial, coronal and sagittal slices;
three sliders, one per plane, move both to the same fraction of their grids.
"""

from __future__ import annotations

import base64
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from voxgen.errors import VoxgenError
from voxgen.reports.html_parts import Raw, esc, inline_script

WEB = Path(__file__).parent / "web"
NIIVUE_PACKAGE = WEB / "node_modules" / "@niivue" / "niivue"
NIIVUE_BUNDLE = NIIVUE_PACKAGE / "dist" / "niivue.umd.js"


class ViewerMissing(VoxgenError):
    """The NiiVue bundle the report inlines is not installed (npm was not run)."""


def niivue_bundle(path: Path | None = None) -> tuple[str, str]:
    """(source of the NiiVue browser bundle, its version); ViewerMissing when it is not installed."""
    path = NIIVUE_BUNDLE if path is None else path
    if not path.is_file():
        raise ViewerMissing(
            f"{path}: the report's volume viewer (NiiVue) is not installed; "
            f"install it with `npm ci --prefix {WEB}` (Node.js and npm needed; `make install` runs it when npm is present)"
        )
    try:
        version = json.loads((path.parents[1] / "package.json").read_text()).get("version", "?")
    except (OSError, ValueError):
        version = "?"
    return path.read_text(encoding="utf-8"), str(version)


def nifti_base64(volume: np.ndarray, affine: np.ndarray, is_mask: bool) -> str:
    """A (D, H, W) RAS volume as base64 of an 8-bit .nii.gz (see the module doc).

    affine: (4, 4) for the (x, y, z) = (W, H, D) voxel axes, as `voxgen.data.nifti.load_volume` returns it.
    """
    import nibabel as nib

    xyz = np.ascontiguousarray(np.asarray(volume, dtype=np.float32).transpose(2, 1, 0))
    if is_mask:
        data, slope, inter = (xyz > 0.5).astype(np.uint8), 1.0, 0.0
    else:
        lo, hi = float(xyz.min()), float(xyz.max())
        span = hi - lo if hi > lo else 1.0
        data = np.clip(np.rint((xyz - lo) / span * 255.0), 0, 255).astype(np.uint8)
        slope, inter = span / 255.0, lo
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.header.set_slope_inter(slope, inter)
    img.header.set_xyzt_units("mm")
    # mtime=0: the same volume gives the same bytes, so reports of one run compare equal.
    return base64.b64encode(gzip.compress(img.to_bytes(), compresslevel=9, mtime=0)).decode("ascii")


@dataclass
class Layer:
    """One volume of a view: the image (grey) or a mask shown over it in colour."""

    name: str
    base64: str
    is_mask: bool


@dataclass
class ViewCase:
    """What one view shows: a label, an image and its mask overlays, and the grid (D, H, W)."""

    label: str
    shape: tuple[int, int, int]
    layers: list[Layer] = field(default_factory=list)

    def to_json(self) -> dict:
        layers = [
            {"name": f"{layer.name}.nii.gz", "base64": layer.base64, "mask": layer.is_mask}
            for layer in sorted(self.layers, key=lambda layer: layer.is_mask)  # the image first: NiiVue's background
        ]
        return {"label": self.label, "shape": list(self.shape), "layers": layers}


# How a report is opened without a screen (tools/screenshot_report.py, the browser test): Debian's
# Chromium, headless and quiet: no sandbox (containers run as root), no GPU, nothing phoned home;
# WebGL2 from SwiftShader through ANGLE (newer Chromium refuses software WebGL without the last flag).
HEADLESS_CHROMIUM = "/usr/bin/chromium"
HEADLESS_CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
)

# Drives the two NiiVue views from the three sliders; its state is on window.voxgenViewer
# (ready, error, openMs) so that a person, or a test, can tell when the page is usable.
CONTROLLER = r"""
(function () {
  "use strict";
  const state = { ready: false, error: null, openMs: null, views: [] };
  window.voxgenViewer = state;
  const status = document.getElementById("viewer-status");
  const data = JSON.parse(document.getElementById("viewer-data").textContent);
  // NiiVue's crosshair fractions are in (x, y, z) = (sagittal, coronal, axial) order; our grids are (D, H, W).
  const planes = [["sagittal", 2], ["coronal", 1], ["axial", 0]];
  const sliders = planes.map(([name]) => document.getElementById("slice-" + name));
  const labels = planes.map(([name]) => document.getElementById("slice-" + name + "-value"));

  function fail(error) {
    state.error = String(error && error.message ? error.message : error);
    status.textContent = "viewer error: " + state.error;
    console.error("voxgen viewer:", error);
  }

  async function makeView(canvas) {
    const nv = new niivue.Niivue({
      isResizeCanvas: true, show3Dcrosshair: false, crosshairWidth: 0, logLevel: "error",
      multiplanarShowRender: niivue.SHOW_RENDER.NEVER, multiplanarLayout: niivue.MULTIPLANAR_TYPE.ROW,
      backColor: [0, 0, 0, 1], isOrientCube: false
    });
    await nv.attachToCanvas(canvas);
    nv.setSliceType(niivue.SLICE_TYPE.MULTIPLANAR);
    return nv;
  }

  async function show(nv, entry) {
    while (nv.volumes.length) nv.removeVolumeByIndex(nv.volumes.length - 1);
    for (const layer of entry.layers) {
      const options = {
        base64: layer.base64, name: layer.name, colormap: layer.mask ? "red" : "gray", opacity: layer.mask ? 0.55 : 1
      };
      if (layer.mask) { options.cal_min = 0.5; options.cal_max = 1; }
      nv.addVolume(await niivue.NVImage.loadFromBase64(options));
    }
  }

  function place() {
    const fractions = planes.map(([, axis], i) => (Number(sliders[i].value) + 0.5) / (Number(sliders[i].max) + 1));
    planes.forEach(([, axis], i) => { labels[i].textContent = sliders[i].value + " / " + sliders[i].max; });
    for (const nv of state.views) {
      nv.scene.crosshairPos = fractions.slice();
      nv.drawScene();
    }
  }

  function follow(nv) {
    // A click or scroll inside a view moves the slices: the sliders follow it.
    nv.onLocationChange = () => {
      const pos = nv.scene.crosshairPos;
      planes.forEach(([, axis], i) => {
        const max = Number(sliders[i].max);
        sliders[i].value = String(Math.min(max, Math.max(0, Math.floor(pos[i] * (max + 1)))));
      });
      place();
    };
  }

  async function start() {
    const shape = data.samples.length ? data.samples[0].shape : data.real.shape;
    planes.forEach(([, axis], i) => {
      sliders[i].max = String(shape[axis] - 1);
      sliders[i].value = String(Math.floor(shape[axis] / 2));
    });
    // Both views start together: their volumes decode while the other view's WebGL sets up.
    const [sampleView, realView] = await Promise.all([
      makeView(document.getElementById("view-sample")),
      data.real ? makeView(document.getElementById("view-real")) : null
    ]);
    state.views.push(sampleView);
    if (realView) state.views.push(realView);
    await Promise.all([show(sampleView, data.samples[0]), realView ? show(realView, data.real) : null]);
    state.views.forEach(follow);
    sliders.forEach((s) => s.addEventListener("input", place));
    const choice = document.getElementById("viewer-sample");
    choice.addEventListener("change", () => {
      show(sampleView, data.samples[Number(choice.value)]).then(place).catch(fail);
    });
    place();
    state.ready = true;
    state.openMs = performance.now();
    document.body.dataset.viewerReady = "1";
    status.textContent = "";
  }

  if (typeof niivue === "undefined") { fail("the NiiVue bundle did not load"); return; }
  start().catch(fail);
})();
"""


def viewer_section(samples: list[ViewCase], real: ViewCase | None, bundle: str, version: str) -> tuple[Raw, list[str]]:
    """(HTML of the viewer, the <script> elements the page ends with). `samples` must not be empty."""
    options = "".join(f'<option value="{i}">{esc(case.label)}</option>' for i, case in enumerate(samples))
    real_pane = (
        f'<div class="viewer-pane"><h3>held-out real case: {esc(real.label)}</h3>'
        '<div class="viewer-canvas"><canvas id="view-real"></canvas></div></div>'
        if real is not None
        else '<div class="viewer-pane"><h3>held-out real case</h3><p class="note">none found (data.root/test)</p></div>'
    )
    sliders = "".join(
        f'<label for="slice-{name}">{name}</label><input type="range" id="slice-{name}" class="slice-slider" '
        f'data-plane="{name}" min="0" max="1" value="0" step="1"><span id="slice-{name}-value" class="mono"></span>'
        for name in ("axial", "coronal", "sagittal")
    )
    html = (
        f'<div id="viewer"><p><label>sample <select id="viewer-sample">{options}</select></label> '
        '<span class="note">masks in red; click or scroll in a view to move the slices. '
        # The bundle is redistributed inside every page: its licence notice travels with it.
        f"Viewer: NiiVue {esc(version)} (BSD-2-Clause, the NiiVue authors), included in this page.</span></p>"
        '<div class="viewer-grid"><div class="viewer-pane"><h3>generated sample</h3>'
        '<div class="viewer-canvas"><canvas id="view-sample"></canvas></div></div>'
        f"{real_pane}</div>"
        f'<div class="sliders">{sliders}</div><p id="viewer-status">loading the viewer...</p></div>'
    )
    payload = {"samples": [c.to_json() for c in samples], "real": real.to_json() if real is not None else None}
    # JSON inside a script element: "</" must not appear as such (see inline_script).
    text = json.dumps(payload, separators=(",", ":")).replace("</", "<\\/")
    scripts = [
        f'<script type="application/json" id="viewer-data">{text}</script>',
        inline_script(bundle),
        inline_script(CONTROLLER),
    ]
    return Raw(html), scripts
