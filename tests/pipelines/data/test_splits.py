"""Split files round-trip exactly, odd file names included; a damaged one is a one-line error."""
from __future__ import annotations

import pytest

from transferkit.errors import DataError
from transferkit.pipelines.data.datasets import Sample
from transferkit.pipelines.data.failures import Skipped
from transferkit.pipelines.data.splits import read_skipped_csv, read_split_csv, write_skipped_csv, write_split_csv


def test_samples_and_skipped_files_round_trip_with_undecodable_names(tmp_path):
    odd = "/data/red/caf\udce9,\"quoted\".png"  # a byte that is not UTF-8, a comma and quotes
    samples = [Sample(odd, 1), Sample("/data/blue/a.png", 0)]
    write_split_csv(tmp_path / "splits" / "train.csv", samples, ["blue", "red"])
    assert read_split_csv(tmp_path / "splits" / "train.csv", ["blue", "red"]) == samples
    write_skipped_csv(tmp_path / "skipped.csv", [Skipped(odd, "training", "cannot decode: broken")])
    assert read_skipped_csv(tmp_path / "skipped.csv") == [(odd, "training", "cannot decode: broken")]
    assert read_skipped_csv(tmp_path / "missing.csv") == []


def test_a_skipped_file_written_before_stages_reads_as_the_scan_s(tmp_path):
    (tmp_path / "skipped.csv").write_text("path,reason\n/d/a.png,empty file (0 bytes)\n")
    assert read_skipped_csv(tmp_path / "skipped.csv") == [Skipped("/d/a.png", "scan", "empty file (0 bytes)")]


def test_a_split_naming_classes_the_run_does_not_know_is_refused(tmp_path):
    write_split_csv(tmp_path / "val.csv", [Sample("/x.png", 0)], ["cat"])
    with pytest.raises(DataError, match="names classes the run does not know: cat"):
        read_split_csv(tmp_path / "val.csv", ["dog", "bird"])
    (tmp_path / "bad.csv").write_text("file,class\n/x.png,dog\n")
    with pytest.raises(DataError, match="has no path,label header"):
        read_split_csv(tmp_path / "bad.csv", ["dog"])
