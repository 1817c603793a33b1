"""The HTML report as a responder sees it: rendered by headless Chromium, read back from the
browser's DOM and layout.

One trail, written through the real audit pipeline: ivy (named by the helpdesk's pooled
connection) reads ten customers a minute, then fetches from a cursor, then COPYs out, is
refused, trips a canary and is quarantined; jon reads the same 20 customers twice; sam (a
database user with no end user) COPYs 2,000 customers in one go; and a person whose name is
markup reads one.  Expected values come from these events, never from the report code.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from audit.events import AuditEvent, Subject
from audit.ledger import generate_key_file
from audit.pipeline import AuditConfig, AuditTrail, SQLiteSinkConfig
from tests.auditcli import ok
from tests.browser import Rendered, chromium, file_url, render, render_pages

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC).timestamp()
HOSTILE = "<img src=x onerror=alert(1)>"


def pooled(end_user: str) -> Subject:
    return Subject("support_app", "support", "helpdesk", "10.0.0.5", True, end_user)


SAM = Subject("sam", "support", "psql", "10.0.0.9", False, None)
POOL = Subject("support_app", "support", "helpdesk", "10.0.0.5", True, None)
SELECT = "SELECT customer_id, email FROM customers WHERE customer_id BETWEEN $1 AND $2"
COPY_OUT = "COPY (SELECT customer_id, email FROM customers) TO STDOUT"
IVY_PER_MINUTE = 10  # 09:00 .. 09:09, customers 1..100
IVY_FETCH = (12, range(101, 151))  # minute, customers
IVY_COPY = (15, range(151, 551))
IVY_DISTINCT = 550
# the same 20 customers, then 40 times over: more rows than ivy, far fewer records
JON = [(5, list(range(1, 21))), (20, list(range(1, 21)) * 40)]
SAM_COPY = (30, range(1, 2001))


def at(minute: float) -> float:
    return T0 + minute * 60


def read(
    sid: str, who: Subject, minute: float, keys: Sequence[int], statement: str = SELECT
) -> AuditEvent:
    return AuditEvent.statement_event(
        sid, who, fingerprint=statement[:8], statement=statement,
        relations=["public.customers"], labels=["pii.email"], rows=len(keys),
        bytes=40 * len(keys), ledger_keys={"public.customers": [str(k) for k in keys]},
        ts=at(minute),
    )  # fmt: skip


def alert(kind: str, who: Subject, minute: float, message: str) -> AuditEvent:
    ev = AuditEvent.alert(kind, message, severity="critical", session_id="s-pool", subject=who,
                          rule_ids=[kind], details={"subject": f"person:{who.end_user}"})  # fmt: skip
    ev.ts = at(minute)
    return ev


def events() -> list[AuditEvent]:
    ivy = pooled("ivy")
    start = AuditEvent.session_start("s-pool", POOL)
    start.ts = at(-2)
    out = [start]
    for m in range(10):
        first = m * IVY_PER_MINUTE + 1
        out.append(read("s-pool", ivy, m + 0.5, range(first, first + IVY_PER_MINUTE)))
    out += [read("s-pool", pooled("jon"), m + 0.2, keys) for m, keys in JON]
    out.append(read("s-pool", ivy, IVY_FETCH[0], IVY_FETCH[1], "FETCH 50 FROM c"))
    out.append(read("s-pool", ivy, IVY_COPY[0], IVY_COPY[1], COPY_OUT))
    refused = AuditEvent.statement_event(
        "s-pool", ivy, fingerprint="copy", statement="COPY customers TO STDOUT",
        relations=["public.customers"], labels=["pii.email"], verdict="block",
        rule_ids=["no-copy-out"], sqlstate="42501", message="COPY TO is not allowed",
        ts=at(16),
    )  # fmt: skip
    out += [refused, alert("block", ivy, 16, "ivy: COPY TO is not allowed")]
    out.append(alert("canary", ivy, 17, "ivy read a canary record (rule canary-customers)"))
    out.append(alert("quarantine", ivy, 18, "ivy quarantined for 3600 s after a canary read"))
    out.append(read("s-pool", pooled(HOSTILE), 21, range(999, 1000)))
    end = AuditEvent.session_end("s-pool", POOL)
    end.ts = at(25)
    sam_start, sam_end = (
        AuditEvent.session_start("s-sam", SAM),
        AuditEvent.session_end("s-sam", SAM),
    )
    sam_start.ts, sam_end.ts = at(28), at(31)
    out += [end, sam_start, read("s-sam", SAM, SAM_COPY[0], SAM_COPY[1], COPY_OUT), sam_end]
    return out


def write_trail(tmp: Path) -> Path:
    key = tmp / "ledger.key"
    generate_key_file(key)

    async def go() -> None:
        trail = AuditTrail(AuditConfig(sinks=[SQLiteSinkConfig(path=tmp / "audit.db")],
                                       ledger_key=key))  # fmt: skip
        await trail.start()
        for ev in events():
            await trail.submit(ev)
        await trail.close()

    asyncio.run(go())
    return tmp / "audit.db"


# Asked of the rendered page from outside (its policy forbids scripts of its own): the ranking
# as shown, where each of its links leads, and per person section what a reader sees.
QUESTION = r"""
(() => {
  const text = e => e.textContent.replace(/\s+/g, ' ').trim();
  const box = e => { const r = e.getBoundingClientRect();
                     return {x: r.x, y: r.y, w: r.width, h: r.height}; };
  const heading = [...document.querySelectorAll('h2')]
    .find(h => text(h).startsWith('People ranked'));
  let table = heading.nextElementSibling;
  while (table.tagName !== 'TABLE') table = table.nextElementSibling;
  const ranking = [...table.querySelectorAll('tbody tr')].map(tr => {
    const a = tr.querySelector('a');
    const target = document.getElementById(decodeURIComponent(a.hash.slice(1)));
    return {cells: [...tr.cells].map(text), link: text(a), href: a.getAttribute('href'),
            leadsTo: target ? text(target.querySelector('h2')) : null};
  });
  const sections = [...document.querySelectorAll('section')].map(s => {
    const svg = s.querySelector('svg[role=img]');
    const tables = {};
    for (const h of s.querySelectorAll('h3')) {
      let t = h.nextElementSibling;
      while (t && t.tagName !== 'TABLE' && t.tagName !== 'H3') t = t.nextElementSibling;
      tables[text(h)] = t && t.tagName === 'TABLE'
        ? [...t.querySelectorAll('tbody tr')].map(tr => [...tr.cells].map(text)) : [];
    }
    const tips = sel => svg ? [...svg.querySelectorAll(sel)].map(e => ({
      tip: text(e.querySelector('title')), box: box(e)})) : [];
    return {
      heading: text(s.querySelector('h2')),
      legend: text(s.querySelector('.legend')),
      plot: svg ? box(svg) : null,
      bars: tips('rect:has(> title)').filter(b => / labelled rows /.test(b.tip)),
      marks: tips('path:has(> title)'),
      labels: svg ? [...svg.querySelectorAll('text')].map(t => ({t: text(t), box: box(t)})) : [],
      tables,
    };
  });
  // the overview plot's legend, each entry a link
  const overview = [...document.querySelectorAll('svg a')]
    .filter(a => !a.closest('section')).map(a => a.getAttribute('href'));
  return {ranking, sections, overview, images: document.images.length,
          scripts: document.scripts.length,
          wide: document.documentElement.scrollWidth, view: window.innerWidth};
})()
"""


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Rendered, Path]]:
    chromium()  # skips (or, under `make test`, fails) before any work when it is missing
    tmp = tmp_path_factory.mktemp("report-browser")
    db = write_trail(tmp)
    html = tmp / "report.html"
    ok("report", "--db", str(db), "--html", str(html))
    yield render(file_url(html), QUESTION, screenshot=True), tmp


def section(page: Rendered, name: str) -> dict[str, Any]:
    (found,) = [s for s in page.answer["sections"] if name in s["heading"]]
    return dict(found)


def test_the_page_renders_without_script_errors_or_refused_loads(
    page: tuple[Rendered, Path],
) -> None:
    shown, tmp = page
    assert shown.errors == [] and shown.console == []
    # a person named with markup is text: no image was made of it, nothing ran
    assert shown.answer["images"] == 0 and shown.answer["scripts"] == 0
    assert shown.answer["wide"] <= shown.answer["view"]  # nothing pushes the page sideways
    assert shown.screenshot is not None and shown.screenshot.startswith(b"\x89PNG")
    (tmp / "report.png").write_bytes(shown.screenshot)  # kept beside the page for a look


def test_people_are_ranked_by_distinct_records_and_link_to_their_sections(
    page: tuple[Rendered, Path],
) -> None:
    ranking = page[0].answer["ranking"]
    assert [r["link"] for r in ranking] == ["sam", "ivy", "jon", HOSTILE]
    distinct = [len(SAM_COPY[1]), IVY_DISTINCT, len(set(JON[1][1])), 1]
    for row, n in zip(ranking, distinct, strict=True):
        assert f"{n:,}" in row["cells"], row
        assert row["leadsTo"] is not None and row["link"] in row["leadsTo"], row
    # bytes are shown beside the records, in a unit a person reads (sam: 80,000 bytes)
    assert any(re.fullmatch(r"78\.1 KiB", c) for c in ranking[0]["cells"]), ranking[0]
    # the overview plot draws the same people, in the same order, its legend linking alike
    assert page[0].answer["overview"] == [r["href"] for r in ranking]


def test_a_persons_reads_sit_on_a_minute_axis_by_channel(page: tuple[Rendered, Path]) -> None:
    ivy = section(page[0], "ivy")
    # each channel named with the rows it carried
    fetched, copied = len(IVY_FETCH[1]), len(IVY_COPY[1])
    for name, rows in (("query rows", 10 * IVY_PER_MINUTE), ("FETCH", fetched), ("COPY", copied)):
        assert re.search(rf"{name} {rows:,}\b", ivy["legend"]), (name, ivy["legend"])
    # one bar per minute read, placed by its minute: 09:00..09:09 evenly, the FETCH three
    # minutes after the last of them, the COPY three after that
    at: dict[str, float] = {}
    for b in ivy["bars"]:
        minute = re.match(r"\d{4}-\d\d-\d\d (\d\d:\d\d):", b["tip"])
        assert minute, b["tip"]
        at[minute.group(1)] = b["box"]["x"] + b["box"]["w"] / 2
    assert sorted(at) == [f"09:{m:02d}" for m in (*range(10), 12, 15)]
    gap = at["09:01"] - at["09:00"]
    assert gap > 1
    for m in range(1, 10):
        assert at[f"09:{m:02d}"] - at[f"09:{m - 1:02d}"] == pytest.approx(gap, abs=0.6)
    assert at["09:12"] - at["09:09"] == pytest.approx(3 * gap, abs=0.6)
    assert at["09:15"] - at["09:12"] == pytest.approx(3 * gap, abs=0.6)
    # the COPY's 400 rows stand taller than a 10-row minute
    heights = {m: b["box"]["h"] for b in ivy["bars"] if (m := b["tip"][11:16])}
    assert heights["09:15"] > 10 * heights["09:03"]
    plot = ivy["plot"]
    for b in ivy["bars"]:
        assert plot["x"] <= b["box"]["x"] and b["box"]["x"] + b["box"]["w"] <= plot["x"] + plot["w"]


def test_no_two_labels_of_a_plot_overlap(page: tuple[Rendered, Path]) -> None:
    for s in page[0].answer["sections"]:
        labels = [lb for lb in s["labels"] if lb["t"]]
        assert labels, s["heading"]
        for i, a in enumerate(labels):
            for b in labels[i + 1 :]:
                ax, bx = a["box"], b["box"]
                apart = (ax["x"] + ax["w"] <= bx["x"] or bx["x"] + bx["w"] <= ax["x"]
                         or ax["y"] + ax["h"] <= bx["y"] or bx["y"] + bx["h"] <= ax["y"])  # fmt: skip
                assert apart, (s["heading"], a["t"], b["t"])


def test_blocked_attempts_canaries_quarantines_and_sessions_per_person(
    page: tuple[Rendered, Path],
) -> None:
    ivy = section(page[0], "ivy")
    tables = ivy["tables"]
    blocked = next(rows for h, rows in tables.items() if h.startswith("Blocked"))
    canaries = next(rows for h, rows in tables.items() if h.startswith("Canary"))
    quarantines = next(rows for h, rows in tables.items() if h.startswith("Quarantine"))
    sessions = next(rows for h, rows in tables.items() if h.startswith("Sessions"))
    ((refused,),) = [blocked]
    assert "COPY customers TO STDOUT" in refused and "no-copy-out" in refused
    assert "2026-11-02 09:16:00" in refused
    assert [r for r in canaries if "canary record" in " ".join(r)] == canaries and len(
        canaries
    ) == 1
    assert len(quarantines) == 1 and "2026-11-02 09:18:00" in quarantines[0]
    # the pooled session, with everyone it served, from its first event to its end
    ((pool,),) = [sessions]
    assert "s-pool" in pool and "10.0.0.5" in pool and "support_app" in pool
    assert "2026-11-02 08:58:00" in pool and "2026-11-02 09:25:00" in pool
    assert any(c.split(", ") == sorted([HOSTILE, "ivy", "jon"]) for c in pool)
    # on the plot: one mark each, in time order left to right
    marks = sorted(ivy["marks"], key=lambda m: m["box"]["x"])
    assert [m["tip"].split(" ", 1)[1].split(":")[0] for m in marks] == [
        "blocked", "canary", "quarantined",
    ]  # fmt: skip
    # sam logged in as himself: his own session, no alerts
    sam = section(page[0], "sam")
    ((own,),) = [next(rows for h, rows in sam["tables"].items() if h.startswith("Sessions"))]
    assert "s-sam" in own and "10.0.0.9" in own
    assert not sam["marks"]


# --- the checks above would see a broken page ----------------------------------------------


def test_an_uncaught_script_error_and_a_refused_load_are_caught(
    page: tuple[Rendered, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.html"
    broken.write_text(
        "<!DOCTYPE html><html><body><p>x</p><script>undefinedFunction();</script></body></html>"
    )
    # what an unescaped name would do to the report: its policy refuses the load, and says so
    report = tmp_path / "report.html"
    html = (page[1] / "report.html").read_text()
    report.write_text(html.replace("</body>", f"{HOSTILE}</body>"))
    thrown, refused = render_pages([file_url(broken), file_url(report)])
    assert any("undefinedFunction" in e for e in thrown.errors), thrown
    assert any("Content Security Policy" in c for c in refused.console), refused.console
    assert not refused.errors and not thrown.console  # each page's own, not the other's
