"""Training data: reading QA files into pairs (parsing) and splitting them into train/eval."""

from autotune.data.parsing import DataReport, FileReport, QAPair, parse_data_dir, parse_markdown, read_text, split_pairs

__all__ = ["DataReport", "FileReport", "QAPair", "parse_data_dir", "parse_markdown", "read_text", "split_pairs"]
