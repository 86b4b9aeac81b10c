"""Chapter 7's model: parity with torch.nn's transformer, positions, masks and decoding."""

import math

import pytest
import torch
from torch import nn

from transformer_book.masking import causal_mask
from transformer_book.model import (
    Decoder,
    DecoderLayer,
    Encoder,
    EncoderLayer,
    FeedForward,
    PositionalEncoding,
    Transformer,
    copy_torch_transformer_weights,
    greedy_decode,
    sinusoidal_positions,
)

D, H, FF = 16, 4, 32


def _padding(lengths, length):
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]  # (B, L) True = real


def _close(ours, theirs, what):
    err = (ours - theirs).abs().max().item()
    assert err < 1e-5, f"{what}: max difference {err:.2e}"


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_and_stack_match_torch(norm_first):
    torch.manual_seed(0)
    keep = _padding([7, 5, 2], 7)
    for stacked in (False, True):
        layer = nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True,
                                           norm_first=norm_first)
        if stacked:
            theirs = nn.TransformerEncoder(layer, 3, norm=nn.LayerNorm(D) if norm_first else None,
                                           enable_nested_tensor=False)
            ours = Encoder(D, H, FF, 3, norm_first=norm_first)
        else:
            theirs, ours = layer, EncoderLayer(D, H, FF, norm_first=norm_first)
        copy_torch_transformer_weights(ours, theirs)
        x = torch.randn(3, 7, D, requires_grad=True)
        out_t = theirs(x, src_key_padding_mask=~keep)
        (grad_t,) = torch.autograd.grad(out_t.pow(2).sum(), x)
        out_o = ours(x, keep[:, None, None, :])
        (grad_o,) = torch.autograd.grad(out_o.pow(2).sum(), x)
        _close(out_o, out_t, "encoder output")
        _close(grad_o, grad_t, "encoder input gradient")


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_and_stack_match_torch(norm_first):
    torch.manual_seed(1)
    keep_src = _padding([6, 3], 6)
    for stacked in (False, True):
        layer = nn.TransformerDecoderLayer(D, H, FF, dropout=0.0, batch_first=True,
                                           norm_first=norm_first)
        if stacked:
            theirs = nn.TransformerDecoder(layer, 2, norm=nn.LayerNorm(D) if norm_first else None)
            ours = Decoder(D, H, FF, 2, norm_first=norm_first)
        else:
            theirs, ours = layer, DecoderLayer(D, H, FF, norm_first=norm_first)
        copy_torch_transformer_weights(ours, theirs)
        x = torch.randn(2, 5, D, requires_grad=True)
        memory = torch.randn(2, 6, D, requires_grad=True)
        out_t = theirs(x, memory, tgt_mask=~causal_mask(5), memory_key_padding_mask=~keep_src)
        grads_t = torch.autograd.grad(out_t.pow(2).sum(), (x, memory))
        out_o = ours(x, memory, causal_mask(5), keep_src[:, None, None, :])
        grads_o = torch.autograd.grad(out_o.pow(2).sum(), (x, memory))
        _close(out_o, out_t, "decoder output")
        for g_o, g_t in zip(grads_o, grads_t):
            _close(g_o, g_t, "decoder input gradient")


def test_copy_refuses_mismatched_modules():
    with pytest.raises(ValueError, match="norm_first"):
        copy_torch_transformer_weights(
            EncoderLayer(D, H, FF, norm_first=True),
            nn.TransformerEncoderLayer(D, H, FF, batch_first=True),
        )
    with pytest.raises(ValueError, match="layers"):
        layer = nn.TransformerEncoderLayer(D, H, FF, batch_first=True)
        copy_torch_transformer_weights(Encoder(D, H, FF, 2),
                                       nn.TransformerEncoder(layer, 3, enable_nested_tensor=False))


def test_sinusoidal_table_follows_the_formula():
    table = sinusoidal_positions(50, 10)
    assert table.shape == (50, 10) and table.dtype == torch.float32
    for p in (0, 1, 17, 49):
        for i in range(5):
            angle = p / 10000 ** (2 * i / 10)
            assert math.isclose(table[p, 2 * i].item(), math.sin(angle), abs_tol=1e-6)
            assert math.isclose(table[p, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-6)
    with pytest.raises(ValueError, match="even"):
        sinusoidal_positions(4, 7)


def test_positional_encoding_is_a_buffer_and_refuses_long_inputs():
    pe = PositionalEncoding(8, max_len=20)
    assert not list(pe.parameters())
    assert "table" in dict(pe.named_buffers())
    x = torch.zeros(2, 6, 8)
    assert torch.equal(pe(x), sinusoidal_positions(6, 8).expand(2, 6, 8))
    with pytest.raises(ValueError, match=r"21.*20"):
        pe(torch.zeros(1, 21, 8))


def test_feed_forward_is_position_wise():
    torch.manual_seed(2)
    ff = FeedForward(D, FF)
    x = torch.randn(2, 5, D)
    out = ff(x)
    assert out.shape == x.shape
    _close(out[:, 3], ff(x[:, 3:4])[:, 0], "position 3 alone")


def _model(**kwargs):
    torch.manual_seed(3)
    return Transformer(11, 13, d_model=D, num_heads=H, num_encoder_layers=2,
                       num_decoder_layers=2, d_ff=FF, dropout=0.0, max_len=32, **kwargs)


def test_transformer_shapes_and_masks():
    model = _model().eval()
    src = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]])
    tgt = torch.tensor([[1, 4, 5], [1, 4, 0]])
    logits = model(src, tgt)
    assert logits.shape == (2, 3, 13)
    # padding in the source changes nothing: extra pad columns leave the logits alone
    wider = torch.cat([src, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    _close(model(wider, tgt), logits, "logits with extra source padding")
    # causal: a later target token cannot change earlier positions
    changed = tgt.clone()
    changed[0, 2] = 9
    _close(model(src, changed)[0, :2], logits[0, :2], "logits before the changed token")
    layer = model.decoder.layers[-1]
    assert layer.cross_attn.attention_weights.shape == (2, H, 3, 4)
    assert torch.all(layer.cross_attn.attention_weights[1, :, :, 2:] == 0)


def test_greedy_decode_starts_with_bos_pads_after_eos_and_restores_mode():
    model = _model().train()
    src = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0], [9, 9, 9, 0]])
    out = greedy_decode(model, src, bos_id=1, eos_id=2, max_len=9)
    assert model.training, "greedy_decode must put the model back in training mode"
    assert out.dtype == torch.long and out.shape[0] == 3 and out.shape[1] <= 9
    assert torch.all(out[:, 0] == 1)
    # each step is the argmax of the model's own logits for the prefix so far
    with torch.no_grad():
        model.eval()
        for row in range(3):
            for t in range(1, out.size(1)):
                prefix = out[row : row + 1, :t]
                if (prefix == 2).any():
                    assert out[row, t] == model.pad_id
                    continue
                step = model(src[row : row + 1], prefix)[0, -1].argmax()
                assert out[row, t] == step
