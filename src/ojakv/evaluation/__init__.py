"""Offline benchmarks: locally generated long-context tasks, decode-mode perplexity, sweeps and reports."""

from .report import summarise, write_reports
from .runner import MethodSpec, run_sweep
from .tasks import TASKS, Sample, make_sample, string_match_all

__all__ = ["MethodSpec", "Sample", "TASKS", "make_sample", "run_sweep", "string_match_all", "summarise",
           "write_reports"]
