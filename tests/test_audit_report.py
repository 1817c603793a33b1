"""The HTML report's data: the blocked statements it lists and where its plot puts each read.

Read back with the standard library's HTML parser: the tables under their headings, and the
plot's points (each circle's x and its tooltip).  Expected values come from what the clients
sent or the events the test wrote, never from the report code.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import pytest

from audit.events import AuditEvent, Subject
from audit.pipeline import AuditConfig, AuditTrail, SQLiteSinkConfig
from tests.test_audit_person import POOLED, Trail, ok, trail

__all__ = ["trail"]  # a fixture


class Page(HTMLParser):
    """The report's tables (rows of cell texts, by the heading above them), the plot area
    and its points."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.points: list[tuple[float, str]] = []  # (cx, tooltip)
        self.area: tuple[float, float] | None = None  # the plot's left and right edge
        self.sections: list[str] = []  # the people with a section, by the heading's name
        self._heading = ""
        self._in: str | None = None
        self._text = ""
        self._row: list[str] | None = None
        self._cx: float | None = None
        self._section = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self._section = True
        if tag in ("h2", "td", "th", "title"):
            self._in, self._text = tag, ""
        elif tag == "tr":
            self._row = []
        elif tag == "circle":
            self._cx = float(a["cx"] or 0)
        elif tag == "rect" and self.area is None and a.get("stroke"):
            left = float(a["x"] or 0)
            self.area = (left, left + float(a["width"] or 0))

    def handle_data(self, data: str) -> None:
        if self._in:
            self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2" and self._in == "h2":
            self._heading = self._text.strip()
            if self._section:
                # "2. ivy ranking ↑": the name between the rank and the link back
                self.sections.append(self._heading.split(". ", 1)[1].rsplit(" ", 2)[0])
                self._section = False
        elif tag == "td" and self._row is not None:
            self._row.append(self._text)
        elif tag == "tr" and self._row:
            self.tables.setdefault(self._heading, []).append(self._row)
            self._row = None
        elif tag == "title" and self._cx is not None:
            self.points.append((self._cx, self._text))
            self._cx = None
        if tag == self._in:
            self._in = None


def report(db: Path) -> Page:
    out = db.parent / "report.html"
    ok("report", "--db", str(db), "--html", str(out))
    return Page(out.read_text())


def test_each_blocked_statement_is_listed_once_with_its_person(trail: Trail) -> None:
    page = report(trail.db)
    (blocked,) = [rows for h, rows in page.tables.items() if h.startswith("Blocked")]
    # ts, person, db_user, ...: agent_mallory's SELECT * on her own role, bob's through the
    # helpdesk; each raised an alert too, which is not a second blocked statement
    refused = {("agent_mallory", "agent_mallory")} | {
        (who, "support_app") for who, i in POOLED if i is None
    }
    assert sorted((r[1], r[2]) for r in blocked) == sorted(refused)


def _write(db: Path, reads: list[tuple[str, str, int]]) -> None:
    async def go() -> None:
        trail = AuditTrail(AuditConfig(sinks=[SQLiteSinkConfig(path=db)]))
        await trail.start()
        for who, at, rows in reads:
            subject = Subject("support_app", "support", "helpdesk", "10.0.0.5", False, who)
            await trail.submit(
                AuditEvent.statement_event(
                    "s", subject, fingerprint="f", statement="SELECT email FROM customers",
                    relations=["public.customers"], labels=["pii.email"], rows=rows,
                    ts=datetime.fromisoformat(at).replace(tzinfo=UTC).timestamp(),
                )
            )  # fmt: skip
        await trail.close()

    asyncio.run(go())


def test_the_plot_places_reads_within_one_hour_by_their_minute(tmp_path: Path) -> None:
    # A 30-minute incident: drawn per hour, all of it was one column on the left edge.
    _write(
        tmp_path / "audit.db",
        [("ivy", "2026-11-02T09:01:10", 5), ("ivy", "2026-11-02T09:02:40", 7),
         ("ivy", "2026-11-02T09:30:00", 9), ("jon", "2026-11-02T09:30:20", 3)],
    )  # fmt: skip
    page = report(tmp_path / "audit.db")
    ivy = sorted(cx for cx, tip in page.points if tip.startswith("ivy"))
    jon = [cx for cx, tip in page.points if tip.startswith("jon")]
    assert len(ivy) == 3 and ivy[0] < ivy[1] < ivy[2]
    # minutes 09:01, 09:02, 09:30: the third is 29 minutes from the first, the second one
    assert (ivy[2] - ivy[0]) / (ivy[1] - ivy[0]) == pytest.approx(29, rel=0.02)
    assert jon == [ivy[2]]  # the same minute, the same column
    assert page.area is not None and (ivy[0], ivy[2]) == page.area
    tips = {tip for _, tip in page.points}
    assert "ivy 2026-11-02 09:02: 7 rows" in tips


def test_one_moment_is_drawn_inside_the_plot_not_on_its_edge(tmp_path: Path) -> None:
    _write(tmp_path / "audit.db", [("kim", "2026-11-02T09:01:10", 4)])
    page = report(tmp_path / "audit.db")
    ((cx, tip),) = page.points
    assert page.area is not None
    left, right = page.area
    assert abs(cx - (left + right) / 2) < 1 and tip == "kim 2026-11-02 09:01: 4 rows"


def test_people_beyond_the_asked_number_get_no_section_and_the_page_says_so(
    tmp_path: Path,
) -> None:
    from tests.test_audit_report_browser import write_trail

    db = write_trail(tmp_path)  # sam, ivy, jon and one more read labelled records
    out = tmp_path / "two.html"
    ok("report", "--db", str(db), "--html", str(out), "--people", "2")
    html = out.read_text()
    assert Page(html).sections == ["sam", "ivy"]
    assert "raise --people" in html
    out = tmp_path / "all.html"
    ok("report", "--db", str(db), "--html", str(out))
    assert len(Page(out.read_text()).sections) == 4
    assert "raise --people" not in out.read_text()
