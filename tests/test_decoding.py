"""Chapter 8: the fused path and the key/value cache of MultiHeadAttention."""

from __future__ import annotations

import pytest
import torch

from transformer_book import MultiHeadAttention, causal_mask, padding_mask


def _module(d_model=16, num_heads=4, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return MultiHeadAttention(d_model, num_heads, dropout=dropout)


def _masks(batch=3, length=6):
    tokens = torch.tensor([[5, 3, 2, 7, 1, 4], [6, 2, 9, 0, 0, 0], [3, 3, 0, 0, 0, 0]])
    pad = padding_mask(tokens[:batch, :length], 0)  # (B, 1, 1, L)
    return {
        "none": None,
        "causal": causal_mask(length),
        "padding": pad,
        "both": causal_mask(length) & pad,
    }


@pytest.mark.parametrize("mask_name", ["none", "causal", "padding", "both"])
def test_fused_agrees_with_the_explicit_path(mask_name):
    module = _module().eval()
    x = torch.randn(3, 6, 16)
    mask = _masks()[mask_name]
    explicit = module(x, x, x, mask)
    assert module.attention_weights is not None
    fused = module(x, x, x, mask, need_weights=False)
    assert module.attention_weights is None  # never a stale map
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


def test_fused_gradients_agree():
    module = _module().eval()
    mask = _masks()["both"]
    x1 = torch.randn(3, 6, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    module(x1, x1, x1, mask).square().sum().backward()
    explicit_grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    module(x2, x2, x2, mask, need_weights=False).square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5, rtol=1e-5)
    for p, g in zip(module.parameters(), explicit_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_give_zeros_on_both_paths():
    module = _module().eval()
    x = torch.randn(2, 4, 16)
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    mask[0, :, 1] = False  # query 1 of sequence 0 may attend nothing
    explicit = module(x, x, x, mask)
    fused = module(x, x, x, mask, need_weights=False)
    assert not torch.isnan(fused).any()
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[0, 1], module.w_o.bias)  # zero heads, then W_o


def test_the_attribute_selects_the_path_and_the_argument_wins():
    module = _module().eval()
    x = torch.randn(2, 5, 16)
    module.need_weights = False
    module(x, x, x)
    assert module.attention_weights is None
    module(x, x, x, need_weights=True)
    assert module.attention_weights.shape == (2, 4, 5, 5)


def test_fused_path_refuses_a_float_mask():
    module = _module()
    x = torch.randn(1, 3, 16)
    with pytest.raises(TypeError, match="boolean"):
        module(x, x, x, torch.ones(3, 3), need_weights=False)


def test_fused_dropout_is_active_in_training_and_off_in_eval():
    module = _module(dropout=0.5)
    x = torch.randn(2, 8, 16)
    module.train()
    a = module(x, x, x, need_weights=False)
    b = module(x, x, x, need_weights=False)
    assert not torch.allclose(a, b)
    module.eval()
    torch.testing.assert_close(module(x, x, x, need_weights=False), module(x, x, x))


@pytest.mark.parametrize("need_weights", [True, False])
def test_self_attention_cache_matches_the_full_causal_pass(need_weights):
    module = _module().eval()
    x = torch.randn(2, 7, 16)
    full = module(x, x, x, causal_mask(7), need_weights=need_weights)
    cache: dict = {}
    steps = []
    for t in range(7):
        x_t = x[:, t : t + 1]
        steps.append(module(x_t, x_t, x_t, need_weights=need_weights, cache=cache))
        assert cache["k"].shape == (2, 4, t + 1, 4)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_static_cache_projects_the_memory_once():
    module = _module().eval()
    memory, x = torch.randn(2, 5, 16), torch.randn(2, 4, 16)
    mask = _masks(2, 5)["padding"]
    full = module(x, memory, memory, mask)
    calls = []
    handle = module.w_k.register_forward_hook(lambda *args: calls.append(1))
    cache = {"static": True}
    steps = [
        module(x[:, t : t + 1], memory, memory, mask, cache=cache) for t in range(4)
    ]
    handle.remove()
    assert len(calls) == 1
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- the model


def _model(norm_first=False, seed=0):
    from transformer_book import Transformer

    torch.manual_seed(seed)
    return Transformer(
        13, 11, d_model=32, num_heads=4, d_ff=64, dropout=0.1, norm_first=norm_first
    ).eval()


def _sources(seed=1):
    generator = torch.Generator().manual_seed(seed)
    src = torch.randint(3, 13, (6, 9), generator=generator)
    src[2:, -3:] = 0  # padded sources
    return src


@pytest.mark.parametrize("norm_first", [False, True])
def test_cached_decode_gives_the_same_tokens_and_logits(norm_first):
    from transformer_book import greedy_decode

    model, src = _model(norm_first), _sources()
    probe = greedy_decode(model, src, 1, -1, 12, use_cache=True)
    eos = int(probe[:, 1:].flatten().mode().values)  # makes some sequences end early
    cached, cached_logits = greedy_decode(model, src, 1, eos, 12, use_cache=True,
                                          return_logits=True)
    plain, plain_logits = greedy_decode(
        model, src, 1, eos, 12, use_cache=False, return_logits=True
    )
    assert (cached == eos).any(dim=1).any()
    assert torch.equal(cached, plain)
    assert torch.equal(cached, greedy_decode(model, src, 1, eos, 12))  # default: no cache
    torch.testing.assert_close(cached_logits, plain_logits, atol=1e-5, rtol=1e-5)


def test_there_is_one_greedy_decode_chapter_7s_extended_by_chapter_8():
    import transformer_book
    from transformer_book import decoding, model

    assert transformer_book.greedy_decode is model.greedy_decode
    assert not hasattr(decoding, "greedy_decode")


def test_greedy_decode_restores_training_mode_and_refuses_max_len_0():
    from transformer_book import greedy_decode

    model = _model().train()
    greedy_decode(model, _sources(), 1, 2, 4)
    assert model.training
    with pytest.raises(ValueError, match="max_len"):
        greedy_decode(model, _sources(), 1, 2, 0)


def test_decode_with_a_cache_in_chunks_matches_the_full_decode():
    model, src = _model(), _sources()
    tgt = torch.randint(3, 11, (6, 7))
    tgt[4:, -2:] = 0  # padding inside the target too
    with torch.no_grad():
        memory = model.encode(src)
        full = model.decode(tgt, memory, src)
        cache: dict = {}
        parts = [
            model.decode(tgt[:, a:b], memory, src, cache)
            for a, b in [(0, 3), (3, 4), (4, 7)]
        ]
    real = tgt != 0  # rows of padded queries are not compared (never used)
    torch.testing.assert_close(
        torch.cat(parts, dim=1)[real], full[real], atol=1e-5, rtol=1e-5
    )
    assert cache["length"] == 7


def test_decode_with_a_cache_refuses_positions_past_max_len():
    from transformer_book import Transformer

    model = Transformer(5, 5, d_model=8, num_heads=2, d_ff=16, max_len=4).eval()
    src = torch.tensor([[1, 2]])
    with torch.no_grad():
        memory = model.encode(src)
        cache: dict = {}
        model.decode(torch.tensor([[1, 2, 3, 4]]), memory, src, cache)
        with pytest.raises(ValueError, match="exceeds max_len 4"):
            model.decode(torch.tensor([[1]]), memory, src, cache)


def test_cache_nbytes_matches_the_formula():
    from transformer_book.decoding import cache_nbytes

    model, src = _model(), _sources()
    with torch.no_grad():
        memory = model.encode(src)
        cache: dict = {}
        model.decode(torch.randint(3, 11, (6, 5)), memory, src, cache)
    layers, batch, length, source, d_model = 2, 6, 5, 9, 32
    assert cache_nbytes(cache) == layers * 2 * batch * (length + source) * d_model * 4


def test_use_fused_attention_switches_every_module_and_keeps_the_outputs():
    from transformer_book.decoding import use_fused_attention

    model, src = _model(), _sources()
    tgt = torch.randint(3, 11, (6, 5))
    with torch.no_grad():
        explicit = model(src, tgt)
        use_fused_attention(model)
        fused = model(src, tgt)
    attention = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    assert len(attention) == 6 and all(m.attention_weights is None for m in attention)
    real = tgt != 0
    torch.testing.assert_close(fused[real], explicit[real], atol=1e-5, rtol=1e-5)
    use_fused_attention(model, enabled=False)
    with torch.no_grad():
        model(src, tgt)
    assert model.decoder.layers[-1].cross_attn.attention_weights.shape == (6, 4, 5, 9)


@pytest.mark.parametrize("norm_first", [False, True])
def test_preallocated_cache_gives_the_same_tokens_and_never_reallocates(norm_first):
    from transformer_book import greedy_decode

    model, src = _model(norm_first), _sources()
    plain, plain_logits = greedy_decode(model, src, 1, -1, 12, return_logits=True)
    pre, pre_logits = greedy_decode(model, src, 1, -1, 12, use_cache=True,
                                    preallocate=True, return_logits=True)
    assert torch.equal(pre, plain)
    torch.testing.assert_close(pre_logits, plain_logits, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        memory = model.encode(src)
        cache: dict = {"capacity": 8}
        model.decode(plain[:, :3], memory, src, cache)  # a chunk of 3, then single steps
        buffer = cache[0]["self"]["k"]
        assert buffer.shape == (6, 4, 8, 8)
        for t in range(3, 8):
            model.decode(plain[:, t : t + 1], memory, src, cache)
            assert cache[0]["self"]["k"].data_ptr() == buffer.data_ptr()
        with pytest.raises(ValueError, match="the cache holds 8 positions"):
            model.decode(plain[:, 8:9], memory, src, cache)


def test_cache_nbytes_counts_the_preallocated_buffers():
    from transformer_book.decoding import cache_nbytes

    model, src = _model(), _sources()
    with torch.no_grad():
        memory = model.encode(src)
        cache: dict = {"capacity": 10}
        model.decode(torch.randint(3, 11, (6, 4)), memory, src, cache)
    assert cache_nbytes(cache) == 2 * 2 * 6 * (10 + 9) * 32 * 4
