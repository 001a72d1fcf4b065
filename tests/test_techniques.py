"""The step's memory techniques compute what the plain step computes (autotune/techniques/), on the tiny Qwen3
with real torch/transformers/peft: the fused loss (loss and LoRA gradients, the answer-only mask, the Trainer's
per-token normalisation under gradient accumulation), activation offloading, the embedding table on the host,
and padding-free packing (per-sample losses). And each one saves what it is for, on the CPU memory tracker."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.models import assert_lora_a_gradients_nonzero, randomise_lora_b

from autotune.catalog import TINY, TINY_QWEN3_5, resolve_model
from autotune.config import build_config
from autotune.context import RunContext
from autotune.errors import UserError
from autotune.memory import CpuTrackedMeter
from autotune.modeling import apply_knobs, build_model
from autotune.step import ListDataset, make_trainer, training_arguments
from autotune.techniques import Knobs, resolve
from autotune.techniques.fused_loss import ChunkedLinearCrossEntropy, linear_cross_entropy
from autotune.techniques.packing import collator_for
from autotune.trial import TrialRunner
from autotune.units import Budget, GiB

IGNORE = -100


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def plain_loss(hidden, weight, labels, num_items_in_batch=None):
    """transformers' ForCausalLMLoss on the full logits: the path the fused loss replaces."""
    logits = (hidden @ weight.t()).float()
    shifted = F.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return total / (num_items_in_batch if num_items_in_batch is not None else (shifted != IGNORE).sum())


# ------------------------------------------------------------------------------------------ the fused loss


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_chunked_loss_equals_the_full_logits_loss_in_fp32(chunk, weight_grad):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 17, 32, generator=gen, requires_grad=True)
    weight = (torch.randn(1000, 32, generator=gen) * 0.3).requires_grad_(weight_grad)
    labels = torch.randint(0, 1000, (3, 17), generator=gen)
    labels[:, :5] = IGNORE  # the prompt: no loss there
    labels[1, 9] = IGNORE
    for n in (None, 29):  # the mean, and the Trainer's count across accumulated micro-batches
        want = plain_loss(hidden, weight, labels, n)
        got = linear_cross_entropy(hidden, weight, labels, num_items_in_batch=n, chunk=chunk)
        assert relative_error(got, want) < 1e-6
        g_want = torch.autograd.grad(want, [hidden, weight] if weight_grad else [hidden])
        g_got = torch.autograd.grad(got, [hidden, weight] if weight_grad else [hidden])
        for a, b in zip(g_got, g_want):
            assert relative_error(a, b) < 1e-5


def test_chunked_loss_under_bf16_autocast_matches_the_autocast_plain_path():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 33, 64, generator=gen).requires_grad_(True)
    weight = torch.randn(512, 64, generator=gen).to(torch.bfloat16) * 0.2
    labels = torch.randint(0, 512, (2, 33), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = plain_loss(hidden.to(torch.bfloat16), weight, labels)  # the plain head's matmul runs in bf16
        got = linear_cross_entropy(hidden, weight, labels, chunk=8)
    assert relative_error(got, want) < 1e-3
    (g_want,) = torch.autograd.grad(want, hidden)
    (g_got,) = torch.autograd.grad(got, hidden)
    assert relative_error(g_got, g_want) < 1e-2  # one bf16 rounding of the logits' gradient apart


def test_no_labelled_token_gives_nan_like_the_plain_loss():
    hidden = torch.randn(1, 4, 8)
    weight = torch.randn(16, 8)
    labels = torch.full((1, 4), IGNORE)
    assert math.isnan(linear_cross_entropy(hidden, weight, labels).item())
    assert math.isnan(plain_loss(hidden, weight, labels).item())


def test_only_the_labelled_tokens_reach_the_head(monkeypatch):
    """A prompt's tokens (and padding) have no label: the fused loss never multiplies them by lm_head, which at
    Qwen3's vocabulary is most of a step's compute. The loss and gradients stay those of the full logits (above)."""
    rows = []
    apply = ChunkedLinearCrossEntropy.apply
    monkeypatch.setattr(ChunkedLinearCrossEntropy, "apply", lambda h, *rest: rows.append(h.shape[0]) or apply(h, *rest))
    labels = torch.randint(0, 64, (2, 10))
    labels[:, :6] = IGNORE  # six prompt tokens per row: with the shift, positions 5 to 8 predict a label
    hidden = torch.randn(2, 10, 8, requires_grad=True)
    linear_cross_entropy(hidden, torch.randn(64, 8), labels).backward()
    assert rows == [8] and hidden.grad[:, 5:9].abs().sum() > 0
    assert hidden.grad[:, :5].abs().sum() == 0 and hidden.grad[:, 9].abs().sum() == 0


def test_the_chunked_function_keeps_no_logits_for_backward():
    hidden = torch.randn(64, 16, requires_grad=True)
    weight = torch.randn(4096, 16)
    targets = torch.randint(0, 4096, (64,))
    total = ChunkedLinearCrossEntropy.apply(hidden, weight, targets, 8, torch.float32)
    saved = total.grad_fn.saved_tensors
    # hidden, weight, the targets, their mask and one log-sum-exp per token: nothing of tokens x vocabulary
    assert max(t.numel() for t in saved) == weight.numel() < 64 * 4096


def tiny_cfg(**values):
    base = {
        "model_name": TINY,
        "init": "random",
        "quantization": "none",
        "bf16": False,  # fp32: the comparison is exact up to summation order
        "optimizer": "adamw_torch",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "output_dir": "/tmp/autotune-test-techniques",
    }
    return build_config({**base, **values})


def micro_batches(seed=0, vocab=151936):
    """Two micro-batches of uneven rows: a prompt (masked), an answer (labelled), right padding."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(2):
        rows = []
        for _ in range(3):
            n = int(torch.randint(12, 40, (1,), generator=gen))
            ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
            prompt = int(torch.randint(3, n // 2, (1,), generator=gen))
            rows.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
        batches.append(rows)
    return batches


def accumulated_grads(knobs: Knobs, batches, **values) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One optimizer step's worth of micro-batches through the Trainer's own training_step (its
    num_items_in_batch normalisation and accumulation scaling), the LoRA gradients it accumulates; `values`: the
    config's other values (another model)."""
    cfg = tiny_cfg(gradient_accumulation_steps=len(batches), **values)
    built = build_model(RunContext(cfg), knobs=knobs)
    randomise_lora_b(built.model)
    args = training_arguments(
        cfg,
        built,
        cfg.output_dir,
        max_steps=1,
        batch_size=3,
        accumulation=len(batches),
        evaluate=False,
        save=False,
        log=False,
        progress=False,
    )
    collator = collator_for(knobs.packing, 0, max_length=64)
    trainer = make_trainer(built, args, ListDataset([r for b in batches for r in b]), collator=collator)
    inputs = [collator(b) for b in batches]
    # As the Trainer counts it: the labelled tokens after the shift, over every micro-batch of the step.
    n_items = sum(int((x["labels"][..., 1:] != IGNORE).sum()) for x in inputs)
    built.model.train()
    losses = [trainer.training_step(built.model, x, num_items_in_batch=torch.tensor(n_items)).item() for x in inputs]
    grads = {n: p.grad.detach().clone() for n, p in built.model.named_parameters() if p.requires_grad}
    assert_lora_a_gradients_nonzero(grads)
    return losses, grads


def test_fused_loss_through_the_trainer_equals_the_plain_loss_and_its_lora_gradients():
    batches = micro_batches()
    plain_losses, plain = accumulated_grads(Knobs(checkpointing=True, fused_loss=False), batches)
    fused_losses, fused = accumulated_grads(Knobs(checkpointing=True, fused_loss=True), batches)
    assert fused_losses == pytest.approx(plain_losses, rel=1e-3)
    assert plain.keys() == fused.keys() and len(plain) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    worst = max(relative_error(fused[k], plain[k]) for k in plain)
    assert worst <= 1e-3, worst
    print(f"fused vs plain: losses {fused_losses} vs {plain_losses}, worst LoRA grad rel error {worst:.1e}")


# ------------------------------------------------------------------------------------ offload, host table


def test_offloaded_activations_give_the_same_gradients():
    batches = micro_batches(seed=3)
    _, plain = accumulated_grads(Knobs(checkpointing=True, fused_loss=True), batches)
    _, offloaded = accumulated_grads(Knobs(checkpointing=True, fused_loss=True, offload_activations=True), batches)
    assert all(torch.equal(offloaded[k], plain[k]) for k in plain)


def untied(tmp_path) -> str:
    """The tiny architecture with untied embeddings (as Qwen3-8B/14B/32B), as a local model folder."""
    from dataclasses import replace

    arch = replace(resolve_model(TINY).architecture, tie_word_embeddings=False)
    arch.to_hf_config().save_pretrained(tmp_path)
    return str(tmp_path)


def test_the_embedding_table_on_the_host_gives_the_same_gradients_and_leaves_the_device(tmp_path, autotune_cache):
    cfg = tiny_cfg(model_name=untied(tmp_path), tokenizer_name="qwen3-offline")
    ctx = RunContext(cfg)
    runner = TrialRunner(ctx, Budget(64 * GiB))
    on_device = runner.measure(1, 32, 8, knobs=Knobs(checkpointing=True, fused_loss=True))
    on_host = runner.measure(1, 32, 8, knobs=Knobs(checkpointing=True, fused_loss=True, embedding_on_cpu=True))
    table = ctx.architecture.vocab_size * ctx.architecture.hidden_size * 4  # fp32
    assert on_device.peak_bytes - on_host.peak_bytes == pytest.approx(table, rel=0.02)
    back = runner.measure(1, 32, 8, knobs=Knobs(checkpointing=True, fused_loss=True))
    assert back.peak_bytes == pytest.approx(on_device.peak_bytes, rel=1e-3)  # switched back: counted again
    runner.release()

    batches = micro_batches(seed=5)
    built = build_model(ctx)
    randomise_lora_b(built.model)
    grads = {}
    for on in (False, True):
        apply_knobs(built, Knobs(checkpointing=True, fused_loss=True, embedding_on_cpu=on))
        built.model.zero_grad()
        x = collator_for(False, 0, max_length=64)(batches[0])
        built.model(**x).loss.backward()
        grads[on] = {n: p.grad.clone() for n, p in built.model.named_parameters() if p.requires_grad}
    assert_lora_a_gradients_nonzero(grads[False])
    assert all(torch.equal(grads[True][k], grads[False][k]) for k in grads[False])


class CachingMeter(CpuTrackedMeter):
    """Faked, as a CPU has none: CUDA's caching allocator. Freed bytes stay reserved (and in the peak a reset starts
    from) until memory.free_memory empties the cache, as torch.cuda.empty_cache does on a GPU."""

    def __init__(self):
        super().__init__()
        self.cached = 0

    def _release(self, ref):
        if ref.key in self._refs:
            self.cached += ref.nbytes
        super()._release(ref)

    def reset_peak(self) -> None:
        self._peak = self._live + self.cached

    def peak_bytes(self) -> int:
        return max(self._peak, self._live + self.cached)


def test_a_trial_after_a_technique_freed_a_table_does_not_count_it(tmp_path, autotune_cache, monkeypatch):
    """The host embedding switched on between two trials of one build frees the device's table; a trial's peak
    starts from the memory the step will hold, with that table gone from the (faked) allocator cache too."""
    import autotune.trial as trial_module

    meter = CachingMeter()
    real_free = trial_module.free_memory

    def free_memory():
        real_free()
        meter.cached = 0

    monkeypatch.setattr(trial_module, "free_memory", free_memory)
    cfg = tiny_cfg(model_name=untied(tmp_path), tokenizer_name="qwen3-offline")
    runner = TrialRunner(RunContext(cfg), Budget(64 * GiB), meter=meter)
    on_device = runner.measure(1, 32, 8, knobs=Knobs(checkpointing=True, fused_loss=True))
    on_host = runner.measure(1, 32, 8, knobs=Knobs(checkpointing=True, fused_loss=True, embedding_on_cpu=True))
    table = runner.ctx.architecture.vocab_size * runner.ctx.architecture.hidden_size * 4  # fp32
    assert on_device.peak_bytes - on_host.peak_bytes == pytest.approx(table, rel=0.02)
    runner.release()


def test_the_embedding_table_of_a_tied_model_stays_with_lm_head():
    with pytest.raises(UserError, match="ties its input embeddings to lm_head"):
        resolve(tiny_cfg(embedding_on_cpu="on"), resolve_model(TINY))


def test_offloading_needs_checkpointing():
    with pytest.raises(UserError, match="needs gradient_checkpointing"):
        resolve(tiny_cfg(offload_activations="on", gradient_checkpointing=False), resolve_model(TINY))


def test_auto_means_fused_and_packed_and_nothing_that_costs_speed():
    assert resolve(tiny_cfg(), resolve_model(TINY)) == Knobs(
        checkpointing=True, fused_loss=True, offload_activations=False, embedding_on_cpu=False, packing=True
    )


def test_offloading_takes_the_checkpointed_inputs_off_the_device(tmp_path):
    """A deeper model (8 layers) at 1k tokens: the checkpointed inputs are 8 x tokens x hidden x 4 bytes; with
    offloading about two of them stay (the one being recomputed, the one coming back)."""
    from dataclasses import replace

    arch = replace(
        resolve_model(TINY).architecture,
        num_hidden_layers=8,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        head_dim=64,
        vocab_size=2048,
    )
    arch.to_hf_config().save_pretrained(tmp_path)
    runner = TrialRunner(RunContext(tiny_cfg(model_name=str(tmp_path))), Budget(64 * GiB))
    kept = runner.measure(1, 1024, 8, knobs=Knobs(checkpointing=True, fused_loss=True))
    offloaded = runner.measure(1, 1024, 8, knobs=Knobs(checkpointing=True, fused_loss=True, offload_activations=True))
    layer_input = 1024 * 256 * 4
    assert kept.peak_bytes - offloaded.peak_bytes >= 4 * layer_input
    runner.release()


# ---------------------------------------------------------------------------------------------- packing


def test_packed_samples_have_the_losses_they_have_alone():
    cfg = tiny_cfg()
    built = build_model(RunContext(cfg), knobs=Knobs(checkpointing=False, fused_loss=False))
    built.model.eval()
    rows = micro_batches(seed=7)[0]
    packed = collator_for(True, 0, max_length=64)(rows)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    with torch.no_grad():
        logits = built.model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0].float()
    start = 0
    for row in rows:
        n = len(row["input_ids"])
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            alone = built.model(input_ids=ids).logits[0].float()
        assert relative_error(logits[start : start + n], alone) < 1e-5  # no attention across the boundary
        labels = torch.tensor(row["labels"])
        own = F.cross_entropy(alone[:-1], labels[1:], ignore_index=IGNORE, reduction="sum")
        in_pack = F.cross_entropy(
            logits[start : start + n - 1],
            packed["labels"][0, start + 1 : start + n],
            ignore_index=IGNORE,
            reduction="sum",
        )
        assert in_pack.item() == pytest.approx(own.item(), rel=1e-5)
        start += n
    assert start == packed["input_ids"].shape[1]  # not one pad token


def test_packing_and_the_fused_loss_give_the_padded_steps_gradients():
    batches = micro_batches(seed=9)
    _, padded = accumulated_grads(Knobs(checkpointing=True, fused_loss=False, packing=False), batches)
    _, packed = accumulated_grads(Knobs(checkpointing=True, fused_loss=True, packing=True), batches)
    worst = max(relative_error(packed[k], padded[k]) for k in padded)
    assert worst <= 1e-3, worst


# ------------------------------------------------------------------------------------ what each one saves


def test_the_fused_loss_saves_at_least_the_logits_at_a_long_sequence():
    """The tiny model (Qwen3's 151,936-token vocabulary) at 1,024 tokens: the plain loss holds fp32 logits,
    their log-probabilities and their gradient (12 bytes per token and vocabulary entry); the fused one never
    holds more than a chunk of them."""
    runner = TrialRunner(RunContext(tiny_cfg()), Budget(64 * GiB))
    plain = runner.measure(1, 1024, 8, knobs=Knobs(checkpointing=True, fused_loss=False))
    fused = runner.measure(1, 1024, 8, knobs=Knobs(checkpointing=True, fused_loss=True))
    logits = 1024 * 151936 * 4
    assert plain.peak_bytes - fused.peak_bytes >= logits
    print(f"tiny @ 1024 tokens: plain {plain.peak_bytes / 2**20:.0f} MiB, fused {fused.peak_bytes / 2**20:.0f} MiB")
    runner.release()


# ------------------------------------------------------------------------------------------- the 8-bit head


def test_the_8bit_head_loss_is_within_its_stated_tolerance_of_the_bf16_head():
    """Row-wise int8 moves each weight by at most half a step (max |row| / 254): on a trained-looking table the
    loss and the hidden states' gradient stay within 1e-2 relative of the bf16 head's. This is the stated
    tolerance of lm_head_8bit."""
    from torch import nn

    from autotune.techniques.int8_head import Int8Head

    gen = torch.Generator().manual_seed(11)
    linear = nn.Linear(64, 3000, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(3000, 64, generator=gen) * 0.5)
    hidden = torch.randn(2, 40, 64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 3000, (2, 40), generator=gen)
    labels[:, :6] = IGNORE
    want = plain_loss(hidden, linear.weight.detach(), labels)
    head = Int8Head(linear, torch.device("cpu"))
    for chunk in (3, 17, 1000):
        got = linear_cross_entropy(hidden, head, labels, chunk=chunk)
        assert relative_error(got, want) < 1e-2
        (g_got,) = torch.autograd.grad(got, hidden)
        (g_want,) = torch.autograd.grad(want, hidden, retain_graph=True)
        assert relative_error(g_got, g_want) < 2e-2
    # The blocked loss computes exactly the dense loss of the dequantized table (the quantization is the only
    # difference): a small block size exercises the online log-sum-exp across blocks.
    import autotune.techniques.fused_loss as fused

    dense = head.rows(0, 3000, torch.float32)
    exact = plain_loss(hidden, dense, labels)
    blocked = fused.BlockedHeadCrossEntropy.apply(
        hidden.reshape(-1, 64), head, F.pad(labels, (0, 1), value=IGNORE)[..., 1:].reshape(-1), 7, 512, torch.float32
    )
    assert relative_error(blocked / (F.pad(labels, (0, 1), value=IGNORE)[..., 1:] != IGNORE).sum(), exact) < 1e-6


def test_the_8bit_head_halves_the_table_and_trains(tmp_path):
    cfg = tiny_cfg(model_name=untied(tmp_path), tokenizer_name="qwen3-offline", bf16=True)
    ctx = RunContext(cfg)
    runner = TrialRunner(ctx, Budget(64 * GiB))
    full = runner.measure(1, 64, 8, knobs=Knobs(checkpointing=True, fused_loss=True))
    half = runner.measure(1, 64, 8, knobs=Knobs(checkpointing=True, fused_loss=True, lm_head_8bit=True))
    table = ctx.architecture.vocab_size * ctx.architecture.hidden_size
    assert full.peak_bytes - half.peak_bytes >= 0.9 * (table * 2 - table - 4 * ctx.architecture.vocab_size)
    assert not half.oom and half.tokens_per_second
    runner.release()


def test_an_8bit_head_needs_an_untied_model_and_the_fused_loss(tmp_path):
    with pytest.raises(UserError, match="ties lm_head"):
        resolve(tiny_cfg(lm_head_8bit="on"), resolve_model(TINY))
    with pytest.raises(UserError, match="needs fused_loss"):
        resolve(
            tiny_cfg(lm_head_8bit="on", fused_loss="off", model_name=untied(tmp_path)), resolve_model(untied(tmp_path))
        )


# ------------------------------------------------------------------------------------------- the tiled MLP


def mlp_grads(targets, dropout, mode: str) -> dict[str, torch.Tensor]:
    """LoRA gradients of two micro-batches, the MLP run plain, tiled (slices of 7 tokens), or as the reference
    for a tiled run with dropout: the same slices, each with an ordinary graph (the same dropout draws)."""
    from autotune.techniques.tiled_mlp import _tiled_forward

    cfg = tiny_cfg(gradient_accumulation_steps=2, target_modules=targets, lora_dropout=dropout)
    built = build_model(RunContext(cfg), knobs=Knobs(checkpointing=True, fused_loss=True, tiled_mlp=mode == "tiled"))
    randomise_lora_b(built.model)
    for module in built.model.modules():
        if type(module).__name__ == "Qwen3MLP":
            if mode == "tiled":
                module._tile_tokens = 7  # many slices at these lengths
            elif mode == "sliced":
                plain_forward = module.forward
                module.forward = lambda x, f=plain_forward: torch.cat(
                    [f(part) for part in x.reshape(-1, x.shape[-1]).split(7)]
                ).reshape(*x.shape[:-1], -1)
    assert _tiled_forward  # the function under test
    torch.manual_seed(0)  # the dropout draws: one sequence for every run
    collator = collator_for(False, 0, max_length=64)
    built.model.train()
    for batch in micro_batches(seed=13):
        built.model(**collator(batch)).loss.backward()
    grads = {n: p.grad.clone() for n, p in built.model.named_parameters() if p.requires_grad}
    assert_lora_a_gradients_nonzero(grads)
    return grads


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "gate_proj", "up_proj", "down_proj"]])
def test_the_tiled_mlp_gives_the_same_gradients(targets):
    """The input gradient and every LoRA gradient, the MLP's own adapters included."""
    plain, tiled = mlp_grads(targets, 0.0, "plain"), mlp_grads(targets, 0.0, "tiled")
    assert plain.keys() == tiled.keys()
    worst = max(relative_error(tiled[k], plain[k]) for k in plain)
    assert worst < 1e-5, worst


def test_the_tiled_mlp_replays_lora_dropout_in_its_recompute():
    """With dropout on the MLP's adapters a tiled run draws its masks a slice at a time, so it is compared with
    the same slices run with ordinary graphs: equal gradients mean the recompute saw the forward's masks."""
    targets = ["gate_proj", "up_proj", "down_proj"]
    sliced, tiled = mlp_grads(targets, 0.1, "sliced"), mlp_grads(targets, 0.1, "tiled")
    worst = max(relative_error(tiled[k], sliced[k]) for k in sliced)
    assert worst < 1e-5, worst
    unrelated = mlp_grads(targets, 0.1, "plain")  # other draws: the check above is not vacuous
    assert max(relative_error(unrelated[k], sliced[k]) for k in sliced) > 1e-3


def test_the_tiled_mlp_keeps_the_mlp_activations_off_a_long_sequence(tmp_path, monkeypatch):
    """A wide MLP (intermediate 4096) on a narrow model at 2,048 tokens: the layer's backward holds the MLP's
    gate, up and product for every token untiled; tiled, for one slice (128 tokens here, so this small model
    shows what a slice of a real one would)."""
    from dataclasses import replace

    from autotune.techniques import tiled_mlp

    monkeypatch.setattr(tiled_mlp, "tile_tokens", lambda intermediate, dtype_bytes: 128)
    arch = replace(resolve_model(TINY).architecture, intermediate_size=4096, vocab_size=1024, num_hidden_layers=2)
    arch.to_hf_config().save_pretrained(tmp_path)
    runner = TrialRunner(RunContext(tiny_cfg(model_name=str(tmp_path))), Budget(64 * GiB))
    plain = runner.measure(1, 2048, 8, knobs=Knobs(checkpointing=True, fused_loss=True))
    tiled = runner.measure(1, 2048, 8, knobs=Knobs(checkpointing=True, fused_loss=True, tiled_mlp=True))
    mlp = 2048 * 3 * 4096 * 4  # gate, up and their product at every token, fp32
    assert plain.peak_bytes - tiled.peak_bytes >= mlp / 2, (plain.peak_bytes, tiled.peak_bytes)
    runner.release()


# ------------------------------------------------------------------------- the Qwen3.5/3.6 hybrid layers

HYBRID_ARCH = resolve_model(TINY_QWEN3_5).architecture
# Adapters on every Linear of both layer kinds: the DeltaNet blocks', gated attention's and the MLPs'.
HYBRID = dict(
    model_name=TINY_QWEN3_5, tokenizer_name="qwen3.5-offline", target_modules=list(HYBRID_ARCH.projection_names)
)


@pytest.mark.parametrize("technique", ["fused_loss", "offload_activations", "tiled_mlp"])
def test_a_technique_on_the_hybrid_layers_gives_the_plain_steps_losses_and_gradients(technique):
    """Three Gated DeltaNet layers and a gated attention layer (transformers' reference gated-delta path on the CPU),
    adapters on every projection of both kinds."""
    batches = micro_batches(seed=21)
    plain_losses, plain = accumulated_grads(Knobs(checkpointing=True), batches, **HYBRID)
    losses, grads = accumulated_grads(Knobs(checkpointing=True, **{technique: True}), batches, **HYBRID)
    # A and B of 8 projections in each of the 3 DeltaNet layers, 7 in the attention layer
    assert plain.keys() == grads.keys() and len(plain) == 2 * (3 * 8 + 7)
    assert any("linear_attn.in_proj_qkv" in k for k in plain) and any("self_attn.q_proj" in k for k in plain)
    assert losses == pytest.approx(plain_losses, rel=1e-3)
    worst = max(relative_error(grads[k], plain[k]) for k in plain)
    assert worst <= 1e-3, worst


def test_the_model_level_techniques_switch_every_hybrid_layer(tmp_path):
    """Offloading wraps every decoder layer and the tiled MLP every MLP, DeltaNet layers' as attention layers'; the
    host embedding and the 8-bit head leave an untied hybrid's tables off the device."""
    from dataclasses import replace

    from autotune.techniques import Place
    from autotune.techniques.offload import set_offload
    from autotune.techniques.tiled_mlp import set_tiled_mlp

    built = build_model(RunContext(tiny_cfg(**HYBRID)), knobs=Knobs(checkpointing=True))
    place = Place(device=torch.device("cpu"), dtype_bytes=4)
    assert set_offload(built.model, True, place) == HYBRID_ARCH.num_hidden_layers
    assert set_tiled_mlp(built.model, True, place) == HYBRID_ARCH.num_hidden_layers

    replace(HYBRID_ARCH, tie_word_embeddings=False).to_hf_config().save_pretrained(tmp_path)
    cfg = tiny_cfg(**{**HYBRID, "model_name": str(tmp_path)})
    ctx = RunContext(cfg)
    assert ctx.spec.tokenizer == "qwen3.5-offline"  # a hybrid's folder without tokenizer files: its family's
    runner = TrialRunner(ctx, Budget(64 * GiB))
    on_device = runner.measure(1, 32, 4, knobs=Knobs(checkpointing=True, fused_loss=True))
    off = runner.measure(
        1, 32, 4, knobs=Knobs(checkpointing=True, fused_loss=True, embedding_on_cpu=True, lm_head_8bit=True)
    )
    table = HYBRID_ARCH.vocab_size * HYBRID_ARCH.hidden_size * 4  # fp32
    # the input table leaves whole, lm_head keeps a quarter (int8 of fp32) and its row scales
    assert on_device.peak_bytes - off.peak_bytes >= 0.9 * (table + 0.75 * table - 4 * HYBRID_ARCH.vocab_size)
    assert not off.oom and off.tokens_per_second
    runner.release()


def test_packing_is_refused_for_the_hybrids_because_their_layers_carry_state_across_a_packed_row():
    """transformers' reference gated-delta rule and causal convolution take no sample boundaries: a sample packed
    after another does not compute what it computes alone (which is why the row refuses it), and `auto` leaves a
    hybrid's micro-batches padded."""
    spec = resolve_model(TINY_QWEN3_5)
    with pytest.raises(UserError, match=r"packing \"on\": tiny-qwen3\.5 has Gated DeltaNet layers"):
        resolve(tiny_cfg(**HYBRID, packing="on"), spec)
    assert resolve(tiny_cfg(**HYBRID), spec).packing is False
    assert resolve(tiny_cfg(), resolve_model(TINY)).packing is True  # a Qwen3 model packs by default

    built = build_model(RunContext(tiny_cfg(**HYBRID)), knobs=Knobs(checkpointing=False))
    built.model.eval()
    rows = micro_batches(seed=23)[0][:2]
    packed = collator_for(True, 0, max_length=128)([{**r} for r in rows])
    with torch.no_grad():
        logits = built.model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        second = torch.tensor([rows[1]["input_ids"]])
        alone = built.model(input_ids=second).logits[0]
    first = len(rows[0]["input_ids"])
    assert relative_error(logits[first:], alone) > 1e-3  # the first sample's state ran on into the second
