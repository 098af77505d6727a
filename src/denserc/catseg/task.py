"""CAT-Seg training as a task on the library's training engine (``denserc.engine.loop``).

The engine brings processes, accumulation, autocast, DDP, AdamW with the cosine schedule, gradient
clipping, checkpoints with exact resume, metrics and the atomic export; this module says what trains:

- ``module``: the segmenter plus the training vocabulary's prompt tokens; its forward embeds the
  classes (text tower fine-tuned, so every step), segments the crops and returns the BCE loss;
- ``dataset``: CAT-Seg training crops of the configured dataset, classes in ``data.held_out`` mapped
  to 255 (never a target), over ``iterations x global batch`` draws, each augmented afresh (``data.py``);
- ``parameter_groups``: CAT-Seg's ``build_optimizer`` (``train_net.py``): weight decay on everything
  but normalisation layers; the CLIP's attention at ``lr x clip_lr_multiplier`` without weight decay
  (decoupled decay would also shrink the frozen key rows that share ``in_proj_weight``; CAT-Seg's
  decay there, 1e-4 at lr 2e-6, changes the weights by about 1e-5 relative over the whole run);
- checkpoints hold only what trains plus the head (the frozen CLIP is rebuilt from ``clip.model``);
- ``export``: the fine-tuned CLIP as a DenseRC folder plus the head (``export.py``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..eval.datasets import SegmentationDataset, segmentation_layout
from ..eval.text import load_class_names
from ..models import PEER_PATHS, from_spec, get_tokenizer, load_state_dict_checked, normalize_images
from ..engine.config import ConfigError
from ..distributed import DistributedEnv
from ..engine.loop import Task
from .config import CATSegConfig
from .data import Repeated, TrainingCrops, training_label_map
from .defaults import DATASET_LAYOUT
from .export import StateSubset, save_catseg
from .model import CATSeg, class_tokens, fine_tuned_clip_parameters, segmentation_loss

NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)


class CATSegTraining(nn.Module):
    """What DDP wraps: crops + labels -> {"loss"}; the class prompts are a buffer of token ids."""

    def __init__(self, segmenter: CATSeg, tokens: torch.Tensor):
        super().__init__()
        self.segmenter = segmenter
        self.register_buffer("tokens", tokens, persistent=False)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.segmenter(images, self.segmenter.encode_classes(self.tokens))
        return {"loss": segmentation_loss(logits, labels)}


def build_segmenter(config: CATSegConfig, device) -> tuple[CATSeg, object]:
    """The (DenseRC or plain) CLIP named by ``clip.model`` under a fresh CAT-Seg head, and its tokenizer."""
    spec = config.clip.model
    clip = from_spec(spec, plain_path=PEER_PATHS["CAT-Seg"], construction=config.clip.construction,
                     gating=config.clip.gating, num_layers=config.clip.num_layers)
    tokenizer = get_tokenizer(spec)
    segmenter = CATSeg(clip, config.head, prompts=len(config.templates), clip_resolution=config.clip_resolution)
    return segmenter.to(device), tokenizer


class CATSegTask(Task):
    progress_fields = {"loss": "loss"}

    def __init__(self, config: CATSegConfig, env: DistributedEnv):
        self.config = config
        self.device = env.device
        data = config.data
        try:
            layout = segmentation_layout(data.dataset)
        except ValueError as error:
            raise ConfigError(f"data.dataset: {error}") from error
        # first: a wrong path fails before any model; CAT-Seg's annotations_detectron2 tree first (eval.datasets)
        base = SegmentationDataset(data.dataset, data.root, train=True, prefer=DATASET_LAYOUT)
        names = load_class_names(data.class_names)
        if len(names) != layout.num_classes:
            raise ConfigError(f"data.class_names={data.class_names!r} lists {len(names)} classes but "
                              f"{layout.title} has {layout.num_classes}")
        unknown = [c for c in data.held_out if not 0 <= c < layout.num_classes]
        if unknown:
            raise ConfigError(f"data.held_out has class ids {unknown} outside 0..{layout.num_classes - 1}")
        self.train_classes = [c for c in range(layout.num_classes) if c not in set(data.held_out)]
        self.class_names = [names[c] for c in self.train_classes]
        draws = Repeated(base, config.iterations * config.train.global_batch_size)
        self.dataset = TrainingCrops(draws, data.crop_size,
                                     training_label_map(layout.num_classes, self.train_classes), seed=config.train.seed)
        self.num_workers = data.workers

        torch.manual_seed(config.train.seed)  # identical initial head weights on every process
        self.segmenter, tokenizer = build_segmenter(config, env.device)
        self.clip_parameters = dict(fine_tuned_clip_parameters(self.segmenter.clip))
        tokens = class_tokens(tokenizer, self.class_names, config.templates)
        self.module = CATSegTraining(self.segmenter, tokens).to(env.device)
        self.trained_names = {f"segmenter.clip.{name}" for name in self.clip_parameters}  # names in module

    def prepare(self, batch, epoch: int) -> dict:
        images = normalize_images(batch["image"].to(self.device, non_blocking=True), self.segmenter.clip.preprocess_cfg)
        return {"images": images, "labels": batch["label"].to(self.device, non_blocking=True).long()}

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        clip_lr = self.config.optim.lr * self.config.clip_lr_multiplier
        decay, no_decay = [], []
        for name, module in self.segmenter.named_modules():
            if name == "clip" or name.startswith("clip."):
                continue
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            (no_decay if isinstance(module, NORM_LAYERS) else decay).extend(own)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
                {"params": list(self.clip_parameters.values()), "weight_decay": 0.0, "lr": clip_lr}]

    def _checkpointed(self, name: str) -> bool:
        """Checkpoints hold everything outside the CLIP and the CLIP tensors that train."""
        return not name.startswith("segmenter.clip.") or name in self.trained_names

    def weights(self) -> dict[str, torch.Tensor]:
        return StateSubset(self.module, self._checkpointed).state_dict()

    def load_weights(self, weights: dict[str, torch.Tensor], source) -> None:
        load_state_dict_checked(StateSubset(self.module, self._checkpointed), weights, source)

    def export(self, folder: Path) -> None:
        save_catseg(self.segmenter, list(self.config.templates), folder, source_clip=self.config.clip.model,
                    train_dataset=self.config.data.dataset,
                    train_class_names=[", ".join(names) for names in self.class_names],
                    held_out=list(self.config.data.held_out))

    def describe(self) -> str:
        trained = sum(p.numel() for group in self.parameter_groups(0.0) for p in group["params"])
        return (f"CAT-Seg on {self.config.clip.model} ({len(self.class_names)} training classes of "
                f"{self.config.data.dataset}, {trained / 1e6:.1f} M trainable parameters)")
