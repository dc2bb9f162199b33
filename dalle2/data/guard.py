"""Bounds that stop a training stream from spinning silently.

The training stream is endless (shards drawn with replacement), so a stream in which every sample is skipped, or
every shard is empty or unreadable, would read forever without yielding a batch. :class:`StreamGuard` counts
consecutive skipped samples (reset by a usable sample) and consecutive shards that yielded no sample (reset by a
shard that yields one) and raises :class:`DataStreamError` at a bound, naming the reasons and their counts, the
shards, and a likely cause. Validation is one finite pass and is not bounded.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

HINTS = {
    "missing_embedding": "data=embeddings (load_embeddings=true) on shards without {key}.img_emb.npy / "
    ".txt_emb.npy / .txt_tokens.npy members? Write embedding shards with train/precompute_embeddings.py, or "
    "train on image shards (data=builtin / data=webdataset) with clip_ckpt=... to embed on the fly",
    "missing_image": "no {key}.jpg / .jpeg / .png / .webp member: images under another extension (see the "
    "extensions seen), or load_image=true on shards without images?",
    "missing_caption": "no {key}.txt caption members: captions under another extension (see the extensions seen)?",
    "empty_caption": "every caption is empty",
    "corrupt_image": "the image members do not decode: another format under the extension, or damaged shards?",
    "corrupt_embedding": "the .npy members do not load with numpy (allow_pickle=False)",
    "corrupt_json": "the {key}.json members are not JSON objects",
    "bad_shard": "the shards do not read: check the urls, the pipe:/object-store command and its credentials",
}
_SHOW = 5  # shard urls / extensions named in a message


class DataStreamError(RuntimeError):
    """A training stream that cannot yield a batch (every sample skipped, or every shard empty or unreadable)."""


class StreamGuard:
    """Counts consecutive skipped samples and consecutive shards that yielded no sample; raises at a bound.

    Args:
        max_consecutive_skips: skipped samples in a row that stop the stream (``None``: unbounded).
        max_consecutive_bad_shards: shards in a row that yielded no sample (empty, unreadable, a failing
            command) that stop the stream (``None``: unbounded).
        where: names the stream in messages (e.g. ``"rank 0"``); the DataLoader worker is added when raising.
    """

    def __init__(
        self,
        *,
        max_consecutive_skips: int | None,
        max_consecutive_bad_shards: int | None,
        where: str = "",
    ) -> None:
        for name, v in (
            ("max_consecutive_skips", max_consecutive_skips),
            ("max_consecutive_bad_shards", max_consecutive_bad_shards),
        ):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"data.{name} must be an integer >= 1 (or null: unbounded), got {v!r}")
        self.max_skips, self.max_bad_shards, self.where = max_consecutive_skips, max_consecutive_bad_shards, where
        self.reset()

    def reset(self) -> None:
        self.skips = 0
        self.skip_reasons: Counter = Counter()
        self.skip_exts: Counter = Counter()
        self.skip_urls: dict[str, None] = {}
        self.bad_shards = 0
        self.bad_reasons: Counter = Counter()
        self.bad_examples: dict[str, str] = {}

    # ----------------------------------------------------------------------------------------- samples

    def sample_ok(self) -> None:
        if self.skips:
            self.skips = 0
            self.skip_reasons.clear()
            self.skip_exts.clear()
            self.skip_urls.clear()

    def sample_skipped(self, reason: str, sample: dict[str, Any]) -> None:
        self.skips += 1
        self.skip_reasons[reason] += 1
        self.skip_exts.update(k for k in sample if not k.startswith("__"))
        url = sample.get("__url__")
        if url is not None and len(self.skip_urls) < _SHOW:
            self.skip_urls[str(url)] = None
        if self.max_skips is not None and self.skips >= self.max_skips:
            raise DataStreamError(self._skips_message())

    def _skips_message(self) -> str:
        reasons = ", ".join(f"{r}={n}" for r, n in self.skip_reasons.most_common())
        exts = ", ".join(e for e, _ in self.skip_exts.most_common(_SHOW * 2)) or "none"
        hint = HINTS.get(self.skip_reasons.most_common(1)[0][0], "")
        return (
            f"training stream ({self._where()}): {self.skips} consecutive samples skipped, none usable "
            f"(data.max_consecutive_skips={self.max_skips}): {reasons}; member extensions seen: {exts}; "
            f"shards: {list(self.skip_urls)}. Likely cause: {hint}."
        )

    # ----------------------------------------------------------------------------------------- shards

    def shard_done(self, url: str, samples: int, error: str | None) -> None:
        """A shard was read to its end (or to an error): ``samples`` raw samples, ``error`` why it is bad."""
        if samples > 0:
            self.bad_shards = 0
            self.bad_reasons.clear()
            self.bad_examples.clear()
            return
        why = "unreadable" if error else "empty (no samples)"
        self.bad_shards += 1
        self.bad_reasons[why] += 1
        if len(self.bad_examples) < _SHOW and url not in self.bad_examples:
            self.bad_examples[url] = error or why
        if self.max_bad_shards is not None and self.bad_shards >= self.max_bad_shards:
            raise DataStreamError(self._shards_message())

    def _shards_message(self) -> str:
        reasons = ", ".join(f"{r}={n}" for r, n in self.bad_reasons.most_common())
        examples = "; ".join(f"{u}: {e}" for u, e in self.bad_examples.items())
        return (
            f"training stream ({self._where()}): {self.bad_shards} consecutive shards yielded no sample "
            f"(data.max_consecutive_bad_shards={self.max_bad_shards}): {reasons}; e.g. {examples}. "
            f"Likely cause: {HINTS['bad_shard']}, and that the tars hold samples."
        )

    def _where(self) -> str:
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        worker = f"DataLoader worker {info.id} of {info.num_workers}" if info is not None else "main process"
        return ", ".join(p for p in (self.where, worker) if p)
