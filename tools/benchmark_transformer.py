"""Time one training step of our Transformer against the same model from torch.nn parts.

    python tools/benchmark_transformer.py          # Transformer's default size, as chapter 7
    python tools/benchmark_transformer.py --d-model 64 --d-ff 128   # the chapter's models
    python tools/benchmark_transformer.py --device cuda --repeats 50

"The same model from torch.nn parts" is chapter 7's TorchParts: two nn.Embedding (scaled by sqrt(d_model), plus
the same sinusoidal table), nn.Transformer(batch_first=True) with the two final
LayerNorms it adds to post-LN stacks removed (our post-LN model, like the paper, has
none), and an nn.Linear. Both get the same weights (checked: same logits) and the same
batch of token ids with padding; a step is forward, cross-entropy with ignore_index,
backward and an Adam step, in training mode with dropout 0. The steps alternate between
the two models, so that a machine busy with other work slows both alike; after a
warm-up, the median time of each is reported, and their ratio (ours / torch.nn's).
The course's goal is a ratio of at most 1.15. This is a measurement, not a test: it
never fails.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from benchmark_mha import alternated_medians  # tools/ is on the path of a script run

from transformer_book.model import TorchParts, Transformer, copy_torch_transformer_weights

PAD = 0


def torch_build(ours: Transformer, num_heads: int, d_ff: int) -> TorchParts:
    """Chapter 7's TorchParts (the course's one torch.nn build) with the weights of `ours`."""
    theirs = TorchParts(ours.src_embed.num_embeddings, ours.generator.out_features,
                        ours.d_model, num_heads, len(ours.encoder.layers), d_ff,
                        dropout=0.0, pad_id=PAD)
    # the stacks go torch -> ours, embeddings and output layer ours -> torch
    copy_torch_transformer_weights(ours.encoder, theirs.transformer.encoder)
    copy_torch_transformer_weights(ours.decoder, theirs.transformer.decoder)
    for name in ("src_embed", "tgt_embed", "generator"):
        getattr(theirs, name).load_state_dict(getattr(ours, name).state_dict())
    return theirs


def random_batch(batch, length, vocab, device, generator):
    """Token ids (B, L) in 3 .. vocab - 1, each row padded after a random length >= L / 2."""
    tokens = torch.randint(3, vocab, (batch, length), generator=generator)
    lengths = torch.randint(length // 2, length + 1, (batch, 1), generator=generator)
    tokens[torch.arange(length)[None, :] >= lengths] = PAD
    return tokens.to(device)


def training_step(model, optimizer, src, dec_in, target) -> None:
    logits = model(src, dec_in)  # (B, L_tgt, vocab)
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=PAD)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def median_step_times(models, src, dec_in, target, repeats: int, warmup: int) -> list[float]:
    """Median seconds of one training step of each model, the models alternating."""
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-4) for m in models]
    steps = [lambda m=m, o=o: training_step(m, o, src, dec_in, target)
             for m, o in zip(models, optimizers)]
    return alternated_medians(steps, repeats, warmup, cuda=src.device.type == "cuda")


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--length", type=int, default=18, help="source length")
    parser.add_argument("--target-length", type=int, default=11)
    parser.add_argument("--vocab", type=int, default=50)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2, help="encoder and decoder layers")
    parser.add_argument("--d-ff", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    ours = Transformer(args.vocab, args.vocab, args.d_model, args.heads, args.layers,
                       args.layers, args.d_ff, dropout=0.0)
    theirs = torch_build(ours, args.heads, args.d_ff)
    ours, theirs = ours.to(args.device).train(), theirs.to(args.device).train()
    generator = torch.Generator().manual_seed(1)
    src = random_batch(args.batch, args.length, args.vocab, args.device, generator)
    target = random_batch(args.batch, args.target_length, args.vocab, args.device, generator)
    dec_in = torch.cat([torch.ones_like(target[:, :1]), target[:, :-1]], dim=1)  # BOS = 1
    with torch.no_grad():
        error = (ours(src, dec_in) - theirs(src, dec_in)).abs().max().item()
    t_ours, t_theirs = median_step_times(
        [ours, theirs], src, dec_in, target, args.repeats, args.warmup
    )
    ratio = t_ours / t_theirs
    print(
        f"one training step, batch {args.batch}, lengths {args.length}/{args.target_length}, "
        f"d_model {args.d_model}, {args.heads} heads, {args.layers}+{args.layers} layers, "
        f"d_ff {args.d_ff}, {args.device}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} steps after {args.warmup} warm-up"
    )
    print(f"  same weights: max |logit difference| {error:.1e}")
    print(f"  ours (transformer_book.Transformer):     {t_ours * 1e3:8.2f} ms")
    print(f"  torch.nn parts (nn.Transformer inside):  {t_theirs * 1e3:8.2f} ms")
    verdict = "within" if ratio <= 1.15 else "above"
    print(f"  ratio ours / torch: {ratio:.3f} ({verdict} the goal of 1.15)")
    return ratio


if __name__ == "__main__":
    main()
