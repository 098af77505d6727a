"""The benchmarks' measuring helpers: paired ratios, round-robin timing, tables, CPU peak memory."""
import sys
import time
from pathlib import Path

import pytest
import torch

# benchmarks/ is a top-level folder of the repository, not part of the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (autocast, cpu_peak_mib, interleaved_timings, markdown_table,  # noqa: E402
                               paired_ratios, quartiles)

BUFFER_MIB = 64


def touched_buffer(mib: int):
    """Probe target: a call that allocates and writes ``mib`` MiB (so every page becomes resident)."""
    def call():
        return torch.ones(mib * 1024 * 1024 // 4, dtype=torch.float32)
    return call


def test_paired_ratios_divide_within_each_round():
    # per-round ratios 2, 1, 3 (median 2), whereas the ratio of the medians would be 4 / 3
    assert paired_ratios([2.0, 4.0, 9.0], [1.0, 4.0, 3.0]) == [2.0, 1.0, 3.0]
    with pytest.raises(ValueError, match="equal, non-zero lengths"):
        paired_ratios([1.0], [1.0, 2.0])


def test_interleaved_timings_rotates_the_order_and_times_each_call():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    calls["slow"] = lambda: (order.append("slow"), time.sleep(0.03))
    times = interleaved_timings(calls, warmup=1, repeats=4, device=torch.device("cpu"))
    assert order == ["a", "b", "c", "slow",            # warm-up
                     "a", "b", "c", "slow", "b", "c", "slow", "a",
                     "c", "slow", "a", "b", "slow", "a", "b", "c"]
    assert all(len(t) == 4 for t in times.values())
    assert min(times["slow"]) >= 0.03
    assert min(times["a"]) < 0.03
    assert len(interleaved_timings({"a": calls["a"]}, warmup=0, repeats=2, device=torch.device("cpu"),
                                   min_seconds=0.05)["a"]) > 2  # kept going until 50 ms were spent
    with pytest.raises(ValueError, match="repeats >= 1"):
        interleaved_timings(calls, warmup=0, repeats=0, device=torch.device("cpu"))


def test_quartiles_of_ratios():
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 4.0)


def test_markdown_table_layout_and_row_check():
    assert markdown_table(("size", "ms"), [(224, "1.50"), (448, 3)]) == (
        "| size | ms |\n|---|---|\n| 224 | 1.50 |\n| 448 | 3 |")
    with pytest.raises(ValueError, match=r"has 1 cells, expected 2 \(\['size', 'ms'\]\)"):
        markdown_table(("size", "ms"), [(224,)])


def test_autocast_rejects_unknown_precision():
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast(torch.device("cpu"), "fp16")


@pytest.mark.slow
def test_cpu_peak_memory_sees_a_known_allocation():
    target = "tests.test_bench_common:touched_buffer"
    measured = cpu_peak_mib(target, mib=BUFFER_MIB)
    assert BUFFER_MIB * 0.95 <= measured <= BUFFER_MIB * 1.1
    assert cpu_peak_mib(target, mib=0) < 2
