"""``flux``: FLUX.1's ``FluxTransformer2DModel`` (Black Forest Labs 2024), rectified flow on packed VAE latents.

What the adapter does is what diffusers' ``train_dreambooth_lora_flux.py`` and ``FluxPipeline`` do, so
a LoRA trained here is a LoRA a Flux user loads with ``FluxPipeline.load_lora_weights``:

- **latents**: the VAE posterior sample, ``(z - shift_factor) * scaling_factor``
  (``ModelAdapter.encode_pixels``), kept in the unpacked (B, C, H, W) layout everywhere outside
  :meth:`FluxAdapter.predict`, so the library's noising, targets, SNR, clustering and loss see an
  ordinary image-shaped tensor.
- **packing**: inside ``predict`` the noisy latents are packed into 2x2 patches
  (``FluxPipeline._pack_latents``: (B, C, H, W) -> (B, H/2 * W/2, 4C)) with their position ids
  (``FluxPipeline._prepare_latent_image_ids`` at (H/2, W/2), as the pipeline calls it), the text ids
  are zeros (L, 3) as in ``FluxPipeline.encode_prompt``, and the output is unpacked back
  (``FluxPipeline._unpack_latents``).
- **text**: CLIP-L's pooled output (``pooled_projections``) and T5's last hidden state
  (``encoder_hidden_states``), each tokenized to its own maximum length, as ``FluxPipeline``'s
  ``_get_clip_prompt_embeds`` / ``_get_t5_prompt_embeds``. ``--cache_text_embeddings`` stores both per
  caption (:meth:`FluxAdapter.encode_text`), frees both encoders, and samples validation images from the
  prompts that ``FluxPipeline.encode_prompt`` encoded before they went (:meth:`FluxAdapter.validation_prompt_kwargs`).
- **guidance**: a guidance-distilled checkpoint (FLUX.1-dev, ``transformer.config.guidance_embeds``)
  takes the guidance value as an input; training feeds ``--guidance_scale`` (default 1.0) for every
  sample, as the diffusers script does; FLUX.1-schnell has no guidance input and gets none.
- **timesteps**: the model is called with ``sigma`` (``timesteps / 1000`` in the script); the
  training sigmas are the scheduler's with its shift. A static shift (schnell: 1.0) is the
  scheduler's own; a dynamic one (dev: ``use_dynamic_shifting``) is resolved once for the training
  resolution's sequence length with the pipeline's ``calculate_shift``, and the training scheduler
  becomes the equivalent static one (``exp(mu)`` for the exponential time shift, ``mu`` for the
  linear), so that ``schedule_snr`` and the ANT clustering see the sigmas actually trained. (diffusers'
  script trains a dynamic-shift checkpoint on its unshifted sigmas; see docs/families/flux.md.) The
  saved / sampling pipeline keeps the original scheduler, which ``FluxPipeline`` shifts for the
  sampling resolution.

Presets: ``tiny`` (guidance-distilled, dynamic shift: dev-like) and ``tiny-schnell`` (no guidance
embedding, static shift 1.0), sized as diffusers' Flux pipeline tests size them, with CLIP and T5
tokenizers built in memory (presets.py).
"""

import math
import os

import torch

from .base import (ModelAdapter, PretrainedSource, _copy_scheduler, check_input_channels, check_pipeline_family,
                   check_quantized_source, packed_sample_size, prompt_arguments, repeat_to)
from .lora import inference_lora_config
from .presets import resolve_model_config

# The pipeline classes of the other model types, for a one-line error naming both model types when a folder
# of another family is given as --pretrained_model_name_or_path with --model_type flux (the one table,
# shared with the bank's detection).
from .families import PIPELINE_MODEL_TYPES as OTHER_FAMILIES
# FluxPipeline's maximum T5 sequence length (its `max_sequence_length` must be <= 512).
MAX_SEQUENCE_LENGTH = 512
# diffusers' train_dreambooth_lora_flux.py's LoRA targets (the double-stream blocks' attention and both
# feed-forwards; "attn.to_*" also matches the single-stream blocks' attention).
FLUX_LORA_TARGETS = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): ``FluxPipeline._pack_latents``."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W) for latent ``height`` x ``width``: ``FluxPipeline._unpack_latents``
    (which takes pixel sizes and the VAE factor; latent sizes are pixel sizes at factor 1)."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(packed, height, width, 1)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The (H/2 * W/2, 3) position ids of packed latents of latent size ``height`` x ``width``, as
    ``FluxPipeline.prepare_latents`` makes them."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)


def dynamic_shift_mu(scheduler_config, image_seq_len: int) -> float:
    """``mu`` of a dynamic-shift scheduler for ``image_seq_len`` packed tokens, with the pipeline's own
    ``calculate_shift`` and the config keys ``FluxPipeline.__call__`` reads."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(
        image_seq_len,
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5),
        scheduler_config.get("max_shift", 1.15),
    )


def training_scheduler(scheduler, latent_size: int, flow_shift=None):
    """The static-shift scheduler whose training sigmas are the ones trained at ``latent_size``.

    ``flow_shift`` (``--flow_shift``) replaces any shift. A dynamic-shift scheduler's time shift at
    ``mu`` (``FlowMatchEulerDiscreteScheduler.time_shift``) equals the static shift ``s * sigma / (1 +
    (s - 1) * sigma)`` with ``s = exp(mu)`` (exponential) or ``s = mu`` (linear), for ``sigma``'s exponent 1."""
    if flow_shift is not None:
        return _copy_scheduler(scheduler, shift=float(flow_shift), use_dynamic_shifting=False)
    if not scheduler.config.get("use_dynamic_shifting", False):
        return _copy_scheduler(scheduler)
    mu = dynamic_shift_mu(scheduler.config, (latent_size // 2) ** 2)
    linear = scheduler.config.get("time_shift_type", "exponential") == "linear"
    return _copy_scheduler(scheduler, shift=float(mu if linear else math.exp(mu)), use_dynamic_shifting=False)


def default_resolution(preset: bool) -> int:
    """The training resolution without --resolution: 16 pixels for a preset, 512 for a checkpoint."""
    return 16 if preset else 512


def routing_scheduler(pipeline, resolution=None, flow_shift=None):
    """The scheduler whose training sigmas a router over ``pipeline``'s FLUX.1 transformer must map to training
    indices: the run's static table with ``flow_shift`` (``--flow_shift``); else, for a dynamic-shift
    scheduler (whose own table is unshifted while the run trained on the one shifted for its resolution), the
    table at ``resolution`` (pixels); else the pipeline's scheduler itself. None for a pipeline of another
    family (its own scheduler's table is the trained one: Qwen-Image trains on the unshifted table), and where
    the shift depends on a resolution that is not known."""
    if type(pipeline).__name__ != "FluxPipeline":
        return None
    scheduler = pipeline.scheduler
    if flow_shift is not None:
        return training_scheduler(scheduler, 0, flow_shift)  # (a static shift: the resolution plays no part)
    if not scheduler.config.get("use_dynamic_shifting", False):
        return scheduler
    if resolution is None:
        return None
    return training_scheduler(scheduler, int(resolution) // FluxAdapter.vae_scale_factor(pipeline.vae))


def run_routing_settings(config: dict) -> dict:
    """``{"resolution", "flow_shift"}`` a FLUX.1 run trained with, from its ``training_config.json`` (the
    resolution it defaulted to where --resolution was not given): the arguments of `routing_scheduler`."""
    resolution = config.get("resolution") or default_resolution(config.get("model_config_name_or_path") is not None)
    return {"resolution": int(resolution), "flow_shift": config.get("flow_shift")}


class FluxAdapter(ModelAdapter):
    model_type = "flux"
    pipeline_classes = ("FluxPipeline",)
    default_lora_targets = FLUX_LORA_TARGETS
    output_module_names = ("proj_out",)
    last_block_name = "single_transformer_blocks"
    # validation-only for the other types, an input of the trained model here: a resume may not change it
    training_flags = ("guidance_scale",)

    def __init__(self, model, noise_scheduler, *, text_encoder_2=None, tokenizer_one=None, tokenizer_two=None,
                 pipeline_scheduler=None, guidance_scale=1.0, **kwargs):
        # `tokenizer` stays None: the data loader then hands raw captions (`captions`), which need two
        # tokenizers here, CLIP's and T5's.
        self.text_encoder_2 = text_encoder_2
        super().__init__(model, noise_scheduler, **kwargs)
        self.tokenizer_one = tokenizer_one
        self.tokenizer_two = tokenizer_two
        # what the saved pipeline and validation sample with (a dynamic shift stays dynamic there)
        self.pipeline_scheduler = pipeline_scheduler if pipeline_scheduler is not None else noise_scheduler
        self.guidance_scale = 1.0 if guidance_scale is None else float(guidance_scale)
        self.max_sequence_length = min(MAX_SEQUENCE_LENGTH, tokenizer_two.model_max_length)

    @staticmethod
    def options_from_args(args) -> dict:
        """The family's own keyword arguments of :meth:`load` from train_ant.py's arguments."""
        return {"guidance_scale": getattr(args, "guidance_scale", None)}

    # ------------------------------------------------------------------ building

    @classmethod
    def load(cls, pretrained_model_name_or_path=None, model_config_name_or_path=None, resolution=None,
             num_classes=None, prediction_type=None, revision=None, variant=None, cache_dir=None,
             controlnet_model_name_or_path=None, num_channels=None, noise_scheduler=None, flow_shift=None,
             guidance_scale=None, quantization_config=None):
        """A Flux pipeline folder / Hub id (``FluxPipeline`` layout) or a preset (``tiny``, ``tiny-schnell``).

        Written here rather than through ``ModelAdapter.load``: Flux trains with flow matching on
        latents, which the pixel-model path refuses, and it needs two schedulers (see the module
        docstring). ``resolution`` defaults to 512 for a checkpoint (diffusers' script) and 16 for a
        preset; it must be a multiple of twice the VAE factor (packing). ``guidance_scale``: the
        value fed to a guidance-distilled transformer (default 1.0). ``num_classes``,
        ``controlnet_model_name_or_path`` and ``num_channels`` are not used: Flux is text-conditional and
        its VAE takes RGB (greyscale data is converted, as for a pretrained SD). ``quantization_config``:
        ``--quantize_base`` (``ModelAdapter.load``)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

        if pretrained_model_name_or_path is None and model_config_name_or_path is None:
            raise ValueError("nothing to load: give pretrained_model_name_or_path or model_config_name_or_path (e.g. 'tiny')")
        if noise_scheduler not in (None, "flow_match"):
            raise ValueError(f"--model_type flux trains with flow matching: drop --noise_scheduler {noise_scheduler}")
        if prediction_type not in (None, "flow"):
            raise ValueError(f"Flux predicts the flow (noise - x0): drop --prediction_type {prediction_type}")
        source = preset = None
        check_quantized_source(quantization_config, pretrained_model_name_or_path, model_config_name_or_path)
        if pretrained_model_name_or_path is not None:
            source = PretrainedSource(pretrained_model_name_or_path, revision, variant, cache_dir,
                                      quantization_config=quantization_config)
            cls._check_family(source)
        if model_config_name_or_path is not None:
            preset = resolve_model_config(cls.model_type, model_config_name_or_path)
        vae = cls._load_vae(source, preset, 3, resolution)
        scale = cls.vae_scale_factor(vae)
        resolution = resolution or default_resolution(preset is not None)
        # checked before the text encoders and the transformer load: a multiple of twice the VAE factor
        latent_size = packed_sample_size(resolution, scale, "Flux")
        tokenizer_one, text_encoder, tokenizer_two, text_encoder_2 = cls._load_text_parts_flux(source, preset)
        if preset is not None:
            config = dict(preset["model"])
            config.update(in_channels=4 * vae.config.latent_channels,
                          joint_attention_dim=text_encoder_2.config.d_model,
                          pooled_projection_dim=text_encoder.config.hidden_size)
            model, from_pretrained = FluxTransformer2DModel(**config), False
        else:
            model, from_pretrained = source.load(FluxTransformer2DModel, subfolder="transformer"), True
            check_input_channels(model, 4 * vae.config.latent_channels, source, "flux")  # (2x2 packed latents)
        if source is not None and source.has("scheduler"):
            scheduler = source.load(FlowMatchEulerDiscreteScheduler, subfolder="scheduler")
        else:
            scheduler = FlowMatchEulerDiscreteScheduler(**(preset or {}).get("scheduler", {}))
        pipeline_scheduler = scheduler if flow_shift is None else training_scheduler(scheduler, latent_size, flow_shift)
        if source is not None and source.is_local:
            pretrained_model_name_or_path = os.path.abspath(pretrained_model_name_or_path)
        return cls(model, training_scheduler(scheduler, latent_size, flow_shift), vae=vae, text_encoder=text_encoder,
                   text_encoder_2=text_encoder_2, tokenizer_one=tokenizer_one, tokenizer_two=tokenizer_two,
                   pipeline_scheduler=pipeline_scheduler, guidance_scale=guidance_scale,
                   num_channels=vae.config.in_channels, sample_size=latent_size,
                   pretrained_model_name_or_path=pretrained_model_name_or_path, model_from_pretrained=from_pretrained)

    @classmethod
    def from_pipeline(cls, pipeline, resolution=None):
        """The adapter around a loaded ``FluxPipeline``'s own components, no copy (the knowledge bank samples
        through it, ``diff_tuning/bank.py``), sampling with the pipeline's own scheduler (its shift
        resolved by the pipeline for the size) at ``resolution`` pixels square (default the pipeline's
        ``default_sample_size * vae_scale_factor``, 1024 for FLUX.1)."""
        scale = cls.vae_scale_factor(pipeline.vae)
        resolution = resolution or pipeline.default_sample_size * pipeline.vae_scale_factor
        return cls(pipeline.transformer, pipeline.scheduler, vae=pipeline.vae, text_encoder=pipeline.text_encoder,
                   text_encoder_2=pipeline.text_encoder_2, tokenizer_one=pipeline.tokenizer,
                   tokenizer_two=pipeline.tokenizer_2, pipeline_scheduler=pipeline.scheduler,
                   num_channels=pipeline.vae.config.in_channels,
                   sample_size=packed_sample_size(resolution, scale, "Flux"),
                   model_from_pretrained=True)

    @staticmethod
    def _check_family(source):
        """A pipeline folder of another family is one line naming both model types."""
        if source.index is None:
            raise ValueError(f"{source.path!r} is not a Flux pipeline folder (no model_index.json): give the "
                             "folder FluxPipeline.save_pretrained writes, or a Flux Hub id")
        check_pipeline_family(source, "flux")  # a class another type claims: one line naming both types
        name = source.index.get("_class_name")
        name = name[-1] if isinstance(name, list) else name
        transformer = (source.index.get("transformer") or [None, None])[-1]
        if name == "FluxPipeline" or transformer == "FluxTransformer2DModel":
            return
        other = OTHER_FAMILIES.get(name)
        family = f"--model_type {other}" if other else "its own model type"
        raise ValueError(f"{source.path!r} is a {name} folder ({family}), not a FluxPipeline (--model_type flux): "
                         f"pass {family}, or a Flux checkpoint")

    @staticmethod
    def _load_text_parts_flux(source, preset):
        """CLIP tokenizer + text encoder and T5 tokenizer + encoder: the pipeline's, or the preset's (tiny, random)."""
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        from .presets import tiny_clip_tokenizer, tiny_t5_encoder, tiny_t5_tokenizer, tiny_text_encoder

        if source is not None:
            for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
                if not source.has(name):
                    raise ValueError(f"pretrained pipeline {source.path!r} has no {name}: a Flux pipeline has CLIP "
                                     "(text_encoder) and T5 (text_encoder_2) with their tokenizers")
            tokenizer_one = source.load(CLIPTokenizer, subfolder="tokenizer")
            try:
                tokenizer_two = source.load(T5TokenizerFast, subfolder="tokenizer_2")
            except ValueError as err:
                raise ValueError(f"the T5 tokenizer of {source.path!r} did not load ({err}); a folder with only "
                                 "spiece.model needs sentencepiece: pip install sentencepiece protobuf") from err
            return (tokenizer_one, source.load(CLIPTextModel, subfolder="text_encoder"),
                    tokenizer_two, source.load(T5EncoderModel, subfolder="text_encoder_2"))
        tokenizer_one = tiny_clip_tokenizer()
        tokenizer_two = tiny_t5_tokenizer()
        return (tokenizer_one, tiny_text_encoder(tokenizer_one, preset["text_encoder"]),
                tokenizer_two, tiny_t5_encoder(tokenizer_two, preset["text_encoder_2"]))

    def frozen_modules(self) -> dict:
        parts = super().frozen_modules()
        if self.text_encoder_2 is not None:
            parts["text_encoder_2"] = self.text_encoder_2
        return parts

    @property
    def guidance_embeds(self) -> bool:
        """Whether the transformer is guidance-distilled (takes ``guidance``: FLUX.1-dev, not schnell)."""
        return bool(self.model.config.guidance_embeds)

    # ------------------------------------------------------------------ training step

    @torch.no_grad()
    def encode_prompt(self, captions) -> tuple:
        """Captions -> (T5 ``prompt_embeds`` (B, L, D), CLIP ``pooled_prompt_embeds`` (B, D)), float32.

        As ``FluxPipeline._get_clip_prompt_embeds`` (CLIP's pooled output at its ``model_max_length``)
        and ``_get_t5_prompt_embeds`` (T5's last hidden state, padded to ``max_sequence_length``)."""
        captions = list(captions)
        clip_ids = self.tokenizer_one(captions, padding="max_length", max_length=self.tokenizer_one.model_max_length,
                                      truncation=True, return_tensors="pt").input_ids
        pooled = self.text_encoder(clip_ids.to(self.text_encoder.device), output_hidden_states=False).pooler_output
        t5_ids = self.tokenizer_two(captions, padding="max_length", max_length=self.max_sequence_length,
                                    truncation=True, return_tensors="pt").input_ids
        embeds = self.text_encoder_2(t5_ids.to(self.text_encoder_2.device), output_hidden_states=False)[0]
        return embeds.float(), pooled.float()

    def null_condition_batch(self, batch):
        # no captions (nor cached embeddings of them) -> the empty prompt (see `encode_text`)
        return {key: value for key, value in batch.items()
                if key != "captions" and not key.startswith(self.CACHED_TEXT_PREFIX)}

    def encode_text(self, batch) -> dict:
        """The batch's captions (none: the empty prompt, i.e. unconditional training) through CLIP and T5
        (:meth:`encode_prompt`): ``encoder_hidden_states`` (B, L, D) and ``pooled_projections`` (B, D). What
        ``--cache_text_embeddings`` stores per caption; T5 pads to ``max_sequence_length``, so cached rows
        of any caption batch together."""
        captions = batch.get("captions")
        if captions is None:  # no captions: the empty prompt
            rows = batch["pixel_values"] if "pixel_values" in batch else batch["latent_moments"]  # cached latents
            captions = [""] * rows.shape[0]
        prompt_embeds, pooled = self.encode_prompt(captions)
        return {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled}

    def conditioning(self, batch, generator=None, training=False):
        # the cached embeddings (--cache_text_embeddings) or `encode_text` (ModelAdapter.text_conditioning)
        cond = dict(self.text_conditioning(batch))
        pooled = cond["pooled_projections"]
        if self.guidance_embeds:
            # one value per sample (not a (1,) tensor) so that per-task sub-batches index it like the rest
            cond["guidance"] = torch.full((pooled.shape[0],), self.guidance_scale, device=pooled.device)
        return cond

    def validation_prompt_kwargs(self, pipeline, prompts, guidance_scale=None) -> dict:
        """``FluxPipeline.encode_prompt`` of the validation prompts, as the pipeline itself computes them
        before ``--cache_text_embeddings`` frees CLIP and T5. No negative prompt: FluxPipeline's true CFG is
        off by default (``true_cfg_scale=1``) and ``guidance_scale`` is the distilled guidance input, which
        :meth:`_sample` passes on its own."""
        embeds, pooled, _ = pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.text_encoder.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    @property
    def pixel_multiple(self) -> int:
        """Aspect-ratio buckets: the VAE factor times the 2 x 2 latent packing (the transformer's own
        ``patch_size`` is 1, so the base rule would allow odd latent sides, which cannot be packed)."""
        return self.vae_scale_factor(self.vae) * 2

    def predict(self, model, x_t, timesteps, conditioning):
        """Pack, call the transformer at ``sigma = timesteps / num_train_timesteps``, unpack."""
        b, _, h, w = x_t.shape
        prompt_embeds = conditioning["encoder_hidden_states"]
        timesteps = torch.as_tensor(timesteps, device=x_t.device, dtype=torch.float32)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(b)
        sigma = timesteps / self.noise_scheduler.config.num_train_timesteps
        out = model(
            hidden_states=pack_latents(x_t),
            timestep=sigma,
            guidance=conditioning.get("guidance"),
            pooled_projections=conditioning["pooled_projections"],
            encoder_hidden_states=prompt_embeds,
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
            img_ids=latent_image_ids(h, w, x_t.device, x_t.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    # ------------------------------------------------------------------ pipelines

    def make_pipeline(self, model=None, scheduler=None):
        from diffusers import FluxPipeline

        model = model if model is not None else self.model
        pipeline = FluxPipeline(
            scheduler=_copy_scheduler(scheduler if scheduler is not None else self.pipeline_scheduler),
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer_one,
            text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_two, transformer=model)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def _sample(self, pipeline, num_images, generator, num_inference_steps, prompts=None, guidance_scale=None, **unused):
        """``FluxPipeline`` at the training resolution; ``prompts``: strings (cycled to ``num_images``), or the
        dict of :meth:`validation_prompt_kwargs` (already ``num_images`` rows). ``guidance_scale`` (default:
        the training value) is the distilled guidance of a dev-like model (ignored by schnell-like ones, as by
        the pipeline)."""
        size = self.sample_size * self.vae_scale_factor(self.vae)
        return pipeline(
            **prompt_arguments(prompts, num_images),  # strings, or validation_prompt_kwargs' encoded prompts
            height=size, width=size,
            num_inference_steps=num_inference_steps,
            guidance_scale=self.guidance_scale if guidance_scale is None else guidance_scale,
            max_sequence_length=self.max_sequence_length,
            generator=generator,
            output_type="pil",
        ).images

    # ------------------------------------------------------------------ LoRA

    def _save_lora_weights(self, output_dir, model):
        """diffusers' Flux LoRA format, as ``train_dreambooth_lora_flux.py`` writes it (peft keys; the
        adapter's config as metadata, so alpha != rank loads exactly)."""
        from diffusers import FluxPipeline
        from peft.utils import get_peft_model_state_dict

        FluxPipeline.save_lora_weights(
            output_dir,
            transformer_lora_layers=get_peft_model_state_dict(model),
            transformer_lora_adapter_metadata=inference_lora_config(self.lora_config).to_dict(),
            safe_serialization=True,
        )

    @classmethod
    def load_lora(cls, pipeline, folder):
        """diffusers' own ``FluxPipeline.load_lora_weights``."""
        pipeline.load_lora_weights(folder)
        return pipeline
