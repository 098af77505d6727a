"""CAT-Seg inference and its benchmarks: ADE-847, PASCAL Context-459, ADE-150, Context-59, VOC-20, VOC-20b.

Inference is CAT-Seg's ``inference_sliding_window`` (``cvlab-kaist/CAT-Seg`` ``cat_seg/cat_seg_model.py``,
run by ``eval.sh`` with ``TEST.SLIDING_WINDOW True`` and class pooling 1):

    the image (short side 640, long side at most 2560: ``INPUT.MIN_SIZE_TEST``) is resized to 640 x 640
    and cut into four 384 x 384 windows (stride 384 * (1 - 0.333) = 256); the whole-image view is the
    short-side-640 image itself resized to 384 x 384 (``global_image``, line 196, is made from
    ``images[0]``, not from the 640 x 640 canvas); all five go through the segmenter; per-class
    sigmoid scores are upsampled to 384, the windows averaged where they overlap, then averaged with
    the whole-image scores; the result is resized to the label's size and the arg-max class is the
    prediction.

mIoU comes from the same confusion matrix as ``denserc eval seg`` but is averaged the way CAT-Seg
reports it, detectron2's ``SemSegEvaluator`` rule: over the classes present in the ground truth
(``denserc.eval.metrics``, rule ``detectron2``; the report's ``miou_rule``). Class names are CAT-Seg's lists
(``datasets/*.json``; each class prompted with its first name). VOC-20b scores VOC's 21-class labels
with CAT-Seg's 59-name vocabulary: a pixel predicted as any of the 39 non-VOC names counts as
background (``VOCbEvaluator`` in CAT-Seg's ``train_net.py``).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..eval.datasets import SegmentationDataset, segmentation_layout
from ..distributed import DistributedEnv
from ..eval.metrics import segmentation_metrics
from ..eval.segmentation import evaluation_loop
from ..eval.text import load_class_names
from ..models import normalize_images
from .defaults import BENCHMARKS, DATASET_LAYOUT, Benchmark
from .model import CATSeg, class_tokens

MIOU_RULE = "detectron2"  # CAT-Seg's evaluator: the mean over classes present in the ground truth


def benchmark(name: str) -> Benchmark:
    """A paper benchmark by name, or any registered segmentation dataset with its bundled vocabulary."""
    if name in BENCHMARKS:
        return BENCHMARKS[name]
    try:
        return Benchmark(name, segmentation_layout(name).class_names)
    except ValueError as error:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)} or a segmentation dataset "
                         f"({error})") from error


@dataclass(frozen=True)
class SlidingWindowProtocol:
    """CAT-Seg's test-time settings (defaults: its released evaluation)."""

    short_side: int = 640
    max_long_side: int = 2560
    size: int = 640
    window: int = 384
    overlap: float = 0.333

    def __post_init__(self):
        if not (0 < self.window <= self.size and 0 <= self.overlap < 1 and self.short_side > 0):
            raise ValueError(f"invalid sliding-window protocol {asdict(self)}: need 0 < window <= size and "
                             "0 <= overlap < 1")
        stride = self.stride
        if (self.size - self.window) % stride:
            raise ValueError(f"windows of {self.window} with stride {stride} do not tile {self.size} exactly")

    @property
    def stride(self) -> int:
        return int(self.window * (1 - self.overlap))


@torch.no_grad()
def sliding_window_scores(segmenter: CATSeg, image: torch.Tensor, class_embeddings: torch.Tensor,
                          protocol: SlidingWindowProtocol) -> torch.Tensor:
    """(1, 3, H, W) normalised image (short side ``protocol.short_side``) -> (T, size, size) per-class
    probabilities (module docstring)."""
    size, window, stride = protocol.size, protocol.window, protocol.stride
    canvas = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
    crops = F.unfold(canvas, window, stride=stride).transpose(1, 2).reshape(-1, 3, window, window)
    whole = F.interpolate(image, size=(window, window), mode="bilinear", align_corners=False)
    logits = segmenter(torch.cat([crops, whole]), class_embeddings)
    scores = F.interpolate(logits.float(), size=(window, window), mode="bilinear", align_corners=False).sigmoid()
    whole_scores = F.interpolate(scores[-1:], size=(size, size), mode="bilinear", align_corners=False)[0]
    windows = scores[:-1]
    summed = F.fold(windows.flatten(1).T, (size, size), window, stride=stride)
    counts = F.fold(F.unfold(torch.ones(1, 1, size, size, device=image.device), window, stride=stride)[0],
                    (size, size), window, stride=stride)
    return (summed / counts + whole_scores) / 2


@torch.no_grad()
def evaluate_catseg(segmenter: CATSeg, tokenizer, templates: list[str], root: str | os.PathLike, name: str, *,
                    protocol: SlidingWindowProtocol = SlidingWindowProtocol(), class_names: str | None = None,
                    workers: int = 4, limit: int | None = None, shard: DistributedEnv = DistributedEnv(),
                    progress: bool = True, description: str | None = None, skip_unreadable: bool = False) -> dict:
    """mIoU / mAcc / aAcc and per-class IoU of ``segmenter`` on one benchmark (this rank's shard, then summed),
    through the library's one evaluation loop (label checks first; ``skip_unreadable`` as ``eval seg``)."""
    spec = benchmark(name)
    layout = segmentation_layout(spec.dataset)
    names = load_class_names(class_names or spec.class_names)
    if spec.background_from is None and len(names) != layout.num_classes:
        raise ValueError(f"{layout.title} has {layout.num_classes} classes but the class-name list "
                         f"{class_names or spec.class_names!r} has {len(names)}")
    data = SegmentationDataset(spec.dataset, root, protocol.short_side, protocol.max_long_side, prefer=DATASET_LAYOUT)

    def make_predictor():
        segmenter.eval()
        parameter = next(segmenter.parameters())
        device, dtype = parameter.device, parameter.dtype
        to_label = torch.arange(len(names), device=device)
        if spec.background_from is not None:
            to_label = torch.where(to_label < spec.background_from, to_label + 1, 0)
        embeddings = segmenter.encode_classes(class_tokens(tokenizer, names, templates).to(device)).to(dtype)

        def predict(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
            image = normalize_images(pixels, segmenter.clip.preprocess_cfg).to(dtype)[None]
            scores = sliding_window_scores(segmenter, image, embeddings, protocol)
            scores = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]
            return to_label[scores.argmax(dim=0)]
        return predict, device
    confusion, counts = evaluation_loop(data, layout, make_predictor, workers=workers, limit=limit, shard=shard,
                                        progress=progress, description=description, skip_unreadable=skip_unreadable)
    label_names = [", ".join(synonyms) for synonyms in
                   (names if spec.background_from is None else load_class_names(layout.class_names))]
    return {"benchmark": name, "dataset": spec.dataset, "layout": data.layout.convention, **counts,
            "protocol": asdict(protocol),
            "templates": templates, "class_names": class_names or spec.class_names,
            **segmentation_metrics(confusion, label_names, miou_rule=MIOU_RULE)}
