"""``sd3``: Stable Diffusion 3 / 3.5, an MMDiT (``SD3Transformer2DModel``) on rectified flow (Esser et al.
2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis").

What differs from ``sd`` and how it is done the diffusers way:

* Three frozen text encoders, combined exactly as ``StableDiffusion3Pipeline.encode_prompt`` combines
  them (that method is called, not re-implemented): CLIP-L and CLIP-G give their penultimate hidden
  states (concatenated on the feature axis) and their pooled, projected outputs (concatenated:
  ``pooled_projections``); T5 gives its last hidden state; the CLIP sequence is zero-padded to T5's
  width and the two sequences are concatenated on the token axis. T5 is optional: a folder saved
  without it (``text_encoder_3`` null, as ``from_pretrained(..., text_encoder_3=None)`` makes) gets
  zeros in its place, as the pipeline does. T5 reads at most ``max_sequence_length`` = 77 tokens, the
  default of diffusers' ``train_dreambooth_lora_sd3.py``.
* Latents are ``(z - vae.shift_factor) * vae.scaling_factor`` (``ModelAdapter.encode_pixels``).
* The scheduler is SD3's ``FlowMatchEulerDiscreteScheduler`` (shift 3.0); the transformer gets the
  flow-matching timestep ``sigma * 1000`` (``schedule.model_timesteps``), as the script passes
  ``noise_scheduler.timesteps[indices]``.
* LoRA on the transformer's joint-attention projections, the default targets of diffusers'
  ``train_dreambooth_lora_sd3.py`` (``--lora_layers`` overrides them), written by
  ``StableDiffusion3Pipeline.save_lora_weights`` and read by its ``load_lora_weights``.
* SD3.5 (``qk_norm="rms_norm"``, ``dual_attention_layers``) is the same class and loads through this
  type; the ``tiny-3.5`` preset builds one.

The ``tiny`` preset builds the whole pipeline offline (presets.py): diffusers' pipeline-test sizes, two
character-level CLIP tokenizers and a character-level T5 tokenizer made in memory.
"""

import torch

from .base import ModelAdapter, _copy_scheduler, check_input_channels, repeat_to
from .lora import inference_lora_config

# diffusers' pipelines and the --model_type that trains each, to name both sides of a wrong-type error
from .families import PIPELINE_MODEL_TYPES  # the one table, shared with the bank's detection
# T5's sequence length in training: the default of diffusers' train_dreambooth_lora_sd3.py (--max_sequence_length)
MAX_SEQUENCE_LENGTH = 77


def _tiny_clip_with_projection(tokenizer, config: dict):
    """A random ``CLIPTextModelWithProjection`` (SD3's CLIP-L / CLIP-G class) sized for ``tokenizer``."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **config))


def check_pipeline_class(source, expected: str, model_type: str) -> None:
    """A pipeline folder of another family is one line naming both model types."""
    found = (source.index or {}).get("_class_name") if source is not None else None
    if found is None or found == expected:
        return
    other = PIPELINE_MODEL_TYPES.get(found if isinstance(found, str) else found[-1])
    hint = f"--model_type {other}" if other else "the --model_type of that pipeline"
    raise ValueError(f"{source.path!r} holds a {found} ({hint}), not a {expected} (--model_type {model_type}): "
                     f"pass {hint}, or a {expected} folder")


class SD3Adapter(ModelAdapter):
    model_type = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    noise_schedulers = ("flow_match",)  # StableDiffusion3Pipeline samples FlowMatchEulerDiscreteScheduler only
    latent_flow_matching = True
    # diffusers' train_dreambooth_lora_sd3.py: the joint attention's image and context projections
    default_lora_targets = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                            "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")
    output_module_names = ("proj_out",)
    last_block_name = "transformer_blocks"

    def __init__(self, model, noise_scheduler, *, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                 tokenizer_3=None, **kwargs):
        # set before the base constructor, which freezes every part `frozen_modules` names
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3
        self.clip_tokenizer = kwargs.pop("clip_tokenizer")
        self._text_pipeline = None
        # `tokenizer=None` for the trainer: batches then carry the raw captions, which three tokenizers read
        super().__init__(model, noise_scheduler, tokenizer=None, **kwargs)

    def to(self, device, dtype=None):
        """As the base class (frozen parts in the weight dtype), except the VAE, which stays float32, as diffusers'
        ``train_dreambooth_lora_sd3.py`` keeps it (``vae.to(dtype=torch.float32)``): ``StableDiffusion3Pipeline``
        never upcasts it, and a half-precision VAE risks overflow (NaN latents) in fp16."""
        super().to(device, dtype)
        self.vae.to(device=device, dtype=torch.float32)
        return self

    def free_text_encoders(self) -> dict:
        """As the base class, and the pipeline `encode_prompt` kept, which holds all three encoders (T5-XXL
        alone is about 9 GB): without this the encoders stayed in memory after --cache_text_embeddings."""
        self._text_pipeline = None
        return super().free_text_encoders()

    @classmethod
    def _pipeline_components(cls, components: dict) -> dict:
        return {"vae": components.get("vae"), "text_encoder": components.get("text_encoder"),
                "clip_tokenizer": components.get("tokenizer"),
                **{name: components.get(name) for name in ("text_encoder_2", "tokenizer_2", "text_encoder_3",
                                                           "tokenizer_3")}}

    # ------------------------------------------------------------------ building

    @classmethod
    def load(cls, *args, **kwargs):
        adapter = super().load(*args, **kwargs)
        from .base import scheduler_kind

        if scheduler_kind(adapter.noise_scheduler) != "flow_match":
            raise ValueError("SD3 is trained and sampled with flow matching: drop --noise_scheduler ddpm")
        return adapter

    @classmethod
    def _build(cls, source, preset, *, resolution, num_classes, num_channels, controlnet_model_name_or_path):
        from diffusers import SD3Transformer2DModel

        if num_classes is not None:
            raise ValueError("SD3 is conditioned on text, not classes: drop --num_classes / --class_column")
        check_pipeline_class(source, "StableDiffusion3Pipeline", cls.model_type)
        vae = cls._load_vae(source, preset, num_channels, resolution)
        if vae is None:
            raise ValueError(f"pretrained pipeline {source.path!r} has no vae")
        text = cls._load_sd3_text_parts(source, preset)
        scale = cls.vae_scale_factor(vae)
        if preset is not None:
            config = dict(preset["model"])
            clip_width = text["text_encoder"].config.hidden_size + text["text_encoder_2"].config.hidden_size
            t5 = text["text_encoder_3"]
            config.update(
                sample_size=(resolution or 16) // scale,
                in_channels=vae.config.latent_channels,
                out_channels=vae.config.latent_channels,
                # what encode_prompt hands the transformer: the (padded) token width and the pooled width
                joint_attention_dim=t5.config.d_model if t5 is not None else clip_width,
                pooled_projection_dim=(text["text_encoder"].config.projection_dim
                                       + text["text_encoder_2"].config.projection_dim),
            )
            model, from_pretrained = SD3Transformer2DModel(**config), False
        else:
            if not source.has("transformer"):
                raise ValueError(f"pretrained pipeline {source.path!r} has no transformer")
            model, from_pretrained = source.load(SD3Transformer2DModel, subfolder="transformer"), True
            check_input_channels(model, vae.config.latent_channels, source, "sd3")
            if resolution is not None and resolution // scale != model.config.sample_size:
                model.register_to_config(sample_size=resolution // scale)  # pipelines sample at this size
        return {"model": model, "vae": vae, **text, "num_channels": vae.config.in_channels,
                "sample_size": model.config.sample_size, "model_from_pretrained": from_pretrained}

    @classmethod
    def _load_sd3_text_parts(cls, source, preset) -> dict:
        """The three tokenizers and text encoders (pretrained, or the tiny preset's); T5 may be absent."""
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        from .presets import tiny_clip_tokenizer, tiny_t5_encoder, tiny_t5_tokenizer

        if source is not None and source.has("text_encoder"):
            parts = {}
            for suffix in ("", "_2"):
                tokenizer = source.load(source.component_class("tokenizer" + suffix, CLIPTokenizer),
                                        subfolder="tokenizer" + suffix)
                if len(tokenizer) <= 2:  # the offline-Hub trap, see models/base.py
                    raise ValueError(f"the tokenizer{suffix} of {source.path!r} has {len(tokenizer)} tokens: "
                                     "the folder is incomplete")
                parts["tokenizer" + suffix] = tokenizer
                parts["text_encoder" + suffix] = source.load(
                    source.component_class("text_encoder" + suffix, CLIPTextModelWithProjection),
                    subfolder="text_encoder" + suffix)
            parts["tokenizer_3"] = parts["text_encoder_3"] = None
            if source.has("text_encoder_3"):  # optional: SD3 runs without T5 (zeros in its place)
                try:
                    parts["tokenizer_3"] = source.load(source.component_class("tokenizer_3", T5TokenizerFast),
                                                       subfolder="tokenizer_3")
                except ValueError as err:
                    raise ValueError(f"the T5 tokenizer of {source.path!r} did not load ({err}); a folder with only "
                                     "spiece.model needs sentencepiece: pip install sentencepiece protobuf") from err
                parts["text_encoder_3"] = source.load(source.component_class("text_encoder_3", T5EncoderModel),
                                                      subfolder="text_encoder_3")
            parts["clip_tokenizer"] = parts.pop("tokenizer")
            return parts
        if preset is None or not preset.get("text_encoder"):
            raise ValueError("SD3's text encoders are needed: give a pretrained SD3 pipeline folder or the 'tiny' preset")
        clip, clip_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
        parts = {"clip_tokenizer": clip, "text_encoder": _tiny_clip_with_projection(clip, preset["text_encoder"]),
                 "tokenizer_2": clip_2, "text_encoder_2": _tiny_clip_with_projection(clip_2, preset["text_encoder"]),
                 "tokenizer_3": None, "text_encoder_3": None}
        if preset.get("text_encoder_3"):
            parts["tokenizer_3"] = tiny_t5_tokenizer()
            parts["text_encoder_3"] = tiny_t5_encoder(parts["tokenizer_3"], preset["text_encoder_3"])
        return parts

    def frozen_modules(self) -> dict:
        parts = {"vae": self.vae, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2,
                 "text_encoder_3": self.text_encoder_3}
        return {name: module for name, module in parts.items() if module is not None}

    # ------------------------------------------------------------------ training step

    @property
    def max_sequence_length(self) -> int:
        return MAX_SEQUENCE_LENGTH

    @torch.no_grad()
    def encode_prompt(self, prompts) -> tuple:
        """Captions -> ``(prompt_embeds, pooled_projections)`` (float32), by the pipeline's own ``encode_prompt``."""
        if self._text_pipeline is None:
            self._text_pipeline = self.make_pipeline()
        prompt_embeds, _, pooled, _ = self._text_pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.text_encoder.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return prompt_embeds.float(), pooled.float()

    def null_condition_batch(self, batch):
        batch = dict(batch)
        batch.pop("captions", None)  # -> the empty prompt (see `encode_text`)
        return batch

    def encode_text(self, batch) -> dict:
        """The batch's captions (none: the empty prompt, i.e. unconditional training) through the three
        text encoders: ``encoder_hidden_states`` (B, 77 + L_clip, D) and ``pooled_projections`` (B, D_pooled)."""
        captions = batch.get("captions")
        if captions is None:
            rows = batch["pixel_values"] if "pixel_values" in batch else batch["latent_moments"]  # cached latents
            captions = [""] * rows.shape[0]
        prompt_embeds, pooled = self.encode_prompt(captions)
        return {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled}

    def conditioning(self, batch, generator=None, training=False):
        # `ModelAdapter.text_conditioning` (with --cache_text_embeddings, on main) reads cached embeddings
        # first and calls `encode_text` otherwise; without it, encode here
        text_conditioning = getattr(super(), "text_conditioning", None)
        return text_conditioning(batch) if text_conditioning is not None else self.encode_text(batch)

    def validation_prompt_kwargs(self, pipeline, prompts, guidance_scale=None) -> dict:
        """``StableDiffusion3Pipeline.encode_prompt`` of the validation prompts (and, with guidance, of the
        empty negative prompt), as the pipeline itself computes them: sampling with these equals sampling
        with the prompts, once the text encoders are freed (--cache_text_embeddings)."""
        scale = guidance_scale if guidance_scale is not None else 7.0  # StableDiffusion3Pipeline's default
        embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.text_encoder.device,
            do_classifier_free_guidance=scale > 1.0, max_sequence_length=self.max_sequence_length)
        kwargs = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if negative is not None:
            kwargs.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
        return kwargs

    def predict(self, model, x_t, timesteps, conditioning):
        return model(hidden_states=x_t, timestep=timesteps, encoder_hidden_states=conditioning["encoder_hidden_states"],
                     pooled_projections=conditioning["pooled_projections"], return_dict=False)[0]

    # ------------------------------------------------------------------ pipelines

    def make_pipeline(self, model=None, scheduler=None):
        from diffusers import StableDiffusion3Pipeline

        pipeline = StableDiffusion3Pipeline(
            transformer=model if model is not None else self.model,
            scheduler=_copy_scheduler(scheduler if scheduler is not None else self.noise_scheduler),
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.clip_tokenizer,
            text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
            text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def _sample(self, pipeline, num_images, generator, num_inference_steps, prompts=None, guidance_scale=None, **unused):
        """``prompts``: strings (cycled to ``num_images``), or the dict of :meth:`validation_prompt_kwargs`
        (already ``num_images`` rows)."""
        kwargs = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
        if isinstance(prompts, dict):
            kwargs.update(prompts)
        else:
            kwargs["prompt"] = repeat_to(prompts if prompts is not None else "", num_images)
        return pipeline(num_inference_steps=num_inference_steps, generator=generator, output_type="pil",
                        max_sequence_length=self.max_sequence_length, **kwargs).images

    def _save_lora_weights(self, output_dir, model):
        """diffusers' SD3 LoRA file, as ``train_dreambooth_lora_sd3.py`` writes it."""
        from diffusers import StableDiffusion3Pipeline
        from peft.utils import get_peft_model_state_dict

        StableDiffusion3Pipeline.save_lora_weights(
            output_dir, transformer_lora_layers=get_peft_model_state_dict(model),
            transformer_lora_adapter_metadata=inference_lora_config(self.lora_config).to_dict(),  # alpha != rank exact on load
            safe_serialization=True)

    @classmethod
    def load_lora(cls, pipeline, folder):
        """diffusers' own ``load_lora_weights``."""
        pipeline.load_lora_weights(folder)
        return pipeline
