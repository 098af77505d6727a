"""``denserc analyze gradients|heads|layers|lambda|decomposition|consistency|delta-l``: the paper's analyses on
any CLIP (open_clip NAME:TAG or a DenseRC folder), each writing a JSON report, a PNG beside it and a Markdown
table on stdout (docs/analysis.md).

    denserc analyze gradients --model ViT-Testbed-P8:testbed --variants none qk qq hsg --images 16 --out g.json
    denserc analyze heads --model ViT-B-16:openai --data /data/coco/val2017 --images 64 --out heads.json

Without ``--data`` a plug-in's analysis data for the model are used (the testbed registers its held-out scenes
for ``ViT-Testbed-P8``); with it, an image folder such as COCO val2017.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ANALYSES = ("gradients", "heads", "layers", "lambda", "decomposition", "consistency", "delta-l")
DEFAULT_VARIANTS = ("none", "qk", "qq", "hsg")
VARIANT_CHOICES = ("none", "qk", "qq", "hsg", "x+v", "v")  # analysis.variants.GRADIENT_VARIANTS (torch-free here)
LAMBDA_VALUES = (0.0, 0.0125, 0.025, 0.05, 0.1)  # analysis.sweeps.LAMBDAS


def register(subparsers) -> None:
    parser = subparsers.add_parser("analyze", help="the paper's analyses: gradients, heads, layers, lambda, ...",
                                   description="The paper's analyses on any CLIP; JSON report + PNG + Markdown table.")
    commands = parser.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)

    gradients = commands.add_parser("gradients", help="per-patch gradient of L_semantics per construction (Fig. 3)")
    _model_and_data(gradients)
    gradients.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANT_CHOICES,
                           help="gatings of multi-v (none qk qq hsg) or the constructions x+v and v "
                                "(default: %(default)s)")
    gradients.add_argument("--teacher", default=None, metavar="SPEC",
                           help="the teacher of L_semantics (default: the model itself, as at the start of training)")
    gradients.add_argument("--seed", type=int, default=0, help="seed of the training grids (default 0)")
    gradients.set_defaults(func=run_gradients, images=8)

    heads = commands.add_parser("heads", help="HSG gates per layer and head, head removal, attention locality")
    _model_and_data(heads)
    heads.set_defaults(func=run_heads, images=64)

    decomposition = commands.add_parser("decomposition",
                                        help="how much of the class token the multi-layer value paths explain")
    _model_and_data(decomposition)
    decomposition.add_argument("--num-layers", type=int, default=None, help="L of the value paths (default: the model's)")
    decomposition.set_defaults(func=run_decomposition, images=200)

    consistency = commands.add_parser("consistency", help="intra- vs inter-class spread of mask-pooled dense features")
    _model_and_data(consistency, several=True)
    consistency.set_defaults(func=run_consistency, images=200)

    for name, what in (("layers", "L = 1..depth value layers, training-free and (--trained) distilled"),
                       ("lambda", "lambda of L_coherence, distilled with several seeds")):
        sweep = commands.add_parser(name, help=what)
        _model_and_data(sweep)
        sweep.add_argument("--trained", action="store_true", default=name == "lambda",
                           help="also distil a model per point (with --config) and evaluate it")
        sweep.add_argument("--config", default=None,
                           help="training config of the trained points (default: the plug-in's, e.g. testbed)")
        sweep.add_argument("--runs", type=Path, default=Path("runs/analysis/trained"),
                           help="folder of the trained points; a point whose final/ exists is reused (default: %(default)s)")
        sweep.add_argument("--seeds", type=int, nargs="+", default=[0, 1] if name == "lambda" else [0])
        sweep.add_argument("--existing-only", action="store_true",
                           help="evaluate the trained points already in --runs, train none (the report lists the rest)")
        sweep.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more training-config overrides")
        if name == "layers":
            sweep.add_argument("--layers", type=int, nargs="+", default=None, help="L values (default: 1..depth)")
        else:
            sweep.add_argument("--values", type=float, nargs="+", default=list(LAMBDA_VALUES),
                               help="lambda values (default: %(default)s)")
            sweep.add_argument("--num-layers", type=int, default=3, help="L of every point (default 3)")
        sweep.set_defaults(func=run_sweep, sweep=name, images=200)

    delta = commands.add_parser("delta-l", help="Monte Carlo check of Delta L = sum S^2 E||Pv||^2 > 0")
    delta.add_argument("--samples", type=int, default=200000)
    delta.add_argument("--patches", type=int, default=16)
    delta.add_argument("--dim", type=int, default=32)
    delta.add_argument("--rank", type=int, default=8)
    delta.add_argument("--mean-shifts", type=float, nargs="+", default=[0.0, 0.5],
                       help="common mean of the other patches' values; 0 is the formula's assumption")
    delta.add_argument("--seed", type=int, default=0)
    delta.add_argument("--out", type=Path, default=Path("analysis-delta-l.json"))
    delta.add_argument("--no-progress", action="store_true", help="accepted for uniformity (nothing long runs)")
    delta.set_defaults(func=run_delta_l)


def _model_and_data(parser: argparse.ArgumentParser, several: bool = False) -> None:
    parser.add_argument("--model", required=True, metavar="SPEC", action="append" if several else "store",
                        help="DenseRC folder or open_clip NAME:TAG / NAME:FILE" + ("; repeat to compare" if several else ""))
    parser.add_argument("--data", type=Path, default=None,
                        help="image folder (e.g. COCO val2017; for layers: a COCO-panoptic root to evaluate on); "
                             "default: the plug-in's data for the model (the testbed's held-out scenes)")
    parser.add_argument("--images", type=int, help="images (or crops' scenes) to analyse")
    parser.add_argument("--image-size", type=int, default=None, help="input size for an image folder (default 448)")
    parser.add_argument("--class-names", default="coco_panoptic", help="zero-shot classes for an image folder")
    parser.add_argument("--templates", default="simple", help="prompt templates for an image folder")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default analysis-ANALYSIS.json); the PNG "
                                                               "goes beside it")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/analysis"),
                        help="where a plug-in writes its data (default: %(default)s)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


# ------------------------------------------------------------------------------------------ helpers
def _device(args):
    import torch
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _load(spec: str, device):
    from ..models import from_spec, random_weights
    if random_weights(spec):
        print(f"note: {spec} has random weights (no :TAG or :FILE): the analysis measures the code, not a CLIP",
              file=sys.stderr)
    model = from_spec(spec, device=device).eval()
    model.requires_grad_(False)
    return model


def _data(args, model, device):
    from .data import analysis_data
    data = analysis_data(model, args.data, args.images, image_size=args.image_size, class_names=args.class_names,
                         templates=args.templates, workdir=args.work_dir, progress=not args.no_progress)
    data.images, data.crops = data.images.to(device), data.crops.to(device)
    if data.crop_labels is not None:
        data.crop_labels = data.crop_labels.to(device)
    return data


def _classifier(model, spec: str, data):
    from ..eval.text import build_text_classifier
    from ..models import get_tokenizer
    tokenizer = get_tokenizer(spec if Path(spec).is_dir() else model.model_name)
    return build_text_classifier(model, tokenizer, data.class_names, data.templates)


def _out(args) -> Path:
    out = args.out or Path(f"analysis-{args.analysis}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _write(args, report: dict) -> Path:
    import torch

    from ..io import save_json
    from ..reports import provenance
    out = _out(args)
    device = _device(args) if hasattr(args, "device") else torch.device("cpu")
    save_json({"analysis": args.analysis, **provenance(device, "fp32", 1), "argv": ["denserc", *sys.argv[1:]],
               **report}, out)
    return out


def _table(header, rows) -> str:
    from ..reports import markdown_table
    return markdown_table(header, [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows])


# ------------------------------------------------------------------------------------------ commands
def run_gradients(args) -> int:
    from .gradients import gradient_analysis
    from .plots import gradient_histogram
    device = _device(args)
    model = _load(args.model, device)
    teacher = _load(args.teacher, device) if args.teacher else model
    data = _data(args, model, device)
    results = gradient_analysis(model, teacher, data.images, args.variants, seed=args.seed,
                                progress=not args.no_progress)
    picture = gradient_histogram({n: r["per_patch"].cpu() for n, r in results.items()}, _out(args).with_suffix(".png"),
                                 f"{args.model}, {data.description}")
    variants = {n: {k: v for k, v in r.items() if k != "per_patch"} for n, r in results.items()}
    out = _write(args, {"model": args.model, "teacher": args.teacher or args.model, "data": data.description,
                        "images": len(data.images), "variants": variants, "picture": str(picture)})
    stats = ("peak", "mean", "peak_over_mean", "top5_share", "gini")
    print(_table(["variant", *stats], [[n, *(v[s] for s in stats)] for n, v in variants.items()]))
    print(f"\nwrote {out} and {picture}")
    return 0


def run_heads(args) -> int:
    from .heads import head_analysis
    from .plots import head_maps
    device = _device(args)
    model = _load(args.model, device)
    data = _data(args, model, device)
    report = head_analysis(model, data, _classifier(model, args.model, data), progress=not args.no_progress)
    picture = head_maps(report, _out(args).with_suffix(".png"), f"{args.model}, {data.description}")
    out = _write(args, {"model": args.model, "data": data.description, "images": len(data.images),
                        "crops": len(data.crops), **report, "picture": str(picture)})
    change = report["zero_shot_change_without_head"]
    rows = [[layer, *(f"{c:+.1f}" for c in change[layer]), *(f"{d:.2f}" for d in report["mean_attention_distance"][layer])]
            for layer in range(len(change))]
    heads = range(len(change[0]))
    print(f"zero-shot top-1 ({report['zero_shot_measure']}) of the class token: {report['zero_shot_top1']:.1f}; "
          f"between-image gate correlation: {report['between_image_correlation']}; attention distance under "
          f"uniform attention: {report['uniform_attention_distance']:.2f} patches")
    print(_table(["block", *(f"Δ h{h}" for h in heads), *(f"dist h{h}" for h in heads)], rows))
    print(f"\nwrote {out} and {picture}")
    return 0


def run_decomposition(args) -> int:
    from .decomposition import decomposition_analysis
    from .plots import bars
    device = _device(args)
    model = _load(args.model, device)
    data = _data(args, model, device)
    report = decomposition_analysis(model, data.crops, _classifier(model, args.model, data), data.crop_labels,
                                    args.num_layers)
    parts = ("value_paths_last_L", "value_paths_all", "dense_mean")
    picture = bars({p: {"cosine x 100": 100 * report[p]["cosine_to_global"],
                        "zero-shot agreement %": report[p]["zero_shot_agreement"]} for p in parts},
                   "", _out(args).with_suffix(".png"), f"class-token decomposition: {args.model}")
    out = _write(args, {"model": args.model, "data": data.description, **report, "picture": str(picture)})
    print(_table(["part", "cosine to the global embedding", "zero-shot agreement %"],
                 [[p, report[p]["cosine_to_global"], report[p]["zero_shot_agreement"]] for p in parts]))
    print(f"\nidentity error {report['identity_error']:.2e}; wrote {out} and {picture}")
    return 0


def run_consistency(args) -> int:
    from .decomposition import consistency_analysis
    from .plots import bars
    device = _device(args)
    results, description = {}, None
    for spec in args.model:
        model = _load(spec, device)
        data = _data(args, model, device)
        description = data.description
        results[spec] = consistency_analysis(model, data.images, data.segments, data.segment_classes)
    picture = bars({kind: {spec: r[kind]["fisher_ratio"] if r[kind] else float("nan") for spec, r in results.items()}
                    for kind in ("things", "stuff", "all")},
                   "Fisher ratio (between / within scatter)", _out(args).with_suffix(".png"), "feature consistency")
    out = _write(args, {"models": args.model, "data": description, "results": results, "picture": str(picture)})
    keys = ("fisher_ratio", "cos_to_own_class", "cos_to_other_classes", "segments")
    print(_table(["model", "segments", *keys[:3]], [[spec, kind, *(r[kind][k] if r[kind] else "n/a" for k in keys[:3])]
                                                     for spec, r in results.items() for kind in ("things", "stuff")]))
    print(f"\nwrote {out} and {picture}")
    return 0


def run_sweep(args) -> int:
    from . import sweeps
    from .plots import sweep_plot
    device = _device(args)
    model = _load(args.model, device)
    evaluate, metrics, labels, description, config = _evaluation(args, model)
    rows, missing = [], []
    if args.sweep == "layers":
        layers = args.layers or list(range(1, model.depth + 1))
        rows += [r for r in sweeps.layer_sweep_training_free(model, evaluate, not args.no_progress)
                 if r["num_layers"] in layers]
        points = [(layer, 0.025, seed) for layer in layers for seed in args.seeds] if args.trained else []
        key = "num_layers"
    else:
        points = [(args.num_layers, value, seed) for value in args.values for seed in args.seeds]
        key = "lambda"
    if points:
        if config is None:
            raise ValueError("trained points need --config (a training config; no plug-in provides one here)")
        trained, missing = sweeps.trained_sweep(points, config, args.runs, evaluate, args.overrides,
                                                not args.no_progress, args.existing_only)
        rows += trained
    summary = sweeps.summarise(rows, key, metrics)
    picture = sweep_plot(summary, key, metrics, labels, _out(args).with_suffix(".png"),
                         f"{args.model}: {args.sweep} sweep, {description}")
    table = sweeps.markdown(summary, key, metrics, labels)
    out = _write(args, {"model": args.model, "data": description, "config": config, "rows": rows,
                        "summary": summary, "table": table, "not_trained": missing, "picture": str(picture)})
    print(table)
    if missing:
        print(f"not trained yet (--existing-only), left out: {', '.join(missing)}")
    print(f"wrote {out} and {picture}")
    return 0


def _evaluation(args, model):
    """(evaluate(model) -> metrics, metric keys, their labels, description, training config)."""
    if args.data is None:
        data = _data(args, model, _device(args))
        if data.evaluate is None:
            raise ValueError(f"the analysis data for {model.model_name} has no evaluation; pass --data COCO_ROOT")
        return data.evaluate, data.metrics, data.metric_labels, data.description, args.config or data.training_config
    from ..eval.region import evaluate_regions
    from ..models import get_tokenizer
    tokenizer = get_tokenizer(model.model_name)
    metrics = ("boxes_thing", "masks_thing", "masks_stuff")
    labels = {"boxes_thing": "thing boxes", "masks_thing": "thing masks", "masks_stuff": "stuff masks"}

    def evaluate(variant):
        result = evaluate_regions(variant, tokenizer, args.data, limit=args.images, image_size=args.image_size,
                                  class_names=args.class_names, templates=args.templates,
                                  progress=not args.no_progress, workers=2)
        return {m: result[m]["top1"] for m in metrics}
    return evaluate, metrics, labels, f"COCO-panoptic val2017 under {args.data}, {args.images} images", args.config


def run_delta_l(args) -> int:
    from .decomposition import delta_l_monte_carlo
    from .plots import bars
    results = [delta_l_monte_carlo(args.samples, args.patches, args.dim, args.rank, mean_shift=shift, seed=args.seed)
               for shift in args.mean_shifts]
    picture = bars({f"mean shift {r['mean_shift']:g}": {"Monte Carlo": r["measured_delta_l"],
                                                        "formula": r["formula_delta_l"]} for r in results},
                   "Delta L", _out(args).with_suffix(".png"), "Delta L = sum S^2 E||Pv||^2")
    out = _write(args, {"results": results, "picture": str(picture)})
    print(_table(["mean shift", "Monte Carlo ΔL", "± s.e.", "formula", "ratio"],
                 [[r["mean_shift"], r["measured_delta_l"], r["standard_error"], r["formula_delta_l"], r["ratio"]]
                  for r in results]))
    print(f"\nwrote {out} and {picture}")
    return 0
