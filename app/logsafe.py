"""Log lines that a client cannot forge: control characters in messages are escaped.

User text reaches the log in many places (file names, manifest paths, queries in
errors). A newline in one of them would start what looks like a new record, e.g. a forged
``CRITICAL`` line; NUL, ESC (terminal colour codes) and the other control characters
corrupt files and terminals. :class:`SafeFormatter` escapes them in every record's
message, arguments included, so no call site can forget; :func:`escape_control` is the
same escaping for text that is written elsewhere.

Tracebacks are multi-line by nature: their lines keep their breaks but every one of them
is indented, so none can pass for the start of a record.
"""

from __future__ import annotations

import logging
import unicodedata
from typing import Final

#: The format of every ``convirt`` process.
LOG_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Line and paragraph separators that some log viewers also break lines at.
_SEPARATORS: Final = frozenset({"\u2028", "\u2029", "\x85"})
_NAMED: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(value: object, *, keep_newlines: bool = False) -> str:
    """``str(value)`` with every control character written as an escape (``\\n``, ``\\x00``).

    Lone surrogates are escaped too, so the text can always be encoded as UTF-8.
    """
    text = str(value)
    if text.isprintable() and not keep_newlines:
        return text
    out = []
    for ch in text:
        if keep_newlines and ch == "\n":
            out.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Cs") or ch in _SEPARATORS:
            out.append(_escape_char(ch))
        else:
            out.append(ch)
    return "".join(out)


class SafeFormatter(logging.Formatter):
    """A formatter whose records are one line each, whatever their arguments hold."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The message (arguments already merged in) is escaped before it is placed.
        safe = logging.makeLogRecord(record.__dict__)
        safe.message = escape_control(record.message)
        return super().formatMessage(safe)

    def formatException(self, ei: logging._SysExcInfoType) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join(f"    {line}" for line in escape_control(text, keep_newlines=True).split("\n"))


def configure_logging(level: int | str) -> None:
    """Log to stderr through :class:`SafeFormatter` unless logging is already configured.

    An already configured root logger (a test runner's, an embedding application's) is
    left alone, as :func:`logging.basicConfig` would.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(SafeFormatter(LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(level)
