"""The tokenizer always matches its CLIP: a CLIP checkpoint stores the BPE vocabulary it was trained with, the
checkpoints that consume its text features (prior, text-conditioned decoder) carry it, every consumer uses it when no
tokenizer is named, and a mismatch (hash, or size for a CLIP without one) is a clear error."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from dalle2.clip.tokenizer import Tokenizer, VocabularyMismatchError, get_tokenizer
from dalle2.lit.checkpoints import load_checkpoint
from dalle2.pipeline import UnCLIPPipeline
from helpers.cascade import TINY_CLIP, build_tiny_checkpoints, save_module, tiny_modules
from helpers.scripts import run_script

CAPTIONS = [
    "a red circle on a blue background",
    "two green squares at the top",
    "a small yellow triangle",
    "a big purple star on the left",
    "an orange hexagon in the middle",
] * 8


@pytest.fixture(scope="module")
def custom_vocab(tmp_path_factory):
    """A small vocabulary trained with the CLI on a few captions."""
    root = tmp_path_factory.mktemp("vocab")
    (root / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    out = root / "custom_bpe.txt.gz"
    proc = run_script(
        "-m dalle2.clip.tokenizer",
        "train",
        "--urls",
        str(root / "captions.txt"),
        "--vocab-size",
        "600",
        "--out",
        str(out),
        "--min-frequency",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    tok = get_tokenizer(str(out))
    assert tok.encode("a red circle") != get_tokenizer(None).encode("a red circle")
    return out


@pytest.fixture(scope="module")
def custom_clip(custom_vocab, builtin_shards, tmp_path_factory):
    """A tiny CLIP trained (2 steps, through Lightning) on shards tokenized with the custom vocabulary."""
    from dalle2.data.datamodule import WebDataModule
    from dalle2.lit.clip_module import CLIPModule

    out = tmp_path_factory.mktemp("custom_clip")
    vocab_size = get_tokenizer(str(custom_vocab)).vocab_size
    dm = WebDataModule(
        train_urls=builtin_shards["train"],
        val_urls=None,
        image_size=16,
        batch_size=8,
        num_workers=0,
        tokenizer_path=str(custom_vocab),
    )
    module = CLIPModule(network={**TINY_CLIP, "vocab_size": vocab_size})
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=dm)
    path = out / "clip.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    return build_tiny_checkpoints(tmp_path_factory.mktemp("binding_cascade"))


def test_the_clip_checkpoint_stores_its_vocabulary(custom_clip, custom_vocab):
    stored = load_checkpoint(custom_clip)["dalle2_vocabulary"]
    tok = get_tokenizer(str(custom_vocab))
    assert stored["vocab_size"] == tok.vocab_size and stored["sha256"] == tok.vocabulary.sha256
    assert Tokenizer.from_merges_text(stored["merges"]).merges == tok.merges


def test_pipeline_uses_the_clips_vocabulary_when_none_is_named(custom_clip, custom_vocab, cascade):
    from dalle2.lit.clip_module import load_clip

    pipe = UnCLIPPipeline.from_checkpoints(clip=str(custom_clip), prior=cascade["prior"], decoder=cascade["decoder"])
    custom = get_tokenizer(str(custom_vocab))
    assert pipe.tokenizer.vocabulary.sha256 == custom.vocabulary.sha256
    clip = load_clip(str(custom_clip))
    prompts = ["a red circle on a blue background", "a big purple star"]
    with torch.no_grad():
        _, expected = clip.model.encode_text_tokens(custom(prompts))
        _, default = clip.model.encode_text_tokens(get_tokenizer(None)(prompts).clamp(max=custom.vocab_size - 1))
    got = pipe.encode_prompts(prompts)["text_embed"]
    assert torch.equal(got, expected.float()) and not torch.allclose(got, default.float())


def test_every_clip_consumer_gets_the_clips_vocabulary(custom_clip, custom_vocab):
    """load_clip(...).tokenizer() is what evaluate.py and precompute_embeddings.py tokenize with."""
    from dalle2.lit.clip_module import load_clip

    clip = load_clip(str(custom_clip))
    assert clip.tokenizer().vocabulary.sha256 == get_tokenizer(str(custom_vocab)).vocabulary.sha256
    assert clip.tokenizer(str(custom_vocab)).vocab_size == clip.model.config["vocab_size"]


def test_a_named_tokenizer_that_does_not_match_is_an_error(custom_clip, cascade, tmp_path):
    from dalle2.clip.tokenizer import BUILTIN_VOCAB

    with pytest.raises(VocabularyMismatchError, match=r"bpe_builtin\.txt\.gz.*8192 ids.*custom_bpe\.txt\.gz"):
        UnCLIPPipeline.from_checkpoints(
            clip=str(custom_clip), prior=cascade["prior"], decoder=cascade["decoder"], tokenizer=BUILTIN_VOCAB
        )


def test_prior_and_text_decoder_carry_the_clips_vocabulary(custom_clip, custom_vocab, tmp_path):
    from dalle2.lit.clip_module import load_clip

    mods = tiny_modules()
    clip = load_clip(str(custom_clip))
    for stage in ("prior", "decoder"):
        mods[stage].set_clip(clip)
        path = save_module(mods[stage], tmp_path / f"{stage}.ckpt", seed=1)
        assert (
            load_checkpoint(path)["dalle2_vocabulary"]["sha256"] == get_tokenizer(str(custom_vocab)).vocabulary.sha256
        )


def test_a_prior_of_another_vocabulary_is_an_error(custom_clip, cascade, tmp_path):
    """The prior learnt from CLIP text features of the custom vocabulary; the default-vocabulary CLIP is not its."""
    from dalle2.lit.clip_module import load_clip

    mods = tiny_modules()
    mods["prior"].set_clip(load_clip(str(custom_clip)))
    prior = save_module(mods["prior"], tmp_path / "prior.ckpt", seed=2)
    default_clip = tiny_modules()["clip"]
    default_clip.bind_tokenizer(get_tokenizer(None))
    clip = save_module(default_clip, tmp_path / "clip.ckpt", seed=3)
    with pytest.raises(VocabularyMismatchError, match=r"prior"):
        UnCLIPPipeline.from_checkpoints(clip=clip, prior=prior, decoder=cascade["decoder"])


def test_a_clip_without_a_stored_vocabulary_must_match_its_size(tmp_path, cascade):
    """Older checkpoints and OpenAI weights record no vocabulary: then at least the size must match."""
    clip = tiny_modules()["clip"].__class__(network={**TINY_CLIP, "vocab_size": 9000})
    path = save_module(clip, tmp_path / "clip.ckpt", seed=4)
    assert "dalle2_vocabulary" not in load_checkpoint(path)
    with pytest.raises(VocabularyMismatchError, match=r"9000.*8192|8192.*9000"):
        UnCLIPPipeline.from_checkpoints(clip=path, prior=cascade["prior"], decoder=cascade["decoder"])


def test_a_tampered_vocabulary_is_refused(custom_clip, tmp_path):
    ckpt = load_checkpoint(custom_clip)
    ckpt["dalle2_vocabulary"]["merges"] += "x y\n"
    torch.save(ckpt, tmp_path / "tampered.ckpt")
    from dalle2.lit.clip_module import load_clip

    with pytest.raises(VocabularyMismatchError, match="sha256"):
        load_clip(str(tmp_path / "tampered.ckpt"))


@pytest.mark.slow
def test_the_vocabulary_flows_through_the_command_lines(custom_vocab, builtin_shards, tmp_path):
    """train.py clip with data.tokenizer_path -> train.py prior with clip_ckpt only -> sample.py with no tokenizer:
    the custom vocabulary everywhere; sample.py naming another vocabulary fails with one line."""
    vocab_size = get_tokenizer(str(custom_vocab)).vocab_size
    few = [
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        "data.num_workers=0",
        "data.batch_size=8",
        f"data.train_urls='{builtin_shards['train']}'",
        f"data.val_urls='{builtin_shards['val']}'",
    ]
    proc = run_script(
        "train/train.py",
        "experiment=clip_tiny",
        f"data.tokenizer_path={custom_vocab}",
        f"model.vocab_size={vocab_size}",
        f"hydra.run.dir={tmp_path / 'clip'}",
        *few,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    clip = tmp_path / "clip" / "checkpoints" / "last.ckpt"
    sha = get_tokenizer(str(custom_vocab)).vocabulary.sha256
    assert load_checkpoint(clip)["dalle2_vocabulary"]["sha256"] == sha
    proc = run_script(
        "train/train.py",
        "experiment=prior_tiny",
        "data=builtin",
        "data.load_image=true",
        f"clip_ckpt={clip}",
        "module.val_sample_steps=2",
        "data.image_size=32",
        f"hydra.run.dir={tmp_path / 'prior'}",
        *few,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    prior = tmp_path / "prior" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(prior)["dalle2_vocabulary"]["sha256"] == sha
    # a prior run told to tokenize its data with another vocabulary than its CLIP's refuses to start
    proc = run_script(
        "train/train.py",
        "experiment=prior_tiny",
        "data=builtin",
        "data.load_image=true",
        f"clip_ckpt={clip}",
        "data.tokenizer_path=dalle2/clip/assets/bpe_builtin.txt.gz",
        f"hydra.run.dir={tmp_path / 'prior2'}",
        *few,
    )
    assert proc.returncode != 0 and "bpe_builtin.txt.gz" in proc.stderr.strip().splitlines()[-1]
    # decoder of the demo (no text) trained from the same CLIP, then sample.py with no tokenizer named
    proc = run_script(
        "train/train.py",
        "experiment=decoder_tiny",
        f"clip_ckpt={clip}",
        "module.sample_every_n_steps=2",
        "callbacks.sample_grid.steps=2",
        "callbacks.sample_grid.num_samples=4",
        f"hydra.run.dir={tmp_path / 'decoder'}",
        *few,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    decoder = tmp_path / "decoder" / "checkpoints" / "last.ckpt"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    args = [
        f"ckpt.clip={clip}",
        f"ckpt.prior={prior}",
        f"ckpt.decoder={decoder}",
        f"prompts={prompts}",
        "steps.prior=2",
        "steps.decoder=2",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
    ]
    proc = run_script("eval/sample.py", *args, f"out_dir={tmp_path / 'samples'}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "samples" / "manifest.jsonl").read_text().splitlines()[0])
    assert manifest["tokenizer"]["sha256"] == sha
    proc = run_script(
        "eval/sample.py",
        *args,
        "tokenizer_path=dalle2/clip/assets/bpe_builtin.txt.gz",
        f"out_dir={tmp_path / 'samples2'}",
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "bpe_builtin.txt.gz" in last and "custom_bpe.txt.gz" in last
    assert not (tmp_path / "samples2").exists()
