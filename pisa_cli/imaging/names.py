"""File names are hostile data: how they are shown, turned into output names and put in CSV.

A name may hold any character a file system allows: newlines and terminal escapes that
would forge or garble our output, bytes that are not UTF-8, a stem of ``..`` that would
climb out of the output folder, a leading ``=`` that a spreadsheet runs as a formula.
"""

from __future__ import annotations

import unicodedata

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNSEEN = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
"""Control characters; format characters, which are invisible (zero-width spaces and
joiners, soft hyphens, byte-order marks) or reorder what follows on the line (bidirectional
overrides, "Trojan source"); lone surrogates (undecodable bytes); line and paragraph
separators."""


def _escape(char: str) -> str:
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape): show the byte
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code > 0xFFFF:  # tags (U+E0001...) and other format characters past the BMP
        return f"\\U{code:08x}"
    return f"\\u{code:04x}"


def shown(text: object) -> str:
    """``text`` as one printable line: control characters (C0, C1, DEL), line separators,
    invisible format characters (zero-width spaces, bidirectional overrides) and
    undecodable bytes are written as escapes (``\\n``, ``\\x1b``, ``\\u200b``,
    ``\\u202e``). Everything else, accents and scripts included, is kept."""
    text = str(text)
    if text.isprintable():  # the common case; isprintable is False for every escaped class
        return text
    return "".join(
        _escape(char)
        if unicodedata.category(char) in _UNSEEN or 0xD800 <= ord(char) <= 0xDFFF
        else char
        for char in text
    )


SAFE_PREFIX = "_"


def safe_stem(stem: str) -> str:
    """An output name part that stays where it is put and stays visible.

    A stem that is empty or starts with a dot (``.``, ``..``, a hidden name, our own
    ``.pisa-`` files) gets ``_`` in front (``..`` -> ``_..``); path separators and NUL, which
    no file name of ours may hold, become ``_``."""
    stem = stem.replace("/", "_").replace("\\", "_").replace("\0", "_")
    if not stem or stem.startswith("."):
        return SAFE_PREFIX + stem
    return stem


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""What a spreadsheet reads as the start of a formula (CSV injection)."""


def csv_cell(value: object) -> object:
    """A report cell that a spreadsheet shows as text: strings starting with a formula
    character get a leading ``'``; other values are returned as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value
