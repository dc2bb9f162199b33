"""Loading OpenAI / open_clip CLIP weights and the safetensors round trip, against an independent reference forward.

The reference below is written over the raw OpenAI-layout state dict with plain torch ops (explicit matmul /
softmax attention, QuickGELU by formula) and shares no code with dalle2.clip.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dalle2.clip.pretrained import load_clip_checkpoint, load_safetensors, save_safetensors

WIDTH, LAYERS, PATCH, IMAGE = 128, 2, 8, 32  # 2 vision heads (width // 64)
T_WIDTH, T_LAYERS, VOCAB, CTX, EMBED = 32, 2, 100, 16, 24


def _block_params(prefix: str, width: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    def r(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    return {
        f"{prefix}.attn.in_proj_weight": r(3 * width, width, std=width**-0.5),
        f"{prefix}.attn.in_proj_bias": r(3 * width),
        f"{prefix}.attn.out_proj.weight": r(width, width, std=width**-0.5),
        f"{prefix}.attn.out_proj.bias": r(width),
        f"{prefix}.ln_1.weight": 1 + r(width),
        f"{prefix}.ln_1.bias": r(width),
        f"{prefix}.mlp.c_fc.weight": r(4 * width, width, std=width**-0.5),
        f"{prefix}.mlp.c_fc.bias": r(4 * width),
        f"{prefix}.mlp.c_proj.weight": r(width, 4 * width, std=(4 * width) ** -0.5),
        f"{prefix}.mlp.c_proj.bias": r(width),
        f"{prefix}.ln_2.weight": 1 + r(width),
        f"{prefix}.ln_2.bias": r(width),
    }


def openai_vit_state_dict(seed: int = 0, *, meta_keys: bool = True) -> dict[str, torch.Tensor]:
    """Random weights with exactly the key names/shapes of an OpenAI ViT CLIP (tiny)."""
    g = torch.Generator().manual_seed(seed)
    grid = IMAGE // PATCH
    sd = {
        "visual.conv1.weight": torch.randn(WIDTH, 3, PATCH, PATCH, generator=g) * 0.05,
        "visual.class_embedding": torch.randn(WIDTH, generator=g) * WIDTH**-0.5,
        "visual.positional_embedding": torch.randn(grid * grid + 1, WIDTH, generator=g) * WIDTH**-0.5,
        "visual.ln_pre.weight": 1 + 0.05 * torch.randn(WIDTH, generator=g),
        "visual.ln_pre.bias": 0.05 * torch.randn(WIDTH, generator=g),
        "visual.ln_post.weight": 1 + 0.05 * torch.randn(WIDTH, generator=g),
        "visual.ln_post.bias": 0.05 * torch.randn(WIDTH, generator=g),
        "visual.proj": torch.randn(WIDTH, EMBED, generator=g) * WIDTH**-0.5,
        "token_embedding.weight": torch.randn(VOCAB, T_WIDTH, generator=g) * 0.02,
        "positional_embedding": torch.randn(CTX, T_WIDTH, generator=g) * 0.01,
        "ln_final.weight": 1 + 0.05 * torch.randn(T_WIDTH, generator=g),
        "ln_final.bias": 0.05 * torch.randn(T_WIDTH, generator=g),
        "text_projection": torch.randn(T_WIDTH, EMBED, generator=g) * T_WIDTH**-0.5,
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    for i in range(LAYERS):
        sd.update(_block_params(f"visual.transformer.resblocks.{i}", WIDTH, g))
    for i in range(T_LAYERS):
        sd.update(_block_params(f"transformer.resblocks.{i}", T_WIDTH, g))
    if meta_keys:  # what OpenAI's TorchScript archives carry besides the weights
        sd.update(
            input_resolution=torch.tensor(IMAGE), context_length=torch.tensor(CTX), vocab_size=torch.tensor(VOCAB)
        )
    return sd


# -- independent reference forward ----------------------------------------------------------------------------
def _layer_norm(x, sd, p):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * sd[f"{p}.weight"] + sd[f"{p}.bias"]


def _block(x, sd, p, heads, causal, activation):
    b, n, w = x.shape
    d = w // heads
    h = _layer_norm(x, sd, f"{p}.ln_1")
    qkv = h @ sd[f"{p}.attn.in_proj_weight"].T + sd[f"{p}.attn.in_proj_bias"]
    q, k, v = (t.reshape(b, n, heads, d).permute(0, 2, 1, 3) for t in qkv.split(w, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if causal:
        scores = scores + torch.full((n, n), float("-inf")).triu(1)
    attn = torch.softmax(scores, dim=-1) @ v
    attn = attn.permute(0, 2, 1, 3).reshape(b, n, w)
    x = x + attn @ sd[f"{p}.attn.out_proj.weight"].T + sd[f"{p}.attn.out_proj.bias"]
    h = _layer_norm(x, sd, f"{p}.ln_2") @ sd[f"{p}.mlp.c_fc.weight"].T + sd[f"{p}.mlp.c_fc.bias"]
    if activation == "quick_gelu":
        h = h * torch.sigmoid(1.702 * h)
    else:
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return x + h @ sd[f"{p}.mlp.c_proj.weight"].T + sd[f"{p}.mlp.c_proj.bias"]


def reference_encode_image(sd, images, activation="quick_gelu"):
    x = torch.nn.functional.conv2d(images, sd["visual.conv1.weight"], stride=PATCH)  # (B, W, g, g)
    x = x.reshape(x.shape[0], WIDTH, -1).permute(0, 2, 1)
    cls = sd["visual.class_embedding"].reshape(1, 1, WIDTH).repeat(x.shape[0], 1, 1)
    x = torch.cat([cls, x], 1) + sd["visual.positional_embedding"]
    x = _layer_norm(x, sd, "visual.ln_pre")
    for i in range(LAYERS):
        x = _block(x, sd, f"visual.transformer.resblocks.{i}", max(1, WIDTH // 64), False, activation)
    return _layer_norm(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]


def reference_encode_text(sd, tokens, activation="quick_gelu"):
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][: tokens.shape[1]]
    for i in range(T_LAYERS):
        x = _block(x, sd, f"transformer.resblocks.{i}", max(1, T_WIDTH // 64), True, activation)
    x = _layer_norm(x, sd, "ln_final")
    eot = [int(row.tolist().index(max(row.tolist()))) for row in tokens]
    return torch.stack([x[i, j] for i, j in enumerate(eot)]) @ sd["text_projection"]


def _inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, IMAGE, IMAGE, generator=g)
    tokens = torch.zeros(3, CTX, dtype=torch.long)
    for i, n in enumerate([5, 9, CTX]):
        tokens[i, 0] = VOCAB - 2  # "start"
        tokens[i, 1 : n - 1] = torch.randint(1, VOCAB - 2, (n - 2,), generator=g)
        tokens[i, n - 1] = VOCAB - 1  # "end of text": the highest id
    return images, tokens


def _assert_matches_reference(model, sd, activation="quick_gelu"):
    images, tokens = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(images), reference_encode_image(sd, images, activation), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            model.encode_text(tokens), reference_encode_text(sd, tokens, activation), atol=1e-5, rtol=1e-5
        )


# -- a TorchScript archive with OpenAI's parameter names ------------------------------------------------------
class _Holder(nn.Module):
    """Nested modules holding given tensors under their dotted names (like OpenAI's archive, without code)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def module_with_state_dict(sd: dict[str, torch.Tensor]) -> nn.Module:
    root = _Holder()
    for key, value in sd.items():
        *path, name = key.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, _Holder())
            mod = getattr(mod, part)
        if value.is_floating_point():
            mod.register_parameter(name, nn.Parameter(value.clone(), requires_grad=False))
        else:
            mod.register_buffer(name, value.clone())
    return root


# -- tests ----------------------------------------------------------------------------------------------------
def test_plain_openai_state_dict(tmp_path):
    sd = openai_vit_state_dict()
    path = tmp_path / "openai_state_dict.pt"
    torch.save(sd, path)
    model = load_clip_checkpoint(path)
    cfg = model.config
    assert (cfg["embed_dim"], cfg["image_size"], cfg["vision_patch_size"], cfg["vision_width"]) == (EMBED, 32, 8, WIDTH)
    assert (cfg["vision_layers"], cfg["text_layers"], cfg["context_length"], cfg["vocab_size"]) == (2, 2, CTX, VOCAB)
    assert cfg["activation"] == "quick_gelu" and not model.training
    _assert_matches_reference(model, sd)


def test_torchscript_archive(tmp_path):
    sd = openai_vit_state_dict(seed=3)
    scripted = torch.jit.script(module_with_state_dict(sd))
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(scripted, str(path))
    assert set(torch.jit.load(str(path)).state_dict()) == set(sd)
    model = load_clip_checkpoint(path)
    assert model.config["activation"] == "quick_gelu"
    _assert_matches_reference(model, sd)


def test_torchscript_fp16_weights_load_as_float32(tmp_path):
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in openai_vit_state_dict(seed=4).items()}
    path = tmp_path / "fp16.pt"
    torch.jit.save(torch.jit.script(module_with_state_dict(sd)), str(path))
    model = load_clip_checkpoint(path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    _assert_matches_reference(model, {k: v.float() for k, v in sd.items()})


def test_torchscript_archive_is_read_without_jit(tmp_path, monkeypatch):
    """torch.jit.load runs the archive's code: the weights are read with the weights-only unpickler instead."""
    from dalle2.safe_load import read_torchscript_state_dict

    sd = openai_vit_state_dict(seed=6)
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.script(module_with_state_dict(sd)), str(path))
    reference = torch.jit.load(str(path)).state_dict()

    def no_jit(*args, **kwargs):
        raise AssertionError("torch.jit.load was called")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    read = read_torchscript_state_dict(path)
    assert set(read) == set(reference) and all(torch.equal(read[k], reference[k]) for k in reference)
    _assert_matches_reference(load_clip_checkpoint(path), sd)


def test_torchscript_archive_with_a_payload_is_refused(tmp_path):
    from dalle2.safe_load import UntrustedCheckpointError
    from helpers.evil import assert_refused, malicious_torchscript

    marker = tmp_path / "PAYLOAD_RAN"
    evil = malicious_torchscript(tmp_path / "ViT-evil.pt", marker)
    with pytest.raises(UntrustedCheckpointError) as e:
        load_clip_checkpoint(evil)
    assert_refused(str(e.value), evil, marker)


def test_pickled_weights_with_a_payload_are_refused(tmp_path):
    from dalle2.safe_load import UntrustedCheckpointError
    from helpers.evil import assert_refused, malicious_checkpoint

    marker = tmp_path / "PAYLOAD_RAN"
    evil = malicious_checkpoint(tmp_path / "open_clip_pytorch_model.bin", marker, stage=None)
    with pytest.raises(UntrustedCheckpointError) as e:
        load_clip_checkpoint(evil)
    assert_refused(str(e.value), evil, marker)


def test_open_clip_wrapped_checkpoint(tmp_path):
    sd = openai_vit_state_dict(seed=5, meta_keys=False)
    ckpt = {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}}
    path = tmp_path / "epoch_3.pt"
    torch.save(ckpt, path)
    model = load_clip_checkpoint(path)  # open_clip's LAION models: nn.GELU
    assert model.config["activation"] == "gelu"
    _assert_matches_reference(model, sd, activation="gelu")
    quick = load_clip_checkpoint(path, activation="quick_gelu")  # "*-quickgelu" models
    _assert_matches_reference(quick, sd, activation="quick_gelu")


def test_safetensors_round_trip(tmp_path):
    sd = openai_vit_state_dict(seed=6)
    torch.save(sd, tmp_path / "w.pt")
    model = load_clip_checkpoint(tmp_path / "w.pt")
    save_safetensors(model, tmp_path / "clip.safetensors")
    again = load_safetensors(tmp_path / "clip.safetensors")
    assert again.config == model.config
    images, tokens = _inputs()
    with torch.no_grad():
        assert torch.equal(again.encode_image(images), model.encode_image(images))
        assert torch.equal(again.encode_text(tokens), model.encode_text(tokens))
    # load_clip_checkpoint also accepts our safetensors, and OpenAI-layout safetensors (open_clip's HF exports)
    assert load_clip_checkpoint(tmp_path / "clip.safetensors").config == model.config
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "open_clip_model.safetensors"))
    from_hf = load_clip_checkpoint(tmp_path / "open_clip_model.safetensors", activation="quick_gelu")
    _assert_matches_reference(from_hf, sd)


def test_wrong_files_give_clear_errors(tmp_path):
    torch.save({"conv.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a CLIP checkpoint"):
        load_clip_checkpoint(tmp_path / "other.pt")
    sd = openai_vit_state_dict()
    sd["visual.extra.weight"] = torch.zeros(2)
    del sd["ln_final.bias"]
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"missing keys: text\.ln_final\.bias.*unexpected keys: visual\.extra\.weight"):
        load_clip_checkpoint(tmp_path / "broken.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        load_clip_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        load_clip_checkpoint(tmp_path / "missing.pt")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a dalle2 CLIP safetensors"):
        load_safetensors(tmp_path / "x.safetensors")


def test_resnet_state_dict_round_trip(tmp_path):
    """A ModifiedResNet CLIP re-exported under OpenAI's names loads back to identical outputs."""
    from dalle2.clip.model import CLIP

    model = CLIP(
        embed_dim=32,
        image_size=64,
        vision_width=16,
        vision_layers=[1, 1, 1, 1],
        vision_heads=8,
        context_length=CTX,
        vocab_size=VOCAB,
        text_width=T_WIDTH,
        text_layers=1,
        text_heads=1,
        activation="quick_gelu",
    ).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_(1.0, 0.1)
    inverse = {
        "text.proj": "text_projection",
        ".attn.qkv.weight": ".attn.in_proj_weight",
        ".attn.qkv.bias": ".attn.in_proj_bias",
        ".attn.proj.": ".attn.out_proj.",
        ".mlp.fc.": ".mlp.c_fc.",
        ".mlp.proj.": ".mlp.c_proj.",
    }
    openai = {}
    for k, v in model.state_dict().items():
        k = k.removeprefix("text.") if k.startswith("text.") and k != "text.proj" else k
        for a, b in inverse.items():
            k = k.replace(a, b)
        openai[k] = v
    assert "visual.attnpool.c_proj.weight" in openai and "transformer.resblocks.0.attn.in_proj_weight" in openai
    torch.save(openai, tmp_path / "rn.pt")
    loaded = load_clip_checkpoint(tmp_path / "rn.pt", activation="quick_gelu")
    assert loaded.config["vision_layers"] == [1, 1, 1, 1] and loaded.config["vision_heads"] == 8
    images, tokens = _inputs()
    images = torch.nn.functional.interpolate(images, size=64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images))
        torch.testing.assert_close(loaded.encode_text(tokens), model.encode_text(tokens))
