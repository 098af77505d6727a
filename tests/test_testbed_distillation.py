"""DenseRC on the testbed: a short self-distillation of the shipped tiny CLIP (fixed seed) improves the
zero-shot classification of held-out *thing masks* and the segmentation mIoU by the measured margins
(docs/testbed.md#tests)."""
import pytest

from denserc_testbed.run import format_table, run

pytestmark = pytest.mark.slow  # a testbed run

# A tiny schedule: 12 steps of 4 scenes at a high learning rate, held-out split of 40 scenes (177
# segments, 94 of them things: one thing segment is 1.06 points). The short schedule proper takes
# minutes; this one ~20 s.
SCHEDULE = ["data.num_images=48", "train.global_batch_size=4", "train.batch_size=4", "optim.lr=1e-3",
            "optim.warmup_steps=2"]
EVAL_IMAGES = 40
# Measured with the colour x pattern world's tiny CLIP and the recipe defaults (percent), for the record: at
# this tiny, high-lr schedule box top-1 falls (35.6 -> 26.0: the stuff inside thing boxes dominates them), while
# thing masks (17.0 -> 21.3) and mIoU (9.0 -> 15.1) rise. The test asserts the gain, not those numbers: a margin
# well above one segment (1.06 points) and below the measured gains (4.3 and 6.1).
MARGIN = {"thing_masks_top1": 2.0, "mIoU": 3.0}  # the least gain that counts as distillation working


def test_short_distillation_improves_thing_masks_and_miou(tmp_path):
    records = run("short", ["hsg"], [0], tmp_path, eval_images=EVAL_IMAGES, overrides=SCHEDULE, progress=False)
    table = format_table(records)
    for metric, margin in MARGIN.items():
        gain = records[0]["after"][metric] - records[0]["before"][metric]
        assert gain >= margin, (metric, table)
    assert (tmp_path / "results.md").read_text() == table
