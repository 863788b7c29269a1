"""Where a node's log goes: the root logger to a file (reopened when
rotated away) or stderr, each line naming the node (``[S1]``)."""
from __future__ import annotations

import logging
import logging.handlers
import sys
from collections.abc import Callable

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class _LabelFormatter(logging.Formatter):
    """LOG_FORMAT, with ``[label] `` before the message when a label is known."""

    def __init__(self, label_getter: Callable[[], object] | None):
        super().__init__(LOG_FORMAT)
        self._label_getter = label_getter

    def formatMessage(self, record):
        label = None
        if self._label_getter is not None:
            try:
                label = self._label_getter()
            except Exception:
                label = None
        if not label:
            return super().formatMessage(record)
        message = record.message
        record.message = f"[{label}] {message}"
        try:
            return super().formatMessage(record)
        finally:
            record.message = message


def setup_logging(
    label_getter: Callable[[], object] | None = None,
    logfile: str | None = None,
    level: str | int = "INFO",
) -> logging.Handler:
    """Send the root logger to *logfile* (or stderr) at *level*.

    *label_getter*, if given, is called for every record and its result
    (e.g. the node's NID as ``'S1'``) is shown before the message.  Calling
    again replaces the handler installed by a previous call.
    """
    if isinstance(level, str):
        numeric = logging.getLevelName(level.strip().upper())
        if not isinstance(numeric, int):
            raise ValueError(f"invalid log level {level!r}")
        level = numeric
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_neozodb_handler", False):
            root.removeHandler(old)
            old.close()
    if logfile:
        try:
            handler: logging.Handler = logging.handlers.WatchedFileHandler(
                logfile, encoding="utf-8"
            )
        except OSError as e:
            # a usage error (-l in a missing or unwritable directory): one
            # line and status 2, as for any bad option, whatever the node
            print("error: cannot open log file %r: %s" % (logfile, e.strerror or e),
                  file=sys.stderr)
            raise SystemExit(2) from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler._neozodb_handler = True  # type: ignore[attr-defined]
    handler.setFormatter(_LabelFormatter(label_getter))
    root.addHandler(handler)
    root.setLevel(level)
    return handler
