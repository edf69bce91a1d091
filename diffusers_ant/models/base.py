"""The model-adapter base class: what the trainer needs from any diffusers denoiser.

One adapter per model type (unet.py, dit.py, sd.py, controlnet.py) turns the type's differences
into one interface, so the training script has no model-type branches:

    adapter = get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=16, num_channels=1)
    x0, cond = adapter.encode_batch(batch)              # pixels -> latents, captions -> embeddings ...
    x_t = noise_scheduler.add_noise(x0, noise, t)
    pred = adapter.predict(model, x_t, t, cond)         # the denoiser output, shaped like x0
    adapter.save(output_dir, model, lora=False)         # a diffusers pipeline folder (safetensors)

Training target and noising stay in ``diffusers_ant.schedule``; the adapter only knows models.
"""

import json
import os
from contextlib import contextmanager, nullcontext

import torch

from ..schedule import NOISE_SCHEDULERS, resolve_prediction_type
from .lora import attach_lora, base_copy, has_lora, load_peft_lora, save_peft_lora
from .presets import LATENT_SCHEDULER, PIXEL_SCHEDULER, resolve_model_config

LORA_INFO_NAME = "ant_lora.json"
# A ControlNet output (the ControlNetModel at the folder's root, as diffusers' train_controlnet.py
# saves it) names its base Stable Diffusion pipeline in this file.
CONTROLNET_INFO_NAME = "ant_controlnet.json"
CLASS_MAP_NAME = "class_map.json"  # a DiT's data-set classes -> label rows (models/dit.py)
# Where an output folder carries its own base pipeline (a base trained from scratch, which no Hub
# id or other folder holds).
BASE_MODEL_DIR = "base_model"


def resolve_recorded_base(folder: str, recorded: str) -> str:
    """The base pipeline named in ``folder``'s ``ant_lora.json`` / ``ant_controlnet.json``.

    Saved folders record their base relative to themselves (``base_model``, ``../sd-base``) or as a
    Hub id, never as an absolute path of the training machine (see ``diffusers_ant.hub.portable_path``);
    absolute paths of older folders still resolve.
    """
    candidate = os.path.join(folder, recorded)
    if os.path.isdir(candidate):
        return candidate
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(recorded)
        is_hub_id = recorded != BASE_MODEL_DIR and not recorded.startswith((".", "/", "~"))
    except HFValidationError:
        is_hub_id = False
    if not is_hub_id:
        raise ValueError(
            f"the base model {recorded!r} that {folder!r} was trained on is not there (paths are relative to "
            "the folder): put the base pipeline at that place, or edit base_model in the folder's JSON"
        )
    return recorded


def _not_found(path, err=None):
    detail = f" ({type(err).__name__})" if err is not None else ""
    return ValueError(
        f"pretrained model {path!r} not found{detail}: give a local folder saved with save_pretrained, or go online"
    )


class PretrainedSource:
    """A pretrained pipeline folder or Hub id, or the folder of a single model (``config.json``).

    Reads ``model_index.json`` once so that each component is looked for only where the pipeline
    says it is; every loading error becomes one short ``ValueError``.
    """

    # Subfolders of the trained denoiser (or the frozen UNet a ControlNet runs beside): what a
    # ``quantization_config`` (``--quantize_base``) applies to, as in diffusers' LoRA scripts.
    QUANTIZED_SUBFOLDERS = ("unet", "transformer")

    def __init__(self, path, revision=None, variant=None, cache_dir=None, quantization_config=None):
        self.path = path
        self.quantization_config = quantization_config
        self.revision = revision
        self.variant = variant
        self.cache_dir = cache_dir
        self.is_local = os.path.isdir(path)
        self.index = None
        if self.is_local:
            index_path = os.path.join(path, "model_index.json")
            if os.path.isfile(index_path):
                with open(index_path, encoding="utf-8") as f:
                    self.index = json.load(f)
            elif not os.path.isfile(os.path.join(path, "config.json")):
                raise ValueError(f"pretrained folder {path!r} has neither model_index.json nor config.json")
        else:
            from diffusers import DiffusionPipeline

            try:
                self.index = DiffusionPipeline.load_config(path, revision=revision, cache_dir=cache_dir)
            except (OSError, ValueError) as err:  # offline / unknown id / malformed id
                raise _not_found(path, err) from err

    def has(self, name: str) -> bool:
        """Whether the pipeline has a component ``name`` (e.g. "vae", "scheduler")."""
        if self.index is not None:
            entry = self.index.get(name)
            return isinstance(entry, (list, tuple)) and entry[0] is not None
        return False

    def component_class(self, name: str, default):
        """The class ``model_index.json`` names for ``name`` (diffusers / transformers only), else ``default``."""
        import importlib

        entry = self.index.get(name) if self.index else None
        if entry and entry[0] in ("diffusers", "transformers"):
            return getattr(importlib.import_module(entry[0]), entry[1], default)
        return default

    def load(self, component_cls, subfolder=None, denoiser=False, **kwargs):
        """``component_cls.from_pretrained`` of a subfolder (None: the folder itself), errors made short.
        ``--quantize_base`` quantizes the denoiser: a ``unet`` / ``transformer`` subfolder, or the folder itself
        where ``denoiser`` says it is a bare model folder (``config.json`` only, as unet and dit take)."""
        hub = {"revision": self.revision, "cache_dir": self.cache_dir}
        if self.variant is not None and issubclass(component_cls, torch.nn.Module):  # weights only
            hub["variant"] = self.variant
        if subfolder is not None:
            hub["subfolder"] = subfolder
        loading = nullcontext()
        if self.quantization_config is not None and (subfolder in self.QUANTIZED_SUBFOLDERS
                                                     or denoiser and subfolder is None):
            from .quantization import cpu_quantized_load, keep_off_cpu_packing, quantized_load_kwargs

            hub.update(quantized_load_kwargs(self.quantization_config))  # models/quantization.py
            loading = cpu_quantized_load()  # diffusers' GPU-only start check, lifted on a CPU machine
        with loading:  # outside the try: its own refusal (an old bitsandbytes) is not a missing folder
            try:
                model = component_cls.from_pretrained(self.path, **hub, **kwargs)
            except (OSError, ValueError) as err:
                where = self.path if subfolder is None else f"{self.path}/{subfolder}"
                raise _not_found(where, err) from err
        if "quantization_config" in hub:
            keep_off_cpu_packing(model)
        return model


def check_quantized_source(quantization_config, pretrained_model_name_or_path, model_config_name_or_path) -> None:
    """A one-line ``ValueError`` when ``--quantize_base`` has no pretrained denoiser to quantize (a preset)."""
    if quantization_config is not None and (pretrained_model_name_or_path is None or model_config_name_or_path):
        raise ValueError("--quantize_base quantizes a pretrained denoiser: give --pretrained_model_name_or_path "
                         "without --model_config_name_or_path")


def check_pipeline_family(source, model_type: str) -> None:
    """A ``ValueError`` naming both model types when ``source`` is a pipeline folder of a class that another
    model type claims (its adapter's ``pipeline_classes``), e.g. a ``QwenImagePipeline`` given to ``sd``."""
    from . import MODEL_TYPES  # the registry (models/__init__.py imports this module)

    class_name = (source.index or {}).get("_class_name")
    class_name = class_name[-1] if isinstance(class_name, list) else class_name
    own = MODEL_TYPES.get(model_type)
    if own is not None and class_name in own.pipeline_classes:
        return  # also a subclass's inherited claim: controlnet trains beside an SD pipeline's parts
    owner = next((name for name, adapter in MODEL_TYPES.items() if class_name in adapter.pipeline_classes), None)
    if owner is not None and owner != model_type:
        raise ValueError(f"{source.path!r} is a {class_name} (--model_type {owner}), not a {model_type} model "
                         f"(--model_type {model_type}): use --model_type {owner}")


def scheduler_kind(scheduler) -> str:
    """``"flow_match"`` for diffusers' flow-matching schedulers, else ``"ddpm"`` (one of :data:`NOISE_SCHEDULERS`)."""
    from ..schedule import is_flow_matching

    return "flow_match" if is_flow_matching(scheduler) else "ddpm"


def default_scheduler(latent: bool, config: dict = None, kind: str = "ddpm", flow_shift: float = None):
    """The training scheduler of a model trained from scratch, by ``kind`` (:data:`NOISE_SCHEDULERS`).

    ``ddpm``: a ``DDPMScheduler`` with ``config`` (a preset's), else cosine for pixels and SD's
    scaled_linear for latents. ``flow_match``: a ``FlowMatchEulerDiscreteScheduler`` (rectified flow,
    Esser et al. 2024, ``x_t = (1 - s) x0 + s eps``) with the config's ``num_train_timesteps`` and
    ``shift = flow_shift`` (default 1.0, no shift; SD3 uses 3.0 for 1024-pixel latents).
    """
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    config = config or (LATENT_SCHEDULER if latent else PIXEL_SCHEDULER)
    if kind == "flow_match":
        shift = config.get("shift", 1.0) if flow_shift is None else flow_shift  # a preset may carry its shift (SD3: 3.0)
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.get("num_train_timesteps", 1000), shift=shift)
    if kind != "ddpm":
        raise ValueError(f"unknown noise scheduler {kind!r}; use one of {', '.join(NOISE_SCHEDULERS)}")
    return DDPMScheduler(**config)


def check_input_channels(model, expected: int, source, model_type: str) -> None:
    """One line for a checkpoint whose denoiser takes other inputs than the noisy latents it would train on:
    an inpainting or Fill variant (latents, mask and masked image stacked: 9 channels for SD / SDXL, 384 for
    FLUX.1 Fill) or a control variant, which this trainer does not train. It loaded, and failed at the first
    step on a shape error."""
    found = model.config.in_channels
    if found != expected:
        raise ValueError(f"the denoiser of {source.path!r} takes {found} input channels where the latents "
                         f"--model_type {model_type} trains it on have {expected}: an inpainting, Fill or other "
                         "variant, which is not trained here: give a text-to-image checkpoint")


def load_training_scheduler(source: PretrainedSource):
    """The training scheduler of a pretrained pipeline, as diffusers' example scripts build it.

    DDPM-family configs (PNDM, DDIM, ... folders) become a ``DDPMScheduler`` with the same betas;
    flow-matching schedulers keep their own class, since their noising differs. A scheduler without betas
    (EDM, as Playground v2.5's; score-SDE) is refused: read as a ``DDPMScheduler`` it gives DDPM's default
    linear betas, another noise schedule than the model's, and the run would train it silently (diffusers'
    SDXL script switches to EDM-style training there, which is not offered here).
    """
    import inspect

    from diffusers import DDPMScheduler

    cls = source.component_class("scheduler", DDPMScheduler)
    if "FlowMatch" not in cls.__name__:
        if "beta_schedule" not in inspect.signature(cls.__init__).parameters:
            raise ValueError(f"the pipeline's scheduler, {cls.__name__}, has no schedule of betas (an EDM or score-SDE "
                             "sampler): trained as DDPM it would learn another noise schedule, and EDM-style training "
                             "is not offered: start from a checkpoint with a DDPM-family or flow-matching scheduler")
        cls = DDPMScheduler
    return source.load(cls, subfolder="scheduler")


def pretrained_sampling_scheduler(source: PretrainedSource, training):
    """The pretrained pipeline's own sampling scheduler (e.g. SDXL's ``EulerDiscreteScheduler``) when
    training replaced it with another class of the same family (``load_training_scheduler``'s
    ``DDPMScheduler``), else ``None``. A full fine-tune saves its pipeline with it, as diffusers'
    ``train_text_to_image*.py`` scripts do (they save ``from_pretrained(base, unet=...)``, which keeps the
    base's scheduler). The training target's ``prediction_type`` is carried over: the model now predicts it.
    """
    cls = source.component_class("scheduler", None)
    if cls is None or cls is type(training) or not hasattr(cls, "from_pretrained"):
        return None
    own = source.load(cls, subfolder="scheduler")
    if scheduler_kind(own) != scheduler_kind(training):
        return None  # trained with the other kind of scheduler (--noise_scheduler): the original cannot sample it
    target = training.config.get("prediction_type")
    if target is not None and "prediction_type" in own.config and own.config.prediction_type != target:
        own = _copy_scheduler(own, prediction_type=target)
        if not _steps_with(own):
            return None  # (PNDM, SD 1.5's sampler, steps epsilon and v only: the saved pipeline then samples with DDPM)
    return own


def _steps_with(scheduler) -> bool:
    """Whether `scheduler` takes a step with its `prediction_type` (some classes support only some targets and
    raise at the first step): one step of a 4-step schedule on a 1-element sample, on a copy."""
    probe = _copy_scheduler(scheduler)
    try:
        probe.set_timesteps(4)
        sample = torch.zeros(1, 1, 1, 1)
        probe.step(sample, probe.timesteps[0], sample)
    except (ValueError, NotImplementedError):
        return False
    return True


def _copy_scheduler(scheduler, **overrides):
    """A fresh scheduler with the same config (plus ``overrides``).

    Pipelines call ``set_timesteps`` on their scheduler, so they get a copy. ``_use_default_values``
    is dropped on purpose: ``from_config`` would otherwise reset every key listed there to its
    default, including one changed later with ``register_to_config`` (e.g. ``prediction_type``).
    """
    config = {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}
    config.update(overrides)
    return type(scheduler).from_config(config)


class ModelAdapter:
    """Base class of the four model adapters; see the module docstring for the workflow.

    Attributes:
        model: the module being trained (also the one to wrap in EMA).
        noise_scheduler: the training scheduler (from the pretrained ``scheduler/`` when there is one;
            its SNR drives the timestep clustering).
        vae, text_encoder, tokenizer, unet: frozen parts (``None`` where the type has none;
            ``unet`` is the frozen UNet of ControlNet training).
        num_channels: image channels the data must provide; sample_size: spatial size the model sees
            (latent size when ``latent``); in_channels: the model's input channels.
        pretrained_model_name_or_path: where the frozen parts and scheduler came from.
        model_from_pretrained: whether ``model``'s own weights came from that folder (decides whether
            a LoRA output must carry its base model; see :meth:`save`).
    """

    model_type = None
    # `--pretrained_vae_model_name_or_path`, when the VAE was replaced (recorded in a LoRA output)
    pretrained_vae_model_name_or_path = None
    # what the loaded pretrained model predicts (`resolve_prediction_type` of its own scheduler), before
    # --prediction_type / --noise_scheduler change what the run trains; None without a pretrained scheduler
    pretrained_target = None
    # the Hub revision of a Hub-id base (`--revision`), None for a local folder or the repo's default branch
    pretrained_revision = None
    # module-name suffixes given LoRA by default; filtered to those the model has
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    # The training schedulers the type's pipeline can sample (NOISE_SCHEDULERS), the first the default
    # from scratch; and whether its pipeline steps a flow-matching scheduler on VAE latents (Qwen-Image's
    # does; SD's and DiT's latent pipelines do not).
    noise_schedulers = NOISE_SCHEDULERS
    latent_flow_matching = False
    # The diffusers pipeline classes whose folders only this type loads: another type given such a folder
    # is refused in one line naming both (see `check_pipeline_family`).
    pipeline_classes = ()

    def __init__(
        self,
        model,
        noise_scheduler,
        *,
        num_channels,
        sample_size,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=None,
        pretrained_model_name_or_path=None,
        model_from_pretrained=False,
    ):
        self.model = model
        self.noise_scheduler = noise_scheduler
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.unet = unet
        self.num_channels = num_channels
        self.sample_size = sample_size
        self.pretrained_model_name_or_path = pretrained_model_name_or_path
        self.model_from_pretrained = model_from_pretrained
        self.lora_config = None
        # the pretrained folder's sampling scheduler where training uses another class (see `save`)
        self.sampling_scheduler = None
        for frozen in self.frozen_modules().values():
            frozen.requires_grad_(False)
            frozen.eval()

    # ------------------------------------------------------------------ building

    @classmethod
    def load(
        cls,
        pretrained_model_name_or_path=None,
        model_config_name_or_path=None,
        resolution=None,
        num_classes=None,
        prediction_type=None,
        revision=None,
        variant=None,
        cache_dir=None,
        controlnet_model_name_or_path=None,
        num_channels=None,
        noise_scheduler=None,
        flow_shift=None,
        pretrained_vae_model_name_or_path=None,
        quantization_config=None,
    ):
        """Build the adapter from a pretrained folder / Hub id, from a preset or config JSON, or both.

        Args:
            pretrained_model_name_or_path: a pipeline folder saved with ``save_pretrained`` (or a bare
                model folder for ``unet`` / ``dit``), or a Hub id when online. Supplies the trained
                module (unless ``model_config_name_or_path`` is given), the frozen parts and the scheduler.
            model_config_name_or_path: a preset name (``tiny`` for every type, ``small`` for ``unet``,
                ``tiny-latent`` for ``dit``) or a config JSON of the trained module: train it from scratch.
            resolution: image size in pixels (default: the pretrained model's, else 16).
            num_classes: class count of a class-conditional ``unet`` / ``dit`` (a pretrained UNet with
                another count gets a freshly initialised class embedding; a pretrained DiT keeps its
                label table, see ``models/dit.py``).
            prediction_type: overrides the scheduler's (``epsilon``, ``v_prediction``, ``sample``).
            revision, variant, cache_dir: passed to ``from_pretrained``.
            controlnet_model_name_or_path: ``controlnet`` only: a pretrained ControlNet.
            num_channels: image channels of the data when training from scratch (default 3).
            noise_scheduler: ``ddpm`` or ``flow_match`` (:func:`default_scheduler`); default the pretrained
                folder's scheduler, else ``ddpm``. Flow matching is for pixel-space models (``unet``, ``dit``
                without a VAE), whose pipelines sample it; a pretrained folder of the other family keeps
                its weights and trains with a fresh scheduler of this kind.
            flow_shift: the ``shift`` of a flow-matching scheduler (overrides the pretrained folder's).
            pretrained_vae_model_name_or_path: a VAE (folder or Hub id of an ``AutoencoderKL``) in place of
                the pipeline's, as diffusers' SDXL scripts take it (the fp16-fixed SDXL VAE).
            quantization_config: a diffusers ``BitsAndBytesConfig`` for the pretrained denoiser's weights
                (``--quantize_base``, ``models/quantization.py``); the frozen base of a LoRA run only.
        """
        if pretrained_model_name_or_path is None and model_config_name_or_path is None:
            raise ValueError(
                "nothing to load: give pretrained_model_name_or_path or model_config_name_or_path (e.g. 'tiny')"
            )
        source = None
        check_quantized_source(quantization_config, pretrained_model_name_or_path, model_config_name_or_path)
        if pretrained_model_name_or_path is not None:
            source = PretrainedSource(pretrained_model_name_or_path, revision, variant, cache_dir,
                                      quantization_config=quantization_config)
            check_pipeline_family(source, cls.model_type)
        preset = None
        if model_config_name_or_path is not None:
            preset = resolve_model_config(cls.model_type, model_config_name_or_path)
        parts = cls._build(
            source,
            preset,
            resolution=resolution,
            num_classes=num_classes,
            num_channels=num_channels,
            controlnet_model_name_or_path=controlnet_model_name_or_path,
        )
        if pretrained_vae_model_name_or_path is not None:
            parts["vae"] = cls._replacement_vae(parts.get("vae"), pretrained_vae_model_name_or_path,
                                                revision, variant, cache_dir)
        latent = parts.get("vae") is not None
        if noise_scheduler is not None and noise_scheduler not in cls.noise_schedulers:
            raise ValueError(f"--model_type {cls.model_type} trains with {' or '.join(cls.noise_schedulers)}, which its "
                             f"pipeline samples: drop --noise_scheduler {noise_scheduler}")
        scheduler = None
        if source is not None and source.has("scheduler"):
            scheduler = load_training_scheduler(source)
        # what the pretrained model predicts (`epsilon`, `sample`, `v_prediction`, `flow`): a teacher predicts it
        pretrained_target = None if scheduler is None else resolve_prediction_type(scheduler)
        if scheduler is None or noise_scheduler not in (None, scheduler_kind(scheduler)):
            scheduler = default_scheduler(latent, preset.get("scheduler") if preset else None,
                                          kind=noise_scheduler or cls.noise_schedulers[0], flow_shift=flow_shift)
        if scheduler_kind(scheduler) == "flow_match":
            if latent and not cls.latent_flow_matching:
                raise ValueError(f"flow matching is supported for pixel-space models only (unet, dit without a VAE); "
                                 f"this {cls.model_type} model's latent pipeline cannot sample it")
            if prediction_type not in (None, "flow"):
                raise ValueError("a flow-matching scheduler trains the velocity (noise - x0), which its sampler "
                                 f"steps with: drop prediction_type {prediction_type!r}")
            if flow_shift is not None and (flow_shift != scheduler.config.shift
                                           or scheduler.config.get("use_dynamic_shifting")):
                # A dynamic-shifting config (Flux's, Qwen-Image's) ignores `shift` in its training sigmas
                # (FlowMatchEulerDiscreteScheduler.__init__ applies it only without dynamic shifting), so
                # an explicit shift turns dynamic shifting off: the training sigmas are then shifted by it.
                scheduler = _copy_scheduler(scheduler, shift=flow_shift, use_dynamic_shifting=False)
            prediction_type = None  # FlowMatch schedulers have no prediction_type to set
        elif flow_shift is not None:
            raise ValueError("flow_shift is the shift of a flow-matching scheduler: add noise_scheduler='flow_match' "
                             "(--noise_scheduler flow_match)")
        if prediction_type is not None:
            # the model learns this target from now on (diffusers' scripts use register_to_config,
            # which a later from_config copy silently undoes; see _copy_scheduler)
            scheduler = _copy_scheduler(scheduler, prediction_type=prediction_type)
        if source is not None and source.is_local:
            pretrained_model_name_or_path = os.path.abspath(pretrained_model_name_or_path)
        adapter = cls(noise_scheduler=scheduler, pretrained_model_name_or_path=pretrained_model_name_or_path, **parts)
        adapter.pretrained_target = pretrained_target
        # the Hub revision the base came from: an output that names the base (a LoRA, a ControlNet) records it,
        # so the base it is loaded onto is the one it trained on, not the repo's newest commit
        adapter.pretrained_revision = revision if source is not None and not source.is_local else None
        if source is not None and source.has("scheduler"):
            adapter.sampling_scheduler = pretrained_sampling_scheduler(source, scheduler)
        if pretrained_vae_model_name_or_path is not None:  # a LoRA output names it beside its base (see `save`)
            vae_path = pretrained_vae_model_name_or_path
            adapter.pretrained_vae_model_name_or_path = os.path.abspath(vae_path) if os.path.isdir(vae_path) else vae_path
        return adapter

    @classmethod
    def _build(cls, source, preset, *, resolution, num_classes, num_channels, controlnet_model_name_or_path):
        """Return the constructor's keyword arguments (model, vae, ..., num_channels, sample_size)."""
        raise NotImplementedError

    @classmethod
    def from_pipeline(cls, pipeline, resolution=None):
        """An adapter around an already loaded pipeline of this type (its own modules, nothing loaded or
        copied), so that :meth:`sample` samples it as validation does (evaluation of a saved folder).

        ``resolution`` (pixels) sets the sampling size; default the denoiser's ``sample_size`` (latent
        pixels for a latent model), which Flux's and Qwen-Image's transformers do not record.
        """
        components = dict(pipeline.components)
        model = components[cls.pipeline_denoiser_name(pipeline)]
        vae = components.get("vae")
        if resolution is not None:
            sample_size = int(resolution) // cls.vae_scale_factor(vae)
        else:
            sample_size = model.config.get("sample_size")
            if sample_size is None:
                raise ValueError(f"a {type(pipeline).__name__}'s {type(model).__name__} records no sample size: "
                                 "pass the sampling resolution (resolution=, --resolution)")
        # Qwen-Image's VAE config names no in_channels: RGB
        num_channels = (vae.config.get("in_channels", 3) if vae is not None else model.config.get("in_channels"))
        adapter = cls(model, components["scheduler"], num_channels=num_channels, sample_size=sample_size,
                      **cls._pipeline_components(components))
        adapter.model_from_pretrained = True
        return adapter

    @classmethod
    def _pipeline_components(cls, components: dict) -> dict:
        """The constructor's keyword arguments from a pipeline's ``components`` (see :meth:`from_pipeline`)."""
        return {name: components.get(name) for name in ("vae", "text_encoder", "tokenizer")}

    @staticmethod
    def _load_vae(source, preset, num_channels, resolution):
        """The frozen VAE: the pretrained one, the preset's (random, from scratch), or ``None`` (pixel space)."""
        from diffusers import AutoencoderKL

        if source is not None and source.has("vae"):
            return source.load(source.component_class("vae", AutoencoderKL), subfolder="vae")
        if preset is not None and preset.get("vae"):
            channels = num_channels or 3
            return AutoencoderKL(in_channels=channels, out_channels=channels, sample_size=resolution or 16, **preset["vae"])
        return None

    @classmethod
    def _replacement_vae(cls, vae, path, revision=None, variant=None, cache_dir=None):
        """``--pretrained_vae_model_name_or_path``: the VAE at ``path`` (a folder with the VAE's
        config.json, or a Hub id), which must encode to the latents of the one it replaces."""
        from diffusers import AutoencoderKL

        if vae is None:
            raise ValueError(f"--pretrained_vae_model_name_or_path replaces a latent model's VAE: --model_type "
                             f"{cls.model_type} here has none, drop the flag")
        # as diffusers' SDXL scripts: the VAE's own folder / repo (no subfolder), with the run's revision and
        # variant; a local pipeline folder is taken too, through its vae/
        subfolder = "vae" if os.path.isdir(os.path.join(path, "vae")) else None
        try:
            replacement = AutoencoderKL.from_pretrained(path, subfolder=subfolder, revision=revision, variant=variant,
                                                        cache_dir=cache_dir)
        except (OSError, ValueError) as err:
            raise _not_found(path, err) from err
        if (replacement.config.latent_channels != vae.config.latent_channels
                or cls.vae_scale_factor(replacement) != cls.vae_scale_factor(vae)):
            raise ValueError(f"the VAE {path!r} ({replacement.config.latent_channels} latent channels) does not fit "
                             f"this model ({vae.config.latent_channels}): give the VAE of this model family")
        return replacement

    @staticmethod
    def _load_text_parts(source, preset):
        """The frozen tokenizer and text encoder (pretrained, or the tiny preset's)."""
        from transformers import CLIPTextModel, CLIPTokenizer

        from .presets import tiny_clip_tokenizer, tiny_text_encoder

        if source is not None and source.has("text_encoder"):
            tokenizer = source.load(source.component_class("tokenizer", CLIPTokenizer), subfolder="tokenizer")
            if len(tokenizer) <= 2:  # the offline-Hub trap: a tokenizer that knows no words
                raise ValueError(f"the tokenizer of {source.path!r} has {len(tokenizer)} tokens: the folder is incomplete")
            text_encoder = source.load(source.component_class("text_encoder", CLIPTextModel), subfolder="text_encoder")
            return tokenizer, text_encoder
        if preset is None or not preset.get("text_encoder"):
            raise ValueError("a text encoder is needed: give a pretrained pipeline folder or the 'tiny' preset")
        tokenizer = tiny_clip_tokenizer()
        return tokenizer, tiny_text_encoder(tokenizer, preset["text_encoder"])

    @staticmethod
    def vae_scale_factor(vae) -> int:
        """Pixels per latent pixel: 2 ** (number of VAE blocks - 1), as diffusers' pipelines compute it."""
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1

    # ------------------------------------------------------------------ properties

    @property
    def latent(self) -> bool:
        return self.vae is not None

    @property
    def in_channels(self) -> int:
        return self.model.config.in_channels

    def frozen_modules(self) -> dict:
        """The frozen parts by name (vae, text_encoder, unet), skipping absent ones."""
        parts = {"vae": self.vae, "text_encoder": self.text_encoder, "unet": self.unet}
        return {name: module for name, module in parts.items() if module is not None}

    def to(self, device, dtype=None):
        """Move the frozen parts to ``device`` (and ``dtype``, e.g. fp16 under mixed precision, as
        diffusers' scripts do) and the trained model to ``device`` (its dtype stays: Accelerate autocasts).
        Trainable parameters inside a frozen part (a text encoder's LoRA) stay float32."""
        for module in self.frozen_modules().values():
            module.to(device=device, dtype=dtype)
        for module in self.extra_trainable_modules().values():
            for param in module.parameters():
                if param.requires_grad and param.dtype != torch.float32:
                    param.data = param.data.float()
        self.model.to(device)
        return self

    # ------------------------------------------------------------------ training step

    def encode_batch(self, batch: dict, generator=None, chunk_size=None, training: bool = False):
        """Turn a data batch into ``(x0, conditioning)``.

        ``x0`` is what gets noised: the pixels in [-1, 1], or their VAE latents scaled by
        ``vae.config.scaling_factor`` (Rombach et al. 2022, Sec. 3) for latent models, float32.
        ``conditioning`` is a dict of keyword tensors for :meth:`predict`.

        ``generator`` draws every random number (the VAE's latent sample, a DiT's label dropout),
        so that a resumed run draws what an uninterrupted one would have: nothing here touches the
        global RNG. ``chunk_size`` bounds how many images the VAE encodes at once (the micro-batch
        size of a gradient-accumulation window); the latents of the whole batch are then sampled in
        one draw. ``training`` turns on training-only randomness (label dropout).
        """
        if "latent_moments" in batch:  # --cache_latents: the VAE posterior was computed once, before training
            pixels = self.latents_from_moments(batch["latent_moments"], generator=generator)
        else:
            pixels = self.encode_pixels(batch["pixel_values"], generator=generator, chunk_size=chunk_size)
        return pixels, self.conditioning(batch, generator=generator, training=training)

    @torch.no_grad()
    def encode_pixels(self, pixel_values: torch.Tensor, generator=None, chunk_size=None) -> torch.Tensor:
        """Pixels in [-1, 1] -> the model's input space (identity in pixel space).

        Latents are ``mean + std * noise`` of the VAE's posterior (``latent_dist.sample()``), with the
        noise drawn from ``generator`` (on its device) for the whole batch at once. The two halves are
        :meth:`encode_moments` (the VAE encoder, what ``--cache_latents`` caches) and
        :meth:`latents_from_moments` (the draw, every step): a type that encodes its own way overrides both."""
        if self.vae is None:
            return pixel_values.float()
        return self.latents_from_moments(self.encode_moments(pixel_values, chunk_size=chunk_size), generator=generator)

    @torch.no_grad()
    def encode_moments(self, pixel_values: torch.Tensor, chunk_size=None) -> torch.Tensor:
        """The VAE posterior's parameters (mean and log-variance stacked on the channel axis, diffusers'
        ``DiagonalGaussianDistribution.parameters``), in the VAE's dtype: deterministic, so cacheable
        (diffusers' SD3 / Flux DreamBooth scripts cache ``latent_dist`` the same way)."""
        pixels = pixel_values.to(self.vae.device, self.vae.dtype)
        pieces = [pixels] if chunk_size is None else torch.split(pixels, chunk_size)
        return torch.cat([self.vae.encode(piece).latent_dist.parameters for piece in pieces])

    @torch.no_grad()
    def latents_from_moments(self, moments: torch.Tensor, generator=None) -> torch.Tensor:
        """A latent sample ``mean + std * noise`` of the posterior ``moments`` (:meth:`encode_moments`),
        shifted and scaled as the VAE's config says; float32."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        dist = DiagonalGaussianDistribution(moments.to(self.vae.device))
        mean, std = dist.mean.float(), dist.std.float()
        draw_device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=draw_device, dtype=torch.float32).to(mean.device)
        latents = mean + std * noise
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
        # Always the default (NCHW) layout: the VAE's CPU convolutions hand back channels-last moments for a
        # batch of several images (contiguous ones for one image), cached moments are collated NCHW, and the
        # denoiser's convolutions pick another kernel, with other float32 rounding, for each layout. Equal
        # values in one layout make a --cache_latents run take bit for bit the steps of an uncached one.
        return (latents * self.vae.config.scaling_factor).contiguous()

    def data_options(self) -> dict:
        """Keyword arguments of ``diffusers_ant.data.make_train_dataloader`` that this model type needs:
        its tokenizer (a dict of them for several text encoders) and whatever else its batches must carry
        (SDXL: each image's original size and crop, ``crop_coords=True``)."""
        return {"tokenizer": self.tokenizer}

    def conditioning(self, batch: dict, generator=None, training: bool = False) -> dict:
        """The type's conditioning inputs from the batch (class labels, text embeddings, control image).

        Text-conditioned types take their text part from :meth:`text_conditioning`, so that cached
        embeddings (``--cache_text_embeddings``) replace the text encoders without another change."""
        return {}

    # ------------------------------------------------------------------ caching (training.caching)

    # The entries of a cached batch that hold text conditioning: ``cached_text/<key>``.
    CACHED_TEXT_PREFIX = "cached_text/"
    # ``(mask key, length)`` where :meth:`encode_text` zero-pads each caption to ``length`` tokens (mask 0) only
    # so that captions batch together: the text cache keeps each caption's own tokens and pads them back when a
    # row is read (``training.caching.TrainingCache``). None: entries are cached whole.
    padded_text = None

    def text_conditioning(self, batch: dict) -> dict:
        """The conditioning entries that the captions alone decide: the cached ones the batch carries
        (``cached_text/<key>``, see ``training.caching``), else :meth:`encode_text` of the batch."""
        prefix = self.CACHED_TEXT_PREFIX
        cached = {key[len(prefix):]: value for key, value in batch.items() if key.startswith(prefix)}
        return cached if cached else self.encode_text(batch)

    def encode_text(self, batch: dict) -> dict:
        """The text encoders' outputs for the batch's captions (``input_ids`` or ``captions``), as a dict
        of tensors batched on dim 0 (float32). Types with text encoders implement it; it is what
        ``--cache_text_embeddings`` stores, one entry per distinct caption."""
        raise NotImplementedError

    @property
    def supports_text_caching(self) -> bool:
        """Whether this type implements :meth:`encode_text` (``--cache_text_embeddings`` needs it)."""
        return type(self).encode_text is not ModelAdapter.encode_text

    @property
    def supports_latent_caching(self) -> bool:
        """Whether ``--cache_latents`` can cache this type's VAE encoding: a latent model whose pixel
        encoding is :meth:`encode_moments` then :meth:`latents_from_moments` (the base's, or overridden together)."""
        cls = type(self)
        return self.vae is not None and (cls.encode_pixels is ModelAdapter.encode_pixels
                                         or cls.latents_from_moments is not ModelAdapter.latents_from_moments)

    TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def free_text_encoders(self) -> dict:
        """Drop the text encoders (``text_encoder``, ``_2``, ``_3``: set to None) once their outputs are
        cached; returns the dropped modules by name (the caller lets them go, or stashes their weights)."""
        freed = {}
        for name in self.TEXT_ENCODER_NAMES:
            module = getattr(self, name, None)
            if module is not None:
                freed[name] = module
                setattr(self, name, None)
        return freed

    VAE_ENCODER_PARTS = ("encoder", "quant_conv")

    def free_vae_encoder(self) -> dict:
        """Drop the VAE's encoder half (``encoder`` and ``quant_conv``) once the latents are cached; the
        decoder stays for validation. Returns the dropped modules by name."""
        freed = {}
        for name in self.VAE_ENCODER_PARTS:
            module = getattr(self.vae, name, None)
            if module is not None:
                freed[name] = module
                setattr(self.vae, name, None)
        return freed

    def validation_prompt_kwargs(self, pipeline, prompts, guidance_scale=None) -> dict:
        """The pipeline's keyword arguments that replace ``prompt=prompts`` (``prompt_embeds`` ...):
        validation prompts are encoded with them before ``--cache_text_embeddings`` frees the text
        encoders, and :meth:`sample` takes the dict as ``prompts``. Text-conditioned types implement it."""
        raise NotImplementedError(f"--model_type {self.model_type} cannot sample from encoded prompts: "
                                  "drop --cache_text_embeddings")

    @property
    def pixel_multiple(self) -> int:
        """What image sides must be a multiple of (aspect-ratio buckets): the VAE factor times the
        denoiser's patch size. Types that pack latents (Flux's 2 x 2) override it."""
        patch = getattr(getattr(self.model, "config", None), "patch_size", None) or 1
        return self.vae_scale_factor(self.vae) * int(patch)

    def set_data_classes(self, class_names=None, class_map=None) -> None:
        """Tell the adapter the data set's class names (class-id order) and the user's ``--class_map``
        (data-set class -> label row of the pretrained model). Only ``dit`` keeps a pretrained label
        table to map into; the other types take no class map."""
        if class_map is not None:
            raise ValueError(f"--class_map maps data-set classes to a pretrained DiT's label rows: "
                             f"--model_type {self.model_type} has none, drop --class_map")

    def null_condition_batch(self, batch: dict) -> dict:
        """The batch with its condition replaced by the unconditional one (DiT's null class, the empty
        prompt), for samples that train the unconditional branch (Diff-Tuning's knowledge bank). Model
        types without an unconditional branch (a class-conditional UNet2DModel) keep the batch."""
        return batch

    def predict(self, model, x_t, timesteps, conditioning: dict) -> torch.Tensor:
        """The denoiser's output for ``x_t`` at ``timesteps``; ``model`` may be Accelerate-wrapped."""
        raise NotImplementedError

    def trainable_parameters(self) -> list:
        """What the optimizer updates: the trained model's trainable parameters, then those of modules
        trained beside it (`extra_trainable_modules`, e.g. a text encoder's LoRA)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        for module in self.extra_trainable_modules().values():
            params += [p for p in module.parameters() if p.requires_grad]
        return params

    def extra_trainable_modules(self) -> dict:
        """Modules outside ``model`` that hold trainable parameters, by name (none by default; ``sd`` with
        a text-encoder LoRA). The trainer checkpoints them with its own state and averages their
        gradients over processes itself (DDP wraps ``model`` only)."""
        return {}

    def extra_trainable_state(self) -> dict:
        """The trainable tensors of `extra_trainable_modules`, by module and parameter name (for checkpoints)."""
        return {name: {key: p.detach() for key, p in module.named_parameters() if p.requires_grad}
                for name, module in self.extra_trainable_modules().items()}

    def load_extra_trainable_state(self, state: dict) -> None:
        """Inverse of `extra_trainable_state`; a mismatch is a one-line error."""
        modules = self.extra_trainable_modules()
        if set(state or {}) != set(modules):
            raise ValueError(f"the checkpoint trained {sorted(state or {})} beside the model, this run trains "
                             f"{sorted(modules)}: resume with the flags of the run that wrote it")
        for name, module in modules.items():
            params = {key: p for key, p in module.named_parameters() if p.requires_grad}
            if set(params) != set(state[name]):
                raise ValueError(f"the checkpoint's {name} parameters do not fit this run (another --rank?)")
            with torch.no_grad():
                for key, param in params.items():
                    param.copy_(state[name][key].to(param.device, param.dtype))

    # The denoiser's last layers (module names), and where its last block of layers is: for
    # `--task_gradients last_layers`.
    output_module_names = ("conv_out",)
    last_block_name = "up_blocks"

    def output_parameters(self) -> list:
        """Trainable parameters of the output-side layers, for per-task gradients from one forward.

        The output layers themselves (``conv_out`` of a UNet, ``proj_out`` of a DiT, the zero
        convolutions of a ControlNet) when they train; under LoRA, where they are frozen, the trainable
        (LoRA) parameters of the last block. Neither holds a normalisation layer whose input gradient
        would not be needed, so the task backward passes may stop there (see `TaskGradientEngine`)."""
        modules = dict(self.model.named_modules())
        chosen = [p for name in self.output_module_names if name in modules
                  for p in modules[name].parameters() if p.requires_grad]
        if not chosen:
            blocks = getattr(self.model, self.last_block_name, None)
            if blocks is not None and len(blocks):
                chosen = [p for p in blocks[-1].parameters() if p.requires_grad]
        if not chosen:
            raise ValueError(f"{type(self.model).__name__} has no trainable output-side layer for --task_gradients "
                             "last_layers: use --task_gradients split or name layers with --task_gradient_subset")
        return chosen

    def enable_gradient_checkpointing(self):
        """Trade compute for memory in the trained module (diffusers' ``enable_gradient_checkpointing``)."""
        self.model.enable_gradient_checkpointing()

    # ------------------------------------------------------------------ LoRA

    @property
    def lora_target_modules(self) -> list:
        """The default LoRA targets of this model: the type's module-name suffixes that the model has."""
        names = [name for name, _ in self.model.named_modules()]
        return [t for t in self.default_lora_targets if any(n == t or n.endswith("." + t) for n in names)]

    def add_lora(self, rank: int, alpha=None, target_modules=None, dropout: float = 0.0):
        """Add a peft LoRA adapter to ``self.model``; afterwards only LoRA weights are trainable.

        ``alpha`` defaults to ``rank`` (scale 1). B starts at zero, so the model's output is unchanged
        until the first update; A starts Gaussian (peft's ``init_lora_weights="gaussian"``, as diffusers' scripts).
        """
        from peft import LoraConfig

        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        targets = list(target_modules) if target_modules else self.lora_target_modules
        if not targets:
            raise ValueError(f"no LoRA target modules found in {type(self.model).__name__}: pass target_modules")
        self.lora_config = LoraConfig(
            r=rank,
            lora_alpha=alpha if alpha is not None else rank,
            lora_dropout=dropout,
            init_lora_weights="gaussian",
            target_modules=targets,
        )
        attach_lora(self.model, self.lora_config)
        return self.lora_config

    @classmethod
    def load_lora(cls, pipeline, folder: str):
        """Load LoRA weights saved by :meth:`save` (``lora=True``) into ``pipeline``'s denoiser, in place."""
        load_peft_lora(getattr(pipeline, cls.pipeline_denoiser_name(pipeline)), folder)
        return pipeline

    @staticmethod
    def pipeline_denoiser_name(pipeline) -> str:
        return "transformer" if hasattr(pipeline, "transformer") else "unet"

    # ------------------------------------------------------------------ pipelines

    def make_pipeline(self, model=None, scheduler=None):
        """A diffusers pipeline around ``model`` (default ``self.model``) and a copy of ``scheduler``
        (default the training scheduler), for validation sampling and saving."""
        raise NotImplementedError

    def sample(
        self,
        pipeline,
        num_images: int,
        generator=None,
        num_inference_steps: int = 50,
        prompts=None,
        class_labels=None,
        conditioning_images=None,
        guidance_scale=None,
        scheduler=None,
    ) -> list:
        """Sample ``num_images`` PIL images from ``pipeline`` (validation).

        ``scheduler`` replaces the pipeline's for this call only: a scheduler instance, or a name
        (``"ddim"``, ``"ddpm"`` or any diffusers scheduler class name) built from the pipeline's
        scheduler config by :func:`scheduler_by_name`, e.g. ``scheduler="ddim"`` for few-step
        validation (for a flow-matching model, its Euler sampler). Each type takes what it needs: ``prompts`` (sd, controlnet;
        repeated to ``num_images``), ``class_labels`` (unet, dit; default: cycle through the classes),
        ``conditioning_images`` (controlnet, one per image), ``guidance_scale`` (pipeline default when None).
        """
        pipeline.set_progress_bar_config(disable=True)
        if isinstance(scheduler, str):
            scheduler = scheduler_by_name(scheduler, pipeline.scheduler)
        with _swapped_scheduler(pipeline, scheduler):
            return self._sample(
                pipeline,
                num_images,
                generator,
                num_inference_steps,
                prompts=prompts,
                class_labels=class_labels,
                conditioning_images=conditioning_images,
                guidance_scale=guidance_scale,
            )

    def _sample(self, pipeline, num_images, generator, num_inference_steps, **kwargs):
        raise NotImplementedError

    # ------------------------------------------------------------------ saving

    def save(self, output_dir: str, model=None, lora: bool = False):
        """Write the training result to ``output_dir``.

        ``lora=False``: the whole pipeline folder in safetensors (``save_pretrained``); LoRA layers, if
        any, are merged into the weights first. Load it with :func:`diffusers_ant.models.load_pipeline`
        or ``DiffusionPipeline.from_pretrained`` (see pipelines.py for the two custom classes).
        (ControlNet saves the ControlNet alone, the diffusers way: see controlnet.py.)

        ``lora=True``: the LoRA weights only (see :meth:`_save_lora_weights`), ``ant_lora.json`` naming
        the model type and the base pipeline (a Hub id, or its path relative to ``output_dir``: the
        folder may be published), and, when the trained module did not come from a pretrained folder
        (training from scratch), that base pipeline in ``output_dir/base_model``.

        Records of another kind of output left in ``output_dir`` by an earlier run are removed first
        (`remove_output_records`): `load_pipeline` reads them before ``model_index.json``.
        """
        from ..hub import portable_path

        model = model if model is not None else self.model  # pass the unwrapped (or EMA) module
        os.makedirs(output_dir, exist_ok=True)
        remove_output_records(output_dir)
        if not lora:
            if has_lora(model):
                model = base_copy(model, merge=True)
            # the pretrained pipeline's own sampler (None: the training scheduler, as from a preset)
            self.make_pipeline(model, scheduler=self.sampling_scheduler).save_pretrained(output_dir, safe_serialization=True)
            return
        if self.lora_config is None:
            raise ValueError("lora=True but no LoRA adapter was added: call add_lora(rank) first")
        self._save_lora_weights(output_dir, model)
        revision = None
        if self.model_from_pretrained:
            # the folder may be pushed: a Hub id, or the base's path relative to the output folder
            base = portable_path(self.pretrained_model_name_or_path, output_dir)
            revision = self.pretrained_revision
        else:
            self._save_base_copy(os.path.join(output_dir, BASE_MODEL_DIR), self._untrained_base(model))
            base = BASE_MODEL_DIR
        info = {
            "model_type": self.model_type,
            "base_model": base,
            **({"revision": revision} if revision else {}),
            "rank": self.lora_config.r,
            "lora_alpha": self.lora_config.lora_alpha,
            "target_modules": sorted(self.lora_config.target_modules),
            **self._lora_info_extra(),
        }
        if self.pretrained_vae_model_name_or_path is not None:
            # the VAE trained with (the fp16-fixed SDXL VAE): loaded in place of the base's by load_pipeline
            info["vae"] = portable_path(self.pretrained_vae_model_name_or_path, output_dir)
        with open(os.path.join(output_dir, LORA_INFO_NAME), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)

    def _save_lora_weights(self, output_dir, model):
        """peft-format LoRA weights (``pytorch_lora_weights.safetensors`` + ``adapter_config.json``)."""
        save_peft_lora(output_dir, model, self.lora_config)

    def _untrained_base(self, model):
        """The module a LoRA output's ``base_model/`` holds: ``model`` without its LoRA layers."""
        return base_copy(model, merge=False)

    def _save_base_copy(self, folder, base_model):
        """Write a LoRA output's ``base_model/``: the pipeline around the untrained module."""
        self.make_pipeline(base_model).save_pretrained(folder, safe_serialization=True)

    def _lora_info_extra(self) -> dict:
        """More entries for ``ant_lora.json`` (what else the LoRA output holds)."""
        return {}


# Names that, asked for a flow-matching model, mean its deterministic sampler: Euler steps of the
# learned velocity, the flow-matching counterpart of DDIM (eta = 0).
_FLOW_SAMPLER_ALIASES = ("ddim", "ddpm", "euler", "flow_match")


def scheduler_by_name(name: str, like):
    """A diffusers scheduler named ``name`` with ``like``'s config, for sampling the model ``like`` trained.

    For a DDPM-family ``like``: ``"ddim"`` (DDIMScheduler), ``"ddpm"`` (DDPMScheduler) or any
    diffusers scheduler class name. For a flow-matching ``like`` (``FlowMatchEulerDiscreteScheduler``
    ...): ``"ddim"``, ``"ddpm"``, ``"euler"`` and ``"flow_match"`` all give
    ``FlowMatchEulerDiscreteScheduler``, Euler steps of the predicted velocity with the same shift
    (DDIM or DDPM built from a flow config would assume linear betas and an epsilon prediction and
    sample noise); flow-matching class names (``FlowMatchHeunDiscreteScheduler``) are taken as they
    are. A class of the other family than ``like``'s is a ``ValueError``.
    """
    import diffusers

    flow = scheduler_kind(like) == "flow_match"
    if flow and name.lower() in _FLOW_SAMPLER_ALIASES:
        class_name = "FlowMatchEulerDiscreteScheduler"
    else:
        class_name = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler"}.get(name.lower(), name)
    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "from_config") or not class_name.endswith("Scheduler"):
        raise ValueError(f"unknown scheduler {name!r}: use 'ddim', 'ddpm' or a diffusers scheduler class name")
    if ("FlowMatch" in class_name) != flow:
        trained = "a flow-matching" if flow else "a DDPM-family"
        fix = "'ddim' (its Euler sampler) or a FlowMatch scheduler" if flow else "'ddim', 'ddpm' or a DDPM-family scheduler"
        raise ValueError(f"{class_name} cannot sample a model trained with {trained} scheduler "
                         f"({type(like).__name__}): use {fix}")
    config = {k: v for k, v in like.config.items() if k != "_use_default_values"}
    return cls.from_config(config)


@contextmanager
def _swapped_scheduler(pipeline, scheduler):
    if scheduler is None:
        yield
        return
    original = pipeline.scheduler
    pipeline.scheduler = scheduler
    try:
        yield
    finally:
        pipeline.scheduler = original


def check_class_labels(labels: torch.Tensor, num_classes: int, what: str):
    """Class labels must index the model's class embedding."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"class label {int(labels.max())} out of range for {what} with {num_classes} classes: "
            "load the model with num_classes set to the dataset's class count"
        )


def batch_rows(batch: dict) -> int:
    """Rows of a data batch: its pixels, or its cached latents (``--cache_latents``)."""
    values = batch["pixel_values"] if "pixel_values" in batch else batch["latent_moments"]
    return values.shape[0]


def remove_output_records(output_dir: str) -> None:
    """Remove the records an earlier run left in ``output_dir`` that `load_pipeline` reads and attaches: a
    LoRA, ControlNet or class-map record (read before ``model_index.json``), DeMe's channel projections and
    ensemble record, and a ControlNet LoRA's conditioning embedding. A full fine-tune saved where a LoRA run
    had saved was otherwise loaded as the old LoRA on its base, and old projections sat on new weights. Each
    save (and `deme.projection.save_adapter_output` after it) writes again those that apply to it."""
    from ..deme.ensemble import ENSEMBLE_CONFIG_NAME  # (imported here: deme imports this module)
    from ..deme.projection import PROJECTION_CONFIG_NAME, PROJECTION_WEIGHTS_NAME
    from .controlnet import COND_EMBEDDING_WEIGHTS_NAME

    for name in (LORA_INFO_NAME, CONTROLNET_INFO_NAME, CLASS_MAP_NAME, PROJECTION_CONFIG_NAME, PROJECTION_WEIGHTS_NAME,
                 ENSEMBLE_CONFIG_NAME, COND_EMBEDDING_WEIGHTS_NAME):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            os.remove(path)


def packed_sample_size(resolution: int, vae_scale: int, family: str) -> int:
    """The latent side of a ``resolution``-pixel image for a family whose transformer packs its latents in
    2x2 patches (Flux, Qwen-Image): the resolution must be a multiple of twice the VAE factor."""
    if resolution % (2 * vae_scale):
        raise ValueError(f"--resolution {resolution} must be a multiple of {2 * vae_scale} for {family} "
                         f"(VAE factor {vae_scale} times the 2x2 packing)")
    return resolution // vae_scale


def prompt_arguments(prompts, n: int) -> dict:
    """The pipeline's prompt arguments for ``n`` images: ``prompt`` (a list cycled to ``n``), or the
    encoded prompts (a dict from :meth:`ModelAdapter.validation_prompt_kwargs`, already ``n`` rows)."""
    if isinstance(prompts, dict):
        return dict(prompts)
    return {"prompt": repeat_to(prompts if prompts is not None else "", n)}


def repeat_to(values, n: int) -> list:
    """``values`` (a list or one item) cycled to length ``n``."""
    if not isinstance(values, (list, tuple)):
        values = [values]
    return [values[i % len(values)] for i in range(n)]
