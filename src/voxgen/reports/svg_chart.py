"""Line charts and an event track as inline SVG, on one shared step axis.

The run report stacks several charts (losses, learning rate, gradient norm) above a track of
guard events. Every chart here has the same width, margins and step range, so a step sits at
the same horizontal position in each of them and an event lines up with the curves it explains.
No JavaScript and no matplotlib: an SVG string is small, sharp at any zoom, and its elements
(`class="guard-event rollback" data-step="14"`) can be found by a test or a script.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from voxgen.reports.html_parts import esc

WIDTH = 880
LEFT, RIGHT, TOP, BOTTOM = 70, 16, 40, 24
CHART_HEIGHT = 190
ROW_HEIGHT = 18

# Colours of curves, in order; events have their own per kind.
PALETTE = ("#1f6fb4", "#e07b13", "#2b9a48", "#c8383a", "#7a52b3", "#8c564b")
EVENT_COLOURS = {
    "nonfinite": "#c8383a",
    "spike": "#e07b13",
    "rollback": "#7a52b3",
    "rebaseline": "#168a8a",
    "low-spread": "#8c564b",
    "collapse": "#111111",
    "diverged": "#111111",
    "failed": "#111111",
}
EVENT_NAMES = {
    "nonfinite": "non-finite step skipped",
    "spike": "gradient spike skipped",
    "rollback": "rollback",
    "rebaseline": "spike baseline reset",
    "low-spread": "collapse check (low spread)",
    "collapse": "training collapsed",
    "diverged": "training diverged",
    "failed": "run failed",
}


@dataclass(frozen=True)
class Series:
    """One curve: (step, value) points; non-finite values leave a gap in the line."""

    label: str
    points: Sequence[tuple[int, float]]


@dataclass(frozen=True)
class Marker:
    """One event on the step axis: `kind` is a key of EVENT_COLOURS, `text` its tooltip."""

    step: int
    kind: str
    text: str
    count: int = 1


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + 1e-9 * step:
        ticks.append(0.0 if abs(value) < 1e-12 * step else value)
        value += step
    return ticks


def _fmt(value: float) -> str:
    return f"{value:.3g}"


class _StepAxis:
    """Step -> x pixel, the same for every chart of a report (same width, same range)."""

    def __init__(self, x_max: int) -> None:
        self.x_max = max(int(x_max), 1)

    def x(self, step: float) -> float:
        return LEFT + (WIDTH - LEFT - RIGHT) * float(step) / self.x_max

    def ticks(self) -> list[float]:
        return [t for t in nice_ticks(0, self.x_max, 8) if t == int(t)]


def _value_scale(series: Sequence[Series]) -> tuple[float, float, bool]:
    """(low, high, log) of the finite values: log when all are positive and span 30x or more,
    as losses and learning rates with warm-up do (a linear axis would flatten all but the start)."""
    values = [v for s in series for _, v in s.points if math.isfinite(v)]
    if not values:
        return 0.0, 1.0, False
    lo, hi = min(values), max(values)
    if lo > 0 and hi / lo >= 30:
        return math.log10(lo), math.log10(hi), True
    if hi == lo:
        pad = abs(hi) * 0.05 or 1.0
        return lo - pad, hi + pad, False
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad, False


def _y_ticks(lo: float, hi: float, log: bool) -> list[tuple[float, str]]:
    """(position in the scale's units, label) of the value axis."""
    if not log:
        return [(t, _fmt(t)) for t in nice_ticks(lo, hi, 4)]
    decades = range(math.floor(lo), math.ceil(hi) + 1)
    ticks = [(float(d), _fmt(10.0**d)) for d in decades if lo - 1e-9 <= d <= hi + 1e-9]
    if len(ticks) < 2:  # less than a decade: plain ticks, still placed on the log scale
        return [(math.log10(t), _fmt(t)) for t in nice_ticks(10**lo, 10**hi, 4) if t > 0]
    return ticks


def _segments(points: Sequence[tuple[int, float]]) -> list[list[tuple[int, float]]]:
    """Runs of consecutive finite points (sorted by step): a non-finite value cuts the line."""
    out: list[list[tuple[int, float]]] = [[]]
    for step, value in sorted(points, key=lambda p: p[0]):
        if math.isfinite(value):
            out[-1].append((step, value))
        elif out[-1]:
            out.append([])
    return [s for s in out if s]


def _step_axis_svg(axis: _StepAxis, bottom: float, top: float) -> list[str]:
    parts = [f'<line class="axis" x1="{LEFT}" y1="{bottom:.1f}" x2="{WIDTH - RIGHT}" y2="{bottom:.1f}"/>']
    for t in axis.ticks():
        x = axis.x(t)
        parts.append(f'<line class="grid" x1="{x:.1f}" y1="{top:.1f}" x2="{x:.1f}" y2="{bottom:.1f}"/>')
        parts.append(f'<text class="tick" x="{x:.1f}" y="{bottom + 14:.1f}" text-anchor="middle">{int(t)}</text>')
    return parts


def line_chart(title: str, series: Sequence[Series], x_max: int, markers: Sequence[Marker] = ()) -> str:
    """An SVG line chart of `series` over steps 0..x_max, with a faint vertical line per marker.

    The lines carry `class="event-line KIND"`; the markers themselves (the elements a reader
    or a test looks for) are drawn once, by `event_track`.
    """
    axis = _StepAxis(x_max)
    lo, hi, log = _value_scale(series)
    top, bottom = TOP, CHART_HEIGHT - BOTTOM

    def y(value: float) -> float:
        v = math.log10(value) if log else value
        return bottom - (bottom - top) * (v - lo) / (hi - lo)

    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {CHART_HEIGHT}" width="100%" role="img" aria-label="{esc(title)}">',
        f'<text class="chart-title" x="{LEFT}" y="14">{esc(title)}{" (log scale)" if log else ""}</text>',
    ]
    for position, label in _y_ticks(lo, hi, log):
        py = bottom - (bottom - top) * (position - lo) / (hi - lo)
        parts.append(f'<line class="grid" x1="{LEFT}" y1="{py:.1f}" x2="{WIDTH - RIGHT}" y2="{py:.1f}"/>')
        parts.append(f'<text class="tick" x="{LEFT - 6}" y="{py + 4:.1f}" text-anchor="end">{esc(label)}</text>')
    parts += _step_axis_svg(axis, bottom, top)
    parts.append(f'<line class="axis" x1="{LEFT}" y1="{top}" x2="{LEFT}" y2="{bottom}"/>')
    for m in markers:
        x = axis.x(m.step)
        colour = EVENT_COLOURS.get(m.kind, "#555")
        parts.append(
            f'<line class="event-line {esc(m.kind)}" data-step="{m.step}" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" '
            f'y2="{bottom}" stroke="{colour}"/>'
        )
    # The legend has a row of its own under the title, right-aligned, so a long title never covers it.
    legend_x = WIDTH - RIGHT
    for i, s in reversed(list(enumerate(series))):
        colour = PALETTE[i % len(PALETTE)]
        finite = [(st, v) for st, v in s.points if math.isfinite(v)]
        last = f": {_fmt(finite[-1][1])} at step {finite[-1][0]}" if finite else ": no finite value"
        label = f"{s.label}{last}"
        width = 7 * len(label) + 18
        legend_x -= width
        parts.append(
            f'<g class="legend"><rect x="{legend_x:.0f}" y="22" width="10" height="3" fill="{colour}"/>'
            f'<text x="{legend_x + 14:.0f}" y="28">{esc(label)}</text></g>'
        )
        for segment in _segments(s.points):
            if log:
                segment = [(st, v) for st, v in segment if v > 0]
            if not segment:
                continue
            coords = " ".join(f"{axis.x(st):.1f},{y(v):.1f}" for st, v in segment)
            if len(segment) == 1:
                st, v = segment[0]
                parts.append(f'<circle class="point" cx="{axis.x(st):.1f}" cy="{y(v):.1f}" r="2.5" fill="{colour}"/>')
            else:
                parts.append(f'<polyline class="curve" data-label="{esc(s.label)}" points="{coords}" stroke="{colour}"/>')
    parts.append("</svg>")
    return "\n".join(parts)


def _glyph(kind: str, x: float, y: float) -> str:
    """A small shape per kind, so events read apart without colour too."""
    colour = EVENT_COLOURS.get(kind, "#555")
    if kind == "rollback":  # a left-pointing triangle: training went back
        return f'<path d="M{x + 5:.1f},{y - 6:.1f} L{x - 6:.1f},{y:.1f} L{x + 5:.1f},{y + 6:.1f} Z" fill="{colour}"/>'
    if kind in ("nonfinite", "collapse", "diverged", "failed"):  # a cross
        return (
            f'<path d="M{x - 5:.1f},{y - 5:.1f} L{x + 5:.1f},{y + 5:.1f} M{x - 5:.1f},{y + 5:.1f} L{x + 5:.1f},{y - 5:.1f}" '
            f'stroke="{colour}" stroke-width="2.5"/>'
        )
    if kind == "spike":  # an upward triangle
        return f'<path d="M{x:.1f},{y - 6:.1f} L{x + 6:.1f},{y + 5:.1f} L{x - 6:.1f},{y + 5:.1f} Z" fill="{colour}"/>'
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{colour}"/>'


def event_track(markers: Sequence[Marker], x_max: int) -> str:
    """One row per kind of event, each event a glyph at its step with a tooltip.

    Each event is `<g class="guard-event KIND" data-step="STEP" data-count="N">`.
    """
    axis = _StepAxis(x_max)
    kinds = [k for k in EVENT_COLOURS if any(m.kind == k for m in markers)]
    kinds += sorted({m.kind for m in markers} - set(kinds))
    rows = max(len(kinds), 1)
    top = 22
    bottom = top + ROW_HEIGHT * rows + 6
    height = bottom + BOTTOM
    parts = [
        f'<svg class="chart event-track" viewBox="0 0 {WIDTH} {height}" width="100%" role="img" aria-label="guard events">',
        f'<text class="chart-title" x="{LEFT}" y="14">Guard events ({len(markers)})</text>',
    ]
    parts += _step_axis_svg(axis, bottom, top)
    if not markers:
        parts.append(f'<text class="tick" x="{LEFT + 8}" y="{top + 12}">none: no step was skipped or rolled back</text>')
    for row, kind in enumerate(kinds):
        cy = top + ROW_HEIGHT * row + ROW_HEIGHT / 2
        parts.append(f'<text class="tick" x="{LEFT - 6}" y="{cy + 4:.1f}" text-anchor="end">{esc(kind)}</text>')
        for m in (m for m in markers if m.kind == kind):
            x = axis.x(m.step)
            times = f" (x{m.count})" if m.count > 1 else ""
            tip = f"step {m.step}: {EVENT_NAMES.get(kind, kind)}{times}. {m.text}"
            parts.append(
                f'<g class="guard-event {esc(kind)}" data-step="{m.step}" data-count="{m.count}">'
                f"<title>{esc(tip)}</title>{_glyph(kind, x, cy)}</g>"
            )
    parts.append("</svg>")
    return "\n".join(parts)
