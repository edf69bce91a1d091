"""``controlnet``: a ``ControlNetModel`` (Zhang et al. 2023) trained beside a frozen Stable Diffusion UNet.

The ControlNet is a trainable copy of the UNet's encoder fed with a conditioning image; its
zero-initialised convolutions add residuals to the frozen UNet's skip connections, so training
starts from the frozen model's behaviour (eq. 3-4 of the paper). ``predict`` runs the ControlNet,
then the frozen UNet with its residuals, as diffusers' ``train_controlnet.py`` does.

The ControlNet comes from ``controlnet_model_name_or_path``, else from the pretrained folder's
``controlnet/`` (a saved ``StableDiffusionControlNetPipeline``), else is copied from the UNet with
``ControlNetModel.from_unet``. Its conditioning embedding must downsample the control image as much
as the VAE downsamples pixels, so its block count follows the VAE. Control images are
``conditioning_pixel_values`` in [0, 1] with 3 channels (a 1-channel image is repeated to 3).

LoRA: the ControlNet's attention projections and its zero convolutions. The zero convolutions
must be included: with only internal layers adapted, every gradient into the ControlNet passes
through the zero convolutions, whose weights are zero, so nothing would ever be learned. For the
same reason a *new* ControlNet (``from_unet``, or a config) also trains its conditioning embedding
in full (``controlnet_cond_embedding``, about 0.1M parameters for SD): its output convolution is
zero-initialised too (the paper's zero convolution Z(c; theta_z1) on the condition, eq. 3), and as
a frozen zero it would keep the control image out of the network forever. A ControlNet loaded from
a pretrained one has learned that embedding already and keeps it frozen. LoRA weights are saved
in peft format (the pipeline's ``load_lora_weights`` targets the UNet and text encoder, not the
ControlNet), the embedding beside them in ``controlnet_cond_embedding.safetensors``; load with
:meth:`ControlNetAdapter.load_lora` (or ``load_pipeline``).

Saving a full ControlNet follows diffusers' ``train_controlnet.py``: the ``ControlNetModel`` alone
at the root of the output folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, so
``ControlNetModel.from_pretrained(output_dir)`` loads it), and the base pipeline it runs beside
named in ``ant_controlnet.json`` (a Hub id, or a path relative to the folder; a base built from a
preset is saved in ``base_model/``). ``load_pipeline(output_dir)`` assembles the
``StableDiffusionControlNetPipeline``, and such a folder can be given as
``pretrained_model_name_or_path`` to train on (its base supplies the frozen parts). The
``base_model/`` of a LoRA output on a new ControlNet is such a folder too: the untrained ControlNet,
naming the Stable Diffusion base instead of copying it.
"""

import json
import logging
import os

from .base import (BASE_MODEL_DIR, CONTROLNET_INFO_NAME, LORA_INFO_NAME, PretrainedSource, prompt_arguments,
                   remove_output_records, repeat_to, resolve_recorded_base)
from .lora import base_copy, has_lora
from .sd import StableDiffusionAdapter

logger = logging.getLogger(__name__)

# the trained conditioning embedding of a LoRA run on a new ControlNet, beside the LoRA weights
COND_EMBEDDING_WEIGHTS_NAME = "controlnet_cond_embedding.safetensors"


def controlnet_output_base(folder):
    """The base pipeline of a ControlNet output folder (see the module docstring), else ``None``."""
    if folder is None or not os.path.isfile(os.path.join(folder, CONTROLNET_INFO_NAME)):
        return None
    with open(os.path.join(folder, CONTROLNET_INFO_NAME), encoding="utf-8") as f:
        return resolve_recorded_base(folder, json.load(f)["base_model"])

def save_controlnet_output(controlnet, output_dir: str, base_pipeline: str, revision: str | None = None) -> None:
    """A ControlNet output folder: the ControlNet at the root (``config.json`` and safetensors weights, as
    diffusers' ``train_controlnet.py`` writes it) and ``ant_controlnet.json`` naming its Stable Diffusion
    base pipeline (a Hub id, at ``revision`` when given, or a path that is written relative to the folder)."""
    from ..hub import portable_path

    os.makedirs(output_dir, exist_ok=True)
    controlnet.save_pretrained(output_dir, safe_serialization=True)
    record = {"model_type": "controlnet", "base_model": portable_path(base_pipeline, output_dir)}
    if revision and not os.path.isdir(base_pipeline):
        record["revision"] = revision
    with open(os.path.join(output_dir, CONTROLNET_INFO_NAME), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)


def recorded_revision(folder) -> str | None:
    """The Hub revision of the base a LoRA or ControlNet output folder names (its ``ant_lora.json`` /
    ``ant_controlnet.json``), else None."""
    for name in (LORA_INFO_NAME, CONTROLNET_INFO_NAME):
        path = os.path.join(os.fspath(folder), name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f).get("revision")
    return None


# diffusers' default conditioning embedding for SD (4 blocks: downsampling by 8, as SD's VAE)
_CONDITIONING_EMBEDDING = (16, 32, 96, 256)


def new_controlnet(unet, vae, **config):
    """A new ControlNet copied from ``unet`` (``ControlNetModel.from_unet``: its encoder's weights, zero
    convolutions out, so it adds nothing until trained), with a conditioning embedding that downsamples by
    the VAE's factor (diffusers' default embedding has SD's 4 blocks; a smaller VAE takes its first ones)."""
    from diffusers import ControlNetModel

    if "conditioning_embedding_out_channels" not in config:
        blocks = StableDiffusionAdapter.vae_scale_factor(vae).bit_length()  # scale 2**(n-1) -> n blocks
        config["conditioning_embedding_out_channels"] = _CONDITIONING_EMBEDDING[:blocks]
    return ControlNetModel.from_unet(unet, **config)


class ControlNetAdapter(StableDiffusionAdapter):
    """See the module docstring. Beside the base attributes:

    controlnet_is_new: the ControlNet was made here (``from_unet`` or a config), not loaded trained.
    base_pipeline: where the frozen UNet, VAE and text encoder came from (an absolute local path or a
        Hub id), or ``None`` when they were built from a preset (a full save then copies them).
    """

    model_type = "controlnet"
    # the zero convolutions that feed the frozen UNet
    output_module_names = ("controlnet_down_blocks", "controlnet_mid_block")

    def __init__(self, *args, controlnet_is_new=False, base_pipeline=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.controlnet_is_new = controlnet_is_new
        self.base_pipeline = base_pipeline
        self._initial_cond_embedding = None  # set when add_lora makes the embedding trainable

    @classmethod
    def load(cls, pretrained_model_name_or_path=None, model_config_name_or_path=None, **kwargs):
        """As :meth:`ModelAdapter.load`; ``pretrained_model_name_or_path`` may also be a ControlNet output
        folder of this project: its ControlNet is trained further, its recorded base supplies the rest."""
        base = controlnet_output_base(pretrained_model_name_or_path)
        if base is None:
            return super().load(pretrained_model_name_or_path, model_config_name_or_path, **kwargs)
        if kwargs.get("controlnet_model_name_or_path") is not None:
            raise ValueError(
                f"{pretrained_model_name_or_path!r} is a trained ControlNet: pass it alone, or pass its base "
                "pipeline as pretrained_model_name_or_path with controlnet_model_name_or_path"
            )
        kwargs["controlnet_model_name_or_path"] = pretrained_model_name_or_path
        adapter = super().load(base, model_config_name_or_path, **kwargs)
        # a LoRA output then names this folder as its base (which in turn names its own base)
        adapter.pretrained_model_name_or_path = os.path.abspath(pretrained_model_name_or_path)
        adapter.model_from_pretrained = True
        return adapter

    @classmethod
    def _build(cls, source, preset, *, resolution, num_classes, num_channels, controlnet_model_name_or_path):
        from diffusers import ControlNetModel

        vae, tokenizer, text_encoder = cls._build_frozen(source, preset, resolution, num_channels)
        use_pretrained_unet = source is not None and source.has("unet")
        unet, _ = cls._build_unet(
            source if use_pretrained_unet else None,
            None if use_pretrained_unet else preset["unet"],
            vae,
            text_encoder,
            resolution,
        )
        model_config = dict(preset["model"]) if preset is not None else {}
        from_pretrained, is_new = False, False
        if controlnet_model_name_or_path is not None:
            # the same --revision / --variant / --cache_dir as the pretrained pipeline
            hub = (source.revision, source.variant, source.cache_dir) if source is not None else (None, None, None)
            cn_source = PretrainedSource(controlnet_model_name_or_path, *hub)
            subfolder = "controlnet" if cn_source.has("controlnet") else None
            try:
                controlnet = cn_source.load(ControlNetModel, subfolder=subfolder)
            except (OSError, ValueError):
                if cn_source.variant is None:
                    raise
                # --variant names the base's files (fp16 weights of an SD checkpoint); a ControlNet repo or folder
                # without that variant (train_controlnet.py's outputs, most Hub ControlNets) loads its own weights
                cn_source = PretrainedSource(controlnet_model_name_or_path, source.revision, None, source.cache_dir)
                controlnet = cn_source.load(ControlNetModel, subfolder=subfolder)
                logger.info("--controlnet_model_name_or_path %s has no %s variant: its own weights are loaded",
                            controlnet_model_name_or_path, hub[1])
        elif source is not None and source.has("controlnet") and preset is None:
            controlnet, from_pretrained = source.load(ControlNetModel, subfolder="controlnet"), True
        elif "block_out_channels" in model_config:  # a full ControlNetModel config JSON
            controlnet, is_new = ControlNetModel(**model_config), True
        else:
            controlnet, is_new = new_controlnet(unet, vae, **model_config), True
        base_pipeline = None
        if use_pretrained_unet:
            base_pipeline = os.path.abspath(source.path) if source.is_local else source.path
        return {
            "model": controlnet,
            "unet": unet,
            "vae": vae,
            "text_encoder": text_encoder,
            "tokenizer": tokenizer,
            "num_channels": vae.config.in_channels,
            "sample_size": unet.config.sample_size,
            "model_from_pretrained": from_pretrained,
            "controlnet_is_new": is_new,
            "base_pipeline": base_pipeline,
        }

    @property
    def in_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def lora_target_modules(self) -> list:
        """Attention projections plus every zero convolution (see the module docstring for why)."""
        zero_convs = [name for name, _ in self.model.named_modules() if name.startswith("controlnet_down_blocks.")]
        return super().lora_target_modules + zero_convs + ["controlnet_mid_block"]

    def add_lora(self, rank: int, alpha=None, target_modules=None, dropout: float = 0.0):
        """LoRA as in :meth:`ModelAdapter.add_lora`; a new ControlNet also trains its conditioning
        embedding in full, and its zero convolutions take LoRA whatever `target_modules` names (see the module
        docstring for why: without them no gradient reaches any other layer, and nothing would be learned)."""
        if target_modules and self.controlnet_is_new:
            attention = set(super().lora_target_modules)
            zero_convs = [name for name in self.lora_target_modules if name not in attention]
            target_modules = [*target_modules, *(name for name in zero_convs if name not in target_modules)]
        config = super().add_lora(rank, alpha=alpha, target_modules=target_modules, dropout=dropout)
        if self.controlnet_is_new:
            embedding = self.model.controlnet_cond_embedding
            # its starting point, for the base_model/ a LoRA output carries (see _untrained_base)
            self._initial_cond_embedding = {k: v.detach().clone() for k, v in embedding.state_dict().items()}
            embedding.requires_grad_(True)
        return config

    @property
    def trains_cond_embedding(self) -> bool:
        """Whether the conditioning embedding is trained in full beside the LoRA weights."""
        return self._initial_cond_embedding is not None

    @property
    def conditioning_channels(self) -> int:
        """Channels of the ControlNet's conditioning image (3 for diffusers' ControlNets; 1 for a greyscale one)."""
        return self.model.config.conditioning_channels

    def data_options(self) -> dict:
        """As the base, plus conditioning images read in the ControlNet's channels (L for a 1-channel one)."""
        return {**super().data_options(), "conditioning_channels": self.conditioning_channels}

    def conditioning(self, batch, generator=None, training=False):
        cond = super().conditioning(batch, generator=generator, training=training)
        image = batch.get("conditioning_pixel_values")
        if image is None:
            raise ValueError("ControlNet training needs conditioning images: set --conditioning_image_column")
        expected = self.conditioning_channels
        if image.shape[1] == 1 and expected == 3:
            image = image.expand(-1, 3, -1, -1)
        elif image.shape[1] != expected:
            raise ValueError(f"the ControlNet takes {expected}-channel conditioning images, the batch holds "
                             f"{image.shape[1]}-channel ones: build the data loader with the adapter's data_options()")
        cond["controlnet_cond"] = image.float()
        return cond

    def predict(self, model, x_t, timesteps, conditioning):
        hidden = conditioning["encoder_hidden_states"]
        down, mid = model(
            x_t, timesteps, encoder_hidden_states=hidden, controlnet_cond=conditioning["controlnet_cond"], return_dict=False
        )
        dtype = self.unet.dtype
        return self.unet(
            x_t.to(dtype),
            timesteps,
            encoder_hidden_states=hidden.to(dtype),
            down_block_additional_residuals=[r.to(dtype) for r in down],
            mid_block_additional_residual=mid.to(dtype),
        ).sample

    def make_pipeline(self, model=None, scheduler=None):
        from diffusers import StableDiffusionControlNetPipeline

        model = model if model is not None else self.model
        pipeline = StableDiffusionControlNetPipeline(unet=self.unet, controlnet=model, **self._pipeline_parts(scheduler))
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def _sample(
        self, pipeline, num_images, generator, num_inference_steps, prompts=None, conditioning_images=None, guidance_scale=None, **unused
    ):
        if conditioning_images is None:
            raise ValueError("ControlNet sampling needs conditioning_images (one per image, or one for all)")
        if hasattr(conditioning_images, "ndim") and conditioning_images.ndim == 4:
            conditioning_images = list(conditioning_images)
        kwargs = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
        images = repeat_to(conditioning_images, num_images)
        if pipeline.controlnet.config.conditioning_channels != 3:
            images = [pil_to_condition(image, pipeline.controlnet.config.conditioning_channels) for image in images]
            if len({image.shape for image in images}) == 1:
                import torch

                images = torch.cat(images)  # (the pipeline warns of a list of 4-d tensors)
        return pipeline(
            **prompt_arguments(prompts, num_images),
            image=images,
            num_inference_steps=num_inference_steps,
            generator=generator,
            output_type="pil",
            **kwargs,
        ).images

    # ------------------------------------------------------------------ saving

    def save(self, output_dir: str, model=None, lora: bool = False):
        """``lora=True``: as :meth:`ModelAdapter.save` (plus the conditioning embedding, if trained).

        ``lora=False``: the ControlNet at the root of ``output_dir``, as diffusers' ``train_controlnet.py``
        saves it, and ``ant_controlnet.json`` naming the base pipeline (see the module docstring).
        """
        if lora:
            return super().save(output_dir, model, lora=True)
        model = model if model is not None else self.model
        os.makedirs(output_dir, exist_ok=True)
        remove_output_records(output_dir)
        self._save_controlnet_output(output_dir, base_copy(model, merge=True) if has_lora(model) else model)

    def _save_base_copy(self, folder, base_model):
        """A LoRA output's ``base_model/`` is the untrained ControlNet saved the same way (not a copy of
        the whole Stable Diffusion pipeline: it names its base, unless that base was built here)."""
        self._save_controlnet_output(folder, base_model)

    def _save_controlnet_output(self, output_dir, model):
        from diffusers import StableDiffusionPipeline

        if self.base_pipeline is not None:
            save_controlnet_output(model, output_dir, self.base_pipeline, revision=self.pretrained_revision)
            return
        # frozen parts built from a preset: nowhere else to find them, so they go into base_model/
        StableDiffusionPipeline(unet=self.unet, **self._pipeline_parts(None)).save_pretrained(
            os.path.join(output_dir, BASE_MODEL_DIR), safe_serialization=True
        )
        save_controlnet_output(model, output_dir, os.path.join(output_dir, BASE_MODEL_DIR))

    def _save_lora_weights(self, output_dir, model):
        from safetensors.torch import save_file

        from .lora import save_peft_lora

        save_peft_lora(output_dir, model, self.lora_config)
        if self.trains_cond_embedding:
            state = model.controlnet_cond_embedding.state_dict()
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                      os.path.join(output_dir, COND_EMBEDDING_WEIGHTS_NAME))

    def _untrained_base(self, model):
        """The ControlNet without LoRA and with its conditioning embedding as it was before training."""
        base = super()._untrained_base(model)
        if self.trains_cond_embedding:
            base.controlnet_cond_embedding.load_state_dict(self._initial_cond_embedding)
        return base

    def _lora_info_extra(self) -> dict:
        return {"trained_in_full": ["controlnet_cond_embedding"]} if self.trains_cond_embedding else {}

    @classmethod
    def load_lora(cls, pipeline, folder):
        """Attach the peft-format LoRA in ``folder`` to ``pipeline.controlnet``, and its trained
        conditioning embedding when the folder has one."""
        from safetensors.torch import load_file

        from .lora import load_peft_lora

        load_peft_lora(pipeline.controlnet, folder)
        embedding_file = os.path.join(folder, COND_EMBEDDING_WEIGHTS_NAME)
        if os.path.isfile(embedding_file):
            pipeline.controlnet.controlnet_cond_embedding.load_state_dict(load_file(embedding_file))
        return pipeline


def pil_to_condition(image, channels: int):
    """A conditioning image for a ControlNet of `channels` (1 or 4) conditioning channels, as its pipeline
    takes it: a (1, channels, H, W) float tensor in [0, 1]. A PIL image would not do: diffusers' ControlNet
    pipelines convert every PIL condition to RGB (`VaeImageProcessor(do_convert_rgb=True)`), and pass a
    tensor through unchanged but for the resize. A tensor is returned as it is."""
    import numpy as np
    import torch

    from ..data.transforms import CHANNEL_MODES

    if isinstance(image, torch.Tensor):
        return image if image.dim() == 4 else image[None]  # one image of a (N, C, H, W) batch: (1, C, H, W)

    array = np.asarray(image.convert(CHANNEL_MODES[channels]), dtype=np.float32) / 255.0
    array = array[..., None] if array.ndim == 2 else array
    return torch.from_numpy(array).permute(2, 0, 1)[None]
