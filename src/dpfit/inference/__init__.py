"""Inference on whole systems: predictions next to labels, ``dp test`` error metrics and detail files."""

from dpfit.inference.evaluate import (
    DETAIL_SUFFIXES,
    error_metrics,
    evaluate_system,
    format_metrics,
    weighted_average,
    write_detail_files,
)

__all__ = [
    "DETAIL_SUFFIXES",
    "error_metrics",
    "evaluate_system",
    "format_metrics",
    "weighted_average",
    "write_detail_files",
]
