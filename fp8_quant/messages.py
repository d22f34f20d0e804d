"""Text that goes into one-line messages: file paths, tensor and layer names, as a terminal or a log shows them.

A file named with a newline would split a "one line" error in two; an ESC in a tensor name of a hostile header
would reach the terminal as a control sequence; a lone surrogate (a file name that is not UTF-8) would make
``print`` itself fail. ``printable`` escapes every character that is not printable as ``repr`` does (``\\n``,
``\\x1b``, ``\\u202e``, ``\\udcff``) and leaves the rest, non-ASCII letters and backslashes of Windows paths
included, as they are.
"""

from __future__ import annotations

import os


def printable(value: object) -> str:
    """``value`` (a path, a name, a whole message) as text without control characters."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    text = os.fsdecode(text) if isinstance(text, bytes) else str(text)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escaped(char) for char in text)


def _escaped(char: str) -> str:
    code = ord(char)
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    if char in named:
        return named[char]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
