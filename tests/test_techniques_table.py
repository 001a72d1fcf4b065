"""The techniques table (autotune/techniques/__init__.py) is the one place a technique is declared: its config key,
its knobs, its rules, its labels and the estimate terms it changes are all read from its row."""

from __future__ import annotations

import itertools

import pytest

from autotune.catalog import resolve_model
from autotune.config import Config, build_config
from autotune.errors import UserError
from autotune.estimate import StepShape, estimate, plan_run
from autotune.profile import CHOICE_KEYS
from autotune.techniques import (
    KNOBS,
    SWITCHES,
    TECHNIQUES,
    TECHNIQUES_TABLE,
    Knobs,
    as_config_values,
    check,
    check_strategy,
    resolve,
)

UNTIED = resolve_model("Qwen3-8B")  # every technique but the MoE one applies to an untied dense model
MOE = resolve_model("Qwen3-30B-A3B")  # untied too, with experts
TIED = resolve_model("Qwen3-0.6B")
# A model with each fact a row's model rule may name (catalog.Architecture's booleans).
MODEL_WITH = {
    "tie_word_embeddings": TIED,
    "is_moe": MOE,
    "is_dense": UNTIED,
    "is_hybrid": resolve_model("Qwen3.5-9B"),
}


def takes(t):
    """A model the row applies to: the untied dense one, else the MoE one."""
    return next(spec for spec in (UNTIED, MOE) if t.refuses(spec.architecture) is None)


@pytest.mark.parametrize("t", TECHNIQUES_TABLE, ids=lambda t: t.key)
def test_a_row_is_a_config_key_a_knob_and_a_profile_choice(t):
    field = next(f for f in Config.__dataclass_fields__.values() if f.name == t.key)
    assert field.metadata["kind"] == "choice:" + "|".join(SWITCHES)
    assert field.metadata["doc"] == t.config_doc() and t.doc in field.metadata["doc"]
    assert getattr(Config(), t.key) == "auto"
    assert t.key in KNOBS and t.key in CHOICE_KEYS
    # `auto` without a profile means the row's default (or on with a base quantization it names); on/off force it.
    spec = takes(t)
    for quantization in ("4bit", "none"):
        auto = t.auto or quantization in t.auto_with
        for value, expected in (("auto", auto), ("on", True), ("off", False)):
            needs = {n.knob: "on" for n in t.needs if n.knob != "checkpointing"}
            cfg = build_config({"model_name": spec.name, t.key: value, "quantization": quantization, **needs})
            assert getattr(resolve(cfg, spec), t.key) is expected
    assert t.label in Knobs(**{t.key: True}).describe()
    assert as_config_values(Knobs(**{t.key: True}))[t.key] == "on"


def test_knobs_take_every_row_and_nothing_else():
    assert Knobs().to_dict() == {"checkpointing": True, **{k: False for k in TECHNIQUES}}
    every = Knobs(**{k: True for k in TECHNIQUES})
    assert Knobs.from_dict(every.to_dict()) == every and hash(Knobs.from_dict(every.to_dict())) == hash(every)
    assert Knobs.from_dict({"checkpointing": False}) == Knobs(checkpointing=False)  # a record from before a row
    with pytest.raises(TypeError, match="unknown technique"):
        Knobs(zero3=True)
    with pytest.raises(AttributeError):
        every.fused_loss = False  # type: ignore[misc]


@pytest.mark.parametrize("t", [t for t in TECHNIQUES_TABLE if t.needs or t.refused_for], ids=lambda t: t.key)
def test_a_rows_rules_refuse_what_it_cannot_do_saying_how_to_fix_it(t):
    with_needs = Knobs(**{n.knob: True for n in t.needs}, **{t.key: True})
    check(with_needs, takes(t))  # everything it needs: accepted
    for need in t.needs:
        with pytest.raises(UserError, match=f'{t.key} "on" needs') as exc:
            check(with_needs.with_(**{need.knob: False}), takes(t))
        assert need.why in str(exc.value) and '"auto"/"off"' in str(exc.value)
    for rule in t.refused_for:
        refused = MODEL_WITH[rule.fact]
        with pytest.raises(UserError, match=refused.name) as exc:
            check(with_needs, refused)
        assert rule.why in str(exc.value)
        assert not getattr(with_needs.applicable(arch=refused.architecture), t.key)  # the estimate drops it
        assert t.auto is False or not getattr(resolve(build_config({"model_name": refused.name}), refused), t.key)


RULES = [(t, rule) for t in TECHNIQUES_TABLE for rule in t.refused_under]


@pytest.mark.parametrize("t, rule", RULES, ids=lambda x: getattr(x, "key", None) or getattr(x, "strategy", ""))
def test_a_strategy_that_refuses_a_row_refuses_it_before_anything_starts_and_its_estimate_drops_it(t, rule):
    targets = list(rule.only_with) or ["q_proj", "v_proj"]
    cfg = build_config({"model_name": takes(t).name, t.key: "on", "fused_loss": "on", "target_modules": targets})
    check_strategy(cfg, rule.strategy, 1)  # one process: nothing wraps or shards it
    other = "ddp" if rule.strategy == "fsdp" else "fsdp"
    if not any(r.strategy == other for r in t.refused_under):
        check_strategy(cfg, other, 2)
    with pytest.raises(UserError, match=f'{t.key} "on" with distributed_strategy {rule.strategy}') as exc:
        check_strategy(cfg, rule.strategy, 2)
    assert rule.why in str(exc.value) and f"--strategy {other}" in str(exc.value)
    knobs = Knobs(fused_loss=True, **{t.key: True})
    assert getattr(knobs.allowed_under(rule.strategy, 2, targets), t.key) is False
    assert getattr(knobs.allowed_under(rule.strategy, 1, targets), t.key) is True
    shape = StepShape(takes(t).architecture, 1, 512, 16, target_modules=tuple(targets), knobs=knobs, world_size=2,
                      strategy=rule.strategy)  # fmt: skip
    assert getattr(shape.knobs, t.key) is False


def test_the_tiled_mlp_under_ddp_is_refused_only_with_lora_on_the_mlp():
    attention = build_config({"model_name": TIED.name, "tiled_mlp": "on", "target_modules": ["q_proj", "o_proj"]})
    check_strategy(attention, "ddp", 2)  # the tiles' backward touches no adapter: DDP's hooks never fire twice
    mlp = build_config({"model_name": TIED.name, "tiled_mlp": "on", "target_modules": ["q_proj", "down_proj"]})
    with pytest.raises(UserError, match="becomes ready more than once"):
        check_strategy(mlp, "ddp", 2)


def test_the_solver_never_proposes_what_its_strategy_refuses():
    from autotune.context import RunContext
    from autotune.solve.plan import SolveRequest, combinations

    cfg = build_config({"model_name": UNTIED.name, "target_modules": ["q_proj", "gate_proj"]})
    one = combinations(SolveRequest(RunContext(cfg)))
    assert any(k.tiled_mlp for k in one) and any(k.embedding_on_cpu for k in one)
    two = combinations(SolveRequest(RunContext(cfg), world_size=2, strategy="ddp"))
    assert two and not any(k.tiled_mlp or k.embedding_on_cpu for k in two)
    assert {k for k in one if not (k.tiled_mlp or k.embedding_on_cpu)} == set(two)
    fsdp = combinations(SolveRequest(RunContext(cfg), world_size=2, strategy="fsdp"))
    assert not any(k.embedding_on_cpu or k.lm_head_8bit for k in fsdp) and any(k.tiled_mlp for k in fsdp)


def _shapes():
    """Shapes across what the terms depend on (of a model the technique applies to: _toggled)."""
    for device, checkpointing, (batch, seq), quantization in itertools.product(
        ("cuda", "cpu"), (True, False), ((1, 512), (2, 4096)), ("4bit", "none")
    ):
        yield dict(device=device, batch=batch, seq=seq, quantization=quantization), checkpointing


@pytest.mark.parametrize("t", TECHNIQUES_TABLE, ids=lambda t: t.key)
def test_a_row_changes_exactly_the_estimate_terms_it_names(t):
    """Toggling a technique changes only the terms its row declares, and every one of them somewhere."""
    changed: set[str] = set()
    for off_shape, on_shape in _toggled(t):
        off, on = estimate(off_shape).terms, estimate(on_shape).terms
        diff = {name for name in off if off[name] != on[name]}
        assert diff <= set(t.estimate), (on_shape, diff - set(t.estimate))
        changed |= diff
    assert changed == set(t.estimate)


@pytest.mark.parametrize("t", [t for t in TECHNIQUES_TABLE if t.subsumed_by], ids=lambda t: t.key)
def test_a_subsumed_row_changes_nothing_while_the_row_that_subsumes_it_is_on(t):
    """With the row that subsumes it on (the NF4 experts apply the adapters as thin factors themselves), toggling
    the row changes neither the estimate nor the speed the solver and the estimate's plan rank by; with it off, the
    row does change the estimate (the subsumption is real, not a row that never matters)."""
    subsumer = next(row for row in TECHNIQUES_TABLE if row.key == t.subsumed_by)
    for values, checkpointing in _shapes():
        for outer in (True, False):
            base = Knobs(checkpointing=checkpointing, **{subsumer.key: outer})
            pair = [
                StepShape(takes(t).architecture, rank=16, knobs=base.with_(**{t.key: on}), **values) for on in (0, 1)
            ]
            terms = [estimate(shape).terms for shape in pair]
            if outer:
                assert terms[0] == terms[1], values
                assert pair[0].knobs.speed(values["device"]) == pair[1].knobs.speed(values["device"])
            else:
                assert terms[0] != terms[1] and pair[0].knobs.speed("cuda") > pair[1].knobs.speed("cuda"), values


def _toggled(t):
    """Pairs of shapes (the technique off, on) over _shapes(), with the knobs it needs on in both."""
    for values, checkpointing in _shapes():
        needs = {n.knob: True for n in t.needs}
        if not checkpointing and "checkpointing" in needs:
            continue
        base = Knobs(**{"checkpointing": checkpointing, **needs})
        arch = takes(t).architecture
        yield (
            StepShape(arch, rank=16, knobs=base, **values),
            StepShape(arch, rank=16, knobs=base.with_(**{t.key: True}), **values),
        )


@pytest.mark.parametrize("t", TECHNIQUES_TABLE, ids=lambda t: t.key)
def test_a_row_changes_exactly_the_load_and_host_terms_it_names(t):
    """The whole run (estimate/run.py): toggling a technique changes only the load and host terms its row declares
    (beside the step's), and every one of them somewhere."""
    changed: set[str] = set()
    for off_shape, on_shape in _toggled(t):
        off, on = plan_run(off_shape), plan_run(on_shape)
        load = {k for k in off.phase_terms["load"] if off.phase_terms["load"][k] != on.phase_terms["load"][k]}
        host = {k for k in off.host if off.host[k] != on.host[k]}
        assert load <= set(t.load) and host <= set(t.host), (on_shape, load, host)
        changed |= load | host
    assert changed == set(t.load) | set(t.host)


@pytest.mark.parametrize("version, kernel", [("0.4.2", "chunked"), ("0.5.0", "liger"), ("0.6.1.dev3", "liger")])
def test_liger_kernel_runs_only_from_the_release_whose_call_matches(monkeypatch, version, kernel):
    """Faked: liger-kernel is not installable here (triton, CUDA); what is read of it is its metadata."""
    import importlib.metadata
    import importlib.util

    from autotune import techniques

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "liger_kernel" else real_find_spec(name, *a)
    )
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version if name == "liger-kernel" else "0")
    assert techniques.fused_kernel("cuda") == kernel
    assert techniques.fused_kernel("cpu") == "chunked"
    problem = techniques.liger_problem()
    if kernel == "chunked":
        assert problem and f"liger-kernel {version} is installed, older than 0.5.0" in problem
        assert "chunked PyTorch loss runs instead" in problem
    else:
        assert problem is None
    # The estimate charges the kernel that runs.
    from autotune.estimate import shape_for

    cfg = build_config({"model_name": UNTIED.name})
    assert shape_for(cfg, UNTIED.architecture, batch=1, seq=64, rank=8, device="cuda").fused_kernel == kernel
