"""A training step of a model of any size, traced under FakeTensorMode: the tests' instrument for checking
estimate.estimate_peak at sizes no CPU can run.

The real step (trial.TrialRunner.measure: the HF Trainer on a modeling.build_model model) is the ground truth,
and the tests hold estimate_peak to it on models that fit in RAM. A 14B model does not, and the Trainer cannot
run on fake tensors, so this replays the step's allocations with a minimal loop on the same model build
(modeling.prepare_for_training, modeling.attach_lora). It allocates nothing, nothing in autotune relies on it,
and the tests check it against the real step where both run.
"""

from __future__ import annotations

from collections.abc import Sequence

from autotune.catalog import Architecture
from autotune.config import DEFAULT_TARGET_MODULES


def calibrate_by_trace(
    arch: Architecture,
    *,
    batch: int,
    seq: int,
    rank: int,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    gradient_checkpointing: bool = True,
    dtype_bytes: int = 2,
    optimizer: str = "adamw_torch",
    lora_dropout: float = 0.0,
    autocast: bool | None = None,
    steps: int = 2,
    knobs=None,
) -> dict[str, int]:
    """A training step of a model of any size, traced under FakeTensorMode: nothing is allocated.

    The model is built on the meta device in the compute dtype and prepared as modeling.build_model does
    (`prepare_for_training`: frozen base, non-reentrant checkpointing; `attach_lora`), then materialised as
    fake tensors (`to_empty` inside FakeTensorMode); a CpuTrackedMeter counts the fake storages. The loop
    is the Trainer's step reduced to what allocates: full-length inputs as their own labels, the forward
    under bf16 autocast (`autocast`, default: when dtype_bytes == 2, as the Trainer runs a bf16 model),
    backward, torch AdamW, zero_grad. Unquantized only (bitsandbytes kernels cannot run on fake tensors);
    optimizer "adamw_torch" only. Qwen3-14B takes ~10 s and 0.5 GB of RAM.
    `knobs` (techniques.Knobs) switches the step's techniques with modeling.switch_techniques, as the model build
    does, and the loss
    goes through step.fused_causal_lm_loss when the fused loss is on; packing is not traced (batch rows).
    Returns peak_bytes (weights, adapters, optimizer state, inputs, activations), weights, after_step.
    """
    import contextlib
    import warnings

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import Qwen3ForCausalLM

    from autotune.memory import CpuTrackedMeter
    from autotune.modeling import attach_lora, prepare_for_training, quiet_libraries, switch_techniques
    from autotune.step import fused_causal_lm_loss
    from autotune.techniques import Knobs, Place

    knobs = knobs or Knobs(checkpointing=gradient_checkpointing, fused_loss=False)
    gradient_checkpointing = knobs.checkpointing

    if optimizer != "adamw_torch":
        raise ValueError(f"calibrate_by_trace traces torch AdamW only, not {optimizer!r}")
    if autocast is None:
        autocast = dtype_bytes == 2
    dtype = {2: torch.bfloat16, 4: torch.float32}[dtype_bytes]
    quiet_libraries()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # weights in the compute dtype; RoPE buffers stay fp32, as loaded
        try:
            with torch.device("meta"):
                base = Qwen3ForCausalLM(arch.to_hf_config(attn_implementation="sdpa"))
        finally:
            torch.set_default_dtype(previous)
        base.config.use_cache = False
        prepare_for_training(
            base, quantized=False, checkpointing=gradient_checkpointing, checkpointing_kwargs={"use_reentrant": False}
        )
        model = attach_lora(base, r=rank, alpha=2 * rank, dropout=lora_dropout, target_modules=list(target_modules))
        model.train()
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
            # to_empty gives every parameter its own storage; tie the embeddings again (Qwen3 <= 4B ties them).
            model.get_base_model().tie_weights()
            switch_techniques(base, knobs, Place(torch.device("cpu"), dtype_bytes, {"use_reentrant": False}))
            meter = CpuTrackedMeter()
            meter.track_existing(model)
            weights = meter.current_bytes()
            with meter:
                input_ids = torch.randint(0, arch.vocab_size, (batch, seq))
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            meter.track_existing(input_ids)
            meter.reset_peak()
            amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
            with meter:
                for _ in range(steps):
                    with amp:
                        if knobs.fused_loss:
                            loss, _ = fused_causal_lm_loss(model, base, {"input_ids": input_ids, "labels": input_ids})
                        else:
                            loss = model(input_ids=input_ids, labels=input_ids).loss
                    loss.backward()
                    del loss
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            return {"peak_bytes": meter.peak_bytes(), "weights": weights, "after_step": meter.current_bytes()}
