"""`denserc segment` and `denserc heatmap`: what the dense features see in one image, as a PNG."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ..models.variants import CONSTRUCTIONS, GATINGS, PRECISIONS
from .defaults import CLASS_TEMPLATES, QUERY_TEMPLATES, SHORT_SIDE_PER_NATIVE

# torch, open_clip, matplotlib and the image code are imported inside the functions that run a command, so
# that `--help` and argument errors answer at once.

# The model used when --model is not given is set by a plug-in (``add_commands`` in its entry point's module): the
# testbed's tiny CLIP (pretrained on generated scenes, docs/testbed.md), so the commands run anywhere without
# a download. It knows only the testbed's shapes, colours and textures; pass a real model (e.g.
# ViT-B-16:openai or a DenseRC folder) for photos.
NO_MODEL = ("no --model given and no installed plug-in sets a default model; pass --model with a DenseRC folder "
            "or an open_clip NAME:TAG|NAME:FILE (e.g. ViT-B-16:openai)")


def register(subparsers) -> None:
    seg = subparsers.add_parser(
        "segment", help="open-vocabulary segmentation of an image into the given classes (overlay PNG)",
        description="Label every pixel of IMAGE with one of --classes (sliding-window dense features vs "
                    "class text embeddings) and write the image with a translucent colour mask and a legend.")
    seg.add_argument("image", help="image file (any size; RGBA, grayscale, 16-bit, EXIF-rotated are fine)")
    seg.add_argument("--classes", required=True, metavar="NAMES",
                     help='comma-separated class names, e.g. "dog,grass,sky"')
    seg.add_argument("-o", "--output", metavar="PNG",
                     help="overlay PNG to write (default: IMAGE_STEM_segment.png here)")
    seg.add_argument("--labels", metavar="PATH",
                     help="also write the label map (class index per pixel, in --classes order) as .npy, "
                          "or as .png (8-bit, 16-bit beyond 256 classes)")
    seg.add_argument("--template", action="append", dest="templates", metavar="TEMPLATE",
                     help=f"prompt template with {{}} for the class name, repeatable; the embeddings of "
                          f"all templates are averaged (default: {CLASS_TEMPLATES[0]!r})")
    _add_common_arguments(seg)
    seg.set_defaults(func=run_segment)

    heat = subparsers.add_parser(
        "heatmap", help="cosine-similarity heatmap of a text query over an image (PNG with colour bar)",
        description="Colour every pixel of IMAGE by the cosine similarity of its dense feature to the text "
                    "--query and write it blended over the image, with a colour bar.")
    heat.add_argument("image", help="image file (any size; RGBA, grayscale, 16-bit, EXIF-rotated are fine)")
    heat.add_argument("--query", required=True, metavar="TEXT", help='text to look for, e.g. "a red umbrella"')
    heat.add_argument("-o", "--output", metavar="PNG",
                      help="heatmap PNG to write (default: IMAGE_STEM_heatmap.png here)")
    heat.add_argument("--scores", metavar="NPY",
                      help="also write the per-pixel cosine similarity (float32) as .npy")
    heat.add_argument("--template", action="append", dest="templates", metavar="TEMPLATE",
                      help="prompt template with {} for the query, repeatable (default: the query as is)")
    heat.add_argument("--vmin", type=float, help="similarity at the bottom of the colour bar (default: map minimum)")
    heat.add_argument("--vmax", type=float, help="similarity at the top of the colour bar (default: map maximum)")
    _add_common_arguments(heat)
    heat.set_defaults(func=run_heatmap)


def run_segment(args) -> int:
    if args.model is None:
        raise ValueError(NO_MODEL)
    classes = [name.strip() for name in args.classes.split(",")]
    if any(not name for name in classes):
        raise ValueError(f"--classes {args.classes!r} has an empty class name")
    if len(classes) < 2:
        raise ValueError(f"--classes needs at least two classes to choose between, got {classes}; "
                         "use `denserc heatmap --query` to look for a single thing")
    if len(set(classes)) != len(classes):
        raise ValueError(f"--classes lists a class twice: {classes}")
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    output = _output_path(args.output, args.image, "segment")
    if output.suffix.lower() != ".png":
        raise ValueError(f"-o {output} must end in .png (the picture is written as PNG)")
    if args.labels and Path(args.labels).suffix.lower() not in (".npy", ".png"):
        raise ValueError(f"--labels {args.labels} must end in .npy or .png")
    created = _new_folders(output, args.labels)
    from ..images import load_image
    from .draw import draw_segmentation, save_png
    from .predict import segment
    image = load_image(args.image)
    model, tokenizer = _build_model(args)
    labels = segment(model, image, classes, tokenizer=tokenizer,
                     templates=args.templates or CLASS_TEMPLATES, **_inference_settings(args))
    labels = labels.cpu().numpy()
    overlay, legend = draw_segmentation(image, labels, classes, alpha=args.alpha)
    save_png(overlay, output, {"model": args.model, "image": str(args.image), "classes": classes,
                               "legend": [{"name": e.name, "colour": list(e.colour), "fraction": e.fraction}
                                          for e in legend]})
    if args.labels:
        _save_labels(labels, args.labels, classes)
    shares = ", ".join(f"{e.name} {100 * e.fraction:.1f}%" for e in legend)
    print(f"wrote {output} ({overlay.width}x{overlay.height}): {shares}{created}")
    if args.labels:
        print(f"wrote {args.labels}")
    return 0


def run_heatmap(args) -> int:
    if args.model is None:
        raise ValueError(NO_MODEL)
    if not args.query.strip():
        raise ValueError("--query is empty")
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.vmin is not None and args.vmax is not None and args.vmax < args.vmin:
        raise ValueError(f"--vmax {args.vmax} is below --vmin {args.vmin}")
    output = _output_path(args.output, args.image, "heatmap")
    if output.suffix.lower() != ".png":
        raise ValueError(f"-o {output} must end in .png (the picture is written as PNG)")
    if args.scores and Path(args.scores).suffix.lower() != ".npy":
        raise ValueError(f"--scores {args.scores} must end in .npy")
    created = _new_folders(output, args.scores)
    from ..images import load_image
    from ..io import atomic_write
    from .draw import draw_heatmap, save_png
    from .predict import similarity_map
    image = load_image(args.image)
    model, tokenizer = _build_model(args)
    similarity = similarity_map(model, image, args.query, tokenizer=tokenizer,
                                templates=args.templates or QUERY_TEMPLATES, **_inference_settings(args))
    similarity = similarity.float().cpu().numpy()
    picture, bar = draw_heatmap(image, similarity, caption=args.query, alpha=args.alpha,
                                vmin=args.vmin, vmax=args.vmax)
    save_png(picture, output, {"model": args.model, "image": str(args.image), "query": args.query,
                               "vmin": bar.vmin, "vmax": bar.vmax})
    if args.scores:
        atomic_write(args.scores, lambda tmp: _save_npy(tmp, similarity))
    peak_y, peak_x = np.unravel_index(int(similarity.argmax()), similarity.shape)
    print(f"wrote {output} ({picture.width}x{picture.height}): cosine similarity {bar.vmin:.3f}..{bar.vmax:.3f}, "
          f"peak at x={peak_x}, y={peak_y}{created}")
    if args.scores:
        print(f"wrote {args.scores}")
    return 0


# ---------------------------------------------------------------------------------- internals
def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="SPEC",
                        help="a folder written by DenseRCModel.save, or an open_clip NAME[:TAG|:FILE] "
                             "(e.g. ViT-B-16:openai); default: %(default)s (set by a plug-in: the testbed's tiny "
                             "CLIP)")
    parser.add_argument("--construction", choices=CONSTRUCTIONS, help="dense construction variant "
                        "(default: the saved one for a folder, multi-v otherwise)")
    parser.add_argument("--gating", choices=GATINGS, help="gating variant (default: saved one / hsg)")
    parser.add_argument("--num-layers", type=_positive_int, metavar="L",
                        help="value layers for multi-v (default: saved one / 3)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="model weights' precision (default fp32)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for the random weights of a model given without TAG/FILE (default 0)")
    parser.add_argument("--short-side", type=_positive_int, metavar="PX",
                        help="inference runs on the image resized to this short side (default: "
                             f"{SHORT_SIDE_PER_NATIVE}x the model's native size, e.g. 448 for ViT-B-16)")
    parser.add_argument("--window", type=_positive_int, metavar="PX",
                        help="sliding-window size in pixels (default: the model's native size)")
    parser.add_argument("--stride", type=_positive_int, metavar="PX",
                        help="sliding-window stride (default: half the window)")
    parser.add_argument("--batch-size", type=_positive_int, default=16, metavar="N",
                        help="windows per forward pass (default 16)")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="opacity of the colours over the image (default 0.5)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _build_model(args):
    """The model and its tokenizer from --model and the variant options."""
    from ..distributed import resolve_device
    from ..models import from_spec, get_tokenizer, random_weights
    spec = args.model
    device = resolve_device(args.device)
    if random_weights(spec):
        print(f"note: {spec} has random weights (no :TAG or :FILE given; seed {args.seed}); the picture shows "
              "the pipeline, not learned semantics", file=sys.stderr)
    model = from_spec(spec, seed=args.seed, construction=args.construction, gating=args.gating,
                      num_layers=args.num_layers, device=device, precision=args.precision)
    return model.eval(), get_tokenizer(spec)


def _inference_settings(args) -> dict:
    return dict(short_side=args.short_side, window=args.window, stride=args.stride, batch_size=args.batch_size)


def _output_path(output: str | None, image: str, kind: str) -> Path:
    """-o, or IMAGE_STEM_KIND.png in the current folder."""
    return Path(output) if output else Path(f"{Path(image).stem}_{kind}.png")


def _new_folders(*paths: str | Path | None) -> str:
    """" (created folder X)" for the output folders that do not exist yet (writing creates them), else ""."""
    missing = dict.fromkeys(str(Path(path).parent) for path in paths if path and not Path(path).parent.exists())
    return f" (created folder {', '.join(missing)})" if missing else ""


def _save_labels(labels: np.ndarray, path: str, classes: list[str]) -> None:
    """Label map as .npy (smallest unsigned dtype) or single-channel PNG, class names in the PNG metadata."""
    from ..io import atomic_write
    from .draw import save_png
    compact = labels.astype(np.uint8 if len(classes) <= 256 else np.uint16)
    if Path(path).suffix.lower() == ".npy":
        atomic_write(path, lambda tmp: _save_npy(tmp, compact))
    else:
        save_png(Image.fromarray(compact), path, {"classes": classes})


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append .npy to the temporary name
        np.save(f, array)

