"""The techniques table (autotune/techniques/__init__.py) is the one place a technique is declared: its config key,
its knobs, its rules, its labels and the estimate terms it changes are all read from its row."""

from __future__ import annotations

import itertools

import pytest

from autotune.catalog import resolve_model
from autotune.config import Config, build_config
from autotune.errors import UserError
from autotune.estimate import StepShape, estimate
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

UNTIED = resolve_model("Qwen3-8B")  # every technique applies to an untied model
TIED = resolve_model("Qwen3-0.6B")


@pytest.mark.parametrize("t", TECHNIQUES_TABLE, ids=lambda t: t.key)
def test_a_row_is_a_config_key_a_knob_and_a_profile_choice(t):
    field = next(f for f in Config.__dataclass_fields__.values() if f.name == t.key)
    assert field.metadata["kind"] == "choice:" + "|".join(SWITCHES)
    assert field.metadata["doc"] == t.config_doc() and t.doc in field.metadata["doc"]
    assert getattr(Config(), t.key) == "auto"
    assert t.key in KNOBS and t.key in CHOICE_KEYS
    # `auto` without a profile means the row's default; on/off force it.
    for value, expected in (("auto", t.auto), ("on", True), ("off", False)):
        needs = {n.knob: "on" for n in t.needs if n.knob != "checkpointing"}
        cfg = build_config({"model_name": UNTIED.name, t.key: value, **needs})
        assert getattr(resolve(cfg, UNTIED), t.key) is expected
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


@pytest.mark.parametrize("t", [t for t in TECHNIQUES_TABLE if t.needs or t.untied_only], ids=lambda t: t.key)
def test_a_rows_rules_refuse_what_it_cannot_do_saying_how_to_fix_it(t):
    with_needs = Knobs(**{n.knob: True for n in t.needs}, **{t.key: True})
    check(with_needs, UNTIED)  # everything it needs: accepted
    for need in t.needs:
        with pytest.raises(UserError, match=f'{t.key} "on" needs') as exc:
            check(with_needs.with_(**{need.knob: False}), UNTIED)
        assert need.why in str(exc.value) and '"auto"/"off"' in str(exc.value)
    if t.untied_only:
        with pytest.raises(UserError, match=TIED.name) as exc:
            check(with_needs, TIED)
        assert t.untied_only in str(exc.value)


@pytest.mark.parametrize("t", [t for t in TECHNIQUES_TABLE if t.fsdp], ids=lambda t: t.key)
def test_a_row_fsdp_refuses_is_refused_under_fsdp_and_off_in_its_estimate(t):
    cfg = build_config({"model_name": UNTIED.name, t.key: "on", "fused_loss": "on"})
    check_strategy(cfg, "ddp")
    with pytest.raises(UserError, match=f'{t.key} "on" with distributed_strategy fsdp') as exc:
        check_strategy(cfg, "fsdp")
    assert t.fsdp in str(exc.value)
    knobs = Knobs(fused_loss=True, **{t.key: True})
    assert getattr(knobs.under_fsdp(), t.key) is False
    shape = StepShape(UNTIED.architecture, 1, 512, 16, knobs=knobs, world_size=2, strategy="fsdp")
    assert getattr(shape.knobs, t.key) is False


def _shapes():
    """Shapes of an untied model where every technique applies, across what the terms depend on."""
    for device, checkpointing, (batch, seq), quantization in itertools.product(
        ("cuda", "cpu"), (True, False), ((1, 512), (2, 4096)), ("4bit", "none")
    ):
        yield dict(device=device, batch=batch, seq=seq, quantization=quantization), checkpointing


@pytest.mark.parametrize("t", TECHNIQUES_TABLE, ids=lambda t: t.key)
def test_a_row_changes_exactly_the_estimate_terms_it_names(t):
    """Toggling a technique changes only the terms its row declares, and every one of them somewhere."""
    changed: set[str] = set()
    for values, checkpointing in _shapes():
        needs = {n.knob: True for n in t.needs}
        if not checkpointing and "checkpointing" in needs:
            continue
        base = Knobs(**{"checkpointing": checkpointing, **needs})
        off = estimate(StepShape(UNTIED.architecture, rank=16, knobs=base, **values)).terms
        on = estimate(StepShape(UNTIED.architecture, rank=16, knobs=base.with_(**{t.key: True}), **values)).terms
        diff = {name for name in off if off[name] != on[name]}
        assert diff <= set(t.estimate), (values, checkpointing, diff - set(t.estimate))
        changed |= diff
    assert changed == set(t.estimate)
