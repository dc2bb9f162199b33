import torch

from dalle2.nn import EMA, Attention, Transformer, timestep_embedding


def reference_attention(attn: Attention, x: torch.Tensor, causal: bool) -> torch.Tensor:
    b, n, d = x.shape
    h = attn.heads
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    q, k, v = (t.view(b, n, h, -1).transpose(1, 2) for t in (q, k, v))
    w = (q @ k.transpose(-1, -2)) / (q.shape[-1] ** 0.5)
    if causal:
        w = w.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    out = (w.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    return attn.proj(out)


def test_attention_matches_reference_and_causal_mask():
    for causal in (False, True):
        attn = Attention(32, heads=4, causal=causal)
        x = torch.randn(2, 7, 32)
        torch.testing.assert_close(attn(x), reference_attention(attn, x, causal), rtol=1e-5, atol=1e-5)
    # causal: the first output does not depend on later inputs
    attn = Attention(32, heads=4, causal=True)
    x = torch.randn(1, 5, 32)
    y1 = attn(x)
    x2 = x.clone()
    x2[:, 3:] += 1.0
    torch.testing.assert_close(attn(x2)[:, :3], y1[:, :3])


def test_padding_mask_ignores_masked_keys():
    attn = Attention(16, heads=2)
    x = torch.randn(1, 6, 16)
    mask = torch.tensor([[True, True, True, True, False, False]])
    y = attn(x, mask=mask)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(1, 2, 16)
    torch.testing.assert_close(attn(x2, mask=mask)[:, :4], y[:, :4])


def test_transformer_grad_checkpointing_same_grads():
    torch.manual_seed(0)
    net = Transformer(width=16, layers=2, heads=2)
    x = torch.randn(2, 5, 16)
    net(x).square().mean().backward()
    g1 = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net.grad_checkpointing = True
    net(x).square().mean().backward()
    for a, p in zip(g1, net.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_timestep_embedding_shape_and_values():
    t = torch.tensor([0, 10, 999])
    e = timestep_embedding(t, 8)
    assert e.shape == (3, 8)
    torch.testing.assert_close(e[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))
    odd = timestep_embedding(t, 7)
    assert odd.shape == (3, 7)


def test_ema_update_matches_closed_form():
    net = torch.nn.Linear(3, 3)
    ema = EMA(net, decay=0.9, warmup=0)
    w0 = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    torch.testing.assert_close(ema.module.weight, 0.9 * w0 + 0.1 * (w0 + 1.0))
    assert not any(p.requires_grad for p in ema.module.parameters())
    # warm-up: first update nearly copies the weights
    ema2 = EMA(net, decay=0.999, warmup=10)
    assert ema2.decay_at(0) == 0.1
    assert ema2.decay_at(10**6) == 0.999
