"""The soak's judgement (bench/soak.py): slopes per minute and the rules they fail."""

from __future__ import annotations

from bench.soak import judge, slope_per_minute


def test_slope_is_growth_per_minute_least_squares() -> None:
    assert slope_per_minute([(0, 10), (30, 11), (60, 12)]) == 2.0
    assert slope_per_minute([(0, 5), (60, 5)]) == 0.0
    assert slope_per_minute([(0, 5)]) == 0.0


def _samples(rss_per_min: float, lag_per_min: float) -> list[dict[str, object]]:
    return [{"t": t, "rss_mib": {"worker": 100 + rss_per_min * t / 60},
             "lag_records": {"projector": lag_per_min * t / 60}, "backlog": 0}
            for t in range(0, 601, 5)]


def test_flat_memory_and_lag_pass_and_growth_fails() -> None:
    _, ok = judge(_samples(0.5, 10), rate=1500, seconds=600, lost=0, exits=0,
                  published=900_000)
    assert ok == []
    slopes, failed = judge(_samples(20, 5000), rate=1500, seconds=600, lost=3, exits=1,
                           published=800_000)
    assert slopes["rss_mib_per_min"]["worker"] == 20
    assert failed == ["worker RSS grows 20.0 MiB/min", "projector lag grows 5,000 records/min",
                      "only 88.9% of the target rate accepted", "3 events lost",
                      "1 services exited by themselves"]
