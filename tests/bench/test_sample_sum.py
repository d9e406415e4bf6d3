"""`devtools.metrics.sample_sum`: a sample as printed is that sample; a bare name sums its
unlabelled and labelled samples, and never a longer name that starts with it."""

from __future__ import annotations

from devtools.metrics import sample_sum

TEXT = """# HELP tally_x_total Things
# TYPE tally_x_total counter
tally_x_total{outcome="counted"} 3.0
tally_x_total{outcome="duplicate"} 2.0
tally_x_total_created 1.7e+09
tally_up 1.0
"""


def test_a_labelled_sample_is_that_sample() -> None:
    assert sample_sum(TEXT, 'tally_x_total{outcome="duplicate"}') == 2.0


def test_a_bare_name_sums_its_samples_and_no_longer_name() -> None:
    assert sample_sum(TEXT, "tally_x_total") == 5.0
    assert sample_sum(TEXT, "tally_up") == 1.0


def test_a_missing_sample_is_zero() -> None:
    assert sample_sum(TEXT, "tally_missing") == 0.0
    assert sample_sum(TEXT, 'tally_x_total{outcome="other"}') == 0.0
