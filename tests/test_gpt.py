"""Chapter 9's exported code: the GPT (parity with torch.nn, causality, the cache), the
samplers' properties and the byte-pair encoding's round trip."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from transformer_book import GPT, BytePairEncoding, filter_probs, generate, sample


def _torch_gpt(ours: GPT) -> nn.Module:
    """The same model from torch.nn's layers, with our weights."""
    d_model = ours.embedding.embedding_dim
    heads = ours.layers[0].self_attn.num_heads
    layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0,
                                       batch_first=True, norm_first=True)
    stack = nn.TransformerEncoder(layer, len(ours.layers), norm=nn.LayerNorm(d_model),
                                  enable_nested_tensor=False)
    with torch.no_grad():
        stack.norm.load_state_dict(ours.norm.state_dict())
        for mine, theirs in zip(ours.layers, stack.layers):
            attn = mine.self_attn
            theirs.self_attn.in_proj_weight.copy_(
                torch.cat([attn.w_q.weight, attn.w_k.weight, attn.w_v.weight]))
            theirs.self_attn.in_proj_bias.copy_(
                torch.cat([attn.w_q.bias, attn.w_k.bias, attn.w_v.bias]))
            theirs.self_attn.out_proj.load_state_dict(attn.w_o.state_dict())
            theirs.linear1.load_state_dict(mine.feed_forward.linear1.state_dict())
            theirs.linear2.load_state_dict(mine.feed_forward.linear2.state_dict())
            theirs.norm1.load_state_dict(mine.sublayer1.norm.state_dict())
            theirs.norm2.load_state_dict(mine.sublayer2.norm.state_dict())

    def forward(tokens):
        length = tokens.size(1)
        x = ours.embedding(tokens) + ours.positions.weight[:length]
        mask = nn.Transformer.generate_square_subsequent_mask(length)
        return ours.generator(stack(x, mask=mask, is_causal=True))

    return forward


@pytest.mark.parametrize("d_model, heads, layers, length", [(48, 4, 2, 32), (30, 3, 1, 7)])
def test_gpt_equals_the_torch_nn_build(d_model, heads, layers, length):
    torch.manual_seed(0)
    ours = GPT(50, d_model, heads, layers, max_len=32).eval()
    tokens = torch.randint(0, 50, (3, length))
    with torch.no_grad():
        gap = (ours(tokens) - _torch_gpt(ours)(tokens)).abs().max().item()
    assert gap < 1e-5


def test_gpt_is_causal_and_refuses_a_long_input():
    torch.manual_seed(1)
    model = GPT(20, 32, 4, 2, max_len=16).eval()
    tokens = torch.randint(0, 20, (2, 16))
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 20
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert torch.equal(before[:, :9], after[:, :9])
    assert not torch.allclose(before[:, 9:], after[:, 9:])
    with pytest.raises(ValueError, match="exceed the context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_the_cache_gives_the_same_logits_and_tokens():
    torch.manual_seed(2)
    model = GPT(30, 32, 4, 2, max_len=12).eval()
    tokens = torch.randint(0, 30, (2, 10))
    with torch.no_grad():
        cache = {}
        steps = [model(tokens[:, :4], cache)] + [model(tokens[:, t : t + 1], cache)
                                                 for t in range(4, 10)]
        full = model(tokens)
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5
    assert cache["length"] == 10
    prompt = tokens[:, :3]
    for kwargs in ({}, {"temperature": 1.0, "top_k": 5}):  # 40 tokens: several jumps
        plain = generate(model, prompt, 40, generator=torch.Generator().manual_seed(0),
                         **kwargs)
        cached = generate(model, prompt, 40, use_cache=True,
                          generator=torch.Generator().manual_seed(0), **kwargs)
        assert torch.equal(plain, cached) and plain.shape == (2, 43)


def test_filter_probs_properties():
    logits = 3 * torch.randn(50, 40, generator=torch.Generator().manual_seed(3))
    probs = logits.softmax(-1)
    assert torch.allclose(filter_probs(logits), probs)
    assert torch.allclose(filter_probs(logits, temperature=0.5), (logits / 0.5).softmax(-1))
    top = filter_probs(logits, top_k=3)
    assert ((top > 0).sum(-1) == 3).all() and torch.allclose(top.sum(-1), torch.ones(50))
    assert torch.equal(top > 0, torch.zeros_like(top, dtype=torch.bool).scatter(
        -1, logits.topk(3).indices, True))
    for p in (0.3, 0.8, 0.95):
        kept = filter_probs(logits, top_p=p)
        ranked = probs.sort(-1, descending=True).values
        size = (kept > 0).sum(-1, keepdim=True)
        mass = ranked.cumsum(-1)
        assert (mass.gather(-1, size - 1) >= p - 1e-6).all()
        assert ((size == 1) | (mass.gather(-1, (size - 2).clamp(min=0)) < p)).all()
        assert torch.allclose(kept.sum(-1), torch.ones(50))
    with pytest.raises(ValueError, match="temperature must be positive"):
        filter_probs(logits, temperature=0.0)


def test_sample_is_greedy_at_temperature_0_and_stays_inside_top_k():
    logits = torch.randn(8, 3, 30, generator=torch.Generator().manual_seed(4))
    assert torch.equal(sample(logits, temperature=0), logits.argmax(-1))
    draws = torch.stack([sample(logits, top_k=4, generator=torch.Generator().manual_seed(s))
                         for s in range(20)])  # (20, 8, 3)
    allowed = logits.topk(4).indices  # (8, 3, 4)
    assert (draws[..., None] == allowed).any(-1).all()


def test_bpe_round_trip_and_merges():
    texts = ["the cat sat on the mat; the cat ate", "then the hat, and the that"] * 3
    bpe = BytePairEncoding.train(texts, 270)
    assert len(bpe.vocab) == 270
    assert bpe.vocab[256] in (b"at", b" t", b"th", b"he")  # a most frequent pair first
    rng = random.Random(0)
    alphabet = "ab th\n\t\x00é—💡ß€"
    for _ in range(50):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        assert bpe.decode(bpe.encode(s)) == s
    assert len(bpe.encode("the cat")) < len(b"the cat")
    tiny = BytePairEncoding.train(["abab"], 300)  # runs out of pairs: stops early
    assert len(tiny.vocab) < 300 and tiny.decode(tiny.encode("abab")) == "abab"
