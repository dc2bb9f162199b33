"""Serve a trained cascade behind an OpenAI Images-compatible HTTP API (FastAPI + uvicorn).

    python eval/serve.py ckpt.clip=clip.ckpt ckpt.prior=prior.ckpt ckpt.decoder=decoder.ckpt \
        "ckpt.upsamplers=[sr.ckpt]" host=127.0.0.1 port=8000 [api_key=sk-local device=cuda max_batch_size=8 \
        max_wait_ms=25 steps.decoder=50 guidance.decoder=3 limits.max_queue=64 limits.request_timeout_s=300 \
        limits.max_connections=256 url_store_max_bytes=268435456]

Then ``OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-local").images.generate(prompt=..., n=4,
size="256x256")``.  The model loads once; concurrent requests are batched; ``limits.*`` bound what a request may
cost (see ``dalle2/serving/``).  A non-loopback ``host`` needs ``api_key`` (or ``allow_unauthenticated=true``);
SIGTERM / Ctrl-C finishes the running batch (``limits.shutdown_timeout_s``) and refuses the rest.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle2.lit.checkpoints import CHECKPOINT_ERRORS  # noqa: E402
from dalle2.pipeline import SamplingSettings, UnCLIPPipeline, resolve_stages  # noqa: E402


def limits_from_cfg(cfg: DictConfig):
    """``cfg.limits`` -> ``dalle2.serving.ServeLimits`` (its fields, one to one)."""
    from dalle2.serving import ServeLimits

    return ServeLimits(**OmegaConf.to_container(cfg.limits, resolve=True))


def build_app(cfg: DictConfig):
    import torch

    from dalle2.serving import check_bind, create_app

    try:  # before loading anything: a public bind without a key, or a bad limit, stops here with one line
        api_key = check_bind(cfg.host, cfg.api_key, allow_unauthenticated=bool(cfg.allow_unauthenticated))
        limits = limits_from_cfg(cfg)
    except ValueError as e:
        raise SystemExit(f"[dalle2] serve: {e}") from None
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    trust = bool(cfg.get("trust_checkpoint", False))
    base = resolve_stages(cfg, error_prefix="[dalle2] serve: ", need_prior=False)
    pipe = UnCLIPPipeline.from_checkpoints(
        clip=cfg.ckpt.clip,
        prior=cfg.ckpt.prior or None,
        decoder=cfg.ckpt.decoder,
        upsamplers=list(cfg.ckpt.upsamplers or []),
        tokenizer=cfg.tokenizer_path,
        device=device,
        trust_checkpoint=trust,
    )
    app = create_app(
        pipe,
        api_key=api_key,
        model_name=cfg.model_name,
        model_aliases=list(cfg.model_aliases or []),
        settings=SamplingSettings.from_config(cfg, base=base),
        max_n=int(cfg.max_n),
        max_batch_size=int(cfg.max_batch_size),
        max_wait_ms=float(cfg.max_wait_ms),
        max_prompt_chars=int(cfg.max_prompt_chars),
        public_url=cfg.public_url,
        url_ttl_s=float(cfg.url_ttl_s),
        url_store_max=int(cfg.url_store_max),
        url_store_max_bytes=int(cfg.url_store_max_bytes),
        limits=limits,
    )
    sizes = ", ".join(f"{s}x{s}" for s in pipe.sizes)
    print(
        f"[dalle2] serving {cfg.model_name} ({sizes}) on {device} at http://{cfg.host}:{cfg.port}/v1"
        f"{' (api key required)' if api_key else ''}",
        flush=True,
    )
    return app


@hydra.main(config_path="../conf", config_name="serve", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from dalle2.serving import run_server

    try:
        app = build_app(cfg)
    except CHECKPOINT_ERRORS as e:  # a refused / wrong-stage / missing checkpoint, a mismatched vocabulary: one line
        raise SystemExit(f"error: {e}") from None
    run_server(app, host=cfg.host, port=int(cfg.port), log_level=str(cfg.log_level))


if __name__ == "__main__":
    main()
