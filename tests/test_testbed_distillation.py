"""DenseRC on the testbed: a short self-distillation of the shipped tiny CLIP (fixed seed) gives the zero-shot
box classification on held-out scenes that was measured with the current recipe (docs/testbed.md#tests)."""
import pytest

from denserc_testbed.run import format_table, run

pytestmark = pytest.mark.slow  # a testbed run

# A tiny schedule: 12 steps of 4 scenes at a high learning rate, held-out split of 40 scenes (177
# segments). The short schedule proper takes ~2 minutes; this one ~12 s.
SCHEDULE = ["data.num_images=48", "train.global_batch_size=4", "train.batch_size=4", "optim.lr=1e-3",
            "optim.warmup_steps=2"]
EVAL_IMAGES = 40
# Measured with the peers' recipe defaults (issue 11: blocks only, letterboxed teacher crops, CLIPSelf's grid
# rule, DeCLIP's L_coherence at lambda 0.025); percent top-1 over the 177 held-out segments' boxes, one
# segment is 0.56 points. At this tiny, high-lr schedule L_coherence in DeCLIP's form costs box accuracy
# (41.8; with loss.coherence_weight=0: 45.8); the recipe before issue 11 gave 48.59.
MEASURED_BEFORE = 44.07
MEASURED_AFTER = 41.81
TOLERANCE = 2.0  # points: float differences between machines may flip a few segments


def test_short_distillation_gives_the_measured_box_accuracy(tmp_path):
    records = run("short", ["hsg"], [0], tmp_path, eval_images=EVAL_IMAGES, overrides=SCHEDULE, progress=False)
    before, after = records[0]["before"]["boxes_top1"], records[0]["after"]["boxes_top1"]
    assert before == pytest.approx(MEASURED_BEFORE, abs=TOLERANCE)
    assert after == pytest.approx(MEASURED_AFTER, abs=TOLERANCE), format_table(records)
    assert (tmp_path / "results.md").read_text() == format_table(records)
