"""A run's resolved inputs: the config, the model it names and that model's tokenizer, each resolved once.

`solve`, `train`, `data stats` and `estimate` all start from a config; the model spec (catalog name, hub id or
local folder) and the tokenizer (the config's, else the model's own) follow from it in one way, here.
Importing this module must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from autotune.catalog import Architecture, ModelSpec, resolve_model
from autotune.config import Config


@dataclass
class RunContext:
    cfg: Config
    spec: ModelSpec = field(init=False)

    def __post_init__(self) -> None:
        self.spec = resolve_model(self.cfg.model_name)

    @property
    def architecture(self) -> Architecture:
        return self.spec.architecture

    @property
    def tokenizer_name(self) -> str:
        """The config's tokenizer when it names one, else the model's own."""
        return self.cfg.tokenizer_name or self.spec.tokenizer_name

    @cached_property
    def tokenizer(self):
        from autotune.tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_name)
