"""``denserc testbed-probe``: how much of an object's class a testbed CLIP's patch tokens hold, and
how much of it they show to text.

A testbed thing class is a colour and a surface pattern, so a wrong class can still be half right.
For each model this measures, on the held-out split:
1. zero-shot, dense: the class predicted for every thing box and thing mask (the testbed
   evaluation's pooling and class queries), scored for class, colour and pattern separately, with the
   share predicted as a stuff class; and again with the 48 thing classes alone as the vocabulary, which
   separates "the object is misread" from "the stuff around it wins";
2. zero-shot, global: the cls-path embedding of the held-out object crops, scored the same way;
3. linear probes: the class (48-way), its colour (8-way) and its pattern (6-way) read out of the
   patch tokens averaged over each object's mask, at every block's input, at the tower's output and
   from the dense features, with the probes trained on a second generated split and their L2
   strength chosen on a fifth of it, never on the held-out split.
A high class probe beside a low dense zero-shot accuracy is the situation DenseRC is for: patch
tokens that know what they show, in a form the text embeddings do not read (docs/testbed.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from denserc.eval.panoptic import PanopticRegions
from denserc.eval.text import build_text_classifier, load_class_names, load_templates
from denserc.models import create_model, get_tokenizer, load, normalize_images, pool_boxes, pool_masks

from .crops import ScenePool
from .evaluation import CLASS_NAMES_FILE, SPLIT, TEMPLATES_FILE, prepare_split
from .scenes import SceneConfig
from .settings import EVAL_IMAGES, EVAL_SEED
from .tiny_clip import MODEL_NAME, PRETRAINED_TAG
from .vocabulary import CATEGORIES, COLOURS, PATTERNS, THING_CATEGORIES
from .zero_shot import crop_predictions

PROBE_SEED = 3_000_000  # the probes' training scenes: disjoint from pretraining, distillation and evaluation
PROBE_IMAGES = 1600  # ~4000 thing segments: a 48-way probe needs ~80 examples a class
WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2)  # the probe's L2 strengths (a penalty on the summed squared weights)
VALIDATION_SHARE = 5  # one in this many training examples validates the L2 strength
ZERO_SHOT_POOLINGS = ("boxes", "masks", "boxes, thing classes only", "masks, thing classes only")
ATTRIBUTES = {"class": len(THING_CATEGORIES), "colour": len(COLOURS), "pattern": len(PATTERNS)}


def thing_attributes(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Class, colour and pattern index of each thing label (label = category id - 1, as the evaluation reads it)."""
    colours = list(COLOURS)
    rows = [CATEGORIES[int(label)] for label in labels]
    if any(not row["isthing"] for row in rows):
        raise ValueError("thing_attributes: every label must be a thing class (stuff has no colour or pattern)")
    return {"class": torch.tensor([row["id"] - 1 for row in rows], dtype=torch.long),
            "colour": torch.tensor([colours.index(row["colour"]) for row in rows], dtype=torch.long),
            "pattern": torch.tensor([PATTERNS.index(row["pattern"]) for row in rows], dtype=torch.long)}


def attribute_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Percent of thing segments whose predicted class is right, has the right colour, the right pattern,
    and percent predicted as a stuff class (wrong for all three)."""
    is_thing = torch.tensor([bool(CATEGORIES[int(p)]["isthing"]) for p in predicted], dtype=torch.bool)
    truth = thing_attributes(labels[is_thing])
    guessed = thing_attributes(predicted[is_thing])
    result = {"class": 100 * (predicted == labels).float().mean().item()}
    for name in ("colour", "pattern"):
        right = torch.zeros(len(labels), dtype=torch.bool)
        right[is_thing] = guessed[name] == truth[name]
        result[name] = 100 * right.float().mean().item()
    result["stuff"] = 100 * (~is_thing).float().mean().item()
    return result


def _fit_linear_classifier(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, weight_decay: float):
    """Multinomial logistic regression with an L2 penalty on standardised features (L-BFGS); returns a predictor."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x = (train_x - mean) / std
    weight = torch.zeros(train_x.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()
    return lambda x: ((x - mean) / std @ weight + bias).argmax(1)


def _accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return 100 * (predicted == labels).float().mean().item()


def select_weight_decay(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int,
                        weight_decays: tuple[float, ...] = WEIGHT_DECAYS) -> float:
    """The L2 strength whose probe, fitted on four fifths of the training examples, best classifies the
    other fifth (a fixed random split): the probe's regularisation is tuned without the test set."""
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))
    held, fit = order[:len(order) // VALIDATION_SHARE], order[len(order) // VALIDATION_SHARE:]
    scores = [_accuracy(_fit_linear_classifier(train_x[fit], train_y[fit], num_classes, decay)(train_x[held]),
                        train_y[held]) for decay in weight_decays]
    return weight_decays[scores.index(max(scores))]


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, weight_decay: float | None = None) -> float:
    """Test accuracy (percent) of a linear classifier fitted on all training examples, with the given L2
    strength or, by default, the one `select_weight_decay` picks (CLIP's linear-probe protocol)."""
    if weight_decay is None:
        weight_decay = select_weight_decay(train_x, train_y, num_classes)
    return _accuracy(_fit_linear_classifier(train_x, train_y, num_classes, weight_decay)(test_x), test_y)


@torch.no_grad()
def _thing_segments(model, root: Path, classifier=None) -> dict:
    """Per thing segment of the split: labels, mask-averaged tokens per layer, and (with a classifier)
    the zero-shot class of its box and mask."""
    data = PanopticRegions(root, SPLIT, image_size=SceneConfig().image_size, patch_size=model.patch_size)
    blocks = model.tower.blocks  # through the tower adapter: any family
    layers = [f"block {i} input" for i in range(len(blocks))] + ["tower output", "dense features"]
    collected = {"labels": [], **{pooling: [] for pooling in ZERO_SHOT_POOLINGS}, **{layer: [] for layer in layers}}
    for index in range(len(data)):
        sample = data[index]
        things = data.is_thing[sample["labels"]]
        if not things.any():
            continue
        images = normalize_images(sample["image"][None], model.preprocess_cfg)  # as evaluate_regions does
        tokens = []
        hooks = [block.register_forward_hook(lambda module, inputs, output: tokens.append(inputs[0]))
                 for block in blocks]
        hooks.append(blocks[-1].register_forward_hook(lambda module, inputs, output: tokens.append(output)))
        try:
            model.encode_image(images)
        finally:
            for hook in hooks:
                hook.remove()
        dense = F.normalize(model.encode_dense(images), dim=1)
        coverage = sample["coverage"][things].flatten(1)
        weights = coverage / coverage.sum(1, keepdim=True)
        prefix = model.tower.num_prefix_tokens
        patch_tokens = [t[0, prefix:] for t in tokens] + [dense[0].flatten(1).T]
        for layer, features in zip(layers, patch_tokens):
            collected[layer].append(weights @ features)
        collected["labels"].append(sample["labels"][things])
        if classifier is not None:
            for pooling, pooled in (("boxes", pool_boxes(dense, [sample["boxes"][things]], model.patch_size)),
                                    ("masks", pool_masks(dense, [sample["coverage"][things]]))):
                scores = classifier.class_scores(pooled @ classifier.embeddings.T)
                collected[pooling].append(scores.argmax(1))
                collected[f"{pooling}, thing classes only"].append(scores.masked_fill(~data.is_thing, -torch.inf)
                                                                   .argmax(1))
    return {key: torch.cat(value) for key, value in collected.items() if value}


def probe(model, tokenizer, output: str | Path = "runs/testbed", eval_images: int = EVAL_IMAGES,
          probe_images: int = PROBE_IMAGES) -> dict:
    """Zero-shot class/colour/pattern accuracy (dense and global) and linear-probe accuracy per layer."""
    model.eval()
    output = Path(output)
    root = prepare_split(output / "data", eval_images, EVAL_SEED, progress=False)
    probe_root = prepare_split(output / "probe_data", probe_images, PROBE_SEED, progress=False)
    classifier = build_text_classifier(model, tokenizer, load_class_names(root / CLASS_NAMES_FILE),
                                       load_templates(root / TEMPLATES_FILE))
    held_out = _thing_segments(model, root, classifier)
    probe_train = _thing_segments(model, probe_root)
    zero_shot = {pooling: attribute_accuracy(held_out[pooling], held_out["labels"]) for pooling in ZERO_SHOT_POOLINGS}
    predicted, labels = crop_predictions(model, tokenizer, ScenePool.render(EVAL_SEED, eval_images), isthing=1)
    zero_shot["global, object crops"] = attribute_accuracy(predicted - 1, labels - 1)
    train_attributes, test_attributes = thing_attributes(probe_train["labels"]), thing_attributes(held_out["labels"])
    probes = {layer: {name: linear_probe(probe_train[layer], train_attributes[name], held_out[layer],
                                         test_attributes[name], classes)
                      for name, classes in ATTRIBUTES.items()}
              for layer in held_out if layer not in ("labels", *ZERO_SHOT_POOLINGS)}
    return {"zero_shot": zero_shot, "linear_probes": probes, "thing_segments": len(held_out["labels"]),
            "probe_train_segments": len(probe_train["labels"])}


def format_report(name: str, result: dict) -> str:
    """Markdown: the zero-shot table and the linear-probe table of one model."""
    lines = [f"### {name}", "", "| zero-shot, things | class | colour | pattern | predicted stuff |",
             "|---|---|---|---|---|"]
    lines += [f"| {pooling} | {r['class']:.1f} | {r['colour']:.1f} | {r['pattern']:.1f} | {r['stuff']:.1f} |"
              for pooling, r in result["zero_shot"].items()]
    lines += ["", "| linear probe, mask-averaged | class | colour | pattern |", "|---|---|---|---|"]
    lines += [f"| {layer} | {r['class']:.1f} | {r['colour']:.1f} | {r['pattern']:.1f} |"
              for layer, r in result["linear_probes"].items()]
    chance = ", ".join(f"{name} {100 / count:.1f}" for name, count in ATTRIBUTES.items())
    lines += ["", f"Percent of {result['thing_segments']} held-out thing segments (probes trained on "
                  f"{result['probe_train_segments']}); chance: {chance}.", ""]
    return "\n".join(lines)


def load_testbed_model(spec: str):
    """``testbed`` (the shipped CLIP), a ``pretrain-testbed`` weights file, or a saved model folder."""
    if spec == PRETRAINED_TAG or Path(spec).is_file():
        return create_model(MODEL_NAME, spec)
    if not Path(spec).is_dir():
        raise FileNotFoundError(f"{spec!r} is neither 'testbed', a weights file written by "
                                f"pretrain-testbed, nor a saved model folder (a run's final/ directory)")
    return load(spec)


def _main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    tokenizer = get_tokenizer(MODEL_NAME)
    for spec in args.models:
        print(format_report(spec, probe(load_testbed_model(spec), tokenizer, args.output)))
    return 0
