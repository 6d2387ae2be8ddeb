"""Render a `voxgen report` page in headless Chromium and save a PNG of it.

    python tools/screenshot_report.py REPORT.html [OUT.png] [--width 1280] [--full-page]

Opens the page from its file:// URL with every other request refused (the page must need
none), waits for the load event and, when the page has a volume viewer, for it to be ready,
then writes the screenshot (default docs/img/report_quickstart.png). Prints the open time and
fails (exit 1) on any console error, page error or refused request.

Needs Playwright's Python package (the `dev` extra) and Debian's Chromium at /usr/bin/chromium
(`apt-get install chromium`, or --chromium PATH); Playwright's own browsers are not used.
WebGL2 comes from SwiftShader, Chromium's software renderer, so no GPU is needed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from voxgen.reports.viewer import HEADLESS_CHROMIUM, HEADLESS_CHROMIUM_ARGS

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "img" / "report_quickstart.png"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("out", type=Path, nargs="?", default=OUT)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--full-page", action="store_true", help="the whole page, not the first screen")
    parser.add_argument("--section", metavar="ID", help="only this section of the page, e.g. samples or curves")
    parser.add_argument("--chromium", default=HEADLESS_CHROMIUM)
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    url = args.report.resolve().as_uri()
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=list(HEADLESS_CHROMIUM_ARGS))
        context = browser.new_context(viewport={"width": args.width, "height": args.height})

        def refuse(route) -> None:
            if route.request.url.startswith(("file:", "data:", "blob:")):
                route.continue_()
            else:
                problems.append(f"request refused: {route.request.url}")
                route.abort()

        context.route("**/*", refuse)
        page = context.new_page()
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
        began = time.perf_counter()
        page.goto(url, wait_until="load")
        loaded = time.perf_counter() - began
        ready = None
        if page.query_selector("#viewer") is not None:
            # Polled from here: page.wait_for_function evaluates strings inside the page, which the
            # report's Content-Security-Policy (no eval) refuses.
            end = time.monotonic() + 60
            while not page.evaluate("!!(window.voxgenViewer && (window.voxgenViewer.ready || window.voxgenViewer.error))"):
                if time.monotonic() > end:
                    problems.append("viewer: not ready after 60 s")
                    break
                time.sleep(0.02)
            ready = time.perf_counter() - began
            error = page.evaluate("window.voxgenViewer.error")
            if error:
                problems.append(f"viewer: {error}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.section:
            page.locator(f"section#{args.section}").screenshot(path=str(args.out))
        else:
            page.screenshot(path=str(args.out), full_page=args.full_page)
        browser.close()
    size = args.report.stat().st_size / 2**20
    viewer = f", viewer ready after {ready:.2f} s" if ready is not None else ""
    print(f"{args.report} ({size:.1f} MiB): load event after {loaded:.2f} s{viewer}; screenshot {args.out}")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
