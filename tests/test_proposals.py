"""CLIPSelf's region-proposal recipe: the proposals file, the boxes drawn per image as CLIPSelf's
``ProposalDistillDataset.__getitem__`` draws them (src/training/data.py), the teacher's enlarged crops, and the
recipe's config training end to end with the testbed's model and scenes swapped in."""
import json

import pytest
import torch
from PIL import Image

import denserc
from denserc.data import ProposalSource, build_source, sample_proposal_boxes
from denserc.train import load_config, setup_distributed
from denserc.train.config import DataConfig

from helpers import distillation_engine


def _source(boxes, size=(200, 100)):
    return ProposalSource(["a.jpg"], [torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)], [size])


def test_boxes_by_hand_enlarged_crops_clipped_and_scaled_to_the_input():
    source = _source([[10, 20, 40, 20], [150, 60, 40, 30]])  # x, y, w, h in a 200 x 100 image
    students, teachers = sample_proposal_boxes(source, [0], torch.tensor([[50, 100]]), epoch=0, seed=0)
    order = students[0][:, 0].argsort()  # the draw shuffles them
    # input is half the original size (100 x 50 valid area)
    torch.testing.assert_close(students[0][order], torch.tensor([[5.0, 10, 25, 20], [75, 30, 95, 45]]))
    # 1.5x about the centre: (30, 30) +- (30, 15) -> (0, 15, 60, 45); (170, 75) +- (30, 22.5) clipped to 200 x 100
    torch.testing.assert_close(teachers[0][order], torch.tensor([[0.0, 7.5, 30, 22.5], [70, 26.25, 100, 48.75]]))


def test_at_most_max_boxes_are_drawn_then_the_too_small_and_too_large_dropped():
    tiny, huge, fine = [0, 0, 2, 2], [0, 0, 2000, 2000], [0, 0, 50, 50]
    source = _source([tiny] * 3 + [huge] * 3 + [fine] * 30, size=(2000, 2000))
    students, _ = sample_proposal_boxes(source, [0], torch.tensor([[2000, 2000]]), epoch=0, seed=0, max_boxes=20)
    assert 14 <= len(students[0]) <= 20 and torch.all(students[0][:, 2] == 50)
    again, _ = sample_proposal_boxes(source, [0], torch.tensor([[2000, 2000]]), epoch=0, seed=0, max_boxes=20)
    other, _ = sample_proposal_boxes(source, [0], torch.tensor([[2000, 2000]]), epoch=1, seed=0, max_boxes=3)
    assert torch.equal(students[0], again[0]) and len(other[0]) <= 3


def test_an_image_without_a_usable_proposal_gets_its_top_left_quarter():
    students, teachers = sample_proposal_boxes(_source([[0, 0, 1, 1]]), [0], torch.tensor([[100, 200]]), epoch=0,
                                               seed=0)
    torch.testing.assert_close(students[0], torch.tensor([[0.0, 0, 50, 25]]))
    torch.testing.assert_close(teachers[0], students[0])


def _write_proposals(root, boxes_per_image, missing=0):
    images = []
    for i in range(len(boxes_per_image) + missing):
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": 64, "height": 48})
        if i < len(boxes_per_image):
            Image.new("RGB", (64, 48), (i * 40, 0, 0)).save(root / f"{i}.jpg")
    annotations = [{"id": k, "image_id": i + 1, "bbox": box}
                   for i, boxes in enumerate(boxes_per_image) for k, box in enumerate(boxes)]
    path = root / "proposals.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": []}))
    return path


def test_the_proposals_file_is_read_per_image_and_bad_files_are_named(tmp_path):
    path = _write_proposals(tmp_path, [[[1, 2, 30, 20]], []], missing=1)
    source = build_source(DataConfig(type="proposals", root=str(tmp_path), annotations=str(path)))
    assert len(source) == 2  # the missing image is left out (with a warning)
    boxes, size = source.proposals(0)
    assert boxes.tolist() == [[1, 2, 30, 20]] and size == (64, 48) and source.proposals(1)[0].shape == (0, 4)
    with pytest.raises(FileNotFoundError, match="1 images listed in .* are missing"):
        build_source(DataConfig(type="proposals", root=str(tmp_path), annotations=str(path), strict=True))
    (tmp_path / "bad.json").write_text(json.dumps({"images": [{"id": 1}]}))
    with pytest.raises(ValueError, match="is not a COCO-format proposals file .*KeyError"):
        build_source(DataConfig(type="proposals", root=str(tmp_path), annotations=str(tmp_path / "bad.json")))
    with pytest.raises(ValueError, match="needs data.root .* and data.annotations"):
        build_source(DataConfig(type="proposals", root=str(tmp_path)))


TESTBED = ["model.name=ViT-Testbed-P8", "model.pretrained=testbed", "model.unlocked_blocks=null",
           "data.image_size=64", "data.num_workers=0", "train.global_batch_size=2", "train.batch_size=2",
           "train.precision=fp32", "train.device=cpu", "train.epochs=1", "optim.warmup_steps=0", "train.log_every=1"]


def test_clipselfs_configs_are_its_recipes():
    grid, proposals = load_config("clipself_eva02_b16_coco"), load_config("clipself_eva02_b16_coco_proposals")
    for config in (grid, proposals):
        assert (config.model.name, config.model.construction, config.model.gating) == ("EVA02-B-16", "x+v", "none")
        assert (config.loss.coherence_weight, config.data.image_size, config.export.alpha) == (0.0, 1024, 0.7)
        assert (config.model.unlocked_blocks, config.train.global_batch_size, config.train.epochs) == (12, 16, 6)
    assert (grid.data.type, proposals.data.type) == ("coco", "proposals")
    assert proposals.data.annotations == "data/coco/coco_proposals.json"


@pytest.mark.parametrize("teacher_crops", ["source", "batch"])  # the config's (the peers'), and RoIAlign's
def test_the_proposal_recipe_trains_and_its_teacher_embeds_the_enlarged_crops(tmp_path, teacher_crops):
    path = _write_proposals(tmp_path, [[[4, 4, 20, 16], [30, 10, 24, 30]], [[0, 0, 64, 48]]])
    config = load_config("clipself_eva02_b16_coco_proposals",
                         [*TESTBED, f"data.root={tmp_path}", f"data.annotations={path}",
                          f"data.teacher_crops={teacher_crops}"])
    trainer = distillation_engine(config, setup_distributed("cpu"), tmp_path / "run")
    batch = next(iter(trainer.loader()))
    prepared = trainer.task.prepare(batch, epoch=0)
    _, images, boxes, crops = trainer.task.images_and_grids(batch, 0)
    if teacher_crops == "batch":
        assert not all(torch.equal(b, c) for b, c in zip(boxes, crops))  # the teacher's crops are larger
        torch.testing.assert_close(prepared["teacher_embeddings"], trainer.task.teacher(images, crops))
    else:  # cut by the loader from the 64 x 48 source around the 1.5x boxes (tests/test_source_crops.py: parity)
        assert len(crops) == sum(len(b) for b in boxes)
        scale = torch.tensor([64, 48, 64, 48]) / torch.cat([batch["size"].flip(1)] * 2, dim=1)
        assert all(torch.all((c[:, 2:] - c[:, :2]) > (b[:, 2:] - b[:, :2]) * s[2:]) or torch.equal(c, b * s)
                   for b, c, s in zip(batch["boxes"], batch["crop_boxes"], scale))
        torch.testing.assert_close(prepared["teacher_embeddings"], trainer.task.teacher.embed(crops))
    assert prepared["boxes"][0].tolist() == boxes[0].tolist()
    final = trainer.fit()
    assert denserc.load(final).config["construction"] == "x+v"
