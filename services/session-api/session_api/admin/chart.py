"""Payments per minute over the last hour as an SVG bar chart, drawn on the server (no
script, no library: the page's CSP admits neither inline code nor other origins)."""

from __future__ import annotations

from datetime import timedelta

from shared.i18n import Language

from .overview import MINUTES, Overview
from .render import Console, esc, number, when

WIDTH, HEIGHT = 640, 180
LEFT, RIGHT, TOP, BOTTOM = 40, 8, 12, 28
BAR_GAP = 2
BAR_FILL = "#0b5cad"
AXIS = "#4a5360"
GRID = "#d5dae0"


def summary(console: Console, language: Language, overview: Overview) -> str:
    counts = overview.per_minute
    if counts is None:
        return console.text(language, "chart.unavailable")
    return console.text(
        language,
        "chart.summary",
        count=number(language, sum(counts)),
        max=number(language, max(counts)),
    )


def payments_svg(console: Console, language: Language, overview: Overview) -> str:
    """The chart: one bar a minute, oldest left, the running minute right; the tallest bar
    (at least 1) reaches the top line, whose count is written beside it."""
    counts = overview.per_minute or (0,) * MINUTES
    top = max(1, *counts)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / MINUTES
    first = overview.last_minute - timedelta(minutes=MINUTES - 1)
    bars = []
    for i, n in enumerate(counts):
        h = plot_h * n / top
        minute = when(language, first + timedelta(minutes=i))
        label = console.text(language, "chart.bar", time=minute, count=number(language, n))
        bars.append(
            f'<rect class="bar" data-count="{n}" x="{LEFT + i * step + BAR_GAP / 2:.1f}" '
            f'y="{TOP + plot_h - h:.1f}" width="{step - BAR_GAP:.1f}" height="{h:.1f}" '
            f'fill="{BAR_FILL}"><title>{esc(label)}</title></rect>'
        )
    base = TOP + plot_h
    text = f'font-family="sans-serif" font-size="11" fill="{AXIS}"'
    title = esc(summary(console, language, overview))
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{title}">'
        f"<title>{title}</title>"
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>'
        f'<line x1="{LEFT}" y1="{TOP}" x2="{WIDTH - RIGHT}" y2="{TOP}" stroke="{GRID}"/>'
        f'<text x="{LEFT - 6}" y="{TOP + 4}" text-anchor="end" {text}>'
        f"{number(language, top)}</text>"
        f'<text x="{LEFT - 6}" y="{base}" text-anchor="end" {text}>0</text>'
        + "".join(bars)
        + f'<line x1="{LEFT}" y1="{base}" x2="{WIDTH - RIGHT}" y2="{base}" stroke="{AXIS}"/>'
        f'<text x="{LEFT}" y="{HEIGHT - 8}" {text}>'
        f"{esc(console.text(language, 'chart.start'))}</text>"
        f'<text x="{WIDTH - RIGHT}" y="{HEIGHT - 8}" text-anchor="end" {text}>'
        f"{esc(console.text(language, 'chart.end'))}</text>"
        "</svg>"
    )
