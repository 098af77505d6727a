"""Attention path: open_clip's ``nn.MultiheadAttention`` in inference vs ``F.scaled_dot_product_attention``.

DenseRC's ``encode_image``/``encode_dense`` and the frozen teacher run open_clip's blocks, whose
attention is ``nn.MultiheadAttention``. In eval mode without gradients that module takes PyTorch's
inference fast path; on the CPU the fast path materialises the (heads, N, N) attention matrix,
which the training profile and the 1024-px dense-inference memory show. This measures one attention
of a model's first block both ways, with the block's own weights, at the token counts of the given
input sizes: time ratio (interleaved), peak memory, and the largest output difference.

    python -m benchmarks.attention_path --model ViT-Tiny-16 --sizes 224 1024
    python -m benchmarks.attention_path --model ViT-B-16 --sizes 224 448 1024 --device cuda
"""
from __future__ import annotations

import argparse
import logging
import statistics

import torch
import torch.nn.functional as F

from denserc import create_model

from .common import (add_common_arguments, cpu_peak_mib, cuda_peak_mib, environment, interleaved_timings,
                     markdown_table, paired_ratios, quartiles, setup)

PATHS = ("nn.MultiheadAttention", "F.scaled_dot_product_attention")


def attention_calls(attention: torch.nn.MultiheadAttention, tokens: torch.Tensor) -> dict:
    """Both paths as no-grad calls on ``tokens`` (B, N, width), the block's weights in each."""
    batch, count, width = tokens.shape
    heads = attention.num_heads

    def module_path():
        with torch.no_grad():
            return attention(tokens, tokens, tokens, need_weights=False)[0]

    def sdpa_path():
        with torch.no_grad():
            qkv = F.linear(tokens, attention.in_proj_weight, attention.in_proj_bias)
            q, k, v = qkv.view(batch, count, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
            mixed = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, count, width)
            return attention.out_proj(mixed)

    return dict(zip(PATHS, (module_path, sdpa_path)))


def build_call(*, model_name: str, size: int, batch: int, path: str):
    """One path at one size on a fresh CPU model: the CPU memory probe's entry point."""
    logging.getLogger().setLevel(logging.ERROR)
    torch.manual_seed(0)
    model = create_model(model_name).eval()
    attention = model.visual.transformer.resblocks[0].attn
    tokens = torch.randn(batch, 1 + (size // model.patch_size) ** 2, model.width)
    return attention_calls(attention, tokens)[path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention_path", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-Tiny-16", help="open_clip model name (random weights)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448, 1024],
                        help="input sizes; tokens = 1 + (size / patch)^2")
    parser.add_argument("--batch", type=int, default=1)
    add_common_arguments(parser)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--min-seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    device = setup(args)
    torch.manual_seed(0)
    model = create_model(args.model, device=device).eval()
    attention = model.visual.transformer.resblocks[0].attn

    print(f"## Attention path: {args.model} block 0 (width {model.width}, {model.heads} heads), batch {args.batch}, "
          f"{args.device}\n")
    print("\n".join(environment(device)))
    memory = ("CUDA max_memory_allocated above the inputs" if device.type == "cuda" else
              "peak RSS growth in a fresh process per row (see benchmarks.common)")
    print(f"- no_grad, eval; interleaved rounds (>= {args.repeats}, >= {args.min_seconds:g} s per size); "
          f"ratio = median of per-round ratios; memory: {memory}\n")
    rows = []
    for size in args.sizes:
        tokens = torch.randn(args.batch, 1 + (size // model.patch_size) ** 2, model.width, device=device)
        calls = attention_calls(attention, tokens)
        difference = float((calls[PATHS[0]]() - calls[PATHS[1]]()).abs().max())
        times = interleaved_timings(calls, warmup=args.warmup, repeats=args.repeats, device=device,
                                    min_seconds=args.min_seconds)
        for path, call in calls.items():
            ratios = paired_ratios(times[path], times[PATHS[0]])
            low, high = quartiles(ratios)
            if device.type == "cuda":
                peak = cuda_peak_mib(call, device)
            else:
                peak = cpu_peak_mib("benchmarks.attention_path:build_call", model_name=args.model, size=size,
                                    batch=args.batch, path=path)
            rows.append((size, tokens.shape[1], path, f"{1000 * statistics.median(times[path]):.2f}",
                         f"{statistics.median(ratios):.3f}", f"{low:.3f}-{high:.3f}", f"{peak:.1f}",
                         f"{difference:.1e}"))
    print(markdown_table(("size", "tokens", "path", "median ms", "time / MHA", "quartiles", "peak MiB",
                          "max abs difference"), rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
