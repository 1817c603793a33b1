"""``pgwarden audit report --html``: one self-contained page (no scripts, no external files)
for attaching to an incident ticket.

The page opens with the people ranked by the distinct labelled records they received (bytes
beside), an overview plot and everyone's blocked statements; each person then has a section
of their own (linked from the ranking): labelled rows received per minute by channel, the
distinct records received so far, their sessions, blocked attempts, canary hits and
quarantines on the same time axis, and the tables behind them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any

from audit.report_data import CHANNELS, OTHER, PersonReport, ReportData

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
# One colour per channel, the same in every person's plot.
_CHANNEL_COLOURS = dict(
    zip([*(name for name, _ in CHANNELS), OTHER],
        ["#4e79a7", "#76b7b2", "#59a14f", "#b07aa1", "#9c755f", "#bab0ac"], strict=True)
)  # fmt: skip
_BLOCK, _CANARY, _QUARANTINE = "#d62728", "#ff7f0e", "#6a3d9a"

Row = dict[str, Any]


def _minute_key(m: str) -> float:
    """``2026-11-02T09:01`` (UTC) -> epoch seconds."""
    return datetime.strptime(m[:16], "%Y-%m-%dT%H:%M").replace(tzinfo=UTC).timestamp()


def _ts_key(ts: str) -> float:
    """An event's ``ts`` (``2026-11-02T09:01:10.000000Z``) -> epoch seconds."""
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


# The plot's time step: the finest that keeps it to at most _MAX_STEPS columns, so a
# 20-minute incident is drawn per minute and a week per hour or day.
_STEPS = [(60, "minute"), (600, "10 minutes"), (3600, "hour"), (86400, "day")]
_MAX_STEPS = 300


def _step(t0: float, t1: float) -> tuple[int, str]:
    for step, name in _STEPS:
        if (t1 - t0) / step <= _MAX_STEPS:
            return step, name
    return _STEPS[-1]


def _nice_ticks(top: float, n: int = 4) -> list[int]:
    """0 and about ``n`` round values (1, 2 or 5 times a power of ten) up to at least ``top``:
    an axis whose labels never repeat, even when the largest value is 1."""
    top = max(top, 1)
    raw = top / n
    mag = 10 ** math.floor(math.log10(raw)) if raw >= 1 else 1
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    step = max(1, int(step))
    return list(range(0, math.ceil(top / step) * step + 1, step))


# Time-axis label spacing, in seconds: the finest that keeps labels at least ~100 px apart.
_TICKS = [60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800]


def _time_ticks(t0: float, t1: float, width: float) -> list[float]:
    most = max(2, int(width // 100))
    every = next((s for s in _TICKS if (t1 - t0) / s <= most), _TICKS[-1])
    first = math.ceil(t0 / every) * every
    return [float(t) for t in range(int(first), int(t1) + 1, every)]


def _time_label(t: float, t0: float, t1: float, every: float) -> str:
    fmt = "%Y-%m-%d" if every >= 86400 else "%H:%M"
    if every < 86400 and _day(t0) != _day(t1):
        fmt = "%m-%d %H:%M"
    return datetime.fromtimestamp(t, UTC).strftime(fmt)


def _day(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d")


def _n(v: float) -> str:
    return f"{int(v):,}"


def _bytes(v: float) -> str:
    """1536 -> '1.5 KiB' (the exact number goes in a tooltip beside)."""
    size = float(v)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _short(name: str, most: int = 22) -> str:
    return name if len(name) <= most else name[: most - 1] + "…"


# --- the overview: everyone on one time axis -------------------------------------------------


def svg_plot(
    points: Sequence[dict[str, Any]],
    *,
    width: int = 960,
    height: int = 320,
    top_n: int = 8,
    anchors: dict[str, str] | None = None,
    people: Sequence[str] | None = None,
) -> str:
    """Labelled rows per person over time as an SVG line chart (top ``top_n`` people).

    ``points`` are per person and UTC minute (``minute``: ``2026-11-02T09:01``); they are
    added up per step (minute, 10 minutes, hour or day, whichever keeps the plot readable)
    and placed on the x axis by their time, so three reads in one hour are three columns.
    ``anchors`` links a legend entry to that person's section; ``people``, when given, are
    the people to draw, in the order of the report's ranking (else the most rows first)."""
    if not points:
        return '<p class="empty">No labelled rows were read in this window.</p>'
    times = [_minute_key(str(p["minute"])) for p in points]
    step, unit = _step(min(times), max(times))
    series: dict[str, dict[float, int]] = defaultdict(lambda: defaultdict(int))
    for p, t in zip(points, times, strict=True):
        series[str(p["person"])][t - t % step] += int(p["labelled_rows"])
    ranked = [p for p in people if p in series] if people is not None else []
    totals = (ranked or sorted(series, key=lambda k: -sum(series[k].values())))[:top_n]
    slots = sorted({t for s in totals for t in series[s]})
    # headroom above the highest point, which would otherwise sit on the frame
    yticks = _nice_ticks(max(v for s in totals for v in series[s].values()) * 1.08)
    ymax = yticks[-1]
    ml, mr, mt, mb = 70, 190, 20, 50
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
        f'viewBox="0 0 {width} {height}" role="img" class="overview" '
        f'aria-label="labelled rows per person per {unit}">',
        f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>',
    ]
    for v in yticks:
        out.append(
            f'<text x="{ml - 6}" y="{y(v) + 4:.1f}" font-size="11" text-anchor="end">{_n(v)}</text>'
            f'<line x1="{ml}" x2="{ml + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>'
        )
    # first, middle and last column, but never two labels within 150 px of each other
    shown: list[float] = []
    for t in sorted({slots[0], slots[-1], slots[len(slots) // 2]}, key=lambda t: t != slots[0]):
        if all(abs(x(t) - x(s)) >= 150 for s in shown):
            shown.append(t)
    for t in shown:
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
        # back to zero a step before and after each read, inside the axis: an hour with
        # nothing read between two reads is drawn flat, not as a slope joining them
        drawn = sorted({t + d for t in mine for d in (-step, 0, step) if t0 <= t + d <= t1})
        pts = " ".join(f"{x(t):.1f},{y(mine.get(t, 0)):.1f}" for t in drawn)
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>')
        for t in slots:
            if t in mine:
                out.append(
                    f'<circle cx="{x(t):.1f}" cy="{y(mine[t]):.1f}" r="3" fill="{colour}">'
                    f"<title>{escape(person)} {label(t)}: {mine[t]} rows</title></circle>"
                )
        ly = mt + 14 + i * 18
        entry = (
            f'<rect x="{ml + pw + 12}" y="{ly - 9}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{ml + pw + 28}" y="{ly}" font-size="12">{escape(_short(person))}'
            f"<title>{escape(person)}</title></text>"
        )
        href = (anchors or {}).get(person)
        out.append(f'<a href="#{href}">{entry}</a>' if href else entry)
    out.append("</svg>")
    return "".join(out)


# --- one person ------------------------------------------------------------------------------


def person_plot(p: PersonReport, *, width: int = 960) -> str:
    """One SVG, three bands on one UTC time axis: labelled rows received per step by channel
    (stacked bars), the distinct records received so far (a step line), and the person's
    sessions with their blocked attempts, canary hits and quarantines."""
    blocks = [_ts_key(r["ts"]) for r in p.blocked if r.get("ts")]
    canaries = [_ts_key(r["ts"]) for r in p.canaries if r.get("ts")]
    quarantines = [_ts_key(r["ts"]) for r in p.quarantines if r.get("ts")]
    read_times = [_minute_key(m) for m, _ in p.received]
    moments = read_times + blocks + canaries + quarantines
    if not moments:
        return '<p class="empty">Nothing to draw: no labelled rows, blocks or alerts.</p>'
    step, unit = _step(min(moments), max(moments))
    lo = min(moments) - min(moments) % step
    hi = max(moments) - max(moments) % step + step
    # a step of room on either side, so the first read is not drawn on the axis itself; and
    # a short incident sits in the middle of an axis of at least 12 steps
    pad = max(1, (12 - (hi - lo) / step) // 2) * step
    lo, hi = lo - pad, hi + pad

    ml, mr = 80, 20
    pw = width - ml - mr
    # each band has its title above it, in the gap left for it
    bars_top, bars_h = 18, 170
    cum_top, cum_h = bars_top + bars_h + 24, 80
    lane_top = cum_top + cum_h + 24
    lane_h = 14
    session_lanes = _lanes(p.sessions, lo, hi)
    n_lanes = max(1, max((lane for _, _, lane, _ in session_lanes), default=0) + 1)
    marks_top = lane_top + n_lanes * (lane_h + 3) + 20
    axis_y = marks_top + 26
    height = axis_y + 40

    def x(t: float) -> float:
        return ml + (t - lo) / (hi - lo) * pw

    # stacked bars: labelled rows per step and channel
    stacks: dict[float, dict[str, Row]] = defaultdict(dict)
    for (minute, chan), r in p.received.items():
        t = _minute_key(minute)
        slot = stacks[t - t % step].setdefault(
            chan, {"statements": 0, "labelled_rows": 0, "labelled_bytes": 0, "errors": 0}
        )
        for k in slot:
            slot[k] += r[k]
    peak = max((sum(c["labelled_rows"] for c in s.values()) for s in stacks.values()), default=0)
    yticks = _nice_ticks(peak)

    def yb(v: float) -> float:
        return bars_top + bars_h - v / yticks[-1] * bars_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" class="person-plot" '
        f'aria-label="{escape(p.name)}: labelled rows per {unit} by channel, distinct records, '
        f'sessions and alerts">',
        f'<rect class="plot-area" x="{ml}" y="{bars_top}" width="{pw}" height="{bars_h}" '
        'fill="#fafafa" stroke="#ccc"/>',
        f'<rect x="{ml}" y="{cum_top}" width="{pw}" height="{cum_h}" fill="#fafafa" '
        'stroke="#ccc"/>',
    ]
    ticks = _time_ticks(lo, hi, pw)
    every = ticks[1] - ticks[0] if len(ticks) > 1 else float(step)
    for t in ticks:
        out.append(
            f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{bars_top}" y2="{axis_y - 10}" '
            'stroke="#e4e4e4"/>'
            f'<text class="x-label" x="{x(t):.1f}" y="{axis_y + 4}" font-size="11" '
            f'text-anchor="middle">{_time_label(t, lo, hi, every)}</text>'
        )
    days = sorted({_day(lo), _day(hi - 1)})
    out.append(
        f'<text x="{ml + pw / 2}" y="{axis_y + 26}" font-size="12" text-anchor="middle">'
        f"{' to '.join(days)}, UTC; one column per {unit}</text>"
    )
    for v in yticks:
        out.append(
            f'<line x1="{ml}" x2="{ml + pw}" y1="{yb(v):.1f}" y2="{yb(v):.1f}" stroke="#eee"/>'
            f'<text class="y-label" x="{ml - 6}" y="{yb(v) + 4:.1f}" font-size="11" '
            f'text-anchor="end">{_n(v)}</text>'
        )
    out.append(_band_title(f"labelled rows received per {unit}, by channel", ml, bars_top))
    bar_w = max(1.0, pw * step / (hi - lo) - 1)
    order = [*(name for name, _ in CHANNELS), OTHER]
    for t, chans in sorted(stacks.items()):
        base = 0
        for chan in order:
            c = chans.get(chan)
            if c is None:
                continue
            rows = c["labelled_rows"]
            tip = (
                f"{_stamp(t, step)}: {_n(rows)} labelled rows ({_bytes(c['labelled_bytes'])}) "
                f"by {chan}, {_n(c['statements'])} statement(s)"
                + (f", {_n(c['errors'])} ended in an error" if c["errors"] else "")
            )
            top = yb(base + rows)
            # a statement that returned nothing still shows: at least a 2 px sliver
            h = max(yb(base) - top, 2.0)
            out.append(
                f'<rect class="bar" data-channel="{escape(chan)}" x="{x(t) + 0.5:.1f}" '
                f'y="{yb(base) - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                f'fill="{_CHANNEL_COLOURS[chan]}"><title>{escape(tip)}</title></rect>'
            )
            base += rows

    # distinct records received so far
    total = sum(p.new_records.values())
    cticks = _nice_ticks(total, 2)

    def yc(v: float) -> float:
        return cum_top + cum_h - v / cticks[-1] * cum_h

    for v in cticks:
        out.append(
            f'<line x1="{ml}" x2="{ml + pw}" y1="{yc(v):.1f}" y2="{yc(v):.1f}" stroke="#eee"/>'
            f'<text class="y-label" x="{ml - 6}" y="{yc(v) + 4:.1f}" font-size="11" '
            f'text-anchor="end">{_n(v)}</text>'
        )
    out.append(_band_title("distinct records received so far", ml, cum_top))
    if total:
        so_far, pts = 0, [f"{x(lo):.1f},{yc(0):.1f}"]
        for m, new in sorted(p.new_records.items()):
            t = _minute_key(m)
            pts.append(f"{x(t):.1f},{yc(so_far):.1f}")
            so_far += new
            pts.append(f"{x(t):.1f},{yc(so_far):.1f}")
        pts.append(f"{x(hi):.1f},{yc(so_far):.1f}")
        out.append(
            f'<polyline class="records" fill="none" stroke="#333" stroke-width="2" '
            f'points="{" ".join(pts)}"><title>{_n(total)} distinct records by '
            f"{_stamp(hi - step, step)}</title></polyline>"
        )
    else:
        out.append(
            f'<text x="{ml + pw / 2}" y="{cum_top + cum_h / 2 + 4}" font-size="12" '
            'text-anchor="middle" fill="#777">no record keys in the ledger for this person</text>'
        )

    # sessions, then blocked attempts, canary hits and quarantines
    out.append(_band_title("sessions", ml, lane_top))
    for start, end, lane, s in session_lanes:
        yl = lane_top + lane * (lane_h + 3)
        w = max(x(end) - x(start), 3.0)
        tip = (
            f"session {s.get('session_id')} of {s.get('db_user')} from {s.get('client_addr')}: "
            f"{s.get('started')} to {s.get('last_seen')}"
        )
        out.append(
            f'<rect class="session" x="{x(start):.1f}" y="{yl}" width="{w:.1f}" '
            f'height="{lane_h}" rx="3" fill="#cfd8e3" stroke="#8da2bb">'
            f"<title>{escape(tip)}</title></rect>"
        )
    none = "" if blocks or canaries or quarantines else ": none"
    out.append(_band_title(f"blocked attempts, canary hits, quarantines{none}", ml, marks_top - 8))
    for times, rows, colour, what in (
        (blocks, p.blocked, _BLOCK, "blocked"),
        (canaries, p.canaries, _CANARY, "canary"),
        (quarantines, p.quarantines, _QUARANTINE, "quarantined"),
    ):
        for t, r in zip(times, [r for r in rows if r.get("ts")], strict=True):
            cx = x(t)
            tip = f"{r['ts']} {what}: {r.get('message') or r.get('statement') or ''}"
            if what != "blocked":  # rare and decisive: a line through the bands
                out.append(
                    f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{bars_top}" y2="{marks_top}" '
                    f'stroke="{colour}" stroke-dasharray="4 3"/>'
                )
            out.append(
                f'<path class="mark {what}" d="{_shape(what, cx, marks_top + 6)}" '
                f'fill="{colour}"><title>{escape(tip)}</title></path>'
            )
    out.append("</svg>")
    return "".join(out)


def _stamp(t: float, step: int) -> str:
    fmt = "%Y-%m-%d" if step >= 86400 else "%Y-%m-%d %H:%M"
    return datetime.fromtimestamp(t, UTC).strftime(fmt)


def _band_title(text: str, x: float, top: float) -> str:
    return f'<text class="band" x="{x}" y="{top - 6}" font-size="12" fill="#444">{text}</text>'


def _shape(what: str, cx: float, cy: float) -> str:
    """A blocked attempt is a downward triangle, a canary hit a diamond, a quarantine a
    square: told apart without colour too."""
    if what == "blocked":
        return f"M{cx - 6:.1f},{cy - 6:.1f}h12l-6,12z"
    if what == "canary":
        return f"M{cx:.1f},{cy - 7:.1f}l7,7l-7,7l-7,-7z"
    return f"M{cx - 6:.1f},{cy - 6:.1f}h12v12h-12z"


def _lanes(
    sessions: Iterable[Row], lo: float, hi: float, most: int = 4
) -> list[tuple[float, float, int, Row]]:
    """Each session clipped to the axis, in the first lane where it overlaps no other (at
    most ``most`` lanes; beyond that they share the last)."""
    ends: list[float] = []
    out = []
    for s in sessions:
        if not s.get("started"):
            continue
        start = max(_ts_key(s["started"]), lo)
        end = min(_ts_key(s.get("last_seen") or s["started"]), hi)
        if end < lo or start > hi:
            continue
        lane = next((i for i, e in enumerate(ends) if e < start), None)
        if lane is None:
            if len(ends) < most:
                ends.append(end)
                lane = len(ends) - 1
            else:
                lane = most - 1
        ends[lane] = max(ends[lane], end)
        out.append((start, end, lane, s))
    return out


def _legend(p: PersonReport) -> str:
    per: dict[str, int] = defaultdict(int)
    for (_, chan), r in p.received.items():
        per[chan] += r["labelled_rows"]
    items = [
        f'<span class="key"><i style="background:{_CHANNEL_COLOURS[c]}"></i>{escape(c)} '
        f"<b>{_n(per[c])}</b></span>"
        for c in [*(name for name, _ in CHANNELS), OTHER]
        if c in per
    ]
    items += [
        f'<span class="key"><svg width="14" height="14" viewBox="-7 -7 14 14">'
        f'<path d="{_shape(what, 0, -1 if what != "canary" else 0)}" fill="{colour}"/></svg>'
        f"{label}</span>"
        for what, colour, label in (
            ("blocked", _BLOCK, "blocked attempt"),
            ("canary", _CANARY, "canary hit"),
            ("quarantined", _QUARANTINE, "quarantine"),
        )
    ]
    return f'<p class="legend">{" ".join(items)}</p>'


# --- tables ----------------------------------------------------------------------------------

_BLOCKED_COLS = [
    "ts", "person", "db_user", "client_addr", "application", "statement", "rule_ids", "message",
    "sqlstate",
]  # fmt: skip
_PERSON_BLOCKED_COLS = [
    "ts", "db_user", "end_user", "client_addr", "application", "statement", "rule_ids",
    "message", "sqlstate",
]  # fmt: skip
_ALERT_COLS = ["ts", "message", "rule_ids", "db_user", "client_addr", "session_id"]
_SESSION_COLS = [
    "session_id", "started", "ended", "db_user", "people", "client_addr", "application",
    "statements", "labelled_rows", "blocks",
]  # fmt: skip


_TIME_COLS = frozenset({"ts", "started", "last_seen"})


def _when(ts: str) -> str:
    """``2026-11-02T09:01:10.123456Z`` -> ``2026-11-02 09:01:10`` (the page says UTC)."""
    return ts[:19].replace("T", " ")


def _table(rows: Sequence[dict[str, Any]], cols: Sequence[str], cls: str = "") -> str:
    if not rows:
        return '<p class="empty">None.</p>'
    head = "".join(f"<th>{escape(c.replace('_', ' '))}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if c in _TIME_COLS and isinstance(v, str):
                v = _when(v)
            if isinstance(v, list):
                v = ", ".join(map(str, v))
            if isinstance(v, int) and not isinstance(v, bool):
                cells.append(f'<td class="num">{_n(v)}</td>')
                continue
            cells.append(f"<td>{escape('' if v is None else str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _ranking(data: ReportData) -> str:
    if not data.people:
        return '<p class="empty">Nobody ran a statement in this window.</p>'
    most_rec = max(p.totals["distinct_records"] for p in data.people) or 1
    most_bytes = max(p.totals["labelled_bytes"] for p in data.people) or 1
    heads = [
        "#", "person", "distinct records", "labelled bytes", "labelled rows", "statements",
        "blocked", "canary hits", "quarantines", "sessions",
    ]  # fmt: skip
    body = []
    for p in data.people:
        t = p.totals
        rec, nbytes = t["distinct_records"], t["labelled_bytes"]
        body.append(
            "<tr>"
            f'<td class="num">{p.rank}</td>'
            f'<td><a href="#{p.anchor}">{escape(p.name)}</a></td>'
            f'<td class="num bar-cell"><span class="bar" style="width:{100 * rec / most_rec:.0f}%">'
            f"</span>{_n(rec)}</td>"
            f'<td class="num bar-cell" title="{_n(nbytes)} bytes"><span class="bar bytes" '
            f'style="width:{100 * nbytes / most_bytes:.0f}%"></span>{_bytes(nbytes)}</td>'
            f'<td class="num">{_n(t["labelled_rows"])}</td>'
            f'<td class="num">{_n(t["statements"])}</td>'
            f'<td class="num{" alert" if t["blocks"] else ""}">{_n(t["blocks"])}</td>'
            f'<td class="num{" alert" if p.canaries else ""}">{len(p.canaries)}</td>'
            f'<td class="num{" alert" if p.quarantines else ""}">{len(p.quarantines)}</td>'
            f'<td class="num">{_n(t["sessions"])}</td>'
            "</tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in heads)
    more = (
        f'<p class="note">More people read in this window: only the first {len(data.people)} '
        "are shown (raise --people).</p>"
        if data.more_people
        else ""
    )
    return (
        f'<table class="ranking"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>{more}"
    )


def _stats(p: PersonReport) -> str:
    t = p.totals
    cards = [
        ("distinct records", _n(t["distinct_records"]), ""),
        ("labelled bytes", _bytes(t["labelled_bytes"]), f"{_n(t['labelled_bytes'])} bytes"),
        ("labelled rows", _n(t["labelled_rows"]), ""),
        ("statements", _n(t["statements"]), ""),
        ("blocked", _n(t["blocks"]), ""),
        ("canary hits", _n(len(p.canaries)), ""),
        ("quarantines", _n(len(p.quarantines)), ""),
        ("sessions", _n(t["sessions"]), ""),
    ]
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"{f" title={chr(34)}{tip}{chr(34)}" if tip else ""}>'
            f"<b>{value}</b><span>{label}</span></div>"
            for label, value, tip in cards
        )
        + "</div>"
    )


def _alert_tables(p: PersonReport) -> str:
    """A table for each kind of alert the person has; one line naming those they have not."""
    parts, missing = [], []
    for title, rows, cols in (
        ("Blocked attempts", p.blocked, _PERSON_BLOCKED_COLS),
        ("Canary hits", p.canaries, _ALERT_COLS),
        ("Quarantines", p.quarantines, _ALERT_COLS),
    ):
        if rows:
            parts.append(f"<h3>{title} ({len(rows)}, times in UTC)</h3>\n{_table(rows, cols)}")
        else:
            missing.append(title.lower())
    if missing:
        parts.append(f'<p class="empty">No {", no ".join(missing)}.</p>')
    return "\n".join(parts)


def _person_section(p: PersonReport) -> str:
    sessions = [
        {
            **s,
            # a pooled connection's people are the end users it named; its start and end
            # name only the account
            "people": s.get("end_users") or [s.get("db_user")],
            "ended": _when(s["last_seen"])
            if s.get("ended")
            else f"open (last event {_when(s['last_seen'])})",
        }
        for s in p.sessions
    ]
    return f"""<section class="person" id="{p.anchor}">
<h2>{p.rank}. {escape(p.name)} <a class="up" href="#ranking">ranking ↑</a></h2>
{_stats(p)}
{_legend(p)}
{person_plot(p)}
{_alert_tables(p)}
<h3>Sessions ({len(p.sessions)})</h3>
<p class="note">Times in UTC. Totals are the whole session's: a pooled connection serves several
people.</p>
{_table(sessions, _SESSION_COLS)}
</section>"""


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }
table { border-collapse: collapse; font-size: 13px; margin-bottom: 1em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.alert { color: #b00; font-weight: bold; }
.empty, .note { color: #777; } code { font-size: 12px; }
td.bar-cell { position: relative; min-width: 110px; }
.bar { position: absolute; left: 0; top: 3px; bottom: 3px; background: #4e79a733; }
.bar.bytes { background: #f28e2b33; }
.cards { display: flex; flex-wrap: wrap; gap: 8px; margin: 8px 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 6px 12px; min-width: 90px; }
.card b { display: block; font-size: 20px; } .card span { color: #666; font-size: 12px; }
.legend .key { margin-right: 14px; font-size: 13px; white-space: nowrap; }
.legend i { display: inline-block; width: 11px; height: 11px; margin-right: 4px; }
.legend svg { vertical-align: -2px; margin-right: 4px; }
section.person { border-top: 3px solid #4e79a7; margin-top: 2.5em; }
section.person:target { background: #fffbe6; }
a.up { font-size: 13px; font-weight: normal; margin-left: 1em; }
"""


def render_html(*, title: str, window: str, data: ReportData, verify_summary: str) -> str:
    """The whole report page."""
    for r in data.blocked:
        r.setdefault("person", r.get("end_user") or r.get("db_user"))
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    anchors = {p.name: p.anchor for p in data.people}
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<title>{escape(title)}</title>
<style>{_STYLE}</style></head><body>
<h1>{escape(title)}</h1>
<p>Window: {escape(window)}. Generated {escape(generated)}.</p>
<p>Chain verification: {escape(verify_summary)}</p>
<p class="nav"><a href="#ranking">ranking</a> · <a href="#overview">over time</a> ·
{" ".join(f'<a href="#{p.anchor}">{p.rank}</a>' for p in data.people) or "nobody"} ·
<a href="#blocked">all blocked statements ({len(data.blocked)})</a></p>
<h2 id="ranking">People ranked by distinct records received</h2>
<p class="note">A person is the end user the application named, else the database user.
Distinct records are the labelled rows' primary keys in the record ledger; bytes are the
labelled results' size. Each name leads to that person's section.</p>
{_ranking(data)}
<h2 id="overview">Labelled rows read per person over time (UTC)</h2>
<p class="note">The first eight of the ranking.</p>
{svg_plot(data.overview, anchors=anchors, people=list(anchors))}
<p class="note">Channels are read from each statement's first word (the trail records the
statement, not the protocol messages that carried its answer): query rows, cursor FETCH,
COPY, DML RETURNING, EXECUTE / CALL. Server error and notice text and NOTIFY payloads are
not recorded per statement.</p>
{"".join(_person_section(p) for p in data.people)}
<h2 id="blocked">Blocked statements (everyone's, newest first, times in UTC)</h2>
{_table(data.blocked, _BLOCKED_COLS)}
</body></html>
"""
