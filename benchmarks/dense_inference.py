"""Dense inference: ``encode_dense`` of every construction/gating variant vs ``encode_image``, one model.

All variants share one open_clip model object (same weights). The reference is open_clip's own
``encode_image`` at the model's native size; at other sizes open_clip cannot run (fixed position
embedding), so the reference is ``DenseRCModel.encode_image``, which is open_clip's computation with
the position embedding interpolated. Times are interleaved per size (see ``benchmarks.common``).

    python -m benchmarks.dense_inference --model ViT-Tiny-16 --sizes 224 448 1024
    python -m benchmarks.dense_inference --model ViT-B-16 --sizes 224 448 1024 --device cuda \\
        --precision bf16 --batch 8
"""
from __future__ import annotations

import argparse
import logging
import statistics

import torch

from denserc import create_model
from denserc.models import TABLE5_VARIANTS, DenseRCModel

from .common import (PRECISIONS, add_common_arguments, autocast, cpu_peak_mib, cuda_peak_mib, environment,
                     interleaved_timings, markdown_table, paired_ratios, quartiles, setup)

TARGET_RATIO = 1.05
OPEN_CLIP_IMAGE = "open_clip encode_image"
DENSERC_IMAGE = "DenseRC encode_image"


def variant_label(construction: str, gating: str) -> str:
    return f"encode_dense {construction}/{gating}"


def build_variants(base: DenseRCModel) -> dict[tuple[str, str], DenseRCModel]:
    """One DenseRCModel per variant, all wrapping ``base.clip`` (the very same weights)."""
    models = {}
    for construction, gating in TABLE5_VARIANTS.values():
        model = DenseRCModel(base.clip, model_name=base.model_name, model_cfg=base.model_cfg,
                             preprocess_cfg=base.preprocess_cfg, construction=construction, gating=gating)
        models[(construction, gating)] = model.to(next(base.parameters()).device).eval()
    return models


def make_call(encode, images: torch.Tensor, precision: str, compile_model: bool, compile_backend: str = "inductor"):
    """A no-grad call of ``encode(images)`` under the requested precision (optionally compiled)."""
    encode = torch.compile(encode, backend=compile_backend) if compile_model else encode

    def call():
        with torch.no_grad(), autocast(images.device, precision):
            return encode(images)
    return call


def size_calls(models: dict[tuple[str, str], DenseRCModel], images: torch.Tensor, precision: str,
               compile_model: bool, compile_backend: str = "inductor") -> dict[str, object]:
    """Every call compared at one size, the reference first (``compile_backend``: torch.compile's backend)."""
    any_model = next(iter(models.values()))
    calls = {}
    if tuple(images.shape[-2:]) == any_model.native_size:
        calls[OPEN_CLIP_IMAGE] = make_call(any_model.clip.encode_image, images, precision, compile_model,
                                           compile_backend)
    calls[DENSERC_IMAGE] = make_call(any_model.encode_image, images, precision, compile_model, compile_backend)
    for (construction, gating), model in models.items():
        calls[variant_label(construction, gating)] = make_call(model.encode_dense, images, precision,
                                                               compile_model, compile_backend)
    return calls


def build_call(*, model_name: str, pretrained: str | None, size: int, batch: int, label: str,
               precision: str, compile_model: bool):
    """One call of the table (by its label) on a fresh CPU model: the memory probe's entry point."""
    logging.getLogger().setLevel(logging.ERROR)
    base = create_model(model_name, pretrained)
    images = torch.randn(batch, 3, size, size)
    return size_calls(build_variants(base), images, precision, compile_model)[label]


def peak_memory(args: argparse.Namespace, device: torch.device, size: int, label: str, call) -> float:
    """MiB for the table's memory column (CUDA: in this process; CPU: a fresh process per row)."""
    if device.type == "cuda":
        return cuda_peak_mib(call, device)
    return cpu_peak_mib("benchmarks.dense_inference:build_call", model_name=args.model,
                        pretrained=args.pretrained, size=size, batch=args.batch, label=label,
                        precision=args.precision, compile_model=args.compile)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dense_inference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-Tiny-16", help="open_clip model name (random weights unless --pretrained)")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag or weights file")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448, 1024], help="square input sizes")
    parser.add_argument("--batch", type=int, default=1)
    add_common_arguments(parser)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16 = autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile every call")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=11, help="at least this many interleaved rounds (>= 2) ...")
    parser.add_argument("--min-seconds", type=float, default=20.0, help="... and rounds for at least this long per size")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    device = setup(args)
    if args.repeats < 2:
        raise SystemExit(f"--repeats must be at least 2 (a median and quartiles need rounds), got {args.repeats}")

    torch.manual_seed(0)
    base = create_model(args.model, args.pretrained, device=device)
    models = build_variants(base)
    print(f"## Dense inference: {args.model}, batch {args.batch}, {args.precision}"
          f"{', torch.compile' if args.compile else ''}, {args.device}\n")
    print("\n".join(environment(device)))
    print(f"- timing: {args.warmup} warm-up rounds, then interleaved rounds (at least {args.repeats}, and at least "
          f"{args.min_seconds:g} s per size; count per size below); ratio = median over rounds of "
          "(time / reference time in the same round)")
    memory_note = ("peak CUDA memory allocated above the weights during one call (torch.cuda.max_memory_allocated)"
                   if device.type == "cuda" else
                   "peak RSS growth during one call after a warm-up call, fresh process per row "
                   "(VmHWM reset via /proc/self/clear_refs)")
    if not args.no_memory:
        print(f"- memory: {memory_note}")
    print()

    rows = []
    worst_default = 0.0
    for size in args.sizes:
        if args.compile:
            torch.compiler.reset()  # the 6 variants' compiled code per size stays under dynamo's recompile limit
        images = torch.randn(args.batch, 3, size, size, device=device)
        calls = size_calls(models, images, args.precision, args.compile)
        reference = next(iter(calls))
        times = interleaved_timings(calls, warmup=args.warmup, repeats=args.repeats, device=device,
                                    min_seconds=args.min_seconds)
        print(f"- {size}: reference {reference}, {len(times[reference])} rounds")
        for label, call in calls.items():
            median_ms = 1000 * statistics.median(times[label])
            ratios = paired_ratios(times[label], times[reference])
            ratio = statistics.median(ratios)
            low, high = quartiles(ratios)
            if label == variant_label("multi-v", "hsg"):
                worst_default = max(worst_default, ratio)
            memory = "-" if args.no_memory else f"{peak_memory(args, device, size, label, call):.1f}"
            rows.append((size, label, f"{median_ms:.2f}", f"{ratio:.3f}", f"{low:.3f}-{high:.3f}", memory))
        del images, calls
    print(markdown_table(("size", "call", "median ms", "time / reference", "quartiles", "peak MiB"), rows))
    verdict = "meets" if worst_default <= TARGET_RATIO else "misses"
    print(f"\nDefault DenseRC (multi-v/hsg) encode_dense: worst ratio {worst_default:.3f} over sizes "
          f"{args.sizes}; {verdict} the target <= {TARGET_RATIO}x encode_image.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
