"""The command line as a new user meets it (issue 16): one-line errors, --debug, argument errors without torch,
help naming every dataset, default workers."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from denserc.cli import main
from denserc.eval import load_class_names, segmentation_layout
from denserc.eval.cli import MAX_DEFAULT_WORKERS
from helpers import TINY
from eval_fixtures import write_coco_stuff

# ---------------------------------------------------------------------------------------- command line
def test_dataset_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    argv = ["eval", "seg", "--model", TINY, "--data", str(missing), "--no-progress"]
    assert main(argv) == 1
    assert capsys.readouterr().err == f"denserc eval seg: error: dataset folder {missing} does not exist\n"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main([*argv, "--debug"])
    assert main(argv[:-1]) == 1  # with progress on, a first line comes before torch is imported
    assert capsys.readouterr().err.splitlines() == [f"denserc eval seg: loading {TINY} (torch, open_clip)...",
                                                    f"denserc eval seg: error: dataset folder {missing} does not exist"]


def test_class_count_mismatch_is_one_line(tmp_path, capsys):
    root = write_coco_stuff(tmp_path / "coco_stuff164k", count=1)
    assert main(["eval", "seg", "--model", TINY, "--data", str(root), "--class-names", "voc20", "--workers", "0",
                 "--no-progress", "--device", "cpu"]) == 1
    note, error = capsys.readouterr().err.splitlines()
    assert note.startswith(f"note: {TINY} has random weights")
    assert error == "denserc eval seg: error: COCO-Stuff-171 has 171 classes but the class-name list 'voc20' has 20"


def test_both_spellings_of_coco_stuff_are_accepted():
    assert segmentation_layout("coco_stuff").name == segmentation_layout("coco-stuff").name == "coco-stuff"
    assert load_class_names("coco-stuff") == load_class_names("coco_stuff")
    assert len(load_class_names("coco-stuff")) == 171


def test_workers_default_to_the_cores_this_process_may_use(tmp_path):
    from denserc.cli import build_parser
    args = build_parser().parse_args(["eval", "seg", "--model", TINY, "--data", str(tmp_path)])
    assert args.workers == min(MAX_DEFAULT_WORKERS, len(os.sched_getaffinity(0)))
    assert "--templates simple" in build_parser()._subparsers._group_actions[0].choices["eval"] \
        ._subparsers._group_actions[0].choices["seg"].format_help().replace("\n", " ").replace("  ", " ")


@pytest.mark.slow
def test_segment_says_it_created_the_output_folder(tmp_path, capsys):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "new" / "deeper" / "s.png"
    assert main(["segment", str(photo), "--classes", "a,b", "-o", str(out), "--model", TINY,
                 "--short-side", "64", "--window", "64"]) == 0
    assert out.is_file()
    assert capsys.readouterr().out.splitlines()[0].endswith(f"(created folder {out.parent})")


def test_help_and_argument_errors_load_no_torch():
    """A fresh interpreter: `denserc --help`, a command's help and an argument error import neither torch nor
    open_clip, timm or matplotlib (they take seconds to import; the commands load them when they run)."""
    code = "\n".join([
        "import sys",
        "from denserc.cli import main",
        "for argv in (['--help'], ['eval', 'seg', '--help'], ['segment', '--help'], ['testbed', '--help'],",
        "             ['train', '--help'], ['eval', 'seg'], ['segment', 'x.png'], ['heatmap', '--bogus']):",
        "    try:",
        "        main(argv)",
        "    except SystemExit:",
        "        pass",
        "print(sorted(m for m in ('torch', 'open_clip', 'timm', 'matplotlib') if m in sys.modules))",
    ])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert "the following arguments are required: --model, --data" in result.stderr
    assert "testbed-probe" in result.stdout  # the plug-ins' commands are listed all the same


def test_eval_help_names_every_bundled_dataset():
    from denserc.eval import SEGMENTATION_DATASETS
    from denserc.cli import build_parser
    bundled = sorted(name for name, layout in SEGMENTATION_DATASETS.items()
                     if layout.list_pairs.__module__ == "denserc.eval.datasets")
    seg = build_parser()._subparsers._group_actions[0].choices["eval"]._subparsers._group_actions[0].choices["seg"]
    assert f"dataset name: {', '.join(bundled)} (docs/evaluation.md)" in " ".join(seg.format_help().split())
