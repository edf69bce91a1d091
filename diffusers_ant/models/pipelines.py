"""Three small sampling pipelines diffusers does not ship.

- ``ClassConditionalUNetPipeline(unet, scheduler)``: a class-conditional ``UNet2DModel``
  (``num_class_embeds``); ``DDPMPipeline`` / ``DDIMPipeline`` cannot pass class labels.
- ``PixelDiTPipeline(transformer, scheduler)``: a ``DiTTransformer2DModel`` in pixel space;
  diffusers' ``DiTPipeline`` requires a VAE and hard-codes ImageNet's null class 1000.
- ``UnconditionalUNetPipeline(unet, scheduler)``: an unconditional ``UNet2DModel`` with any
  scheduler; this project saves flow-matching UNets with it (``DDPMPipeline`` is written for
  DDPM-family schedulers: it calls neither ``scale_model_input`` nor ``init_noise_sigma``, and its
  folder would announce a DDPM model).

All three run one loop that works for DDPM-family and flow-matching schedulers alike: start from
``init_noise_sigma`` times unit noise (flow matching has no such attribute and starts from unit
noise, ``x_1 = eps``), call the denoiser at each of ``scheduler.timesteps`` (for flow matching
``sigma * num_train_timesteps``, the shifted sigma the model was trained with, see
``diffusers_ant.schedule.model_timesteps``), and let ``scheduler.step`` move ``x`` (for
``FlowMatchEulerDiscreteScheduler``: the Euler step ``x + (sigma_next - sigma) * v`` of the
predicted velocity ``v = eps - x0``, ending at sigma = 0).

All are ordinary ``DiffusionPipeline`` subclasses: ``save_pretrained`` writes the usual folder
(safetensors weights, ``model_index.json``) and, as Hub community pipelines do, a copy of this
file as ``ant_pipeline.py`` with ``"_class_name": ["ant_pipeline", "<ClassName>"]``. So the folder
loads in two ways:

- ``ClassConditionalUNetPipeline.from_pretrained(folder)`` (or ``diffusers_ant.models.load_pipeline``):
  uses the installed class and never executes code from the folder;
- ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``: plain diffusers, no
  diffusers_ant needed, running the folder's ``ant_pipeline.py``.

This file must stay self-contained (imports from torch and diffusers only) because it is
copied into saved folders.
"""

import importlib
import inspect
import json
import os
import shutil

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

PIPELINE_FILE = "ant_pipeline"


class _ClassConditionalSampler(DiffusionPipeline):
    """Shared sampling loop: noise -> ``scheduler.step`` over the denoiser -> PIL images."""

    _denoiser_name = None  # "unet" or "transformer"

    def _denoise(self, x, t, labels, guidance_scale):
        raise NotImplementedError

    def _null_class(self):
        return None

    def _class_labels(self, class_labels, batch_size):
        """The labels to sample, as a list (one per image)."""
        if class_labels is None:
            null = self._null_class()
            class_labels = [0 if null is None else null] * batch_size
        return class_labels

    @torch.no_grad()
    def __call__(
        self,
        class_labels=None,
        batch_size: int = 1,
        generator=None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Sample images, one per entry of ``class_labels`` (default: the null / first class, ``batch_size`` times).

        ``guidance_scale > 1`` applies classifier-free guidance (Ho & Salimans 2022, eq. 6) when the
        denoiser has a null class (DiT); ``output_type`` is ``"pil"``, ``"np"`` or ``"pt"`` (in [0, 1]).
        """
        denoiser = getattr(self, self._denoiser_name)
        class_labels = self._class_labels(class_labels, batch_size)
        labels = None
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, device=self._execution_device, dtype=torch.long).reshape(-1)
        size = denoiser.config.sample_size
        shape = (batch_size if labels is None else len(labels), denoiser.config.in_channels, size, size)
        x = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=denoiser.dtype)
        # flow-matching schedulers have neither attribute (they start from unit noise and scale nothing)
        x = x * getattr(self.scheduler, "init_noise_sigma", 1.0)
        scale_model_input = getattr(self.scheduler, "scale_model_input", lambda sample, timestep: sample)

        # the generator where the scheduler's step draws noise; PNDM, UniPC, DEIS, Heun, LMS, ... take none (as
        # diffusers' pipelines' prepare_extra_step_kwargs pass it)
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = scale_model_input(x, t)
            model_output = self._denoise(model_input, t, labels, guidance_scale)
            x = self.scheduler.step(model_output, t, x, **step_kwargs).prev_sample

        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            result = images
        else:
            result = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                result = self.numpy_to_pil(result)
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)

    def save_pretrained(self, save_directory, safe_serialization: bool = True, **kwargs):
        """``DiffusionPipeline.save_pretrained`` plus this file, so plain diffusers can load the folder."""
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, **kwargs)
        shutil.copyfile(__file__, os.path.join(save_directory, PIPELINE_FILE + ".py"))
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        index["_class_name"] = [PIPELINE_FILE, type(self).__name__]
        with open(index_path, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype=None, **kwargs):
        """Load the components with their installed diffusers classes.

        Written by hand because ``DiffusionPipeline.from_pretrained`` sees the community-pipeline
        ``_class_name`` and would insist on executing the folder's ``ant_pipeline.py``
        (``trust_remote_code``); here only diffusers' own classes read the (safetensors) weights.
        """
        folder = pretrained_model_name_or_path
        if not os.path.isdir(folder):
            folder = DiffusionPipeline.download(pretrained_model_name_or_path, **kwargs)
        with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
            index = json.load(f)
        components = {}
        for name in (cls._denoiser_name, "scheduler"):
            library, class_name = index[name]
            if library != "diffusers":
                raise ValueError(f"{name} in {folder} is a {library} class; expected a diffusers one")
            component_cls = getattr(importlib.import_module("diffusers"), class_name)
            if name == "scheduler":
                components[name] = component_cls.from_pretrained(folder, subfolder=name)
            else:
                components[name] = component_cls.from_pretrained(folder, subfolder=name, torch_dtype=torch_dtype)
        return cls(**components)


class ClassConditionalUNetPipeline(_ClassConditionalSampler):
    """Sampling from a class-conditional ``UNet2DModel`` (``num_class_embeds`` set), any diffusers scheduler.

    Such a UNet learns no null class, so there is no classifier-free guidance here.
    """

    _denoiser_name = "unet"

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def _denoise(self, x, t, labels, guidance_scale):
        return self.unet(x, t, class_labels=labels).sample


class UnconditionalUNetPipeline(_ClassConditionalSampler):
    """Sampling from an unconditional ``UNet2DModel`` (no ``num_class_embeds``), any diffusers scheduler.

    Made for flow matching: a UNet trained with ``FlowMatchEulerDiscreteScheduler`` is saved with
    this class and that scheduler, and samples by Euler steps of its predicted velocity.
    """

    _denoiser_name = "unet"

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def _class_labels(self, class_labels, batch_size):
        if class_labels is not None:
            raise ValueError("this UNet is unconditional: call the pipeline with batch_size, not class_labels")
        return None

    def _denoise(self, x, t, labels, guidance_scale):
        return self.unet(x, t).sample


class PixelDiTPipeline(_ClassConditionalSampler):
    """Sampling from a ``DiTTransformer2DModel`` that works on pixels (no VAE).

    The DiT label embedding keeps one extra row, index ``num_embeds_ada_norm``, for the null class
    (its training drops labels to it with probability 0.1); unconditional sampling and the
    unconditional half of classifier-free guidance use that index.
    """

    _denoiser_name = "transformer"

    def __init__(self, transformer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    def _null_class(self):
        return self.transformer.config.num_embeds_ada_norm

    def _denoise(self, x, t, labels, guidance_scale):
        channels = self.transformer.config.in_channels
        timesteps = torch.as_tensor(t, device=x.device).reshape(-1)
        if guidance_scale > 1:
            null = torch.full_like(labels, self._null_class())
            out = self.transformer(
                torch.cat([x, x]), timestep=timesteps.expand(2 * len(x)), class_labels=torch.cat([labels, null])
            ).sample[:, :channels]
            cond, uncond = out.chunk(2)
            return uncond + guidance_scale * (cond - uncond)
        # a DiT with learned variance (out_channels = 2 * in_channels) predicts [eps, variance]
        return self.transformer(x, timestep=timesteps.expand(len(x)), class_labels=labels).sample[:, :channels]


__all__ = ["ClassConditionalUNetPipeline", "PixelDiTPipeline", "UnconditionalUNetPipeline"]
