"""The memory techniques of the training step: one row each in `TECHNIQUES`, one file each beside this one.

A row declares everything autotune knows of a technique: its config key (auto|on|off) and what `auto` means
without a solved profile, its label in trial lines, its documentation, the rules for when it applies (another
knob it needs, untied embeddings only, refused under FSDP), the speed prior the solver ranks it by, how it is
switched on a built model (or that the step applies it), and the estimate terms it changes. Everything else
reads the table: the config's keys and their documentation (config.py), the knobs a trial measures and a profile
records (`Knobs`), the combinations the solver searches, the model build (modeling.apply_knobs), the estimate's
shape, FSDP's refusals. Adding a technique is its file and its row (docs/architecture.md).

- fused_loss.py: the loss without the full logits (liger-kernel on CUDA, chunked PyTorch everywhere).
- offload.py: gradient-checkpointed layer inputs kept in CPU memory between forward and backward.
- host_embedding.py: the frozen input-embedding table of an untied model kept in CPU memory.
- int8_head.py: the frozen lm_head of an untied model in 8-bit, read a block of rows at a time by the fused loss.
- tiled_mlp.py: each layer's MLP a slice of tokens at a time, keeping only its input for backward.
- packing.py: padding-free packing, a micro-batch's samples in one row with attention blocked at boundaries.
- experts_4bit.py: an MoE model's fused expert tensors in NF4, dequantized one routed expert at a time.
- split_lora.py: an MoE model's expert adapters applied as two thin products per routed expert, never folded.

Gradient checkpointing is a knob too (`Knobs.checkpointing`, the config's boolean gradient_checkpointing; it
predates this table and modeling.py switches it). Importing this module must not import torch.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import itertools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autotune.catalog import Architecture, ModelSpec
from autotune.errors import UserError

if TYPE_CHECKING:
    from autotune.config import Config

# The values of a technique's config key: `auto` lets the solved profile decide (and falls back to the row's
# `auto` without one), `on` and `off` force it.
SWITCHES = ("auto", "on", "off")

# The fused loss's chunk: bytes of fp32 logits one chunk may take (chunk tokens x vocabulary x 4). 256 MiB is
# about 440 tokens of Qwen3's vocabulary; the backward holds one such buffer and its cast. Smaller chunks only
# add kernel launches. (Here, not in fused_loss.py, so the estimate reads it without importing torch.)
CHUNK_BYTES = 256 * 2**20

# The 8-bit lm_head's rows dequantized at once (int8_head.py): a block of this many rows in the compute dtype is
# the transient, and the fused loss's vocabulary block.
ROW_BLOCK = 16384

# The 8-bit lm_head is quantized this many rows at a time (int8_head.py): the fp32 scratch of building it is a
# block's, not the whole table's (about 10 GiB for Qwen3-8B's), beside the table it replaces.
QUANTIZE_ROWS = 4096

# Gradient checkpointing's speed prior: it recomputes a forward in backward (~1/3 more compute).
CHECKPOINTING_SPEED = 0.75


def chunk_tokens(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk: as many as keep one chunk's fp32 logits within `chunk_bytes` (at least 1)."""
    return max(1, chunk_bytes // (4 * vocab_size))


def tile_tokens(intermediate_size: int, dtype_bytes: int) -> int:
    """The tiled MLP's slice (tiled_mlp.py): as many tokens as keep a slice's intermediate-sized activations
    (gate, up, their product, and as many again in backward) within the fused loss's chunk budget."""
    return max(1, CHUNK_BYTES // (6 * intermediate_size * dtype_bytes))


# liger-kernel releases whose functional fused loss takes the keyword call fused_loss.py makes (ignore_index=,
# reduction=); before 0.5 it was a bare autograd Function.apply, and that call a TypeError at the first step.
LIGER_MIN_VERSION = (0, 5, 0)


def liger_problem() -> str | None:
    """Why an installed liger-kernel is not used (None: it is, or it is not installed)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    version = _liger_version()
    if version is None or version >= LIGER_MIN_VERSION:
        return None
    have, need = ".".join(map(str, version)), ".".join(map(str, LIGER_MIN_VERSION))
    return (
        f"liger-kernel {have} is installed, older than {need}, whose fused loss takes the call autotune makes: the "
        "chunked PyTorch loss runs instead (pip install -U liger-kernel for liger's kernel)"
    )


def _liger_version() -> tuple[int, ...] | None:
    try:
        raw = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = re.findall(r"\d+", raw)[:3]
    return tuple(int(p) for p in parts) if parts else None


def fused_kernel(device_type: str) -> str:
    """The fused loss's implementation on a device: liger-kernel's on CUDA where a release whose call matches is
    installed (liger_problem says why not), else the chunked PyTorch loss. The one decision: the step runs it
    (fused_loss.py), the estimate charges it, the solver's speed prior counts it. Told without importing liger."""
    if device_type != "cuda" or importlib.util.find_spec("liger_kernel") is None or liger_problem() is not None:
        return "chunked"
    return "liger"


@dataclass(frozen=True)
class Requirement:
    """Another knob a technique needs on: `knob` is "checkpointing" or a technique's key; `why` finishes the
    sentence "<key> "on" needs <knob>: ..."."""

    knob: str
    why: str


@dataclass(frozen=True)
class StrategyRule:
    """A way of sharing the model over several ranks that refuses a technique, and why (finishing the sentence
    "<key> "on" with distributed_strategy <strategy>: ..."). `only_with`: refused only when one of these
    projections carries LoRA adapters (empty: always)."""

    strategy: str  # "ddp" | "fsdp"
    why: str
    only_with: tuple[str, ...] = ()

    def refuses(self, strategy: str, world_size: int, targets: Iterable[str]) -> bool:
        if world_size <= 1 or strategy != self.strategy:
            return False  # one process: nothing wraps or shards the model
        return not self.only_with or any(t in self.only_with for t in targets)


@dataclass(frozen=True)
class ModelRule:
    """Models that cannot take a technique: those whose architecture has `fact` (a boolean of catalog.Architecture:
    "tie_word_embeddings", "is_moe", "is_dense", "is_hybrid"), and why (finishing the sentence "<model> ...")."""

    fact: str
    why: str

    def refuses(self, arch: Architecture) -> bool:
        return bool(getattr(arch, self.fact))


@dataclass(frozen=True)
class Technique:
    """One technique of the step, declared once."""

    key: str  # its config key and its Knobs field
    module: str  # its one file beside this table (autotune/techniques/<module>.py)
    label: str  # in trial lines and reasons ("ckpt+fused+offload")
    doc: str  # what it does, for the config reference (what `auto` means is added from `auto`)
    auto: bool  # what `auto` means without a solved profile
    # The step's relative speed with it on (1.0: free), by device type: orders the solver's candidates before
    # anything is measured (the measured tokens/s decides).
    speed: Callable[[str], float]
    # The function of its file that switches it on a built model, called as switch(model, on, place) (modeling.
    # apply_knobs); None: the step applies it (step.py, trial.py).
    switch: str | None = None
    needs: tuple[Requirement, ...] = ()
    # The models that cannot take it (tied embeddings, experts, linear attention), and why.
    refused_for: tuple[ModelRule, ...] = ()
    # The strategies of several ranks that refuse it (distributed_strategy ddp / fsdp), and why.
    refused_under: tuple[StrategyRule, ...] = ()
    # Whether solve measures it on and off when the config leaves it on auto (False: auto means the row's default).
    searched: bool = True
    # The estimate's terms (estimate/terms.py, by name) whose bytes it changes; tests/test_techniques_table.py
    # toggles each technique and holds the estimate to exactly these.
    estimate: tuple[str, ...] = ()
    # The whole run's terms it changes beyond the step's (estimate/run.py): while the model loads, and on the host.
    load: tuple[str, ...] = ()
    host: tuple[str, ...] = ()
    # The frozen table it keeps in host memory ("input": the input embedding, "output": lm_head), which the model
    # build therefore loads there, never on the device (modeling.load_base_model). None: it keeps none.
    host_table: str | None = None
    # The base quantizations with which `auto` means on without a solved profile, whatever `auto` says otherwise
    # (the 4-bit experts: a QLoRA of an MoE model stores its experts in 4 bits too).
    auto_with: tuple[str, ...] = ()
    # Another row that, when on, already computes the way this one does (the NF4 experts apply the adapters as thin
    # factors themselves): with it on, this row changes neither the step's memory nor its speed.
    subsumed_by: str | None = None

    def default(self, arch: Architecture, quantization: str) -> bool:
        """What `auto` means without a solved profile for this model and base quantization: the row's default (or
        on with one of `auto_with`), off where a model rule refuses it."""
        return (self.auto or quantization in self.auto_with) and self.refuses(arch) is None

    def refuses(self, arch: Architecture) -> ModelRule | None:
        """The first of its model rules that `arch` breaks (None: the model can take it)."""
        return next((rule for rule in self.refused_for if rule.refuses(arch)), None)

    def config_doc(self) -> str:
        auto = "on" if self.auto else "the profile's choice, else off"
        if self.auto_with:
            auto = f"the profile's choice, else on with quantization {' or '.join(map(repr, self.auto_with))}"
        return f"{self.doc} auto: {auto}."


@dataclass(frozen=True)
class Place:
    """What a model-level switch needs to know of the model it switches: every switch is called as
    `switch(model, on, place)` (modeling.apply_knobs)."""

    device: Any  # the torch.device the model trains on
    dtype_bytes: int  # its compute dtype's width
    checkpointing_kwargs: dict | None = None


def _free(device_type: str) -> float:
    return 1.0


def _costs(factor: float) -> Callable[[str], float]:
    def speed(device_type: str) -> float:
        return factor

    return speed


def _fused_loss_speed(device_type: str) -> float:
    """The chunked loss recomputes lm_head's matmul in backward; liger's kernel computes the gradient in forward."""
    return 1.0 if fused_kernel(device_type) == "liger" else 0.95


_UNTIED = "only untied models (Qwen3-8B, 14B, 32B) can"
_FSDP_TABLE = "FSDP already keeps 1/N of that table per rank, and the technique replaces the module FSDP shards"

TECHNIQUES_TABLE: tuple[Technique, ...] = (
    Technique(
        key="fused_loss",
        module="fused_loss",
        label="fused",
        doc="The loss straight from the hidden states, a chunk of tokens at a time, so the logits over Qwen3's 151,936-"
        "token vocabulary never exist all at once (liger-kernel's fused kernel on CUDA where it imports).",
        auto=True,
        speed=_fused_loss_speed,
        estimate=("head.loss", "calibration.cuda_logits"),
    ),
    Technique(
        key="offload_activations",
        module="offload",
        label="offload",
        doc="With gradient checkpointing, each layer's saved input goes to CPU memory in forward and comes back for "
        "backward.",
        auto=False,
        # Waits on a PCIe copy now and then.
        speed=_costs(0.9),
        switch="set_offload",
        needs=(Requirement("checkpointing", "it moves the inputs each checkpointed layer keeps"),),
        estimate=("layers.saved", "layers.backward"),
        host=("host.offload",),
    ),
    Technique(
        key="embedding_on_cpu",
        module="host_embedding",
        label="emb-cpu",
        doc="Untied models (Qwen3-8B/14B/32B): the frozen input-embedding table stays in CPU memory and only the rows "
        "looked up move to the GPU.",
        auto=False,
        # A gather on the CPU and a copy per forward.
        speed=_costs(0.97),
        switch="set_host_embedding",
        refused_for=(
            ModelRule(
                "tie_word_embeddings",
                f"ties its input embeddings to lm_head, which the loss needs on the GPU; {_UNTIED} keep the table in "
                "CPU memory",
            ),
        ),
        refused_under=(
            StrategyRule("fsdp", _FSDP_TABLE),
            StrategyRule(
                "ddp",
                "DDP wraps the whole model on each rank's GPU and cannot wrap a module whose table stays in CPU memory",
            ),
        ),
        estimate=("weights.embedding",),
        load=("weights.embedding",),
        host=("host.embedding", "host.embedding_rows"),
        host_table="input",
    ),
    Technique(
        key="lm_head_8bit",
        module="int8_head",
        label="int8-head",
        doc="Untied models (Qwen3-8B/14B/32B), with the fused loss: the frozen lm_head as int8 rows with fp32 scales, "
        "half its bf16 size, dequantized a block at a time.",
        auto=False,
        speed=_costs(0.97),
        switch="set_int8_head",
        needs=(
            Requirement(
                "fused_loss",
                "the fused loss reads the 8-bit table a block at a time, the plain loss would rebuild it whole",
            ),
        ),
        refused_for=(
            ModelRule(
                "tie_word_embeddings",
                f"ties lm_head to its input embeddings, which lookups need whole; {_UNTIED} keep lm_head in 8-bit",
            ),
        ),
        refused_under=(StrategyRule("fsdp", _FSDP_TABLE),),
        estimate=("weights.lm_head", "head.loss"),
        load=("weights.lm_head", "load.lm_head_8bit"),
        # The compute-dtype table it is quantized from is loaded on the host and waits there, so that a solve can
        # switch it back.
        host=("host.lm_head_copy",),
        host_table="output",
    ),
    Technique(
        key="tiled_mlp",
        module="tiled_mlp",
        label="tiled-mlp",
        doc="Each layer's MLP runs a slice of tokens at a time and keeps only its input for backward (recomputed per "
        "slice): long sequences.",
        auto=False,
        # Runs the MLP's forward twice without checkpointing, a third time with it.
        speed=_costs(0.9),
        switch="set_tiled_mlp",
        refused_for=(
            ModelRule(
                "is_moe", "has experts, not a dense MLP, in its layers: a token's rows already go through them apart"
            ),
        ),
        refused_under=(
            StrategyRule(
                "ddp",
                "each slice of tokens runs its own backward through the MLP's adapters, and DDP's gradient hooks refuse "
                "a parameter that becomes ready more than once a step. Put LoRA on attention only (target_modules), or "
                "use one process",
                only_with=("gate_proj", "up_proj", "down_proj"),
            ),
        ),
        estimate=("layers.saved", "layers.backward"),
    ),
    Technique(
        key="packing",
        module="packing",
        label="packed",
        doc="Padding-free packing: a micro-batch's samples are concatenated into one row, attention stops at sample "
        "boundaries and positions restart per sample; a micro-batch still holds batch_size samples.",
        auto=True,
        speed=_free,
        # A trial's rows are all full length, so a trial cannot show packing's gain (no padding to drop), only its
        # cost: the solver keeps the config's choice.
        searched=False,
        refused_for=(
            ModelRule(
                "is_hybrid",
                "has Gated DeltaNet layers, whose recurrent state and causal convolution would run on from one packed "
                "sample into the next (transformers' reference gated-delta path takes no sample boundaries); its "
                "micro-batches are padded instead",
            ),
        ),
        estimate=("misc.inputs",),
    ),
    Technique(
        key="experts_4bit",
        module="experts_4bit",
        label="nf4-experts",
        doc="MoE models (Qwen3-30B-A3B, 235B-A22B): the fused expert tensors, which bitsandbytes' 4-bit loading leaves "
        "in bf16 (53 of Qwen3-30B-A3B's 57 GiB), stored in NF4 and dequantized one routed expert at a time; the "
        "experts' adapters stay PEFT's.",
        auto=False,
        auto_with=("4bit",),
        # Each routed expert's two matrices dequantized per forward and again in backward (and the recompute).
        speed=_costs(0.85),
        switch="set_experts_4bit",
        refused_for=(
            ModelRule(
                "is_dense",
                'has no experts: its MLPs are Linears, which quantization "4bit" already stores in NF4',
            ),
        ),
        refused_under=(
            StrategyRule(
                "fsdp",
                "FSDP shards parameters, and the NF4 experts are buffers each rank would hold whole; under FSDP the "
                "experts are sharded in bf16",
            ),
        ),
        estimate=("weights.layers", "layers.saved", "layers.backward"),
        load=("weights.layers", "load.experts_4bit"),
        host=("host.experts",),
        host_table="experts",
    ),
    # After experts_4bit: its switch, run first (table order), settles which module the experts are; this one then
    # swaps a bf16 one's class.
    Technique(
        key="experts_split_lora",
        module="split_lora",
        label="split-lora",
        doc="MoE models with adapters on their experts (lora_experts): each routed expert's update applied as two "
        "thin products (Unsloth's split LoRA), where PEFT folds every expert's update into a whole copy of the fused "
        "expert tensors each forward and builds that copy's gradient in backward (two to three copies of a layer's "
        "experts; 4.5 GiB each for Qwen3-235B-A22B). The NF4 experts (experts_4bit) always run this way.",
        auto=True,
        # transformers' eager loop over the experts hit, where the folded tensor runs its grouped matmul.
        speed=_costs(0.85),
        switch="set_experts_split_lora",
        refused_for=(
            ModelRule("is_dense", "has no experts: the adapters of its MLPs' Linears are never folded into them"),
        ),
        estimate=("layers.saved", "layers.backward"),
        subsumed_by="experts_4bit",
    ),
)

TECHNIQUES = tuple(t.key for t in TECHNIQUES_TABLE)  # the config keys, one per technique, in table order
BY_KEY = {t.key: t for t in TECHNIQUES_TABLE}
KNOBS = ("checkpointing", *TECHNIQUES)  # a Knobs' fields


class Knobs:
    """Which techniques a step runs with (and whether it checkpoints): what a trial measures, a profile records
    and training applies. Immutable and hashable; one boolean per table row, read as an attribute
    (`knobs.fused_loss`). A technique not named is off."""

    __slots__ = ("_values",)
    _values: dict[str, bool]

    def __init__(self, checkpointing: bool = True, **switches: bool) -> None:
        unknown = sorted(set(switches) - set(TECHNIQUES))
        if unknown:
            raise TypeError(f"unknown technique(s) {unknown}: the table (autotune/techniques) has {list(TECHNIQUES)}")
        values = {"checkpointing": bool(checkpointing), **{k: bool(switches.get(k, False)) for k in TECHNIQUES}}
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name: str) -> bool:
        if name.startswith("_"):  # copy, pickle and friends probe for dunders: never a knob
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"Knobs has no knob {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Knobs are immutable: use with_()")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Knobs) and self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(self._values.items()))

    def __repr__(self) -> str:
        return "Knobs(" + ", ".join(f"{k}={v}" for k, v in self._values.items()) + ")"

    def __reduce__(self):
        return (_knobs, (self.to_dict(),))

    def with_(self, **changes: bool) -> Knobs:
        return Knobs(**{**self._values, **changes})

    def to_dict(self) -> dict[str, bool]:
        return dict(self._values)

    @classmethod
    def from_dict(cls, values: dict) -> Knobs:
        """The knobs a dict records; a technique it does not name is off (a record from before it existed)."""
        return cls(**{k: bool(values[k]) for k in KNOBS if k in values})

    def on(self) -> tuple[Technique, ...]:
        """The rows switched on, in table order."""
        return tuple(t for t in TECHNIQUES_TABLE if self._values[t.key])

    def describe(self) -> str:
        """A short label for trial lines and reasons: "ckpt+fused+offload", "no-ckpt+packed"."""
        return "+".join(["ckpt" if self.checkpointing else "no-ckpt", *(t.label for t in self.on())])

    def speed(self, device_type: str) -> float:
        """The step's relative speed with these knobs (1.0: none of them): the product of the rows' priors."""
        prior = CHECKPOINTING_SPEED if self.checkpointing else 1.0
        for t in self.on():
            if t.subsumed_by is None or not self._values[t.subsumed_by]:  # a subsumed row costs nothing more
                prior *= t.speed(device_type)
        return prior

    def lean_key(self) -> tuple[bool, ...]:
        """Orders knobs by how much memory they save, for max-seq and max-rank: checkpointing first, then the
        rows in table order."""
        return tuple(self._values[k] for k in KNOBS)

    def applicable(
        self,
        *,
        arch: Architecture,
        strategy: str = "ddp",
        world_size: int = 1,
        targets: Iterable[str] = (),
    ) -> Knobs:
        """These knobs less what cannot take effect: what the strategy refuses, a row whose needs are off, one whose
        model rules refuse `arch` (tied embeddings, experts, linear attention; the rows' rules, in table order)."""
        knobs = self.allowed_under(strategy, world_size, targets)
        for t in TECHNIQUES_TABLE:
            blocked = any(not getattr(knobs, n.knob) for n in t.needs) or t.refuses(arch) is not None
            if getattr(knobs, t.key) and blocked:
                knobs = knobs.with_(**{t.key: False})
        return knobs

    def leanest(self, **model_and_strategy: Any) -> Knobs:
        """These knobs with checkpointing and every searched row on that the model and strategy take (applicable's
        keywords): the most memory the techniques can save (what `autotune estimate` compares the config's answer
        with)."""
        every = self.with_(checkpointing=True, **{t.key: True for t in TECHNIQUES_TABLE if t.searched})
        return every.applicable(**model_and_strategy)

    def allowed_under(self, strategy: str, world_size: int, targets: Iterable[str]) -> Knobs:
        """These knobs with what `strategy` over `world_size` ranks refuses switched off (the rows' rules)."""
        targets = tuple(targets)
        refused = [
            t.key for t in TECHNIQUES_TABLE if any(r.refuses(strategy, world_size, targets) for r in t.refused_under)
        ]
        return self.with_(**dict.fromkeys(refused, False))


def _knobs(values: dict) -> Knobs:
    return Knobs(**values)


def resolve(cfg: Config, spec: ModelSpec) -> Knobs:
    """The switches a config asks for, `auto` resolved to the row's default (a solved profile writes explicit
    on/off values, so `auto` here means no profile decided). A switch that cannot apply to this model or config
    is a UserError naming it."""
    # `auto` is the row's default where the model can take it, off where a model rule refuses it (packing on a
    # hybrid); only an explicit "on" the model cannot take is an error.
    arch = spec.architecture
    values = {t.key: _switch(getattr(cfg, t.key), t.default(arch, cfg.quantization)) for t in TECHNIQUES_TABLE}
    knobs = Knobs(checkpointing=cfg.gradient_checkpointing, **values)
    check(knobs, spec)
    return knobs


def host_tables(knobs: Knobs) -> tuple[str, ...]:
    """The frozen tables ("input", "output", "experts") that the techniques on in `knobs` keep in host memory (or
    quantize from there)."""
    return tuple(t.host_table for t in knobs.on() if t.host_table is not None)


def check(knobs: Knobs, spec: ModelSpec) -> None:
    """The rules of the rows that are on, each broken one a UserError that says how to fix it."""
    for t in knobs.on():
        for need in t.needs:
            if not getattr(knobs, need.knob):
                fix = "gradient_checkpointing true" if need.knob == "checkpointing" else f'{need.knob} "on" or "auto"'
                name = "gradient_checkpointing" if need.knob == "checkpointing" else need.knob
                raise UserError(f'{t.key} "on" needs {name}: {need.why}. Set {fix}, or {t.key} "auto"/"off"')
        rule = t.refuses(spec.architecture)
        if rule is not None:
            raise UserError(f'{t.key} "on": {spec.name} {rule.why}. Set it "auto" or "off"')


def check_strategy(cfg: Config, strategy: str, world_size: int) -> None:
    """What the config's switches ask that `strategy` over `world_size` ranks refuses, as one UserError (before
    anything starts: the solver never proposes it, and train refuses it before the first step)."""
    for t in TECHNIQUES_TABLE:
        if getattr(cfg, t.key) != "on":
            continue
        for rule in t.refused_under:
            if rule.refuses(strategy, world_size, cfg.target_modules):
                other = "ddp" if strategy == "fsdp" else "fsdp"
                raise UserError(
                    f'{t.key} "on" with distributed_strategy {strategy}: {rule.why}. Set {t.key} "auto" or "off", or '
                    f"use --strategy {other}"
                )


def valid(
    knobs: Knobs, spec: ModelSpec, strategy: str = "ddp", world_size: int = 1, targets: Iterable[str] = ()
) -> bool:
    """Whether `check` would accept these knobs for this model, and `strategy` over `world_size` ranks takes them."""
    try:
        check(knobs, spec)
    except UserError:
        return False
    return knobs.allowed_under(strategy, world_size, targets) == knobs


def open_values(
    cfg: Config, spec: ModelSpec, *, checkpointing: str = "auto", keep_off: Iterable[str] = ()
) -> dict[str, tuple[bool, ...]]:
    """The values each knob may take when the techniques are chosen (by solve's measurements, or the estimate's
    plan): a config switch on "auto" leaves both open where the row is searched, "on"/"off" fixes it; so does
    `checkpointing` ("auto" | "on" | "off"). A row that is not searched keeps its default (packing: a trial's rows
    are all full length, so it cannot show packing's gain, only its cost); a row in `keep_off` stays off."""
    default = resolve(cfg, spec)
    allowed: dict[str, tuple[bool, ...]] = {
        "checkpointing": {"auto": (False, True), "on": (True,), "off": (False,)}[checkpointing]
    }
    for t in TECHNIQUES_TABLE:
        open_ = t.searched and getattr(cfg, t.key) == "auto"
        if open_ and t.key in keep_off:
            allowed[t.key] = (False,)
        else:
            allowed[t.key] = (False, True) if open_ else (getattr(default, t.key),)
    return allowed


def valid_combinations(
    allowed: dict[str, tuple[bool, ...]],
    spec: ModelSpec,
    strategy: str = "ddp",
    world_size: int = 1,
    targets: Iterable[str] = (),
) -> list[Knobs]:
    """Every combination of the `allowed` values (open_values) that this model takes and `strategy` over
    `world_size` ranks allows (a combination the strategy refuses is never proposed), fewest switches first."""
    targets = tuple(targets)
    out = []
    for values in itertools.product(*(allowed[k] for k in KNOBS)):
        knobs = Knobs(**dict(zip(KNOBS, values, strict=True)))
        if valid(knobs, spec, strategy, world_size, targets):
            out.append(knobs)
    return out


def _switch(value: str, default: bool) -> bool:
    return default if value == "auto" else value == "on"


def as_config_values(knobs: Knobs) -> dict:
    """The switches as config values ("on"/"off", and gradient_checkpointing), as a profile records them."""
    values: dict = {t.key: "on" if getattr(knobs, t.key) else "off" for t in TECHNIQUES_TABLE}
    values["gradient_checkpointing"] = knobs.checkpointing
    return values


def switch_function(technique: Technique) -> Callable[..., Any] | None:
    """The row's model-level switch, imported (it needs torch); None for a technique the step applies."""
    if technique.switch is None:
        return None
    return getattr(importlib.import_module(f"{__name__}.{technique.module}"), technique.switch)


def model_level() -> Iterable[Technique]:
    """The rows switched on a built model (the rest go with the knobs to the step)."""
    return (t for t in TECHNIQUES_TABLE if t.switch is not None)
