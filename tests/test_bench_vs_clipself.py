"""The CLIPSelf comparison's DenseRC side: identical work (fixed grid, no VFM) and phases read off the real step.

CLIPSelf's side needs a checkout of its repository, which tests cannot fetch; `benchmarks/RESULTS.md`
records a run."""
import sys
from pathlib import Path

import pytest
import torch

import denserc
import denserc.data.regions
import denserc.train.trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not part of the package
from benchmarks.vs_clipself import PHASES, build_clipself, build_ours  # noqa: E402

from helpers import TINY  # noqa: E402

pytestmark = pytest.mark.slow  # benchmark helper


def test_our_side_runs_a_fixed_grid_without_a_vfm_and_its_phases_add_up_to_the_step(tmp_path, monkeypatch):
    monkeypatch.setattr(denserc.data.regions, "sample_grid_boxes", denserc.data.regions.sample_grid_boxes)
    crops = []
    monkeypatch.setattr(denserc.train.trainer.Teacher, "encode",
                        lambda self, chunk, workspace=None, original=denserc.train.trainer.Teacher.encode:
                        crops.append(len(chunk)) or original(self, chunk, workspace))
    monkeypatch.setattr(denserc.train.trainer, "VFM", lambda *a, **k: pytest.fail("a VFM was built"))
    torch.manual_seed(0)
    clipself_side = denserc.create_model(TINY).clip  # what the CLIPSelf worker would hand over (open_clip layout)
    torch.save({"state_dict": clipself_side.state_dict()}, tmp_path / "initial.pt")
    step = build_ours(construction="x+v", gating="none", model=TINY, size=64, batch=2, grid=3, batches=2,
                      output_dir=str(tmp_path / "run"), weights_file=str(tmp_path / "initial.pt"))
    first, second = step(), step()
    assert crops == [18, 18]  # 2 images x 3 x 3 cells, every step
    for phases in (first, second):
        assert tuple(phases) == (*PHASES, "step")
        assert all(phases[name] > 0 for name in PHASES[:-1])
        assert sum(phases[name] for name in PHASES) == pytest.approx(phases["step"])


def test_a_folder_that_is_not_a_clipself_checkout_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="expected a CLIPSelf checkout with src/training/clipself.py"):
        build_clipself(clipself=str(tmp_path), clipself_model="ViT-B-16", size=448, batch=2, grid=4, batches=2,
                       family="openai", weights_file=str(tmp_path / "initial.pt"))
