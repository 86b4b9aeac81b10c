"""What the chapter 7 tables cannot express: accepted variants, the refused loss restored,
the chapter's own Transformer, classifiers of another architecture.

Every mistake of the tables in transformer_book/checks/ch07.py is handed to its check by
test_checks_all.py.
"""

from __future__ import annotations

import pytest
import torch.nn.functional as F

from transformer_book import Transformer
from transformer_book.checks import CheckFailure
from transformer_book.checks.ch07 import (
    _batch,
    _beam_variant,
    _classifier,
    _encoding_variant,
    _loss_from,
    _right_terms,
    check_beam_search,
    check_decoder_batch,
    check_encoder_classifier,
    check_label_smoothed_cross_entropy,
    check_sinusoidal_encoding,
)


def test_the_variants_pass_with_their_default_options(capsys):
    check_sinusoidal_encoding(_encoding_variant)
    check_label_smoothed_cross_entropy(_loss_from(_right_terms))
    check_decoder_batch(_batch())
    for scale in (True, False):  # leaving the embedding scale out is accepted too
        check_encoder_classifier(_classifier(scale=scale))
    assert capsys.readouterr().out.count("passed") == 5


@pytest.mark.parametrize(
    "variant",
    [_beam_variant(), _beam_variant(refill=True), _beam_variant(early_stop=True),
     _beam_variant(refill=True, stop_at_k=True)],
    ids=["plain", "refill", "early stop", "fairseq"],
)
def test_beam_search_accepts_the_usual_variants(variant, capsys):
    check_beam_search(variant)
    assert "passed" in capsys.readouterr().out


def test_beam_search_is_also_run_on_the_chapters_transformer():
    right = _beam_variant()

    def beam_search(model, src, bos_id, eos_id, max_len, beam_size):
        if isinstance(model, Transformer):  # right on the check's lookup models only
            return right(model, src, bos_id, eos_id, max_len, 1)
        return right(model, src, bos_id, eos_id, max_len, beam_size)

    with pytest.raises(CheckFailure, match="on the chapter's Transformer .* beam search returns"):
        check_beam_search(beam_search)


def test_sinusoidal_encoding_names_an_in_place_change():
    def shifts_in_place(positions, d_model, base=10000.0):
        table = _encoding_variant(positions, d_model, base)
        positions.mul_(2)
        return table

    with pytest.raises(CheckFailure, match="changed its input `positions` in place"):
        check_sinusoidal_encoding(shifts_in_place)


def test_cross_entropy_is_restored_and_refused_when_imported_by_name():
    namespace = {}
    exec(
        "from torch.nn.functional import cross_entropy\n"
        "def label_smoothed_cross_entropy(logits, target, smoothing=0.1, ignore_index=-100):\n"
        "    return cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),\n"
        "                         label_smoothing=smoothing, ignore_index=ignore_index)\n",
        namespace,
    )
    original = F.cross_entropy
    with pytest.raises(CheckFailure, match="calls F.cross_entropy"):
        check_label_smoothed_cross_entropy(namespace["label_smoothed_cross_entropy"])
    assert namespace["cross_entropy"] is F.cross_entropy is original


def test_encoder_classifier_names_a_wrong_stack():
    from transformer_book.model import Encoder

    right = _classifier()

    class WithEncoder(right):
        def __init__(self, vocab_size, num_classes, d_model, num_heads, num_layers, d_ff,
                     dropout=0.0, max_len=512, pad_id=0):
            super().__init__(vocab_size, num_classes, d_model, num_heads, num_layers, d_ff,
                             dropout, max_len, pad_id)
            self.layers = Encoder(d_model, num_heads, d_ff, num_layers)

    class OneLayerShort(right):
        def __init__(self, vocab_size, num_classes, d_model, num_heads, num_layers, d_ff,
                     dropout=0.0, max_len=512, pad_id=0):
            super().__init__(vocab_size, num_classes, d_model, num_heads, num_layers - 1, d_ff,
                             dropout, max_len, pad_id)

    with pytest.raises(CheckFailure, match="it is Encoder"):
        check_encoder_classifier(WithEncoder)
    with pytest.raises(CheckFailure, match="holds 1 layers; num_layers=2"):
        check_encoder_classifier(OneLayerShort)
