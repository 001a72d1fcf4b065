"""The Qwen3 dense family by architecture, and how a model name resolves.

Everything here is plain data so the solver, the estimator and the tests can build any of these models
from architecture alone (random init), without downloading weights. Figures are from the published
config.json files. Importing this module must not import torch.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from autotune.errors import UserError

TINY = "tiny-qwen3"

# The linear layers of a Qwen3 decoder layer, in forward order: what LoRA can target.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_target_modules(target_modules) -> tuple[str, ...]:
    """The LoRA targets, deduplicated in order; a UserError unless a non-empty subset of PROJECTIONS."""
    targets = tuple(dict.fromkeys(target_modules))
    unknown = [t for t in targets if t not in PROJECTIONS]
    if unknown or not targets:
        raise UserError(
            f"target_modules {list(target_modules)!r}: "
            + (f"{unknown} are not layers of a Qwen3 model; " if unknown else "")
            + f"choose one or more of {', '.join(PROJECTIONS)}"
        )
    return targets


@dataclass(frozen=True)
class Architecture:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 8
    head_dim: int = 128
    vocab_size: int = 151936
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40960
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6

    def to_hf_config(self, **extra):
        """A transformers Qwen3Config for this architecture (imports transformers lazily)."""
        from transformers import Qwen3Config

        return Qwen3Config(**asdict(self), **extra)

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection of one decoder layer, in PROJECTIONS order."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def param_count(self) -> int:
        """Parameters of the base model (embeddings counted once when tied)."""
        h, L = self.hidden_size, self.num_hidden_layers
        projections = sum(i * o for i, o in self.projection_shapes().values())
        layer = projections + 2 * self.head_dim + 2 * h  # + q/k norms and the two RMSNorms
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embed + L * layer + h + head

    @classmethod
    def from_hf_config(cls, cfg: dict) -> Architecture:
        fields = cls.__dataclass_fields__
        kwargs = {k: cfg[k] for k in fields if k in cfg and cfg[k] is not None}
        # transformers >= 5 saves rope_theta inside rope_parameters.
        rope = cfg.get("rope_parameters")
        if "rope_theta" not in kwargs and isinstance(rope, dict) and rope.get("rope_theta") is not None:
            kwargs["rope_theta"] = rope["rope_theta"]
        missing = [
            k
            for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
            if k not in kwargs
        ]
        if missing:
            raise UserError(f"config.json lacks {', '.join(missing)}: it does not describe a Qwen3 model")
        sizes = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "max_position_embeddings",
        )
        bad = [
            f"{k}={kwargs[k]!r}"
            for k in sizes
            if k in kwargs and (not isinstance(kwargs[k], int) or isinstance(kwargs[k], bool) or kwargs[k] < 1)
        ]
        if bad:
            raise UserError(f"config.json has {', '.join(bad)}: sizes must be positive integers")
        if "head_dim" not in kwargs:
            kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
        return cls(**kwargs)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # short name, e.g. Qwen3-14B
    hub_id: str | None  # Qwen/Qwen3-14B; None for the built-in tiny model
    architecture: Architecture
    thinking: bool = False  # the assistant turn follows a <think> block (Qwen3 hybrid and -Thinking models)
    tokenizer: str | None = None  # None: the model's own (hub id or local path)
    local_path: str | None = None

    @property
    def source(self) -> str:
        """What from_pretrained is given for real weights."""
        return self.local_path or self.hub_id or self.name

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer or self.source


_4B = Architecture(2560, 9728, 36, 32, tie_word_embeddings=True)
_4B_2507 = replace(_4B, max_position_embeddings=262144, rope_theta=5_000_000.0)

# Qwen3 hybrid models render an empty <think></think> block before a non-thinking answer; the 2507
# Instruct model has no thinking mode at all; the 2507 Thinking model always thinks.
CATALOG: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec(
            "Qwen3-0.6B",
            "Qwen/Qwen3-0.6B",
            Architecture(1024, 3072, 28, 16, tie_word_embeddings=True),
            thinking=True,
        ),
        ModelSpec(
            "Qwen3-1.7B",
            "Qwen/Qwen3-1.7B",
            Architecture(2048, 6144, 28, 16, tie_word_embeddings=True),
            thinking=True,
        ),
        ModelSpec("Qwen3-4B", "Qwen/Qwen3-4B", _4B, thinking=True),
        ModelSpec("Qwen3-4B-Thinking-2507", "Qwen/Qwen3-4B-Thinking-2507", _4B_2507, thinking=True),
        ModelSpec("Qwen3-4B-Instruct-2507", "Qwen/Qwen3-4B-Instruct-2507", _4B_2507, thinking=False),
        ModelSpec("Qwen3-8B", "Qwen/Qwen3-8B", Architecture(4096, 12288, 36, 32), thinking=True),
        ModelSpec("Qwen3-14B", "Qwen/Qwen3-14B", Architecture(5120, 17408, 40, 40), thinking=True),
        ModelSpec("Qwen3-32B", "Qwen/Qwen3-32B", Architecture(5120, 25600, 64, 64), thinking=True),
        # The offline demo and the tests: Qwen3's real vocabulary (so the real tokenizer works) on a
        # model small enough to train on two CPU cores in seconds.
        ModelSpec(
            TINY,
            None,
            Architecture(
                64,
                128,
                2,
                4,
                num_key_value_heads=2,
                head_dim=16,
                tie_word_embeddings=True,
                max_position_embeddings=4096,
            ),
            thinking=True,
            tokenizer="qwen3-offline",
        ),
    ]
}

# Names people type that are not Qwen3 models, and what they most likely meant.
_NOT_QWEN3 = {
    "qwen3-7b": "Qwen3-8B (there is no Qwen3-7B: 7B is a Qwen2/Qwen2.5 size; Qwen3's nearest dense model is 8B)",
}


def _suggest(name: str) -> str:
    names = list(CATALOG)
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5) or difflib.get_close_matches(
        name.lower(), [n.lower() for n in names], n=3, cutoff=0.5
    )
    known = ", ".join(n for n in names)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return f"{hint} Known models: {known}; or a local directory holding a config.json."


def resolve_model(name: str) -> ModelSpec:
    """Turn a short name, a hub id, or a local directory into a ModelSpec. Never touches the network."""
    if not isinstance(name, str) or not name.strip():
        raise UserError("model_name is empty: give a Qwen3 model such as Qwen3-8B, or a local directory")
    name = name.strip()
    if _is_dir(name):
        return _from_local_dir(Path(name).expanduser())
    short = name.split("/")[-1]
    if short.lower() in _NOT_QWEN3:
        raise UserError(f"model_name {name!r} does not exist. Use {_NOT_QWEN3[short.lower()]}.")
    for spec in CATALOG.values():
        if spec.name.lower() == short.lower():
            if "/" in name and spec.hub_id is not None:
                # A mirror or fine-tune of a catalog model under another org keeps the architecture.
                return replace(spec, hub_id=name)
            return spec
    if name.startswith((".", "/", "~")) or name.endswith("config.json"):
        raise UserError(f"model_name {name!r}: no such directory (a local model needs a folder with config.json)")
    raise UserError(f"model_name {name!r} is not a Qwen3 dense model autotune knows.{_suggest(short)}")


def _is_dir(name: str) -> bool:
    """Whether name is an existing directory; False (not an exception) for names the OS or the
    home-directory lookup rejects (~nosuchuser, too long, NUL byte)."""
    try:
        return Path(name).expanduser().is_dir()
    except (OSError, ValueError, RuntimeError):
        return False


def _from_local_dir(path: Path) -> ModelSpec:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"model directory {path} has no config.json: point model_name at a saved model folder")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{cfg_file}: cannot read it as JSON ({exc})") from None
    except RecursionError:
        raise UserError(f"{cfg_file}: cannot read it as JSON (nested too deeply)") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_file}: must be a JSON object, got {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if model_type not in (None, "qwen3"):
        raise UserError(f"{cfg_file}: model_type is {model_type!r}; autotune tunes Qwen3 dense models (qwen3)")
    arch = Architecture.from_hf_config(cfg)
    has_tokenizer = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    return ModelSpec(
        path.name, None, arch, thinking=True, local_path=str(path), tokenizer=None if has_tokenizer else "qwen3-offline"
    )
