"""CLIP's text side before BPE: the byte <-> printable-char table, text cleaning (OpenAI's, or ``transformers``'
NFC-only one) and pre-tokenizing, and the one merge primitive the tokenizer and BPE training share.

Kept apart from :mod:`dalle2.clip.tokenizer` (ids, vocabularies, merges files) and :mod:`dalle2.clip.bpe_train`
(learning merges) so that both build on it without importing each other.
"""

from __future__ import annotations

import html
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import ftfy
import regex

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
END_OF_WORD = "</w>"
# Specials, English contractions, runs of letters, single digits, runs of anything else but whitespace.
_PRETOKENIZE = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
Cleaning = Literal["clip", "nfc"]
CLEANINGS = ("clip", "nfc")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable char table of GPT-2/CLIP (256 entries).

    Bytes that are already visible latin-1 chars (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for
    themselves; the other 68 bytes (controls, space, soft hyphen, ...) take chr(256), chr(257), ... in
    increasing byte order. The table's values, sorted by code point, are ids 0..255.
    """
    visible = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1))
    visible |= set(range(ord("®"), ord("ÿ") + 1))
    table: dict[int, str] = {}
    extra = 0
    for byte in range(256):
        if byte in visible:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def clean_text(text: str) -> str:
    """CLIP's cleaning: ftfy ``fix_text``, HTML unescape twice, whitespace runs -> one space, strip, lower."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


@lru_cache(maxsize=1)
def _white_space() -> regex.Pattern:
    return regex.compile(r"\p{White_Space}+")


def clean_text_nfc(text: str) -> str:
    """``transformers``' CLIPTokenizer normaliser: Unicode NFC, runs of (Unicode) white space -> one space, lower
    case."""
    text = _white_space().sub(" ", unicodedata.normalize("NFC", text))
    return "".join(map(str.lower, text))  # char by char, as the Rust normaliser: no final-sigma rule


def _cleaner(cleaning: str):
    if cleaning == "clip":
        return clean_text
    if cleaning == "nfc":
        return clean_text_nfc
    raise ValueError(f"unknown text cleaning {cleaning!r}; expected one of {list(CLEANINGS)}")


@lru_cache(maxsize=1)
def _pretokenizer() -> regex.Pattern:
    return regex.compile(_PRETOKENIZE, regex.IGNORECASE)


def pretokenize(text: str, cleaning: Cleaning = "clip") -> list[str]:
    """Cleaned text -> pre-tokens (words, digits, punctuation runs, specials), each as byte-chars.

    ``"a café!"`` -> ``["a", "cafÃ©", "!"]`` (é is two UTF-8 bytes, each shown as its table char).
    """
    table = bytes_to_unicode()
    cleaned = _cleaner(cleaning)(text)
    return ["".join(table[b] for b in piece.encode("utf-8")) for piece in _pretokenizer().findall(cleaned)]


def _merge_pair(word: Sequence[str], first: str, second: str) -> list[str]:
    """Replace each non-overlapping (first, second) in ``word``, scanning left to right, by first+second."""
    out: list[str] = []
    i, n = 0, len(word)
    while i < n:
        if i < n - 1 and word[i] == first and word[i + 1] == second:
            out.append(first + second)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _word_symbols(piece: str) -> list[str]:
    """A pre-token as its initial symbols: one per byte-char, the last one marked as the word's end."""
    return [*piece[:-1], piece[-1] + END_OF_WORD]
