"""structlog set-up: JSON lines on stderr by default, one event per line.

Every line pgwarden's process writes to stderr is in the configured format, its own events
and everyone else's: the standard library's ``logging`` (asyncpg, asyncio's "Task exception
was never retrieved", any library that logs) and Python ``warnings`` go through the same
renderer, so a log shipper reading JSON never meets a plain-text line.
"""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The one root handler pgwarden installs (found again, and replaced, on a reload)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)


def _warning_fields(
    _logger: object, _name: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    # logging.captureWarnings hands the warning over as one formatted string ("file:line:
    # Category: text\n  source"): keep its first line as the event, as a sentence.
    record = event.get("_record")
    if isinstance(record, logging.LogRecord) and record.name == "py.warnings":
        text = str(event.get("event", "")).strip()
        event["event"] = "python_warning"
        event["warning"] = text.splitlines()[0] if text else ""
    return event


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                _warning_fields,
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)  # a previous configuration's (SIGHUP reload)
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    logging.captureWarnings(True)
