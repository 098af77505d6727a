"""Every GPU row of ``benchmarks/RESULTS.md`` in one command, within 8 minutes on one H100.

    python -m benchmarks.gpu_suite                         # a GPU node: writes benchmarks/results/gpu-<date>.md
    python -m benchmarks.gpu_suite --dry-run               # toy sizes on the CPU in minutes: proves the script
    python -m benchmarks.gpu_suite --only distill fvit     # some sections (names below)

Sections, most wanted first (the time budget may end a run before the last ones):

    distill          the distillation step (``benchmarks.train_step``: a real ``Engine.train_step``) of ViT-B/16
                     and EVA02-B/16 @1024, batch 4, bf16, activation checkpointing off and on: images/s, peak
                     memory, the 24 GB verdict, the largest phases
    dense-vit-b16    ``encode_dense`` of every variant vs ``encode_image`` (``benchmarks.dense_inference``),
    dense-eva02-b16  224/448/1024 px, batch 8, fp32 and bf16, eager
    attention        ``nn.MultiheadAttention`` vs ``scaled_dot_product_attention`` (``benchmarks.attention_path``)
    loader           the training loader at 1024 px (``benchmarks.data_loading``), 4/8/16 workers
    fvit             F-ViT on ViT-B/16: training step and inference at 640 (``fvit_b16_ovcoco``) and 1024
                     (``fvit_b16_ovlvis``'s detector, with its mask head)
    catseg           CAT-Seg on ViT-B/16: training step at 384 (fp32 as CAT-Seg, and bf16) and the
                     sliding-window evaluation (ADE-150 and ADE-847 vocabularies)
    distill-vit-l14  the distillation step of ViT-L/14 @896, batch 4, bf16, checkpointing off and on
    compile-vit-b16  ``encode_image`` and the default ``encode_dense`` under ``torch.compile``, bf16, 224/448/1024
    compile-eva02-b16

How it runs. Each section runs in a fresh worker process (each distillation configuration in its own, so
its peak memory is its own). The worker reports every row as soon as it is measured and this process
appends it to the output file at once, so a run stopped at any point keeps its finished rows. A row that
fails prints its error in its cell and the next row runs; a row over its time guard stops with a
``TimeoutError`` in its cell; a row that kills its worker, or leaves a CUDA error behind (which every later
CUDA call would repeat), gets the error in its cell and the next rows run in a new worker; a worker that stops
answering (a hang in native code) is killed at its section's limit and its unfinished rows say so. The whole
run stops at ``--minutes``.

Weights are random (bare open_clip names; timm's DINOv2 with ``pretrained=False``): nothing is downloaded,
and the time of a layer does not depend on the values of its weights. Detection post-processing is the
exception (how many boxes pass the score threshold): see the F-ViT section's note.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import itertools
import json
import logging
import math
import os
import queue
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import train_step
from .common import (MIB, REPO_ROOT, cuda_peak_mib, environment, interleaved_timings, markdown_table,
                     paired_ratios, resolve_device, synchronize, time_call, worker_command)
from .vs_clipself import ratio_cell

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
ROW_PREFIX = "gpu-suite-row "  # how a worker's row reports stand out in its output
WORKER_START_S = 90.0  # allowance for a worker's imports and CUDA start-up, beyond its rows' guards
ERROR_CHARS = 300  # of an error message, in its cell
RESTART_STATUS = 75  # a worker exits with this after a row left its CUDA context unusable: the rest need a new one
DEFAULT_MINUTES = 8.0


# ------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Row:
    keys: tuple  # the row's leading cells
    settings: dict  # its keyword arguments for the section's measure function


@dataclass(frozen=True)
class Section:
    """One table. ``measure`` (``module:function``) runs in a worker as
    ``measure(device=, cache=, **shared, **row.settings) -> (lines, notes)``: ``lines`` are the cells after the
    row's keys (one row may give several lines), ``notes`` Markdown lines printed below the table. ``cache``
    is a dict that lives as long as the worker (models built by one row, reused by the next)."""

    name: str
    title: str
    about: str
    headers: tuple[str, ...]
    measure: str
    rows: tuple[Row, ...]
    shared: dict = field(default_factory=dict)
    guard_s: float = 120.0  # per row, in the worker
    fresh_process_per_row: bool = False

    @property
    def keys(self) -> int:
        return len(self.rows[0].keys)


def sections(dry_run: bool) -> list[Section]:
    """The suite: real sizes for a GPU, or toy sizes that run every step on a CPU in minutes (``dry_run``)."""
    def pick(gpu, toy):
        return toy if dry_run else gpu

    vit, eva = pick(("ViT-B-16", "EVA02-B-16"), ("ViT-Tiny-16", "EVA02-Tiny-16"))
    sizes = pick((224, 448, 1024), (32, 64))
    batch = pick(8, 2)
    timing = pick({"warmup": 1, "repeats": 5}, {"warmup": 1, "repeats": 2})
    backend = pick("inductor", "eager")  # the dry run only traces (no code generation: minutes, not tens of them)
    toy_vfm = {"vfm": "vit_small_patch14_reg4_dinov2", "vfm_kwargs": {"depth": 1, "embed_dim": 48, "num_heads": 3}}
    distill_b16 = pick(train_step.PRESETS["vitb16-1024"], {"model": vit, "size": 112, "batch": 2, **toy_vfm})
    distill_l14 = pick(train_step.PRESETS["vitl14-896"], {"model": vit, "size": 96, "batch": 2, **toy_vfm})
    distill_steps = pick({"warmup": 2, "steps": 5}, {"warmup": 1, "steps": 2})

    def distill_rows(presets: list[dict]) -> tuple[Row, ...]:
        return tuple(Row((p["model"], p["size"], p["batch"], "bf16", checkpointing),
                         {**p, "precision": "bf16", "checkpointing": checkpointing == "on"})
                     for p in presets for checkpointing in ("off", "on"))

    distill_headers = ("model", "size", "batch", "precision", "checkpointing", "images/s", "ms/step",
                       "peak allocated MiB", "peak reserved MiB", "24 GB card", "teacher crops/step",
                       "largest phases (share of the step)")
    distill_about = ("`benchmarks.train_step.run_configuration` in a fresh process per row: a real "
                     "`Engine.train_step` (multi-v/hsg, VFM {vfm}, generated images); warm-up steps: {warmup}; "
                     "then {steps} steps timed end to end (images/s, peak CUDA memory) and {steps} more with a "
                     "synchronize per phase (the phase shares).")
    dense_headers = ("size", "precision", "compile", "call", "first call s", "median ms", "images/s",
                     "time / reference (quartiles)", "peak MiB")
    dense_about = ("`benchmarks.dense_inference` calls on one model (all variants share its weights), batch {batch}, "
                   "no_grad; \"first call\" is one call before the warm-up ({compile}); then {warmup} warm-up and "
                   "{repeats} interleaved rounds, ratio = median over rounds of time / reference time (open_clip's "
                   "`encode_image` at the native size, DenseRC's elsewhere); peak = CUDA memory allocated above "
                   "the inputs during one call.")

    def dense_section(name: str, model: str, compile_rows: bool) -> Section:
        label = f"torch.compile ({backend})" if compile_rows else "eager"
        rows = tuple(Row((size, precision, label), {"size": size, "precision": precision})
                     for precision in (("bf16",) if compile_rows else ("fp32", "bf16")) for size in sizes)
        what = ("DenseRC `encode_image` and the default `encode_dense` under torch.compile" if compile_rows else
                "`encode_dense` vs `encode_image`")
        compile_note = (f"torch.compile with backend {backend!r}, compiled per size after "
                        "`torch.compiler.reset()`: the first call is the compilation" if compile_rows else "eager")
        about = dense_about.format(batch=batch, compile=compile_note, **timing)
        return Section(name, f"{what}: {model}, batch {batch}", about,
                       dense_headers, "benchmarks.gpu_suite:measure_dense", rows,
                       {"model": model, "batch": batch, "compile_backend": backend if compile_rows else None,
                        "default_only": compile_rows, **timing}, guard_s=pick(180.0, 120.0))

    fvit_sizes = pick((640, 1024), (64, 96))
    fvit_configs = dict(zip(fvit_sizes, ("fvit_b16_ovcoco", "fvit_b16_ovlvis")))
    fvit_batch = pick(8, 2)
    fvit_toy = ["detector.taps=[0,1,2,3]", "detector.fpn_channels=32", "detector.head_fc=64", "detector.rpn_pre_nms=100",
                "detector.rpn_post_nms=50", "detector.roi_samples=16", "text.templates=simple"]
    catseg_toy = ["head.hidden_dim=16", "head.guidance_proj_dim=16", "head.text_guidance_proj_dim=16",
                  "head.decoder_dims=[16,16]", "head.decoder_guidance_dims=[16,16]",
                  "head.decoder_guidance_proj_dims=[8,8]", "head.window=4", "head.pad_len=64",
                  "head.intermediate_blocks=[1,2]", "clip_resolution=64", "data.crop_size=64"]
    catseg_crop, catseg_batch = pick(384, 64), pick(4, 2)
    protocol = pick({}, {"short_side": 128, "max_long_side": 256, "size": 128, "window": 64, "overlap": 0.5})
    rate_steps = pick({"warmup": 2, "steps": 5}, {"warmup": 1, "steps": 2})
    catseg_eval_size = pick(640, 128)

    return [
        Section("distill", f"Distillation step: {distill_b16['model']} and {eva} @{distill_b16['size']}, batch "
                           f"{distill_b16['batch']}, bf16",
                distill_about.format(vfm=distill_b16["vfm"], **distill_steps), distill_headers,
                "benchmarks.gpu_suite:measure_distillation",
                distill_rows([distill_b16, {**distill_b16, "model": eva}]), distill_steps,
                guard_s=pick(240.0, 150.0), fresh_process_per_row=True),
        dense_section("dense-vit-b16", vit, compile_rows=False),
        dense_section("dense-eva02-b16", eva, compile_rows=False),
        Section("attention", f"Attention path: {vit} block 0, batch {batch}",
                "`benchmarks.attention_path.attention_calls`: one attention of the first block both ways with the "
                f"block's weights, no_grad; {timing['warmup']} warm-up and {timing['repeats']} interleaved rounds; "
                "peak = CUDA memory allocated above the inputs.",
                ("size", "tokens", "path", "median ms", "time / MHA (quartiles)", "peak MiB", "max abs difference"),
                "benchmarks.gpu_suite:measure_attention", tuple(Row((size,), {"size": size}) for size in sizes),
                {"model": vit, "batch": batch, **timing}, guard_s=60.0),
        Section("loader", f"Training loader: generated JPEGs -> {pick(1024, 128)} px",
                "`benchmarks.data_loading`: the trainer's dataset (`build_source` of an image folder, "
                "`TrainingImages`, `SquareResize` with padding) in a `DataLoader` with the trainer's arguments "
                "(`pin_memory` on CUDA), batches moved to the device; files read once before, so decode + resize + "
                "collate, not disk.",
                ("workers", "images/s", "images/s per worker", "first batch s"),
                "benchmarks.gpu_suite:measure_loader",
                tuple(Row((workers,), {"workers": workers}) for workers in pick((4, 8, 16), (0, 1))),
                {"size": pick(1024, 128), "batch": 4, "samples": pick(256, 8), "images": pick(48, 4),
                 "source_size": pick((640, 480), (64, 48))}, guard_s=120.0),
        Section("fvit", f"F-ViT on {vit}: training step and inference",
                "`denserc.detect`: `DetectionTask` on the training engine (`Engine.train_step`: augmentation and the "
                "frozen tower in `prepare`, heads forward/backward, AdamW) over pre-read batches of generated "
                "COCO-style data (the 65 OV-COCO classes, 6 boxes per image); inference = `letterbox` + "
                f"`Detector.detect` in fp32, as `denserc detect eval` runs it. The {fvit_sizes[1]} rows are "
                "fvit_b16_ovlvis's detector (mask head, LVIS thresholds) on the OV-COCO vocabulary.",
                ("size", "config", "step", "batch", "precision", "images/s", "ms per batch", "peak allocated MiB"),
                "benchmarks.gpu_suite:measure_fvit",
                tuple(Row((size, fvit_configs[size], step, fvit_batch, "bf16" if step == "train" else "fp32"),
                          {"size": size, "config": fvit_configs[size], "step": step})
                      for size in fvit_sizes for step in ("train", "inference")),
                {"model": vit, "batch": fvit_batch, "images": pick(16, 4), "overrides": pick([], fvit_toy),
                 **rate_steps}, guard_s=pick(150.0, 120.0)),
        Section("catseg", f"CAT-Seg on {vit} (multi-v/hsg): training step and sliding-window evaluation",
                "`denserc.catseg`: `CATSegTask` on the training engine (`Engine.train_step`, catseg_vitb16's "
                "settings, 171 COCO-Stuff training classes) over pre-read batches of generated COCO-Stuff-style "
                "data; evaluation = `sliding_window_scores` (CAT-Seg's protocol: overlapping windows and the whole "
                "image) on "
                f"one {catseg_eval_size} px image with the class embeddings computed once, fp32 as "
                "`denserc catseg eval` by default.",
                ("step", "size", "vocabulary", "batch", "precision", "images/s", "ms per batch", "peak allocated MiB"),
                "benchmarks.gpu_suite:measure_catseg",
                (*(Row(("train", catseg_crop, "coco-stuff 171", catseg_batch, precision),
                       {"step": "train", "precision": precision}) for precision in ("fp32", "bf16")),
                 *(Row(("sliding-window evaluation", catseg_eval_size, vocabulary, 1, "fp32"),
                       {"step": "evaluation", "vocabulary": vocabulary}) for vocabulary in ("ade150", "ade847"))),
                {"model": vit, "batch": catseg_batch, "images": pick(8, 2), "eval_size": catseg_eval_size,
                 "protocol": protocol, "overrides": pick([], catseg_toy), **rate_steps}, guard_s=pick(150.0, 120.0)),
        Section("distill-vit-l14", f"Distillation step: {distill_l14['model']} @{distill_l14['size']}, batch "
                                   f"{distill_l14['batch']}, bf16",
                distill_about.format(vfm=distill_l14["vfm"], **distill_steps), distill_headers,
                "benchmarks.gpu_suite:measure_distillation", distill_rows([distill_l14]), distill_steps,
                guard_s=pick(240.0, 150.0), fresh_process_per_row=True),
        dense_section("compile-vit-b16", vit, compile_rows=True),
        dense_section("compile-eva02-b16", eva, compile_rows=True),
    ]


# ------------------------------------------------------------------------------------------ measuring
def measure_distillation(*, device: torch.device, cache: dict, warmup: int, steps: int, precision: str,
                         checkpointing: bool, **preset) -> tuple[list, list]:
    settings = {**preset, "construction": "multi-v", "gating": "hsg"}
    result = train_step.run_configuration(device=str(device), warmup=warmup, steps=steps, precision=precision,
                                          checkpointing=checkpointing, compile_model=False, **settings)
    on_gpu = "peak_reserved_mib" in result
    phases = sorted(result["phases_ms"].items(), key=lambda item: item[1], reverse=True)
    total = sum(result["phases_ms"].values())
    line = [f"{result['images_per_second']:.1f}", f"{result['step_ms']:.0f}",
            f"{result['peak_total_mib']:.0f}" if on_gpu else "-",
            f"{result['peak_reserved_mib']:.0f}" if on_gpu else "-",
            train_step.card_verdict(result["peak_reserved_mib"]) if on_gpu else "-",
            f"{result['crops_per_step']:.1f}",
            ", ".join(f"{name} {100 * ms / total:.0f}%" for name, ms in phases[:3])]
    notes = []
    if train_step.targets_apply(settings, device):
        notes = train_step.target_lines(settings, device, [((precision, "on" if checkpointing else "off", "off"),
                                                            result)])
    return [line], notes


def measure_dense(*, device: torch.device, cache: dict, model: str, size: int, batch: int, precision: str,
                  compile_backend: str | None, default_only: bool, warmup: int, repeats: int) -> tuple[list, list]:
    from denserc import create_model
    from . import dense_inference
    if model not in cache:
        torch.manual_seed(0)
        cache[model] = dense_inference.build_variants(create_model(model, None, device=device))
    images = torch.randn(batch, 3, size, size, device=device)
    if compile_backend is not None:
        torch.compiler.reset()  # each size compiles afresh, within dynamo's recompile limit
    calls = dense_inference.size_calls(cache[model], images, precision, compile_backend is not None,
                                       compile_backend or "inductor")
    default = dense_inference.variant_label("multi-v", "hsg")
    if default_only:
        calls = {label: call for label, call in calls.items() if label in (dense_inference.DENSERC_IMAGE, default)}
    first = {label: time_call(call, device) for label, call in calls.items()}
    times = interleaved_timings(calls, warmup=warmup, repeats=repeats, device=device)
    reference = next(iter(calls))
    lines = []
    for label, call in calls.items():
        median = statistics.median(times[label])
        peak = f"{cuda_peak_mib(call, device):.0f}" if device.type == "cuda" else "-"
        lines.append([label, f"{first[label]:.2f}", f"{1000 * median:.2f}", f"{batch / median:.1f}",
                      ratio_cell(times[label], times[reference]), peak])
    ratio = statistics.median(paired_ratios(times[default], times[reference]))
    verdict = "meets" if ratio <= dense_inference.TARGET_RATIO else "misses"
    compiled = f"torch.compile ({compile_backend})" if compile_backend else "eager"
    notes = [f"- {size} px, {precision}, {compiled}: default encode_dense {ratio:.3f}x {reference}: {verdict} the "
             f"target <= {dense_inference.TARGET_RATIO}x"]
    return lines, notes


def measure_attention(*, device: torch.device, cache: dict, model: str, size: int, batch: int, warmup: int,
                      repeats: int) -> tuple[list, list]:
    from denserc import create_model
    from .attention_path import PATHS, attention_calls
    if "model" not in cache:
        torch.manual_seed(0)
        cache["model"] = create_model(model, None, device=device).eval()
    tower = cache["model"]
    tokens = torch.randn(batch, 1 + (size // tower.patch_size) ** 2, tower.width, device=device)
    calls = attention_calls(tower.visual.transformer.resblocks[0].attn, tokens)
    difference = float((calls[PATHS[0]]() - calls[PATHS[1]]()).abs().max())
    times = interleaved_timings(calls, warmup=warmup, repeats=repeats, device=device)
    lines = []
    for path, call in calls.items():
        peak = f"{cuda_peak_mib(call, device):.1f}" if device.type == "cuda" else "-"
        lines.append([tokens.shape[1], path, f"{1000 * statistics.median(times[path]):.3f}",
                      ratio_cell(times[path], times[PATHS[0]]), peak, f"{difference:.1e}"])
    return lines, []


def measure_loader(*, device: torch.device, cache: dict, workers: int, size: int, batch: int, samples: int,
                   images: int, source_size: tuple[int, int]) -> tuple[list, list]:
    from .data_loading import folder_dataset, loader_throughput, per_sample_split, write_jpegs
    notes = []
    if "dataset" not in cache:
        cache["folder"] = tempfile.TemporaryDirectory()  # removed when the worker ends
        root = Path(cache["folder"].name)
        files = write_jpegs(root, images, *source_size)
        cache["dataset"] = folder_dataset(root, size, "pad")
        for path in files:
            path.read_bytes()  # page cache: time decoding, not the disk
        sample_ms, decode_ms, resize_ms = per_sample_split(cache["dataset"], files, size)
        notes.append(f"One sample in the worker process (median of {len(files)} {source_size[0]}x{source_size[1]} "
                     f"JPEGs): {sample_ms:.1f} ms, of which decode {decode_ms:.1f} ms and resize to {size} "
                     f"{resize_ms:.1f} ms: {1000 / sample_ms:.0f} images/s per busy core.")
    first, rate = loader_throughput(cache["dataset"], workers=workers, batch=batch, samples=samples, device=device)
    return [[f"{rate:.1f}", f"{rate / max(workers, 1):.1f}", f"{first:.2f}"]], notes


def steady_rate(step: Callable[[], object], images_per_call: int, device: torch.device, warmup: int,
                steps: int) -> list[str]:
    """Cells: images/s and ms per call over ``steps`` calls timed end to end after ``warmup`` calls, and the
    peak CUDA memory allocated during them (weights included)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    peak = f"{torch.cuda.max_memory_allocated(device) / MIB:.0f}" if device.type == "cuda" else "-"
    return [f"{steps * images_per_call / elapsed:.1f}", f"{1000 * elapsed / steps:.1f}", peak]


def write_detection_data(folder: Path, count: int, width: int, height: int, boxes_per_image: int = 6,
                         seed: int = 0) -> Path:
    """``count`` JPEGs and a COCO-style annotation file over the 65 OV-COCO classes (random base-class boxes,
    each with its rectangle as the polygon, for a mask head); returns the annotation file."""
    from denserc.detect.protocols import OV_COCO_BASE, OV_COCO_IDS
    from .data_loading import write_jpegs
    paths = write_jpegs(folder, count, width, height, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    base_ids = [OV_COCO_IDS[name] for name in OV_COCO_BASE]
    images, annotations = [], []
    for image_id, path in enumerate(paths, start=1):
        images.append({"id": image_id, "file_name": path.name, "width": width, "height": height})
        for x, y, w, h, k in torch.rand(boxes_per_image, 5, generator=generator).tolist():
            w, h = (0.1 + 0.4 * w) * width, (0.1 + 0.4 * h) * height
            x, y = x * (width - w), y * (height - h)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, "area": w * h,
                                "category_id": base_ids[int(k * len(base_ids))], "bbox": [x, y, w, h],
                                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    categories = [{"id": category_id, "name": name} for name, category_id in OV_COCO_IDS.items()]
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def measure_fvit(*, device: torch.device, cache: dict, model: str, size: int, config: str, step: str, batch: int,
                 images: int, overrides: list[str], warmup: int, steps: int) -> tuple[list, list]:
    from denserc.detect.config import load_detect_config
    from denserc.detect.data import letterbox
    from denserc.detect.detector import Detector
    from denserc.detect.model import FViT
    from denserc.detect.task import DetectionTask
    from denserc.distributed import setup_distributed
    from denserc.engine import Engine
    if "folder" not in cache:
        cache["folder"] = tempfile.TemporaryDirectory()
        cache["annotations"] = write_detection_data(Path(cache["folder"].name), images, 640, 480)
    key = (config, size)
    if cache.get("key") != key:
        cache.pop("engine", None)  # the previous size's task and optimizer: free them first
        gc.collect()
        folder = Path(cache["folder"].name)
        detect_config = load_detect_config(config, [
            f"backbone.model={model}", "data.protocol=ov-coco", f"data.train_annotations={cache['annotations']}",
            f"data.train_images={folder}", f"data.image_size={size}", f"train.global_batch_size={batch}",
            f"train.batch_size={batch}", "data.num_workers=0", *overrides])
        env = setup_distributed(str(device))
        task = DetectionTask(detect_config, env)
        cache["engine"] = Engine(task, detect_config, env, folder / "run")
        cache["batches"] = [task.collate([task.dataset[(k * batch + i) % len(task.dataset)] for i in range(batch)])
                            for k in range(2)]
        cache["key"] = key
    engine, batches = cache["engine"], cache["batches"]
    task = engine.task
    if step == "train":
        cycle = itertools.cycle(batches)
        cells = steady_rate(lambda: engine.train_step([next(cycle)], 0), batch, device, warmup, steps)
    else:
        detector = Detector(FViT(task.tower, task.module), task.config, task.split)
        mean, std = task.tower.preprocess_cfg["mean"], task.tower.preprocess_cfg["std"]
        cells = steady_rate(lambda: detector.detect(letterbox(batches[0], size, mean, std, device)), batch, device,
                            warmup, steps)
    notes = []
    if step == "inference":
        notes.append(f"- {config} @{size}: random weights give flat class scores, so more boxes pass "
                     f"`score_threshold` ({task.config.detector.score_threshold:g}) than with a trained detector: "
                     "the per-class NMS here is a worst case for inference time.")
    return [cells], notes


def write_coco_stuff(folder: Path, count: int, width: int, height: int, seed: int = 0) -> None:
    """A COCO-Stuff-164k training split: ``count`` JPEGs and label maps of 16 x 16 px blocks (ids 0..170, 255)."""
    from PIL import Image
    from .data_loading import write_jpegs
    images, labels = folder / "images" / "train2017", folder / "annotations" / "train2017"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    for path in write_jpegs(images, count, width, height, seed=seed):
        blocks = torch.randint(0, 172, (1, 1, math.ceil(height / 16), math.ceil(width / 16)), generator=generator)
        label = torch.nn.functional.interpolate(blocks.float(), scale_factor=16, mode="nearest")[0, 0, :height, :width]
        label[label == 171] = 255
        Image.fromarray(label.to(torch.uint8).numpy()).save(labels / f"{path.stem}_labelTrainIds.png")


def measure_catseg(*, device: torch.device, cache: dict, model: str, step: str, batch: int, images: int,
                   eval_size: int, protocol: dict, overrides: list[str], warmup: int, steps: int,
                   precision: str = "fp32", vocabulary: str | None = None) -> tuple[list, list]:
    from denserc.catseg.config import load_config
    from denserc.catseg.evaluate import SlidingWindowProtocol, benchmark, sliding_window_scores
    from denserc.catseg.model import class_tokens
    from denserc.catseg.task import CATSegTask
    from denserc.eval.text import load_class_names
    from denserc.models import get_tokenizer
    from denserc.distributed import setup_distributed
    from denserc.engine import Engine
    env = setup_distributed(str(device))
    if "task" not in cache:
        cache["folder"] = tempfile.TemporaryDirectory()
        root = Path(cache["folder"].name)
        write_coco_stuff(root, images, 640, 480)
        settings = [f"clip.model={model}", "clip.construction=multi-v", "clip.gating=hsg", f"data.root={root}",
                    "data.workers=0", f"train.global_batch_size={batch}", f"train.batch_size={batch}", *overrides]
        cache["settings"] = settings
        task = cache["task"] = CATSegTask(load_config("catseg_vitb16", settings), env)
        cache["batches"] = [task.collate([task.dataset[k * batch + i] for i in range(batch)]) for k in range(2)]
    task = cache["task"]
    if step == "train":
        config = load_config("catseg_vitb16", [*cache["settings"], f"train.precision={precision}"])
        engine = Engine(task, config, env, Path(cache["folder"].name) / "run")
        cycle = itertools.cycle(cache["batches"])
        cells = steady_rate(lambda: engine.train_step([next(cycle)], 0), batch, device, warmup, steps)
        return [cells], []
    segmenter = task.segmenter.eval()
    names = load_class_names(benchmark(vocabulary).class_names)
    tokens = class_tokens(get_tokenizer(model), names, task.config.templates).to(device)
    with torch.no_grad():
        embeddings = segmenter.encode_classes(tokens).float()
    image = torch.randn(1, 3, eval_size, eval_size * 4 // 3, device=device)
    windows = SlidingWindowProtocol(**protocol)
    cells = steady_rate(lambda: sliding_window_scores(segmenter, image, embeddings, windows), 1, device,
                        warmup, steps)
    return [cells], [f"- {vocabulary}: {len(names)} classes ({segmenter.head_config.pad_len} after CAT-Seg's padding "
                     "or top-cost cut)"]


# ------------------------------------------------------------------------------------------ the worker
def run_rows(measure: str, shared: dict, rows: list[dict], device: str, guard_s: float, first_row: int) -> dict:
    """Worker (a fresh process): measure each row, printing its result as one line as soon as it is done.

    A row that raises, or runs past ``guard_s`` (SIGALRM raises ``TimeoutError`` in it), reports its error,
    and the next row runs; after a CUDA error (sticky: every later CUDA call would fail too) the worker exits
    with ``RESTART_STATUS`` and the suite starts a new one for the remaining rows.
    """
    logging.getLogger().setLevel(logging.ERROR)
    module, _, name = measure.partition(":")
    function = getattr(importlib.import_module(module), name)
    device = resolve_device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    signal.signal(signal.SIGALRM, _guard_expired)
    cache: dict = {}
    for index, settings in enumerate(rows, start=first_row):
        message = {"row": index}
        try:
            signal.alarm(max(1, math.ceil(guard_s)))
            try:
                lines, notes = function(device=device, cache=cache, **shared, **settings)
            finally:
                signal.alarm(0)
            message.update(lines=[[str(cell) for cell in line] for line in lines], notes=list(notes))
        except Exception as error:  # noqa: BLE001 - any failure belongs in the row's cell, not the run
            traceback.print_exc()
            message["error"] = f"{type(error).__name__}: {error}"
            if "CUDA error" in str(error):
                print(ROW_PREFIX + json.dumps(message), flush=True)
                raise SystemExit(RESTART_STATUS) from error
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(ROW_PREFIX + json.dumps(message), flush=True)
    return {}


def _guard_expired(signum, frame):
    raise TimeoutError("the row ran past its time guard")


# ------------------------------------------------------------------------------------------ the report
class Report:
    """Markdown to stdout and to ``path`` at once, line by line (a run stopped at any point keeps what it had)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("", encoding="utf-8")

    def write(self, text: str = "") -> None:
        print(text, flush=True)
        with self.path.open("a", encoding="utf-8") as file:
            file.write(text + "\n")


def cell(text: str) -> str:
    """One Markdown table cell: one line, no column bars, at most ERROR_CHARS characters."""
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= ERROR_CHARS else text[:ERROR_CHARS - 3] + "..."


def table_line(cells) -> str:
    return "| " + " | ".join(cell(c) for c in cells) + " |"


def default_output(dry_run: bool, today: datetime.date | None = None) -> Path:
    """``benchmarks/results/gpu-<date>.md`` (``dry-run-<date>.md``); ``-2``, ``-3`` ... if taken."""
    today = today or datetime.datetime.now(datetime.timezone.utc).date()
    stem = f"{'dry-run' if dry_run else 'gpu'}-{today.isoformat()}"
    path = RESULTS_DIR / f"{stem}.md"
    for number in itertools.count(2):
        if not path.exists():
            return path
        path = RESULTS_DIR / f"{stem}-{number}.md"


@dataclass
class Outcome:
    section: str
    keys: tuple
    status: str  # "measured", "failed" or "not run"
    detail: str = ""


def run_section(section: Section, report: Report, device: torch.device, deadline: float) -> list[Outcome]:
    """Write the section's table row by row as its worker(s) report; every row ends up with a line."""
    report.write(f"## {section.title}\n")
    report.write(f"{section.about}\n")
    report.write(markdown_table(section.headers, []))
    width = len(section.headers) - section.keys
    outcomes: dict[int, Outcome] = {}
    notes: list[str] = []

    def unmeasured(index: int, status: str, text: str) -> None:
        """A row without a measurement: why, in its first measured cell."""
        row = section.rows[index]
        report.write(table_line([*row.keys, text, *["-"] * (width - 1)]))
        outcomes[index] = Outcome(section.name, row.keys, status, text)

    def write_message(message: dict) -> None:
        index = message["row"]
        if "error" in message:
            unmeasured(index, "failed", f"error: {message['error']}")
            return
        for line in message["lines"]:
            report.write(table_line([*section.rows[index].keys, *line]))
        notes.extend(message["notes"])
        outcomes[index] = Outcome(section.name, section.rows[index].keys, "measured")

    groups = ([[index] for index in range(len(section.rows))] if section.fresh_process_per_row
              else [list(range(len(section.rows)))])
    for group in groups:
        pending = group  # rows run in order, so the unreported ones are always a tail of the group
        while pending:
            if time.monotonic() >= deadline:
                reason, restart = "not run: the suite's time budget was spent", False
            else:
                reason, restart = run_worker(section, pending, device, deadline, write_message)
            left = [index for index in pending if index not in outcomes]
            if restart and len(left) == len(pending):
                restart = None  # asked for a new worker without reporting anything: count it as a crash
            pending = left
            if pending and restart is None:  # the worker died in the first unreported row
                unmeasured(pending[0], "failed", f"error: {reason}")
                pending = pending[1:]
            elif not restart:
                for index in pending:
                    unmeasured(index, "not run", reason)
                pending = []
    report.write()
    for note in notes:
        report.write(note)
    if notes:
        report.write()
    return [outcomes[index] for index in range(len(section.rows))]


def run_worker(section: Section, rows: list[int], device: torch.device, deadline: float,
               on_message: Callable[[dict], None]) -> tuple[str, bool | None]:
    """Run the rows ``rows`` (consecutive) of ``section`` in a worker process, passing on each row's report.

    Returns why rows it did not report did not run, and what to do with them: ``True`` run them in a new worker
    (it asked for one), ``False`` mark them all "not run" (it was stopped), ``None`` the first one killed it.
    """
    limit = WORKER_START_S + section.guard_s * len(rows)
    stop_at = min(deadline, time.monotonic() + limit)
    command, env = worker_command("benchmarks.gpu_suite:run_rows", {
        "measure": section.measure, "shared": section.shared, "rows": [section.rows[i].settings for i in rows],
        "device": str(device), "guard_s": section.guard_s, "first_row": rows[0]})
    with tempfile.TemporaryFile("w+", encoding="utf-8") as errors:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=errors, text=True,
                                   start_new_session=True)  # its own process group: DataLoader/compile workers too
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
        exited_at = None  # a child of the worker may keep its output open after it exits: wait a little, not forever
        try:
            while time.monotonic() < stop_at:
                try:
                    line = lines.get(timeout=max(0.0, min(stop_at - time.monotonic(), 1.0)))
                except queue.Empty:
                    if exited_at is None and process.poll() is not None:
                        exited_at = time.monotonic()
                    if exited_at is not None and time.monotonic() - exited_at > 5:
                        break
                    continue
                if line is None:
                    break
                if line.startswith(ROW_PREFIX):
                    on_message(json.loads(line[len(ROW_PREFIX):]))
            if process.poll() is None:  # output closed: it is exiting
                try:
                    process.wait(timeout=max(0.0, stop_at - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        finally:  # also when this process is interrupted: no worker outlives the suite
            stopped = process.poll() is None
            if stopped:
                _kill_group(process)
            process.wait()
        if stopped:
            if stop_at >= deadline:
                return "not run: stopped when the suite's time budget ran out", False
            return f"not run: its worker was stopped after {limit:.0f} s (section limit)", False
        if process.returncode == RESTART_STATUS:
            return "", True
        errors.seek(0)
        tail = [line for line in errors.read().splitlines() if line.strip()]
        return f"its worker exited with status {process.returncode}: {tail[-1] if tail else 'no message'}", None


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    plan_names = [section.name for section in sections(dry_run=True)]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="toy models and sizes on the CPU (minutes): proves every step before a GPU exists")
    parser.add_argument("--only", nargs="+", metavar="SECTION", help=f"run these sections: {', '.join(plan_names)}")
    parser.add_argument("--output", type=Path, help="Markdown file to write (default: benchmarks/results/"
                                                    "gpu-<date>.md, or dry-run-<date>.md; never overwritten)")
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                        help="stop the whole run after this long; rows not reached say so")
    parser.add_argument("--device", default="cuda", help="cuda[:i] (the dry run uses the CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads, inherited by the workers (default: 1 for --dry-run, else torch's)")
    args = parser.parse_args(argv)
    if args.only:
        unknown = [name for name in args.only if name not in plan_names]
        if unknown:
            raise SystemExit(f"--only: unknown section(s) {', '.join(unknown)}; the sections are "
                             f"{', '.join(plan_names)}")
    if args.dry_run:
        device = torch.device("cpu")
    elif torch.device(args.device).type != "cuda" or not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: the suite's real sizes need a CUDA device, and "
                         f"{'this machine has none' if not torch.cuda.is_available() else 'this is not one'}; "
                         "`--dry-run` runs every step at toy size on the CPU")
    else:
        device = resolve_device(args.device)
    threads = args.threads if args.threads is not None else (1 if args.dry_run else None)
    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    plan = [s for s in sections(args.dry_run) if not args.only or s.name in args.only]
    machine = environment(device)  # before the output file exists: git would count it as a change to benchmarks/
    report = Report(args.output or default_output(args.dry_run))
    previous_handler = signal.signal(signal.SIGTERM, _terminated)  # unwind, so the running worker is stopped too
    try:
        return run_suite(plan, report, device, machine, args)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def run_suite(plan: list[Section], report: Report, device: torch.device, machine: list[str],
              args: argparse.Namespace) -> int:
    """The header, every section's table, and a summary; 1 if any row failed or did not run."""
    started = time.monotonic()
    deadline = started + 60 * args.minutes
    kind = ("dry run: toy models and sizes on the CPU, which prove the script, not the speed" if args.dry_run
            else "GPU")
    report.write(f"# DenseRC GPU suite ({kind})\n")
    report.write("\n".join(machine))
    report.write("- weights: random (bare open_clip names, timm DINOv2 with pretrained=False); layer times do not "
                 "depend on weight values (detection post-processing does: see F-ViT)")
    if device.type == "cuda":
        report.write(f"- float32 matmul precision: {torch.get_float32_matmul_precision()} (fp32 rows run without "
                     "TF32 unless this says otherwise); bf16 = autocast")
    else:
        report.write("- memory columns need CUDA: '-' in a dry run")
    report.write(f"- sections: {', '.join(s.name for s in plan)}; time budget {args.minutes:g} min; each row has a "
                 "time guard; a failing row shows its error in its cell")
    shown = report.path.relative_to(REPO_ROOT) if report.path.is_relative_to(REPO_ROOT) else report.path
    report.write(f"- output: `{shown}`\n")

    outcomes: list[Outcome] = []
    for section in plan:
        outcomes.extend(run_section(section, report, device, deadline))

    elapsed = time.monotonic() - started
    failed = [o for o in outcomes if o.status != "measured"]
    report.write("## Summary\n")
    report.write(f"{len(outcomes) - len(failed)} of {len(outcomes)} rows measured in {elapsed / 60:.1f} min.")
    for outcome in failed:
        report.write(f"- {outcome.section} {' / '.join(map(str, outcome.keys))}: {outcome.status}: "
                     f"{cell(outcome.detail)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
