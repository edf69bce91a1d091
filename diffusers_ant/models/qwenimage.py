"""``qwenimage``: Qwen-Image's ``QwenImageTransformer2DModel`` (Qwen team 2025), trained by flow matching.

What it takes from diffusers (``QwenImagePipeline`` and ``examples/dreambooth/train_dreambooth_lora_qwen_image.py``):

- **Text**: the Qwen2.5-VL text encoder's last hidden state of ``prompt_template_encode`` around each
  caption, with the template's first 34 tokens dropped and the attention mask kept
  (``QwenImagePipeline.encode_prompt``, called here on a pipeline of the text parts, as the diffusers
  script's ``text_encoding_pipeline`` does; captions therefore reach the adapter as strings, see
  :meth:`data_options`).
- **Latents**: ``AutoencoderKLQwenImage`` encodes 5-D video tensors (B, C, frames, H, W); an image is one
  frame. The posterior sample is normalised per channel with the VAE config's ``latents_mean`` /
  ``latents_std``: ``(z - mean) / std`` (the script's ``(model_input - latents_mean) * latents_std`` with
  its reciprocal ``latents_std``), inverted by the pipeline before decoding.
- **Denoiser call**: the latents are packed in 2x2 patches (``QwenImagePipeline._pack_latents``), the
  rotary positions come from ``img_shapes`` = ``[[(1, h / 2, w / 2)]]`` per sample as the pipeline passes
  them, the timestep is the sigma (``timestep / 1000``), and the packed output is unpacked again.
- **Scheduler**: ``FlowMatchEulerDiscreteScheduler`` from the pipeline folder (dynamic shifting as its
  config says; ``--flow_shift`` for a static shift of the training sigmas, see ``ModelAdapter.load``).

The library above ``models/`` sees ``x0`` and the prediction as (B, C, H, W): the frame axis dropped and
the packing undone, so the per-sample losses, SNR and ANT's clusters work unchanged.

LoRA is saved by ``QwenImagePipeline.save_lora_weights`` and loads with the pipeline's own
``load_lora_weights``; the default targets are the diffusers script's (``to_k, to_q, to_v, to_out.0``).
"""

import torch

from .base import ModelAdapter, _copy_scheduler, check_input_channels, packed_sample_size, repeat_to
from .lora import inference_lora_config

# What other model types' pipelines are called, to name the right --model_type for a wrong folder (the one
# table, shared with the bank's detection).
from .families import PIPELINE_MODEL_TYPES as _PIPELINE_MODEL_TYPES
# diffusers' default for `max_sequence_length` in train_dreambooth_lora_qwen_image.py (the pipeline's is 1024)
MAX_SEQUENCE_LENGTH = 512


def _check_qwen_folder(source) -> None:
    """One line when a pretrained folder holds another family's pipeline, naming both model types."""
    if source is None or source.index is None:
        if source is not None:
            raise ValueError(f"{source.path!r} holds a single model, not a QwenImagePipeline folder: "
                             "give the pipeline folder (model_index.json with transformer, vae, text_encoder)")
        return
    class_name = source.index.get("_class_name")
    class_name = class_name[-1] if isinstance(class_name, list) else class_name
    if class_name and "QwenImage" not in str(class_name):
        other = _PIPELINE_MODEL_TYPES.get(class_name)
        hint = f"use --model_type {other}" if other else "give a QwenImagePipeline folder"
        raise ValueError(f"{source.path!r} is a {class_name} ({other or 'another model type'}), not a Qwen-Image "
                         f"pipeline (--model_type qwenimage): {hint}")


class QwenImageAdapter(ModelAdapter):
    model_type = "qwenimage"
    # diffusers' train_dreambooth_lora_qwen_image.py: target_modules = ["to_k", "to_q", "to_v", "to_out.0"]
    default_lora_targets = ("to_k", "to_q", "to_v", "to_out.0")
    output_module_names = ("proj_out",)
    last_block_name = "transformer_blocks"
    noise_schedulers = ("flow_match",)  # QwenImagePipeline samples with FlowMatchEulerDiscreteScheduler only
    latent_flow_matching = True
    pipeline_classes = ("QwenImagePipeline",)
    # encode_text pads to 512 tokens for batching alone (conditioning cuts them back): a cached caption keeps
    # its own tokens, a tenth of the memory for a 50-token caption (3.5 MiB in bf16 padded)
    padded_text = ("prompt_embeds_mask", MAX_SEQUENCE_LENGTH)

    @classmethod
    def _build(cls, source, preset, *, resolution, num_classes, num_channels, controlnet_model_name_or_path):
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

        from .presets import tiny_qwen_text_encoder, tiny_qwen_tokenizer

        if num_classes is not None:
            raise ValueError("--model_type qwenimage is conditioned on captions, not classes: drop --num_classes")
        _check_qwen_folder(source)
        if preset is not None and preset.get("vae") and not (source is not None and source.has("vae")):
            vae = AutoencoderKLQwenImage(**preset["vae"])
        elif source is not None and source.has("vae"):
            vae = source.load(AutoencoderKLQwenImage, subfolder="vae")
        else:
            raise ValueError("--model_type qwenimage needs its VAE: give a QwenImagePipeline folder or the 'tiny' preset")
        if num_channels is not None and num_channels != 3:
            raise ValueError(f"the Qwen-Image VAE takes RGB images, the data has {num_channels} channels")
        if source is not None and source.has("text_encoder"):
            tokenizer = source.load(source.component_class("tokenizer", Qwen2Tokenizer), subfolder="tokenizer")
            if len(tokenizer) <= 2:  # the offline-Hub trap: a tokenizer that knows no words
                raise ValueError(f"the tokenizer of {source.path!r} has {len(tokenizer)} tokens: the folder is incomplete")
            text_encoder = source.load(Qwen2_5_VLForConditionalGeneration, subfolder="text_encoder")
        elif preset is not None and preset.get("text_encoder"):
            tokenizer = tiny_qwen_tokenizer()
            text_encoder = tiny_qwen_text_encoder(tokenizer, preset["text_encoder"])
        else:
            raise ValueError("--model_type qwenimage needs its text encoder: give a QwenImagePipeline folder or 'tiny'")
        scale = cls.vae_scale_factor(vae)
        if preset is not None:
            config = dict(preset["model"])
            config.update(in_channels=vae.config.z_dim * 4, out_channels=vae.config.z_dim,
                          joint_attention_dim=text_encoder.config.text_config.hidden_size)
            model, from_pretrained = QwenImageTransformer2DModel(**config), False
        else:
            if not source.has("transformer"):
                raise ValueError(f"pretrained pipeline {source.path!r} has no transformer")
            model, from_pretrained = source.load(QwenImageTransformer2DModel, subfolder="transformer"), True
            check_input_channels(model, 4 * vae.config.z_dim, source, "qwenimage")  # (2x2 packed latents)
        # Qwen-Image's transformer has no sample size: diffusers' script's default --resolution (512) for a
        # checkpoint, as FLUX.1's (one rule, which the knowledge bank's default follows too); 2x2 packing needs
        # latents of even size
        from .flux import default_resolution

        resolution = resolution or default_resolution(preset is not None)
        return {
            "model": model,
            "vae": vae,
            "text_encoder": text_encoder,
            "tokenizer": tokenizer,
            "num_channels": 3,
            "sample_size": packed_sample_size(resolution, scale, "Qwen-Image"),  # 2x2 packing: even latents
            "model_from_pretrained": from_pretrained,
        }

    @classmethod
    def from_pipeline(cls, pipeline, resolution=None):
        """The adapter around a loaded ``QwenImagePipeline``'s own components, no copy (the knowledge bank
        samples through it, ``diff_tuning/bank.py``) at ``resolution`` pixels square (default the
        pipeline's ``default_sample_size * vae_scale_factor``, 1024 for Qwen-Image)."""
        scale = cls.vae_scale_factor(pipeline.vae)
        resolution = resolution or pipeline.default_sample_size * pipeline.vae_scale_factor
        return cls(pipeline.transformer, pipeline.scheduler, vae=pipeline.vae, text_encoder=pipeline.text_encoder,
                   tokenizer=pipeline.tokenizer, num_channels=3,
                   sample_size=packed_sample_size(resolution, scale, "Qwen-Image"),
                   model_from_pretrained=True)

    # ------------------------------------------------------------------ shapes

    @staticmethod
    def vae_scale_factor(vae) -> int:
        """Pixels per latent pixel: ``2 ** len(vae.temperal_downsample)``, as ``QwenImagePipeline`` computes it."""
        return 2 ** len(vae.temperal_downsample) if vae is not None else 1

    @property
    def in_channels(self) -> int:
        return self.vae.config.z_dim  # the unpacked latent channels the library sees

    def _latent_stats(self, like: torch.Tensor):
        """The VAE config's per-channel ``latents_mean`` and ``latents_std``, shaped (1, C, 1, 1, 1) like ``like``."""
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(self.vae.config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std

    # ------------------------------------------------------------------ training step

    def data_options(self) -> dict:
        """No tokenizer for the data loader: captions reach :meth:`conditioning` as strings, tokenized there
        inside the pipeline's template."""
        return {"tokenizer": None}

    @torch.no_grad()
    def encode_pixels(self, pixel_values: torch.Tensor, generator=None, chunk_size=None) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> normalised latents (B, z_dim, H / f, W / f), float32:
        :meth:`latents_from_moments` of :meth:`encode_moments` (the halves ``--cache_latents`` splits)."""
        return self.latents_from_moments(self.encode_moments(pixel_values, chunk_size=chunk_size), generator=generator)

    @torch.no_grad()
    def encode_moments(self, pixel_values: torch.Tensor, chunk_size=None) -> torch.Tensor:
        """The VAE posterior's parameters (mean and log-variance on the channel axis, (B, 2 z_dim, 1, h, w):
        one frame of the 5-D VAE), in the VAE's dtype; deterministic, hence what ``--cache_latents`` caches."""
        pixels = pixel_values.to(self.vae.device, self.vae.dtype).unsqueeze(2)
        pieces = [pixels] if chunk_size is None else torch.split(pixels, chunk_size)
        return torch.cat([self.vae.encode(piece).latent_dist.parameters for piece in pieces])

    @torch.no_grad()
    def latents_from_moments(self, moments: torch.Tensor, generator=None) -> torch.Tensor:
        """The posterior sample ``mean + std * noise`` (noise from ``generator`` for the whole batch at once:
        resumable), normalised ``(z - latents_mean) / latents_std`` as diffusers' Qwen-Image script does, frame
        axis dropped: (B, z_dim, h, w) float32."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        dist = DiagonalGaussianDistribution(moments.to(self.vae.device))
        mean, std = dist.mean.float(), dist.std.float()
        draw_device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=draw_device, dtype=torch.float32).to(mean.device)
        latents = mean + std * noise
        latents_mean, latents_std = self._latent_stats(latents)
        return ((latents - latents_mean) / latents_std)[:, :, 0]

    def free_vae_encoder(self) -> dict:
        """Drop the VAE's ``encoder`` and ``quant_conv`` (``ModelAdapter.free_vae_encoder``), leaving an empty
        module in the encoder's place: ``AutoencoderKLQwenImage.decode`` calls ``clear_cache``, which counts
        the causal convolutions of ``self.encoder`` (to size the encoder's feature cache), so ``None`` there
        breaks validation sampling; an empty module counts 0, and decoding never reads the encoder."""
        freed = super().free_vae_encoder()
        if "encoder" in freed:
            self.vae.encoder = torch.nn.Module()
        return freed

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, z_dim, h, w) -> pixels (B, 3, H, W), the inverse the pipeline applies
        before ``vae.decode`` (``latents / (1 / latents_std) + latents_mean``)."""
        x = latents.unsqueeze(2).to(self.vae.device, torch.float32)
        latents_mean, latents_std = self._latent_stats(x)
        x = (x * latents_std + latents_mean).to(self.vae.dtype)
        return self.vae.decode(x, return_dict=False)[0][:, :, 0].float()

    def _text_pipeline(self):
        """A ``QwenImagePipeline`` of the text parts only (the diffusers script's ``text_encoding_pipeline``)."""
        from diffusers import QwenImagePipeline

        return QwenImagePipeline(scheduler=None, vae=None, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                 transformer=None)

    @torch.no_grad()
    def encode_prompt(self, prompts, max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        """Captions -> ``(prompt_embeds (B, L, D) float32, prompt_embeds_mask (B, L) long)``.

        ``QwenImagePipeline.encode_prompt`` itself (template, 34 dropped tokens, masked hidden states
        padded to the longest caption of the batch); the mask is kept even when it is all ones (the
        pipeline returns None then), so that batches can be sliced and joined."""
        embeds, mask = self._text_pipeline().encode_prompt(prompt=list(prompts), device=self.text_encoder.device,
                                                          max_sequence_length=max_sequence_length)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds.float(), mask

    def null_condition_batch(self, batch):
        # no captions (nor cached embeddings of them) -> the empty prompt (see `encode_text`)
        return {key: value for key, value in batch.items() if key != "captions" and not key.startswith("cached_text/")}

    def encode_text(self, batch: dict) -> dict:
        """The captions' ``prompt_embeds`` / ``prompt_embeds_mask`` (:meth:`encode_prompt`; the empty prompt
        without captions), zero-padded to ``MAX_SEQUENCE_LENGTH`` tokens with mask 0: a fixed shape, so that
        embeddings cached one caption at a time (``--cache_text_embeddings``) batch together;
        :meth:`conditioning` cuts the padding back to the batch's longest caption."""
        if "input_ids" in batch:
            raise ValueError("qwenimage encodes captions with its prompt template: build the data loader with "
                             "adapter.data_options() (no tokenizer), so that captions arrive as strings")
        captions = batch.get("captions")
        if captions is None:  # no captions: the empty prompt, i.e. unconditional training
            rows = next(batch[key].shape[0] for key in ("pixel_values", "latent_moments") if key in batch)
            captions = [""] * rows
        embeds, mask = self.encode_prompt(captions)
        pad = MAX_SEQUENCE_LENGTH - embeds.shape[1]
        return {"prompt_embeds": torch.nn.functional.pad(embeds, (0, 0, 0, pad)),
                "prompt_embeds_mask": torch.nn.functional.pad(mask, (0, pad))}

    def conditioning(self, batch, generator=None, training=False):
        # ModelAdapter.text_conditioning where the base has it (cached embeddings, else encode_text)
        return self.trimmed(getattr(super(), "text_conditioning", self.encode_text)(batch))

    @staticmethod
    def trimmed(text: dict) -> dict:
        """:meth:`encode_text`'s entries cut to the batch's longest caption: no compute on padding."""
        mask = text["prompt_embeds_mask"]
        length = max(1, int(mask.sum(dim=1).max()))
        return {"prompt_embeds": text["prompt_embeds"][:, :length].float(), "prompt_embeds_mask": mask[:, :length]}

    def validation_prompt_kwargs(self, pipeline, prompts, guidance_scale=None) -> dict:
        """``QwenImagePipeline.encode_prompt`` of the validation prompts (and, with ``guidance_scale`` > 1, of
        the negative prompt " "), for sampling after ``--cache_text_embeddings`` freed the text encoder."""
        def encoded(texts, prefix=""):
            embeds, mask = self.encode_prompt(texts)
            return {f"{prefix}prompt_embeds": embeds.to(self.text_encoder.dtype), f"{prefix}prompt_embeds_mask": mask}

        kwargs = encoded(list(prompts))
        if guidance_scale is not None and guidance_scale > 1:
            kwargs.update(encoded([" "] * len(prompts), "negative_"))
        return kwargs

    def predict(self, model, x_t, timesteps, conditioning):
        """The transformer's velocity for ``x_t`` (B, C, h, w), unpacked to (B, C, h, w).

        ``timesteps`` are the scheduler's (``sigma * 1000``, see ``schedule.model_timesteps``); the
        transformer takes ``timestep / 1000`` as the pipeline and diffusers' script pass it."""
        from diffusers import QwenImagePipeline

        batch, channels, height, width = x_t.shape
        timesteps = torch.as_tensor(timesteps, device=x_t.device, dtype=torch.float32)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        packed = QwenImagePipeline._pack_latents(x_t, batch, channels, height, width)
        scale = self.vae_scale_factor(self.vae)
        out = model(
            hidden_states=packed,
            encoder_hidden_states=conditioning["prompt_embeds"].to(x_t.device),
            encoder_hidden_states_mask=conditioning["prompt_embeds_mask"].to(x_t.device),
            timestep=timesteps / self.noise_scheduler.config.num_train_timesteps,
            img_shapes=[[(1, height // 2, width // 2)]] * batch,
            return_dict=False,
        )[0]
        return QwenImagePipeline._unpack_latents(out, height * scale, width * scale, scale)[:, :, 0]

    # ------------------------------------------------------------------ pipelines

    def make_pipeline(self, model=None, scheduler=None):
        from diffusers import QwenImagePipeline

        pipeline = QwenImagePipeline(
            scheduler=_copy_scheduler(scheduler if scheduler is not None else self.noise_scheduler),
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            transformer=model if model is not None else self.model,
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def _sample(self, pipeline, num_images, generator, num_inference_steps, prompts=None, guidance_scale=None, **unused):
        """``QwenImagePipeline`` at the training resolution. ``guidance_scale`` > 1 is Qwen-Image's true
        classifier-free guidance (``true_cfg_scale`` with the empty negative prompt " ", as its docs say);
        otherwise no guidance (the base model is not guidance-distilled)."""
        size = self.sample_size * self.vae_scale_factor(pipeline.vae)
        guidance = {"true_cfg_scale": 1.0}
        if guidance_scale is not None and guidance_scale > 1:
            guidance = {"true_cfg_scale": guidance_scale}
            if not isinstance(prompts, dict):  # encoded prompts carry their negative embeddings
                guidance["negative_prompt"] = [" "] * num_images
        # the prompts, or their embeddings (a dict from `validation_prompt_kwargs`, one row per image)
        prompt = dict(prompts) if isinstance(prompts, dict) else {
            "prompt": repeat_to(prompts if prompts is not None else "", num_images)}
        return pipeline(
            **prompt,
            height=size,
            width=size,
            num_inference_steps=num_inference_steps,
            generator=generator,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            output_type="pil",
            **guidance,
        ).images

    # ------------------------------------------------------------------ saving

    def _save_lora_weights(self, output_dir, model):
        """diffusers' LoRA format, as ``train_dreambooth_lora_qwen_image.py`` writes it."""
        from diffusers import QwenImagePipeline
        from peft.utils import get_peft_model_state_dict

        QwenImagePipeline.save_lora_weights(
            output_dir,
            transformer_lora_layers=get_peft_model_state_dict(model),
            transformer_lora_adapter_metadata=inference_lora_config(self.lora_config).to_dict(),  # alpha != rank exact on load
            safe_serialization=True,
        )

    @classmethod
    def load_lora(cls, pipeline, folder):
        """diffusers' own ``QwenImagePipeline.load_lora_weights``."""
        pipeline.load_lora_weights(folder)
        return pipeline

