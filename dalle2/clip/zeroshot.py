"""Zero-shot image classification with a CLIP, open_clip's ImageNet protocol.

Class names and prompt templates come from text files (one a line; blank lines and ``#`` comments skipped; a
template holds ``{}`` where the class name goes, e.g. ``a photo of a {}.``).  Each class's weight is the mean of its
templates' L2-normalised text embeddings, renormalised (:func:`zeroshot_classifier`); an image's class scores are
cosine similarities with these weights, and top-k accuracy counts an image right when its class ranks within the
first k, ties counted as a uniformly random tie-break would in expectation (as :mod:`dalle2.clip.retrieval` does and
for the same reason: a model whose every class score is equal scores chance, 1/C, not 100 %).  NaN/inf image
features or class weights raise ``ValueError``.

Shipped files for the built-in data (``dalle2/data/assets/zeroshot/``; pass the name instead of a path):
``builtin_shapes`` (4 classes), ``builtin_colors`` (5), ``builtin_color_shapes`` (20, "red circle"...) and
``builtin_templates``.  A sample's class is read from its ``.json`` with a format string over its fields
(:func:`class_labels`: ``"{shape}"``, ``"{color}"``, ``"{color} {shape}"``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from dalle2.clip.retrieval import check_finite, expected_hits

__all__ = [
    "ASSETS",
    "ZeroShotTask",
    "read_lines",
    "resolve_file",
    "zeroshot_classifier",
    "class_labels",
    "topk_accuracy",
    "zeroshot_metrics",
]

ASSETS = Path(__file__).resolve().parent.parent / "data" / "assets" / "zeroshot"


def resolve_file(name: str | Path) -> Path:
    """``name`` if it is a file, else the shipped asset ``ASSETS/<name>.txt``; a clear error otherwise."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = ASSETS / f"{name}.txt"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in ASSETS.glob("*.txt"))
    raise FileNotFoundError(f"{name}: no such file, nor a shipped zero-shot file (one of {names})")


def read_lines(name: str | Path) -> list[str]:
    """The non-blank, non-comment lines of a class-name or template file (a path or a shipped name), stripped."""
    path = resolve_file(name)
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ValueError(f"{path} holds no lines")
    return lines


@dataclass
class ZeroShotTask:
    """Class names, prompt templates (``{}`` for the name) and how a sample's class is read from its json."""

    classnames: list[str]
    templates: list[str]
    label: str = "{shape}"
    ks: tuple[int, ...] = (1, 5)
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        bad = [t for t in self.templates if t.count("{}") != 1]
        if bad:
            raise ValueError(f"each template needs exactly one '{{}}' for the class name; got {bad[:3]}")
        if len(set(self.classnames)) != len(self.classnames):
            dup = sorted({c for c in self.classnames if self.classnames.count(c) > 1})
            raise ValueError(f"class names must be unique; repeated: {dup[:5]}")
        self.ks = tuple(int(k) for k in self.ks)
        self.index = {c: i for i, c in enumerate(self.classnames)}

    @classmethod
    def from_files(
        cls, classnames: str | Path, templates: str | Path, *, label: str = "{shape}", ks: Sequence[int] = (1, 5)
    ) -> "ZeroShotTask":
        return cls(classnames=read_lines(classnames), templates=read_lines(templates), label=label, ks=tuple(ks))


@torch.no_grad()
def zeroshot_classifier(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(C, D) unit-norm class weights: per class, the mean of ``normalize(encode_text(tokenizer(template(c))))`` over
    the templates, renormalised.  ``encode_text``: tokens (B, L) -> (B, D); ``tokenizer``: list[str] -> (B, L)."""
    texts = [t.replace("{}", c) for c in classnames for t in templates]
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start : start + batch_size])
        chunks.append(F.normalize(encode_text(tokens.to(device) if device is not None else tokens).float(), dim=-1))
    emb = torch.cat(chunks).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def class_labels(metas: Sequence[dict | None], task: ZeroShotTask) -> torch.Tensor:
    """(B,) long class index of each sample from its json (``task.label`` formatted with its fields), -1 when the
    json lacks a field or names no known class (such samples are counted, not scored)."""
    out = []
    for meta in metas:
        try:
            name = task.label.format(**(meta or {}))
        except (KeyError, IndexError, ValueError, AttributeError):
            out.append(-1)
            continue
        out.append(task.index.get(name, -1))
    return torch.tensor(out, dtype=torch.long)


def _topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    check_finite(logits, metric="zero-shot top-k accuracy", what="class-score")
    correct = logits.gather(1, labels[:, None])
    counts = torch.stack([(logits > correct).sum(dim=1), (logits == correct).sum(dim=1) - 1], dim=1)
    return {int(k): float(expected_hits(counts, int(k)).sum()) for k in ks if k <= logits.shape[1]}


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """logits (N, C), labels (N,) in [0, C) -> {k: expected fraction of rows whose label ranks within the first k}
    for each k <= C; a row whose label ties with t other classes after b strictly higher ones counts
    ``clamp((k - b) / (t + 1), 0, 1)`` (a random tie-break, in expectation)."""
    return {k: v / max(len(labels), 1) for k, v in _topk_hits(logits, labels, ks).items()}


@torch.no_grad()
def zeroshot_metrics(
    image_features: torch.Tensor,
    labels: torch.Tensor,
    classifier: torch.Tensor,
    *,
    ks: Sequence[int] = (1, 5),
    chunk_size: int = 4096,
) -> dict[str, float]:
    """image_features (N, D) (normalised here), labels (N,) (-1: unlabelled, skipped), classifier (C, D) ->
    ``{"top1", "top5" (k <= C only), "num_samples", "num_unlabelled", "num_classes"}``; memory O(chunk_size x C).
    NaN/inf features or class weights raise ``ValueError`` naming how many rows."""
    keep = (labels >= 0).to(image_features.device)
    check_finite(image_features[keep], metric="zeroshot_metrics", what="image embedding")
    check_finite(classifier, metric="zeroshot_metrics", what="class weight")
    img, lab = F.normalize(image_features[keep].float(), dim=-1), labels.to(image_features.device)[keep]
    n = int(img.shape[0])
    out: dict[str, float] = {"num_samples": n, "num_unlabelled": int((~keep).sum()), "num_classes": len(classifier)}
    if n == 0:
        return out
    hits = {int(k): 0.0 for k in ks if k <= len(classifier)}
    weights = classifier.to(img.device, torch.float32)
    for start in range(0, n, chunk_size):
        chunk = _topk_hits(img[start : start + chunk_size] @ weights.t(), lab[start : start + chunk_size], ks)
        for k, v in chunk.items():
            hits[k] += v
    out.update({f"top{k}": v / n for k, v in hits.items()})
    return out
