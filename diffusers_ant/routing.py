"""`TimestepRouter`: one denoiser made of several, each serving the timesteps of one interval.

ANT (Go et al., NeurIPS 2023) measures negative transfer by swapping in a model trained only on an
interval [t1, t2] for the steps in that interval (the negative transfer gap, PAPERS.md); DeMe
(CVPR 2025) keeps one fine-tuned model per interval before merging them (its ensemble upper bound);
Diff-Tuning's chain of forgetting hands the last, low-noise steps of the reverse process to the
pretrained model. All three are "call `models[i]` when the timestep lies in interval i", which is
this module.

    from diffusers import DDIMPipeline
    router = TimestepRouter(intervals, [model_high_noise_aware, model_b, model_c])
    pipe = DDIMPipeline(unet=router, scheduler=scheduler)   # a drop-in replacement for the UNet
    images = pipe(batch_size=16, num_inference_steps=50).images

Routing needs the *training index* of each timestep (0 .. T-1), which is what `intervals.assign`
takes. DDPM-family pipelines pass integer training timesteps, so by default the router rounds and
clamps. Flow-matching pipelines pass `sigma * 1000` floats (FLUX.1 and Qwen-Image the sigma itself):
pass the training scheduler as `timestep_map` (or the models' schedulers as `schedulers=`) and each value
is mapped to the training index with the nearest model timestep (`diffusers_ant.schedule.model_timesteps`).
Any callable `tensor -> LongTensor` works too.

Models routed together must share the noise schedule they were trained with: a model trained with
another beta schedule, shift, prediction type or number of timesteps reads x_t and t differently,
and the mixed samples are garbage without any error. Pass each model's training scheduler as
`schedulers=` and the router refuses a mismatch (`check_same_schedule`), in one line naming both
values; `analyze.py ntg` and `forgetting` always do.
"""

import torch
from torch import nn

__all__ = ["TimestepRouter", "check_interchangeable", "check_same_schedule", "nearest_timestep_map", "schedule_signature"]


def nearest_timestep_map(model_timesteps):
    """A `timestep_map` sending each value to the index of the nearest entry of `model_timesteps`.

    `model_timesteps[i]` is the timestep value the denoiser receives for training index i (for
    flow matching `sigma_i * num_train_timesteps`; for DDPM schedulers `i` itself).
    """
    table = torch.as_tensor(model_timesteps, dtype=torch.float64).flatten()
    if table.numel() == 0:
        raise ValueError("model_timesteps is empty")

    def timestep_map(t):
        values = t.detach().to("cpu", torch.float64).flatten()
        return (values[:, None] - table[None, :]).abs().argmin(dim=1).to(t.device)

    return timestep_map


def schedule_signature(scheduler) -> dict:
    """What two models must share to be interchangeable denoisers: the family (`ddpm` or `flow`), the
    number of training timesteps, the prediction type, and the noise curve (`alphas_cumprod` for the
    DDPM family, the training sigmas for flow matching, float64 [T])."""
    from .schedule import is_flow_matching, num_train_timesteps, resolve_prediction_type, schedule_snr

    flow = is_flow_matching(scheduler)
    if flow:
        # sigma from SNR = ((1 - sigma) / sigma)^2, i.e. the scheduler's own training sigmas
        curve, curve_name = 1.0 / (1.0 + schedule_snr(scheduler).sqrt()), "sigmas"
    else:
        curve, curve_name = scheduler.alphas_cumprod.detach().to("cpu", torch.float64), "alphas_cumprod"
    return {"family": "flow" if flow else "ddpm", "num_train_timesteps": num_train_timesteps(scheduler),
            "prediction_type": resolve_prediction_type(scheduler), "curve_name": curve_name, "curve": curve}


def check_same_schedule(schedulers, names=None, rtol=1e-5, atol=1e-7) -> None:
    """Raise a one-line `ValueError` naming both values unless every scheduler (None entries are
    skipped) has the same family, number of training timesteps, prediction type and noise curve
    (`schedule_signature`; curves equal to `rtol` / `atol`). `names` label the schedulers' models."""
    entries = [(names[i] if names is not None else f"model {i}", sched) for i, sched in enumerate(schedulers)
               if sched is not None]
    if len(entries) < 2:
        return
    first_name, first = entries[0][0], schedule_signature(entries[0][1])
    for name, scheduler in entries[1:]:
        other = schedule_signature(scheduler)
        for key in ("family", "num_train_timesteps", "prediction_type"):
            if first[key] != other[key]:
                raise ValueError(
                    f"the models' noise schedules differ: {first_name} has {key} {first[key]!r}, {name} has "
                    f"{other[key]!r}; only models trained with the same scheduler can share a sampling loop"
                )
        a, b = first["curve"], other["curve"]
        if not torch.allclose(a, b, rtol=rtol, atol=atol):
            t = int((a - b).abs().argmax())
            raise ValueError(
                f"the models' noise schedules differ: {first['curve_name']}[{t}] is {float(a[t]):.6g} for {first_name} "
                f"and {float(b[t]):.6g} for {name} (another beta schedule or shift); only models trained with the "
                "same scheduler can share a sampling loop"
            )


def check_interchangeable(models, names) -> None:
    """A one-line `ValueError` unless the denoisers can stand in for each other inside one sampling loop (a router
    calls each with the same inputs): the same class, channels and kind of class conditioning (a UNet2DModel with
    a class table against one without ended in diffusers' "class_labels should be provided")."""
    def signature(model):
        if isinstance(model, TimestepRouter):  # a DeMe ensemble loaded as the denoiser: its members' architecture
            model = model.models[0]
        config = model.config
        return {"class": type(model).__name__, "in_channels": config.get("in_channels"),
                "out_channels": config.get("out_channels"),
                "class-conditional": config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None}

    first = signature(models[0])
    for model, name in zip(models[1:], names[1:]):
        other = signature(model)
        for key, value in first.items():
            if other[key] != value:
                raise ValueError(f"{names[0]} and {name} cannot share a sampling loop: {key} {value!r} against "
                                 f"{other[key]!r}; compare models of one architecture and conditioning")


def _scheduler_timestep_map(scheduler, num_timesteps, sigma_input: bool = False):
    """Nearest training index by the scheduler's model timestep; ``sigma_input``: the denoiser is called with
    ``timestep / num_train_timesteps`` (Flux, Qwen-Image: `models.families.denoiser_takes_sigma`)."""
    from .schedule import model_timesteps

    train_steps = scheduler.config.num_train_timesteps
    if train_steps != num_timesteps:
        raise ValueError(
            f"the scheduler has {train_steps} training timesteps but the intervals cover {num_timesteps}; "
            "pass the training scheduler the intervals were made for"
        )
    table = model_timesteps(scheduler, torch.arange(num_timesteps))
    return nearest_timestep_map(table.double() / train_steps if sigma_input else table)


def denoiser_timestep_map(scheduler, num_timesteps, model, training_scheduler=None):
    """The `timestep_map` of a router / LoRA ensemble over ``model`` sampled by ``scheduler``'s pipeline: None
    for DDPM-family schedulers (training indices), else the nearest index by the timestep ``model`` receives
    (``sigma * 1000``, or the sigma itself for Flux and Qwen-Image, whose pipelines divide by 1000) in the
    table of ``training_scheduler`` (default: ``scheduler``'s own).

    A FLUX.1 pipeline's dynamic-shift scheduler holds the unshifted table, while the run trained (and its
    intervals index) the table shifted for its training resolution (`models.flux.routing_scheduler`): its
    training scheduler must be given, or a sigma would be routed to another interval's model."""
    from .models.families import denoiser_takes_sigma
    from .schedule import is_flow_matching

    if not is_flow_matching(scheduler):
        return None
    if training_scheduler is None:
        flux = any(cls.__name__ == "FluxTransformer2DModel" for cls in type(model).__mro__)
        if flux and scheduler.config.get("use_dynamic_shifting", False):
            raise ValueError("a FLUX.1 model trains on the sigmas its dynamic shift gives at its training resolution, "
                             "which the pipeline's scheduler does not record: pass the training scheduler "
                             "(models.flux.routing_scheduler(pipeline, resolution, flow_shift)), from the run's "
                             "training_config.json")
        training_scheduler = scheduler
    return _scheduler_timestep_map(training_scheduler, num_timesteps, sigma_input=denoiser_takes_sigma(model))


def _take(value, index, batch_size):
    """The rows `index` of every per-sample tensor in `value` (tensors whose first dim is the batch)."""
    if isinstance(value, torch.Tensor):
        return value[index] if value.ndim >= 1 and value.shape[0] == batch_size else value
    if isinstance(value, dict):
        return type(value)((k, _take(v, index, batch_size)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_take(v, index, batch_size) for v in value)
    return value


def _merge(parts, batch_size):
    """Reassemble per-group outputs [(index, output), ...] into one output of the same type."""
    first = parts[0][1]
    if isinstance(first, torch.Tensor):
        merged = first.new_empty((batch_size, *first.shape[1:]))
        for index, out in parts:
            merged[index] = out
        return merged
    if isinstance(first, dict):  # also diffusers' BaseOutput dataclasses (UNet2DOutput, ...)
        return type(first)(**{key: _merge([(i, out[key]) for i, out in parts], batch_size) for key in first.keys()})
    if isinstance(first, (list, tuple)):
        return type(first)(_merge([(i, out[n]) for i, out in parts], batch_size) for n in range(len(first)))
    return first


class TimestepRouter(nn.Module):
    """Calls `models[i]` for the timesteps of interval i; a drop-in denoiser for diffusers pipelines.

    Args:
        intervals: a `diffusers_ant.TimestepIntervals` (or any object with `.bounds`, inclusive
            training-index pairs, and `.assign(indices) -> cluster ids`), or a list of `(start, end)`.
        models: one denoiser per interval, called as the router is called (`model(sample, timestep, ...)`,
            or with `hidden_states=` / `sample=` and `timestep=` by keyword, as the SD3, FLUX.1 and Qwen-Image
            pipelines call their transformer).
            The same model may appear several times (e.g. the pretrained model on all but one interval).
        timestep_map: how a timestep passed by the caller becomes a training index for routing.
            None (default): round and clamp to 0 .. T-1 (DDPM, DDIM, PNDM, ... pass integer training
            timesteps). A diffusers training scheduler: nearest training index by model timestep (use
            this for flow matching, whose pipelines pass `sigma * 1000`). Or a callable
            `Tensor -> LongTensor`. The models always receive the caller's timestep unchanged.
        schedulers: optionally, each model's training scheduler (None for unknown): the router then
            refuses models trained with different noise schedules (`check_same_schedule`), and a
            scheduler given as `timestep_map` is compared too.
        names: optionally, the models' labels for that error (e.g. their folders).

    Calls: a scalar timestep (what pipelines pass) or a batch whose timesteps share one interval goes to
    that interval's model in one call, with all arguments untouched, and its output is returned as is.
    Per-sample timesteps from several intervals (training batches) split the batch: each group's rows
    of `sample`, of the timesteps and of every per-sample tensor argument (first dimension equal to
    the batch size, also inside dicts / tuples, e.g. `encoder_hidden_states`, `added_cond_kwargs`) go
    to its model, and the outputs are put back in order, in the models' output type
    (`UNet2DOutput`, `Transformer2DModelOutput`, a tuple for `return_dict=False`, a tensor).
    Splitting is exact for models whose normalisation is per sample (GroupNorm, LayerNorm: every
    diffusers denoiser), not for BatchNorm models in training mode.

    Attributes pipelines read (`config`, `dtype`, `device`, `in_channels`, `sample_size`, ...) come
    from the first model; methods the router lacks (e.g. `enable_gradient_checkpointing`,
    `set_attn_processor`) are called on every distinct model, returning the first model's result.
    `save_pretrained` is such a method: save the models one by one instead.
    """

    def __init__(self, intervals, models, timestep_map=None, schedulers=None, names=None):
        super().__init__()
        if not hasattr(intervals, "assign"):
            from .clustering import TimestepIntervals

            intervals = TimestepIntervals(intervals)
        models = list(models)
        if len(models) != len(intervals.bounds):
            raise ValueError(f"got {len(models)} models for {len(intervals.bounds)} intervals; pass one model per interval")
        if not all(isinstance(m, nn.Module) for m in models):
            raise ValueError("every model must be a torch.nn.Module")
        self._check_compatible(models)
        if schedulers is not None:
            schedulers = list(schedulers)
            if len(schedulers) != len(models):
                raise ValueError(f"got {len(schedulers)} schedulers for {len(models)} models; pass one per model (None if unknown)")
            labels = list(names) if names is not None else [f"model {i}" for i in range(len(models))]
            if timestep_map is not None and hasattr(timestep_map, "config") and hasattr(timestep_map, "step"):
                schedulers, labels = [timestep_map, *schedulers], ["the timestep_map scheduler", *labels]
            check_same_schedule(schedulers, labels)
        self.intervals = intervals
        self.models = nn.ModuleList(models)
        self.num_timesteps = int(getattr(intervals, "num_timesteps", intervals.bounds[-1][1] + 1))
        if timestep_map is None and schedulers is not None:
            from .schedule import is_flow_matching

            # flow matching: the pipeline passes sigma * 1000 (or sigma), not a training index; the models' own
            # (checked alike) training scheduler maps it, as `timestep_map` would
            timestep_map = next((s for s in schedulers if s is not None and is_flow_matching(s)), None)
        if timestep_map is not None and hasattr(timestep_map, "config") and hasattr(timestep_map, "step"):
            from .models.families import denoiser_takes_sigma

            # a diffusers scheduler; FLUX.1 / Qwen-Image pipelines call their transformer with the sigma itself
            timestep_map = _scheduler_timestep_map(timestep_map, self.num_timesteps,
                                                   sigma_input=denoiser_takes_sigma(models[0]))
        elif timestep_map is not None and not callable(timestep_map):
            raise ValueError("timestep_map must be None, a diffusers training scheduler or a callable Tensor -> LongTensor")
        self.timestep_map = timestep_map

    @staticmethod
    def _check_compatible(models):
        configs = [getattr(m, "config", None) for m in models]
        if any(c is None for c in configs):
            return
        for key in ("in_channels", "out_channels", "sample_size"):
            values = {str(c.get(key)) if hasattr(c, "get") else str(getattr(c, key, None)) for c in configs}
            if len(values) > 1:
                raise ValueError(f"the models disagree on {key} ({', '.join(sorted(values))}); a router needs interchangeable models")

    # -- attributes pipelines read ---------------------------------------------------------------

    @property
    def config(self):
        return self.models[0].config

    @property
    def dtype(self):
        first = self.models[0]
        if hasattr(first, "dtype"):
            return first.dtype
        return next(first.parameters()).dtype

    @property
    def device(self):
        first = self.models[0]
        if hasattr(first, "device"):
            return first.device
        return next(first.parameters()).device

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules
        except AttributeError:
            pass
        models = self.__dict__.get("_modules", {}).get("models")
        if models is None or len(models) == 0 or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        value = getattr(models[0], name)
        if not callable(value) or isinstance(value, nn.Module):
            return value
        distinct = list({id(m): m for m in models}.values())

        def call_on_every_model(*args, **kwargs):
            results = [getattr(m, name)(*args, **kwargs) for m in distinct]
            return results[0]

        return call_on_every_model

    # -- routing ---------------------------------------------------------------------------------

    def training_indices(self, timestep):
        """Training indices (LongTensor, 0 .. T-1) of the given timesteps, for routing."""
        t = timestep if isinstance(timestep, torch.Tensor) else torch.as_tensor(timestep)
        t = t.reshape(-1)
        if self.timestep_map is not None:
            return torch.as_tensor(self.timestep_map(t)).long().reshape(-1)
        # DDPM-family pipelines pass integer training timesteps; round floats, clamp strays (e.g. T).
        return t.detach().double().round().long().clamp(0, self.num_timesteps - 1)

    def route(self, timestep):
        """Interval (model) index of each timestep, as a LongTensor."""
        indices = self.training_indices(timestep)
        return torch.as_tensor(self.intervals.assign(indices.cpu())).long()

    def forward(self, *args, **kwargs):
        # The denoised input and the timestep, positional (UNets: `unet(sample, t, ...)`) or by keyword
        # (SD3, FLUX.1 and Qwen-Image pipelines call `transformer(hidden_states=..., timestep=...)`, DiT's
        # `transformer(sample, timestep=...)`); each model is called the same way.
        args = list(args)
        sample_key = None if args else next((k for k in ("sample", "hidden_states") if k in kwargs), None)
        if not args and sample_key is None:
            raise TypeError("TimestepRouter: pass the denoised input first, or as `sample` / `hidden_states`")
        sample = args.pop(0) if sample_key is None else kwargs.pop(sample_key)
        timestep_key = None if args else "timestep"
        if timestep_key is not None and timestep_key not in kwargs:
            raise TypeError("TimestepRouter: pass the timestep second, or as `timestep`")
        timestep = args.pop(0) if timestep_key is None else kwargs.pop(timestep_key)

        def call(model, sample_part, timestep_part, rest_args, rest_kwargs):
            positional = ([] if sample_key else [sample_part]) + ([] if timestep_key else [timestep_part])
            keywords = {**({sample_key: sample_part} if sample_key else {}),
                        **({timestep_key: timestep_part} if timestep_key else {}), **rest_kwargs}
            return model(*positional, *rest_args, **keywords)

        t = timestep if isinstance(timestep, torch.Tensor) else torch.as_tensor(timestep)
        batch_size = sample.shape[0]
        if t.numel() > 1 and (t.ndim != 1 or t.shape[0] != batch_size):
            raise ValueError(f"timestep must be a scalar or have one entry per sample ({batch_size}), got shape {tuple(t.shape)}")
        clusters = self.route(t)
        groups = clusters.unique()
        if len(groups) == 1:
            return call(self.models[int(groups[0])], sample, timestep, args, kwargs)

        parts = []
        for cluster in groups.tolist():
            index = (clusters == cluster).nonzero().squeeze(1).to(sample.device)
            sub_args = _take(args, index, batch_size)
            sub_kwargs = _take(kwargs, index, batch_size)
            out = call(self.models[cluster], sample[index], t[index.to(t.device)], sub_args, sub_kwargs)
            parts.append((index, out))
        return _merge(parts, batch_size)
