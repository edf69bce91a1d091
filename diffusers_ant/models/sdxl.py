"""``sdxl``: Stable Diffusion XL's latent UNet with two CLIP text encoders (Podell et al. 2023).

What differs from ``sd`` (see sd.py), each as diffusers' ``train_text_to_image_sdxl.py`` and
``train_dreambooth_lora_sdxl.py`` do it:

* Two frozen text encoders: ``CLIPTextModel`` (``text_encoder``) and ``CLIPTextModelWithProjection``
  (``text_encoder_2``), each with its tokenizer. The UNet's ``encoder_hidden_states`` are both
  encoders' penultimate hidden states concatenated on the feature axis; the second encoder's
  projected pooled output is the ``text_embeds`` of the ``text_time`` added conditioning.
* Micro-conditioning: ``time_ids`` = (original height, original width, crop top, crop left, target
  height, target width) per image (Sec. 2.2 of the paper). The data pipeline records the size of
  each image as read and the top-left of its crop (``data_options`` asks for ``crop_coords``); the
  target size is the training resolution.
* ``--pretrained_vae_model_name_or_path`` replaces the pipeline's VAE (the fp16-fixed SDXL VAE), see
  ``ModelAdapter.load``.
* Outputs are ``StableDiffusionXLPipeline`` folders; LoRA weights are written by
  ``StableDiffusionXLPipeline.save_lora_weights`` (UNet, and with ``--train_text_encoder`` both text
  encoders) and read back by the pipeline's own ``load_lora_weights``.

Captions missing or dropped (``--proportion_empty_prompts``, a knowledge bank's null condition) are
the empty prompt encoded by both encoders, as in diffusers' SDXL script.
"""

import torch

from .base import _copy_scheduler, check_input_channels
from .lora import inference_lora_config
from .sd import StableDiffusionAdapter

# The order of SDXL's micro-conditioning (diffusers' `compute_time_ids`: original + crop + target).
TIME_ID_FIELDS = ("original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width")


def compute_time_ids(original_sizes, crop_top_lefts, target_size) -> torch.Tensor:
    """SDXL's ``add_time_ids`` (B, 6) float32: ``original_size + crop_top_left + target_size`` per image,
    as diffusers' ``train_text_to_image_sdxl.py`` ``compute_time_ids``.

    ``original_sizes`` and ``crop_top_lefts``: (B, 2) (height, width) and (top, left); ``target_size``:
    (height, width) of the training images."""
    original = torch.as_tensor(original_sizes, dtype=torch.float32).reshape(-1, 2)
    crops = torch.as_tensor(crop_top_lefts, dtype=torch.float32, device=original.device).reshape(-1, 2)
    target = torch.tensor([list(target_size)], dtype=torch.float32, device=original.device).expand(len(original), 2)
    return torch.cat([original, crops, target], dim=1)


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    model_type = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    # diffusers' train_dreambooth_lora_sdxl.py: the UNet's attention projections ...
    default_lora_targets = ("to_k", "to_q", "to_v", "to_out.0")
    # ... and, with --train_text_encoder, both text encoders' attention projections
    text_encoder_lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj")

    def __init__(self, model, noise_scheduler, *, text_encoder_2=None, tokenizer_2=None, **kwargs):
        # set before the base constructor, which freezes every module `frozen_modules` names
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        super().__init__(model, noise_scheduler, **kwargs)

    @classmethod
    def _pipeline_components(cls, components: dict) -> dict:
        return {**super()._pipeline_components(components), "text_encoder_2": components.get("text_encoder_2"),
                "tokenizer_2": components.get("tokenizer_2")}

    def frozen_modules(self) -> dict:
        parts = super().frozen_modules()
        if self.text_encoder_2 is not None:
            parts["text_encoder_2"] = self.text_encoder_2
        return parts

    def to(self, device, dtype=None):
        """As the base class (frozen parts in the weight dtype), except SDXL's own VAE, which stays float32:
        it overflows in fp16 (NaN latents). diffusers' ``train_text_to_image_sdxl.py`` does the same and
        casts only a VAE given with ``--pretrained_vae_model_name_or_path`` (the fp16-fixed one)."""
        super().to(device, dtype)
        if self.pretrained_vae_model_name_or_path is None:
            self.vae.to(device=device, dtype=torch.float32)
        return self

    @torch.no_grad()
    def latents_from_moments(self, moments: torch.Tensor, generator=None) -> torch.Tensor:
        """As the base class, then normalised by the VAE's ``latents_mean`` / ``latents_std`` where its config
        has them (SDXL-class checkpoints such as Playground v2.5): ``(z - mean) * scaling_factor / std``, as
        diffusers' ``train_dreambooth_lora_sdxl.py`` encodes and ``StableDiffusionXLPipeline`` decodes them."""
        latents = super().latents_from_moments(moments, generator)  # z * scaling_factor
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return latents
        mean = torch.tensor(mean, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1)
        std = torch.tensor(std, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1)
        return ((latents - mean * config.scaling_factor) / std).contiguous()

    # ------------------------------------------------------------------ building

    @staticmethod
    def _check_family(source):
        """A pretrained pipeline of another family gets one line naming both types."""
        if source is None or source.index is None:
            return
        name = source.index.get("_class_name", "")
        if not source.has("text_encoder_2") or not source.has("unet"):
            other = "sd" if source.has("unet") else "another model type"
            raise ValueError(f"{source.path!r} is a {name or 'pipeline'} without SDXL's second text encoder "
                             f"(text_encoder_2): train it with --model_type {other}, not --model_type sdxl")

    @classmethod
    def _text_parts(cls, source, preset):
        """Both tokenizers and text encoders: pretrained, or the tiny preset's (random, in memory)."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from .presets import tiny_clip_tokenizer, tiny_text_encoder

        if source is not None and source.has("text_encoder"):
            parts = []
            for suffix, encoder_cls in (("", CLIPTextModel), ("_2", CLIPTextModelWithProjection)):
                tokenizer = source.load(source.component_class("tokenizer" + suffix, CLIPTokenizer),
                                        subfolder="tokenizer" + suffix)
                if len(tokenizer) <= 2:  # the offline-Hub trap: a tokenizer that knows no words
                    raise ValueError(f"the tokenizer{suffix} of {source.path!r} has {len(tokenizer)} tokens: "
                                     "the folder is incomplete")
                encoder = source.load(source.component_class("text_encoder" + suffix, encoder_cls),
                                      subfolder="text_encoder" + suffix)
                parts += [tokenizer, encoder]
            return tuple(parts)
        if preset is None or not preset.get("text_encoder") or not preset.get("text_encoder_2"):
            raise ValueError("SDXL needs two text encoders: give a pretrained SDXL pipeline folder or the 'tiny' preset")
        tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
        text_encoder = tiny_text_encoder(tokenizer, preset["text_encoder"])
        # the same CLIP text config, with the projection head whose output is SDXL's pooled embedding
        text_encoder_2 = CLIPTextModelWithProjection(tiny_text_encoder(tokenizer_2, preset["text_encoder_2"]).config)
        return tokenizer, text_encoder, tokenizer_2, text_encoder_2

    @classmethod
    def _build(cls, source, preset, *, resolution, num_classes, num_channels, controlnet_model_name_or_path):
        from diffusers import UNet2DConditionModel

        cls._check_family(source)
        vae = cls._load_vae(source, preset, num_channels, resolution)
        if vae is None:
            raise ValueError(f"pretrained pipeline {source.path!r} has no vae")
        if num_channels is not None and num_channels != vae.config.in_channels:
            raise ValueError(f"the VAE takes {vae.config.in_channels} image channels, the data has {num_channels}")
        tokenizer, text_encoder, tokenizer_2, text_encoder_2 = cls._text_parts(source, preset)
        scale = cls.vae_scale_factor(vae)
        if preset is not None:
            config = dict(preset["model"])
            config.update(
                sample_size=(resolution or 32) // scale,
                in_channels=vae.config.latent_channels,
                out_channels=vae.config.latent_channels,
                addition_embed_type="text_time",
                # both encoders' hidden states side by side, as the pipeline's encode_prompt concatenates them
                cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
                # 6 time ids, each embedded in addition_time_embed_dim, then the pooled text embedding
                projection_class_embeddings_input_dim=len(TIME_ID_FIELDS) * config["addition_time_embed_dim"]
                + text_encoder_2.config.projection_dim,
            )
            unet, from_pretrained = UNet2DConditionModel(**config), False
        else:
            unet, from_pretrained = source.load(UNet2DConditionModel, subfolder="unet"), True
            check_input_channels(unet, vae.config.latent_channels, source, "sdxl")
            if unet.config.addition_embed_type != "text_time":
                raise ValueError(f"the UNet of {source.path!r} has no SDXL text_time conditioning: train it with "
                                 "--model_type sd, not --model_type sdxl")
            if resolution is not None and resolution // scale != unet.config.sample_size:
                unet.register_to_config(sample_size=resolution // scale)  # pipelines sample at this size
        return {
            "model": unet,
            "vae": vae,
            "text_encoder": text_encoder,
            "tokenizer": tokenizer,
            "text_encoder_2": text_encoder_2,
            "tokenizer_2": tokenizer_2,
            "num_channels": vae.config.in_channels,
            "sample_size": unet.config.sample_size,
            "model_from_pretrained": from_pretrained,
        }

    # ------------------------------------------------------------------ text-encoder LoRA

    def add_text_encoder_lora(self, rank: int, alpha=None):
        """`--train_text_encoder`: LoRA on both text encoders' attention projections, as diffusers'
        ``train_dreambooth_lora_sdxl.py`` (Gaussian init, B = 0); trained beside the UNet's."""
        import copy

        from peft import inject_adapter_in_model

        config = super().add_text_encoder_lora(rank, alpha=alpha)  # the first encoder, and the config
        # peft directly: transformers' `add_adapter` asks for a newer peft than diffusers needs
        inject_adapter_in_model(copy.deepcopy(config), self.text_encoder_2)
        for name, param in self.text_encoder_2.named_parameters():
            param.requires_grad_("lora_" in name)
        return config

    def extra_trainable_modules(self) -> dict:
        if self.text_encoder_lora_config is None:
            return {}
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    # ------------------------------------------------------------------ batches

    def data_options(self) -> dict:
        return {"tokenizer": {"input_ids": self.tokenizer, "input_ids_2": self.tokenizer_2}, "crop_coords": True}

    def tokenize(self, captions) -> tuple:
        """Captions -> ``(input_ids, input_ids_2)``, each padded to its tokenizer's maximum length."""
        return tuple(
            tokenizer(list(captions), max_length=tokenizer.model_max_length, padding="max_length",
                      truncation=True, return_tensors="pt").input_ids
            for tokenizer in (self.tokenizer, self.tokenizer_2)
        )

    def _encode(self, input_ids, input_ids_2):
        """Both encoders -> ``(encoder_hidden_states, pooled)``, exactly as diffusers' SDXL ``encode_prompt``:
        each encoder's penultimate hidden state, concatenated; the second encoder's projected pooled output."""
        first = self.text_encoder(input_ids.to(self.text_encoder.device), output_hidden_states=True)
        second = self.text_encoder_2(input_ids_2.to(self.text_encoder_2.device), output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2].to(first.hidden_states[-2].device)], dim=-1)
        return hidden.float(), second.text_embeds.float()

    @torch.no_grad()
    def encode_prompt(self, input_ids, input_ids_2=None):
        """Frozen encoders: ``(encoder_hidden_states (B, L, D1 + D2), text_embeds (B, P))`` in float32."""
        return self._encode(input_ids, input_ids_2)

    def time_ids(self, batch) -> torch.Tensor:
        """The batch's ``add_time_ids`` (B, 6): its recorded original sizes and crops, the images' own size
        as target. Rows without a record (images made at the training size) get (H, W, 0, 0, H, W), the
        pipeline's own default for an uncropped image."""
        if "pixel_values" in batch:
            pixels = batch["pixel_values"]
            size = tuple(pixels.shape[-2:])
        else:  # --cache_latents: the image's size is its latent's times the VAE factor
            pixels = batch["latent_moments"]
            factor = self.vae_scale_factor(self.vae)
            size = (pixels.shape[-2] * factor, pixels.shape[-1] * factor)
        count = pixels.shape[0]
        original = batch.get("original_sizes")
        if original is None:
            original = torch.tensor([size] * count)
        crops = batch.get("crop_top_lefts")
        if crops is None:
            crops = torch.zeros(count, 2)
        return compute_time_ids(original.cpu(), crops.cpu(), size).to(pixels.device)

    def null_condition_batch(self, batch):
        batch = dict(batch)
        batch.pop("input_ids", None)  # no captions -> the empty prompt (see `conditioning`)
        batch.pop("input_ids_2", None)
        return batch

    def conditioning(self, batch, generator=None, training=False):
        time_ids = self.time_ids(batch)
        if training and self.text_encoder_lora_config is not None:
            # encoded in `predict`, where gradients reach the text encoders
            input_ids, input_ids_2 = self._both_ids(batch, time_ids.shape[0])
            return {"input_ids": input_ids, "input_ids_2": input_ids_2, "time_ids": time_ids}
        # the cached embeddings (--cache_text_embeddings) or `encode_text`
        return {**self.text_conditioning(batch), "time_ids": time_ids}

    def _both_ids(self, batch, count: int):
        """The batch's ``(input_ids, input_ids_2)``: its tokenised captions, its ``captions`` tokenised
        here, or (no captions) the empty prompt, i.e. the unconditional branch."""
        input_ids, input_ids_2 = batch.get("input_ids"), batch.get("input_ids_2")
        if input_ids is not None and input_ids_2 is not None:
            return input_ids, input_ids_2
        return self.tokenize(batch["captions"] if "captions" in batch else [""] * count)

    def encode_text(self, batch):
        """Both encoders' outputs for the batch's captions (what ``--cache_text_embeddings`` stores)."""
        count = next((v.shape[0] for k, v in batch.items()
                      if k in ("pixel_values", "latent_moments", "input_ids") and torch.is_tensor(v)), None)
        if count is None:
            count = len(batch.get("captions", [""]))
        hidden, pooled = self.encode_prompt(*self._both_ids(batch, count))
        return {"encoder_hidden_states": hidden, "text_embeds": pooled}

    def validation_prompt_kwargs(self, pipeline, prompts, guidance_scale=None):
        """``StableDiffusionXLPipeline.encode_prompt``: the prompts' (and with guidance the empty prompt's)
        embeddings and pooled embeddings, as the pipeline itself computes them before the encoders go."""
        scale = guidance_scale if guidance_scale is not None else 5.0  # the pipeline's default
        positive, negative, pooled, negative_pooled = pipeline.encode_prompt(
            list(prompts), device=self.text_encoder.device, num_images_per_prompt=1,
            do_classifier_free_guidance=scale > 1.0)
        kwargs = {"prompt_embeds": positive, "pooled_prompt_embeds": pooled}
        if negative is not None:
            kwargs.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
        return kwargs

    def text_embeddings(self, conditioning):
        """``(encoder_hidden_states, text_embeds)``: precomputed, or (trained encoders) computed with gradients."""
        if "encoder_hidden_states" in conditioning:
            return conditioning["encoder_hidden_states"], conditioning["text_embeds"]
        return self._encode(conditioning["input_ids"], conditioning["input_ids_2"])

    def predict(self, model, x_t, timesteps, conditioning):
        hidden, pooled = self.text_embeddings(conditioning)
        added = {"text_embeds": pooled.to(x_t.device), "time_ids": conditioning["time_ids"].to(x_t.device)}
        return model(x_t, timesteps, encoder_hidden_states=hidden.to(x_t.device), added_cond_kwargs=added).sample

    # ------------------------------------------------------------------ pipelines and outputs

    def make_pipeline(self, model=None, scheduler=None):
        from diffusers import StableDiffusionXLPipeline

        pipeline = StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=model if model is not None else self.model,
            scheduler=_copy_scheduler(scheduler if scheduler is not None else self.noise_scheduler),
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def _save_lora_weights(self, output_dir, model):
        """diffusers' SDXL LoRA format, exactly as ``train_dreambooth_lora_sdxl.py`` writes it."""
        from diffusers import StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        text_encoders = {}
        if self.text_encoder_lora_config is not None:
            metadata = self.text_encoder_lora_config.to_dict()
            for name in ("text_encoder", "text_encoder_2"):
                module = getattr(self, name)
                text_encoders[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
                text_encoders[f"{name}_lora_adapter_metadata"] = metadata
        StableDiffusionXLPipeline.save_lora_weights(
            output_dir,
            unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(model)),
            unet_lora_adapter_metadata=inference_lora_config(self.lora_config).to_dict(),  # alpha != rank exact on load
            safe_serialization=True,
            **text_encoders,
        )


__all__ = ["StableDiffusionXLAdapter", "compute_time_ids"]
