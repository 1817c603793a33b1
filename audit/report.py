"""``pgwarden audit report --html``: one self-contained page (no scripts, no external files)
with an inline SVG plot of labelled rows per person over time and a table of blocked
statements, for attaching to an incident ticket."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def _minute_key(m: str) -> float:
    """``2026-11-02T09:01`` (UTC) -> epoch seconds."""
    return datetime.strptime(m[:16], "%Y-%m-%dT%H:%M").replace(tzinfo=UTC).timestamp()


# The plot's time step: the finest that keeps it to at most _MAX_STEPS points a person, so a
# 20-minute incident is drawn per minute and a week per hour or day.
_STEPS = [(60, "minute"), (600, "10 minutes"), (3600, "hour"), (86400, "day")]
_MAX_STEPS = 300


def _step(t0: float, t1: float) -> tuple[int, str]:
    for step, name in _STEPS:
        if (t1 - t0) / step <= _MAX_STEPS:
            return step, name
    return _STEPS[-1]


def svg_plot(
    points: Sequence[dict[str, Any]], *, width: int = 900, height: int = 320, top_n: int = 8
) -> str:
    """Labelled rows per person over time as an SVG line chart (top ``top_n`` people).

    ``points`` are per person and UTC minute (``minute``: ``2026-11-02T09:01``); they are
    added up per step (minute, 10 minutes, hour or day, whichever keeps the plot readable)
    and placed on the x axis by their time, so three reads in one hour are three columns."""
    if not points:
        return '<p class="empty">No labelled rows were read in this window.</p>'
    times = [_minute_key(str(p["minute"])) for p in points]
    step, unit = _step(min(times), max(times))
    series: dict[str, dict[float, int]] = defaultdict(lambda: defaultdict(int))
    for p, t in zip(points, times, strict=True):
        series[str(p["person"])][t - t % step] += int(p["labelled_rows"])
    totals = sorted(series, key=lambda k: -sum(series[k].values()))[:top_n]
    slots = sorted({t for s in totals for t in series[s]})
    ymax = max(v for s in totals for v in series[s].values()) or 1
    ml, mr, mt, mb = 70, 160, 20, 50
    pw, ph = width - ml - mr, height - mt - mb
    t0, t1 = slots[0], slots[-1]

    def x(t: float) -> float:
        # one step alone is drawn in the middle, not on the left edge
        return ml + ((t - t0) / (t1 - t0) * pw if t1 > t0 else pw / 2)

    def y(v: int) -> float:
        return mt + ph - v / ymax * ph

    def label(t: float) -> str:
        fmt = "%Y-%m-%d" if step >= 86400 else "%Y-%m-%d %H:%M"
        return datetime.fromtimestamp(t, UTC).strftime(fmt)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="labelled rows per person per {unit}">',
        f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>',
    ]
    for i in range(5):
        v = round(ymax * i / 4)
        out.append(
            f'<text x="{ml - 6}" y="{y(v) + 4:.1f}" font-size="11" text-anchor="end">{v}</text>'
            f'<line x1="{ml}" x2="{ml + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>'
        )
    for t in sorted({slots[0], slots[len(slots) // 2], slots[-1]}):
        out.append(
            f'<text x="{x(t):.1f}" y="{mt + ph + 18}" font-size="11" text-anchor="middle">'
            f"{label(t)}</text>"
        )
    out.append(
        f'<text x="{ml + pw / 2}" y="{height - 8}" font-size="12" '
        f'text-anchor="middle">{unit} (UTC)</text>'
    )
    for i, person in enumerate(totals):
        colour = _PALETTE[i % len(_PALETTE)]
        mine = series[person]
        pts = " ".join(f"{x(t):.1f},{y(mine.get(t, 0)):.1f}" for t in slots)
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>')
        for t in slots:
            if t in mine:
                out.append(
                    f'<circle cx="{x(t):.1f}" cy="{y(mine[t]):.1f}" r="3" fill="{colour}">'
                    f"<title>{escape(person)} {label(t)}: {mine[t]} rows</title></circle>"
                )
        ly = mt + 14 + i * 18
        out.append(
            f'<rect x="{ml + pw + 12}" y="{ly - 9}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{ml + pw + 28}" y="{ly}" font-size="12">{escape(person)}</text>'
        )
    out.append("</svg>")
    return "".join(out)


_TOP_COLS = [
    "person", "distinct_records", "labelled_bytes", "labelled_rows", "statements", "blocks",
    "sessions",
]  # fmt: skip
_BLOCKED_COLS = [
    "ts", "person", "db_user", "client_addr", "application", "statement", "rule_ids", "message",
    "sqlstate",
]  # fmt: skip


def _table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> str:
    if not rows:
        return '<p class="empty">None.</p>'
    head = "".join(f"<th>{escape(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if isinstance(v, list):
                v = ", ".join(map(str, v))
            cells.append(f"<td>{escape('' if v is None else str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(
    *,
    title: str,
    window: str,
    plot_points: Sequence[dict[str, Any]],
    top_rows: Sequence[dict[str, Any]],
    blocked_rows: Sequence[dict[str, Any]],
    verify_summary: str,
) -> str:
    """The whole report page."""
    for r in blocked_rows:
        r.setdefault("person", r.get("end_user") or r.get("db_user"))
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<title>{escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }} .empty {{ color: #777; }} code {{ font-size: 12px; }}
</style></head><body>
<h1>{escape(title)}</h1>
<p>Window: {escape(window)}. Generated {escape(generated)}.</p>
<p>Chain verification: {escape(verify_summary)}</p>
<h2>Labelled rows read per person over time (UTC)</h2>
{svg_plot(plot_points)}
<h2>Who read the most labelled records</h2>
{_table(top_rows, _TOP_COLS)}
<h2>Blocked statements</h2>
{_table(blocked_rows, _BLOCKED_COLS)}
</body></html>
"""
