"""Serve a trained cascade behind an OpenAI Images-compatible HTTP API (FastAPI + uvicorn).

    python eval/serve.py ckpt.clip=clip.ckpt ckpt.prior=prior.ckpt ckpt.decoder=decoder.ckpt \
        "ckpt.upsamplers=[sr.ckpt]" host=127.0.0.1 port=8000 [api_key=sk-local device=cuda max_batch_size=8 \
        max_wait_ms=25 steps.decoder=50 guidance.decoder=3]

Then ``OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-local").images.generate(prompt=..., n=4,
size="256x256")``.  The model loads once; concurrent requests are batched (see ``dalle2/serving.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle2.lit.checkpoints import CHECKPOINT_ERRORS  # noqa: E402
from dalle2.pipeline import UnCLIPPipeline  # noqa: E402
from sample import settings_from_cfg  # noqa: E402  (eval/sample.py, beside this script)


def build_app(cfg: DictConfig):
    import torch

    from dalle2.serving import create_app

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    trust = bool(cfg.get("trust_checkpoint", False))
    pipe = UnCLIPPipeline.from_checkpoints(clip=cfg.ckpt.clip, prior=cfg.ckpt.prior or None, decoder=cfg.ckpt.decoder,
                                           upsamplers=list(cfg.ckpt.upsamplers or []), tokenizer=cfg.tokenizer_path,
                                           device=device, trust_checkpoint=trust)  # fmt: skip
    app = create_app(
        pipe, api_key=cfg.api_key, model_name=cfg.model_name, model_aliases=list(cfg.model_aliases or []),
        settings=settings_from_cfg(cfg), max_n=int(cfg.max_n), max_batch_size=int(cfg.max_batch_size),
        max_wait_ms=float(cfg.max_wait_ms), max_prompt_chars=int(cfg.max_prompt_chars),
        max_upload_bytes=int(cfg.max_upload_bytes), public_url=cfg.public_url, url_ttl_s=float(cfg.url_ttl_s),
        url_store_max=int(cfg.url_store_max),
    )  # fmt: skip
    sizes = ", ".join(f"{s}x{s}" for s in pipe.sizes)
    print(f"[dalle2] serving {cfg.model_name} ({sizes}) on {device} at http://{cfg.host}:{cfg.port}/v1"
          f"{' (api key required)' if cfg.api_key else ''}", flush=True)  # fmt: skip
    return app


@hydra.main(config_path="../conf", config_name="serve", version_base="1.3")
def main(cfg: DictConfig) -> None:
    import uvicorn

    try:
        app = build_app(cfg)
    except CHECKPOINT_ERRORS as e:  # a refused / wrong-stage / missing checkpoint, a mismatched vocabulary: one line
        raise SystemExit(f"error: {e}") from None
    uvicorn.run(app, host=cfg.host, port=int(cfg.port), log_level=str(cfg.log_level))


if __name__ == "__main__":
    main()
