"""autotune: fit Qwen3 LoRA/QLoRA fine-tuning to the GPU you have, by measurement."""

__version__ = "0.1.0"
