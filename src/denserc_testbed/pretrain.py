"""Contrastive pretraining of the testbed's tiny CLIP (``denserc pretrain-testbed``).

Each step pairs one crop of every class (so no two class crops share a caption, which would make
ClipLoss push matching pairs apart) with random scene regions (whole scenes included) captioned by
what they show. Class crops are jittered (scale, position, flip) and captioned with a random
template. Two regions may get the same caption ("a photo of grass."); identical texts only put a
floor under the loss, their gradients still pull each image towards its caption.
Everything random follows ``--seed``: the scene pools, the batches and the initial weights.
"""
from __future__ import annotations

import json
import math
import shlex
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import open_clip
import torch
from tqdm import tqdm

from denserc.io import atomic_write, save_json, save_tensors
from denserc.models import create_model, get_tokenizer, normalize_images

from .crops import ScenePool, crop, square_boxes
from .settings import PretrainConfig
from .tiny_clip import MODEL_NAME, RECORD_FILE, WEIGHTS_FILE, pretrained_path
from .vocabulary import CATEGORIES, TEMPLATES, phrase
from .zero_shot import crop_accuracy

THING_CROP_SCALE = (1.1, 1.5)  # object crops: square of this many times the object's longer side
CROP_SHIFT = 0.15  # crop centre jitter, as a fraction of the crop side
STUFF_WINDOW_SCALE = (0.85, 1.15)
REGION_SIDE = (0.15, 1.0)  # random regions: width as a fraction of the scene side ...
REGION_ASPECT = 3.0  # ... height / width log-uniform in [1/3, 3]
MIN_REGION = 8  # pixels
LOG_EVERY = 25  # steps between lines of pretrain_log.jsonl (evaluations are always logged)
TEST_SET_SEED = 20_261_125  # the small fixed held-out set the test suite re-scores
TEST_SET_SCENES = 60


class BatchSampler:
    """One jittered crop per class plus ``regions_per_batch`` random scene regions, each with a caption.

    A region is any axis-aligned box (side ``REGION_SIDE`` of the scene, aspect up to
    ``REGION_ASPECT``, whole scenes included), captioned by what it shows (``ScenePool.region_caption``).
    """

    def __init__(self, pool: ScenePool, tokenizer, native_size: int, regions_per_batch: int,
                 rng: np.random.Generator, salient: bool = False):
        missing = pool.missing_categories()
        if missing:
            raise ValueError(f"the training pool has no example of {missing}; render more scenes")
        self.pool = pool
        self.tokenizer = tokenizer
        self.native_size = native_size
        self.regions_per_batch = regions_per_batch
        self.rng = rng
        self.salient = salient
        self.by_class = [pool.regions_of(c["id"]) for c in CATEGORIES]
        self.is_thing = torch.tensor([c["isthing"] == 1 for c in CATEGORIES])

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(images in uint8 range, tokens, captions) for one step: class crops first, then regions."""
        class_crops, class_captions = self._class_crops()
        region_crops, region_captions = self._regions()
        captions = class_captions + region_captions
        return torch.cat([class_crops, region_crops]), self.tokenizer(captions), captions

    def _class_crops(self) -> tuple[torch.Tensor, list[str]]:
        rng = self.rng
        picks = torch.stack([rows[rng.integers(len(rows))] for rows in self.by_class])
        regions = self.pool.regions[picks]
        count = len(picks)
        thing_scale = torch.from_numpy(rng.uniform(*THING_CROP_SCALE, size=count)).float()
        stuff_scale = torch.from_numpy(rng.uniform(*STUFF_WINDOW_SCALE, size=count)).float()
        shift = torch.from_numpy(rng.uniform(-CROP_SHIFT, CROP_SHIFT, size=(count, 2))).float()
        size = self.pool.image_size
        boxes = torch.where(self.is_thing[:, None], square_boxes(regions[:, 2:], thing_scale, size, shift),
                            square_boxes(regions[:, 2:], stuff_scale, size, shift))
        crops = crop(self.pool.images[regions[:, 0].long()], boxes, self.native_size)
        flip = torch.from_numpy(rng.random(count) < 0.5)
        crops = torch.where(flip[:, None, None, None], crops.flip(-1), crops)
        templates = rng.integers(len(TEMPLATES), size=count)
        captions = [TEMPLATES[t].format(phrase(c["id"])) for t, c in zip(templates, CATEGORIES)]
        return crops, captions

    def _regions(self) -> tuple[torch.Tensor, list[str]]:
        rng, size, count = self.rng, self.pool.image_size, self.regions_per_batch
        scenes = rng.choice(len(self.pool.captions), count, replace=False)
        widths = rng.uniform(*REGION_SIDE, size=count) * size
        heights = widths * np.exp(rng.uniform(-math.log(REGION_ASPECT), math.log(REGION_ASPECT), size=count))
        boxes = []
        for width, height in zip(widths, heights):
            width, height = (int(np.clip(round(side), MIN_REGION, size)) for side in (width, height))
            x1, y1 = int(rng.integers(size - width + 1)), int(rng.integers(size - height + 1))
            boxes.append((x1, y1, x1 + width, y1 + height))
        captions = [self.pool.region_caption(int(scene), box, self.salient) for scene, box in zip(scenes, boxes)]
        crops = crop(self.pool.images[torch.from_numpy(scenes)], torch.tensor(boxes, dtype=torch.float32),
                     self.native_size)
        return crops, captions


def learning_rate(step: int, config: PretrainConfig) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain(config: PretrainConfig, output: Path, command: str, progress: bool = True) -> dict:
    """Train the tiny CLIP, write fp16 weights + the run's record to ``output``, return the record."""
    start = time.time()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model = create_model(MODEL_NAME)
    tokenizer = get_tokenizer(MODEL_NAME)
    native = model.native_size[0]
    train_pool = ScenePool.render(config.seed, config.train_scenes, progress=progress)
    held_out = ScenePool.render(held_out_seed(config.seed), config.held_out_scenes, progress=progress)
    sampler = BatchSampler(train_pool, tokenizer, native, config.regions_per_batch,
                           np.random.default_rng([config.seed, 2]), salient=config.captions == "salient")
    optimizer = torch.optim.AdamW(model.clip.parameters(), lr=config.lr, betas=(0.9, 0.98), eps=1e-6,
                                  weight_decay=config.weight_decay)
    loss_fn = open_clip.ClipLoss()
    output.mkdir(parents=True, exist_ok=True)
    log_lines = []
    model.train()
    for step in tqdm(range(config.steps), desc="pretraining tiny CLIP", disable=not progress):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        images, tokens, _ = sampler()
        image_features = model.encode_image(normalize_images(images, model.preprocess_cfg), normalize=True)
        text_features = model.encode_text(tokens, normalize=True)
        loss = loss_fn(image_features, text_features, model.clip.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.clip.logit_scale.clamp_(0, math.log(100))
        entry = {"step": step + 1, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
                 "elapsed_s": round(time.time() - start, 1)}
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            entry.update(crop_accuracy(model, tokenizer, held_out))
            tqdm.write(json.dumps(entry))
        if (step + 1) % LOG_EVERY == 0 or "things_top1" in entry:
            log_lines.append(json.dumps(entry))
    atomic_write(output / "pretrain_log.jsonl",
                 lambda tmp: Path(tmp).write_text("\n".join(log_lines) + "\n", encoding="utf-8"))
    state = {name: tensor.half() for name, tensor in model.clip.state_dict().items()}
    save_tensors(state, output / WEIGHTS_FILE, metadata={"model": MODEL_NAME, "seed": str(config.seed)})
    shipped = create_model(MODEL_NAME, pretrained=pretrained_path(output)).eval()
    record = {
        "model": MODEL_NAME,
        "command": command,
        "config": asdict(config),
        "held_out_seed": held_out_seed(config.seed),
        "zero_shot_held_out": crop_accuracy(shipped, tokenizer, held_out),
        "zero_shot_test_set": crop_accuracy(shipped, tokenizer, check_set_pool()),
        "test_set": {"seed": TEST_SET_SEED, "scenes": TEST_SET_SCENES},
        "final_loss": json.loads(log_lines[-1])["loss"],
        "wall_time_s": round(time.time() - start, 1),
        "weights_dtype": "float16",
    }
    save_json(record, output / RECORD_FILE)
    return record


def held_out_seed(seed: int) -> int:
    """Held-out scenes use another seed than the training pool (seed + 1_000_000)."""
    return seed + 1_000_000


def check_set_pool() -> ScenePool:
    """The small fixed held-out set whose accuracy the test suite checks against the record."""
    return ScenePool.render(TEST_SET_SEED, TEST_SET_SCENES)


# ------------------------------------------------------------------------------------------- CLI
def _run(args) -> int:
    config = PretrainConfig(**{name: getattr(args, name) for name in asdict(PretrainConfig())})
    options = [f"--{name.replace('_', '-')} {value}" for name, value in asdict(config).items()]
    command = " ".join(["denserc pretrain-testbed", f"--output {shlex.quote(str(args.output))}", *options])
    record = pretrain(config, args.output, command)
    print(json.dumps(record, indent=2))
    return 0
