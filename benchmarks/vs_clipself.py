"""DenseRC's training step beside CLIPSelf's own, on identical work, in interleaved rounds.

CLIPSelf (Wu et al., ICLR 2024; github.com/wusize/CLIPSelf) is the peer whose ``x+v`` construction
DenseRC's Table 5 starts from. This benchmark runs its real training step from a checkout given with
``--clipself PATH`` (nothing of it is copied here): ``training.train.train_one_epoch`` over one batch,
with ``training.clipself.CLIPSelf`` as the method, its open_clip fork's ``ViT-B-16`` as student and
teacher (``dist_model``), its AdamW groups and ``cosine_lr`` schedule as its ``training/main.py``
builds them. Beside it run DenseRC's ``Engine.train_step`` with ``x+v`` (CLIPSelf's construction: the
same method, so the ratio isolates the implementation) and with the default ``multi-v/hsg``.

Identical work per step: the same open_clip ViT config with random weights, ``--size`` px images,
``--batch`` images, a fixed ``--grid`` x ``--grid`` grid per image (so the same teacher crops), fp32,
the whole image tower training, no VFM (DenseRC's coherence weight 0; CLIPSelf has none), no gradient
clipping and no logging on the step (CLIPSelf runs as a non-master rank, which skips its logging;
DenseRC's step is not a logging step). CLIPSelf's data loader cuts the crops with PIL and ships them,
so its step starts from ready crops, while DenseRC's step cuts them from the batch tensor: that cost
is inside DenseRC's teacher phase and not in CLIPSelf's.

Each side lives in its own long-lived worker process (spawned, so CLIPSelf's open_clip fork and
DenseRC's open_clip never meet in one interpreter), builds its models once (not timed) and warms up;
then the main process asks each worker in turn for one step, starting each round at a different
side. Ratios are medians over rounds of DenseRC's time / CLIPSelf's time in the same round, with
quartiles; per phase as well as per step. ``--max-minutes`` ends the rounds early (after at least two)
on a machine too busy for all of them. Peak memory is each worker's peak resident set over its whole
life (building, warm-up and the timed steps: weights, optimizer state, activations, the interpreter and
libraries). A ViT-B step takes a minute or more on one shared core, so there is no separate
memory-probe process per side as in ``benchmarks.train_step``, which would double every step's time.

``--family eva`` compares EVA-02-CLIP, the backbone of CLIPSelf's and DeCLIP's detection results:
CLIPSelf's own EVA-CLIP code (``src/open_clip/eva_clip/``, ``EVA02-CLIP-B-16``: RoPE, sub-LN, SwiGLU,
separate q/k/v) against DenseRC's ``EVA02-B-16`` (open_clip over timm's ``Eva``). Its config asks for
xformers attention and apex's fused LayerNorm (``xattn``, ``fusedLN``), neither installed here: both are
switched off, so its attention is its plain ``softmax(q k^T) v`` path and its norms are torch's (DenseRC's
side has neither option: SDPA and torch norms). The CLIPSelf worker's initial weights are passed to
DenseRC's worker through ``denserc.models.convert`` (the peers' EVA-CLIP layout), so both train the same
weights.

CLIPSelf's fork imports ``einops`` (``pip install einops``, or ``pip install --target DIR einops`` and
``PYTHONPATH=DIR``); nothing else outside this project's environment.

    git clone https://github.com/wusize/CLIPSelf /tmp/CLIPSelf
    python -m benchmarks.vs_clipself --clipself /tmp/CLIPSelf --threads 1
    python -m benchmarks.vs_clipself --clipself /tmp/CLIPSelf --threads 1 --family eva
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import distillation_engine, environment, markdown_table, paired_ratios, peak_rss_mib, quartiles, setup

CLIPSELF = "CLIPSelf"
OURS = {"DenseRC x+v": ("x+v", "none"), "DenseRC multi-v/hsg": ("multi-v", "hsg")}
PHASES = ("batch to device (+ grids)", "teacher (crops +) forward", "student forward", "loss", "backward",
          "optimizer step", "other")
TARGET_DEFAULT = 0.9  # DenseRC's default step <= 0.9x CLIPSelf's (issue 17)
TARGET_XV = 1.0  # x+v below 1
# per family: (CLIPSelf's model name, DenseRC's) by default
FAMILIES = {"openai": ("ViT-B-16", "ViT-B-16"), "eva": ("EVA02-CLIP-B-16", "EVA02-B-16")}


class Marks:
    """Timestamps of named points inside one step, from wrappers and optimizer hooks (CPU: no synchronize)."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.times[name] = time.perf_counter()

    def wrap(self, function, name: str):
        def marked(*args, **kwargs):
            self.mark(f"{name} start")
            result = function(*args, **kwargs)
            self.mark(f"{name} end")
            return result
        return marked

    def hook_optimizer(self, optimizer) -> None:
        optimizer.register_step_pre_hook(lambda *_: self.mark("optimizer start"))
        optimizer.register_step_post_hook(lambda *_: self.mark("optimizer end"))

    def span(self, start: str, end: str) -> float:
        return self.times[end] - self.times[start]


def phase_times(marks: Marks, step_seconds: float, prepare: str, teacher: str, student: str,
                loss_end: str) -> dict[str, float]:
    """Seconds per PHASES entry (and the whole step) from the marks of one step."""
    times = {
        PHASES[0]: marks.span(f"{prepare} start", f"{prepare} end"),
        PHASES[1]: marks.span(f"{teacher} start", f"{teacher} end"),
        PHASES[2]: marks.span(f"{student} start", f"{student} end"),
        PHASES[3]: marks.span(f"{student} end", loss_end),
        PHASES[4]: marks.span(loss_end, "optimizer start"),
        PHASES[5]: marks.span("optimizer start", "optimizer end"),
    }
    times[PHASES[6]] = step_seconds - sum(times.values())
    return {**times, "step": step_seconds}


# ---------------------------------------------------------------------------------- the two sides
def build_clipself(*, clipself: str, clipself_model: str, size: int, batch: int, grid: int, batches: int,
                   family: str, weights_file: str, **_):
    """CLIPSelf's step as ``step()`` -> phase seconds: its own ``train_one_epoch`` on one batch. Its initial
    weights are saved to ``weights_file`` for DenseRC's worker."""
    source = Path(clipself) / "src"
    if not (source / "training" / "clipself.py").is_file():
        raise SystemExit(f"--clipself {clipself}: expected a CLIPSelf checkout with src/training/clipself.py")
    sys.path.insert(0, str(source))  # its open_clip fork, not the installed open_clip
    with contextlib.redirect_stdout(sys.stderr):  # its notes on optional packages, not into the report
        import open_clip
        from training.clipself import CLIPSelf
        from training.scheduler import cosine_lr
        from training.train import train_one_epoch
    if not str(Path(open_clip.__file__).resolve()).startswith(str(source.resolve())):
        raise RuntimeError(f"imported {open_clip.__file__}, not CLIPSelf's fork under {source}")

    torch.manual_seed(0)
    with contextlib.redirect_stdout(sys.stderr):
        if family == "eva":
            from open_clip import eva_clip
            from open_clip.eva_clip import factory
            for tower in ("vision_cfg", "text_cfg"):  # no xformers, no apex here (module docstring)
                factory._MODEL_CONFIGS[clipself_model][tower].update(xattn=False, fusedLN=False)
            student, teacher = (eva_clip.create_model(clipself_model, pretrained=None, force_custom_clip=True)
                                for _ in range(2))
        else:
            student = open_clip.create_model(clipself_model, None, output_dict=True)
            teacher = open_clip.create_model(clipself_model, None, output_dict=True)
    teacher.load_state_dict(student.state_dict())  # both start from the same CLIP, as in CLIPSelf
    torch.save({"state_dict": student.state_dict()}, weights_file)
    # its main.py: AdamW, no weight decay on gains and biases
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    exclude = [p for n, p in named if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n]
    rest = [p for n, p in named if all(p is not q for q in exclude)]
    optimizer = torch.optim.AdamW([{"params": exclude, "weight_decay": 0.0}, {"params": rest, "weight_decay": 0.1}],
                                  lr=1e-5, betas=(0.9, 0.98), eps=1e-6)
    args = argparse.Namespace(device="cpu", precision="fp32", accum_freq=1, skip_scheduler=False, horovod=False,
                              grad_clip_norm=None, log_every_n_steps=50, batch_size=batch, world_size=1,
                              distributed=False, multiscale=False, extract_type="v2", cosine_weight=1.0,
                              rank=1)  # a non-master rank: no logging on the step
    scheduler = cosine_lr(optimizer, 1e-5, 1000, 100_000)

    native = student.visual.image_size  # EVA-CLIP's tower has it too
    native = (native, native) if isinstance(native, int) else tuple(native)
    cells = torch.linspace(0, 1, grid + 1)
    boxes = torch.tensor([[cells[c], cells[r], cells[c + 1], cells[r + 1], 1.0]
                          for r in range(grid) for c in range(grid)])
    generator = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch, 3, size, size, generator=generator), boxes.expand(batch, -1, -1).clone(),
             torch.randn(batch, grid * grid, 3, *native, generator=generator)) for _ in range(batches)]

    marks = Marks()
    teacher.encode_image = marks.wrap(teacher.encode_image, "teacher")
    student.encode_pseudo_boxes = marks.wrap(student.encode_pseudo_boxes, "student")
    method = marks.wrap(CLIPSelf(), "method")
    marks.hook_optimizer(optimizer)
    counter = iter(range(10 ** 9))

    class OneBatch:  # what train_one_epoch reads of its data['train']
        def __init__(self, batch_data):
            self.dataloader = _Loader([batch_data])

        def set_epoch(self, epoch):
            pass

    def step() -> dict[str, float]:
        index = next(counter)
        start = time.perf_counter()
        train_one_epoch(student, method, {"train": OneBatch(data[index % batches])}, None, index, optimizer, None,
                        scheduler, teacher, args)
        seconds = time.perf_counter() - start
        # CLIPSelf's batch-to-device part is the method's start up to the teacher's call
        marks.times["prepare start"], marks.times["prepare end"] = marks.times["method start"], \
            marks.times["teacher start"]
        return phase_times(marks, seconds, "prepare", "teacher", "student", "method end")
    return step


class _Loader(list):
    """A list of batches with the two counts ``train_one_epoch`` reads off CLIPSelf's loader."""

    @property
    def num_batches(self) -> int:
        return len(self)

    @property
    def num_samples(self) -> int:
        return len(self) * len(self[0][0])


def build_ours(*, construction: str, gating: str, model: str, size: int, batch: int, grid: int, batches: int,
               output_dir: str, weights_file: str, **_):
    """DenseRC's ``Engine.train_step`` as ``step()`` -> phase seconds, on a fixed grid and without a VFM,
    from the CLIPSelf worker's initial weights."""
    import denserc.data.regions
    from denserc.data import grid_boxes
    from denserc.distributed import DistributedEnv
    from denserc.models.convert import convert_checkpoint
    from denserc.models.serialization import CLIP_WEIGHTS
    from torch.utils.data import default_collate

    # only the CLIP weights file is read from the folder; the trainer builds its own construction on it
    initial = convert_checkpoint(weights_file, Path(output_dir) / "initial", model, construction="x+v").directory
    converted = str(initial / CLIP_WEIGHTS)

    # every image gets the same grid (the benchmark's identical work), not a random one
    denserc.data.regions.sample_grid_boxes = lambda indices, sizes, **_: [
        grid_boxes(grid, grid, height, width) for height, width in torch.as_tensor(sizes).tolist()]
    raw = {
        # the whole image tower trains, as on CLIPSelf's side here (RESULTS.md section 6's note)
        "model": {"name": model, "pretrained": converted, "construction": construction, "gating": gating,
                  "train_stem_and_head": True},
        "loss": {"coherence_weight": 0.0},
        "data": {"type": "generated", "num_images": batches * batch, "image_size": size, "num_workers": 0},
        "train": {"global_batch_size": batch, "batch_size": batch, "precision": "fp32", "device": "cpu",
                  "log_every": 10 ** 9},
    }
    env = DistributedEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    trainer = distillation_engine(raw, env, output_dir)
    task = trainer.task
    data = [default_collate([task.dataset[i] for i in range(k * batch, (k + 1) * batch)]) for k in range(batches)]

    marks = Marks()
    task.images_and_grids = marks.wrap(task.images_and_grids, "prepare")
    task.embed_crops = marks.wrap(task.embed_crops, "teacher")
    task.module.encode = marks.wrap(task.module.encode, "student")
    task.module.register_forward_hook(lambda *_: marks.mark("module end"))
    marks.hook_optimizer(trainer.optimizer)
    counter = iter(range(10 ** 9))

    def step() -> dict[str, float]:
        start = time.perf_counter()
        trainer.train_step([data[next(counter) % batches]], 0)
        return phase_times(marks, time.perf_counter() - start, "prepare", "teacher", "student", "module end")
    return step


def build_side(side: str, settings: dict, output_dir: str):
    if side == CLIPSELF:
        return build_clipself(**settings)
    construction, gating = OURS[side]
    return build_ours(construction=construction, gating=gating, output_dir=output_dir, **settings)


# ---------------------------------------------------------------------------------------- workers
def serve(side: str, settings: dict, threads: int, warmup: int, connection) -> None:
    """Worker process: build the side, warm up, then per request run one step ("step") or report the
    process's peak RSS in MiB ("memory"), until told to stop."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as output_dir:
        try:
            step = build_side(side, settings, output_dir)
            for _ in range(warmup):
                step()
            connection.send(("ready", None))
        except BaseException as error:
            connection.send(("error", f"{type(error).__name__}: {error}"))
            raise
        while (request := connection.recv()) in ("step", "memory"):
            if request == "memory":
                connection.send(("memory", peak_rss_mib()))
            else:
                connection.send(("step", step()))


def interleaved_rounds(sides: list[str], settings: dict, *, threads: int, warmup: int, rounds: int,
                       max_seconds: float) -> tuple[dict[str, list[dict[str, float]]], dict[str, float]]:
    """Per side, the phase seconds of each round's step, and the worker's peak RSS (MiB).

    One worker per side; one step runs at a time. Rounds stop at ``rounds``, or once ``max_seconds``
    have passed since the first round started (never before two rounds).
    """
    context = multiprocessing.get_context("spawn")
    workers = {}

    def start(side: str) -> None:
        mine, theirs = context.Pipe()
        process = context.Process(target=serve, args=(side, settings, threads, warmup, theirs), daemon=True)
        process.start()
        workers[side] = (process, mine)

    def wait(side: str) -> None:
        kind, message = workers[side][1].recv()
        if kind == "error":
            raise RuntimeError(f"the {side} worker failed to start: {message}")
    try:
        start(sides[0])  # CLIPSelf's worker writes the initial weights the others load
        wait(sides[0])
        for side in sides[1:]:  # then the others, built side by side
            start(side)
        for side in sides[1:]:
            wait(side)
        results: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
        started = time.perf_counter()
        for round_index in range(rounds):
            if round_index >= 2 and time.perf_counter() - started > max_seconds:
                break
            shift = round_index % len(sides)
            for side in sides[shift:] + sides[:shift]:
                connection = workers[side][1]
                connection.send("step")
                results[side].append(connection.recv()[1])
            print(f"round {round_index + 1}: " + ", ".join(f"{side} {results[side][-1]['step']:.1f} s"
                                                          for side in sides), file=sys.stderr, flush=True)
        peaks = {}
        for side in sides:
            workers[side][1].send("memory")
            peaks[side] = workers[side][1].recv()[1]
        return results, peaks
    finally:
        for process, connection in workers.values():
            if process.is_alive():
                connection.send("stop")
            process.join(timeout=60)


# ----------------------------------------------------------------------------------------- report
def ratio_cell(times: list[float], reference: list[float]) -> str:
    ratios = paired_ratios(times, reference)
    low, high = quartiles(ratios)
    return f"{statistics.median(ratios):.3f} ({low:.3f}-{high:.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vs_clipself", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clipself", required=True, help="path to a checkout of github.com/wusize/CLIPSelf")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="openai",
                        help="openai: open_clip ViT-B-16 on both sides; eva: CLIPSelf's EVA02-CLIP-B-16 vs DenseRC's "
                             "EVA02-B-16")
    parser.add_argument("--model", default=None, help="DenseRC's open_clip model (default: the family's B/16)")
    parser.add_argument("--clipself-model", default=None, help="CLIPSelf's model (default: the family's B/16)")
    parser.add_argument("--size", type=int, default=448, help="square training input size")
    parser.add_argument("--batch", type=int, default=2, help="images per step")
    parser.add_argument("--grid", type=int, default=4, help="a fixed GRID x GRID grid of teacher crops per image")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timed rounds (one step per side)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--max-minutes", type=float, default=float("inf"),
                        help="start no round after this many minutes of rounds (at least 2 rounds run)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of every worker")
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)  # CPU only (CLIPSelf's step is fp32)
    args = parser.parse_args(argv)
    if args.device != "cpu":
        raise SystemExit("--device: this comparison runs on the CPU only")
    if args.rounds < 2:
        raise SystemExit(f"--rounds must be at least 2 (quartiles), got {args.rounds}")
    device = setup(args)
    clipself_model, model = FAMILIES[args.family]
    args.model, args.clipself_model = args.model or model, args.clipself_model or clipself_model
    weights = tempfile.NamedTemporaryFile(suffix=".pt", delete=False)
    settings = {"clipself": str(Path(args.clipself).resolve()), "model": args.model,
                "clipself_model": args.clipself_model, "family": args.family, "size": args.size,
                "batch": args.batch, "grid": args.grid, "batches": 2, "weights_file": weights.name}
    sides = [CLIPSELF, *OURS]

    print(f"## DenseRC vs CLIPSelf training step: {args.model} (CLIPSelf: {args.clipself_model}) @{args.size}, "
          f"batch {args.batch}, "
          f"{args.grid}x{args.grid} grid ({args.batch * args.grid ** 2} teacher crops), fp32, cpu\n")
    print("\n".join(environment(device)))
    print(f"- CLIPSelf: {settings['clipself']} at commit {_commit(args.clipself)}")

    results, peaks = interleaved_rounds(sides, settings, threads=args.threads, warmup=args.warmup,
                                        rounds=args.rounds, max_seconds=60 * args.max_minutes)
    rounds = len(results[CLIPSELF])

    print(f"- {args.warmup} warm-up steps per side, then {rounds} interleaved rounds of one step per side "
          f"(long-lived worker per side); ratio = median over rounds of DenseRC / CLIPSelf in the same round "
          f"(quartiles); memory: peak RSS of each worker process over its life (build, warm-up, timed steps)\n")
    reference = [r["step"] for r in results[CLIPSELF]]
    rows = []
    for side in sides:
        times = [r["step"] for r in results[side]]
        ratio = "1" if side == CLIPSELF else ratio_cell(times, reference)
        rows.append((side, f"{1000 * statistics.median(times):.0f}", ratio, f"{peaks[side]:.0f}"))
    print(markdown_table(("step", "median ms", "time / CLIPSelf (quartiles)", "peak RSS MiB"), rows))

    print("\nPer phase: median ms, and DenseRC / CLIPSelf per round (quartiles):\n")
    phase_rows = []
    for phase in (*PHASES, "step"):
        clipself_times = [r[phase] for r in results[CLIPSELF]]
        cells = [f"{1000 * statistics.median(clipself_times):.0f}"]
        for side in OURS:
            times = [r[phase] for r in results[side]]
            cells += [f"{1000 * statistics.median(times):.0f}", ratio_cell(times, clipself_times)]
        phase_rows.append((phase, *cells))
    headers = ["phase", "CLIPSelf ms"]
    for side in OURS:
        headers += [f"{side} ms", "ratio"]
    print(markdown_table(headers, phase_rows))

    default, xv = ("DenseRC multi-v/hsg", TARGET_DEFAULT), ("DenseRC x+v", TARGET_XV)
    print()
    for (side, target), strict in ((default, False), (xv, True)):
        ratio = statistics.median(paired_ratios([r["step"] for r in results[side]], reference))
        met = ratio < target if strict else ratio <= target
        print(f"{side}: {ratio:.3f}x CLIPSelf's step; target {'<' if strict else '<='} {target}: "
              f"{'met' if met else 'NOT met'}")
    return 0


def _commit(path: str) -> str:
    import subprocess
    result = subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False)
    return result.stdout.strip() or "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
