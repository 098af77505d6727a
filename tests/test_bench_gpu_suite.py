"""The GPU suite: its plan covers every GPU row of RESULTS.md, a failing or stuck row costs only itself, and the
dry run's cheapest section runs end to end on the CPU."""
import datetime
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not part of the package
from benchmarks import gpu_suite, train_step  # noqa: E402
from benchmarks.gpu_suite import ROW_PREFIX, Report, Row, Section, cell, run_rows, run_section  # noqa: E402


# ------------------------------------------------------------------ measure functions the test workers run
def fake_measure(*, device, cache, behaviour, **_):
    """One line per row, or the failure the row asks for; ``cache`` survives from row to row."""
    cache["rows"] = cache.get("rows", 0) + 1
    if behaviour == "raise":
        raise ValueError("broken | row\nsecond line")
    if behaviour == "sleep":
        time.sleep(30)
    if behaviour == "hang":  # a hang in native code: no Python signal handler gets to run
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(60)
    if behaviour == "crash":
        os._exit(3)
    if behaviour == "cuda-error":
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    return [[f"row {cache['rows']}", device.type]], [f"- note of row {cache['rows']}"]


def fake_section(behaviours, guard_s=1.0, fresh=False):
    return Section("fake", "Fake", "About the fake rows.", ("behaviour", "result", "device"),
                   "tests.test_bench_gpu_suite:fake_measure",
                   tuple(Row((b,), {"behaviour": b}) for b in behaviours), guard_s=guard_s,
                   fresh_process_per_row=fresh)


def table_rows(path: Path) -> list[str]:
    """The body lines of every table in the file (no header or separator lines)."""
    lines = path.read_text().splitlines()
    return [line for line, after in zip(lines, lines[1:] + [""])
            if line.startswith("| ") and not after.startswith("|---")]


# ------------------------------------------------------------------------------------------------- fast
def test_the_gpu_plan_holds_every_row_the_issue_lists():
    plan = {section.name: section for section in gpu_suite.sections(dry_run=False)}
    assert [s.name for s in gpu_suite.sections(dry_run=True)] == list(plan)
    for model in ("vit-b16", "eva02-b16"):
        dense = plan[f"dense-{model}"]
        assert {row.keys for row in dense.rows} == {(size, precision, "eager") for size in (224, 448, 1024)
                                                    for precision in ("fp32", "bf16")}
        assert dense.shared["batch"] == 8 and not dense.shared["default_only"]
        compiled = plan[f"compile-{model}"]
        assert {row.keys for row in compiled.rows} == {(size, "bf16", "torch.compile (inductor)")
                                                      for size in (224, 448, 1024)}
    assert plan["dense-eva02-b16"].shared["model"] == "EVA02-B-16"
    assert {row.keys for row in plan["distill"].rows} == {(model, 1024, 4, "bf16", checkpointing)
                                                          for model in ("ViT-B-16", "EVA02-B-16")
                                                          for checkpointing in ("off", "on")}
    assert {row.keys for row in plan["distill-vit-l14"].rows} == {("ViT-L-14", 896, 4, "bf16", "off"),
                                                                  ("ViT-L-14", 896, 4, "bf16", "on")}
    assert plan["distill"].fresh_process_per_row and plan["distill-vit-l14"].fresh_process_per_row
    assert all(row.settings["vfm"] == "vit_base_patch14_reg4_dinov2" for row in plan["distill"].rows)
    assert {row.keys[:3] for row in plan["fvit"].rows} == {(640, "fvit_b16_ovcoco", "train"),
                                                           (640, "fvit_b16_ovcoco", "inference"),
                                                           (1024, "fvit_b16_ovlvis", "train"),
                                                           (1024, "fvit_b16_ovlvis", "inference")}
    assert plan["fvit"].shared["model"] == plan["catseg"].shared["model"] == "ViT-B-16"
    assert [row.keys[:2] for row in plan["catseg"].rows] == [("train", 384), ("train", 384),
                                                             ("sliding-window evaluation", 640),
                                                             ("sliding-window evaluation", 640)]
    assert plan["loader"].shared["size"] == 1024
    assert [row.keys for row in plan["attention"].rows] == [(224,), (448,), (1024,)]
    for section in plan.values():
        assert all(len(row.keys) == section.keys < len(section.headers) for row in section.rows)


def test_the_24_gb_verdict_leaves_1_gib_for_the_cuda_context():
    assert train_step.card_verdict(23 * 1024).startswith("fits a 24 GB card (<= 23552 MiB after 1 GiB CUDA context)")
    assert train_step.card_verdict(23 * 1024 + 1).startswith("does not fit a 24 GB card")


def test_a_cell_stays_one_table_cell():
    text = cell("RuntimeError: a | b\n  c" + "x" * 400)
    assert "|" not in text and "\n" not in text
    assert text.startswith("RuntimeError: a / b c") and len(text) == gpu_suite.ERROR_CHARS and text.endswith("...")


def test_the_default_output_is_dated_and_never_overwritten(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_suite, "RESULTS_DIR", tmp_path)
    day = datetime.date(2026, 12, 5)
    assert gpu_suite.default_output(False, day) == tmp_path / "gpu-2026-12-05.md"
    (tmp_path / "gpu-2026-12-05.md").write_text("first run")
    (tmp_path / "gpu-2026-12-05-2.md").write_text("second run")
    assert gpu_suite.default_output(False, day) == tmp_path / "gpu-2026-12-05-3.md"
    assert gpu_suite.default_output(True, day) == tmp_path / "dry-run-2026-12-05.md"


def test_real_sizes_without_cuda_and_unknown_sections_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="the suite's real sizes need a CUDA device, and this machine has none; "
                                         "`--dry-run` runs every step"):
        gpu_suite.main([])
    with pytest.raises(SystemExit, match="--only: unknown section.s. dense; the sections are distill, dense-vit-b16"):
        gpu_suite.main(["--dry-run", "--only", "dense"])


def test_the_worker_reports_each_row_and_a_failing_or_slow_row_costs_only_itself(capsys):
    started = time.monotonic()
    run_rows("tests.test_bench_gpu_suite:fake_measure", {}, [{"behaviour": b} for b in ("ok", "raise", "sleep", "ok")],
             "cpu", guard_s=1.0, first_row=5)
    assert time.monotonic() - started < 5  # the sleeping row was stopped by its 1 s guard
    messages = [json.loads(line[len(ROW_PREFIX):]) for line in capsys.readouterr().out.splitlines()
                if line.startswith(ROW_PREFIX)]
    assert [m["row"] for m in messages] == [5, 6, 7, 8]
    assert messages[0] == {"row": 5, "lines": [["row 1", "cpu"]], "notes": ["- note of row 1"]}
    assert messages[1] == {"row": 6, "error": "ValueError: broken | row\nsecond line"}
    assert messages[2] == {"row": 7, "error": "TimeoutError: the row ran past its time guard"}
    assert messages[3]["lines"] == [["row 4", "cpu"]]  # the same cache: the fourth row of this worker
    assert signal.alarm(0) == 0  # no guard left armed


def test_after_a_cuda_error_the_worker_stops_so_that_the_next_rows_get_a_fresh_cuda_context(capsys):
    with pytest.raises(SystemExit) as stop:
        run_rows("tests.test_bench_gpu_suite:fake_measure", {}, [{"behaviour": "cuda-error"}, {"behaviour": "ok"}],
                 "cpu", guard_s=10.0, first_row=0)
    assert stop.value.code == gpu_suite.RESTART_STATUS
    reports = [line for line in capsys.readouterr().out.splitlines() if line.startswith(ROW_PREFIX)]
    assert [json.loads(line[len(ROW_PREFIX):]) for line in reports] == [
        {"row": 0, "error": "RuntimeError: CUDA error: an illegal memory access was encountered"}]


# ------------------------------------------------------------------------------------- slow: real workers
@pytest.mark.slow
def test_rows_reach_the_file_as_they_come_and_a_stuck_or_crashed_worker_costs_only_its_row(tmp_path, monkeypatch):
    report = Report(tmp_path / "suite.md")
    cpu = torch.device("cpu")
    far = time.monotonic() + 600
    outcomes = run_section(fake_section(["ok", "raise", "ok"]), report, cpu, far)
    assert [o.status for o in outcomes] == ["measured", "failed", "measured"]
    assert table_rows(report.path) == ["| ok | row 1 | cpu |",
                                       "| raise | error: ValueError: broken / row second line | - |",
                                       "| ok | row 3 | cpu |"]
    assert "- note of row 1\n- note of row 3" in report.path.read_text()

    with monkeypatch.context() as patch:
        patch.setattr(gpu_suite, "WORKER_START_S", 4.0)
        started = time.monotonic()
        hung = run_section(fake_section(["hang", "ok"]), report, cpu, far)
    assert time.monotonic() - started < 4.0 + 2 * 1.0 + 5  # killed at its limit: start-up allowance + 2 guards
    reason = "not run: its worker was stopped after 6 s (section limit)"
    assert [(o.status, o.detail) for o in hung] == [("not run", reason)] * 2

    crashed = run_section(fake_section(["ok", "crash", "ok", "cuda-error", "ok"]), report, cpu, far)
    assert [o.status for o in crashed] == ["measured", "failed", "measured", "failed", "measured"]
    assert crashed[1].detail.startswith("error: its worker exited with status 3")
    assert crashed[3].detail == "error: RuntimeError: CUDA error: an illegal memory access was encountered"
    # after the crash and after the CUDA error, the next row ran in a new worker (its first row)
    assert table_rows(report.path)[-5:] == [
        "| ok | row 1 | cpu |", f"| crash | {cell(crashed[1].detail)} | - |", "| ok | row 1 | cpu |",
        "| cuda-error | error: RuntimeError: CUDA error: an illegal memory access was encountered | - |",
        "| ok | row 1 | cpu |"]

    fresh = run_section(fake_section(["ok", "ok"], fresh=True), report, cpu, far)
    assert [o.status for o in fresh] == ["measured", "measured"]
    assert table_rows(report.path)[-2:] == ["| ok | row 1 | cpu |"] * 2  # a worker per row

    spent = run_section(fake_section(["ok"]), report, cpu, time.monotonic())
    assert [(o.status, o.detail) for o in spent] == [("not run", "not run: the suite's time budget was spent")]
    assert len(table_rows(report.path)) == 3 + 2 + 5 + 2 + 1


@pytest.mark.slow
def test_the_dry_run_of_the_cheapest_section_runs_end_to_end(tmp_path):
    output = tmp_path / "dry.md"
    assert gpu_suite.main(["--dry-run", "--only", "attention", "--output", str(output)]) == 0
    text = output.read_text()
    assert text.startswith("# DenseRC GPU suite (dry run")
    assert "- command: `" in text and "- versions: python" in text and "- GPU: none (CPU run)" in text
    rows = table_rows(output)
    assert [row.split(" | ")[:3] for row in rows] == [
        ["| 32", "5", "nn.MultiheadAttention"], ["| 32", "5", "F.scaled_dot_product_attention"],
        ["| 64", "17", "nn.MultiheadAttention"], ["| 64", "17", "F.scaled_dot_product_attention"]]
    assert "2 of 2 rows measured" in text
