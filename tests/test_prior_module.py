"""PriorModule: training step and gradients, CFG drop rate, embedding scaling, text trimming, overfitting, EMA
validation metrics, checkpoint round trip (same seed -> same samples), stage checks, frozen CLIP on the fly, the
train.py CLI on embedding shards written by precompute_embeddings.py, and a 2-process DDP run."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT
from dalle2.lit.checkpoints import STAGE_KEY, WrongStageError
from dalle2.lit.prior_module import PriorModule, load_prior, trim_text

D, DT = 16, 24
NET = dict(embed_dim=D, text_token_dim=DT, width=32, depth=2, heads=2, dim_head=16, mlp_ratio=2, max_text_len=77)
TINY_CLIP = dict(
    embed_dim=D,
    image_size=16,
    vision_width=32,
    vision_layers=1,
    vision_heads=2,
    vision_patch_size=8,
    context_length=77,
    vocab_size=8192,
    text_width=DT,
    text_layers=1,
    text_heads=2,
)


def make_batch(n: int = 8, *, seed: int = 0, emb: bool = True, lengths: tuple[int, int] = (3, 9)) -> dict:
    """An embedding-shard batch: tokens padded to 77 with random caption lengths, txt_tokens padded to 77."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, 77, dtype=torch.long)
    lens = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=g)
    for i, k in enumerate(lens.tolist()):
        tokens[i, :k] = torch.randint(1, 100, (k,), generator=g)
    b = {"tokens": tokens, "image": torch.rand(n, 3, 16, 16, generator=g) * 2 - 1}
    if emb:
        b["img_emb"] = torch.randn(n, D, generator=g) * 3
        b["txt_emb"] = torch.randn(n, D, generator=g)
        b["txt_tokens"] = torch.randn(n, 77, DT, generator=g)
    return b


def prior(**kw) -> PriorModule:
    net = {**NET, **kw.pop("net", {})}
    return PriorModule(network=net, diffusion={"num_timesteps": 100, **kw.pop("diffusion", {})}, **kw)


class _Batches(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def loader(batches):
    return torch.utils.data.DataLoader(_Batches(batches), batch_size=None)


def tiny_trainer(tmp_path, **kw) -> L.Trainer:
    kw.setdefault("max_steps", 3)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        **kw,
    )


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore", message=".*self.log.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_text_tokens", [True, False])
def test_training_step_finite_and_all_grads_flow(use_text_tokens):
    m = prior(cond_drop_prob=0.5, use_text_tokens=use_text_tokens)
    loss = m.training_step(make_batch(16), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    unused = {"null_text_token", "text_token_proj.weight", "text_token_proj.bias"} if not use_text_tokens else set()
    for name, p in m.net.named_parameters():
        if name in unused:
            assert p.grad is None and not p.requires_grad, name  # frozen: DDP must not wait for them
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert all(p.grad is None for p in m.ema_net.parameters())


def test_defaults_x0_objective_and_sqrt_d_scale():
    m = prior()
    assert m.diffusion.objective == "x0"
    assert m.scaler.scale == pytest.approx(math.sqrt(D)) and m.embed_dim == D
    assert prior(embed_scale=17.2).scaler.scale == 17.2
    assert prior(diffusion={"objective": "v"}).diffusion.objective == "v"
    emb = m.embeddings(make_batch(4))
    assert torch.allclose(emb["image_embed"].norm(dim=-1), torch.ones(4), atol=1e-5)
    with pytest.raises(ValueError, match="cond_drop_prob"):
        prior(cond_drop_prob=1.5)


def test_cfg_drop_rate():
    m = prior(cond_drop_prob=0.1)
    g = torch.Generator().manual_seed(0)
    rate = m.drop_text_mask(20000, generator=g).float().mean().item()
    assert abs(rate - 0.1) < 0.01
    assert not prior(cond_drop_prob=0.0).drop_text_mask(1000).any()
    assert prior(cond_drop_prob=1.0).drop_text_mask(1000).all()


def test_text_mask_and_trimming_do_not_change_the_prediction():
    b = make_batch(6)
    m = prior()
    emb = m.embeddings(b)
    L_max = int((b["tokens"] != 0).sum(1).max())
    assert emb["text_tokens"].shape == (6, L_max, DT)
    assert torch.equal(emb["text_mask"], (b["tokens"] != 0)[:, :L_max])
    x, t = torch.randn(6, D), torch.randint(0, 100, (6,))
    full = m.net(x, t, text_embed=b["txt_emb"], text_tokens=b["txt_tokens"], text_mask=b["tokens"] != 0)
    trimmed = m.net(x, t, text_embed=b["txt_emb"], text_tokens=emb["text_tokens"], text_mask=emb["text_mask"])
    torch.testing.assert_close(full, trimmed, rtol=1e-5, atol=1e-5)
    assert trim_text(None, None) == (None, None)


def test_overfit_loss_decreases():
    torch.manual_seed(0)
    m = prior(cond_drop_prob=0.0)
    batch = make_batch(16, seed=1)
    opt = torch.optim.AdamW(m.net.parameters(), lr=2e-3)
    losses = []
    for _ in range(120):
        loss = m.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)


def test_sample_api_unit_norm_deterministic_and_guided():
    m = prior()
    b = make_batch(3)
    mask = b["tokens"] != 0
    kw = dict(text_embed=b["txt_emb"], text_tokens=b["txt_tokens"], text_mask=mask, steps=4)

    def run(seed, **extra):
        return m.sample(
            **kw, generator=torch.Generator().manual_seed(seed), **{**dict(n_samples_per_prompt=2), **extra}
        )

    s = run(0)
    assert s.shape == (3, D) and torch.allclose(s.norm(dim=-1), torch.ones(3), atol=1e-5)
    torch.testing.assert_close(s, run(0), rtol=0, atol=0)
    assert not torch.allclose(s, run(1))
    g = run(0, guidance_scale=3.0, sampler="dpmpp_2m", n_samples_per_prompt=3)
    assert g.shape == (3, D) and torch.isfinite(g).all()
    no_tokens = m.sample(text_embed=b["txt_emb"], text_tokens=None, text_mask=None, steps=2)
    assert no_tokens.shape == (3, D)
    assert m.training  # sampling leaves the module's mode alone


def test_validation_logs_loss_and_three_cosines(tmp_path):
    m = prior()
    trainer = tiny_trainer(tmp_path, max_steps=2, limit_val_batches=1, val_check_interval=2, num_sanity_val_steps=0)
    trainer.fit(
        m,
        train_dataloaders=loader([make_batch(8, seed=i) for i in range(2)]),
        val_dataloaders=loader([make_batch(8, seed=99)]),
    )
    metrics = trainer.callback_metrics
    for k in ("val/loss", "val/cos_sampled", "val/cos_text_baseline", "val/cos_shuffled"):
        assert k in metrics and torch.isfinite(metrics[k]) and -1.0 <= float(metrics[k]) <= 1.0 or k == "val/loss"
    b = make_batch(8, seed=99)
    expected = F.cosine_similarity(b["txt_emb"], b["img_emb"], dim=-1).mean()
    assert float(metrics["val/cos_text_baseline"]) == pytest.approx(float(expected), abs=1e-5)


def test_checkpoint_roundtrip_same_samples(tmp_path):
    m = prior(ema_decay=0.9, ema_warmup=0)
    trainer = tiny_trainer(tmp_path, max_steps=3)
    trainer.fit(m, train_dataloaders=loader([make_batch(8, seed=i) for i in range(3)]))
    ckpt = tmp_path / "prior.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert raw[STAGE_KEY] == "prior"
    assert any(k.startswith("ema.") for k in raw["state_dict"]) and any(k.startswith("net.") for k in raw["state_dict"])
    assert raw["hyper_parameters"]["network"]["width"] == NET["width"]
    # the EMA differs from the trained weights, and both are restored
    assert not torch.equal(m.net.out_proj.weight, m.ema_net.out_proj.weight)

    loaded = PriorModule.load_from_checkpoint(ckpt)
    via_load_prior = load_prior(str(ckpt))
    assert not via_load_prior.training and loaded.embed_dim == D and loaded.clip_ckpt is None
    b = make_batch(4, seed=7)
    mask = b["tokens"] != 0
    out = []
    for mod in (m, loaded, via_load_prior):
        for use_ema in (True, False):
            out.append(
                mod.sample(
                    text_embed=b["txt_emb"],
                    text_tokens=b["txt_tokens"],
                    text_mask=mask,
                    steps=3,
                    generator=torch.Generator().manual_seed(5),
                    use_ema=use_ema,
                )
            )
    # load_from_checkpoint: bitwise identical samples, from the EMA and from the raw weights
    torch.testing.assert_close(out[2], out[0], rtol=0, atol=0)
    torch.testing.assert_close(out[3], out[1], rtol=0, atol=0)
    # load_prior (frozen, eval): bitwise for the EMA network; the raw network's weights now have requires_grad=False,
    # which can pick another CPU kernel (differences ~1e-7)
    torch.testing.assert_close(out[4], out[0], rtol=0, atol=0)
    torch.testing.assert_close(out[5], out[1], rtol=0, atol=1e-6)
    again = load_prior(str(ckpt)).sample(
        text_embed=b["txt_emb"],
        text_tokens=b["txt_tokens"],
        text_mask=mask,
        steps=3,
        generator=torch.Generator().manual_seed(5),
    )
    torch.testing.assert_close(again, out[4], rtol=0, atol=0)
    assert not torch.equal(out[0], out[1])  # EMA and raw weights really are different networks


def _tiny_clip_ckpt(path):
    from dalle2.lit.clip_module import CLIPModule

    clip = CLIPModule(network=TINY_CLIP)
    torch.save(
        {
            "state_dict": clip.state_dict(),
            "hyper_parameters": dict(clip.hparams),
            STAGE_KEY: "clip",
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )
    return clip


def test_wrong_stage_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "clip.ckpt"
    _tiny_clip_ckpt(path)
    with pytest.raises(WrongStageError, match="'clip' checkpoint, but a 'prior'"):
        load_prior(str(path))
    with pytest.raises(FileNotFoundError):
        load_prior(str(tmp_path / "missing.ckpt"))


def test_frozen_clip_on_the_fly_not_in_checkpoint(tmp_path):
    clip_path = tmp_path / "clip.ckpt"
    clip = _tiny_clip_ckpt(clip_path).eval()
    m = prior(clip_ckpt=str(clip_path))
    b = make_batch(4, emb=False)
    emb = m.embeddings(b)
    with torch.no_grad():
        states, pooled = clip.model.encode_text_tokens(b["tokens"])
        img = F.normalize(clip.encode_image(b["image"]), dim=-1)
    torch.testing.assert_close(emb["image_embed"], img, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb["text_embed"], pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb["text_tokens"], states[:, : emb["text_tokens"].shape[1]], rtol=1e-5, atol=1e-5)
    m.training_step(b, 0).backward()
    assert all(p.grad is None for p in m.clip.parameters())
    assert not any(k.startswith(("_clip", "clip")) for k in m.state_dict())
    with pytest.raises(ValueError, match="no clip_ckpt"):
        prior().training_step(make_batch(2, emb=False), 0)


# ----------------------------------------------------------------------------------------------------------------
# the CLI on real embedding shards, and DDP


@pytest.fixture(scope="module")
def embedding_shards(builtin_shards, tmp_path_factory):
    """Embedding shards of the 32 px built-in shards, written by train/precompute_embeddings.py from a tiny CLIP
    (embed_dim 16, text width 24, a few Lightning steps)."""
    from dalle2.data.datamodule import WebDataModule
    from dalle2.lit.clip_module import CLIPModule

    out = tmp_path_factory.mktemp("prior_emb")
    net = {**TINY_CLIP, "image_size": 32}
    dm = WebDataModule(train_urls=builtin_shards["train"], val_urls=None, image_size=32, batch_size=32, num_workers=0)
    clip = CLIPModule(network=net)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(clip, datamodule=dm)
    clip_path = out / "clip.ckpt"
    trainer.save_checkpoint(clip_path)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    urls = {}
    for split in ("train", "val"):
        cmd = [
            sys.executable,
            "train/precompute_embeddings.py",
            f"clip_ckpt={clip_path}",
            f"data.urls='{builtin_shards[split]}'",
            f"out_dir={out / split}",
            "trainer.accelerator=cpu",
            f"hydra.run.dir={out / ('pre_' + split)}",
        ]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        urls[split] = ",".join(str(p) for p in sorted((out / split).glob("*.tar")))
    return {"train": urls["train"], "val": urls["val"], "clip": str(clip_path), "root": out}


def _brace(urls: str) -> str:
    paths = urls.split(",")
    return paths[0] if len(paths) == 1 else "{" + ",".join(paths) + "}"


TINY_OVERRIDES = [
    f"model.embed_dim={D}",
    f"model.text_token_dim={DT}",
    "model.width=32",
    "model.depth=2",
    "model.heads=2",
    "model.dim_head=16",
    "data.batch_size=16",
    "data.num_workers=0",
    "module.val_sample_steps=2",
    "logger=csv",
]


@pytest.mark.slow
def test_train_cli_prior_tiny_on_embedding_shards(embedding_shards, tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "train/train.py",
        "experiment=prior_tiny",
        *TINY_OVERRIDES,
        f"data.train_urls={embedding_shards['train'].split(',')[0]}",
        f"data.val_urls={embedding_shards['val'].split(',')[0]}",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "trainer.limit_val_batches=1",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file(), proc.stdout[-2000:]
    m = load_prior(str(ckpt))
    assert m.embed_dim == D and not m.training
    s = m.sample(
        text_embed=torch.randn(2, D),
        text_tokens=torch.randn(2, 5, DT),
        text_mask=torch.ones(2, 5, dtype=torch.bool),
        steps=3,
        generator=torch.Generator().manual_seed(0),
    )
    assert s.shape == (2, D) and torch.isfinite(s).all()


@pytest.mark.slow
def test_ddp_two_processes_cli(embedding_shards, tmp_path):
    """``train.py experiment=prior_tiny trainer.devices=2 trainer.strategy=ddp`` on CPU (gloo): trains, validates
    with sync_dist over both ranks, and writes a checkpoint that loads."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "train/train.py",
        "experiment=prior_tiny",
        *TINY_OVERRIDES,
        f"data.train_urls='{_brace(embedding_shards['train'])}'",
        f"data.val_urls='{_brace(embedding_shards['val'])}'",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "+trainer.strategy=ddp",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=2",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file(), proc.stdout[-2000:]
    assert load_prior(str(ckpt)).embed_dim == D
    metrics = (run_dir / "csv" / "metrics.csv").read_text()
    assert "val/cos_sampled" in metrics and "val/cos_shuffled" in metrics
