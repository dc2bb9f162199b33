"""Karlo (diffusers-format unCLIP) -> our stages: tokenizer ids, every module's output and whole images equal the
reference's (diffusers / transformers, test-only) on tiny random models of several shapes; the converter's
unhappy paths (not a Karlo dir, unsupported config, pickled weights) are one-line errors and run no code."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from dalle2.clip.model import text_mask  # noqa: E402
from dalle2.convert.__main__ import main as convert_main  # noqa: E402
from dalle2.convert.clip_text import load_tokenizer_dir  # noqa: E402
from dalle2.convert.karlo import ConversionError, convert_karlo  # noqa: E402
from dalle2.convert.karlo_check import check_karlo  # noqa: E402
from helpers.karlo import CONFIGS, make_karlo_dir, write_tokenizer_files  # noqa: E402

TEXTS = [
    "a photo of a cat",
    "Hello, World!!  hi!!",
    "don’t stop &amp; go",
    "café naïve résumé ΣΊΣΥΦΟΣ",
    "123 4567 x2 🐱",
    "<|endoftext|> hi",
    "A" * 300,
    "",
    "tab\tnew\nline\u00a0nbsp",
    "ﬁne ＡＢＣ e\u0301",
]


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_tokenizer_matches_transformers_padding_included(tmp_path, pad):
    write_tokenizer_files(tmp_path, pad)
    ref = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    ours = load_tokenizer_dir(tmp_path)
    expected = ref(TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ours(TEXTS), expected.input_ids)
    assert ours.pad_id == (ours.eot_token if pad != "!" else 0)  # the end token or "!" (Karlo's) pads
    # which positions are text does not depend on the padding id: the reference's attention mask
    assert torch.equal(text_mask(ours(TEXTS)), expected.attention_mask.bool())
    # the vocabulary carries the padding and the cleaning to every consumer
    again = ours.vocabulary.tokenizer()
    assert torch.equal(again(TEXTS), expected.input_ids)


def test_text_mask_is_everything_but_the_padding():
    zero_padded = torch.tensor([[10, 5, 0, 7, 9, 0, 0], [10, 9, 0, 0, 0, 0, 0], [10, 4, 4, 4, 4, 4, 9]])
    # an interior 0 is a real token ("!"), the trailing zeros are padding; a full row is all text
    assert text_mask(zero_padded).tolist() == [[1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0], [1] * 7]
    padded_with_end = torch.tensor([[10, 5, 9, 9, 9], [10, 9, 9, 9, 9], [10, 9, 6, 9, 9]])
    assert text_mask(padded_with_end).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]
    assert text_mask(torch.zeros(1, 4, dtype=torch.long)).tolist() == [[1, 0, 0, 0]]  # never an empty row


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
def test_converted_modules_and_images_match_the_reference(tmp_path, cfg):
    src = make_karlo_dir(tmp_path, cfg, seed=3)
    convert_karlo(src, tmp_path / "out")
    steps = {"prior_steps": 25, "decoder_steps": 25, "sr_steps": 7} if cfg.name == "a" else {}
    steps = steps or {"prior_steps": 6, "decoder_steps": 5, "sr_steps": 3}
    result = check_karlo(src, tmp_path / "out", **steps)
    modules = result["modules"]
    assert modules["tokenizer (ids differing)"] == 0 and modules["text_mask (positions differing)"] == 0
    for name, diff in modules.items():
        assert diff <= 1e-4, (name, diff)
    assert result["end_to_end"] <= 1e-3, result["end_to_end"]
    assert result["ok"]


def test_check_fails_on_a_wrong_conversion(tiny_karlo, tmp_path, capsys):
    """The check can fail: one perturbed weight of the converted prior is caught, and the CLI exits 1."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    shutil.copytree(tiny_karlo["out"], out)
    path = out / "prior.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["blocks.0.mlp.fc.bias"] = tensors["blocks.0.mlp.fc.bias"] + 1e-2
    save_file(tensors, str(path), metadata=meta)
    rc = convert_main(["karlo", f"src={tiny_karlo['src']}", f"out={out}", "check_only=true"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 1 and not report["ok"]
    assert report["modules"]["prior"] > 1e-4 and report["modules"]["decoder"] <= 1e-4


def test_cli_converts_and_checks(tiny_karlo, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = convert_main(["karlo", f"src={tiny_karlo['src']}", f"out={out}"])
    assert rc == 0
    assert {p.name for p in out.iterdir()} >= {"pipeline.json", "clip.safetensors", "prior.json", "upsampler.json"}
    with pytest.raises(SystemExit, match="exists: pass force=true"):
        convert_main(["karlo", f"src={tiny_karlo['src']}", f"out={out}"])
    spec = json.loads((out / "pipeline.json").read_text())
    assert spec["sampling"]["prior"]["sampler"] == "unclip" and spec["sampling"]["n_prior_samples"] == 1


def _copy_src(tiny_karlo, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_karlo["src"], src)
    return src


def test_not_a_karlo_dir_is_one_line_naming_what_is_missing(tiny_karlo, tmp_path):
    with pytest.raises(ConversionError, match="model_index.json"):
        convert_karlo(tmp_path, tmp_path / "out")
    src = _copy_src(tiny_karlo, tmp_path)
    index = json.loads((src / "model_index.json").read_text())
    del index["super_res_last"]
    (src / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(SystemExit, match=r"error: .*no component\(s\) super_res_last"):
        convert_main(["karlo", f"src={src}", f"out={tmp_path / 'out'}"])


def test_unsupported_config_is_named(tiny_karlo, tmp_path):
    src = _copy_src(tiny_karlo, tmp_path)
    cfg = json.loads((src / "decoder" / "config.json").read_text())
    cfg["resnet_time_scale_shift"] = "default"
    (src / "decoder" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ConversionError, match=r"decoder/config.json: not Karlo-shaped: resnet_time_scale_shift='default'"
    ):
        convert_karlo(src, tmp_path / "out")


def test_bin_weights_load_weights_only_and_pickles_run_nothing(tiny_karlo, tmp_path):
    from safetensors.torch import load_file

    from dalle2.safe_load import UntrustedCheckpointError

    src = _copy_src(tiny_karlo, tmp_path)
    folder = src / "super_res_last"
    (weights,) = folder.glob("*.safetensors")
    torch.save(load_file(str(weights)), folder / "diffusion_pytorch_model.bin")
    weights.unlink()
    convert_karlo(src, tmp_path / "out")  # a plain state dict in .bin converts
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"conv_in.weight": Evil()}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(UntrustedCheckpointError, match="refused"):
        convert_karlo(src, tmp_path / "out2")
    assert not marker.exists()
