"""``unet``: a pixel-space ``UNet2DModel`` (Ho et al. 2020), unconditional or class-conditional.

Class-conditional means ``num_class_embeds`` is set: the class embedding is added to the timestep
embedding, and every batch must carry ``class_labels``. Pipelines: ``DDPMPipeline`` (or
``DDIMPipeline`` when given a DDIM scheduler) for unconditional models, this project's
``UnconditionalUNetPipeline`` for unconditional flow-matching ones and
``ClassConditionalUNetPipeline`` for class-conditional ones (diffusers has none); the last two
sample flow matching and DDPM-family schedulers alike.
"""

import torch

from .base import ModelAdapter, _copy_scheduler, check_class_labels, repeat_to, scheduler_kind


class UNetAdapter(ModelAdapter):
    model_type = "unet"
    # attention projections where the UNet has attention, and the ResNet convolutions and time
    # projections everywhere (a UNet without attention blocks still gets LoRA)
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj")

    def __init__(self, *args, new_class_embedding=None, **kwargs):
        super().__init__(*args, **kwargs)
        # (pretrained class count or None, the run's class count) when a pretrained UNet was given a freshly
        # initialised class embedding (another class count, or classes for an unconditional UNet), else None
        self.new_class_embedding = new_class_embedding

    @classmethod
    def _build(cls, source, preset, *, resolution, num_classes, num_channels, controlnet_model_name_or_path):
        from diffusers import UNet2DModel

        new_class_embedding = None

        if preset is not None:
            channels = num_channels or 3
            config = dict(preset["model"])
            config.update(
                sample_size=resolution or config.get("sample_size", 16), in_channels=channels, out_channels=channels
            )
            if num_classes is not None:
                config["num_class_embeds"] = num_classes
            model, from_pretrained = UNet2DModel(**config), False
        else:
            subfolder = None
            if source.index is not None:
                if not source.has("unet"):
                    raise ValueError(f"pretrained pipeline {source.path!r} has no unet")
                autoencoder = next((name for name in ("vqvae", "vae") if source.has(name)), None)
                if autoencoder is not None:  # e.g. CompVis/ldm-celebahq-256's LDMPipeline: a latent UNet
                    class_name = source.index.get("_class_name")
                    raise ValueError(
                        f"{source.path!r} is a latent pipeline ({class_name[-1] if isinstance(class_name, list) else class_name}"
                        f"): its UNet2DModel denoises the latents of its {autoencoder}, and --model_type unet trains "
                        "on pixels; use a pixel-space UNet pipeline (DDPMPipeline), or a latent type (dit, sd)"
                    )
                if source.component_class("unet", UNet2DModel) is not UNet2DModel:
                    raise ValueError(
                        f"the unet of {source.path!r} is a {source.index['unet'][1]}, not a UNet2DModel: "
                        "use model type 'sd' for text-conditional UNets"
                    )
                subfolder = "unet"
            model, from_pretrained = source.load(UNet2DModel, subfolder=subfolder, denoiser=True), True
            if num_classes is not None and model.config.num_class_embeds != num_classes:
                if model.config.class_embed_type is not None:
                    raise ValueError(
                        f"the pretrained UNet embeds its class input by class_embed_type "
                        f"{model.config.class_embed_type!r}, not by a table of classes, so the data set's "
                        f"{num_classes} classes have no rows to train: train without class labels, or from a UNet "
                        "with num_class_embeds")
                # a new class table (e.g. fine-tuning on a data set with other classes), as UNet2DModel builds one
                # for num_class_embeds: N(0, 1) rows of the time embedding's width. Made here rather than by
                # reloading with num_class_embeds and ignore_mismatched_sizes: diffusers left that table
                # uninitialised memory (1e31 to 1e38, NaN at times), and a quantized load refuses the reload's
                # low_cpu_mem_usage=False
                new_class_embedding = (model.config.num_class_embeds, num_classes)
                width = model.time_embedding.linear_2.out_features
                weight = model.time_embedding.linear_2.weight
                dtype = weight.dtype if weight.is_floating_point() else torch.float32  # (a quantized layer: packed)
                model.class_embedding = torch.nn.Embedding(num_classes, width, device=weight.device, dtype=dtype)
                model.register_to_config(num_class_embeds=num_classes)
                from_pretrained = False
            if num_channels is not None and num_channels != model.config.in_channels:
                raise ValueError(
                    f"the pretrained UNet takes {model.config.in_channels} image channels, the data has {num_channels}"
                )
        if resolution is not None and resolution != model.config.sample_size:
            # pipelines sample at config.sample_size: make it the training resolution
            model.register_to_config(sample_size=resolution)
        sample_size = model.config.sample_size
        return {
            "model": model,
            "num_channels": model.config.in_channels,
            "sample_size": sample_size,
            "model_from_pretrained": from_pretrained,
            "new_class_embedding": new_class_embedding,
        }

    @property
    def num_classes(self):
        """Number of classes of a class-conditional UNet, else ``None``."""
        return self.model.config.num_class_embeds

    def conditioning(self, batch, generator=None, training=False):
        if self.num_classes is None:
            return {}
        labels = batch.get("class_labels")
        if labels is None:
            raise ValueError("the UNet is class-conditional but the batch has no class_labels: set --class_column")
        check_class_labels(labels, self.num_classes, "the UNet")
        return {"class_labels": labels.long()}

    def predict(self, model, x_t, timesteps, conditioning):
        return model(x_t, timesteps, class_labels=conditioning.get("class_labels")).sample

    def make_pipeline(self, model=None, scheduler=None):
        from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

        from .pipelines import ClassConditionalUNetPipeline, UnconditionalUNetPipeline

        model = model if model is not None else self.model
        scheduler = _copy_scheduler(scheduler if scheduler is not None else self.noise_scheduler)
        if model.config.num_class_embeds is not None:
            pipeline = ClassConditionalUNetPipeline(unet=model, scheduler=scheduler)
        elif scheduler_kind(scheduler) == "flow_match":
            pipeline = UnconditionalUNetPipeline(unet=model, scheduler=scheduler)
        elif isinstance(scheduler, DDIMScheduler):
            pipeline = DDIMPipeline(unet=model, scheduler=scheduler)
        else:
            pipeline = DDPMPipeline(unet=model, scheduler=scheduler)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def _sample(self, pipeline, num_images, generator, num_inference_steps, class_labels=None, **unused):
        num_classes = pipeline.unet.config.num_class_embeds
        common = {"generator": generator, "num_inference_steps": num_inference_steps, "output_type": "pil"}
        if num_classes is None:
            return pipeline(batch_size=num_images, **common).images
        labels = repeat_to(class_labels if class_labels is not None else list(range(num_classes)), num_images)
        return pipeline(class_labels=labels, **common).images
