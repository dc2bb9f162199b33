"""``module.compile=true``: the prior's, decoder's and upsampler's networks (and their EMA copies) compiled in place with
torch.compile (inductor, on CPU here) give the eager losses and samples, and keep their parameter names."""

from __future__ import annotations

import copy

import pytest
import torch

from dalle2.lit.decoder_module import DecoderModule, UpsamplerModule
from dalle2.lit.prior_module import PriorModule

PRIOR = dict(embed_dim=16, text_token_dim=16, width=32, depth=1, heads=2, dim_head=16, max_text_len=8)
UNET = dict(model_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], head_channels=8)


def build(stage: str):
    if stage == "prior":
        return PriorModule(network=PRIOR, diffusion={"num_timesteps": 50})
    if stage == "decoder":
        return DecoderModule(network={**UNET, "clip_dim": 16}, diffusion={"num_timesteps": 50}, image_size=8)
    return UpsamplerModule(
        network={**UNET, "lowres_cond": True},
        diffusion={"num_timesteps": 50},
        lowres_size=4,
        image_size=8,
        lowres_aug={"num_levels": 50, "max_train_level": 10},
    )


def batch(stage: str) -> dict:
    g = torch.Generator().manual_seed(1)
    if stage == "prior":
        return {
            "img_emb": torch.randn(4, 16, generator=g),
            "txt_emb": torch.randn(4, 16, generator=g),
            "txt_tokens": torch.randn(4, 8, 16, generator=g),
            "tokens": torch.ones(4, 8, dtype=torch.long),
        }
    out = {"image": torch.rand(4, 3, 8, 8, generator=g) * 2 - 1}
    if stage == "decoder":
        out["img_emb"] = torch.randn(4, 16, generator=g)
    return out


def loss_and_sample(module, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
    x0, kwargs = module.training_inputs(batch(stage), train=True, generator=torch.Generator().manual_seed(2))
    loss = module.diffusion.training_losses(
        module.net, x0, model_kwargs=kwargs, generator=torch.Generator().manual_seed(3)
    )["loss"]
    loss.backward()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        if stage == "prior":
            sample = module.sample(
                text_embed=kwargs["text_embed"],
                text_tokens=kwargs["text_tokens"],
                text_mask=kwargs["text_mask"],
                steps=3,
                generator=g,
            )
        elif stage == "decoder":
            sample = module.sample(kwargs["image_embed"], steps=3, generator=g)
        else:
            sample = module.upsample(kwargs["lowres_image"], steps=3, generator=g)
    return loss.detach(), sample


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["prior", "decoder", "upsampler"])
def test_compiled_networks_give_the_eager_losses_and_samples(stage):
    torch._dynamo.reset()
    eager = build(stage)
    compiled = copy.deepcopy(eager)
    compiled.compile_networks = True
    compiled.configure_model()  # what the Trainer calls: compiles the network and its EMA copy in place
    assert compiled.net._compiled_call_impl is not None and compiled.ema.module._compiled_call_impl is not None
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints unchanged
    loss_e, sample_e = loss_and_sample(eager, stage)
    loss_c, sample_c = loss_and_sample(compiled, stage)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
    for (name, p_e), p_c in zip(eager.net.named_parameters(), compiled.net.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-3, atol=1e-5, msg=name)
    torch.testing.assert_close(sample_c, sample_e, rtol=1e-3, atol=1e-4)


def _compile_sharded_worker(rank: int, port: int, out: str) -> None:
    import json
    import os
    from pathlib import Path

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from dalle2.lit.fsdp import FSDP2Strategy, compile_network
    from dalle2.nn.transformer import ResidualAttentionBlock, Transformer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        strategy = FSDP2Strategy(activation_checkpointing=True)
        strategy._device_mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))
        runs = {}
        for mode in ("eager", "compiled"):
            torch.manual_seed(0)
            net = Transformer(width=16, layers=2, heads=2).train()
            strategy.shard(net)
            if mode == "compiled":
                compile_network(net, backend="aot_eager")
                blocks = [m for m in net.modules() if isinstance(m, ResidualAttentionBlock)]
                assert blocks and all(b._compiled_call_impl is not None for b in blocks)
            x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(rank))  # each rank its own batch
            loss = net(x).square().mean()
            loss.backward()
            grads = {n: p.grad.full_tensor().flatten().tolist() for n, p in net.named_parameters()}
            runs[mode] = {"loss": loss.item(), "grads": grads, "keys": sorted(net.state_dict())}
        Path(f"{out}.{rank}").write_text(json.dumps(runs))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compiled_blocks_under_fsdp_give_the_eager_loss_and_gradients(tmp_path):
    """``module.compile=true`` under ``trainer=fsdp``: each sharded block compiled (FSDP2's hooks inside dynamo's
    graph), with activation checkpointing, over 2 gloo processes: the loss and the full gradients equal the eager
    sharded network's, parameter names unchanged. The backend is ``aot_eager`` (dynamo + AOT autograd over the DTensor
    parameters and FSDP hooks, where compile meets sharding); inductor's own numerics are the test above's."""
    import json
    import os
    from pathlib import Path

    import torch.multiprocessing as mp

    out = str(tmp_path / "runs")
    mp.spawn(_compile_sharded_worker, args=(29600 + os.getpid() % 200, out), nprocs=2, join=True)
    for rank in (0, 1):
        runs = json.loads(Path(f"{out}.{rank}").read_text())
        eager, compiled = runs["eager"], runs["compiled"]
        assert compiled["keys"] == eager["keys"]
        assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-5)
        for name, g in eager["grads"].items():
            torch.testing.assert_close(torch.tensor(compiled["grads"][name]), torch.tensor(g), rtol=1e-4, atol=1e-6)
