"""Training step: images/s, peak memory and a per-phase breakdown of DenseRC's real ``Engine.train_step``.

Each configuration (precision x activation checkpointing x ``torch.compile``) is built as a real
the distillation ``Engine`` (random weights, generated images) in a fresh process, so peak memory
belongs to that configuration alone. Per configuration:

1. ``--warmup`` steps (compilation, allocator, AdamW state);
2. ``--steps`` steps timed end to end with one synchronize at each end -> images/s, peak memory;
3. ``--steps`` more steps with a synchronize at every phase boundary -> median ms per phase.

Phases are read off the distillation task's own pieces, never re-implemented: ``images_and_grids``
(uint8 batch to the device, normalisation, grid boxes), ``embed_crops`` (teacher crops + forward),
``embed_patches`` (VFM), the student's ``encode_dense``, the loss (rest of the distillation module's forward), the
backward pass (+ clipping if on, up to the optimizer's step pre-hook; these are not logging steps, so no
gradient norm), the optimizer step, and "other" (zero_grad, scheduler, loss bookkeeping). The step is one
micro-batch of ``--batch`` images.

    python -m benchmarks.train_step                                   # tiny preset, CPU
    python -m benchmarks.train_step --preset vitb16-1024 --device cuda --precision bf16 \\
        --checkpointing off on --compile off on
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import tempfile
import time

import torch
from torch.utils.data import default_collate

from .common import (MIB, PRECISIONS, add_common_arguments, distillation_engine, environment, in_fresh_process, markdown_table,
                     peak_rss_mib, reset_peak_rss, setup, synchronize)

# model, input size, images per step, VFM (timm name + create_model kwargs)
PRESETS = {
    "tiny": {"model": "ViT-Tiny-16", "size": 448, "batch": 2, "vfm": "vit_small_patch14_reg4_dinov2",
             "vfm_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 3}},
    "vitb16-1024": {"model": "ViT-B-16", "size": 1024, "batch": 4, "vfm": "vit_base_patch14_reg4_dinov2",
                    "vfm_kwargs": {}},
    "vitl14-896": {"model": "ViT-L-14", "size": 896, "batch": 4, "vfm": "vit_base_patch14_reg4_dinov2",
                   "vfm_kwargs": {}},
}
PHASES = ("data to device + grids", "teacher crops + forward", "VFM forward", "student forward", "losses",
          "backward (+ clipping)", "optimizer step", "other")
TARGET_IMAGES_PER_SECOND = 50  # ViT-B/16 @1024, bf16, one H100
FIT_CARD_GIB = 24  # batch 4 @1024 with checkpointing must fit a 24 GB card ...
CUDA_CONTEXT_GIB = 1  # ... which leaves about this much for the CUDA context and libraries


class PhaseClock:
    """Timestamps at the boundaries of ``Engine.train_step``'s phases, via wrappers and hooks.

    Every mark synchronizes the device first, so the phases add up to the step (the synchronisation
    itself costs a little overlap; the end-to-end throughput is measured without it).
    """

    def __init__(self, trainer, device: torch.device):
        self.device = device
        self.enabled = False
        self.marks: dict[str, float] = {}
        task = trainer.task
        task.images_and_grids = self._timed(task.images_and_grids, "prepare")
        task.embed_crops = self._timed(task.embed_crops, "teacher")
        if task.embed_patches is not None:  # None: coherence weight 0, no VFM
            task.embed_patches = self._timed(task.embed_patches, "vfm")
        distillation = task.module
        distillation.encode = self._timed(distillation.encode, "student")
        distillation.register_forward_hook(lambda *_: self.mark("module end"))
        trainer.optimizer.register_step_pre_hook(lambda *_: self.mark("optimizer start"))
        trainer.optimizer.register_step_post_hook(lambda *_: self.mark("optimizer end"))

    def mark(self, name: str) -> None:
        if self.enabled:
            synchronize(self.device)
            self.marks[name] = time.perf_counter()

    def _timed(self, function, name: str):
        def timed(*args, **kwargs):
            self.mark(f"{name} start")
            result = function(*args, **kwargs)
            self.mark(f"{name} end")
            return result
        return timed

    def phases(self, step_start: float, step_end: float) -> dict[str, float]:
        """Seconds per phase of the step that ran between ``step_start`` and ``step_end``."""
        m = self.marks
        times = {
            PHASES[0]: m["prepare end"] - m["prepare start"],
            PHASES[1]: m["teacher end"] - m["teacher start"],
            PHASES[2]: m["vfm end"] - m["vfm start"] if "vfm end" in m else 0.0,
            PHASES[3]: m["student end"] - m["student start"],
            PHASES[4]: m["module end"] - m["student end"],
            PHASES[5]: m["optimizer start"] - m["module end"],
            PHASES[6]: m["optimizer end"] - m["optimizer start"],
        }
        times[PHASES[7]] = (step_end - step_start) - sum(times.values())
        return times


def build_trainer(*, model: str, size: int, batch: int, vfm: str, vfm_kwargs: dict, construction: str,
                  gating: str, precision: str, checkpointing: bool, compile_model: bool, device: torch.device,
                  batches: int, output_dir: str):
    """The real distillation engine on random weights and ``batches * batch`` generated images."""
    from denserc.distributed import DistributedEnv
    raw = {
        "model": {"name": model, "pretrained": None, "construction": construction, "gating": gating,
                  "grad_checkpointing": checkpointing, "compile": compile_model},
        "vfm": {"name": vfm, "pretrained": False, "model_kwargs": vfm_kwargs},
        "data": {"type": "generated", "num_images": batches * batch, "image_size": size, "num_workers": 0},
        "train": {"global_batch_size": batch, "batch_size": batch, "precision": precision,
                  "device": device.type},
    }
    env = DistributedEnv(rank=0, world_size=1, local_rank=0, device=device)
    return distillation_engine(raw, env, output_dir)


def run_configuration(*, device: str, warmup: int, steps: int, profile_rows: int = 0, memory_only: bool = False,
                      **settings) -> dict:
    """Worker (fresh process): warm up, then time + break down (+ CUDA memory, profile), or CPU memory only.

    ``memory_only`` runs in a memory-probe process (see ``benchmarks.common``), whose allocator
    setting would distort timings, so CPU memory and CPU timings come from two processes.
    """
    logging.getLogger().setLevel(logging.ERROR)
    device = torch.device(device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(device=device, batches=steps, output_dir=output_dir, **settings)
        batch_size = settings["batch"]
        batches = [default_collate([trainer.task.dataset[i] for i in range(k * batch_size, (k + 1) * batch_size)])
                   for k in range(steps)]
        if device.type == "cuda":
            batches = [{**b, "image": b["image"].pin_memory()} for b in batches]
        crops = [sum(len(box) for box in trainer.task.images_and_grids(b, 0)[2]) for b in batches]
        for k in range(warmup):
            trainer.train_step([batches[k % steps]], 0)
        synchronize(device)
        if memory_only:
            resident = reset_peak_rss()
            for b in batches:
                trainer.train_step([b], 0)
            return {"peak_growth_mib": peak_rss_mib() - resident, "peak_total_mib": peak_rss_mib()}

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device) / MIB
        start = time.perf_counter()
        for b in batches:
            trainer.train_step([b], 0)
        synchronize(device)
        elapsed = time.perf_counter() - start
        result = {"images_per_second": steps * batch_size / elapsed, "step_ms": 1000 * elapsed / steps,
                  "crops_per_step": statistics.mean(crops)}
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / MIB
            result.update(peak_total_mib=peak, peak_growth_mib=peak - resident,
                          peak_reserved_mib=torch.cuda.max_memory_reserved(device) / MIB)

        clock = PhaseClock(trainer, device)
        clock.enabled = True
        per_step: list[dict[str, float]] = []
        for b in batches:
            synchronize(device)
            step_start = time.perf_counter()
            trainer.train_step([b], 0)
            synchronize(device)
            per_step.append(clock.phases(step_start, time.perf_counter()))
        clock.enabled = False
        result["phases_ms"] = {name: 1000 * statistics.median(s[name] for s in per_step) for name in PHASES}
        result["profile"] = profile_steps(trainer, batches, device, profile_rows) if profile_rows else None
    return result


def profile_steps(trainer, batches: list[dict], device: torch.device, rows: int) -> list[list]:
    """torch.profiler over the steps: the top ops by self time, per step (ms) and share of the total."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for b in batches:
            trainer.train_step([b], 0)
        synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in profiler.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in events)
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return [[e.key, f"{getattr(e, key) / 1000 / len(batches):.2f}", f"{100 * getattr(e, key) / total:.1f}%",
             f"{e.count / len(batches):g}"] for e in events[:rows]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="model, size, batch and VFM; each can be overridden below")
    parser.add_argument("--model", help="open_clip ViT name (random weights)")
    parser.add_argument("--size", type=int, help="square training input size")
    parser.add_argument("--batch", type=int, help="images per step")
    parser.add_argument("--vfm", help="timm VFM name (random weights)")
    parser.add_argument("--vfm-kwargs", type=json.loads, help="timm.create_model kwargs as JSON")
    parser.add_argument("--construction", default="multi-v")
    parser.add_argument("--gating", default="hsg")
    add_common_arguments(parser)
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                        help="autocast precisions to run")
    parser.add_argument("--checkpointing", nargs="+", choices=("off", "on"), default=["off", "on"],
                        help="activation checkpointing settings to run")
    parser.add_argument("--compile", nargs="+", choices=("off", "on"), default=["off"],
                        help="torch.compile settings to run (student, teacher and VFM)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="profile the first configuration's steps and print its top ROWS ops")
    args = parser.parse_args(argv)
    device = setup(args)
    settings = {key: getattr(args, key) if getattr(args, key) is not None else value
                for key, value in PRESETS[args.preset].items()}
    settings.update(construction=args.construction, gating=args.gating)

    print(f"## Training step: {settings['model']} @{settings['size']}, batch {settings['batch']}, VFM "
          f"{settings['vfm']} {json.dumps(settings['vfm_kwargs'])}, {settings['construction']}/{settings['gating']}, "
          f"{args.device}\n")
    print("\n".join(environment(device)))
    memory = ("CUDA max_memory_allocated during the timed steps (weights, optimizer state, activations); "
              "growth = above what was allocated before them" if device.type == "cuda" else
              "peak RSS of a separate process running the same warm-up and steps (VmHWM, reset after "
              "warm-up; glibc mmap threshold fixed at 128 KiB); growth = above the RSS before the steps")
    print(f"- {args.warmup} warm-up steps, {args.steps} timed steps (images/s), {args.steps} more with a "
          f"synchronize per phase (breakdown, median); random weights, generated images\n- memory: {memory}\n")

    results = []
    for index, (precision, checkpointing, compile_model) in enumerate(
            itertools.product(args.precision, args.checkpointing, args.compile)):
        configuration = dict(device=args.device, warmup=args.warmup, steps=args.steps, precision=precision,
                             checkpointing=checkpointing == "on", compile_model=compile_model == "on", **settings)
        result = in_fresh_process("benchmarks.train_step:run_configuration",
                                  profile_rows=args.profile if index == 0 else 0, **configuration)
        if device.type == "cpu":
            result.update(in_fresh_process("benchmarks.train_step:run_configuration", memory_probe=True,
                                           memory_only=True, **configuration))
        results.append(((precision, checkpointing, compile_model), result))

    rows = []
    for (precision, checkpointing, compile_model), r in results:
        reserved = f"{r['peak_reserved_mib']:.0f}" if "peak_reserved_mib" in r else "-"
        rows.append((precision, checkpointing, compile_model, f"{r['images_per_second']:.2f}", f"{r['step_ms']:.1f}",
                     f"{r['peak_total_mib']:.0f}", f"{r['peak_growth_mib']:.0f}", reserved))
    print(markdown_table(("precision", "checkpointing", "compile", "images/s", "ms/step", "peak MiB",
                          "growth MiB", "reserved MiB"), rows))
    print(f"\nTeacher crops per step: {results[0][1]['crops_per_step']:.1f} (mean over the timed batches)\n")
    breakdown = []
    for (precision, checkpointing, compile_model), r in results:
        total = sum(r["phases_ms"].values())
        breakdown.append((f"{precision}, ckpt {checkpointing}, compile {compile_model}",
                          *(f"{ms:.1f} ({100 * ms / total:.0f}%)" for ms in r["phases_ms"].values()),
                          f"{total:.1f}"))
    print("Per-phase median ms (share of the step):\n")
    print(markdown_table(("configuration", *PHASES, "sum"), breakdown))
    profile = results[0][1]["profile"]
    if profile:
        unit = "self CUDA" if device.type == "cuda" else "self CPU"
        print(f"\ntorch.profiler, first configuration, top {len(profile)} ops by {unit} time:\n")
        print(markdown_table(("op", f"{unit} ms/step", "share", "calls/step"), profile))
    print()
    print("\n".join(target_lines(settings, device, results)))
    return 0


def targets_apply(settings: dict, device: torch.device) -> bool:
    """Whether this is the configuration the issue's training targets name (ViT-B/16 @1024, batch 4, a GPU)."""
    return (settings["model"] == "ViT-B-16" and settings["size"] == 1024 and settings["batch"] == 4
            and device.type == "cuda")


def card_verdict(peak_reserved_mib: float) -> str:
    """Whether a step with this peak reserved CUDA memory fits the 24 GB card (after the CUDA context)."""
    budget = (FIT_CARD_GIB - CUDA_CONTEXT_GIB) * 1024
    verdict = "fits" if peak_reserved_mib <= budget else "does not fit"
    return f"{verdict} a {FIT_CARD_GIB} GB card (<= {budget} MiB after {CUDA_CONTEXT_GIB} GiB CUDA context)"


def target_lines(settings: dict, device: torch.device, results: list) -> list[str]:
    """Where this run stands against the issue's training targets (only for the configuration they name)."""
    if not targets_apply(settings, device):
        return ["Targets (ViT-B/16 @1024, batch 4, one GPU): not applicable to this configuration."]
    lines = []
    for (precision, checkpointing, compile_model), r in results:
        if precision == "bf16":
            verdict = "meets" if r["images_per_second"] >= TARGET_IMAGES_PER_SECOND else "misses"
            lines.append(f"- bf16, ckpt {checkpointing}, compile {compile_model}: {r['images_per_second']:.1f} "
                         f"images/s, {verdict} the target >= {TARGET_IMAGES_PER_SECOND}")
        if checkpointing == "on":
            lines.append(f"- {precision}, ckpt on, compile {compile_model}: peak reserved "
                         f"{r['peak_reserved_mib']:.0f} MiB, {card_verdict(r['peak_reserved_mib'])}")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
