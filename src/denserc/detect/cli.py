"""``denserc detect train|eval|draw``: train F-ViT, score detections on OV-COCO/OV-LVIS, draw detections."""
from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """examples:
  denserc detect train fvit_b16_ovcoco                              1 GPU (8 images x 8 accumulated)
  torchrun --standalone --nproc_per_node 8 -m denserc detect train fvit_b16_ovcoco
  denserc detect train fvit_b16_ovcoco backbone.model=ViT-B-16:openai --resume auto
  denserc detect eval --detector runs/fvit_b16_ovcoco/final --protocol ov-coco \\
      --annotations data/coco/annotations/instances_val2017.json --images data/coco/val2017
  denserc detect eval --annotations GT.json --detections DETS.json --protocol ov-coco --out report.json
  denserc detect eval --detector runs/fvit_l14_ovlvis/final --protocol coco \\
      --annotations data/coco/annotations/instances_val2017.json --images data/coco/val2017
  denserc detect draw photo.jpg --detector runs/fvit_b16_ovcoco/final --classes "person,kite,umbrella"
see docs/detection.md
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "detect", help="open-vocabulary detection with F-ViT (train, eval, draw)",
        description="F-ViT open-vocabulary detection on a frozen DenseRC/CLIP tower.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="detect_command", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="train F-ViT on a protocol's base classes",
                                description="CONFIG is a shipped detection config (fvit_b16_ovcoco, "
                                            "fvit_b16_ovlvis, fvit_l14_ovcoco, fvit_l14_ovlvis, fvit_testbed) "
                                            "or a YAML file; overrides are section.key=value.")
    train.add_argument("config")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    train.add_argument("--resume", metavar="auto|CHECKPOINT", default=None,
                       help="'auto': the newest complete checkpoint in the output folder; or a checkpoint folder")
    train.add_argument("--evaluate", action="store_true",
                       help="after training, evaluate on data.val_* and write eval.json beside the export")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.set_defaults(func=run_train, command_name="detect train")

    evaluate = commands.add_parser(
        "eval", help="AP50 novel/base/all (OV-COCO), APr/c/f (OV-LVIS) or AP/AP50/AP75 (transfer: coco, "
                     "objects365) of a detector or a results JSON",
        description="Either run --detector on --images, or score --detections (COCO results JSON of any "
                    "detector); prints a Markdown row and writes the JSON report to --out. With --detector, "
                    "detector.KEY=VALUE overrides an inference setting (alpha, beta, clip_temperature, "
                    "fixed_temperature, score_threshold, nms_threshold, detections_per_image) after the "
                    "protocol's own (coco/objects365: CLIPSelf's transfer heads).")
    evaluate.add_argument("--annotations", required=True, help="ground-truth COCO/LVIS/Objects365 annotation JSON")
    evaluate.add_argument("--protocol", required=True,
                          help="ov-coco, ov-lvis, coco, objects365 or a registered protocol")
    evaluate.add_argument("overrides", nargs="*", metavar="detector.KEY=VALUE")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--detector", help="detector folder written by `denserc detect train`")
    source.add_argument("--detections", help="COCO results JSON to score")
    evaluate.add_argument("--images", help="image folder (with --detector)")
    evaluate.add_argument("--out", help="write the JSON report here")
    evaluate.add_argument("--save-detections", metavar="JSON", help="with --detector: also write its COCO results")
    evaluate.add_argument("--max-images", type=int, help="with --detector: the first N images only")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--device", default="auto", help="auto, cpu or cuda")
    evaluate.set_defaults(func=run_eval, command_name="detect eval")

    draw = commands.add_parser("draw", help="detect the given classes in an image and draw them (PNG)")
    draw.add_argument("image")
    draw.add_argument("--detector", required=True, help="detector folder written by `denserc detect train`")
    draw.add_argument("--classes", required=True, metavar="NAMES", help='comma-separated, e.g. "dog,kite"')
    draw.add_argument("--min-score", type=float, default=0.3, help="draw detections scoring at least this")
    draw.add_argument("-o", "--output", metavar="PNG", help="default: IMAGE_STEM_detect.png here")
    draw.add_argument("--device", default="auto")
    draw.set_defaults(func=run_draw, command_name="detect draw")


def run_train(args: argparse.Namespace) -> int:
    from ..engine.config import dump_config
    from ..engine.launch import run
    from .config import load_detect_config
    config = load_detect_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    from .task import DetectionTask
    env, final = run(lambda env: DetectionTask(config, env), config, args.config, args.resume)
    if not env.is_main:
        return 0
    print(f"denserc detect train: done; detector in {final} (load with denserc.detect.load('{final}'))")
    if args.evaluate:
        from ..io import save_json
        from .detector import load
        from .evaluation import markdown_row
        from .validation import evaluate_detector
        report, _ = evaluate_detector(load(final, env.device), config.data.val_annotations, config.data.val_images,
                                      config.data.protocol, max_images=config.data.max_val_images)
        save_json(report, final.parent / "eval.json")
        print(markdown_row(report, str(final)))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..io import save_json
    from .evaluation import evaluate_detections, markdown_row
    if args.detections:
        if args.images or args.save_detections or args.max_images or args.overrides:
            raise ValueError("--images, --save-detections, --max-images and detector.KEY=VALUE go with --detector, "
                             "not with --detections")
        report = evaluate_detections(args.annotations, args.detections, args.protocol)
        label = Path(args.detections).name
    else:
        if not args.images:
            raise ValueError("--detector needs --images (the folder of the annotated images)")
        settings = _inference_settings(args.overrides)
        from ..distributed import resolve_device
        from .detector import load
        from .validation import evaluate_detector
        detector = load(args.detector, resolve_device(args.device))
        report, detections = evaluate_detector(detector, args.annotations, args.images, args.protocol,
                                               batch_size=args.batch_size, max_images=args.max_images,
                                               settings=settings)
        if args.save_detections:
            save_json(detections, args.save_detections)
        label = args.detector
    print(markdown_row(report, label))
    if args.out:
        save_json(report, args.out)
        print(f"wrote {args.out}")
    return 0


def run_draw(args: argparse.Namespace) -> int:
    from ..viz.draw import save_png
    from ..images import load_image
    from .detector import load
    from .draw import draw_detections
    classes = [name.strip() for name in args.classes.split(",")]
    if any(not name for name in classes) or len(set(classes)) != len(classes):
        raise ValueError(f"--classes {args.classes!r} must list distinct, non-empty names")
    output = Path(args.output or f"{Path(args.image).stem}_detect.png")
    if output.suffix.lower() != ".png":
        raise ValueError(f"-o {output} must end in .png")
    from ..distributed import resolve_device
    image = load_image(args.image)
    detector = load(args.detector, resolve_device(args.device))
    result = detector.predict(image, classes)
    keep = (result["scores"] >= args.min_score).cpu()
    picked = {k: result[k].cpu()[keep] for k in ("boxes", "scores", "labels")}
    masks = result["masks"].cpu()[keep].numpy() if "masks" in result else None
    canvas = draw_detections(image, picked["boxes"].numpy(), picked["labels"].numpy(),
                             picked["scores"].numpy(), classes, masks)
    save_png(canvas, output, {"detector": args.detector, "image": str(args.image), "classes": classes,
                              "detections": [{"box": [round(v, 1) for v in box], "label": classes[label],
                                              "score": round(score, 4)}
                                             for box, label, score in zip(picked["boxes"].tolist(),
                                                                          picked["labels"].tolist(),
                                                                          picked["scores"].tolist())]})
    print(f"wrote {output}: {int(keep.sum())} detections with score >= {args.min_score}")
    return 0


def _inference_settings(overrides: list[str]) -> dict:
    """``detector.KEY=VALUE`` pairs -> {KEY: VALUE}, values read as YAML (``Detector.settings`` checks them)."""
    import yaml
    settings = {}
    for override in overrides:
        key, equals, value = override.partition("=")
        section, dot, name = key.partition(".")
        if not equals or section != "detector" or not dot or "." in name:
            raise ValueError(f"{override!r}: expected detector.KEY=VALUE (e.g. detector.alpha=0.2)")
        try:
            settings[name] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ValueError(f"{override!r}: the value is not YAML ({error})") from error
    return settings

