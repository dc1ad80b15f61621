"""The predictor's log: one JSON object per line on stderr.

Log shippers index fields (``request_id``, ``status``, ``latency_s``) instead of parsing
text, and a request's outcome is one line whatever the outcome was. KServe and uvicorn
keep their own format; only the ``ldm_core.serve`` logger writes JSON.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ldm_core.serve.protocol import GenerationRequest

log = logging.getLogger("ldm_core.serve")


class JsonFormatter(logging.Formatter):
    """``ts``, ``level``, ``logger``, ``event`` and the record's ``fields``, as one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def log_event(
    event: str, level: int = logging.INFO, exc_info: BaseException | None = None, **fields: Any
) -> None:
    """Log ``event`` with ``fields`` as JSON keys (and ``exc_info``'s traceback, if given)."""
    log.log(level, event, extra={"fields": fields}, exc_info=exc_info)


def log_request(
    req: GenerationRequest, status: int, exc_info: BaseException | None = None, **fields: Any
) -> None:
    """The one line a parsed request leaves: what it asked for and how it ended. A 500 is
    an error of ours (logged with its traceback); other 5xx are load, logged as warnings."""
    if status == 500:
        level = logging.ERROR
    elif status >= 500:
        level = logging.WARNING
    else:
        level = logging.INFO
    log_event(
        "request",
        level,
        exc_info=exc_info,
        request_id=req.request_id,
        protocol=req.protocol,
        n=len(req.seeds),
        sampler=req.sampler,
        steps=req.steps,
        outputs=list(req.outputs),
        status=status,
        **fields,
    )


def configure_logging(level: int = logging.INFO) -> None:
    """Route the ``ldm_core.serve`` logger to stderr as JSON lines, once per process."""
    if any(isinstance(h.formatter, JsonFormatter) for h in log.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
