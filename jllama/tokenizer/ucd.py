"""Unicode character data as llama.cpp's unicode-data tables see it.

llama.cpp generates its tables from UnicodeData.txt (scripts/gen-unicode-data.py): one general
category per code point, a fixed White_Space list, the *simple* lowercase mapping and, for NFD,
only the first code point of the decomposition. Python's unicodedata gives the same answers
once those three simplifications are applied here.
"""

from __future__ import annotations

import unicodedata
from functools import cache

# White_Space code points (llama.cpp's unicode_set_whitespace)
WHITESPACE = frozenset([*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                        0x2028, 0x2029, 0x202F, 0x205F, 0x3000])


@cache
def category(cp: int) -> str:
    """First letter of the general category: L N P S M Z C (unassigned code points: 'C')."""
    return unicodedata.category(chr(cp))[0]


def is_whitespace(cp: int) -> bool:
    return cp in WHITESPACE


@cache
def tolower(cp: int) -> int:
    """Simple lowercase mapping (UnicodeData field 13), not Python's full str.lower()."""
    if cp == 0x130:  # the one code point whose full lowercase is longer than its simple one
        return 0x69
    low = chr(cp).lower()
    return ord(low) if len(low) == 1 else cp


@cache
def nfd_first(cp: int) -> int:
    """First code point of the NFD decomposition (what llama.cpp's NFD table keeps)."""
    return ord(unicodedata.normalize("NFD", chr(cp))[0])


def is_han(cp: int) -> bool:
    """llama.cpp's unicode_cpt_is_han ranges."""
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2EBEF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)
