"""Chapter 7's model: parity with torch.nn's transformer, positions, masks and decoding."""

import math
import warnings

import pytest
import torch
from torch import nn

import transformer_book
from transformer_book.masking import causal_mask, padding_mask
from transformer_book.model import (
    Decoder,
    DecoderLayer,
    Encoder,
    EncoderLayer,
    FeedForward,
    PositionalEncoding,
    Sublayer,
    Transformer,
    copy_torch_transformer_weights,
    greedy_decode,
    sinusoidal_positions,
)
from transformer_book.norm import AddNorm, PreNormResidual

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


# ----- more properties of the model, and the whole model against nn.Transformer --------

SRC = torch.tensor([[5, 6, 7, 8, 9, 10, 10], [5, 6, 7, 0, 0, 0, 0], [5, 6, 7, 8, 9, 0, 0]])
TGT = torch.tensor([[1, 5, 6, 7, 8], [1, 5, 6, 0, 0], [1, 5, 0, 0, 0]])


def test_public_names_are_exported_from_the_package_top_level():
    for name in ("sinusoidal_positions", "PositionalEncoding", "FeedForward", "EncoderLayer",
                 "DecoderLayer", "Encoder", "Decoder", "Transformer",
                 "copy_torch_transformer_weights"):
        assert getattr(transformer_book, name) is getattr(transformer_book.model, name)
        assert name in transformer_book.__all__
    # one greedy_decode: chapter 8 adds the cache to chapter 7's
    assert transformer_book.greedy_decode is transformer_book.model.greedy_decode
    assert "greedy_decode" in transformer_book.__all__


def test_sinusoidal_known_values_and_not_sin_cos_swapped():
    expected = torch.tensor([[0.0, 1.0, 0.0, 1.0],
                             [math.sin(1), math.cos(1), math.sin(0.01), math.cos(0.01)],
                             [math.sin(2), math.cos(2), math.sin(0.02), math.cos(0.02)]])
    table = sinusoidal_positions(3, 4)
    torch.testing.assert_close(table, expected)
    assert not torch.allclose(table, expected[:, [1, 0, 3, 2]])


@pytest.mark.parametrize("k", [1, 5, 40])
def test_relative_offset_is_a_rotation_of_each_frequency_pair(k):
    table = sinusoidal_positions(120, 32).double()
    omega = 10000 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    c, s = torch.cos(k * omega), torch.sin(k * omega)
    sin_p, cos_p = table[:-k, 0::2], table[:-k, 1::2]
    torch.testing.assert_close(sin_p * c + cos_p * s, table[k:, 0::2], atol=1e-4, rtol=0)
    torch.testing.assert_close(-sin_p * s + cos_p * c, table[k:, 1::2], atol=1e-4, rtol=0)


def test_positional_table_is_not_saved_and_dropout_acts_only_in_training():
    module = PositionalEncoding(8, max_len=10, dropout=0.5)
    assert "table" not in module.state_dict()
    x = torch.randn(4, 10, 8)
    assert torch.equal(module.eval()(x), x + module.table)
    assert (module.train()(x) == 0).any()


@pytest.mark.parametrize("norm_first", [False, True])
def test_sublayer_computes_chapter_6s_add_norm_or_pre_norm_residual(norm_first):
    torch.manual_seed(4)
    block = Sublayer(6, norm_first=norm_first)
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.uniform_(-1, 1)
    f = nn.Linear(6, 6)
    x = torch.randn(2, 3, 6)
    if norm_first:
        reference = PreNormResidual(6, f)
        reference.norm.load_state_dict(block.norm.state_dict())
        torch.testing.assert_close(block(x, f), reference(x))
    else:
        reference = AddNorm(6)
        reference.norm.load_state_dict(block.norm.state_dict())
        torch.testing.assert_close(block(x, f), reference(x, f(x)))


class _TorchParts(nn.Module):
    """Our embeddings and positions around an nn.Transformer (its post-LN norms removed)."""

    def __init__(self, ours, norm_first):
        super().__init__()
        self.ours = ours
        self.transformer = nn.Transformer(D, H, len(ours.encoder.layers),
                                          len(ours.decoder.layers), FF, 0.0,
                                          batch_first=True, norm_first=norm_first)
        if not norm_first:
            self.transformer.encoder.norm = self.transformer.decoder.norm = None

    def forward(self, src, tgt):
        x = self.ours.embed(self.ours.src_embed, src)
        y = self.ours.embed(self.ours.tgt_embed, tgt)
        out = self.transformer(x, y, tgt_mask=~causal_mask(tgt.size(1)),
                               src_key_padding_mask=src == 0, tgt_key_padding_mask=tgt == 0,
                               memory_key_padding_mask=src == 0)
        return self.ours.generator(out)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("norm_first", [False, True])
def test_whole_transformer_matches_nn_transformer(norm_first):
    torch.manual_seed(5)
    ours = Transformer(13, 17, D, H, 2, 3, FF, dropout=0.0, norm_first=norm_first)
    theirs = _TorchParts(ours, norm_first)
    with torch.no_grad():
        for p in theirs.transformer.parameters():
            p.add_(0.1 * torch.randn_like(p))  # the layers' copies differ
    copy_torch_transformer_weights(ours.encoder, theirs.transformer.encoder)
    copy_torch_transformer_weights(ours.decoder, theirs.transformer.decoder)
    torch.testing.assert_close(ours(SRC, TGT), theirs(SRC, TGT), atol=1e-5, rtol=1e-5)
    ours(SRC, TGT).logsumexp(-1).sum().backward()
    theirs(SRC, TGT).logsumexp(-1).sum().backward()
    torch.testing.assert_close(ours.decoder.layers[2].cross_attn.w_o.weight.grad,
                               theirs.transformer.decoder.layers[2].multihead_attn.out_proj
                               .weight.grad, atol=1e-5, rtol=1e-4)


def test_torch_eval_fast_path_zeroes_padding_and_agrees_on_real_positions():
    torch.manual_seed(6)
    t_stack = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True), 2).eval()
    ours = copy_torch_transformer_weights(Encoder(D, H, FF, 2), t_stack)
    x, real = torch.randn(3, 7, D), SRC != 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "nested tensors are a prototype"
        fast = t_stack(x, src_key_padding_mask=~real)
        mine = ours(x, padding_mask(SRC, 0))
    assert torch.equal(fast[~real], torch.zeros_like(fast[~real]))
    assert mine[~real].abs().max() > 0.1
    torch.testing.assert_close(fast[real], mine[real], atol=1e-5, rtol=1e-5)


def test_copy_refuses_a_final_norm_mismatch():
    layer = nn.TransformerEncoderLayer(D, H, FF, batch_first=True)
    with_norm = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(D), enable_nested_tensor=False)
    with pytest.raises(ValueError, match="LayerNorm"):
        copy_torch_transformer_weights(Encoder(D, H, FF, 2), with_norm)  # post-LN: no norm


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_final_norms_state_dict_and_gradients(norm_first):
    model = _model(norm_first=norm_first)
    assert isinstance(model.encoder.norm, nn.Identity) != norm_first
    assert isinstance(model.decoder.norm, nn.Identity) != norm_first
    assert not any("table" in name for name in model.state_dict())
    model(SRC, TGT).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_embeddings_have_unit_size_after_the_sqrt_d_scale():
    model = Transformer(50, 60, d_model=64)
    for embedding in (model.src_embed, model.tgt_embed):
        assert 0.9 < (embedding.weight * 8).std().item() < 1.1


def test_target_padding_after_the_sequence_changes_nothing():
    model = _model().eval()
    logits = model(SRC, TGT)
    longer = torch.cat([TGT, torch.zeros(3, 2, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(SRC, longer)[:, :5], logits, atol=1e-5, rtol=1e-5)


def test_encoder_is_permutation_equivariant_without_positions_and_not_with_them():
    model = _model().eval()
    x = torch.randn(1, 7, D)
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    torch.testing.assert_close(model.encoder(x[:, perm]), model.encoder(x)[:, perm],
                               atol=1e-5, rtol=1e-5)
    src = SRC[:1]
    assert (model.encode(src[:, perm]) - model.encode(src)[:, perm]).abs().max() > 0.1


class _Scripted(nn.Module):
    """A stand-in for greedy_decode: sequence b writes tokens 4, 5, ... and then EOS (2)
    after b + 1 tokens; it records the mode and gradient state of every call."""

    pad_id = 0

    def __init__(self):
        super().__init__()
        self.calls = []

    def encode(self, src):
        self.calls.append(("encode", self.training, torch.is_grad_enabled()))
        return src.float()[..., None]

    def decode(self, tgt, memory, src):
        self.calls.append(("decode", self.training, torch.is_grad_enabled()))
        batch, length = tgt.shape
        logits = torch.zeros(batch, length, 10)
        for b in range(batch):
            logits[b, -1, 2 if length == b + 2 else 3 + length] = 1.0
        return logits


def test_greedy_decode_pads_after_eos_stops_when_all_are_done_and_encodes_once():
    model = _Scripted().train()
    out = greedy_decode(model, torch.ones(3, 4, dtype=torch.long), bos_id=1, eos_id=2,
                        max_len=20)
    assert out.tolist() == [[1, 4, 2, 0, 0], [1, 4, 5, 2, 0], [1, 4, 5, 6, 2]]
    assert model.training
    assert all(not training and not grad for _, training, grad in model.calls)
    assert [name for name, _, _ in model.calls].count("encode") == 1


def test_greedy_decode_stops_at_max_len_without_eos():
    model = _Scripted()
    out = greedy_decode(model, torch.ones(3, 4, dtype=torch.long), bos_id=1, eos_id=9,
                        max_len=3)
    assert out.shape == (3, 3) and out[:, 0].tolist() == [1, 1, 1]
