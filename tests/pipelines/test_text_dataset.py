"""Expanding a CSV / TSV text dataset with augmented rows."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from transferkit.errors import ConfigError, DataError
from transferkit.pipelines.text_dataset import augment_csv, read_table

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"

ROWS = [
    ("ham", "Go until jurong point, crazy.. Available only in bugis n great world la e buffet"),
    ("spam", "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005"),
    ("ham", '"Hi its Kate" she said, it was lovely to see you tonight'),
    ("ham", "Ok lar"),
]


@pytest.fixture
def sms_tsv(tmp_path):
    path = tmp_path / "sms.tsv"
    path.write_text("Label\tSMS\n" + "".join(f"{label}\t{text}\n" for label, text in ROWS), encoding="utf-8")
    return path


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_augment_csv_keeps_originals_and_labels_and_adds_n_rows_each(sms_tsv, tmp_path):
    out = tmp_path / "out" / "sms_aug.csv"
    summary = augment_csv(sms_tsv, out, column="SMS", label_column="Label", ops="swap,delete", n=2, seed=0)

    rows = _read_csv(out)
    assert list(rows[0]) == ["Label", "SMS", "aug_op", "source_row"]
    assert len(rows) == 12
    for index, (label, text) in enumerate(ROWS):
        original, *augmented = rows[3 * index:3 * index + 3]
        assert original == {"Label": label, "SMS": text, "aug_op": "original", "source_row": str(index)}
        assert [row["aug_op"] for row in augmented] == ["swap", "delete"]
        for row in augmented:
            assert row["Label"] == label and row["source_row"] == str(index)
    # long texts really change; delete drops words
    for index in range(3):
        swap, delete = rows[3 * index + 1], rows[3 * index + 2]
        assert swap["SMS"] != ROWS[index][1]
        assert len(re.findall(r"\w+", delete["SMS"])) < len(re.findall(r"\w+", ROWS[index][1]))
    assert summary == {
        "input": str(sms_tsv), "output": str(out), "rows_in": 4, "rows_out": 12, "augmented": 8,
        "ops": {"swap": 4, "delete": 4}, "unchanged": summary["unchanged"],
        "labels": {"ham": 3, "spam": 1},
    }
    assert 0 <= summary["unchanged"] <= 2  # only "Ok lar" may come out as it went in


def test_ops_rotate_over_rows_when_n_is_smaller(sms_tsv, tmp_path):
    out = tmp_path / "sms_aug.csv"
    summary = augment_csv(sms_tsv, out, column="SMS", ops="swap,delete,crop", n=1)
    ops = [row["aug_op"] for row in _read_csv(out)]
    assert ops == ["original", "swap", "original", "delete", "original", "crop", "original", "swap"]
    assert summary["ops"] == {"swap": 2, "delete": 1, "crop": 1}
    assert "labels" not in summary


def test_same_seed_writes_the_same_file(sms_tsv, tmp_path):
    for name, seed in (("a.csv", 4), ("b.csv", 4), ("c.csv", 5)):
        augment_csv(sms_tsv, tmp_path / name, column="SMS", ops="swap,crop", n=3, seed=seed)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.csv").read_bytes() != (tmp_path / "c.csv").read_bytes()


def test_tsv_keeps_quotes_in_text_and_round_trips(sms_tsv, tmp_path):
    header, rows, delimiter = read_table(sms_tsv)
    assert (header, delimiter) == (["Label", "SMS"], "\t")
    assert rows[2][1] == '"Hi its Kate" she said, it was lovely to see you tonight'

    out = tmp_path / "sms_aug.tsv"
    augment_csv(sms_tsv, out, column="SMS", n=1)
    header, rows, delimiter = read_table(out)
    assert delimiter == "\t" and len(rows) == 8
    assert rows[4] == ["ham", ROWS[2][1], "original", "2"]


def test_sniffs_delimiter_of_other_extensions(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text('text;label\n"one; two three four";a\nfive six seven;b\n', encoding="utf-8")
    header, rows, delimiter = read_table(path)
    assert delimiter == ";" and header == ["text", "label"]
    assert rows == [["one; two three four", "a"], ["five six seven", "b"]]


def test_missing_columns_name_the_available_ones(sms_tsv, tmp_path):
    with pytest.raises(DataError) as info:
        augment_csv(sms_tsv, tmp_path / "out.csv")
    assert str(info.value) == f"text column 'text' is not in {sms_tsv}: available columns are Label, SMS"
    with pytest.raises(DataError, match="label column 'label' is not in .*available columns are Label, SMS"):
        augment_csv(sms_tsv, tmp_path / "out.csv", column="SMS", label_column="label")
    assert not (tmp_path / "out.csv").exists()


def test_unusable_inputs_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        augment_csv(tmp_path / "nope.csv", tmp_path / "out.csv")
    ragged = tmp_path / "ragged.tsv"
    ragged.write_text("Label\tSMS\nham\thello\nspam\n", encoding="utf-8")
    with pytest.raises(DataError, match="row 3 has 1 fields but the header has 2"):
        augment_csv(ragged, tmp_path / "out.csv", column="SMS")
    done = tmp_path / "done.csv"
    done.write_text("text,aug_op,source_row\nhello there,original,0\n", encoding="utf-8")
    with pytest.raises(DataError, match="already has column.s. aug_op, source_row"):
        augment_csv(done, tmp_path / "out.csv")
    with pytest.raises(ConfigError, match="is the input file"):
        augment_csv(done, done)


@pytest.mark.real
def test_real_sms_spam_file(tmp_path):
    source = SHARED / "data" / "sms_spam.tsv"
    if not source.is_file():
        pytest.skip("../shared/data/sms_spam.tsv is absent")
    summary = augment_csv(source, tmp_path / "sms_aug.csv", column="SMS", label_column="Label", ops="swap", n=1)
    assert summary["rows_in"] == 5574 and summary["rows_out"] == 11148
    assert summary["labels"] == {"ham": 4827, "spam": 747}
    # a few messages are one word or all punctuation: swap leaves them as they are
    assert summary["unchanged"] < 100


def test_quoted_newlines_and_unicode_separators_stay_inside_their_field(tmp_path):
    from transferkit.pipelines.text_dataset import read_table

    path = tmp_path / "t.csv"
    path.write_text('text,label\n"hello\nworld",1\nfoo\u2028bar,0\n', encoding="utf-8")
    header, rows, _ = read_table(path)
    assert header == ["text", "label"]
    assert rows == [["hello\nworld", "1"], ["foo\u2028bar", "0"]]
