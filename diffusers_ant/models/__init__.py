"""Building, loading, LoRA and saving for the four model types the trainer supports.

    from diffusers_ant.models import get_model_adapter, load_pipeline

    adapter = get_model_adapter("sd").load(pretrained_model_name_or_path="path/to/sd-pipeline", resolution=512)
    adapter.add_lora(rank=4)                       # optional: peft LoRA, base weights frozen
    x0, cond = adapter.encode_batch(batch)         # batch from diffusers_ant.data
    pred = adapter.predict(model, x_t, timesteps, cond)
    adapter.save("out", model, lora=True)
    pipeline = load_pipeline("out")                # base pipeline + LoRA, ready to sample

Model types (``MODEL_TYPES``): ``unet`` (UNet2DModel, unconditional or class-conditional),
``dit`` (DiTTransformer2DModel, pixel or latent), ``sd`` (UNet2DConditionModel + frozen CLIP text
encoder and VAE), ``controlnet`` (ControlNetModel beside a frozen SD UNet), ``sdxl`` (SDXL's
UNet2DConditionModel with two CLIP text encoders and its size / crop micro-conditioning), ``flux``
(FluxTransformer2DModel with CLIP + T5 and packed latents, flow matching), ``sd3`` (SD3Transformer2DModel with
CLIP-L, CLIP-G and an optional T5, flow matching), ``qwenimage`` (QwenImageTransformer2DModel + frozen
Qwen2.5-VL text encoder and Qwen-Image VAE, flow matching). See ``base.ModelAdapter``
for the interface and each module for its type's details.
"""

import json
import os

from .base import CONTROLNET_INFO_NAME, LORA_INFO_NAME, ModelAdapter, resolve_recorded_base
from .controlnet import ControlNetAdapter, controlnet_output_base, recorded_revision
from .dit import DiTAdapter
from .flux import FluxAdapter
from .pipelines import ClassConditionalUNetPipeline, PixelDiTPipeline, UnconditionalUNetPipeline
from .presets import PRESETS, tiny_clip_tokenizer
from .qwenimage import QwenImageAdapter
from .sd import StableDiffusionAdapter
from .sd3 import SD3Adapter
from .sdxl import StableDiffusionXLAdapter
from .unet import UNetAdapter

MODEL_TYPES = {
    "unet": UNetAdapter,
    "dit": DiTAdapter,
    "sd": StableDiffusionAdapter,
    "controlnet": ControlNetAdapter,
    "sdxl": StableDiffusionXLAdapter,
    "flux": FluxAdapter,
    "sd3": SD3Adapter,
    "qwenimage": QwenImageAdapter,
}

_OWN_PIPELINES = {cls.__name__: cls for cls in (ClassConditionalUNetPipeline, PixelDiTPipeline, UnconditionalUNetPipeline)}


def get_model_adapter(model_type: str):
    """The adapter class for ``model_type``; an unknown name raises a ``ValueError`` listing the valid ones."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model type {model_type!r}: choose one of {', '.join(MODEL_TYPES)}")
    return MODEL_TYPES[model_type]


def adapter_for_pipeline(pipeline, resolution=None):
    """The adapter of the model type whose ``pipeline_classes`` claim ``pipeline``'s class, around that
    pipeline's own modules (:meth:`ModelAdapter.from_pipeline`), or ``None`` when no type claims it."""
    name = type(pipeline).__name__
    cls = next((adapter for adapter in MODEL_TYPES.values() if name in adapter.pipeline_classes), None)
    return None if cls is None else cls.from_pipeline(pipeline, resolution=resolution)


def load_pipeline(folder: str, torch_dtype=None, revision=None):
    """Load what :meth:`ModelAdapter.save` wrote: a full pipeline folder, a ControlNet, or a LoRA folder.

    A LoRA folder (with ``ant_lora.json``) loads its base pipeline (``base_model/`` inside it, or the
    folder / Hub id it names, relative to itself), then the LoRA weights through the adapter's
    ``load_lora`` (diffusers' ``load_lora_weights`` for ``sd``). A ControlNet folder (``config.json``
    of the ControlNetModel and ``ant_controlnet.json``) gives the ``StableDiffusionControlNetPipeline``
    of its base with this ControlNet. This project's own pipeline classes are loaded with the
    installed code, never with the copy of it in the folder; every other pipeline goes through
    ``DiffusionPipeline.from_pretrained``. What DeMe saves beside
    diffusers' files (channel projections, an ensemble's router; see ``diffusers_ant.deme``) is re-attached,
    and a DiT trained on another class count gets ``pipeline.class_rows``, the label rows of the data
    set's classes (``class_map.json``), which this project's samplers use instead of every row.
    """
    from diffusers import DiffusionPipeline

    from ..deme import attach_saved_deme as _attach_deme  # DeMe's channel projections and ensemble router

    def attach_saved_deme(pipeline, saved):
        # ... and a class-mapped DiT's label rows (`class_map.json`): samplers read `pipeline.class_rows`
        from .dit import saved_class_rows

        pipeline = _attach_deme(pipeline, saved)
        rows = saved_class_rows(saved)
        if rows is not None:
            pipeline.class_rows = rows
        return pipeline

    lora_info = os.path.join(folder, LORA_INFO_NAME)
    if os.path.isfile(lora_info):
        with open(lora_info, encoding="utf-8") as f:
            info = json.load(f)
        # at the Hub revision the run trained on, when it recorded one (a Hub id's newest commit may differ)
        pipeline = load_pipeline(resolve_recorded_base(folder, info["base_model"]), torch_dtype=torch_dtype,
                                 revision=info.get("revision"))
        if info.get("vae"):  # trained with --pretrained_vae_model_name_or_path: sample with that VAE too
            from diffusers import AutoencoderKL

            vae = resolve_recorded_base(folder, info["vae"])
            subfolder = "vae" if os.path.isdir(os.path.join(vae, "vae")) else None
            pipeline.vae = AutoencoderKL.from_pretrained(vae, subfolder=subfolder, torch_dtype=torch_dtype)
        return attach_saved_deme(get_model_adapter(info["model_type"]).load_lora(pipeline, folder), folder)
    controlnet_base = controlnet_output_base(folder)
    if controlnet_base is not None:
        from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

        controlnet = ControlNetModel.from_pretrained(folder, torch_dtype=torch_dtype)
        revision = recorded_revision(folder)
        pipeline = StableDiffusionControlNetPipeline.from_pretrained(controlnet_base, controlnet=controlnet,
                                                                     torch_dtype=torch_dtype,
                                                                     **({"revision": revision} if revision else {}))
        return attach_saved_deme(pipeline, folder)
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        if os.path.isdir(folder):
            raise ValueError(
                f"{folder!r} holds no pipeline: expected model_index.json, {LORA_INFO_NAME} or {CONTROLNET_INFO_NAME}"
            )
        return DiffusionPipeline.from_pretrained(folder, torch_dtype=torch_dtype, revision=revision)  # a Hub id
    with open(index_path, encoding="utf-8") as f:
        class_name = json.load(f)["_class_name"]
    if isinstance(class_name, list) and class_name[-1] in _OWN_PIPELINES:
        return attach_saved_deme(_OWN_PIPELINES[class_name[-1]].from_pretrained(folder, torch_dtype=torch_dtype), folder)
    # Components saved as absent ([null, null], e.g. SD3 without T5) must be passed as None again, as
    # diffusers' docs load such a pipeline (`text_encoder_3=None, tokenizer_3=None`)
    with open(index_path, encoding="utf-8") as f:
        absent = {name: None for name, entry in json.load(f).items()
                  if isinstance(entry, list) and len(entry) == 2 and entry[0] is None}
    return attach_saved_deme(DiffusionPipeline.from_pretrained(folder, torch_dtype=torch_dtype, **absent), folder)


__all__ = [
    "MODEL_TYPES",
    "PRESETS",
    "ClassConditionalUNetPipeline",
    "ControlNetAdapter",
    "DiTAdapter",
    "FluxAdapter",
    "ModelAdapter",
    "PixelDiTPipeline",
    "SD3Adapter",
    "QwenImageAdapter",
    "StableDiffusionAdapter",
    "StableDiffusionXLAdapter",
    "UNetAdapter",
    "UnconditionalUNetPipeline",
    "adapter_for_pipeline",
    "get_model_adapter",
    "load_pipeline",
    "tiny_clip_tokenizer",
]
