"""F-ViT: a two-stage open-vocabulary detector on a frozen DenseRC/CLIP image tower (torchvision parts).

Settings follow CLIPSelf's ``F-ViT/models`` and ``F-ViT/configs/ov_coco``/``ov_lvis`` (docs/detection.md):

    backbone   frozen image tower; block outputs tapped after 4 blocks (``encode_dense_with_taps``)
    pyramid    stride p/4: ConvT-BN-GELU-ConvT, p/2: ConvT, p: identity, 2p: max-pool (p = patch size)
    neck       torchvision FPN, 256 channels, plus a max-pooled 5th level
    RPN        torchvision RPN, 2 convs, anchors of 8 strides, ratios 0.5/1/2, NMS 0.7, 2000 -> 1000
    RoI head   RoIAlign 7x7 -> 4 convs (BN) -> 2 FCs -> a cosine classifier against the classes' text
               embeddings plus the fixed text embedding of "background", learnable temperature (init 50);
               class-agnostic box deltas (std 0.1, 0.1, 0.2, 0.2); optional class-agnostic mask head
    training   cross-entropy whose class weights are 0 for novel classes (their logits are masked to
               -inf, so they never reach the loss) and ``background_weight`` for the background
    inference  each proposal's CLIP score from the L2-normalised dense features (RoIAlign 1x1, as the
               region evaluation pools) ensembled with the detector's: ``ensemble_scores``
    LVIS       BN after each RPN conv (``rpn_norm``: CLIPSelf's ``CustomRPNHead``); binary mask targets
               from aligned RoIAlign (``mask_loss``: mmdet's ``mask_target``, which the peer trains on)
    transfer   ``fixed_temperature`` replaces the learned one at inference (``configs/transfer``)

Class index 0 is the background (torchvision's convention); class k >= 1 is ``vocabulary[k - 1]``.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, paste_masks_in_image
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork, batched_nms, remove_small_boxes, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..models.dense import DenseRCModel, pool_boxes

NUM_PYRAMID_INPUTS = 4
FINEST_SCALE = 56  # RoIs of sqrt(area) < 2 * 56 px pool from the finest level (mmdet's rule)


@dataclass
class DetectorConfig:
    """Every setting of the detector; defaults are CLIPSelf's OV-COCO ViT-B/16 ones."""
    taps: list = field(default_factory=lambda: [3, 5, 7, 11])  # 0-based blocks (ViT-L: 6, 10, 14, 23)
    fpn_channels: int = 256
    anchor_scale: float = 8.0  # anchor side = scale x level stride
    anchor_ratios: list = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_convs: int = 2
    rpn_norm: bool = False  # BN after each RPN conv: the LVIS configs' CustomRPNHead (norm_cfg MMSyncBN)
    rpn_pre_nms: int = 2000  # per level
    rpn_post_nms: int = 1000
    rpn_nms: float = 0.7
    roi_samples: int = 512
    roi_positive_fraction: float = 0.25
    head_convs: int = 4
    head_fc: int = 512  # B/16; 768 for L/14
    temperature: float = 50.0  # initial (learned) temperature of the cosine classifier
    fixed_temperature: Optional[float] = None  # at inference, in place of the learned one (transfer: 50)
    background_weight: float = 0.6  # COCO 0.6, LVIS 0.9
    masks: bool = False  # class-agnostic mask head (LVIS)
    clip_temperature: float = 75.0  # COCO 75, LVIS 50
    alpha: float = 0.1  # CLIP's share of the score of a base class
    beta: float = 0.8  # ... of a novel class (COCO 0.8; LVIS 0.6 B, 0.4 L)
    score_threshold: float = 0.01  # LVIS 1e-4
    nms_threshold: float = 0.4  # LVIS 0.5
    detections_per_image: int = 100  # LVIS 300


# The settings read at inference only: a loaded detector may run with others (``Detector.settings``).
INFERENCE_SETTINGS = ("alpha", "beta", "clip_temperature", "fixed_temperature", "score_threshold", "nms_threshold",
                      "detections_per_image")


def ensemble_scores(det_probs: torch.Tensor, clip_probs: torch.Tensor, novel: torch.Tensor,
                    alpha: float, beta: float) -> torch.Tensor:
    """Geometric ensemble per class: base ``p_det^(1-alpha) p_clip^alpha``, novel ``p_det^(1-beta) p_clip^beta``.

    det_probs, clip_probs: (N, K) softmax scores over the same K columns; novel: (K,) bool.
    """
    exponent = torch.where(novel.to(det_probs.device), beta, alpha).to(det_probs.dtype)
    return det_probs ** (1 - exponent) * clip_probs ** exponent


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, class_weight: torch.Tensor) -> torch.Tensor:
    """Weighted cross-entropy over sampled RoIs, mean over RoIs; zero-weight columns masked to -inf.

    logits: (N, K); labels: (N,) in 0..K-1; class_weight: (K,). A sample's loss is weighted by its
    target's class weight (CLIPSelf's ``CustomCrossEntropyLoss``).
    """
    masked = class_weight == 0
    target_weight = class_weight[labels]
    if (target_weight == 0).any():
        bad = sorted(set(labels[target_weight == 0].tolist()))
        raise ValueError(f"training targets include zero-weight (novel) classes {bad}: novel boxes must be "
                         "dropped from training annotations")
    logits = logits.float().masked_fill(masked, float("-inf"))
    losses = F.cross_entropy(logits, labels, reduction="none") * target_weight
    return losses.sum() / max(labels.numel(), 1)


class SimplePyramid(nn.Module):
    """Four maps at strides p/4, p/2, p, 2p from four stride-p ViT maps (ViTDet's simple pyramid)."""

    def __init__(self, width: int):
        super().__init__()
        self.levels = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(width, width, 2, stride=2), nn.BatchNorm2d(width), nn.GELU(),
                          nn.ConvTranspose2d(width, width, 2, stride=2)),
            nn.ConvTranspose2d(width, width, 2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(2, stride=2),
        ])

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [level(x) for level, x in zip(self.levels, maps)]


class StridedAnchorGenerator(AnchorGenerator):
    """torchvision's anchors at exact (possibly fractional) level strides.

    torchvision infers strides as ``image_size // grid_size``, which is wrong for a /14 ViT (3.5 px).
    """

    def __init__(self, strides: list[float], scale: float, ratios: list[float]):
        super().__init__(sizes=tuple((scale * s,) for s in strides), aspect_ratios=(tuple(ratios),) * len(strides))
        self.strides = list(strides)

    def forward(self, image_list: ImageList, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [[torch.tensor(s, dtype=dtype, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(dtype, device)
        anchors = torch.cat(self.grid_anchors([f.shape[-2:] for f in feature_maps], strides))
        return [anchors for _ in image_list.image_sizes]


def rpn_head(config: DetectorConfig) -> RPNHead:
    """torchvision's RPN head; with ``rpn_norm`` each 3x3 conv is conv (no bias) -> BN -> ReLU, as mmcv's
    ``ConvModule(norm_cfg=...)`` in CLIPSelf's ``F-ViT/models/custom_rpn_head.py`` (its LVIS configs)."""
    channels = config.fpn_channels
    head = RPNHead(channels, len(config.anchor_ratios), conv_depth=config.rpn_convs)
    if config.rpn_norm:
        head.conv = nn.Sequential(*[Conv2dNormActivation(channels, channels, kernel_size=3, norm_layer=nn.BatchNorm2d)
                                    for _ in range(config.rpn_convs)])
        for layer in head.conv.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)  # as torchvision initialises its RPN convs
    return head


class LevelRoIAlign(nn.Module):
    """RoIAlign from the pyramid level matched to each box's size, at exact level strides.

    Level = floor(log2(sqrt(area) / FINEST_SCALE)), clamped (mmdet's ``SingleRoIExtractor``);
    torchvision's ``MultiScaleRoIAlign`` rounds the strides to powers of two instead.
    """

    def __init__(self, strides: list[float], output_size: int):
        super().__init__()
        self.strides = list(strides)
        self.output_size = output_size

    def forward(self, features: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]).clamp(min=0) * (rois[:, 4] - rois[:, 2]).clamp(min=0))
        levels = torch.floor(torch.log2(scale / FINEST_SCALE + 1e-6)).clamp(0, len(features) - 1).long()
        out = features[0].new_zeros(rois.shape[0], features[0].shape[1], self.output_size, self.output_size)
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            index = torch.nonzero(levels == level).squeeze(1)
            if index.numel():
                pooled = roi_align(feature, rois[index].to(feature.dtype), self.output_size,
                                   spatial_scale=1.0 / stride, sampling_ratio=0, aligned=True)
                out[index] = pooled.to(out.dtype)
        return out


class BoxHead(nn.Module):
    """4 convs (BN, ReLU) -> 2 shared FCs -> a region embedding (cls branch) and 4 class-agnostic deltas.

    The cls branch ends in ReLU before the cosine classifier, as CLIPSelf's ``FViTBBoxHead`` does.
    """

    def __init__(self, channels: int, roi_size: int, num_convs: int, fc: int, embed_dim: int):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                                   nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
                                     for _ in range(num_convs)])
        self.shared = nn.Sequential(nn.Flatten(), nn.Linear(channels * roi_size ** 2, fc), nn.ReLU(inplace=True),
                                    nn.Linear(fc, fc), nn.ReLU(inplace=True))
        self.embed = nn.Sequential(nn.Linear(fc, embed_dim), nn.ReLU(inplace=True))
        self.regress = nn.Sequential(nn.Linear(fc, fc), nn.ReLU(inplace=True), nn.Linear(fc, 4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.shared(self.convs(x))
        return self.embed(x), self.regress(x)


class CosineClassifier(nn.Module):
    """Logits (N, 1 + C) = temperature x cos(region, [background; class text embeddings]).

    The class embeddings are a buffer (the vocabulary, replaceable at inference); so is the background's,
    the text embedding of "background", as CLIPSelf's ``FViTBBoxHead`` keeps it with ``learn_bg=False``
    (``F-ViT/models/fvit_head.py``: the last column of ``all_embeddings``, a buffer, in the detector's logits
    and in the CLIP-score softmax alike). Only the temperature is learned.
    """

    def __init__(self, class_embeddings: torch.Tensor, background: torch.Tensor, novel: torch.Tensor,
                 temperature: float):
        super().__init__()
        self.register_buffer("class_embeddings", F.normalize(class_embeddings.float(), dim=-1))
        self.register_buffer("novel", novel.bool().clone())
        self.register_buffer("background", F.normalize(background.float(), dim=-1).clone())
        self.temperature = nn.Parameter(torch.tensor(float(temperature)))

    def set_vocabulary(self, class_embeddings: torch.Tensor, novel: torch.Tensor) -> None:
        if class_embeddings.shape[1] != self.background.shape[0] or len(novel) != len(class_embeddings):
            raise ValueError(f"vocabulary needs (C, {self.background.shape[0]}) embeddings and C novel flags, got "
                             f"{tuple(class_embeddings.shape)} and {len(novel)}")
        device = self.background.device
        self.class_embeddings = F.normalize(class_embeddings.float(), dim=-1).to(device)
        self.novel = novel.bool().to(device)

    def embeddings(self) -> torch.Tensor:
        """(1 + C, E) normalised: background first."""
        return torch.cat([self.background[None], self.class_embeddings])

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        return self.temperature * F.normalize(regions.float(), dim=-1) @ self.embeddings().T

    def class_weight(self, background_weight: float) -> torch.Tensor:
        """(1 + C,): the background's weight, 1 for base classes, 0 for novel ones."""
        base = (~self.novel).float()
        return torch.cat([base.new_tensor([background_weight]), base])


class FViTRoIHeads(RoIHeads):
    """torchvision's RoI sampling (matcher, balanced sampler, gt as proposals) with F-ViT's heads."""

    def __init__(self, config: DetectorConfig, strides: list[float], embed_dim: int,
                 classifier: CosineClassifier):
        channels = config.fpn_channels
        mask_args = {}
        if config.masks:
            mask_args = dict(mask_roi_pool=LevelRoIAlign(strides[:NUM_PYRAMID_INPUTS], 14),
                             mask_head=MaskRCNNHeads(channels, [channels] * 4, 1, norm_layer=nn.BatchNorm2d),
                             mask_predictor=MaskRCNNPredictor(channels, channels, 1))
        super().__init__(
            box_roi_pool=LevelRoIAlign(strides[:NUM_PYRAMID_INPUTS], 7),
            box_head=BoxHead(channels, 7, config.head_convs, config.head_fc, embed_dim),
            box_predictor=classifier,
            fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=config.roi_samples,
            positive_fraction=config.roi_positive_fraction, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
            score_thresh=config.score_threshold, nms_thresh=config.nms_threshold,
            detections_per_img=config.detections_per_image, **mask_args)
        self.config = config

    def forward(self, features: OrderedDict, proposals: list[torch.Tensor], image_sizes: list[tuple[int, int]],
                targets: list[dict] | None = None, dense: torch.Tensor | None = None, patch_size: int = 16):
        levels = [features[str(k)] for k in range(NUM_PYRAMID_INPUTS)]
        if self.training:
            return self._losses(levels, proposals, targets)
        return self._detect(levels, proposals, image_sizes, dense, patch_size)

    def _losses(self, levels, proposals, targets) -> dict[str, torch.Tensor]:
        proposals, matched, labels, regression_targets = self.select_training_samples(proposals, targets)
        regions, deltas = self.box_head(self.box_roi_pool(levels, proposals))
        all_labels, all_targets = torch.cat(labels), torch.cat(regression_targets)
        logits = self.box_predictor(regions)
        class_weight = self.box_predictor.class_weight(self.config.background_weight)
        positive = all_labels > 0
        losses = {
            "loss_classifier": classification_loss(logits, all_labels, class_weight),
            "loss_box_reg": F.l1_loss(deltas[positive].float(), all_targets[positive], reduction="sum")
            / max(all_labels.numel(), 1),
        }
        if self.has_mask():
            positives = [p[lab > 0] for p, lab in zip(proposals, labels)]
            matched_positives = [m[lab > 0] for m, lab in zip(matched, labels)]
            mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(levels, positives)))
            if sum(len(p) for p in positives):
                losses["loss_mask"] = mask_loss(mask_logits, positives, [t["masks"] for t in targets],
                                                matched_positives)
            else:
                losses["loss_mask"] = mask_logits.sum() * 0  # keeps every mask parameter in the graph (DDP)
        return losses

    def _detect(self, levels, proposals, image_sizes, dense, patch_size) -> list[dict]:
        regions, deltas = self.box_head(self.box_roi_pool(levels, proposals))
        classifier = self.box_predictor
        logits = classifier(regions)
        if self.config.fixed_temperature is not None:  # CLIPSelf's FViTTransferBBoxHead: cos x a fixed temperature
            logits = logits / classifier.temperature * self.config.fixed_temperature
        probs = logits.softmax(-1)
        if dense is not None:
            pooled = pool_boxes(F.normalize(dense.float(), dim=1), proposals, patch_size)
            clip_probs = (self.config.clip_temperature * pooled @ classifier.embeddings().T).softmax(-1)
            novel = torch.cat([classifier.novel.new_zeros(1), classifier.novel])  # background: base
            probs = ensemble_scores(probs, clip_probs, novel, self.config.alpha, self.config.beta)
        boxes = self.box_coder.decode(deltas.float(), proposals)[:, 0]
        results = []
        counts = [len(p) for p in proposals]
        for image_boxes, image_probs, size in zip(boxes.split(counts), probs.split(counts), image_sizes):
            results.append(self._postprocess(image_boxes, image_probs[:, 1:], size))
        if self.has_mask():
            detected = [r["boxes"] for r in results]
            if sum(len(b) for b in detected):
                mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(levels, detected)))
                masks = maskrcnn_inference(mask_logits, [torch.zeros_like(r["labels"]) for r in results])
            else:
                masks = [levels[0].new_zeros(0, 1, 28, 28) for _ in results]
            for result, mask in zip(results, masks):
                result["mask_probs"] = mask
        return results

    def _postprocess(self, boxes: torch.Tensor, scores: torch.Tensor, size: tuple[int, int]) -> dict:
        """Class-agnostic boxes x per-class scores -> threshold, per-class NMS, top detections."""
        height, width = size
        boxes = torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                             boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], dim=1)
        num_classes = scores.shape[1]
        labels = torch.arange(num_classes, device=scores.device).expand_as(scores).reshape(-1)
        boxes = boxes[:, None].expand(-1, num_classes, 4).reshape(-1, 4)
        scores = scores.reshape(-1)
        keep = torch.nonzero(scores > self.config.score_threshold).squeeze(1)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = remove_small_boxes(boxes, 1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, self.config.nms_threshold)[:self.config.detections_per_image]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


class FViTHeads(nn.Module):
    """Everything of F-ViT that trains: pyramid, FPN, RPN and RoI heads, fed the frozen tower's outputs.

    ``forward(maps, image_sizes, targets=None, dense=None)``: ``maps`` are the 4 tapped (B, D, h, w)
    block outputs, ``image_sizes`` the valid (h, w) of each padded input. In training ``targets`` (per
    image ``boxes`` (K, 4) in input pixels, ``labels`` (K,) 0-based vocabulary indices of base classes,
    ``masks`` (K, H, W) with the mask head) give a loss dict with ``loss`` their sum; in eval mode one
    dict per image (``boxes``, ``scores``, ``labels`` 0-based, ``mask_probs`` (D, 1, 28, 28) with
    masks), ensembled with the CLIP region score when ``dense`` (B, E, h, w) is given.
    """

    def __init__(self, config: DetectorConfig, width: int, patch_size: int, class_embeddings: torch.Tensor,
                 background: torch.Tensor, novel: torch.Tensor):
        super().__init__()
        self.config = config
        self.patch_size = patch_size
        self.strides = [patch_size / 4, patch_size / 2, patch_size, patch_size * 2, patch_size * 4]
        self.pyramid = SimplePyramid(width)
        self.fpn = FeaturePyramidNetwork([width] * NUM_PYRAMID_INPUTS, config.fpn_channels,
                                         extra_blocks=LastLevelMaxPool(), norm_layer=nn.BatchNorm2d)
        anchors = StridedAnchorGenerator(self.strides, config.anchor_scale, config.anchor_ratios)
        self.rpn = RegionProposalNetwork(
            anchors, rpn_head(config),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
            pre_nms_top_n={"training": config.rpn_pre_nms, "testing": config.rpn_pre_nms},
            post_nms_top_n={"training": config.rpn_post_nms, "testing": config.rpn_post_nms},
            nms_thresh=config.rpn_nms)
        classifier = CosineClassifier(class_embeddings, background, novel, config.temperature)
        self.roi_heads = FViTRoIHeads(config, self.strides, class_embeddings.shape[1], classifier)

    @property
    def classifier(self) -> CosineClassifier:
        return self.roi_heads.box_predictor

    def features(self, maps: list[torch.Tensor]) -> OrderedDict:
        """The 5 FPN levels ('0'..'3', 'pool') at strides p/4 .. 4p."""
        levels = self.pyramid(maps)
        return self.fpn(OrderedDict((str(k), x) for k, x in enumerate(levels)))

    def forward(self, maps: list[torch.Tensor], image_sizes, targets: list[dict] | None = None,
                dense: torch.Tensor | None = None):
        if self.training and targets is None:
            raise ValueError("FViTHeads in training mode needs targets")
        features = self.features(maps)
        images = ImageList(maps[0], [tuple(int(v) for v in s) for s in image_sizes])
        if self.training:
            targets = [{**t, "labels": t["labels"] + 1} for t in targets]  # 0 is the background
        # Boxes in float32: torchvision decodes anchors/proposals in the deltas' dtype, and bfloat16 puts a
        # 1000-px coordinate 4 px off.
        with torch.autocast(maps[0].device.type, enabled=False):
            features = OrderedDict((k, v.float()) for k, v in features.items())
            proposals, rpn_losses = self.rpn(images, features, targets)
            out = self.roi_heads(features, proposals, images.image_sizes, targets, dense=dense,
                                 patch_size=self.patch_size)
        if not self.training:
            return out
        losses = {**rpn_losses, **out}
        return {"loss": sum(losses.values()), **losses}


class FViT(nn.Module):
    """Frozen tower + ``FViTHeads``: ``forward(images, image_sizes)`` detects in (B, 3, S, S) normalised
    inputs padded at the bottom/right (see ``FViTHeads`` for the outputs)."""

    def __init__(self, tower: DenseRCModel, heads: FViTHeads):
        super().__init__()
        tower.tower.check_block_indices(heads.config.taps, "detector.taps", tower.model_name)
        self.tower = tower.requires_grad_(False).eval()
        self.heads = heads

    def train(self, mode: bool = True):
        super().train(mode)
        self.tower.eval()  # frozen
        return self

    def tower_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.no_grad():
            return self.tower.encode_dense_with_taps(images, self.heads.config.taps)

    def forward(self, images: torch.Tensor, image_sizes, targets: list[dict] | None = None):
        dense, maps = self.tower_outputs(images)
        return self.heads(maps, image_sizes, targets, dense=None if self.training else dense)


def mask_targets(gt_masks: torch.Tensor, boxes: torch.Tensor, matched: torch.Tensor, size: int) -> torch.Tensor:
    """(N, size, size) binary targets: each box's matched mask sampled by aligned RoIAlign, thresholded at
    0.5. mmdet's ``BitmapMasks.crop_and_resize(binarize=True)`` (``roi_align(..., aligned=True)``), which
    CLIPSelf's LVIS mask head trains on; torchvision's ``project_masks_on_boxes`` samples half a pixel off
    (``aligned=False``) and keeps soft values."""
    rois = torch.cat([matched.to(boxes)[:, None], boxes], dim=1)
    sampled = roi_align(gt_masks[:, None].to(boxes), rois, (size, size), spatial_scale=1.0, sampling_ratio=0,
                        aligned=True)[:, 0]
    return (sampled >= 0.5).to(boxes.dtype)


def mask_loss(mask_logits: torch.Tensor, proposals: list[torch.Tensor], gt_masks: list[torch.Tensor],
              matched: list[torch.Tensor]) -> torch.Tensor:
    """Mean binary cross-entropy of the class-agnostic mask logits (N, 1, M, M) against ``mask_targets``
    (mmdet's ``CrossEntropyLoss(use_mask=True)``)."""
    size = mask_logits.shape[-1]
    targets = torch.cat([mask_targets(m, p, i, size) for m, p, i in zip(gt_masks, proposals, matched)])
    return F.binary_cross_entropy_with_logits(mask_logits[:, 0].float(), targets)


def paste_masks(mask_probs: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(D, 1, 28, 28) mask probabilities -> (D, H, W) boolean masks (threshold 0.5) at image size."""
    if not len(boxes):
        return torch.zeros(0, *size, dtype=torch.bool, device=boxes.device)
    return paste_masks_in_image(mask_probs, boxes, size)[:, 0] >= 0.5


__all__ = ["DetectorConfig", "FViT", "FViTHeads", "classification_loss", "ensemble_scores", "paste_masks"]
