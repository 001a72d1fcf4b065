"""Training data: reading QA files into pairs (parsing), tokens and labels (encoding), a run's data (prepare)."""

from autotune.data.parsing import (
    DataReport,
    FileReport,
    Markers,
    QAPair,
    parse_data,
    parse_data_dir,
    parse_markdown,
    read_text,
    split_pairs,
)

__all__ = [
    "DataReport",
    "FileReport",
    "Markers",
    "QAPair",
    "parse_data",
    "parse_data_dir",
    "parse_markdown",
    "read_text",
    "split_pairs",
]
