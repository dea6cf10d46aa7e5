"""Usage charts as SVG, drawn on the server (pure): one metric per day, the plan's quota as a labelled
line, every bar titled with its day and value. No script and no library: the page's CSP allows none
from elsewhere, and an SVG reads without a legend."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from html import escape

WIDTH, HEIGHT = 600, 200
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 28, 28


@dataclass(frozen=True)
class Series:
    """One chart: a value per day, and the quota it is measured against (None: no quota)."""

    title: str
    unit: str
    points: Sequence[tuple[date, float]]
    quota: float | None = None
    cumulative: bool = False  # a period's total so far (traffic, API calls), not a day's value
    # Where the first bar's day starts when not at midnight UTC: a billing period that starts within it.
    since: datetime | None = None


def _day_label(series: Series, index: int, day: date) -> str:
    since = series.since.astimezone(UTC) if series.since is not None else None
    if index == 0 and since is not None and since.time() != time(0):
        return f"{day.isoformat()} from {since:%H:%M} UTC"
    return day.isoformat()


def _number(value: float) -> str:
    if value >= 100 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:,.2f}"


def _nice_top(value: float) -> float:
    """A round axis top at or above `value`."""
    if value <= 0:
        return 1.0
    magnitude = 10 ** (len(str(int(value))) - 1)
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude:
            return float(step * magnitude)
    return float(10 * magnitude)


def svg_chart(series: Series) -> str:
    """The chart as an `<svg>` element (escaped: safe to embed in a page as is)."""
    values = [value for _, value in series.points]
    top = _nice_top(max([*values, series.quota or 0.0, 0.0]) * 1.1)
    plot_width, plot_height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_width / max(len(values), 1)
    bar = max(slot * 0.7, 1.0)

    def y(value: float) -> float:
        return TOP + plot_height * (1 - value / top)

    title = escape(series.title)
    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="{title}">',
        f"<title>{title}</title>",
        f'<text class="chart-title" x="{LEFT}" y="16">{title} ({escape(series.unit)})</text>',
        f'<line class="axis" x1="{LEFT}" y1="{TOP + plot_height}" '
        f'x2="{WIDTH - RIGHT}" y2="{TOP + plot_height}"/>',
        f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_height}"/>',
        f'<text class="tick" x="{LEFT - 6}" y="{TOP + 4}" text-anchor="end">{_number(top)}</text>',
        f'<text class="tick" x="{LEFT - 6}" y="{TOP + plot_height}" text-anchor="end">0</text>',
    ]
    for index, (day, value) in enumerate(series.points):
        x = LEFT + index * slot + (slot - bar) / 2
        over = series.quota is not None and value > series.quota
        parts.append(
            f'<rect class="bar{" over" if over else ""}" x="{x:.1f}" y="{y(value):.1f}" '
            f'width="{bar:.1f}" height="{TOP + plot_height - y(value):.1f}">'
            f"<title>{_day_label(series, index, day)}: {_number(value)} {escape(series.unit)}</title></rect>"
        )
    if series.points:
        first, last = series.points[0][0], series.points[-1][0]
        parts.append(f'<text class="tick" x="{LEFT}" y="{HEIGHT - 8}">{first.isoformat()}</text>')
        parts.append(
            f'<text class="tick" x="{WIDTH - RIGHT}" y="{HEIGHT - 8}" '
            f'text-anchor="end">{last.isoformat()}</text>'
        )
    if series.quota is not None:
        quota_y = y(series.quota)
        parts.append(
            f'<line class="quota" x1="{LEFT}" y1="{quota_y:.1f}" x2="{WIDTH - RIGHT}" y2="{quota_y:.1f}"/>'
        )
        parts.append(
            f'<text class="quota-label" x="{WIDTH - RIGHT - 4}" y="{quota_y - 4:.1f}" text-anchor="end">'
            f"plan quota {_number(series.quota)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def running_total(points: Sequence[tuple[date, float]], days: Sequence[date]) -> list[tuple[date, float]]:
    """The total so far on each of `days` (a billing period's, in order): a day without a point keeps the
    total; a point on another day is not the period's and is left out."""
    by_day: defaultdict[date, float] = defaultdict(float)
    for day, value in points:
        by_day[day] += value
    total, result = 0.0, []
    for day in days:
        total += by_day.get(day, 0.0)
        result.append((day, total))
    return result


__all__ = ["Series", "running_total", "svg_chart"]
