import pytest

from mrprune.report import signed


@pytest.mark.parametrize("deviation, text", [(0.0, "+0"), (-0.0, "+0"), (-0.2, "-0.2"), (3.0, "+3"),
                                             (-12.5, "-12.5"), (1234567.0, "+1234567"), (-0.0004, "+0")])
def test_the_text_report_gives_the_deviation_as_the_json_holds_it(deviation, text):
    """A target of 0.6 x 110592 weights is 66355.2: the JSON's -0.2 reads -0.2 in the text too, not '+0'."""
    assert signed(deviation) == text
