"""How the unCLIP cascade samples, per stage: :class:`StageSettings` (steps, sampler, guidance, eta) and
:class:`SamplingSettings` (one per stage, prior reranking, thresholding, the upsamplers' augmentation level), from
keyword arguments, a dict (a converted directory's ``pipeline.json``) or an entry point's Hydra config.  Used by
:class:`dalle2.pipeline.UnCLIPPipeline` and every entry point that samples."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["StageSettings", "SamplingSettings"]


@dataclass(frozen=True)
class StageSettings:
    """How one diffusion stage samples: ``steps``, ``sampler`` (ddpm | ddim | dpmpp_2m | euler | heun),
    ``guidance_scale`` (classifier-free guidance; 1 = off) and ``eta`` (ddim only)."""

    steps: int = 50
    sampler: str = "ddim"
    guidance_scale: float = 1.0
    eta: float = 0.0


@dataclass(frozen=True)
class SamplingSettings:
    """Per-stage sampling settings of :class:`UnCLIPPipeline`.

    ``n_prior_samples``: prior candidates per prompt, the one most similar to the text embedding is kept (DALL-E 2
    reranking).  ``threshold``: x0 clipping of the decoder and upsamplers (static | dynamic | none).
    ``upsampler_aug_level``: low-res noise augmentation level when upsampling (None: each upsampler's own
    ``sample_aug_level``).  The upsamplers are not text-conditioned: their ``guidance_scale`` must stay 1.
    """

    prior: StageSettings = field(default_factory=lambda: StageSettings(steps=64, guidance_scale=1.0))
    # decoder: DPM-Solver++(2M) 25 steps matches 250 steps on the demo checkpoints (docs/sweeps.md), at half 50 DDIM's cost
    decoder: StageSettings = field(
        default_factory=lambda: StageSettings(steps=25, sampler="dpmpp_2m", guidance_scale=3.0)
    )
    upsampler: StageSettings = field(default_factory=lambda: StageSettings(steps=25))
    n_prior_samples: int = 2
    threshold: Literal["static", "dynamic", "none"] = "static"
    upsampler_aug_level: int | None = None

    STAGES = ("prior", "decoder", "upsampler")

    def __post_init__(self) -> None:
        for name in self.STAGES:
            st = getattr(self, name)
            if isinstance(st, dict):
                object.__setattr__(self, name, StageSettings(**st))
            elif not isinstance(st, StageSettings):
                raise TypeError(f"SamplingSettings.{name} must be StageSettings or a dict, got {type(st).__name__}")
            st = getattr(self, name)
            least = 0 if name == "upsampler" else 1  # upsampler steps 0: its deterministic estimate alone
            if int(st.steps) < least:
                raise ValueError(f"{name}.steps must be >= {least}, got {st.steps}")
        if self.upsampler.guidance_scale != 1.0:
            raise ValueError("the upsamplers have no classifier-free guidance: upsampler.guidance_scale must be 1")
        if int(self.n_prior_samples) < 1:
            raise ValueError(f"n_prior_samples must be >= 1, got {self.n_prior_samples}")
        if self.threshold not in ("static", "dynamic", "none"):
            raise ValueError(f"threshold must be static, dynamic or none, got {self.threshold!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON-able); ``SamplingSettings.from_dict(s.to_dict()) == s``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown sampling settings {sorted(unknown)}; expected {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_config(cls, cfg: Any, base: "SamplingSettings | None" = None) -> "SamplingSettings":
        """From an entry point's config (``conf/sample.yaml``, ``conf/serve.yaml``): per-stage ``steps`` /
        ``sampler`` / ``guidance`` / ``eta`` maps and ``n_prior_samples`` / ``threshold`` / ``upsampler_aug_level``;
        absent or null entries keep ``base`` (default: the defaults; a converted cascade's own: ``from_dir``)."""

        def per_stage(key: str):
            value = cfg.get(key)
            return {k: v for k, v in dict(value).items()} if value else None

        return cls.from_overrides(
            steps=per_stage("steps"),
            sampler=per_stage("sampler"),
            guidance=per_stage("guidance"),
            eta=per_stage("eta"),
            n_prior_samples=cfg.get("n_prior_samples"),
            threshold=cfg.get("threshold"),
            upsampler_aug_level=cfg.get("upsampler_aug_level"),
            base=base,
        )

    @classmethod
    def from_overrides(
        cls,
        *,
        base: "SamplingSettings | None" = None,
        steps: dict[str, int] | None = None,
        sampler: dict[str, str] | None = None,
        guidance: dict[str, float] | None = None,
        eta: dict[str, float] | None = None,
        **top: Any,
    ) -> "SamplingSettings":
        """Defaults overridden per kind then stage, the CLI's ``steps.decoder=50 sampler.prior=ddpm ...`` layout:
        ``from_overrides(steps={"decoder": 50}, guidance={"decoder": 4.0}, n_prior_samples=4)``; None = default."""
        base = base or cls()
        stages: dict[str, dict[str, Any]] = {s: dataclasses.asdict(getattr(base, s)) for s in cls.STAGES}
        for key, per_stage in (("steps", steps), ("sampler", sampler), ("guidance_scale", guidance), ("eta", eta)):
            for stage, value in (per_stage or {}).items():
                if stage not in stages:
                    raise ValueError(f"unknown stage {stage!r} in {key} overrides; expected one of {list(cls.STAGES)}")
                if value is not None:
                    stages[stage][key] = type(stages[stage][key])(value)
        top = {k: v for k, v in top.items() if v is not None}
        inherited = {k: getattr(base, k) for k in ("n_prior_samples", "threshold", "upsampler_aug_level")}
        return cls.from_dict({**inherited, **{s: StageSettings(**v) for s, v in stages.items()}, **top})
