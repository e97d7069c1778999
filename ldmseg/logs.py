"""Progress and warnings through :mod:`logging`: one logger per part, ``ldmseg.<part>``.

The method library reports long work through progress callbacks and warns through these loggers;
the commands and the Ray workers call :func:`setup_logging` once, which prints each record on
stderr as ``[part] message`` (``[part] warning: message`` for warnings and errors).
"""

from __future__ import annotations

import logging
import sys

ROOT = "ldmseg"


def get_logger(part: str) -> logging.Logger:
    """The logger of one part of the project, e.g. ``get_logger("train")`` → ``ldmseg.train``."""
    return logging.getLogger(f"{ROOT}.{part}")


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (not the one at setup: pytest and Ray replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _PartFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        part = record.name[len(ROOT) + 1:] if record.name.startswith(ROOT + ".") else record.name
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        text = f"[{part}] {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(level: int = logging.INFO) -> None:
    """Print the project's records on stderr as ``[part] message``; calling it again changes nothing."""
    root = logging.getLogger(ROOT)
    root.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_PartFormatter())
        root.addHandler(handler)
    root.propagate = False
