import pytest

from qvl.eval.metrics import aggregate, box_match, iou, metric_for, normalise, score


def test_normalised_match():
    assert normalise("The Red circle.") == "red circle"
    assert score("  The red circle!", "red circle")["score"] == 1.0
    assert score("red", "blue")["score"] == 0.0
    assert score("red", "red")["exact"] == 1.0 and score("Red.", "red")["exact"] == 0.0


def test_numbers_and_choices():
    assert metric_for("3") == "number"
    assert score("three", "3")["score"] == 1.0 and score("4", "3")["score"] == 0.0
    assert metric_for("B") == "choice"
    assert score("The answer is B.", "B")["score"] == 1.0
    assert score("(C) a dog", "C")["score"] == 1.0
    assert score("A", "C")["score"] == 0.0


def test_numbers_keep_their_decimal_point_and_sign():
    assert score("35", "3.5")["score"] == 0.0 and score("3.50", "3.5")["score"] == 1.0
    assert score("2", "-2")["score"] == 0.0 and score("-2", "-2")["score"] == 1.0
    assert score("1,000", "1000")["score"] == 1.0 and score("$5", "5")["score"] == 1.0
    assert score("Three.", "3")["score"] == 1.0 and score("0.5", ".5")["score"] == 1.0
    assert metric_for("nan") == "match"


def test_reference_made_of_an_article_is_not_matched_by_anything():
    assert score("the", "a")["score"] == 0.0 and score("A.", "a")["score"] == 0.0
    assert score("A", "a")["score"] == 1.0


def test_iou_hand_computed():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0


def test_box_answers_scored_at_iou_half():
    ref = '[{"bbox_2d": [100, 100, 300, 300], "label": "red circle"}, {"bbox_2d": [500, 500, 700, 700], "label": "x"}]'
    assert metric_for(ref) == "iou@0.5"
    assert score(ref, ref)["score"] == 1.0
    one_good = '```json\n[{"bbox_2d": [110, 100, 300, 310], "label": "red circle"}]\n```'
    assert score(one_good, ref)["score"] == 0.5  # one of two boxes found
    extra = ref[:-1] + ', {"bbox_2d": [0, 0, 50, 50], "label": "y"}]'
    assert score(extra, ref)["score"] == pytest.approx(2 / 3)  # a spurious box costs too
    assert score("no idea", ref)["score"] == 0.0
    assert box_match([], []) == 1.0


def test_aggregate():
    agg = aggregate([score("red", "red"), score("2", "3"), score("B", "B")])
    assert agg["n"] == 3 and agg["score"] == pytest.approx(2 / 3)
    assert agg["number"] == {"n": 1, "score": 0.0} and agg["choice"]["score"] == 1.0
