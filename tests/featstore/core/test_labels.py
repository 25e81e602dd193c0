"""featstore.core.labels.read_table: the strict, BOM-safe CSV primitive every labels reader shares."""

from __future__ import annotations

import pytest

from featstore.core.errors import LabelsError
from featstore.core.labels import read_labels, read_table


def test_bom_whitespace_and_line_numbers(tmp_path):
    p = tmp_path / "t.csv"
    p.write_bytes("\ufeff slide_id , label \n a , 1 \n\nb,0\n".encode("utf-8"))
    rows = read_table(p, ["slide_id", "label"])
    assert rows == [{"slide_id": "a", "label": "1"}, {"slide_id": "b", "label": "0"}]
    assert [r.line for r in rows] == [2, 4] and rows.columns == ("slide_id", "label")
    lab = read_labels(p)                       # the BOM does not hide the slide_id column
    assert lab.slide_ids == ("a", "b") and lab.classes == ("0", "1")


def test_error_lines_count_blank_lines(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("slide_id,label\na,1\n\nb,\n")
    with pytest.raises(LabelsError, match="empty/NaN label on line\\(s\\) 4;"):
        read_labels(p)


def test_extra_columns_error_or_are_ignored(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("slide_id,label,site\na,1,x\n")
    with pytest.raises(LabelsError, match=r"unknown column\(s\) site; allowed: slide_id, label"):
        read_table(p, ["slide_id", "label"])
    assert read_table(p, ["slide_id", "label"], extra="ignore") == [{"slide_id": "a", "label": "1"}]


def test_a_record_wider_than_the_header_names_its_line(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("slide_id,label\na,1\nb,0,oops\n")
    with pytest.raises(LabelsError, match="line 3 has 3 cells but the header has 2") as e:
        read_table(p, ["slide_id", "label"])
    assert str(p) in str(e.value)
