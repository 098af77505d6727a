"""``denserc testbed-teacher``: the cell contents, the caption rule it compares with, and the report."""
import numpy as np
import torch

from denserc.cli import main
from denserc_testbed.crops import ScenePool
from denserc_testbed.teacher_cells import caption_names_object, cell_contents, measure
from denserc_testbed.vocabulary import STUFF_ID, THING_ID


def _pool() -> ScenePool:
    """10 x 10 scene: grass, a red striped object in rows/cols 0-3, a blue dotted one in rows/cols 6-9."""
    segment_map = np.zeros((1, 10, 10), dtype=np.uint8)
    segment_map[0, :4, :4] = 1
    segment_map[0, 6:, 6:] = 2
    parts = [[(STUFF_ID["grass"], 68), (THING_ID[("striped", "red")], 16), (THING_ID[("dotted", "blue")], 16)]]
    return ScenePool(torch.zeros(1, 3, 10, 10, dtype=torch.uint8), ["scene"], torch.zeros(0, 6), segment_map, parts)


def test_cell_contents_by_hand():
    pool = _pool()
    # 16 striped pixels of 25: the object with most pixels, 64 % of the cell, all of it inside
    assert cell_contents(pool, 0, (0, 0, 5, 5)) == (THING_ID[("striped", "red")], 16 / 25, 1.0)
    # one striped pixel, 16 dotted ones in a 7 x 7 cell: the dotted object wins
    assert cell_contents(pool, 0, (3, 3, 10, 10)) == (THING_ID[("dotted", "blue")], 16 / 49, 1.0)
    thing, share, inside = cell_contents(pool, 0, (2, 2, 6, 6))  # 4 striped pixels of 16
    assert (thing, share, inside) == (THING_ID[("striped", "red")], 0.25, 0.25)
    assert cell_contents(pool, 0, (4, 4, 6, 6)) == (0, 0.0, 0.0)  # grass alone


def test_caption_rule_matches_region_caption():
    pool = _pool()
    for box in [(0, 0, 5, 5), (2, 2, 6, 6), (1, 1, 10, 10), (3, 3, 9, 9), (0, 0, 10, 10)]:
        _, share, inside = cell_contents(pool, 0, box)
        named = "striped" in pool.region_caption(0, box) or "dotted" in pool.region_caption(0, box)
        assert caption_names_object(share, inside) == named, box


def test_measure_scores_the_shipped_teacher_and_a_student(capsys):
    result = measure("testbed", "testbed", scenes=6, eval_images=4)
    bins, boxes = result["training_cells"]["bins"], result["held_out_thing_boxes"]
    assert sum(row["cells"] for row in bins) == result["training_cells"]["cells_with_an_object"] > 0
    for row in bins + [boxes]:
        for embedder in ("teacher", "student"):
            assert 0 <= row[f"{embedder}: stuff"] + row[f"{embedder}: the object"] <= 100
    # the student pools its dense features, the teacher embeds crops: the same weights, not the same vectors
    assert all(-1 < row["student-teacher cosine"] < 0.99 for row in bins)
    assert boxes["boxes"] > 0
    assert main(["testbed-teacher", "--scenes", "4"]) == 0
    report = capsys.readouterr().out
    assert "| held-out thing boxes | " in report and "teacher: stuff" in report and "student" not in report
