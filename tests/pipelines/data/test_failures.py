"""FailureLog: files that break after the scan, reported by any process, read back once each."""
from __future__ import annotations

import multiprocessing as mp
import pickle
import sys

import pytest

from transferkit.errors import DataError
from transferkit.pipelines.data.failures import FailureLog, Skipped, merge


def _report(folder: str, k: int) -> None:
    log = FailureLog(folder)
    log.record(f"/d/{k % 3}.png", "training", "broken")
    log.record(f"/d/{k % 3}.png", "training", "broken")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork start method")
def test_reports_from_several_processes_are_read_back_once_per_file(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_report, args=(str(tmp_path), k)) for k in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert len(list(tmp_path.glob("*.jsonl"))) == 6
    assert FailureLog(tmp_path).entries() == [Skipped(f"/d/{k}.png", "training", "broken") for k in range(3)]


def test_entries_of_one_stage_and_a_line_cut_short_is_ignored(tmp_path):
    log = FailureLog(tmp_path)
    log.record("/d/a.png", "advisor", "broken")
    log.record("/d/b.png", "validation", "truncated")
    with open(next(tmp_path.glob("*.jsonl")), "a") as f:
        f.write('["/d/c.png", "trai')  # a kill in the middle of a write
    assert log.entries("validation") == [Skipped("/d/b.png", "validation", "truncated")]
    assert [e.path for e in log.entries()] == ["/d/a.png", "/d/b.png"]


def test_strict_raises_at_the_first_failure_and_records_nothing(tmp_path):
    log = FailureLog(tmp_path, strict=True)
    with pytest.raises(DataError, match=r"^/d/a.png could not be read at training \(broken\); --strict stops"):
        log.record("/d/a.png", "training", "broken")
    assert log.entries() == []


def test_without_a_folder_failures_are_only_logged_once_each(caplog):
    log = FailureLog()
    for _ in range(3):
        log.record("/d/a.png", "training", "broken")
    assert caplog.text.count("could not read /d/a.png at training (broken); leaving it out") == 1
    assert log.entries() == []


def test_a_worker_starts_with_its_own_record_of_warnings(tmp_path, caplog):
    log = FailureLog(tmp_path)
    log.record("/d/a.png", "training", "broken")
    copy = pickle.loads(pickle.dumps(log))
    copy.record("/d/a.png", "training", "broken")
    assert caplog.text.count("could not read /d/a.png") == 2 and copy.folder == tmp_path


def test_merge_keeps_the_first_stage_that_met_a_file():
    scan = [Skipped("/d/b.png", "scan", "empty file (0 bytes)")]
    later = [Skipped("/d/b.png", "training", "broken"), Skipped("/d/a.png", "evaluate val", "broken")]
    assert merge(scan, later) == [Skipped("/d/a.png", "evaluate val", "broken"), scan[0]]
