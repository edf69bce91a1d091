"""``--quantize_base int8|nf4``: the frozen pretrained denoiser stored in 8 or 4 bits under a LoRA (QLoRA,
Dettmers et al., NeurIPS 2023), through diffusers' ``quantization_config`` and bitsandbytes, as diffusers'
``train_dreambooth_lora_flux.py`` / ``_sd3.py`` / ``_qwen_image.py`` do with ``--bnb_quantization_config_path``.

What it saves (weights of the frozen denoiser's Linear layers only; convolutions, norms, biases and
embeddings stay in the weight dtype; the VAE and text encoders are not quantized, as in diffusers'
scripts, and ``--cache_text_embeddings`` is what frees those). Measured through bitsandbytes' layers
(``train_scripts/benchmark_families.py``, docs/families/lora.md):

- ``int8`` (LLM.int8(), ``load_in_8bit``): 1.001 bytes per Linear weight (1 byte, a float32 scale per
  output row) instead of 2 in bf16, half the memory;
- ``nf4`` (``load_in_4bit``, ``bnb_4bit_quant_type="nf4"``, double quantisation of the block scales,
  compute in the run's weight dtype): 0.516 bytes per Linear weight, about a quarter of bf16. FLUX.1-dev's
  11.9B transformer: 22.2 GiB in bf16, 11.1 GiB in int8, 5.7 GiB in nf4. SD 1.5's UNet saves far less
  (a third of its parameters are in Linear layers; its attention projections are 1x1 convolutions).

LoRA weights, their gradients and the optimizer state stay in float32 on top. The base cannot be
trained in 8 / 4 bits, hence ``--quantize_base`` needs ``--rank``; and the teacher of ``--retention kd`` /
DeMe is the quantized student with its adapters disabled (``teacher.AdapterDisabledTeacher``: peft's
bitsandbytes LoRA layers switch off like the others), never a second copy. Outputs are LoRA folders:
the base is loaded by the user at whatever precision.

bitsandbytes (>= 0.46 has CPU kernels; ``pip install diffusers_ant[quantization]``) is imported only when
the flag is given, and a missing package is one line naming ``pip install bitsandbytes``.

On a GPU the load is diffusers' own. On a machine with no accelerator, diffusers' bitsandbytes quantizers
refuse at their start check (``validate_environment``: "No GPU found. A GPU is needed for quantization.")
although bitsandbytes quantizes and runs its 4 / 8-bit layers on the CPU; ``cpu_quantized_load`` lifts that
one check for the one ``from_pretrained`` call and maps the model to the CPU (``device_map={"": "cpu"}``),
so the same diffusers path runs: its Linear layers become ``bnb.nn.Linear4bit`` / ``Linear8bitLt``, peft's
LoRA goes on top (``keep_off_cpu_packing`` keeps the 4-bit layers on the kernel that trains).
tests/test_quantization.py trains that way (bitsandbytes 0.50.2 here; 0.46 is the minimum asked for).
"""

from __future__ import annotations

import contextlib

import torch

QUANTIZE_CHOICES = ("int8", "nf4")
BITSANDBYTES_MISSING = "needs bitsandbytes: pip install bitsandbytes"
# The first bitsandbytes release whose 4-bit and 8-bit layers run on the CPU (its multi-backend refactor).
CPU_MIN_BITSANDBYTES = "0.46"


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
    check_cpu_bitsandbytes()


def check_cpu_bitsandbytes() -> None:
    """A one-line ``ValueError`` when torch sees no accelerator and bitsandbytes predates its CPU kernels."""
    if has_accelerator():
        return
    import bitsandbytes
    from packaging import version

    if version.parse(bitsandbytes.__version__) < version.parse(CPU_MIN_BITSANDBYTES):
        raise ValueError(f"--quantize_base on a CPU needs bitsandbytes >= {CPU_MIN_BITSANDBYTES} (found "
                         f"{bitsandbytes.__version__}): pip install -U bitsandbytes")


def quantization_config(kind, compute_dtype: torch.dtype = torch.bfloat16):
    """diffusers' ``BitsAndBytesConfig`` for ``kind`` (None for None), as diffusers' LoRA scripts build it."""
    if kind is None:
        return None
    check_quantize_base(kind, rank=0)
    from diffusers import BitsAndBytesConfig

    # bnb_4bit_compute_dtype is also what the unquantized rest of the denoiser (norms, convolutions,
    # embeddings) is loaded in (``quantized_load_kwargs``), for int8 too, where bitsandbytes ignores it
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def has_accelerator() -> bool:
    """Whether torch sees a device diffusers' bitsandbytes quantizers accept (CUDA, XPU, MPS)."""
    mps = getattr(torch, "mps", None)
    return bool(torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
                or (mps is not None and mps.is_available()))


def quantized_load_kwargs(config) -> dict:
    """The ``from_pretrained`` keywords of a quantized denoiser, as diffusers' LoRA scripts pass them: the
    ``quantization_config``, ``torch_dtype`` the run's weight dtype (diffusers would otherwise pick float16
    for the layers it leaves unquantized, which the CPU cannot train in), and, without an accelerator,
    the whole model on the CPU (diffusers would otherwise map it to ``cuda:0``)."""
    kwargs = {"quantization_config": config}
    dtype = getattr(config, "bnb_4bit_compute_dtype", None)
    if isinstance(dtype, torch.dtype):
        kwargs["torch_dtype"] = dtype
    if not has_accelerator():
        kwargs["device_map"] = {"": "cpu"}
    return kwargs


@contextlib.contextmanager
def cpu_quantized_load():
    """Lift diffusers' "No GPU found" start check of its bitsandbytes quantizers for the duration, only when
    torch sees no accelerator (a no-op on a GPU machine, where diffusers' own check runs).

    Why: diffusers (0.42.1, read here) refuses a bitsandbytes ``quantization_config`` without CUDA /
    XPU / MPS, but bitsandbytes >= 0.46 has CPU kernels: its ``Params4bit`` / ``Int8Params`` quantize on
    ``.to("cpu")`` and ``Linear4bit`` / ``Linear8bitLt`` run forward and backward there. What the lifted
    check also guarded, a device map that sends part of the model to the CPU beside a GPU, cannot arise:
    ``quantized_load_kwargs`` maps the whole model to the CPU. The check that remains is the version of
    bitsandbytes. Written by hand because diffusers has no switch for it."""
    if has_accelerator():
        yield
        return
    check_cpu_bitsandbytes()
    from diffusers.quantizers.bitsandbytes import bnb_quantizer

    def validate_on_cpu(self, *args, **kwargs):
        return None  # the version is checked above; the device map is the CPU's alone

    classes = (bnb_quantizer.BnB4BitDiffusersQuantizer, bnb_quantizer.BnB8BitDiffusersQuantizer)
    saved = [cls.__dict__["validate_environment"] for cls in classes]
    try:
        for cls in classes:
            cls.validate_environment = validate_on_cpu
        yield
    finally:
        for cls, original in zip(classes, saved):
            cls.validate_environment = original


def keep_off_cpu_packing(model):
    """Keep a CPU-loaded denoiser's ``Linear4bit`` layers off bitsandbytes' packed 4-bit CPU inference path.

    bitsandbytes 0.50 (on CPUs with AVX512-BF16) repacks a ``Linear4bit``'s weight in place for an
    inference kernel at its first forward in eval mode without gradients. In a training run that first
    forward is the teacher's (``--retention kd`` / DeMe: the student with its adapters off, in eval mode,
    under no_grad), and the packed layout then breaks the student's backward ("a view of a leaf Variable
    that requires grad is being used in an in-place operation"); it also fails outright on layers
    narrower than the 64-wide quantization block (the tiny test presets'). The unpacked kernel computes
    the same product (up to rounding), so every layer keeps it. Returns ``model``."""
    if has_accelerator() or not isinstance(model, torch.nn.Module):
        return model
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


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
