import math

import pandas as pd
import pytest

from hnct.cohort import CohortError, check_cohort, read_cohort, t4_label, tcia_patient_id, write_cohort


@pytest.mark.parametrize(
    "laryngealct_id, tcia_id",
    [
        ("RADCURE_0724", "RADCURE-0724"),
        ("HNSCC_01_0165", "HNSCC-01-0165"),
        ("HN_CHUS_071", "HN-CHUS-071"),
        ("QIN_HEADNECK_02_2440", "QIN-HEADNECK-02-2440"),
        ("HN1524", "HN1524"),
        ("HN_018", "HN-018"),
    ],
)
def test_tcia_patient_id(laryngealct_id, tcia_id):
    assert tcia_patient_id(laryngealct_id) == tcia_id


def test_laryngealct_ids_match_the_published_test_split(laryngealct_dir):
    """Every test-split TCIA ID that bbox3d.txt covers maps back exactly (the mapping is not guessed)."""
    boxes = {tcia_patient_id(line.split(",")[0]) for line in (laryngealct_dir / "bbox3d.txt").read_text().splitlines() if line}
    split = pd.read_csv(laryngealct_dir / "test_split_206_reconstructed.csv")
    missing = sorted(set(split["TCIA_ID"]) - boxes)
    assert missing == [], missing


@pytest.mark.parametrize("stage, label", [("T4a", 1.0), ("T4", 1.0), ("t4b", 1.0), ("T3", 0.0), ("T1", 0.0), ("Tis", 0.0), ("2", 0.0)])
def test_t4_label(stage, label):
    assert t4_label(stage) == label


@pytest.mark.parametrize("stage", ["", "TX", None, float("nan")])
def test_t4_label_unknown(stage):
    assert math.isnan(t4_label(stage))


def test_cohort_round_trip_and_checks(tmp_path):
    table = pd.DataFrame({"case": ["A-1", "A-2"], "patient": ["A", "A"], "collection": ["X", "X"], "t_stage": ["T4a", "T2"]})
    write_cohort(table, tmp_path / "c.tsv")
    back = read_cohort(tmp_path / "c.tsv")
    assert list(back["label_t4"]) == ["1", "0"]
    assert list(back.index) == ["A-1", "A-2"]
    with pytest.raises(CohortError, match="duplicate"):
        check_cohort(pd.DataFrame({"case": ["A", "A"], "patient": ["p", "q"], "collection": ["x", "x"]}))
    with pytest.raises(CohortError, match="missing column"):
        check_cohort(pd.DataFrame({"case": ["A"]}))
    with pytest.raises(CohortError, match="case IDs"):
        check_cohort(pd.DataFrame({"case": ["a/b"], "patient": ["p"], "collection": ["x"]}))
