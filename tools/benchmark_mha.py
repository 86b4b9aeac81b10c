"""Time our MultiHeadAttention against torch.nn.MultiheadAttention (forward + backward).

    python tools/benchmark_mha.py                  # batch 32, length 128, d_model 256, 8 heads
    python tools/benchmark_mha.py --repeats 50 --device cuda

Both modules get the same weights and the same input (self-attention, no mask, training
mode, dropout 0). The runs alternate between the two modules, so that a machine busy with
other work slows both alike; after a warm-up, the median time of each is reported, and
their ratio (ours / PyTorch's). PyTorch's module is called with need_weights=False, as a
model calls it: it then skips the averaged weights and runs the fused kernel
F.scaled_dot_product_attention (chapter 3 explains the difference); --need-weights times
it returning its weights instead. The course's goal is a ratio of at most 1.2. This is a
measurement, not a test: it never fails.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from transformer_book.multihead import MultiHeadAttention, copy_torch_mha_weights


def forward_backward(module, x, need_weights: bool = False) -> None:
    if isinstance(module, nn.MultiheadAttention):
        out, _ = module(x, x, x, need_weights=need_weights)  # (output, weights or None)
    else:
        out = module(x, x, x)
    out.sum().backward()


def alternated_medians(steps, repeats: int, warmup: int, cuda: bool) -> list[float]:
    """Median seconds of each callable in ``steps``, the calls alternating, after a warm-up.

    Alternating means a machine busy with other work slows every step alike.
    """
    times: list[list[float]] = [[] for _ in steps]
    for i in range(warmup + repeats):
        for record, step in zip(times, steps):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def median_times(
    modules, x, repeats: int, warmup: int, need_weights: bool = False
) -> list[float]:
    """Median seconds of one forward + backward pass of each module, runs interleaved."""
    steps = [lambda m=m: forward_backward(m, x, need_weights) for m in modules]
    return alternated_medians(steps, repeats, warmup, cuda=x.device.type == "cuda")


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--need-weights",
        action="store_true",
        help="time nn.MultiheadAttention returning its averaged weights (need_weights=True)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(args.d_model, args.heads, batch_first=True)
    ours = copy_torch_mha_weights(MultiHeadAttention(args.d_model, args.heads), theirs)
    ours, theirs = ours.to(args.device), theirs.to(args.device)
    x = torch.randn(
        args.batch, args.length, args.d_model, device=args.device, requires_grad=True
    )  # (B, L, d_model)
    t_ours, t_theirs = median_times(
        [ours, theirs], x, args.repeats, args.warmup, args.need_weights
    )
    ratio = t_ours / t_theirs
    print(
        f"forward+backward, batch {args.batch}, length {args.length}, d_model {args.d_model}, "
        f"{args.heads} heads, {args.device}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} runs after {args.warmup} warm-up"
    )
    print(f"  ours (transformer_book.MultiHeadAttention): {t_ours * 1e3:8.2f} ms")
    print(
        f"  torch.nn.MultiheadAttention (need_weights={args.need_weights}): "
        f"{t_theirs * 1e3:8.2f} ms"
    )
    verdict = "within" if ratio <= 1.2 else "above"
    print(f"  ratio ours / torch: {ratio:.3f} ({verdict} the goal of 1.2)")
    return ratio


if __name__ == "__main__":
    main()
