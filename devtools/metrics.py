"""Reading a service's /metrics page (Prometheus's text format) in tests and benchmarks."""

from __future__ import annotations


def sample_sum(text: str, sample: str) -> float:
    """The sum of the samples named `sample` in /metrics `text`: a sample as printed
    (`name{label="value"}`) is that one sample; a bare name is its unlabelled sample and
    every labelled one. 0 when there is none."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(sample + " ")
               or ("{" not in sample and line.startswith(sample + "{")))
