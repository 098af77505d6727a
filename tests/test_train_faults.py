"""Faults at scale (issue 29), each for the distillation task and a downstream one: a damaged checkpoint, a full
disk while checkpointing (or exporting) and a non-finite loss with F-ViT detection; a rank SIGKILLed under torchrun
with CAT-Seg (F-ViT's SyncBatchNorm needs GPUs under DDP). A NaN on one rank only: the distillation under torchrun.
The mechanisms live in the engine and the checkpoint module; the tests go through the command lines users run."""
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from denserc.catseg.task import CATSegTask
from denserc.cli import main
from denserc.detect.task import DetectionTask
from denserc.train import load_config, setup_distributed
from denserc.engine.checkpoint import (MARKER, TRAINER_STATE, DamagedCheckpointError, complete_checkpoints,
                                      load_checkpoint, resume_checkpoint, save_checkpoint, verify_checkpoint)
from denserc.engine.metrics import read_metrics
from denserc.train.trainer import DistillationTask
from denserc_testbed import catseg_run, write_split
from denserc_testbed.evaluation import CLASS_NAMES_FILE, prepare_split

from helpers import distillation_engine

# Both runs: 1 epoch, global batch 2 = 1 image x 2 accumulated micro-batches, a checkpoint after every step
EVERY_STEP = ["train.epochs=1", "train.global_batch_size=2", "train.batch_size=1", "train.log_every=1",
              "train.checkpoint_every=1", "train.keep_last=8"]
DISTILLATION = ["data.num_images=8", "data.image_size=32", "data.grid_max_cells=2", "optim.warmup_steps=1",
                "vfm.model_kwargs={depth: 1, embed_dim: 24, num_heads: 2}"]
DETECTION = ["detector.rpn_pre_nms=100", "detector.rpn_post_nms=50", "detector.roi_samples=16", "optim.warmup_steps=1"]
POISONED_MICRO_BATCH = 6  # the second micro-batch of step 3


def poison_coherence(inputs):
    """A NaN in the VFM's patch features: L_coherence (and the total) go NaN, L_semantics stays finite."""
    return {**inputs, "vfm_patches": inputs["vfm_patches"] * float("nan")}


def poison_boxes(inputs):
    """A NaN box in the first image's annotations: both box regressions (and the total) go NaN."""
    first = inputs["targets"][0]
    return {**inputs, "targets": [{**first, "boxes": first["boxes"] * float("nan")}, *inputs["targets"][1:]]}


@dataclass
class TaskRun:
    """How to run one task's training command, and what it writes."""
    name: str
    command: list[str]  # the command line before the output folder
    task_class: type
    weights_file: str  # inside a checkpoint
    exported: tuple[str, ...]  # inside final/
    poison: Callable[[dict], dict] | None = None
    poisoned_terms: tuple[str, ...] = ()

    def arguments(self, output_dir, *extra) -> list[str]:
        return [*self.command, *EVERY_STEP, f"train.output_dir={output_dir}", *extra]


DISTILLATION_RUN = TaskRun("distillation", ["train", "smoke", *DISTILLATION], DistillationTask, "student.safetensors",
                           ("open_clip_model.safetensors", "denserc_gate.safetensors"), poison_coherence,
                           ("loss", "loss_coherence"))


@pytest.fixture(scope="module", params=["distillation", "detection"])
def task(request, tmp_path_factory):
    if request.param == "distillation":
        return DISTILLATION_RUN
    root = tmp_path_factory.mktemp("scenes")
    write_split(root, "train", 8, seed=5, progress=False)
    data = [f"data.train_annotations={root}/annotations/instances_train.json", f"data.train_images={root}/train"]
    return TaskRun("detection", ["detect", "train", "fvit_testbed", *data, *DETECTION], DetectionTask,
                   "model.safetensors", ("heads.safetensors",), poison_boxes,
                   ("loss", "loss_box_reg", "loss_rpn_box_reg"))


@pytest.fixture(scope="module")
def straight(task, tmp_path_factory):
    """The output folder of an uninterrupted run (checkpoints after every step, all kept)."""
    output = tmp_path_factory.mktemp(f"straight_{task.name}")
    assert main(task.arguments(output)) == 0
    return output


def copy_of_checkpoints(straight, tmp_path) -> Path:
    """A new output folder holding the straight run's checkpoints (and nothing else)."""
    output = tmp_path / "run"
    shutil.copytree(straight / "checkpoints", output / "checkpoints")
    return output


def assert_same_export(task, expected_run, actual_run):
    for file in task.exported:
        expected, actual = load_file(expected_run / "final" / file), load_file(actual_run / "final" / file)
        assert expected.keys() == actual.keys()
        assert not [name for name in expected if not torch.equal(expected[name], actual[name])], file


def error_line(stderr: str) -> str:
    """The command's one error line (stderr also holds the run's log lines), checked to be the only one."""
    lines = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# ------------------------------------------------------------------------------------------ damaged checkpoints
def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


TRUNCATED = rf"has \d+ bytes, {MARKER} recorded \d+"
ALTERED = f"does not match the SHA-256 {MARKER} recorded"
DAMAGES = {  # what is done to the newest checkpoint -> the file it names, the complaint
    "truncated weights": (lambda task: task.weights_file, truncate, TRUNCATED),
    "truncated trainer state": (lambda task: TRAINER_STATE, truncate, TRUNCATED),
    "flipped byte": (lambda task: task.weights_file, flip_a_byte, ALTERED),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_refused_and_resume_auto_takes_the_newest_intact_one(task, straight, tmp_path,
                                                                                   damage, caplog):
    output = copy_of_checkpoints(straight, tmp_path)
    found = complete_checkpoints(output / "checkpoints")
    (newest_step, newest), (_, previous) = found[-1], found[-2]
    file_of, harm, complaint = DAMAGES[damage]
    harm(newest / file_of(task))
    env = setup_distributed("cpu")

    with pytest.raises(DamagedCheckpointError, match=f"{newest / file_of(task)} {complaint}"):
        load_checkpoint(newest)
    with pytest.raises(DamagedCheckpointError, match=rf"--resume {newest}: damaged checkpoint: .*{complaint}.* "
                                                     r"resume from an older one"):
        resume_checkpoint(output, str(newest), env)
    with caplog.at_level(logging.INFO, logger="denserc"):
        assert resume_checkpoint(output, "auto", env) == previous
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith(f"--resume auto: skipping damaged checkpoint {newest.name} ")
    assert f"{file_of(task)} " in warnings[0] and warnings[0].endswith(f"resuming from {previous.name}")
    # set aside, so that the resumed run writes this step anew and keep-last counts intact checkpoints only
    assert not newest.exists() and (newest.parent / f"{newest.name}.damaged" / file_of(task)).is_file()
    assert [step for step, _ in complete_checkpoints(output / "checkpoints")] == [s for s, _ in found[:-1]]
    assert newest_step == found[-1][0]


def test_resume_auto_refuses_to_start_over_when_every_checkpoint_is_damaged(task, straight, tmp_path):
    output = copy_of_checkpoints(straight, tmp_path)
    found = complete_checkpoints(output / "checkpoints")
    for _, folder in found:
        truncate(folder / TRAINER_STATE)
    with pytest.raises(DamagedCheckpointError, match=f"all {len(found)} checkpoint.s. in .* are damaged"):
        resume_checkpoint(output, "auto", setup_distributed("cpu"))
    assert complete_checkpoints(output / "checkpoints") == found  # nothing renamed


def test_a_truncated_copy_resumes_from_the_checkpoint_before_it_and_ends_like_the_uninterrupted_run(
        task, straight, tmp_path, capsys):
    """The reported case: the newest checkpoint's weights file was truncated after the run (a failed copy)."""
    output = copy_of_checkpoints(straight, tmp_path)
    newest = complete_checkpoints(output / "checkpoints")[-1][1]
    truncate(newest / task.weights_file)
    capsys.readouterr()
    assert main(task.arguments(output, "--resume", str(newest))) != 0
    error = error_line(capsys.readouterr().err)
    assert f"--resume {newest}: damaged checkpoint: {newest / task.weights_file} has " in error
    assert main(task.arguments(output, "--resume", "auto")) == 0
    assert_same_export(task, straight, output)
    verify_checkpoint(newest)  # written anew


# ------------------------------------------------------------------------------------------------- a full disk
def fail_second_trainer_state_write(monkeypatch, error: Exception):
    """``torch.save`` of the second checkpoint's trainer state writes half a file, then raises ``error``."""
    real_save, calls = torch.save, []

    def save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        if f".{TRAINER_STATE}." in Path(path).name:
            calls.append(path)
            if len(calls) == 2:
                truncate(Path(path))
                raise error
    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_how_much_space_is_needed(task, straight, tmp_path,
                                                                                       monkeypatch, capsys):
    output = tmp_path / "run"
    fail_second_trainer_state_write(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    capsys.readouterr()
    assert main(task.arguments(output)) != 0
    error = error_line(capsys.readouterr().err)
    assert f"no space left for checkpoint step 2 in {output / 'checkpoints'} (nothing was published" in error
    needed = float(error.split("it needs about ")[1].split(" MB")[0])  # a few MB here
    first = output / "checkpoints" / "step_000000001"
    size = sum(f.stat().st_size for f in first.iterdir()) / 1e6
    assert 0.9 * size < needed < 1.1 * size, (needed, size)
    assert [step for step, _ in complete_checkpoints(output / "checkpoints")] == [1]
    verify_checkpoint(first)
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == [first.name]  # no staging folder left

    monkeypatch.undo()
    assert main(task.arguments(output, "--resume", "auto")) == 0
    assert_same_export(task, straight, output)


def test_a_full_disk_at_the_export_leaves_no_half_written_final_folder(task, straight, tmp_path, monkeypatch,
                                                                       capsys):
    output = tmp_path / "run"
    real_export = task.task_class.export

    def export_onto_a_full_disk(self, folder):
        real_export(self, folder)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(task.task_class, "export", export_onto_a_full_disk)
    capsys.readouterr()
    assert main(task.arguments(output)) != 0
    error = error_line(capsys.readouterr().err)
    assert f"no space left for the export in {output} (the checkpoints are intact): it needs about " in error
    assert "run again with --resume auto, which exports the last checkpoint" in error
    assert sorted(p.name for p in output.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl"]
    monkeypatch.undo()
    assert main(task.arguments(output, "--resume", "auto")) == 0
    assert_same_export(task, straight, output)


@pytest.mark.parametrize("free_bytes, reported", [(1000, True), (None, False)])
def test_a_write_error_without_errno_counts_as_a_full_disk_only_when_space_is_short(tmp_path, monkeypatch,
                                                                                     free_bytes, reported):
    """On a really full disk ``torch.save`` fails with this RuntimeError (seen on a 1 MB tmpfs), no errno."""
    weights = {"w": torch.zeros(1_000_000)}  # 4 MB
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    fail_second_trainer_state_write(monkeypatch, torch_error)
    save_checkpoint(tmp_path, 1, weights, {"step": 1}, {}, keep_last=2)
    if free_bytes is not None:
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free_bytes))
    expected = (OSError, r"checkpoint step 2 .* it needs about 4.0 MB, 0.0 MB are free") if reported else \
        (RuntimeError, "enforce fail")
    with pytest.raises(expected[0], match=expected[1]):
        save_checkpoint(tmp_path, 2, weights, {"step": 2}, {}, keep_last=2)
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [1]
    assert not list(tmp_path.glob(".step_*"))


# ------------------------------------------------------------------------------------------- a non-finite loss
def poison_one_micro_batch(monkeypatch, task):
    """The task's ``prepare`` returns poisoned inputs for micro-batch ``POISONED_MICRO_BATCH`` of the run."""
    real_prepare, calls = task.task_class.prepare, []

    def prepare(self, batch, epoch):
        calls.append(1)
        inputs = real_prepare(self, batch, epoch)
        return task.poison(inputs) if len(calls) == POISONED_MICRO_BATCH else inputs
    monkeypatch.setattr(task.task_class, "prepare", prepare)


def test_a_non_finite_loss_stops_the_run_before_any_update_or_checkpoint_from_it(task, tmp_path, monkeypatch,
                                                                                 capsys):
    output = tmp_path / "run"
    poison_one_micro_batch(monkeypatch, task)
    steps = []
    handle = register_optimizer_step_pre_hook(lambda *args: steps.append(1))
    capsys.readouterr()
    try:
        assert main(task.arguments(output)) != 0
    finally:
        handle.remove()
    error = error_line(capsys.readouterr().err)
    terms = ", ".join(f"{name}=nan" for name in task.poisoned_terms)
    assert f"step 3 (epoch 0): the loss went non-finite ({terms}, averaged over processes); nothing was " \
           "updated or checkpointed from this step" in error, error
    assert len(steps) == 2  # the optimizer stepped for steps 1 and 2 only
    assert [step for step, _ in complete_checkpoints(output / "checkpoints")] == [1, 2]
    assert [record["step"] for record in read_metrics(output)] == [1, 2]
    assert not (output / "final").exists()


def test_skipping_non_finite_steps_leaves_the_weights_alone_and_counts_them(task, straight, tmp_path, monkeypatch):
    output = tmp_path / "run"
    poison_one_micro_batch(monkeypatch, task)
    assert main(task.arguments(output, "train.on_nonfinite=skip")) == 0

    records, straight_records = read_metrics(output), read_metrics(straight)
    assert [r["step"] for r in records] == [r["step"] for r in straight_records]
    assert [r["nonfinite_skipped"] for r in records[:4]] == [0, 0, 1, 1] and records[-1]["nonfinite_skipped"] == 1
    assert "loss" not in records[2] and all("loss" in r for r in records[:2] + records[3:])
    assert [r["lr"] for r in records] == [r["lr"] for r in straight_records]  # the schedule moved on
    assert records[:2] == [{**r, "nonfinite_skipped": 0, "images_per_second": records[i]["images_per_second"]}
                           for i, r in enumerate(straight_records[:2])]

    checkpoint = {step: load_checkpoint(folder) for step, folder in complete_checkpoints(output / "checkpoints")}
    (before, _), (skipped, state), (after, _) = checkpoint[2], checkpoint[3], checkpoint[4]
    assert all(torch.equal(before[name], skipped[name]) for name in before)  # no update, no weight decay
    assert any(not torch.equal(skipped[name], after[name]) for name in skipped)  # the next step trains
    assert state["nonfinite_skipped"] == 1 and state["scheduler"]["last_epoch"] == 3


def test_on_nonfinite_takes_stop_or_skip(task, tmp_path, capsys):
    capsys.readouterr()
    assert main(task.arguments(tmp_path / "run", "train.on_nonfinite=ignore")) != 0
    assert "train.on_nonfinite: must be one of ['stop', 'skip'], got 'ignore'" in error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------------------------- a killed rank
# torchrun runs this once per attempt on each of 2 processes, launched as docs/training.md says: with
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, else a restarted group meets keys of the failed one in the agent's store and
# hangs or fails to connect (pytorch/pytorch#135712; seen here with torch 2.14.1). A fault "kill:N" makes rank 1 of
# the first attempt SIGKILL itself inside step N's first forward pass (rank 0 is then in the same step, its gradient
# all-reduce waiting for rank 1); "nan:N" makes rank 1's loss NaN in step N (rank 0's stays finite).
WORKER = textwrap.dedent("""
    import ctypes
    import os
    import signal
    import sys

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the agent (workers have their own session)
    from denserc.cli import main
    from denserc.engine.loop import Engine

    (fault, at_step), command = sys.argv[1].split(":"), sys.argv[2:]
    hooks = {"kill": lambda module, args, output: os.kill(os.getpid(), signal.SIGKILL),
             "nan": lambda module, args, output: {**output, "loss": output["loss"] * float("nan")}}
    if fault in hooks and os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        train_step = Engine.train_step

        def faulty_train_step(self, micro_batches, epoch, measure_grad_norm=False):
            if self.step + 1 != int(at_step):
                return train_step(self, micro_batches, epoch, measure_grad_norm)
            hook = self.task.module.register_forward_hook(hooks[fault])
            try:
                return train_step(self, micro_batches, epoch, measure_grad_norm)
            finally:
                hook.remove()
        Engine.train_step = faulty_train_step
    if fault == "nan":  # let each rank finish its own exit, not be stopped by the agent once the other has ended
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    status = main(command)
    print(f"rank {os.environ['RANK']} exits with {status}", flush=True)
    sys.exit(status)
""")
# Two processes x 1 image x 2 micro-batches = global batch 4, 6 steps, a checkpoint after each (distillation: 2 steps
# per epoch x 3 epochs; CAT-Seg: 6 iterations in its one epoch). Rank 1 is killed in step 4, so the group resumes
# from step 3, in the middle of an epoch.
TWO_RANKS = ["train.global_batch_size=4", "--resume", "auto"]
KILL_AT_STEP = 4
TORCHRUN_TIMEOUT_S = 240


@pytest.fixture(scope="module", params=["distillation", "catseg"])
def restartable(request, tmp_path_factory) -> tuple[TaskRun, list[str]]:
    """A task that runs on 2 CPU processes, and its overrides for 6 steps."""
    if request.param == "distillation":
        return DISTILLATION_RUN, ["train.epochs=3"]
    root = tmp_path_factory.mktemp("catseg_scenes")
    prepare_split(root, 1, seed=5, progress=False)  # the class names file
    write_split(root, catseg_run.TRAIN_SPLIT, 8, seed=7, progress=False)
    command = ["catseg", "train", str(catseg_run.CONFIG), f"data.root={root}",
               f"data.class_names={root / CLASS_NAMES_FILE}", f"data.held_out={catseg_run.HELD_OUT}"]
    return TaskRun("catseg", command, CATSegTask, "model.safetensors",
                   ("catseg_head.safetensors", "clip/open_clip_model.safetensors")), ["iterations=6"]


def torchrun(script: Path, fault: str, arguments: list[str], max_restarts: int = 1) -> tuple[int, str]:
    """Run WORKER under `torchrun --standalone --nproc_per_node 2 --max-restarts N` (a free port, gloo on the CPU);
    its exit status and output. The launch runs in its own process group and its workers die with it (WORKER),
    all killed if it outlives the timeout."""
    process = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts",
         str(max_restarts), "--monitor-interval", "0.1", str(script), fault, *arguments],
        env={**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TORCHRUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"torchrun did not finish within {TORCHRUN_TIMEOUT_S} s:\n{output[-3000:]}")
    return process.returncode, output


@pytest.mark.parametrize("share_store, warned", [("1", False), ("0", True)])
def test_restarts_with_torchrun_s_shared_store_are_warned_of(tmp_path, monkeypatch, caplog, share_store, warned):
    """What torchrun --max-restarts 1 exports to its workers, with and without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1."""
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False" if share_store == "1" else "True")
    with caplog.at_level(logging.WARNING, logger="denserc"):
        distillation_engine(load_config("smoke", [*DISTILLATION, *EVERY_STEP]), setup_distributed("cpu"), tmp_path)
    assert ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in caplog.text) == warned, caplog.text


@pytest.mark.slow
def test_torchrun_restarts_the_group_after_a_rank_is_killed_and_ends_like_the_uninterrupted_run(restartable,
                                                                                                  tmp_path):
    task, six_steps = restartable
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    status, output = torchrun(script, "none:0", task.arguments(tmp_path / "straight", *six_steps, *TWO_RANKS))
    assert status == 0, output[-3000:]
    status, output = torchrun(script, f"kill:{KILL_AT_STEP}",
                              task.arguments(tmp_path / "killed", *six_steps, *TWO_RANKS))
    assert status == 0, output[-3000:]
    assert "failed (exitcode: -9) local_rank: 1" in output, output[-3000:]  # the agent saw the SIGKILL
    resumed = tmp_path / "killed" / "checkpoints" / f"step_{KILL_AT_STEP - 1:09d}"
    assert f"resumed from {resumed} at step {KILL_AT_STEP - 1}" in output, output[-3000:]
    assert_same_export(task, tmp_path / "straight", tmp_path / "killed")
    straight_records, killed_records = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
    assert [r["step"] for r in killed_records] == [r["step"] for r in straight_records] == list(range(1, 7))
    assert [r["loss"] for r in killed_records] == [r["loss"] for r in straight_records]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_non_finite_loss_on_one_rank_is_acted_on_by_every_rank(tmp_path, policy):
    """Rank 1's loss goes NaN in step 3, rank 0's does not: both stop at that step (no rank left waiting in a
    collective), or both skip it and stay identical."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    output_dir = tmp_path / "run"
    arguments = DISTILLATION_RUN.arguments(output_dir, "train.epochs=3", f"train.on_nonfinite={policy}", *TWO_RANKS)
    status, output = torchrun(script, "nan:3", arguments, max_restarts=0)
    checkpoints = complete_checkpoints(output_dir / "checkpoints")
    if policy == "stop":
        assert status != 0
        error = "denserc train: error: step 3 (epoch 1): the loss went non-finite (loss=nan, averaged over processes)"
        assert output.count(error) == 2, output[-3000:]  # from each rank (a line may start after rank 0's tqdm bar)
        assert "rank 0 exits with 1" in output and "rank 1 exits with 1" in output  # rank 0's loss was finite
        assert [step for step, _ in checkpoints] == [1, 2]
        return
    assert status == 0, output[-3000:]
    assert [r["nonfinite_skipped"] for r in read_metrics(output_dir)] == [0, 0, 1, 1, 1, 1]
    weights = {step: load_checkpoint(folder)[0] for step, folder in checkpoints}
    assert all(torch.equal(weights[2][name], weights[3][name]) for name in weights[2])
