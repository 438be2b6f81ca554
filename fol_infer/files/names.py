"""File names that are not valid UTF-8 (legal on Linux: any bytes but "/" and NUL).

Python decodes such a name with ``surrogateescape`` (PEP 383): the byte 0xff becomes the lone
surrogate U+DCFF, and `os.fsencode` gives the exact bytes back. fol-infer keeps that string
everywhere a path is stored: index metadata (``index.json``) and ``query --json`` write it as
the JSON escape ``\\udcff`` (json's ``ensure_ascii``), so a reader decodes it to the same
string and `os.fsencode` recovers the file name byte for byte. Text meant for people (tables,
messages) shows such a byte as ``\\xff`` (`printable`), which a shell reads back with $'...'.
"""

from __future__ import annotations


def printable(text: str) -> str:
    """`text` with each undecodable file-name byte shown as ``\\xNN`` (and any other lone
    surrogate as ``\\udNNN``), so that any terminal or UTF-8 stream can print it."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def quoted(name: str) -> str:
    """`name` in single quotes for a one-line message: undecodable bytes as ``\\xNN``
    (`printable`), line breaks, tabs and other control characters escaped."""
    shown = "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
        for c in printable(name)
    )
    return f"'{shown}'"
