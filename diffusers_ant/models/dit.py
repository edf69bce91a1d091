"""``dit``: a ``DiTTransformer2DModel`` (Peebles & Xie 2023), class-conditional, on pixels or VAE latents.

DiT's adaLN-Zero blocks always take a class label. The label embedding has ``num_embeds_ada_norm``
classes plus one null class at index ``num_embeds_ada_norm`` (diffusers' DiT drops labels to it
with probability 0.1 during training, for classifier-free guidance). So:

- a batch with ``class_labels`` trains those classes (load with ``num_classes`` = the class count);
- a batch without them trains the null class, i.e. an unconditional model; from scratch without
  ``num_classes`` the DiT gets a single class and is used through its null class only.

Pixel space (preset ``tiny``, or a pretrained folder without ``vae/``) samples through this
project's ``PixelDiTPipeline``, with DDPM-family and flow-matching schedulers alike; latent space
(preset ``tiny-latent``, or a pretrained ``DiTPipeline`` folder) through diffusers' ``DiTPipeline``,
which cannot step a flow-matching scheduler (``ModelAdapter.load`` refuses that combination). A DiT
with learned variance (``out_channels = 2 * in_channels``, as DiT-XL-2) is trained on its first
``in_channels`` outputs, the noise prediction.
"""

import torch

from .base import ModelAdapter, _copy_scheduler, check_class_labels, repeat_to


def take_over_label_dropout(model) -> float:
    """Switch off the label dropout inside a DiT and return its probability, for the trainer to draw.

    diffusers' ``LabelEmbedding`` drops labels to the null class with ``torch.rand`` (the global RNG)
    in training mode, and a DiT with adaLN-Zero blocks embeds the labels once per block, so each
    block drops on its own. The trainer instead draws one drop mask per sample from its own
    generator (``DiTAdapter.conditioning``) and passes the null class; the embedding table keeps its
    null row (its size was fixed at construction from the config's dropout probability)."""
    from diffusers.models.embeddings import LabelEmbedding

    probability = 0.0
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            probability = max(probability, float(module.dropout_prob))
            module.dropout_prob = 0.0
    return probability


class DiTAdapter(ModelAdapter):
    model_type = "dit"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
    output_module_names = ("proj_out_2", "proj_out")
    last_block_name = "transformer_blocks"

    @classmethod
    def _build(cls, source, preset, *, resolution, num_classes, num_channels, controlnet_model_name_or_path):
        from diffusers import DiTTransformer2DModel

        vae = cls._load_vae(source, preset, num_channels, resolution)
        scale = cls.vae_scale_factor(vae)
        if preset is not None:
            if vae is not None:
                num_channels = vae.config.in_channels
            in_channels = vae.config.latent_channels if vae is not None else (num_channels or 3)
            config = dict(preset["model"])
            config.update(
                sample_size=(resolution or 16) // scale,
                in_channels=in_channels,
                out_channels=in_channels,
                num_embeds_ada_norm=num_classes or 1,
            )
            model, from_pretrained = DiTTransformer2DModel(**config), False
        else:
            subfolder = None
            if source.index is not None:
                if not source.has("transformer"):
                    raise ValueError(f"pretrained pipeline {source.path!r} has no transformer")
                subfolder = "transformer"
            model, from_pretrained = source.load(DiTTransformer2DModel, subfolder=subfolder), True
            if num_classes is not None and model.config.num_embeds_ada_norm != num_classes:
                # another class count: a freshly initialised label embedding
                model = source.load(
                    DiTTransformer2DModel,
                    subfolder=subfolder,
                    num_embeds_ada_norm=num_classes,
                    ignore_mismatched_sizes=True,
                    low_cpu_mem_usage=False,
                )
                from_pretrained = False
            if resolution is not None and resolution // scale != model.config.sample_size:
                # DiT recomputes its sin-cos position embedding for another size; pipelines read sample_size
                model.register_to_config(sample_size=resolution // scale)
        channels = vae.config.in_channels if vae is not None else model.config.in_channels
        if num_channels is not None and num_channels != channels:
            raise ValueError(f"the pretrained DiT takes {channels} image channels, the data has {num_channels}")
        return {
            "model": model,
            "vae": vae,
            "num_channels": channels,
            "sample_size": model.config.sample_size,
            "model_from_pretrained": from_pretrained,
        }

    def __init__(self, model, noise_scheduler, **kwargs):
        super().__init__(model, noise_scheduler, **kwargs)
        self.class_dropout_prob = take_over_label_dropout(model)

    @property
    def num_classes(self) -> int:
        """Classes of the label embedding (not counting the null class)."""
        return self.model.config.num_embeds_ada_norm

    @property
    def null_class(self) -> int:
        return self.model.config.num_embeds_ada_norm

    def null_condition_batch(self, batch):
        batch = dict(batch)
        batch.pop("class_labels", None)  # no labels -> the null class (see `conditioning`)
        return batch

    def conditioning(self, batch, generator=None, training=False):
        labels = batch.get("class_labels")
        if labels is None:
            batch_size = batch["pixel_values"].shape[0]
            labels = torch.full((batch_size,), self.null_class, dtype=torch.long, device=batch["pixel_values"].device)
        else:
            check_class_labels(labels, self.num_classes, "the DiT")
            labels = labels.long()
            if training and self.class_dropout_prob > 0:
                # DiT's classifier-free-guidance dropout (Peebles & Xie 2023, Sec. 3.1), drawn here from
                # the step's generator instead of inside the model from the global RNG (see
                # `take_over_label_dropout`): resumable, and the same for every forward of the step.
                draw = generator.device if generator is not None else labels.device
                drop = torch.rand(labels.shape[0], generator=generator, device=draw) < self.class_dropout_prob
                labels = torch.where(drop.to(labels.device), torch.full_like(labels, self.null_class), labels)
        return {"class_labels": labels}

    def predict(self, model, x_t, timesteps, conditioning):
        timesteps = torch.as_tensor(timesteps, device=x_t.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x_t.shape[0])
        out = model(x_t, timestep=timesteps, class_labels=conditioning["class_labels"]).sample
        return out[:, : x_t.shape[1]]  # drop the learned-variance half, if any

    def make_pipeline(self, model=None, scheduler=None):
        from diffusers import DiTPipeline

        from .pipelines import PixelDiTPipeline

        model = model if model is not None else self.model
        scheduler = _copy_scheduler(scheduler if scheduler is not None else self.noise_scheduler)
        if self.vae is not None:
            pipeline = DiTPipeline(transformer=model, vae=self.vae, scheduler=scheduler)
        else:
            pipeline = PixelDiTPipeline(transformer=model, scheduler=scheduler)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def _sample(self, pipeline, num_images, generator, num_inference_steps, class_labels=None, guidance_scale=None, **unused):
        num_classes = pipeline.transformer.config.num_embeds_ada_norm
        if class_labels is None:
            class_labels = list(range(num_classes)) if num_classes > 1 else [num_classes]  # [null] if unconditional
        labels = repeat_to(class_labels, num_images)
        guidance_scale = 1.0 if guidance_scale is None else guidance_scale
        if hasattr(pipeline, "vae") and guidance_scale > 1 and num_classes != 1000:
            # diffusers' DiTPipeline hard-codes ImageNet's null class 1000
            raise ValueError("DiTPipeline guidance needs a 1000-class DiT: use guidance_scale=1")
        kwargs = {
            "class_labels": labels,
            "guidance_scale": guidance_scale,
            "generator": generator,
            "num_inference_steps": num_inference_steps,
            "output_type": "pil",
        }
        if not hasattr(pipeline, "vae") or generator is None:
            return pipeline(**kwargs).images
        # DiTPipeline's scheduler.step draws its noise from the global RNG, not from `generator`:
        # seed a forked global RNG from the generator (the first of a list: one per image, as the
        # knowledge bank samples its batches) so the same generators give the same images and the
        # caller's RNG state (e.g. the training loop's) is left alone.
        device = pipeline.device
        first = generator[0] if isinstance(generator, (list, tuple)) else generator
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=first, device=first.device))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            return pipeline(**kwargs).images
