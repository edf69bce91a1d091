"""``sd``: Stable Diffusion's text-conditional latent UNet (Rombach et al. 2022).

Trains a ``UNet2DConditionModel``; the VAE, the CLIP text encoder and the tokenizer come frozen
from the pretrained pipeline folder (or, for ``tiny``, are built small and random, with a
character-level tokenizer written in presets.py). Captions reach the model as
``encoder_hidden_states``, the text encoder's last hidden state, as in diffusers'
``train_text_to_image.py``. LoRA weights are written by ``StableDiffusionPipeline.save_lora_weights``
and read back by the pipeline's own ``load_lora_weights``.
"""

import torch

from .base import ModelAdapter, _copy_scheduler, batch_rows, check_input_channels, prompt_arguments
from .lora import inference_lora_config


class StableDiffusionAdapter(ModelAdapter):
    model_type = "sd"
    # inherited by controlnet, which trains beside an SD pipeline's UNet (see `check_pipeline_family`)
    pipeline_classes = ("StableDiffusionPipeline",)
    # the attention projections, as in diffusers' train_text_to_image_lora.py
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    # the text encoder's attention projections, as in diffusers' train_dreambooth_lora.py
    text_encoder_lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj")
    text_encoder_lora_config = None

    def add_text_encoder_lora(self, rank: int, alpha=None):
        """`--train_text_encoder`: a LoRA adapter on the text encoder too, trained with the UNet's.

        As diffusers' DreamBooth LoRA script: the text encoder's attention projections, Gaussian init,
        B = 0 (the encoder's output is unchanged until the first update). Captions are then encoded
        inside the training step, with gradients (see `conditioning` / `predict`)."""
        from peft import LoraConfig, inject_adapter_in_model

        self.text_encoder_lora_config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                                                   init_lora_weights="gaussian",
                                                   target_modules=list(self.text_encoder_lora_targets))
        # peft directly: transformers' `add_adapter` asks for a newer peft than diffusers needs
        inject_adapter_in_model(self.text_encoder_lora_config, self.text_encoder)
        for name, param in self.text_encoder.named_parameters():
            param.requires_grad_("lora_" in name)
        return self.text_encoder_lora_config

    def extra_trainable_modules(self) -> dict:
        return {"text_encoder": self.text_encoder} if self.text_encoder_lora_config is not None else {}

    @classmethod
    def _build_frozen(cls, source, preset, resolution, num_channels):
        """VAE, tokenizer and text encoder, shared with the ControlNet adapter."""
        if source is not None and source.has("text_encoder_2"):
            # a folder whose pipeline class no type claims (check_pipeline_family named the known ones):
            # SDXL, SD3 and Flux all have a second text encoder, so name the candidates
            raise ValueError(f"{source.path!r} has a second text encoder (text_encoder_2): train it with its own "
                             f"--model_type (sdxl, sd3 or flux), not --model_type {cls.model_type}")
        vae = cls._load_vae(source, preset, num_channels, resolution)
        if vae is None:
            raise ValueError(f"pretrained pipeline {source.path!r} has no vae")
        if num_channels is not None and num_channels != vae.config.in_channels:
            raise ValueError(f"the VAE takes {vae.config.in_channels} image channels, the data has {num_channels}")
        tokenizer, text_encoder = cls._load_text_parts(source, preset)
        return vae, tokenizer, text_encoder

    @classmethod
    def _build_unet(cls, source, unet_preset, vae, text_encoder, resolution):
        """The UNet2DConditionModel: from a preset config (random) or the pretrained ``unet/``."""
        from diffusers import UNet2DConditionModel

        scale = cls.vae_scale_factor(vae)
        if unet_preset is not None:
            config = dict(unet_preset)
            config.update(
                sample_size=(resolution or 16) // scale,
                in_channels=vae.config.latent_channels,
                out_channels=vae.config.latent_channels,
                cross_attention_dim=text_encoder.config.hidden_size,
            )
            return UNet2DConditionModel(**config), False
        if not source.has("unet"):
            raise ValueError(f"pretrained pipeline {source.path!r} has no unet")
        unet = source.load(UNet2DConditionModel, subfolder="unet")
        check_input_channels(unet, vae.config.latent_channels, source, "sd")
        if resolution is not None and resolution // scale != unet.config.sample_size:
            unet.register_to_config(sample_size=resolution // scale)  # pipelines sample at this size
        return unet, True

    @classmethod
    def _build(cls, source, preset, *, resolution, num_classes, num_channels, controlnet_model_name_or_path):
        vae, tokenizer, text_encoder = cls._build_frozen(source, preset, resolution, num_channels)
        unet, from_pretrained = cls._build_unet(source, preset["model"] if preset else None, vae, text_encoder, resolution)
        return {
            "model": unet,
            "vae": vae,
            "text_encoder": text_encoder,
            "tokenizer": tokenizer,
            "num_channels": vae.config.in_channels,
            "sample_size": unet.config.sample_size,
            "model_from_pretrained": from_pretrained,
        }

    def tokenize(self, captions) -> torch.Tensor:
        """Captions -> padded ``input_ids`` (LongTensor (B, model_max_length)), as the data pipeline should make them."""
        return self.tokenizer(
            list(captions),
            max_length=self.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids

    @torch.no_grad()
    def encode_prompt(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` -> the frozen text encoder's last hidden state (float32)."""
        device = self.text_encoder.device
        return self.text_encoder(input_ids.to(device), return_dict=False)[0].float()

    def null_condition_batch(self, batch):
        batch = dict(batch)
        batch.pop("input_ids", None)  # no captions -> the empty prompt (see `conditioning`)
        return batch

    def _input_ids(self, batch):
        input_ids = batch.get("input_ids")
        if input_ids is None:  # no captions: the empty prompt, i.e. unconditional training
            input_ids = self.tokenize([""] * batch_rows(batch))
        return input_ids

    def conditioning(self, batch, generator=None, training=False):
        if training and self.text_encoder_lora_config is not None:
            # encoded in `predict`, where gradients reach the text encoder
            return {"input_ids": self._input_ids(batch)}
        return self.text_conditioning(batch)

    def encode_text(self, batch):
        if "input_ids" not in batch and "captions" in batch:
            return {"encoder_hidden_states": self.encode_prompt(self.tokenize(batch["captions"]))}
        return {"encoder_hidden_states": self.encode_prompt(self._input_ids(batch))}

    def validation_prompt_kwargs(self, pipeline, prompts, guidance_scale=None):
        """``StableDiffusionPipeline.encode_prompt``: the prompts' and (with guidance) the empty
        prompt's embeddings, as the pipeline itself would compute them."""
        scale = guidance_scale if guidance_scale is not None else 7.5  # the pipeline's default
        positive, negative = pipeline.encode_prompt(list(prompts), self.text_encoder.device, 1, scale > 1.0)
        kwargs = {"prompt_embeds": positive}
        if negative is not None:
            kwargs["negative_prompt_embeds"] = negative
        return kwargs

    def text_embeddings(self, conditioning) -> torch.Tensor:
        """The captions' embeddings: precomputed, or (a trained text encoder) computed here with gradients."""
        if "encoder_hidden_states" in conditioning:
            return conditioning["encoder_hidden_states"]
        ids = conditioning["input_ids"].to(self.text_encoder.device)
        return self.text_encoder(ids, return_dict=False)[0].float()

    def predict(self, model, x_t, timesteps, conditioning):
        return model(x_t, timesteps, encoder_hidden_states=self.text_embeddings(conditioning)).sample

    def _pipeline_parts(self, scheduler):
        return {
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "scheduler": _copy_scheduler(scheduler if scheduler is not None else self.noise_scheduler),
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
        }

    def make_pipeline(self, model=None, scheduler=None):
        from diffusers import StableDiffusionPipeline

        model = model if model is not None else self.model
        pipeline = StableDiffusionPipeline(unet=model, **self._pipeline_parts(scheduler))
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def _sample(self, pipeline, num_images, generator, num_inference_steps, prompts=None, guidance_scale=None, **unused):
        kwargs = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
        return pipeline(
            **prompt_arguments(prompts, num_images),
            num_inference_steps=num_inference_steps,
            generator=generator,
            output_type="pil",
            **kwargs,
        ).images

    def _save_lora_weights(self, output_dir, model):
        """diffusers' LoRA format, exactly as ``train_text_to_image_lora.py`` writes it."""
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        text_encoder = {}
        if self.text_encoder_lora_config is not None:
            text_encoder = {
                "text_encoder_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(self.text_encoder)),
                "text_encoder_lora_adapter_metadata": self.text_encoder_lora_config.to_dict(),
            }
        StableDiffusionPipeline.save_lora_weights(
            output_dir,
            unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(model)),
            unet_lora_adapter_metadata=inference_lora_config(self.lora_config).to_dict(),  # alpha != rank exact on load
            safe_serialization=True,
            **text_encoder,
        )

    @classmethod
    def load_lora(cls, pipeline, folder):
        """diffusers' own ``load_lora_weights``."""
        pipeline.load_lora_weights(folder)
        return pipeline
