"""The report of a real (tiny) quickstart run, opened in headless Chromium with the network off.

Chromium is Debian's (/usr/bin/chromium, which .ci/run installs), driven by Playwright's Python
API; Playwright's own browsers are never downloaded. WebGL2, which NiiVue needs, comes from
SwiftShader (software rendering), so no GPU is involved.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from rich.console import Console

from voxgen.reports.viewer import HEADLESS_CHROMIUM, HEADLESS_CHROMIUM_ARGS, NIIVUE_BUNDLE

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra)")

CHROMIUM = Path(HEADLESS_CHROMIUM)
ARGS = list(HEADLESS_CHROMIUM_ARGS)
# The quickstart, shrunk to seconds: 16^3 volumes, a two-level UNet, 4 steps, 2 sampler steps.
TINY_QUICKSTART = [
    "data.shape=[16,16,16]",
    "model.channels=[8,16]",
    "model.attention_levels=[false,true]",
    "model.num_head_channels=8",
    "model.norm_num_groups=4",
    "training.steps=4",
    "training.warmup_steps=1",
    "training.val_every=2",
    "training.checkpoint_every=2",
    "training.log_every=1",
    "training.val_batches=1",
    "sample.steps=2",
]

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} not installed (.ci/run installs it with apt-get when it can)"),
    pytest.mark.skipif(not NIIVUE_BUNDLE.is_file(), reason=f"NiiVue not installed: npm ci --prefix {NIIVUE_BUNDLE.parents[3]}"),
]


def _wait_for(page, expression: str, timeout: float = 60.0) -> None:
    """Poll a JavaScript expression until it is truthy. Not page.wait_for_function: Playwright
    polls that with eval inside the page, which the report's Content-Security-Policy forbids."""
    end = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < end, f"timed out after {timeout} s waiting for {expression}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    from voxgen.quickstart import quickstart
    from voxgen.reports.run_report import write_run_report

    out = tmp_path_factory.mktemp("quickstart")
    quickstart(out, overrides=TINY_QUICKSTART, cases=6, console=Console(file=io.StringIO()))
    return write_run_report(out / "run", samples_dir=out / "samples")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield launched
        launched.close()


def test_the_report_opens_offline_and_each_slider_moves_its_slices(report, browser, tmp_path):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    refused: list[str] = []

    def only_local(route) -> None:
        # file:// is the page itself; data: and blob: URLs are made inside it. Anything else would
        # be the network, which a report opened from a USB stick does not have.
        if route.request.url.startswith(("file:", "data:", "blob:")):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    context.route("**/*", only_local)
    context.set_offline(True)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))

    began = time.perf_counter()
    page.goto(report.resolve().as_uri(), wait_until="load")
    _wait_for(page, "window.voxgenViewer && (window.voxgenViewer.ready || window.voxgenViewer.error)")
    open_seconds = time.perf_counter() - began
    assert page.evaluate("window.voxgenViewer.error") is None
    assert page.evaluate("window.voxgenViewer.views.length") == 2  # the sample and the held-out case
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    print(f"report {report.stat().st_size / 2**20:.2f} MiB, viewer ready {open_seconds:.2f} s after navigation")

    views = [page.locator("#view-sample"), page.locator("#view-real")]
    for plane in ("axial", "coronal", "sagittal"):
        slider = page.locator(f"#slice-{plane}")
        before = [v.screenshot() for v in views]
        top = int(slider.get_attribute("max"))
        slider.fill(str(top // 4))  # from the middle slice to a quarter of the way
        _wait_for(page, f"document.getElementById('slice-{plane}-value').textContent.startsWith('{top // 4} /')")
        after = [v.screenshot() for v in views]
        for name, a, b in zip(("sample", "real case"), before, after):
            changed = a != b  # PNG bytes of the canvas: equal bytes, equal pixels
            assert changed, f"moving the {plane} slider left the {name} view as it was"
    # Another sample replaces the first in its view; the real case stays.
    before = [v.screenshot() for v in views]
    page.select_option("#viewer-sample", "1")
    _wait_for(page, "(window.voxgenViewer.views[0].volumes[0] || {name: ''}).name.startsWith('sample_001')")
    after = [v.screenshot() for v in views]
    assert before[0] != after[0] and before[1] == after[1]
    assert errors == [] and refused == []
    assert open_seconds < 30
    context.close()
