"""Two processes under torchrun (gloo, CPU): gradients are all-reduced inside DDP, ranks stay identical,
and the `denserc train` command logs, checkpoints and exports from rank 0."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from denserc.cli import main
from denserc.train import load_config, setup_distributed
from denserc.engine.metrics import read_metrics

from helpers import distillation_engine

pytestmark = pytest.mark.slow  # a 2-process torchrun launch

# 2 processes x 2 images = global batch 4; the single-process reference takes 2 images per step
TINY_RUN = ["data.num_images=8", "data.image_size=32", "data.grid_max_cells=2", "train.batch_size=2",
        "train.epochs=1", "optim.warmup_steps=0", "optim.lr=1e-3", "train.log_every=1",
        "vfm.model_kwargs={depth: 1, embed_dim: 24, num_heads: 2}"]

# One launch, two jobs: a single DDP step whose batch, gradients and weights each rank saves,
# then the real command line (`denserc train ...`) in the same two processes.
WORKER = textwrap.dedent("""
    import sys
    import torch
    from denserc.cli import main
    from denserc.engine.loop import Engine
    from denserc.train import load_config, setup_distributed
    from denserc.train.trainer import DistillationTask

    output, command = sys.argv[1], sys.argv[2:]
    overrides = [a for a in command[2:] if not a.startswith("train.output_dir=")]
    env = setup_distributed("cpu")
    config = load_config("smoke", overrides)
    trainer = Engine(DistillationTask(config, env), config, env, output)
    trainer.sampler.set_epoch(0)
    batch = next(iter(trainer.loader()))
    gradients = {}
    trainer.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: gradients.update(
        {n: p.grad.clone() for n, p in trainer.task.student.named_parameters() if p.grad is not None}))
    trainer.train_step([batch], epoch=0)
    weights = {n: p.detach().clone() for n, p in trainer.task.student.named_parameters()}
    torch.save({"batch": batch, "gradients": gradients, "weights": weights}, f"{output}/rank{env.rank}.pt")
    sys.exit(main(command))
""")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """The output folder of one 2-process torchrun launch of WORKER."""
    output = tmp_path_factory.mktemp("ddp")
    script = output / "worker.py"
    script.write_text(WORKER)
    command = ["train", "smoke", *TINY_RUN, "train.global_batch_size=4", "train.checkpoint_every=1",
               f"train.output_dir={output / 'run'}"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(output), *command], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def single_process_step(tmp_path, batch):
    """Gradients and weights after one step of a fresh single-process trainer on ``batch``."""
    trainer = distillation_engine(load_config("smoke", [*TINY_RUN, "train.global_batch_size=2"]), setup_distributed("cpu"),
                      tmp_path / "single")
    gradients = {}
    trainer.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: gradients.update(
        {n: p.grad.clone() for n, p in trainer.task.student.named_parameters() if p.grad is not None}))
    trainer.train_step([batch], epoch=0)
    return gradients, {n: p.detach().clone() for n, p in trainer.task.student.named_parameters()}


def test_one_ddp_step_averages_gradients_and_keeps_ranks_identical(ddp_run, tmp_path):
    ranks = [torch.load(ddp_run / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert set(ranks[0]["batch"]["index"].tolist()).isdisjoint(ranks[1]["batch"]["index"].tolist())
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), name

    single = [single_process_step(tmp_path, rank["batch"]) for rank in ranks]
    assert ranks[0]["gradients"].keys() == single[0][0].keys()
    for name, gradient in ranks[0]["gradients"].items():
        average = (single[0][0][name] + single[1][0][name]) / 2
        torch.testing.assert_close(gradient, average, rtol=1e-4, atol=1e-7, msg=name)
    rank0_data_only = single[0][1]
    changed = [n for n in rank0_data_only if not torch.equal(rank0_data_only[n], ranks[0]["weights"][n])]
    trained = single[0][0].keys()  # the tensors that received a gradient: the blocks on the dense path and the gate
    assert "gate.linear.weight" in changed and set(changed) <= trained and len(changed) > len(trained) // 2


def test_torchrun_command_logs_checkpoints_and_exports_from_rank_zero(ddp_run):
    output = ddp_run / "run"
    assert [r["step"] for r in read_metrics(output)] == [1, 2]  # once per step, not once per rank
    checkpoints = sorted(p.name for p in (output / "checkpoints").iterdir())
    assert checkpoints == ["step_000000001", "step_000000002"]
    exported = load_file(output / "final" / "open_clip_model.safetensors")
    last = load_file(output / "checkpoints" / "step_000000002" / "student.safetensors")
    assert all(torch.equal(t, last[f"clip.{n}"]) for n, t in exported.items())
    # the 2-process checkpoint resumes in one process (same global batch) and re-exports the same weights
    assert main(["train", "smoke", *TINY_RUN, "train.global_batch_size=4", f"train.output_dir={output}",
                 "--resume", "auto"]) == 0
    again = load_file(output / "final" / "open_clip_model.safetensors")
    assert all(torch.equal(t, again[n]) for n, t in exported.items())
