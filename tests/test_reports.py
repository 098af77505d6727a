"""What every report shares: provenance and Markdown tables."""
import sys

import torch

from denserc import __version__
from denserc.reports import markdown_table, provenance


def test_markdown_table_by_hand():
    table = markdown_table(["model", "mIoU"], [["a", "1.00"], ["b", "2.50"]], ["note one", "note two", "note one"])
    assert table == "| model | mIoU |\n|---|---|\n| a | 1.00 |\n| b | 2.50 |\n\nnote one\nnote two"
    assert markdown_table(["x"], []) == "| x |\n|---|"


def test_provenance_names_the_run():
    record = provenance(torch.device("cpu"), "fp32", 1, limit=None)
    assert (record["argv"], record["denserc_version"], record["device"], record["precision"]) == (
        sys.argv, __version__, "cpu", "fp32")
    assert record["torch_version"] == torch.__version__ and record["limit"] is None and "created" in record
