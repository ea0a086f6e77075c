"""`sftune estimate`: peak memory and time of a run before its first step (see estimate/report.py)."""

from sftune.estimate.report import Estimate, estimate_run

__all__ = ["Estimate", "estimate_run"]
