"""Bounds that stop a training stream from spinning silently.

The training stream is endless (shards drawn with replacement), so a stream in which every sample is skipped, or
every shard is empty or unreadable, would read forever without yielding a batch; one in which nearly every sample is
skipped would train, slowly, on what is left. :class:`StreamGuard` counts consecutive skipped samples (reset by a
usable sample), the skipped share of the last ``skip_window`` samples (a stream where 999 of 1000 samples are bad
never skips 1000 in a row), and consecutive shards that yielded no sample (reset by a shard that yields one), and
raises :class:`DataStreamError` at a bound, naming the reasons and their counts, the shards, and a likely cause.
Validation is one finite pass and is not bounded.
"""

from __future__ import annotations

from collections import Counter, deque
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
    """A training stream that cannot yield a batch (every sample skipped, or every shard empty or unreadable), or
    one in which more than a set share of the samples is skipped."""


class StreamGuard:
    """Counts consecutive skipped samples, the skipped share of the last ``skip_window`` samples and consecutive
    shards that yielded no sample; raises at a bound.

    Args:
        max_consecutive_skips: skipped samples in a row that stop the stream (``None``: unbounded).
        max_consecutive_bad_shards: shards in a row that yielded no sample (empty, unreadable, a failing
            command) that stop the stream (``None``: unbounded).
        max_skipped_fraction: the stream stops when more than this share of the last ``skip_window`` samples was
            skipped (checked once that many were read; in ``(0, 1)``; ``None``: unbounded).
        skip_window: the number of most recent samples the share is taken over. The window spans epochs (it is
            kept by the worker's copy of the stream: persistent workers, or ``num_workers=0``).
        where: names the stream in messages (e.g. ``"rank 0"``); the DataLoader worker is added when raising.
    """

    def __init__(
        self,
        *,
        max_consecutive_skips: int | None,
        max_consecutive_bad_shards: int | None,
        max_skipped_fraction: float | None = None,
        skip_window: int = 1000,
        where: str = "",
    ) -> None:
        for name, v in (
            ("max_consecutive_skips", max_consecutive_skips),
            ("max_consecutive_bad_shards", max_consecutive_bad_shards),
            ("skip_window", skip_window),
        ):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"data.{name} must be an integer >= 1 (or null: unbounded), got {v!r}")
        if skip_window is None:
            raise ValueError("data.skip_window must be an integer >= 1, got None")
        if max_skipped_fraction is not None and (
            isinstance(max_skipped_fraction, bool)
            or not isinstance(max_skipped_fraction, (int, float))
            or not 0 < max_skipped_fraction < 1
        ):
            raise ValueError(
                f"data.max_skipped_fraction must be a number in (0, 1) (or null: unbounded), got {max_skipped_fraction!r}"
            )
        self.max_skips, self.max_bad_shards, self.where = max_consecutive_skips, max_consecutive_bad_shards, where
        self.max_fraction, self.window = max_skipped_fraction, skip_window
        # the last `window` samples: (skip reason or None, shard url); the counts of the skipped ones among them
        self.recent: deque[tuple[str | None, str | None]] = deque()
        self.recent_reasons: Counter = Counter()
        self.recent_urls: Counter = Counter()
        self.reset()

    def reset(self) -> None:
        """Start a new epoch: the runs in a row restart (the window of recent samples is kept)."""
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
        self._note(None, None)

    def sample_skipped(self, reason: str, sample: dict[str, Any]) -> None:
        url = sample.get("__url__")
        self._note(reason, None if url is None else str(url))
        self.skips += 1
        self.skip_reasons[reason] += 1
        self.skip_exts.update(k for k in sample if not k.startswith("__"))
        if url is not None and len(self.skip_urls) < _SHOW:
            self.skip_urls[str(url)] = None
        if self.max_skips is not None and self.skips >= self.max_skips:
            raise DataStreamError(self._skips_message())
        if self.max_fraction is not None and len(self.recent) == self.window:
            skipped = sum(self.recent_reasons.values())
            if skipped > self.max_fraction * self.window:
                raise DataStreamError(self._ratio_message(skipped, sample))

    def _note(self, reason: str | None, url: str | None) -> None:
        """Add one sample to the window of the last ``skip_window`` (dropping the oldest)."""
        if self.max_fraction is None:
            return
        if len(self.recent) == self.window:
            old_reason, old_url = self.recent.popleft()
            if old_reason is not None:
                self.recent_reasons[old_reason] -= 1
                self.recent_urls[old_url] -= 1
                if self.recent_reasons[old_reason] <= 0:
                    del self.recent_reasons[old_reason]
                if self.recent_urls[old_url] <= 0:
                    del self.recent_urls[old_url]
        self.recent.append((reason, url))
        if reason is not None:
            self.recent_reasons[reason] += 1
            self.recent_urls[url] += 1

    def _ratio_message(self, skipped: int, sample: dict[str, Any]) -> str:
        reasons = ", ".join(f"{r}={n}" for r, n in self.recent_reasons.most_common())
        exts = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "none"
        shards = [u for u, _ in self.recent_urls.most_common(_SHOW)]
        hint = HINTS.get(self.recent_reasons.most_common(1)[0][0], "")
        return (
            f"training stream ({self._where()}): {skipped} of the last {self.window} samples skipped, only "
            f"{self.window - skipped} usable (more than data.max_skipped_fraction={self.max_fraction} over "
            f"data.skip_window={self.window}): {reasons}; members of the last skipped sample: {exts}; "
            f"shards with the most skips: {shards}. Likely cause: {hint}."
        )

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
