"""Calls per day as a small SVG bar chart, drawn on the server (no script, no CDN).

Presentation attributes only (no `style`): the console's CSP allows no inline styles.
"""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape

DAY = 86_400
WIDTH, HEIGHT, AXIS = 640, 150, 22


def _day(day_number: int) -> str:
    return datetime.fromtimestamp(day_number * DAY, UTC).strftime("%Y-%m-%d")


def calls_per_day_svg(counts: dict[int, int], first_day: int, days: int, title: str) -> str:
    """One bar per day from `first_day` (a unix day number) for `days` days."""
    peak = max((counts.get(first_day + i, 0) for i in range(days)), default=0)
    slot = WIDTH / max(1, days)
    plot = HEIGHT - AXIS
    bars = []
    for index in range(days):
        day = first_day + index
        count = counts.get(day, 0)
        height = 0.0 if not peak else max(1.0, plot * count / peak) if count else 0.0
        x = index * slot + slot * 0.1
        bars.append(
            f'<rect class="bar" x="{x:.1f}" y="{plot - height:.1f}" width="{slot * 0.8:.1f}"'
            f' height="{height:.1f}" fill="#2f6f9f"><title>{_day(day)}: {count} call(s)'
            "</title></rect>"
        )
    total = sum(counts.get(first_day + i, 0) for i in range(days))
    label = escape(
        f"{title}: {total} call(s) from {_day(first_day)} to {_day(first_day + days - 1)}"
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" aria-label="{label}"'
        f' viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}">'
        f"<title>{label}</title>"
        f'<line x1="0" y1="{plot}" x2="{WIDTH}" y2="{plot}" stroke="#888" stroke-width="1"/>'
        + "".join(bars)
        + f'<text x="0" y="{HEIGHT - 6}" font-size="11" fill="#444">{_day(first_day)}</text>'
        f'<text x="{WIDTH}" y="{HEIGHT - 6}" font-size="11" fill="#444"'
        f' text-anchor="end">{_day(first_day + days - 1)}</text>'
        f'<text x="4" y="12" font-size="11" fill="#444">max {peak}/day</text>'
        "</svg>"
    )
