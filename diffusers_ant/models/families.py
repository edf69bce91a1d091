"""Which ``--model_type`` a saved pipeline is: one rule for loaded pipelines and for folders.

The knowledge-bank builder (``diff_tuning/bank.py: model_type_of_pipeline``) and the analysis tools
(``analysis/common.py: infer_model_type``) both ask it; before issue 16 each had its own component
rule, and both read a Flux folder (``text_encoder`` + ``transformer``) as ``sd``.

The pipeline's class name decides first: ``model_index.json``'s ``_class_name`` (diffusers writes it
with ``save_pretrained``; this project's own pipelines write ``["ant_pipeline", "<ClassName>"]``) or the
loaded pipeline's class. A class this table does not know (a diffusers img2img / inpaint variant, a
community pipeline) falls back to the components: a ControlNet, then the denoiser's class, then which
text encoders the pipeline has.
"""

from __future__ import annotations

import json
import os

# diffusers' (and this project's) pipeline classes and the --model_type that trains each
PIPELINE_MODEL_TYPES = {
    "DDPMPipeline": "unet",
    "DDIMPipeline": "unet",
    "UnconditionalUNetPipeline": "unet",
    "ClassConditionalUNetPipeline": "unet",
    "DiTPipeline": "dit",
    "PixelDiTPipeline": "dit",
    "StableDiffusionPipeline": "sd",
    "StableDiffusionControlNetPipeline": "controlnet",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "QwenImagePipeline": "qwenimage",
}

# the denoiser classes that name their family when the pipeline class does not
DENOISER_MODEL_TYPES = {
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "QwenImageTransformer2DModel": "qwenimage",
    "DiTTransformer2DModel": "dit",
    "UNet2DModel": "unet",
}


# Denoisers that their pipelines (and the adapters' `predict`) call with the sigma, `timestep / num_train_timesteps`,
# instead of the flow-matching scheduler's timestep `sigma * num_train_timesteps` (FluxPipeline, QwenImagePipeline)
SIGMA_TIMESTEP_DENOISERS = ("FluxTransformer2DModel", "QwenImageTransformer2DModel")


def denoiser_takes_sigma(model) -> bool:
    """Whether ``model``'s callers pass it the sigma rather than the scheduler's timestep (see above)."""
    return any(_last(cls.__name__) in SIGMA_TIMESTEP_DENOISERS for cls in type(model).__mro__)


def _last(name):
    return name[-1] if isinstance(name, (list, tuple)) and name else name


def model_type_of_components(class_name, components: dict) -> str:
    """The model type from a pipeline class name and ``{component: class name or None}`` (None: absent)."""
    found = PIPELINE_MODEL_TYPES.get(_last(class_name))
    if found is not None:
        return found
    present = {name for name, cls in components.items() if cls is not None}
    if "controlnet" in present:
        return "controlnet"
    for denoiser in ("transformer", "unet"):
        found = DENOISER_MODEL_TYPES.get(components.get(denoiser))
        if found is not None:
            return found
    if "transformer" in present:
        if "text_encoder_3" in components:  # SD3 saves an absent T5 as [null, null]: the key stays
            return "sd3"
        if "text_encoder_2" in present:
            return "flux"
        return "qwenimage" if "text_encoder" in present else "dit"
    if "unet" in present and "text_encoder_2" in present:
        return "sdxl"
    return "sd" if "text_encoder" in present else "unet"


def model_type_of_index(index: dict) -> str:
    """The model type of a parsed ``model_index.json``."""
    components = {name: (_last(entry) if isinstance(entry, (list, tuple)) else None)
                  for name, entry in index.items() if not name.startswith("_")}
    return model_type_of_components(index.get("_class_name"), components)


def model_type_of_folder(folder: str) -> str:
    """The model type of a pipeline folder (its ``model_index.json``); one-line ``ValueError`` when it has none."""
    path = os.path.join(os.fspath(folder), "model_index.json")
    if not os.path.isfile(path):
        raise ValueError(f"cannot tell the model type of {os.fspath(folder)!r} (no model_index.json): pass --model_type")
    with open(path, encoding="utf-8") as f:
        return model_type_of_index(json.load(f))


def model_type_of_pipeline(pipeline) -> str:
    """The model type of a loaded diffusers pipeline (its class, else its components)."""
    components = {name: (type(part).__name__ if part is not None else None)
                  for name, part in getattr(pipeline, "components", {}).items()}
    return model_type_of_components(type(pipeline).__name__, components)


__all__ = ["PIPELINE_MODEL_TYPES", "model_type_of_folder", "model_type_of_index", "model_type_of_pipeline"]
