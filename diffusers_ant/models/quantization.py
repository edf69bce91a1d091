"""``--quantize_base int8|nf4``: the frozen pretrained denoiser stored in 8 or 4 bits under a LoRA (QLoRA,
Dettmers et al., NeurIPS 2023), through diffusers' ``quantization_config`` and bitsandbytes, as diffusers'
``train_dreambooth_lora_flux.py`` / ``_sd3.py`` / ``_qwen_image.py`` do with ``--bnb_quantization_config_path``.

What it saves (weights of the frozen denoiser only; the VAE and text encoders are not quantized, as in
diffusers' scripts, and ``--cache_text_embeddings`` is what frees those):

- ``int8`` (LLM.int8(), ``load_in_8bit``): 1 byte per parameter instead of 2 in bf16, half the memory;
- ``nf4`` (``load_in_4bit``, ``bnb_4bit_quant_type="nf4"``, double quantisation of the block scales,
  compute in the run's weight dtype): about 0.53 bytes per parameter (4 bits plus the blockwise scales),
  a quarter of bf16. For Flux.1's 12B transformer: 24 GB in bf16, about 12 GB in int8, about 6.5 GB in nf4.

LoRA weights, their gradients and the optimizer state stay in float32 on top. The base cannot be
trained in 8 / 4 bits, hence ``--quantize_base`` needs ``--rank``; and the teacher of ``--retention kd`` /
DeMe is the quantized student with its adapters disabled (``teacher.AdapterDisabledTeacher``: peft's
bitsandbytes LoRA layers switch off like the others), never a second copy. Outputs are LoRA folders:
the base is loaded by the user at whatever precision.

bitsandbytes needs a CUDA GPU; it is imported only when the flag is given, and a missing package is
one line naming ``pip install bitsandbytes``.
"""

from __future__ import annotations

import torch

QUANTIZE_CHOICES = ("int8", "nf4")
BITSANDBYTES_MISSING = "needs bitsandbytes: pip install bitsandbytes"


def check_quantize_base(kind, rank) -> None:
    """A one-line ``ValueError`` unless ``--quantize_base kind`` can run: a known kind, a LoRA (``rank``),
    bitsandbytes installed."""
    if kind is None:
        return
    if kind not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown --quantize_base {kind!r}: choose {' or '.join(QUANTIZE_CHOICES)}")
    if rank is None:
        raise ValueError("--quantize_base freezes the base in 8 / 4 bits, which only a LoRA can train on: add --rank "
                         "(e.g. --rank 16) or drop --quantize_base")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError(f"--quantize_base {BITSANDBYTES_MISSING}") from None


def quantization_config(kind, compute_dtype: torch.dtype = torch.bfloat16):
    """diffusers' ``BitsAndBytesConfig`` for ``kind`` (None for None), as diffusers' LoRA scripts build it."""
    if kind is None:
        return None
    check_quantize_base(kind, rank=0)
    from diffusers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def is_quantized(model) -> bool:
    """Whether ``model`` was loaded with a bitsandbytes ``quantization_config``."""
    return bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
                or getattr(model, "is_quantized", False))


def prepare_quantized_for_lora(model):
    """peft's ``prepare_model_for_kbit_training`` on a quantized denoiser before its LoRA is added (as
    diffusers' Flux / SD3 LoRA scripts): norms in float32, inputs that carry gradients. A no-op on a
    model that is not quantized."""
    if not is_quantized(model):
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
