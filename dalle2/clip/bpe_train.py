"""Learning a CLIP-format BPE vocabulary from captions: :func:`train_bpe` (merges from texts) and :func:`iter_texts`
(captions from webdataset shards or text files).  The merges it learns are written with
:func:`dalle2.clip.tokenizer.write_merges` and read back by :class:`dalle2.clip.tokenizer.Tokenizer`::

    python -m dalle2.clip.tokenizer train --urls '/data/{00000..00099}.tar' --vocab-size 8192 --out bpe.txt.gz

Texts are cleaned and pre-tokenized exactly as the tokenizer encodes them (:func:`dalle2.clip.tokenizer.pretokenize`),
so every learned merge is one the tokenizer applies.
"""

from __future__ import annotations

import collections
import gzip
import heapq
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence

from dalle2.clip.pretokenize import EOT, SOT, _merge_pair, _word_symbols, pretokenize

__all__ = ["iter_texts", "train_bpe"]


def train_bpe(texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2) -> list[tuple[str, str]]:
    """Learn up to ``vocab_size - 514`` merges from ``texts`` (the tokenizer then has <= ``vocab_size`` ids).

    Texts are cleaned and pre-tokenized as :meth:`Tokenizer.encode` does; words are counted once, pair
    counts are kept up to date incrementally (only words holding the merged pair are touched) and the
    most frequent pair comes off a lazy max-heap (ties: the smaller pair). Stops early when no pair is
    seen ``min_frequency`` times.
    """
    num_merges = vocab_size - 2 * 256 - 2
    if num_merges < 0:
        raise ValueError(f"vocab_size={vocab_size} must be >= 514 (256 bytes, 256 word-end bytes, 2 specials)")
    text_counts = collections.Counter(texts)
    for t in text_counts:
        if not isinstance(t, str):
            raise TypeError(f"train_bpe expects texts as str, got {type(t).__name__}")
    word_counts: collections.Counter[str] = collections.Counter()
    for text, n in text_counts.items():
        for piece in pretokenize(text):
            if piece not in (SOT, EOT):
                word_counts[piece] += n
    words = [_word_symbols(w) for w in word_counts]
    freqs = list(word_counts.values())

    pair_counts: collections.defaultdict[tuple[str, str], int] = collections.defaultdict(int)
    where: collections.defaultdict[tuple[str, str], set[int]] = collections.defaultdict(set)
    for idx, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq
            where[pair].add(idx)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg:
            continue  # stale entry
        if -neg < min_frequency:
            break
        merges.append(pair)
        touched: set[tuple[str, str]] = set()
        for idx in where.pop(pair):
            word, freq = words[idx], freqs[idx]
            new = _merge_pair(word, *pair)
            if len(new) == len(word):
                continue  # stale index: the pair was merged away by an earlier merge
            for p in zip(word, word[1:]):
                pair_counts[p] -= freq
                touched.add(p)
            for p in zip(new, new[1:]):
                pair_counts[p] += freq
                where[p].add(idx)
                touched.add(p)
            words[idx] = new
        pair_counts.pop(pair, None)
        for p in touched:
            count = pair_counts.get(p, 0)
            if count > 0:
                heapq.heappush(heap, (-count, p))
            elif p in pair_counts:
                del pair_counts[p]
    return merges


def iter_texts(urls: Sequence[str], *, max_texts: int | None = None) -> Iterator[str]:
    """Captions from brace-expanded URLs: webdataset ``.tar`` shards (their ``.txt`` members) or ``.txt``
    files (one caption per line, blank lines skipped). Stops after ``max_texts``."""
    from braceexpand import braceexpand

    count = 0
    for spec in urls:
        for path in braceexpand(spec):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"caption source not found: {path} (from {spec!r})")
            if path.endswith((".tar", ".tar.gz", ".tgz")):
                with tarfile.open(path) as tar:
                    for member in tar:
                        if not (member.isfile() and member.name.endswith(".txt")):
                            continue
                        data = tar.extractfile(member).read()
                        yield data.decode("utf-8", errors="replace").strip()
                        count += 1
                        if max_texts is not None and count >= max_texts:
                            return
            elif path.endswith((".txt", ".txt.gz")):
                opener = gzip.open if path.endswith(".gz") else open
                with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                    for line in f:
                        if line.strip():
                            yield line.strip()
                            count += 1
                            if max_texts is not None and count >= max_texts:
                                return
            else:
                raise ValueError(f"caption source {path}: expected a .tar shard or a .txt file")
