"""Qwen3's mixture-of-experts models (issue 20): their architecture facts, LoRA on the fused experts with the router
frozen, the router's load-balancing loss in the training loss, and a real training of a tiny random Qwen3-MoE (8
experts, 2 per token) on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from autotune.catalog import CATALOG, TINY_MOE, Architecture, expert_lora_targets, resolve_model
from autotune.config import build_config
from autotune.context import RunContext
from autotune.errors import UserError
from tests.helpers.runs import loss_by_step, read_jsonl, tiny_values


def test_the_moe_models_have_their_published_sizes():
    """Qwen3-30B-A3B: 30.5B parameters, 3.3B active; Qwen3-235B-A22B: 235B, 22B active (the model cards)."""
    a3b, a22b = CATALOG["Qwen3-30B-A3B"].architecture, CATALOG["Qwen3-235B-A22B"].architecture
    assert round(a3b.param_count() / 1e9, 1) == 30.5 and round(a3b.active_param_count() / 1e9, 1) == 3.4
    assert round(a22b.param_count() / 1e9) == 235 and round(a22b.active_param_count() / 1e9) == 22
    assert all(a3b.is_sparse(layer) for layer in range(48)) and a3b.model_type == "qwen3_moe"
    for name in ("Qwen3-30B-A3B-Instruct-2507", "Qwen3-Coder-30B-A3B-Instruct", "Qwen3-235B-A22B-Thinking-2507"):
        assert CATALOG[name].architecture.max_position_embeddings == 262144


def test_an_moe_config_json_reads_back_into_the_same_architecture(tmp_path):
    """A local folder holding a qwen3_moe config.json (as transformers saves it) resolves to the architecture it was
    saved from; a dense model's recorded facts carry no expert fields (profiles solved before MoE keep their hash)."""
    a3b = CATALOG["Qwen3-30B-A3B"].architecture
    a3b.to_hf_config().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen3_moe"
    assert resolve_model(str(tmp_path)).architecture == a3b
    dense = CATALOG["Qwen3-8B"].architecture.facts()
    assert "num_experts" not in dense and "mlp_only_layers" not in dense
    skewed = json.loads((tmp_path / "config.json").read_text()) | {"num_experts_per_tok": 200}
    with pytest.raises(UserError, match="must not exceed num_experts"):
        Architecture.from_hf_config(skewed)


def test_expert_adapters_need_a_model_with_experts_and_no_dropout():
    with pytest.raises(UserError, match=r'lora_dropout.*take no dropout.*lora_experts "off"'):
        build_config({"model_name": "Qwen3-30B-A3B", "lora_dropout": 0.1})  # written by the user
    assert build_config({"model_name": "Qwen3-30B-A3B"}).lora_dropout == 0.0  # unset: 0 there, not a refusal
    assert build_config({"model_name": "Qwen3-30B-A3B", "lora_experts": "off"}).lora_dropout == 0.1
    with pytest.raises(UserError, match="dense model without any"):
        build_config({"model_name": "Qwen3-8B", "lora_experts": "on"})
    build_config({"model_name": "Qwen3-30B-A3B", "lora_dropout": 0.0})
    build_config({"model_name": "Qwen3-30B-A3B", "lora_experts": "off"})  # attention only: dropout is fine
    with pytest.raises(UserError, match=r"\['up_proj'\] are not Linear layers of Qwen3-30B-A3B"):
        build_config({"model_name": "Qwen3-30B-A3B", "lora_dropout": 0.0, "target_modules": ["q_proj", "up_proj"]})


def _tiny_moe(**values):
    from autotune.modeling import build_model

    cfg = build_config(
        {
            "model_name": TINY_MOE,
            "init": "random",
            "quantization": "none",
            "bf16": False,
            "lora_r": 4,
            "lora_dropout": 0.0,
            "target_modules": ["q_proj", "v_proj"],
            **values,
        }
    )
    return build_model(RunContext(cfg), device=torch.device("cpu"))


def test_the_experts_get_adapters_and_gradients_and_the_router_stays_frozen():
    """Every expert of every sparse layer: lora_A (r x experts, in) and lora_B (out, r x experts) on the fused gate/up
    and down tensors, as PEFT's target parameters; one backward gives them gradients (B randomised, so A's are not
    zero by construction) and gives the router none."""
    built = _tiny_moe()
    arch = built.spec.architecture
    assert expert_lora_targets(arch) == ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    named = dict(built.model.named_parameters())
    experts = {n: p for n, p in named.items() if ".mlp.experts." in n and p.requires_grad}
    assert len(experts) == arch.num_hidden_layers * 2 * 2  # 2 tensors x (A, B) per layer
    r, e = 4, arch.num_experts
    a_shapes = sorted(tuple(p.shape) for n, p in experts.items() if "lora_A" in n)
    assert set(a_shapes) == {(r * e, arch.hidden_size), (r * e, arch.moe_intermediate_size)}
    with torch.no_grad():
        for n, p in experts.items():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    built.model.train()
    out = built.model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in experts.values())
    router = [p for n, p in named.items() if n.endswith("mlp.gate.weight")]
    assert len(router) == arch.num_hidden_layers and all(not p.requires_grad and p.grad is None for p in router)


def test_the_fused_loss_adds_the_router_loss_as_the_model_does():
    """The fused loss (no logits) and the model's own loss agree, the router's load-balancing loss included with the
    model's coefficient."""
    from autotune.step import fused_causal_lm_loss

    built = _tiny_moe()
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    base = built.model.get_base_model()
    with torch.no_grad():
        own = built.model(input_ids=ids, labels=ids)
        fused, outputs = fused_causal_lm_loss(built.model, base, {"input_ids": ids, "labels": ids})
    assert base.router_aux_loss_coef == 0.001 and outputs.aux_loss.item() > 0
    assert torch.allclose(fused, own.loss, rtol=1e-5)
    without = own.loss - base.router_aux_loss_coef * own.aux_loss
    assert not torch.allclose(fused, without, rtol=1e-7)  # the auxiliary loss is in there


@pytest.mark.parametrize("fused", ["on", "off"])
def test_a_tiny_moe_learns_and_logs_its_router_loss(tmp_path, autotune_cache, fused):
    """`autotune train` on the tiny Qwen3-MoE: the loss falls, and every training record carries the router's
    auxiliary loss beside the loss."""
    from autotune.runner import train
    from tests.helpers.runs import QUIET

    cfg = build_config(
        tiny_values(
            tmp_path,
            model_name=TINY_MOE,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"],
            max_steps=30,
            max_sequence_length=64,
            fused_loss=fused,
        )
    )
    train(cfg, **QUIET)
    records = read_jsonl(cfg)
    losses = loss_by_step(records)
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < first / 2, losses
    metrics = [r["metrics"] for r in records if r["message"] == "metrics" and "loss" in r["metrics"]]
    assert metrics and all(m["aux_loss"] > 0 for m in metrics)


@pytest.mark.parametrize("experts_4bit", ["off", "on"])
def test_an_moe_run_exports_merged_with_the_experts_updates_and_as_an_adapter_peft_loads(
    tmp_path, autotune_cache, experts_4bit
):
    """`autotune export --merge` folds each expert's LoRA update into the fused expert tensors (PEFT's delta: expert
    e's B[:, :, e] @ A[e]): the merged model computes what the base with the adapter (PeftModel.from_pretrained)
    computes, and not what the base alone does. The adapter folder loads in PEFT as is, also when the run trained
    on NF4 experts (experts_4bit: the adapter is PEFT's own), and the export says the experts were NF4."""
    from autotune.runner import train
    from tests.helpers.exports import exported_logits, random_base
    from tests.helpers.runs import QUIET

    cfg = build_config(
        tiny_values(
            tmp_path,
            model_name=TINY_MOE,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"],
            max_steps=6,
            experts_4bit=experts_4bit,
        )
    )
    train(cfg, **QUIET)
    got = exported_logits(cfg, tmp_path, random_base(cfg))
    plain, tuned, folded = got["plain"], got["tuned"], got["folded"]
    assert json.loads((got["merged"] / "config.json").read_text())["architectures"] == ["Qwen3MoeForCausalLM"]
    torch.testing.assert_close(folded, tuned, rtol=1e-4, atol=1e-4)
    assert (tuned - plain).abs().max() > 1e-2  # the adapter changed the model, the experts' updates included
    assert any("NF4 (experts_4bit)" in note for note in got["notes"]) is (experts_4bit == "on")


# --------------------------------------------------------------------------- the experts in 4 bits (experts_4bit)


def _expert_grads(built, ids) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    built.model.zero_grad(set_to_none=True)
    out = built.model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in built.model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def test_the_4bit_experts_compute_what_the_experts_dequantized_up_front_compute():
    """experts_4bit on: every expert tensor is NF4 (no 3-D parameter left, about half a byte a weight), each routed
    expert dequantized for its product and the adapters applied as their two factors. Switched off, the same NF4
    values dequantized up front run through PEFT's own path (the folded tensor): the same loss and the same gradient
    of every adapter, to fp32's rounding."""
    from autotune.modeling import apply_knobs
    from autotune.techniques.experts_4bit import Nf4Experts

    built = _tiny_moe(experts_4bit="on")
    arch = built.spec.architecture
    assert built.knobs.experts_4bit
    base = built.model.get_base_model()
    nf4 = [m for m in base.modules() if isinstance(m, Nf4Experts)]
    assert len(nf4) == arch.num_hidden_layers
    assert not [n for n, p in base.named_parameters() if p.dim() == 3]  # the full-precision tables are gone
    weights = sum(e * o * i for e, o, i in arch.expert_shapes().values())
    stored = sum(b.numel() * b.element_size() for b in nf4[0].buffers())
    assert 0.5 * weights < stored < 0.6 * weights  # 4 bits a weight and its block statistics, not fp32's 4 bytes
    _randomise_b(built)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    built.model.train()
    loss, grads = _expert_grads(built, ids)

    apply_knobs(built, built.knobs.with_(experts_4bit=False, experts_split_lora=False))
    assert not [m for m in base.modules() if isinstance(m, Nf4Experts)]
    assert len([p for p in base.parameters() if p.dim() == 3]) == 2 * arch.num_hidden_layers
    loss_up_front, grads_up_front = _expert_grads(built, ids)
    _assert_the_same_step(arch, (loss, grads), (loss_up_front, grads_up_front))


def _assert_the_same_step(arch, got: tuple, want: tuple) -> None:
    """The same loss and the same gradient of every adapter, to fp32's rounding; every expert adapter has one."""
    (loss, grads), (want_loss, want_grads) = got, want
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    experts = [n for n in grads if ".mlp.experts." in n]
    assert len(experts) == 4 * arch.num_hidden_layers and set(grads) == set(want_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(grads[n].abs().sum() > 0 for n in experts)


def _randomise_b(built) -> None:
    with torch.no_grad():
        for n, p in built.model.named_parameters():
            if "lora_B" in n:  # B starts at zero: give the adapters an update to apply
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))


def test_the_split_lora_computes_what_peft_folding_the_experts_computes():
    """experts_split_lora on (auto's default for an MoE model): PEFT's wrappers pass their input on and the experts
    add each routed expert's update as two thin products. Off: PEFT folds B @ A into the fused tensors, its own path.
    The same loss and the same gradient of every adapter, to fp32's rounding; the experts stay the module's
    parameters (FSDP shards them as before), and the saved adapter is PEFT's either way."""
    from peft.tuners.lora.layer import ParamWrapper

    from autotune.modeling import apply_knobs
    from autotune.techniques.split_lora import ThinFactorExperts

    built = _tiny_moe()
    arch = built.spec.architecture
    assert built.knobs.experts_split_lora and not built.knobs.experts_4bit
    base = built.model.get_base_model()
    split = [m for m in base.modules() if isinstance(m, ThinFactorExperts)]
    assert len(split) == arch.num_hidden_layers
    assert len([p for p in base.parameters() if p.dim() == 3]) == 2 * arch.num_hidden_layers
    _randomise_b(built)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    built.model.train()
    loss, grads = _expert_grads(built, ids)
    saved = {k: v.clone() for k, v in built.model.state_dict().items()}

    apply_knobs(built, built.knobs.with_(experts_split_lora=False))
    assert not [m for m in base.modules() if isinstance(m, ThinFactorExperts)]
    wrappers = [m for m in base.modules() if isinstance(m, ParamWrapper)]
    assert wrappers and all(type(w) is ParamWrapper for w in wrappers)  # PEFT's own forward again
    folded_loss, folded_grads = _expert_grads(built, ids)
    _assert_the_same_step(arch, (loss, grads), (folded_loss, folded_grads))
    assert built.model.state_dict().keys() == saved.keys()  # the same names: PEFT's adapter, whichever path

    # Back on, then the NF4 experts on and off over it: the split form survives the round trip, never folded twice.
    apply_knobs(built, built.knobs.with_(experts_split_lora=True))
    apply_knobs(built, built.knobs.with_(experts_4bit=True))
    apply_knobs(built, built.knobs.with_(experts_4bit=False))
    assert len([m for m in base.modules() if isinstance(m, ThinFactorExperts)]) == arch.num_hidden_layers
    again, _ = _expert_grads(built, ids)
    apply_knobs(built, built.knobs.with_(experts_split_lora=False))  # the NF4-rounded weights, folded by PEFT alone
    folded_again, _ = _expert_grads(built, ids)
    torch.testing.assert_close(again, folded_again, rtol=1e-5, atol=1e-6)


def test_the_4bit_experts_need_experts_and_are_on_by_default_with_4bit_quantization():
    """auto means on for an MoE model loaded in 4 bits (a QLoRA of it stores the experts in 4 bits too), off in
    bf16; a dense model refuses "on" (its MLP Linears are bitsandbytes' to quantize); FSDP refuses it."""
    from autotune.techniques import check_strategy, resolve

    moe = resolve_model(TINY_MOE)
    for quantization, expected in (("4bit", True), ("none", False)):
        cfg = build_config({"model_name": TINY_MOE, "quantization": quantization})
        assert cfg.lora_dropout == 0.0  # unset: 0 for adapters on experts
        assert resolve(cfg, moe).experts_4bit is expected
    with pytest.raises(UserError, match='experts_4bit "on": tiny-qwen3 has no experts'):
        resolve(build_config({"model_name": "tiny-qwen3", "experts_4bit": "on"}), resolve_model("tiny-qwen3"))
    with pytest.raises(UserError, match=r"experts_4bit.*fsdp: FSDP shards parameters"):
        check_strategy(build_config({"model_name": TINY_MOE, "experts_4bit": "on"}), "fsdp", 2)
