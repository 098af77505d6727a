"""Kill the trainer with SIGKILL mid-run, resume with --resume auto, and get bit-identical final weights."""
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from denserc.cli import main
from denserc.engine.checkpoint import complete_checkpoints
from denserc.engine.metrics import read_metrics

pytestmark = pytest.mark.slow  # whole training runs, one of them killed and resumed

# 16 images, global batch 4 of 2 x 2 accumulated: 4 steps per epoch, 3 epochs, checkpoint every 2 steps
RUN = ["data.num_images=16", "data.image_size=32", "data.grid_max_cells=2", "train.global_batch_size=4",
       "train.batch_size=2", "train.epochs=3", "optim.warmup_steps=3", "train.log_every=1",
       "train.checkpoint_every=2", "train.keep_last=2", "vfm.model_kwargs={depth: 1, embed_dim: 24, num_heads: 2}"]
TOTAL_STEPS = 12


def arguments(output_dir, *extra):
    return ["train", "smoke", *RUN, f"train.output_dir={output_dir}", *extra]


def final_weights(output_dir):
    return load_file(output_dir / "final" / "open_clip_model.safetensors")


def test_sigkill_then_resume_auto_matches_an_uninterrupted_run(tmp_path, caplog):
    straight = tmp_path / "straight"
    assert main(arguments(straight)) == 0

    killed = tmp_path / "killed"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "denserc", *arguments(killed)], env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not complete_checkpoints(killed / "checkpoints") and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    steps_done = [step for step, _ in complete_checkpoints(killed / "checkpoints")]
    assert steps_done and max(steps_done) < TOTAL_STEPS and not (killed / "final").exists()

    with caplog.at_level(logging.INFO, logger="denserc"):
        assert main(arguments(killed, "--resume", "auto")) == 0
    assert f"resumed from {killed / 'checkpoints'}" in caplog.text

    expected, actual = final_weights(straight), final_weights(killed)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert torch.equal(load_file(straight / "final" / "denserc_gate.safetensors")["linear.weight"],
                       load_file(killed / "final" / "denserc_gate.safetensors")["linear.weight"])
    # the metrics read as one run: every step once, the same values
    straight_metrics, resumed_metrics = read_metrics(straight), read_metrics(killed)
    assert [r["step"] for r in resumed_metrics] == list(range(1, TOTAL_STEPS + 1))
    for a, b in zip(straight_metrics, resumed_metrics):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"]


def test_a_finished_run_refuses_a_fresh_start_and_resume_only_exports_again(tmp_path, capsys, caplog):
    output = tmp_path / "run"
    assert main(arguments(output, "train.epochs=1")) == 0
    before = final_weights(output)
    capsys.readouterr()
    assert main(arguments(output, "train.epochs=1")) == 1
    error = capsys.readouterr().err
    assert "already has checkpoints (newest: step 4)" in error and "--resume auto" in error
    with caplog.at_level(logging.INFO, logger="denserc"):
        assert main(arguments(output, "train.epochs=1", "train.log_every=3", "--resume", "auto")) == 0
    assert "at step 4" in caplog.text
    assert "differ from the checkpoint's: train.log_every: 1 -> 3" in caplog.text
    assert all(torch.equal(t, final_weights(output)[n]) for n, t in before.items())
