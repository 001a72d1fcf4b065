"""Tests for autotune.catalog: architecture facts against transformers, and model-name resolution."""

from __future__ import annotations

import dataclasses
import json

import pytest

from autotune.catalog import (
    CATALOG,
    FULL_ATTENTION,
    LINEAR_ATTENTION,
    TINY,
    TINY_MOE,
    TINY_QWEN3_5,
    TINY_QWEN3_5_MOE,
    Architecture,
    ModelSpec,
    resolve_model,
)
from autotune.errors import UserError

# Published sizes (total parameters, embeddings counted once when tied), in billions.
PUBLISHED_B = {
    "Qwen3-0.6B": 0.596,
    "Qwen3-1.7B": 1.72,
    "Qwen3-4B": 4.02,
    "Qwen3-4B-Thinking-2507": 4.02,
    "Qwen3-4B-Instruct-2507": 4.02,
    "Qwen3-8B": 8.19,
    "Qwen3-14B": 14.77,
    "Qwen3-32B": 32.76,
    # The MoE models' cards: 30.5B (3.3B active), 235B (22B active).
    "Qwen3-30B-A3B": 30.5,
    "Qwen3-30B-A3B-Instruct-2507": 30.5,
    "Qwen3-30B-A3B-Thinking-2507": 30.5,
    "Qwen3-Coder-30B-A3B-Instruct": 30.5,
    "Qwen3-235B-A22B": 235,
    "Qwen3-235B-A22B-Instruct-2507": 235,
    "Qwen3-235B-A22B-Thinking-2507": 235,
}


# The Qwen3.5/3.6 releases' sizes as their names give them (billions: all parameters, and for the MoE ones those a
# token goes through); the text models autotune trains are within 7% of them (the vision tower is not counted).
HYBRID_PUBLISHED_B = {
    "Qwen3.5-0.8B": (0.8, None),
    "Qwen3.5-2B": (2, None),
    "Qwen3.5-4B": (4, None),
    "Qwen3.5-9B": (9, None),
    "Qwen3.5-27B": (27, None),
    "Qwen3.5-35B-A3B": (35, 3),
    "Qwen3.5-122B-A10B": (122, 10),
    "Qwen3.5-397B-A17B": (397, 17),
    "Qwen3.6-27B": (27, None),
    "Qwen3.6-35B-A3B": (35, 3),
}
BASES = ("Qwen3.5-0.8B-Base", "Qwen3.5-2B-Base", "Qwen3.5-4B-Base", "Qwen3.5-9B-Base", "Qwen3.5-35B-A3B-Base")
TINIES = (TINY, TINY_MOE, TINY_QWEN3_5, TINY_QWEN3_5_MOE)


def user_error(fn, *args) -> str:
    with pytest.raises(UserError) as info:
        fn(*args)
    return str(info.value)


# ------------------------------------------------------------------------- architecture facts


def test_catalog_holds_the_qwen3_family():
    assert set(PUBLISHED_B) | set(HYBRID_PUBLISHED_B) | set(BASES) | set(TINIES) == set(CATALOG)
    for name, spec in CATALOG.items():
        assert spec.name == name
        if name not in TINIES:
            assert spec.hub_id == f"Qwen/{name}"


@pytest.mark.parametrize("name", sorted(PUBLISHED_B))
def test_param_counts_match_published_sizes(name):
    assert CATALOG[name].architecture.param_count() / 1e9 == pytest.approx(PUBLISHED_B[name], rel=0.01)


def test_known_architecture_facts():
    a = CATALOG["Qwen3-0.6B"].architecture
    assert (a.hidden_size, a.intermediate_size, a.num_hidden_layers, a.num_attention_heads) == (1024, 3072, 28, 16)
    assert a.tie_word_embeddings and a.param_count() == 596_049_920
    assert not CATALOG["Qwen3-8B"].architecture.tie_word_embeddings
    assert CATALOG["Qwen3-4B-Thinking-2507"].architecture.rope_theta == 5_000_000.0
    assert CATALOG["Qwen3-4B-Thinking-2507"].architecture.max_position_embeddings == 262144
    assert CATALOG["Qwen3-4B"].architecture.max_position_embeddings == 40960
    assert CATALOG["Qwen3-4B-Thinking-2507"].thinking and not CATALOG["Qwen3-4B-Instruct-2507"].thinking
    for spec in CATALOG.values():
        a = spec.architecture
        assert a.num_attention_heads % a.num_key_value_heads == 0
        assert a.vocab_size == (248320 if a.is_hybrid else 151936)


@pytest.mark.parametrize("name", sorted(HYBRID_PUBLISHED_B))
def test_the_hybrids_text_models_are_their_releases_less_the_vision_tower(name):
    """Every fourth layer gated attention, the rest Gated DeltaNet; the text model within 7% of the name's size, and
    an MoE's active parameters within a billion of its name's."""
    a = CATALOG[name].architecture
    assert a.is_hybrid and a.model_type == ("qwen3_5_moe_text" if a.is_moe else "qwen3_5_text")
    assert a.layer_types == tuple(
        FULL_ATTENTION if (n + 1) % 4 == 0 else LINEAR_ATTENTION for n in range(a.num_hidden_layers)
    )
    total, active = HYBRID_PUBLISHED_B[name]
    assert a.param_count() / 1e9 == pytest.approx(total, rel=0.07)
    if active is not None:
        assert abs(a.active_param_count() / 1e9 - active) < 1
    assert a.quantization_order == ("none", "4bit")  # bf16 LoRA first


@pytest.mark.parametrize("name", [*sorted(HYBRID_PUBLISHED_B), TINY_QWEN3_5, TINY_QWEN3_5_MOE])
def test_a_hybrids_param_count_equals_transformers_on_the_meta_device(name):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    arch = CATALOG[name].architecture
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(arch.to_hf_config())
    assert type(model).__name__ == ("Qwen3_5MoeForCausalLM" if arch.is_moe else "Qwen3_5ForCausalLM")
    assert sum(p.numel() for p in model.parameters()) == arch.param_count()
    assert Architecture.from_hf_config(arch.to_hf_config().to_dict()) == arch  # what a saved folder reads back
    linear = {n.split(".")[-1] for n, _ in model.named_modules() if "linear_attn." in n and n.count(".") == 4}
    assert set(arch.projection_names) >= linear - {"conv1d", "norm"}


def test_a_released_unified_checkpoints_config_reads_as_its_text_model(tmp_path):
    """The hub's config.json of a Qwen3.5 checkpoint is the vision-language model's (model_type qwen3_5), the text
    model under text_config, layer_types possibly left to full_attention_interval."""
    a = CATALOG["Qwen3.5-9B"].architecture
    text = {k: v for k, v in a.to_hf_config().to_dict().items() if k != "layer_types"}
    text["full_attention_interval"] = 4
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "qwen3_5", "text_config": text, "vision_config": {"depth": 27}})
    )
    spec = resolve_model(str(tmp_path))
    assert spec.architecture == a and spec.tokenizer == "qwen3.5-offline"


@pytest.mark.parametrize("name", ["Qwen3-0.6B", "Qwen3-14B", TINY])
def test_param_count_equals_transformers_on_the_meta_device(name):
    torch = pytest.importorskip("torch")
    from transformers import Qwen3ForCausalLM

    arch = CATALOG[name].architecture
    with torch.device("meta"):
        model = Qwen3ForCausalLM(arch.to_hf_config())
    assert sum(p.numel() for p in model.parameters()) == arch.param_count()
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == arch.tie_word_embeddings


@pytest.mark.parametrize("name,model_type", [("Qwen3-4B-Thinking-2507", "qwen3"), ("Qwen3-30B-A3B", "qwen3_moe")])
def test_to_hf_config_carries_every_field(name, model_type):
    arch = CATALOG[name].architecture
    hf = arch.to_hf_config()
    cfg = hf.to_dict()
    assert cfg["model_type"] == model_type
    for key, value in arch.facts().items():
        if key == "rope_theta":
            value_seen = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
            assert value_seen == value
        else:
            assert getattr(hf, key) == value, key  # transformers names num_experts num_local_experts in its file


# -------------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("name", sorted(PUBLISHED_B))
def test_short_names_and_hub_ids_resolve(name):
    spec = resolve_model(name)
    assert spec is CATALOG[name]
    assert spec.hub_id == f"Qwen/{name}" == spec.source == spec.tokenizer_name
    assert resolve_model(f"Qwen/{name}") == spec
    assert resolve_model(name.lower()) is spec
    assert resolve_model(f"  {name} ") is spec


def test_tiny_model_uses_the_offline_tokenizer():
    spec = resolve_model(TINY)
    assert spec.hub_id is None and spec.source == TINY
    assert spec.tokenizer_name == "qwen3-offline"


def test_other_org_keeps_the_architecture_with_its_hub_id():
    spec = resolve_model("my-org/Qwen3-14B")
    assert spec.hub_id == spec.source == "my-org/Qwen3-14B"
    assert spec.architecture == CATALOG["Qwen3-14B"].architecture
    assert spec.name == "Qwen3-14B"


@pytest.mark.parametrize("name", ["Qwen3-7B", "qwen3-7b", "Qwen/Qwen3-7B"])
def test_qwen3_7b_suggests_qwen3_8b(name):
    msg = user_error(resolve_model, name)
    assert "does not exist" in msg and "Use Qwen3-8B" in msg


def test_unknown_name_gets_suggestions_and_the_known_list():
    msg = user_error(resolve_model, "Qwen3-15B")
    assert "not a Qwen3 model autotune knows" in msg
    assert "Did you mean" in msg and "Qwen3-14B" in msg.split("Known models")[0]
    assert "Known models: Qwen3-0.6B" in msg and "local directory" in msg
    assert "Did you mean" not in user_error(resolve_model, "llama-3-70b-zzz")


@pytest.mark.parametrize("name", ["", "   ", None, 5])
def test_empty_or_non_string_name(name):
    assert "model_name is empty" in user_error(resolve_model, name)


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/dir", "~/no/such/dir", "x/config.json"])
def test_path_that_is_not_a_directory(name):
    assert "no such directory" in user_error(resolve_model, name)


@pytest.mark.parametrize("name", ["~nosuchuser-zz/model", "x" * 300, "a\x00b", "/" + "a/" * 3000])
def test_names_the_os_rejects_are_user_errors(name):
    user_error(resolve_model, name)


# ------------------------------------------------------------------------------ local folders


@pytest.mark.parametrize("name", ["Qwen3-0.6B", "Qwen3-4B-Thinking-2507", "Qwen3-14B", TINY])
def test_local_directory_saved_by_transformers(tmp_path, name):
    arch = CATALOG[name].architecture
    arch.to_hf_config().save_pretrained(tmp_path / "model")
    spec = resolve_model(str(tmp_path / "model"))
    assert isinstance(spec, ModelSpec)
    assert spec.architecture == arch  # rope_theta included, though transformers 5 nests it
    assert spec.local_path == str(tmp_path / "model") == spec.source
    assert spec.hub_id is None
    assert spec.tokenizer_name == "qwen3-offline"  # no tokenizer files in the folder


def test_local_directory_with_a_tokenizer_uses_it(tmp_path):
    CATALOG[TINY].architecture.to_hf_config().save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    spec = resolve_model(str(tmp_path))
    assert spec.tokenizer_name == str(tmp_path) == spec.source


def test_old_style_config_without_head_dim(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "qwen3",
                "hidden_size": 256,
                "intermediate_size": 512,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "rope_theta": 10000.0,
            }
        )
    )
    arch = resolve_model(str(tmp_path)).architecture
    assert arch.head_dim == 64 and arch.rope_theta == 10000.0 and arch.vocab_size == 151936


def test_directory_without_config_json(tmp_path):
    msg = user_error(resolve_model, str(tmp_path))
    assert str(tmp_path) in msg and "no config.json" in msg


@pytest.mark.parametrize(
    "content,needle",
    [
        ("{not json", "cannot read it as JSON"),
        ("[1, 2]", "must be a JSON object"),
        (json.dumps({"model_type": "llama", "hidden_size": 8}), "model_type is 'llama'"),
        (json.dumps({"model_type": "qwen3", "hidden_size": 8}), "lacks intermediate_size"),
        (
            json.dumps(
                {
                    "model_type": "qwen3",
                    "hidden_size": 8,
                    "intermediate_size": 8,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 0,
                }
            ),
            "num_attention_heads=0",
        ),
        (
            json.dumps(
                {
                    "model_type": "qwen3",
                    "hidden_size": "8",
                    "intermediate_size": 8,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                }
            ),
            "hidden_size='8'",
        ),
    ],
)
def test_bad_config_json(tmp_path, content, needle):
    (tmp_path / "config.json").write_text(content)
    assert needle in user_error(resolve_model, str(tmp_path))


def test_from_hf_config_ignores_unknown_keys():
    arch = Architecture.from_hf_config(
        {
            **dataclasses.asdict(CATALOG["Qwen3-8B"].architecture),
            "architectures": ["Qwen3ForCausalLM"],
            "torch_dtype": "bfloat16",
        }
    )
    assert arch == CATALOG["Qwen3-8B"].architecture
