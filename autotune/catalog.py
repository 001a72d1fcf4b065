"""The Qwen3 family by architecture (the dense models, the mixture-of-experts ones, and the Qwen3.5/3.6 hybrids of
Gated DeltaNet and gated attention), and how a model name resolves.

Everything here is plain data so the solver, the estimator and the tests can build any of these models
from architecture alone (random init), without downloading weights. Figures are from the published
config.json files. Importing this module must not import torch.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from autotune.errors import UserError

TINY = "tiny-qwen3"

# The linear layers of a Qwen3 decoder layer, in forward order: what LoRA can target (an MoE model's sparse layers
# have no gate/up/down Linear: their experts are fused tensors, which LoRA reaches as target parameters).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_PROJECTIONS = PROJECTIONS[:4]
MLP_PROJECTIONS = PROJECTIONS[4:]
# A Qwen3.5/3.6 Gated DeltaNet block's linear layers (transformers' Qwen3_5GatedDeltaNet), in forward order: q, k and
# v in one (through the short causal convolution), the output gate z, the per-head write strength b and decay a,
# then out_proj.
LINEAR_ATTENTION_PROJECTIONS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")

# What mixes the tokens of a decoder layer, as config.json's layer_types names it.
FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"


# PEFT's, TRL's and axolotl's word for "every Linear layer but the output head" (LLaMA-Factory says "all").
ALL_LINEAR = "all-linear"


def resolve_targets(targets, arch: Architecture | None = None):
    """The LoRA targets spelled out: "all-linear", as a string or in a list, is every Linear of `arch`'s decoder
    layers that LoRA can target (None: a Qwen3 model's, PROJECTIONS): a hybrid's DeltaNet projections too, an MoE
    model's attention only (its experts get adapters through lora_experts); names beside it stay. Anything else is
    returned as it is (check_target_modules judges it). The one place the word is expanded, so that the config and
    every record of a run list the layers themselves."""
    listed = [targets] if isinstance(targets, str) else targets
    if not isinstance(listed, list) or ALL_LINEAR not in listed:
        return targets
    if arch is None:
        every = list(PROJECTIONS)
    elif arch.is_moe and not arch.is_hybrid:
        every = list(ATTENTION_PROJECTIONS)
    else:
        every = list(arch.projection_names)
    return list(dict.fromkeys([*every, *(t for t in listed if t != ALL_LINEAR)]))


def check_target_modules(target_modules, arch: Architecture | None = None) -> tuple[str, ...]:
    """The LoRA targets, deduplicated in order; a UserError unless a non-empty subset of the projections of `arch`
    (None: a Qwen3 model's, PROJECTIONS)."""
    known = PROJECTIONS if arch is None else arch.projection_names
    targets = tuple(dict.fromkeys(target_modules))
    unknown = [t for t in targets if t not in known]
    if unknown or not targets:
        family = "a Qwen3 model" if arch is None else arch.family
        raise UserError(
            f"target_modules {list(target_modules)!r}: "
            + (f"{unknown} are not layers of {family}; " if unknown else "")
            + f"choose one or more of {', '.join(known)}"
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
    # A hybrid (Qwen3.5/3.6; transformers' qwen3_5_text and qwen3_5_moe_text): `layer_types` names each layer's token
    # mixer. "linear_attention" is a Gated DeltaNet block: q/k/v through a depthwise causal convolution of
    # `linear_conv_kernel_dim` taps, `linear_num_key_heads` query/key heads of `linear_key_head_dim` and
    # `linear_num_value_heads` value heads of `linear_value_head_dim`, a recurrent state of key x value width per
    # value head instead of a KV cache. "full_attention" is gated attention: q_proj also gives a sigmoid gate on the
    # attention's output (twice the width), RoPE on `partial_rotary_factor` of each head. A hybrid MoE layer adds a
    # shared expert of width `shared_expert_intermediate_size` beside the routed ones. Empty: a Qwen3 model, every
    # layer full attention without the gate.
    layer_types: tuple[str, ...] = ()
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    partial_rotary_factor: float = 1.0
    shared_expert_intermediate_size: int = 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_dense(self) -> bool:
        """No experts: every layer's MLP is Linears (what bitsandbytes quantizes)."""
        return not self.is_moe

    @property
    def is_hybrid(self) -> bool:
        """Qwen3.5/3.6: Gated DeltaNet layers beside gated full attention."""
        return bool(self.layer_types)

    @property
    def family(self) -> str:
        """The family's name in messages."""
        if self.is_hybrid:
            return "a Qwen3.5/3.6 hybrid model" if not self.is_moe else "a Qwen3.5/3.6 mixture-of-experts hybrid"
        return "a Qwen3 model" if not self.is_moe else "a Qwen3 mixture-of-experts model"

    @property
    def model_type(self) -> str:
        """transformers' name for the architecture (config.json's model_type; a hybrid's text model)."""
        if self.is_hybrid:
            return "qwen3_5_moe_text" if self.is_moe else "qwen3_5_text"
        return "qwen3_moe" if self.is_moe else "qwen3"

    @property
    def quantization_order(self) -> tuple[str, ...]:
        """The base-weight precisions a solve tries, first that fits wins, when the config leaves quantization to
        it. The Qwen3.5/3.6 hybrids: bf16 LoRA, 4-bit only when nothing fits otherwise (Unsloth's Qwen3.5 guide: their
        4-bit quantization error is larger than usual); Qwen3's: 4-bit QLoRA, the config's default."""
        return ("none", "4bit") if self.is_hybrid else ("4bit",)

    @property
    def norm_weight_offset(self) -> float:
        """What a hybrid's RMSNorms add to their stored weight (transformers' Qwen3_5RMSNorm: x * (1 + weight), so an
        identity norm stores zeros); its DeltaNet blocks' gated norm stores the weight itself. Qwen3's: nothing."""
        return 1.0 if self.is_hybrid else 0.0

    @property
    def causal_lm_class(self) -> str:
        """transformers' class of the text model (config.json's architectures of an exported model)."""
        return {
            "qwen3": "Qwen3ForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM",
            "qwen3_5_text": "Qwen3_5ForCausalLM",
            "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
        }[self.model_type]

    @property
    def decoder_layer_class(self) -> str:
        """transformers' class of one decoder layer (the model's `_no_split_modules`): the unit FSDP shards, one
        layer's parameters gathered at a time."""
        return {
            "qwen3": "Qwen3DecoderLayer",
            "qwen3_moe": "Qwen3MoeDecoderLayer",
            "qwen3_5_text": "Qwen3_5DecoderLayer",
            "qwen3_5_moe_text": "Qwen3_5MoeDecoderLayer",
        }[self.model_type]

    def is_linear(self, layer: int) -> bool:
        """Whether decoder layer `layer` (from 0) mixes tokens with a Gated DeltaNet block (linear attention)."""
        return self.is_hybrid and self.layer_types[layer] == LINEAR_ATTENTION

    @property
    def projection_names(self) -> tuple[str, ...]:
        """The names of the Linear layers LoRA can target (target_modules), in forward order."""
        return tuple(self.projection_shapes())

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer `layer` (from 0) has the experts rather than a dense MLP (Qwen3MoeDecoderLayer)."""
        return self.is_moe and layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    def facts(self) -> dict:
        """The architecture as recorded (profiles) and hashed: a model's without the fields of what it does not have
        (experts, linear attention), so that a Qwen3 model's record is what it was before they existed."""
        facts = asdict(self)
        if not self.is_moe:
            for name in _MOE_FIELDS:
                facts.pop(name)
        else:
            facts["mlp_only_layers"] = list(self.mlp_only_layers)
        if not self.is_hybrid:
            for name in _HYBRID_FIELDS:
                facts.pop(name)
        else:
            facts["layer_types"] = list(self.layer_types)
            if not self.is_moe:
                facts.pop("shared_expert_intermediate_size")
        return facts

    @classmethod
    def from_facts(cls, facts: dict) -> Architecture:
        """The architecture a record's facts() describe (a profile's model.architecture); a UserError if they do not
        describe one."""
        fields = cls.__dataclass_fields__
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in facts.items() if k in fields}
        try:
            return cls(**values)
        except TypeError as exc:
            raise UserError(f"the recorded architecture is incomplete ({exc})") from None

    def to_hf_config(self, **extra):
        """transformers' config for this architecture (Qwen3Config, Qwen3MoeConfig, Qwen3_5TextConfig,
        Qwen3_5MoeTextConfig; imports transformers lazily)."""
        if self.is_hybrid:
            return self._hybrid_hf_config(**extra)
        if self.is_moe:
            from transformers import Qwen3MoeConfig

            return Qwen3MoeConfig(**self.facts(), **extra)
        from transformers import Qwen3Config

        return Qwen3Config(**self.facts(), **extra)

    def _hybrid_hf_config(self, **extra):
        from transformers import Qwen3_5MoeTextConfig, Qwen3_5TextConfig

        facts = self.facts()
        # transformers' hybrid configs are strict dataclasses: only their own fields, RoPE's inside rope_parameters.
        rope = {
            "rope_type": "default",
            "rope_theta": facts.pop("rope_theta"),
            "partial_rotary_factor": facts.pop("partial_rotary_factor"),
        }
        if self.is_moe:
            # Every layer of a hybrid MoE is sparse, its one dense MLP the shared expert (intermediate_size here).
            for name in ("decoder_sparse_step", "mlp_only_layers", "norm_topk_prob", "intermediate_size"):
                facts.pop(name)
        cls = Qwen3_5MoeTextConfig if self.is_moe else Qwen3_5TextConfig
        return cls(**facts, rope_parameters=rope, **extra)

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each Linear of the decoder layers, in forward order: Qwen3's PROJECTIONS;
        a hybrid's gated q_proj (query and gate, twice the width), then its DeltaNet blocks' projections."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        shapes = {
            "q_proj": (h, 2 * q if self.is_hybrid else q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
        }
        if self.is_hybrid:
            value = self.linear_value_width
            shapes |= {
                "in_proj_qkv": (h, self.linear_conv_width),
                "in_proj_z": (h, value),
                "in_proj_b": (h, self.linear_num_value_heads),
                "in_proj_a": (h, self.linear_num_value_heads),
                "out_proj": (value, h),
            }
        return shapes | {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_key_width(self) -> int:
        """A DeltaNet block's query (and key) width: its key heads times their width."""
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_width(self) -> int:
        """A DeltaNet block's value (and output) width."""
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_width(self) -> int:
        """A DeltaNet block's q, k and v side by side: in_proj_qkv's output, the causal convolution's channels."""
        return 2 * self.linear_key_width + self.linear_value_width

    def expert_shapes(self) -> dict[str, tuple[int, int, int]]:
        """(experts, out_features, in_features) of a sparse layer's fused expert tensors (transformers' Qwen3MoeExperts:
        gate and up stacked in one, then down). The router's weight beside them is (experts, hidden)."""
        e, h, i = self.num_experts, self.hidden_size, self.moe_intermediate_size
        return {"gate_up_proj": (e, 2 * i, h), "down_proj": (e, h, i)}

    def param_count(self) -> int:
        """Parameters of the base model (embeddings counted once when tied; a hybrid's text model, no vision tower)."""
        h, L = self.hidden_size, self.num_hidden_layers
        shapes = self.projection_shapes()

        def linears(names) -> int:
            return sum(i * o for p, (i, o) in shapes.items() if p in names)

        attention = linears(ATTENTION_PROJECTIONS) + 2 * self.head_dim  # + the QK-norms
        # + the depthwise convolution, the per-head decay (A_log) and its bias (dt_bias), the gated output norm
        linear = linears(LINEAR_ATTENTION_PROJECTIONS) + self.linear_conv_width * self.linear_conv_kernel_dim
        linear += 2 * self.linear_num_value_heads + self.linear_value_head_dim
        dense_mlp = linears(MLP_PROJECTIONS)
        experts = sum(e * o * i for e, o, i in self.expert_shapes().values()) + self.num_experts * h  # + the router
        if self.is_hybrid and self.is_moe:
            experts += dense_mlp + h  # the shared expert and its gate
        n_linear = sum(self.is_linear(n) for n in range(L))
        sparse = sum(self.is_sparse(n) for n in range(L))
        layers = n_linear * linear + (L - n_linear) * attention + 2 * h * L
        layers += sparse * experts + (L - sparse) * dense_mlp
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
        """The architecture a config.json describes (Qwen3, Qwen3-MoE, or a Qwen3.5/3.6 text model: the unified
        vision-language checkpoints keep it under text_config)."""
        if cfg.get("model_type") in HYBRID_MODEL_TYPES and isinstance(cfg.get("text_config"), dict):
            cfg = {"model_type": cfg["model_type"]} | cfg["text_config"] | {"model_type": cfg["model_type"]}
        model_type = cfg.get("model_type")
        hybrid = model_type in HYBRID_MODEL_TYPES
        moe = model_type in ("qwen3_moe", "qwen3_5_moe", "qwen3_5_moe_text")
        fields = cls.__dataclass_fields__
        # transformers 5 saves Qwen3-MoE's num_experts as num_local_experts (its attribute map); the hub's files
        # say num_experts.
        cfg = {_ALIASES.get(k, k): v for k, v in cfg.items()} | {k: v for k, v in cfg.items() if k in fields}
        kwargs = {k: cfg[k] for k in fields if k in cfg and cfg[k] is not None}
        if not moe:  # a dense config's stray expert fields mean nothing
            for name in _MOE_FIELDS:
                kwargs.pop(name, None)
        elif isinstance(kwargs.get("mlp_only_layers"), list):
            kwargs["mlp_only_layers"] = tuple(kwargs["mlp_only_layers"])
        if not hybrid:
            for name in _HYBRID_FIELDS:
                kwargs.pop(name, None)
        # transformers >= 5 saves rope_theta (and a hybrid's partial_rotary_factor) inside rope_parameters.
        rope = cfg.get("rope_parameters")
        rope = rope if isinstance(rope, dict) else {}
        for name in ("rope_theta", "partial_rotary_factor") if hybrid else ("rope_theta",):
            if name not in kwargs and rope.get(name) is not None:
                kwargs[name] = rope[name]
        if hybrid:
            cls._hybrid_kwargs(kwargs, cfg, moe)
        required = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        if moe:
            required += ["num_experts", "num_experts_per_tok", "moe_intermediate_size"]
        if hybrid:
            required += [f for f in _HYBRID_SIZES if f != "shared_expert_intermediate_size" or moe]
        missing = [k for k in required if k not in kwargs]
        if missing:
            raise UserError(
                f"config.json lacks {', '.join(missing)}: it does not describe a {_family(model_type)} model"
            )
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
            *(_HYBRID_SIZES if hybrid else ()),
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

    @staticmethod
    def _hybrid_kwargs(kwargs: dict, cfg: dict, moe: bool) -> None:
        """A hybrid's layer types (listed, or every `full_attention_interval`-th layer full attention, as
        transformers derives them) checked; a hybrid MoE's one dense MLP width, its shared expert's."""
        layers = kwargs.get("num_hidden_layers")
        types = cfg.get("layer_types")
        if types is None and isinstance(layers, int) and layers > 0:
            interval = cfg.get("full_attention_interval", 4)
            if not isinstance(interval, int) or interval < 1:
                raise UserError(f"config.json has full_attention_interval={interval!r}: must be a positive integer")
            types = [FULL_ATTENTION if (n + 1) % interval == 0 else LINEAR_ATTENTION for n in range(layers)]
        if types is not None:
            if not isinstance(types, list) or any(t not in (FULL_ATTENTION, LINEAR_ATTENTION) for t in types):
                raise UserError(
                    f"config.json's layer_types must list {FULL_ATTENTION!r} or {LINEAR_ATTENTION!r} per layer"
                )
            if isinstance(layers, int) and len(types) != layers:
                raise UserError(f"config.json lists {len(types)} layer_types for num_hidden_layers {layers}")
            kwargs["layer_types"] = tuple(types)
        if moe and "shared_expert_intermediate_size" in kwargs:
            kwargs["intermediate_size"] = kwargs["shared_expert_intermediate_size"]


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
_HYBRID_SIZES = (
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_conv_kernel_dim",
    "shared_expert_intermediate_size",
)
_HYBRID_FIELDS = ("layer_types", "partial_rotary_factor", *_HYBRID_SIZES)
# config.json's model_type of the Qwen3.5/3.6 checkpoints (the unified vision-language ones) and of their text models.
HYBRID_MODEL_TYPES = ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text")
MODEL_TYPES = ("qwen3", "qwen3_moe", *HYBRID_MODEL_TYPES)


def _family(model_type) -> str:
    if model_type in HYBRID_MODEL_TYPES:
        return "Qwen3.5/3.6"
    return "Qwen3-MoE" if model_type == "qwen3_moe" else "Qwen3"


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


def _hybrid_layers(n: int, interval: int = 4) -> tuple[str, ...]:
    """Every `interval`-th layer full attention, the rest Gated DeltaNet (config.json's layer_types of every
    Qwen3.5/3.6 model: full_attention_interval 4, so the last layer is full attention)."""
    return tuple(FULL_ATTENTION if (k + 1) % interval == 0 else LINEAR_ATTENTION for k in range(n))


def _qwen3_5(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, value_heads: int, **kw):
    """A Qwen3.5/3.6 text model from its config.json: what every size shares (head_dim 256; DeltaNet's 16 key heads,
    key and value heads of 128, a 4-tap convolution; vocabulary 248,320; 262,144 positions; RoPE theta 1e7 on a
    quarter of each head), the rest given."""
    return Architecture(
        hidden,
        intermediate,
        layers,
        heads,
        num_key_value_heads=kv_heads,
        head_dim=256,
        vocab_size=248320,
        max_position_embeddings=262144,
        rope_theta=10_000_000.0,
        layer_types=_hybrid_layers(layers),
        linear_num_key_heads=16,
        linear_num_value_heads=value_heads,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        partial_rotary_factor=0.25,
        **kw,
    )


# The Qwen3.5/3.6 text models, from the released config.json files' text_config (cross-read in THUDM/slime's
# scripts/models/qwen3.5-*.sh, transformers' configuration_qwen3_5*.py, NVIDIA-NeMo/Megatron-Bridge's Qwen3.5 tests
# and model cards). The small ones tie their embeddings; the MoE ones are sparse in every layer, with a shared expert
# of the experts' width beside them (intermediate_size here is the shared expert's). Not verified against a second
# source: Qwen3.5-2B's 16 DeltaNet value heads and tied embeddings, and Qwen3.5-397B-A17B's shared expert of 1,024
# (one source gave 4,096).
_Q35_0_8B = _qwen3_5(1024, 3584, 24, 8, 2, 16, tie_word_embeddings=True)
_Q35_2B = _qwen3_5(2048, 6144, 24, 8, 2, 16, tie_word_embeddings=True)
_Q35_4B = _qwen3_5(2560, 9216, 32, 16, 4, 32, tie_word_embeddings=True)
_Q35_9B = _qwen3_5(4096, 12288, 32, 16, 4, 32)
_Q35_27B = _qwen3_5(5120, 17408, 64, 24, 4, 48)


def _qwen3_5_moe(hidden, layers, heads, value_heads, experts, per_token, width):
    return _qwen3_5(
        hidden,
        width,
        layers,
        heads,
        2,
        value_heads,
        num_experts=experts,
        num_experts_per_tok=per_token,
        moe_intermediate_size=width,
        shared_expert_intermediate_size=width,
    )


_Q35_35B_A3B = _qwen3_5_moe(2048, 40, 16, 32, 256, 8, 512)
_Q35_122B_A10B = _qwen3_5_moe(3072, 48, 32, 64, 256, 8, 1024)
_Q35_397B_A17B = _qwen3_5_moe(4096, 60, 32, 64, 512, 10, 1024)
TINY_QWEN3_5 = "tiny-qwen3.5"
TINY_QWEN3_5_MOE = "tiny-qwen3.5-moe"
# The text-only fine-tune of a unified checkpoint: transformers' Qwen3_5ForCausalLM loads the language model and
# leaves the vision tower (and the multi-token-prediction layer) unread.
TEXT_ONLY_NOTE = (
    "the released checkpoint is a vision-language model: its language model is loaded and trained; the vision tower "
    "and the multi-token-prediction layer are neither loaded nor trained"
)
# The offline demo and the tests: Qwen3's real vocabulary (so the real tokenizer works) on a model small enough to
# train on two CPU cores in seconds.
_TINY = Architecture(
    64, 128, 2, 4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=4096
)

_TINY_HYBRID = replace(
    _qwen3_5(64, 128, 4, 4, 2, 4, tie_word_embeddings=True),
    head_dim=16,
    linear_num_key_heads=2,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    max_position_embeddings=4096,
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
        *(
            ModelSpec(f"Qwen{version}-{size}{base}", f"Qwen/Qwen{version}-{size}{base}", arch, thinking=True)
            for version, size, arch, bases in (
                ("3.5", "0.8B", _Q35_0_8B, ("", "-Base")),
                ("3.5", "2B", _Q35_2B, ("", "-Base")),
                ("3.5", "4B", _Q35_4B, ("", "-Base")),
                ("3.5", "9B", _Q35_9B, ("", "-Base")),
                ("3.5", "27B", _Q35_27B, ("",)),
                ("3.5", "35B-A3B", _Q35_35B_A3B, ("", "-Base")),
                ("3.5", "122B-A10B", _Q35_122B_A10B, ("",)),
                ("3.5", "397B-A17B", _Q35_397B_A17B, ("",)),
                ("3.6", "27B", _Q35_27B, ("",)),
                ("3.6", "35B-A3B", _Q35_35B_A3B, ("",)),
            )
            for base in bases
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
        # The tests' hybrids: three DeltaNet layers and one gated attention layer at tiny widths, Qwen3.5's real
        # vocabulary and tokenizer; the MoE one with 8 experts (2 a token) and a shared expert.
        ModelSpec(TINY_QWEN3_5, None, _TINY_HYBRID, thinking=True, tokenizer="qwen3.5-offline"),
        ModelSpec(
            TINY_QWEN3_5_MOE,
            None,
            replace(
                _TINY_HYBRID,
                tie_word_embeddings=False,
                num_experts=8,
                num_experts_per_tok=2,
                moe_intermediate_size=64,
                shared_expert_intermediate_size=128,
            ),
            thinking=True,
            tokenizer="qwen3.5-offline",
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
    if model_type not in (None, *MODEL_TYPES):
        raise UserError(
            f"{cfg_file}: model_type is {model_type!r}; autotune tunes Qwen3's dense models (qwen3), its "
            "mixture-of-experts models (qwen3_moe) and the Qwen3.5/3.6 hybrids (qwen3_5, qwen3_5_moe)"
        )
    arch = Architecture.from_hf_config(cfg)
    has_tokenizer = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    # A folder without tokenizer files (an architecture saved for random init) gets its family's offline tokenizer.
    offline = "qwen3.5-offline" if arch.is_hybrid else "qwen3-offline"
    return ModelSpec(
        path.name, None, arch, thinking=True, local_path=str(path), tokenizer=None if has_tokenizer else offline
    )
