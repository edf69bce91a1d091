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
through the zero convolutions, whose weights are zero, so nothing would ever be learned. Saved in
peft format (the pipeline's ``load_lora_weights`` targets the UNet and text encoder, not the
ControlNet); load with :meth:`ControlNetAdapter.load_lora`.
"""

from .base import PretrainedSource, repeat_to
from .sd import StableDiffusionAdapter

# diffusers' default conditioning embedding for SD (4 blocks: downsampling by 8, as SD's VAE)
_CONDITIONING_EMBEDDING = (16, 32, 96, 256)


class ControlNetAdapter(StableDiffusionAdapter):
    model_type = "controlnet"
    # the zero convolutions that feed the frozen UNet
    output_module_names = ("controlnet_down_blocks", "controlnet_mid_block")

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
        from_pretrained = False
        if controlnet_model_name_or_path is not None:
            cn_source = PretrainedSource(controlnet_model_name_or_path)
            controlnet = cn_source.load(ControlNetModel, subfolder="controlnet" if cn_source.has("controlnet") else None)
        elif source is not None and source.has("controlnet") and preset is None:
            controlnet, from_pretrained = source.load(ControlNetModel, subfolder="controlnet"), True
        elif "block_out_channels" in model_config:  # a full ControlNetModel config JSON
            controlnet = ControlNetModel(**model_config)
        else:
            blocks = cls.vae_scale_factor(vae).bit_length()  # scale 2**(n-1) -> n blocks
            model_config["conditioning_embedding_out_channels"] = _CONDITIONING_EMBEDDING[:blocks]
            controlnet = ControlNetModel.from_unet(unet, **model_config)
        return {
            "model": controlnet,
            "unet": unet,
            "vae": vae,
            "text_encoder": text_encoder,
            "tokenizer": tokenizer,
            "num_channels": vae.config.in_channels,
            "sample_size": unet.config.sample_size,
            "model_from_pretrained": from_pretrained,
        }

    @property
    def in_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def lora_target_modules(self) -> list:
        """Attention projections plus every zero convolution (see the module docstring for why)."""
        zero_convs = [name for name, _ in self.model.named_modules() if name.startswith("controlnet_down_blocks.")]
        return super().lora_target_modules + zero_convs + ["controlnet_mid_block"]

    def conditioning(self, batch, generator=None, training=False):
        cond = super().conditioning(batch, generator=generator, training=training)
        image = batch.get("conditioning_pixel_values")
        if image is None:
            raise ValueError("ControlNet training needs conditioning images: set --conditioning_image_column")
        expected = self.model.config.conditioning_channels
        if image.shape[1] == 1 and expected == 3:
            image = image.expand(-1, 3, -1, -1)
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
        return pipeline(
            prompt=repeat_to(prompts if prompts is not None else "", num_images),
            image=repeat_to(conditioning_images, num_images),
            num_inference_steps=num_inference_steps,
            generator=generator,
            output_type="pil",
            **kwargs,
        ).images

    def _save_lora_weights(self, output_dir, model):
        from .lora import save_peft_lora

        save_peft_lora(output_dir, model, self.lora_config)

    @classmethod
    def load_lora(cls, pipeline, folder):
        """Attach the peft-format LoRA in ``folder`` to ``pipeline.controlnet``."""
        from .lora import load_peft_lora

        load_peft_lora(pipeline.controlnet, folder)
        return pipeline
