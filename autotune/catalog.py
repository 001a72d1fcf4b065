"""The Qwen3 family by architecture (the dense models and the mixture-of-experts ones), and how a model name resolves.

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

# The linear layers of a Qwen3 decoder layer, in forward order: what LoRA can target (an MoE model's sparse layers
# have no gate/up/down Linear: their experts are fused tensors, which LoRA reaches as target parameters).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_PROJECTIONS = PROJECTIONS[:4]


# PEFT's, TRL's and axolotl's word for "every Linear layer but the output head" (LLaMA-Factory says "all").
ALL_LINEAR = "all-linear"


def resolve_targets(targets):
    """The LoRA targets spelled out: "all-linear", as a string or alone in a list, is every projection of a Qwen3
    decoder layer (PROJECTIONS); anything else is returned as it is (check_target_modules judges it). The one place
    the word is expanded, so that the config and every record of a run list the layers themselves."""
    if targets == ALL_LINEAR or targets == [ALL_LINEAR]:
        return list(PROJECTIONS)
    return targets


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
    # A mixture of experts (Qwen3-MoE, transformers' qwen3_moe): each sparse layer's MLP is `num_experts` SwiGLU
    # experts of width `moe_intermediate_size` behind a router that sends each token to `num_experts_per_tok` of
    # them; a layer is sparse when (index + 1) % decoder_sparse_step == 0 and it is not in mlp_only_layers (a dense
    # MLP of intermediate_size). No experts: a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def model_type(self) -> str:
        """transformers' name for the architecture (config.json's model_type)."""
        return "qwen3_moe" if self.is_moe else "qwen3"

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer `layer` (from 0) has the experts rather than a dense MLP (Qwen3MoeDecoderLayer)."""
        return self.is_moe and layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    def facts(self) -> dict:
        """The architecture as recorded (profiles) and hashed: a dense model's without the fields of the experts,
        so that its record is what it was before they existed."""
        facts = asdict(self)
        if not self.is_moe:
            for name in _MOE_FIELDS:
                facts.pop(name)
        else:
            facts["mlp_only_layers"] = list(self.mlp_only_layers)
        return facts

    def to_hf_config(self, **extra):
        """transformers' config for this architecture (Qwen3Config, Qwen3MoeConfig; imports transformers lazily)."""
        if self.is_moe:
            from transformers import Qwen3MoeConfig

            return Qwen3MoeConfig(**self.facts(), **extra)
        from transformers import Qwen3Config

        return Qwen3Config(**self.facts(), **extra)

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

    def expert_shapes(self) -> dict[str, tuple[int, int, int]]:
        """(experts, out_features, in_features) of a sparse layer's fused expert tensors (transformers' Qwen3MoeExperts:
        gate and up stacked in one, then down). The router's weight beside them is (experts, hidden)."""
        e, h, i = self.num_experts, self.hidden_size, self.moe_intermediate_size
        return {"gate_up_proj": (e, 2 * i, h), "down_proj": (e, h, i)}

    def param_count(self) -> int:
        """Parameters of the base model (embeddings counted once when tied)."""
        h, L = self.hidden_size, self.num_hidden_layers
        shapes = self.projection_shapes()
        attention = sum(i * o for p, (i, o) in shapes.items() if p in ATTENTION_PROJECTIONS)
        dense_mlp = sum(i * o for p, (i, o) in shapes.items() if p not in ATTENTION_PROJECTIONS)
        experts = sum(e * o * i for e, o, i in self.expert_shapes().values()) + self.num_experts * h  # + the router
        sparse = sum(self.is_sparse(layer) for layer in range(L))
        layers = L * (attention + 2 * self.head_dim + 2 * h) + sparse * experts + (L - sparse) * dense_mlp
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embed + layers + h + head

    def active_param_count(self) -> int:
        """Parameters a token goes through (the "A3B" of Qwen3-30B-A3B): the routed experts only."""
        if not self.is_moe:
            return self.param_count()
        idle = self.num_experts - self.num_experts_per_tok
        per_expert = sum(o * i for _, o, i in self.expert_shapes().values())
        sparse = sum(self.is_sparse(layer) for layer in range(self.num_hidden_layers))
        return self.param_count() - sparse * idle * per_expert

    @classmethod
    def from_hf_config(cls, cfg: dict) -> Architecture:
        fields = cls.__dataclass_fields__
        # transformers 5 saves Qwen3-MoE's num_experts as num_local_experts (its attribute map); the hub's files
        # say num_experts.
        cfg = {_ALIASES.get(k, k): v for k, v in cfg.items()} | {k: v for k, v in cfg.items() if k in fields}
        kwargs = {k: cfg[k] for k in fields if k in cfg and cfg[k] is not None}
        if cfg.get("model_type") != "qwen3_moe":  # a dense config's stray expert fields mean nothing
            for name in _MOE_FIELDS:
                kwargs.pop(name, None)
        elif isinstance(kwargs.get("mlp_only_layers"), list):
            kwargs["mlp_only_layers"] = tuple(kwargs["mlp_only_layers"])
        # transformers >= 5 saves rope_theta inside rope_parameters.
        rope = cfg.get("rope_parameters")
        if "rope_theta" not in kwargs and isinstance(rope, dict) and rope.get("rope_theta") is not None:
            kwargs["rope_theta"] = rope["rope_theta"]
        missing = [
            k
            for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
            if k not in kwargs
        ]
        if cfg.get("model_type") == "qwen3_moe":
            missing += [k for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size") if k not in kwargs]
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
            *(
                ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step")
                if "num_experts" in kwargs
                else ()
            ),
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
        if kwargs.get("num_experts_per_tok", 0) > kwargs.get("num_experts", 0):
            raise UserError(
                f"config.json routes each token to {kwargs['num_experts_per_tok']} experts of "
                f"{kwargs['num_experts']}: num_experts_per_tok must not exceed num_experts"
            )
        return cls(**kwargs)


def lora_on_experts(switch: str, arch: Architecture, name: str) -> bool:
    """Whether the config's `lora_experts` switch puts adapters on `arch`'s experts; "on" for a model without
    experts is a UserError."""
    if switch == "on" and not arch.is_moe:
        raise UserError(
            f'"on" asks for adapters on experts, and {name} is a dense model without any. Set it "auto" or "off"'
        )
    return arch.is_moe and switch != "off"


def expert_lora_targets(arch: Architecture) -> tuple[str, ...]:
    """PEFT's target_parameters for the experts of every sparse layer (transformers' Qwen3MoeExperts' tensors)."""
    return tuple(f"mlp.experts.{name}" for name in arch.expert_shapes())


_ALIASES = {"num_local_experts": "num_experts"}

_MOE_FIELDS = tuple(
    f for f in Architecture.__dataclass_fields__ if f.startswith(("num_experts", "moe_", "decoder_sparse", "mlp_only"))
) + ("norm_topk_prob", "router_aux_loss_coef")


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
# The MoE models, from their config.json (Qwen/Qwen3-30B-A3B, Qwen/Qwen3-235B-A22B and the 2507 releases): every
# layer sparse (decoder_sparse_step 1, no mlp_only_layers), 128 experts, 8 per token, norm_topk_prob true,
# router_aux_loss_coef 0.001, untied; intermediate_size is the width of a dense MLP, which no layer has.
_30B_A3B = Architecture(
    2048, 6144, 48, 32, num_key_value_heads=4, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768
)
_30B_A3B_2507 = replace(_30B_A3B, max_position_embeddings=262144, rope_theta=10_000_000.0)
_235B_A22B = Architecture(
    4096, 12288, 94, 64, num_key_value_heads=4, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=1536
)
_235B_A22B_2507 = replace(_235B_A22B, max_position_embeddings=262144, rope_theta=5_000_000.0)
TINY_MOE = "tiny-qwen3-moe"
# The offline demo and the tests: Qwen3's real vocabulary (so the real tokenizer works) on a model small enough to
# train on two CPU cores in seconds.
_TINY = Architecture(
    64, 128, 2, 4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=4096
)

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
        ModelSpec("Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B", _30B_A3B, thinking=True),
        ModelSpec("Qwen3-30B-A3B-Instruct-2507", "Qwen/Qwen3-30B-A3B-Instruct-2507", _30B_A3B_2507, thinking=False),
        ModelSpec("Qwen3-30B-A3B-Thinking-2507", "Qwen/Qwen3-30B-A3B-Thinking-2507", _30B_A3B_2507, thinking=True),
        ModelSpec("Qwen3-Coder-30B-A3B-Instruct", "Qwen/Qwen3-Coder-30B-A3B-Instruct", _30B_A3B_2507, thinking=False),
        ModelSpec("Qwen3-235B-A22B", "Qwen/Qwen3-235B-A22B", _235B_A22B, thinking=True),
        ModelSpec(
            "Qwen3-235B-A22B-Instruct-2507", "Qwen/Qwen3-235B-A22B-Instruct-2507", _235B_A22B_2507, thinking=False
        ),
        ModelSpec(
            "Qwen3-235B-A22B-Thinking-2507", "Qwen/Qwen3-235B-A22B-Thinking-2507", _235B_A22B_2507, thinking=True
        ),
        ModelSpec(TINY, None, _TINY, thinking=True, tokenizer="qwen3-offline"),
        # The tests' MoE: tiny-qwen3's attention and vocabulary, 8 experts of width 64, 2 per token, untied (the
        # 30B and 235B models are untied).
        ModelSpec(
            TINY_MOE,
            None,
            replace(_TINY, tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64),
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
    raise UserError(f"model_name {name!r} is not a Qwen3 model autotune knows.{_suggest(short)}")


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
    if model_type not in (None, "qwen3", "qwen3_moe"):
        raise UserError(
            f"{cfg_file}: model_type is {model_type!r}; autotune tunes Qwen3's dense models (qwen3) and its "
            "mixture-of-experts models (qwen3_moe)"
        )
    arch = Architecture.from_hf_config(cfg)
    has_tokenizer = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    return ModelSpec(
        path.name, None, arch, thinking=True, local_path=str(path), tokenizer=None if has_tokenizer else "qwen3-offline"
    )
