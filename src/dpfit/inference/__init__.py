"""Inference on whole systems: predictions next to labels, ``dp test`` error metrics and detail files
(a property model's: :mod:`dpfit.inference.property`)."""

from dpfit.inference.evaluate import (
    DETAIL_SUFFIXES,
    error_metrics,
    evaluate_system,
    format_metrics,
    weighted_average,
    write_detail_files,
)
from dpfit.inference.property import (
    evaluate_property_system,
    format_property_metrics,
    property_error_metrics,
    write_property_detail_files,
)

__all__ = [
    "DETAIL_SUFFIXES",
    "error_metrics",
    "evaluate_property_system",
    "evaluate_system",
    "format_metrics",
    "format_property_metrics",
    "property_error_metrics",
    "weighted_average",
    "write_detail_files",
    "write_property_detail_files",
]
