"""CLIP's byte-level BPE tokenizer: text cleaning, pre-tokenizing, merges, specials, padding — and BPE training.

Ids follow OpenAI CLIP's layout, so a tokenizer loaded from OpenAI's ``bpe_simple_vocab_16e6.txt.gz``
gives the ids pretrained CLIP checkpoints expect::

    ids 0..255        the 256 bytes, each as a printable unicode char (see :func:`bytes_to_unicode`)
    ids 256..511      the same chars + "</w>" (a symbol that ends a word)
    ids 512..         one symbol per merge, in merge order
    last two ids      "<|startoftext|>", "<|endoftext|>"   (so argmax(ids) finds the end token)

A merges file has a version header on its first line, then one merge per line: two symbols separated
by one space (``"i n"``, ``"t h</w>"``). :func:`train_bpe` + :func:`write_merges` produce such a file::

    python -m dalle2.clip.tokenizer train --urls '/data/{00000..00099}.tar' --vocab-size 8192 --out bpe.txt.gz
    python -m dalle2.clip.tokenizer encode --merges bpe.txt.gz "a photo of a cat"

(Learning merges lives in :mod:`dalle2.clip.bpe_train`.)  Two things differ between CLIP tokenizers that share a
vocabulary: the text cleaning (``cleaning="clip"``: OpenAI's ftfy + HTML unescape; ``"nfc"``: Hugging Face
``transformers``' ``CLIPTokenizer``, which NFC-normalises, folds whitespace and lower-cases, nothing else) and the
padding id (OpenAI pads with 0, ``transformers`` CLIP tokenizers usually with the end token).  Both are part of
:class:`Vocabulary`, so a stage bound to a vocabulary tokenizes as its CLIP did.  Which positions are text does not
depend on the padding: everything up to the first end token (:func:`dalle2.clip.model.text_mask`).

A CLIP is bound to the vocabulary it was trained with: :class:`Vocabulary` (the merges, their sha256, the id
count) is stored in its checkpoint and carried by the stages that consume its text features; :func:`resolve_tokenizer`
gives a consumer that vocabulary's tokenizer, and raises :class:`VocabularyMismatchError` for another one.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import regex
import torch

from dalle2.clip.pretokenize import (  # noqa: F401 - clean_text, bytes_to_unicode: part of this module's API
    CLEANINGS,
    END_OF_WORD,
    EOT,
    SOT,
    Cleaning,
    _cleaner,
    _merge_pair,
    _word_symbols,
    bytes_to_unicode,
    clean_text,
    clean_text_nfc,
    pretokenize,
)

DEFAULT_CONTEXT_LENGTH = 77
# OpenAI's CLIP keeps only the first 49152 - 256 - 2 merges of its file: 49408 ids in all.
CLIP_NUM_MERGES = 49152 - 256 - 2
MERGES_HEADER = "#version: 0.2"
BUILTIN_VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "bpe_builtin.txt.gz")

_WORD_CACHE_SIZE = 100_000

# --------------------------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """CLIP byte-level BPE: ``tok(texts) -> (B, context_length)`` ids with start/end tokens and zero padding.

    Build with :meth:`from_file` (a merges file, e.g. OpenAI's ``bpe_simple_vocab_16e6.txt.gz``) or
    :meth:`default` (the small vocabulary shipped with the package). Picklable (dataloader workers).
    """

    def __init__(
        self,
        *,
        merges: Sequence[tuple[str, str]],
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        name: str = "custom",
        pad_id: int = 0,
        cleaning: Cleaning = "clip",
        split_tokens: Sequence[str] = (),
    ):
        _cleaner(cleaning)  # a bad name fails here
        if context_length < 2:
            raise ValueError(f"context_length={context_length} must be >= 2 (room for start and end tokens)")
        byte_chars = sorted(bytes_to_unicode().values())
        vocab = byte_chars + [c + END_OF_WORD for c in byte_chars]
        known = set(vocab)
        for i, (first, second) in enumerate(merges):
            if first not in known or second not in known:
                bad = first if first not in known else second
                raise ValueError(
                    f"merge {i} ({first!r}, {second!r}): symbol {bad!r} is neither a byte nor made by an earlier merge"
                )
            known.add(first + second)
            vocab.append(first + second)
        vocab += [SOT, EOT]
        if not 0 <= int(pad_id) < len(vocab):
            raise ValueError(f"pad_id={pad_id} is outside the vocabulary (0..{len(vocab) - 1})")
        self.pad_id, self.cleaning = int(pad_id), str(cleaning)
        # literal strings encoded as their one id wherever they occur, before cleaning (transformers' added tokens,
        # e.g. Karlo's "!" padding token: "!!" is two of them, not "!" + "!</w>")
        self.split_tokens = tuple(str(t) for t in split_tokens)
        unknown = [t for t in self.split_tokens if t not in vocab]
        if unknown:
            raise ValueError(f"split tokens {unknown} are not in the vocabulary")
        self._splitter = (
            regex.compile("(" + "|".join(regex.escape(t) for t in self.split_tokens) + ")")
            if self.split_tokens
            else None
        )
        self.merges: list[tuple[str, str]] = [(a, b) for a, b in merges]
        self.context_length = int(context_length)
        self.name = str(name)  # where the merges came from (a file name), for messages
        self._vocab = vocab
        # Two merges may make the same string; like CLIP, the later id wins for encoding.
        self._encoder = {symbol: i for i, symbol in enumerate(vocab)}
        self._ranks = {pair: i for i, pair in enumerate(self.merges)}
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        self._cache: collections.OrderedDict[str, list[int]] = collections.OrderedDict()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, *, max_merges: int | None = None, context_length: int = DEFAULT_CONTEXT_LENGTH
    ) -> "Tokenizer":
        """Load a merges file (gzip or plain text; first line a ``#version`` header).

        ``max_merges=None`` keeps at most 48894 merges, as CLIP does with OpenAI's file (49408 ids).
        """
        merges = read_merges(path, max_merges=CLIP_NUM_MERGES if max_merges is None else max_merges)
        return cls(merges=merges, context_length=context_length, name=os.path.basename(os.fspath(path)))

    @classmethod
    def from_merges_text(
        cls,
        text: str,
        *,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        name: str = "custom",
        pad_id: int = 0,
        cleaning: Cleaning = "clip",
        split_tokens: Sequence[str] = (),
    ) -> "Tokenizer":
        """A tokenizer from the text of a merges file (what :class:`Vocabulary` stores)."""
        lines = text.split("\n")
        return cls(
            merges=_parse_merges(lines[0], enumerate(lines[1:], start=2), name),
            context_length=context_length,
            name=name,
            pad_id=pad_id,
            cleaning=cleaning,
            split_tokens=split_tokens,
        )

    @classmethod
    def default(cls, *, context_length: int = DEFAULT_CONTEXT_LENGTH) -> "Tokenizer":
        """The vocabulary shipped with the package (``dalle2/clip/assets/bpe_builtin.txt.gz``)."""
        return cls.from_file(BUILTIN_VOCAB, context_length=context_length)

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        """Number of ids (the text embedding table's size); the end token is ``vocab_size - 1``."""
        return len(self._vocab)

    @cached_property
    def vocabulary(self) -> "Vocabulary":
        """This tokenizer's :class:`Vocabulary` (merges, sha256, size, name)."""
        return Vocabulary.from_merges(
            self.merges, name=self.name, pad_id=self.pad_id, cleaning=self.cleaning, split_tokens=self.split_tokens
        )

    @property
    def sot_token(self) -> int:
        return len(self._vocab) - 2

    @property
    def eot_token(self) -> int:
        return len(self._vocab) - 1

    # ------------------------------------------------------------------ encoding

    def _bpe(self, piece: str) -> list[int]:
        """Ids of one pre-token (byte-chars), merging the lowest-ranked pair until none is left."""
        cached = self._cache.get(piece)
        if cached is not None:
            self._cache.move_to_end(piece)
            return cached
        if piece in (SOT, EOT):  # CLIP turns literal specials in the text into the special tokens
            ids = [self._encoder[piece]]
        else:
            word = _word_symbols(piece)
            ranks = self._ranks
            while len(word) > 1:
                pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
                best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
                if best not in ranks:
                    break
                word = _merge_pair(word, *best)
            ids = [self._encoder[s] for s in word]
        self._cache[piece] = ids
        if len(self._cache) > _WORD_CACHE_SIZE:
            self._cache.popitem(last=False)
        return ids

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` after cleaning and lower-casing, without start/end tokens."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids: list[int] = []
        for part in self._splitter.split(text) if self._splitter is not None else [text]:
            if part in self.split_tokens:
                ids.append(self._encoder[part])
                continue
            for piece in pretokenize(part, self.cleaning):
                ids.extend(self._bpe(piece))
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of ``ids`` (start/end tokens and padding dropped, word ends -> spaces, stripped)."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects one sequence of ids, got a tensor of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < len(self._vocab):
                raise ValueError(f"id {i} is outside the vocabulary (0..{len(self._vocab) - 1})")
        # Trailing pad ids are padding (id 0 is "!" without a word end, which never ends an encoded text).
        while ids and ids[-1] in (0, self.pad_id):
            ids.pop()
        symbols = [self._vocab[i] for i in ids if i not in (self.sot_token, self.eot_token)]
        return self._symbols_to_text(symbols)

    def _symbols_to_text(self, symbols: list[str]) -> str:
        chars = "".join(symbols)
        out = bytearray()
        for part in chars.split(END_OF_WORD):
            out.extend(self._byte_decoder[c] for c in part)
            out.extend(b" ")
        return out.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | Sequence[str], *, context_length: int | None = None) -> torch.Tensor:
        """Texts -> ``(B, L)`` long ids: start, text, end, padding (``pad_id``); ``L = context_length or
        self.context_length``.

        Too long texts are cut so that the end token is still the last one (position ``L - 1``).
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(
                f"texts must be a str or a list of str, got {type(texts).__name__}"
                + (
                    ""
                    if not isinstance(texts, (list, tuple))
                    else f" holding {sorted({type(t).__name__ for t in texts})}"
                )
            )
        length = self.context_length if context_length is None else int(context_length)
        if length < 2:
            raise ValueError(f"context_length={length} must be >= 2 (room for start and end tokens)")
        out = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_token, *self.encode(text)][: length - 1] + [self.eot_token]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    # ------------------------------------------------------------------ pickling / repr

    def __getstate__(self) -> dict:
        return {
            "merges": self.merges,
            "context_length": self.context_length,
            "name": self.name,
            "pad_id": self.pad_id,
            "cleaning": self.cleaning,
            "split_tokens": self.split_tokens,
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(
            merges=state["merges"],
            context_length=state["context_length"],
            name=state.get("name", "custom"),
            pad_id=state.get("pad_id", 0),
            cleaning=state.get("cleaning", "clip"),
            split_tokens=state.get("split_tokens", ()),
        )

    def __repr__(self) -> str:
        extra = (
            "" if (self.pad_id, self.cleaning) == (0, "clip") else f", pad_id={self.pad_id}, cleaning={self.cleaning}"
        )
        return f"Tokenizer({self.name}, vocab_size={self.vocab_size}, context_length={self.context_length}{extra})"


def get_tokenizer(path: str | os.PathLike | None = None, *, context_length: int = DEFAULT_CONTEXT_LENGTH) -> Tokenizer:
    """The tokenizer of a merges file at ``path``, or the shipped default vocabulary when ``path`` is None."""
    if path is None:
        return Tokenizer.default(context_length=context_length)
    return Tokenizer.from_file(path, context_length=context_length)


# --------------------------------------------------------------------------------------------- CLIP binding


class VocabularyMismatchError(ValueError):
    """A tokenizer that is not the vocabulary a CLIP (or a stage built on its text features) was trained with."""


@dataclass(frozen=True)
class Vocabulary:
    """The BPE vocabulary a CLIP was trained with: ``merges`` (the merges file's text), its ``sha256``, the id count
    ``vocab_size``, a ``name`` (the file it came from), the padding id and the text cleaning its tokenizer uses
    (not hashed: the sha256 names the merges).  Plain strings and ints: checkpoints store it as is."""

    merges: str
    sha256: str
    vocab_size: int
    name: str = "custom"
    pad_id: int = 0
    cleaning: str = "clip"
    split_tokens: tuple[str, ...] = ()

    @classmethod
    def from_merges(
        cls,
        merges: Sequence[tuple[str, str]],
        *,
        name: str = "custom",
        pad_id: int = 0,
        cleaning: str = "clip",
        split_tokens: Sequence[str] = (),
    ) -> "Vocabulary":
        text = merges_text(merges)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return cls(text, digest, 2 * 256 + len(merges) + 2, name, int(pad_id), str(cleaning), tuple(split_tokens))

    @classmethod
    def from_dict(cls, d: dict, *, merges: str | None = None, source: str = "checkpoint") -> "Vocabulary":
        """From :meth:`to_dict` (``merges`` given apart when the dict has none); the merges must hash to the
        stored sha256 and count to its vocab_size (else :class:`VocabularyMismatchError`)."""
        text = d.get("merges") if merges is None else merges
        if not isinstance(text, str):
            raise VocabularyMismatchError(f"{source}: its vocabulary record has no merges")
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        n_merges = sum(1 for line in text.split("\n")[1:] if line)
        if digest != d.get("sha256") or 514 + n_merges != int(d.get("vocab_size", -1)):
            raise VocabularyMismatchError(
                f"{source}: the stored vocabulary's merges do not match its sha256 / size "
                f"({str(d.get('sha256'))[:12]}, {d.get('vocab_size')} ids): the file was altered"
            )
        pad_id, cleaning = int(d.get("pad_id", 0)), str(d.get("cleaning", "clip"))
        split = tuple(str(t) for t in d.get("split_tokens") or ())
        return cls(text, digest, 514 + n_merges, str(d.get("name", "custom")), pad_id, cleaning, split)

    def to_dict(self, *, with_merges: bool = True) -> dict:
        out = {"name": self.name, "sha256": self.sha256, "vocab_size": self.vocab_size}
        if (self.pad_id, self.cleaning, self.split_tokens) != (0, "clip", ()):  # older readers ignore them
            out.update(pad_id=self.pad_id, cleaning=self.cleaning, split_tokens=list(self.split_tokens))
        return {**out, "merges": self.merges} if with_merges else out

    def describe(self) -> str:
        return f"{self.name} ({self.vocab_size} ids, sha256 {self.sha256[:12]})"

    def tokenizer(self, *, context_length: int = DEFAULT_CONTEXT_LENGTH) -> Tokenizer:
        tok = Tokenizer.from_merges_text(
            self.merges,
            context_length=context_length,
            name=self.name,
            pad_id=self.pad_id,
            cleaning=self.cleaning,
            split_tokens=self.split_tokens,
        )
        tok.__dict__["vocabulary"] = self  # the cached property: no need to hash again
        return tok


def resolve_tokenizer(
    vocabulary: Vocabulary | None,
    tokenizer: "str | os.PathLike | Tokenizer | None" = None,
    *,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    model_vocab_size: int | None = None,
    owner: str = "the CLIP",
) -> Tokenizer:
    """The tokenizer a consumer of ``owner``'s text features must use.

    ``tokenizer`` None: ``vocabulary``'s (the shipped default when ``owner`` records none).  A merges file or a
    ``Tokenizer``: checked against ``vocabulary`` by hash; when ``owner`` records no vocabulary (older checkpoints,
    OpenAI weights), its size must equal ``model_vocab_size`` (the text embedding's rows).  Else
    :class:`VocabularyMismatchError`."""
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    elif tokenizer is not None:
        tok = Tokenizer.from_file(tokenizer, context_length=context_length)
    elif vocabulary is not None:
        tok = vocabulary.tokenizer(context_length=context_length)
    else:
        tok = Tokenizer.default(context_length=context_length)
    if vocabulary is not None:
        if tok.vocabulary.sha256 != vocabulary.sha256:
            raise VocabularyMismatchError(
                f"tokenizer {tok.vocabulary.describe()} is not the vocabulary {owner} was trained with, "
                f"{vocabulary.describe()}: leave the tokenizer unset to use {owner}'s own"
            )
    elif model_vocab_size is not None and tok.vocab_size != int(model_vocab_size):
        raise VocabularyMismatchError(
            f"tokenizer {tok.vocabulary.describe()} has {tok.vocab_size} ids but {owner}'s text embedding has "
            f"{model_vocab_size} rows and it records no vocabulary: name the merges file it was trained with "
            "(tokenizer_path=...; OpenAI's bpe_simple_vocab_16e6.txt.gz for 49408)"
        )
    return tok


# --------------------------------------------------------------------------------------------- merges files


def _open_text(path: str | os.PathLike):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"merges file not found: {path}")
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8") if gzipped else open(path, encoding="utf-8")


def _parse_merges(
    header: str, numbered_lines: Iterable[tuple[int, str]], source: str, max_merges: int | None = None
) -> list[tuple[str, str]]:
    if "#version" not in header:
        raise ValueError(f"{source} line 1: expected a version header like {MERGES_HEADER!r}, got {header[:80]!r}")
    merges: list[tuple[str, str]] = []
    for lineno, line in numbered_lines:
        if max_merges is not None and len(merges) >= max_merges:
            break
        line = line.rstrip("\n").rstrip("\r")
        if not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(f"{source} line {lineno}: expected two symbols separated by one space, got {line[:80]!r}")
        merges.append((parts[0], parts[1]))
    return merges


def read_merges(path: str | os.PathLike, *, max_merges: int | None = None) -> list[tuple[str, str]]:
    """Merges of a CLIP-format file: a ``#version`` header line, then ``"first second"`` per line.

    Reads at most ``max_merges`` merges (None: all). A malformed line raises ``ValueError`` naming it.
    """
    if max_merges is not None and max_merges < 0:
        raise ValueError(f"max_merges={max_merges} must be >= 0")
    with _open_text(path) as f:
        header = f.readline().rstrip("\n")
        return _parse_merges(header, enumerate(f, start=2), os.fspath(path), max_merges)


def merges_text(merges: Sequence[tuple[str, str]]) -> str:
    """The text of a merges file in CLIP's format (header line, then one ``"first second"`` per line)."""
    for i, pair in enumerate(merges):
        if len(pair) != 2 or any(not s or " " in s or "\n" in s for s in pair):
            raise ValueError(f"merge {i} {pair!r}: expected two non-empty symbols without spaces")
    return MERGES_HEADER + "\n" + "".join(f"{a} {b}\n" for a, b in merges)


def write_merges(merges: Sequence[tuple[str, str]], path: str | os.PathLike) -> str:
    """Write ``merges`` in CLIP's format (gzip when ``path`` ends in ``.gz``); returns the path."""
    path = os.fspath(path)
    text = merges_text(merges)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".gz"):
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(text.encode("utf-8"))
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return path


# --------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dalle2.clip.tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="learn a merges file from captions")
    train.add_argument(
        "--urls", nargs="+", required=True, help="brace-expanded .tar shards or .txt files (one caption a line)"
    )
    train.add_argument("--vocab-size", type=int, default=8192, help="ids in the resulting vocabulary (at most)")
    train.add_argument("--out", required=True, help="merges file to write (.gz: gzipped)")
    train.add_argument("--max-texts", type=int, default=None, help="read at most this many captions")
    train.add_argument("--min-frequency", type=int, default=2, help="stop when no pair is seen this often")
    enc = sub.add_parser("encode", help="print the ids of texts")
    enc.add_argument("texts", nargs="+")
    enc.add_argument("--merges", default=None, help="merges file (default: the shipped vocabulary)")
    enc.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="pad/truncate to this length (default: no specials, no padding)",
    )
    args = parser.parse_args(argv)

    if args.command == "train":
        from dalle2.clip.bpe_train import iter_texts, train_bpe

        texts = list(iter_texts(args.urls, max_texts=args.max_texts))
        if not texts:
            parser.error(f"no captions found in {args.urls}")
        merges = train_bpe(texts, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
        write_merges(merges, args.out)
        tok = Tokenizer(merges=merges)
        print(f"{len(texts)} captions -> {len(merges)} merges, vocab_size={tok.vocab_size}, wrote {args.out}")
    else:
        tok = get_tokenizer(args.merges)
        for text in args.texts:
            ids = tok(text, context_length=args.context_length)[0].tolist() if args.context_length else tok.encode(text)
            print(" ".join(map(str, ids)))


if __name__ == "__main__":
    main()
