"""ControlNet's *sudden convergence*, measured: the first training step at which the model follows its condition.

Zhang et al. (ControlNet, 2023) observe that a ControlNet does not learn its condition gradually:
at some step it suddenly starts to follow it. Zhong et al. ("Diffusion Tuning", NeurIPS 2024, Sec.
5.2 and their case-study figure) make that step measurable: sample from the validation conditions,
re-extract the condition from the generated images with the extractor that made the training
conditions, and call the first step at which the distance between the re-extracted and the input
condition falls below a threshold the step of sudden convergence (Diff-Tuning reaches it about 24%
sooner). The authors release no code for it; :class:`ConvergenceTracker` is one.

Distances (``distance=``), all on greyscale maps scaled to [0, 1] (the condition resized to the
generated image's size, nearest-neighbour):

- ``"mse"`` (default): mean squared difference, what the paper's case-study figure plots;
- ``"mae"``: mean absolute difference (equal to ``mse`` on binary outlines);
- ``"iou"``: 1 - IoU of the maps binarised at 0.5 (0 when both are empty): blind to how much
  background there is, which the mean differences are not (a blank image is close to a thin outline).

The distance of a check is the mean over its (image, condition) pairs. Extractors (``extractor=``):
``"outline"``, the built-in ``diffusers_ant.data.toy.edge_map`` (the morphological outline that made
``mnist5k_captions``' conditioning images), or ``"module:function"`` / ``"path/to/file.py:function"``,
a function taking a PIL image and returning the condition as a PIL image or an array (``uint8`` in
0..255, or floats in [0, 1]).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os

import numpy as np

from ..files import write_json_atomically

CONVERGENCE_FILE = "convergence.json"
DISTANCES = ("mse", "mae", "iou")


# ------------------------------------------------------------------------------ extractors


def outline_extractor(image) -> np.ndarray:
    """The built-in extractor: ``edge_map`` of the image's greyscale version (uint8, 0 or 255)."""
    from ..data.toy import edge_map

    return edge_map(np.asarray(_to_pil(image).convert("L")))


BUILTIN_EXTRACTORS = {"outline": outline_extractor}


def load_condition_extractor(spec):
    """A condition extractor from ``spec``: a callable, a built-in name (``"outline"``), or
    ``"module:function"`` / ``"path/to/file.py:function"``. One-line ``ValueError`` when it cannot be had."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"condition extractor {spec!r}: give 'outline' or module:function")
    if spec in BUILTIN_EXTRACTORS:
        return BUILTIN_EXTRACTORS[spec]
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(
            f"unknown condition extractor {spec!r}: use one of {', '.join(BUILTIN_EXTRACTORS)} or module:function"
        )
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise ValueError(f"condition extractor {spec!r}: file {module_name!r} does not exist")
            name = "diffusers_ant_extractor_" + os.path.splitext(os.path.basename(module_name))[0]
            module_spec = importlib.util.spec_from_file_location(name, module_name)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ValueError:
        raise
    except Exception as err:  # ImportError, or whatever the module's own import raises: one line either way
        detail = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(
            f"condition extractor {spec!r}: cannot import {module_name!r} ({type(err).__name__}: {detail}); "
            "check the module is on PYTHONPATH"
        ) from None
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"condition extractor {spec!r}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"condition extractor {spec!r}: {attribute!r} is not a function")
    return target


# ------------------------------------------------------------------------------ distances


def _to_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    array = _as_array(image)
    return Image.fromarray(np.clip(array * 255 + 0.5, 0, 255).astype(np.uint8))


def _as_array(image) -> np.ndarray:
    """A greyscale float map in [0, 1], (H, W), from a PIL image, a numpy array or a torch tensor
    ((H, W), (H, W, C) or (C, H, W); uint8 read as 0..255, bool as 0 / 1, floats as they are)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    if hasattr(image, "detach"):  # a torch tensor
        image = image.detach().float().cpu().numpy()
    array = np.asarray(image)
    if array.dtype == np.uint8:
        array = array.astype(np.float64) / 255.0
    else:
        array = array.astype(np.float64)
    if array.ndim == 3:
        channel_first = array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4)
        array = array.mean(axis=0 if channel_first else -1)
    if array.ndim != 2:
        raise ValueError(f"a condition must be an image (H, W), (H, W, C) or (C, H, W); got shape {array.shape}")
    return array


def condition_distance(extracted, condition, distance: str = "mse") -> float:
    """The distance between a re-extracted condition and the input one (see the module docstring)."""
    if distance not in DISTANCES:
        raise ValueError(f"unknown convergence distance {distance!r}: choose one of {', '.join(DISTANCES)}")
    a = _as_array(extracted)
    b = _as_array(condition)
    if b.shape != a.shape:
        from PIL import Image

        resized = _to_pil(b).resize((a.shape[1], a.shape[0]), Image.NEAREST)
        b = np.asarray(resized, dtype=np.float64) / 255.0
    if distance == "mse":
        return float(np.mean((a - b) ** 2))
    if distance == "mae":
        return float(np.mean(np.abs(a - b)))
    mask_a, mask_b = a >= 0.5, b >= 0.5
    union = np.logical_or(mask_a, mask_b).sum()
    return 0.0 if union == 0 else float(1.0 - np.logical_and(mask_a, mask_b).sum() / union)


# ------------------------------------------------------------------------------ the tracker


class ConvergenceTracker:
    """Every ``every`` steps, the distance between the condition re-extracted from generated images
    and the input condition; the first step at which it falls below ``threshold``.

    Use from a training loop (main process)::

        tracker = ConvergenceTracker(threshold=0.02, every=100, extractor="outline", output_dir=args.output_dir)
        accelerator.register_for_checkpointing(tracker)       # state_dict / load_state_dict: resumable
        ...
        if tracker.should_check(global_step):
            records = tracker.evaluate(global_step, adapter, pipeline, conditions, prompts=prompts)
            accelerator.log(records, step=global_step)

    or, with images sampled elsewhere, ``tracker.update(step, images, conditions)``; or, with a
    distance computed elsewhere, ``tracker.record(step, distance)``. Each check rewrites
    ``output_dir/convergence.json`` (``converged_step``, ``history``, the settings) when ``output_dir`` is set.
    """

    def __init__(self, threshold: float, every: int = 100, extractor="outline", distance: str = "mse",
                 output_dir: str | None = None, file_name: str = CONVERGENCE_FILE, log_prefix: str = "convergence"):
        try:
            threshold = float(threshold)
        except (TypeError, ValueError):
            raise ValueError(f"--convergence_threshold must be a number > 0, got {threshold!r}") from None
        if not math.isfinite(threshold) or threshold <= 0:
            raise ValueError(f"--convergence_threshold must be a number > 0, got {threshold!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"--convergence_steps must be an integer >= 1, got {every!r}")
        if distance not in DISTANCES:
            raise ValueError(f"unknown convergence distance {distance!r}: choose one of {', '.join(DISTANCES)}")
        self.threshold = threshold
        self.every = every
        self.extractor_name = extractor if isinstance(extractor, str) else getattr(extractor, "__name__", repr(extractor))
        self.extractor = load_condition_extractor(extractor)
        self.distance = distance
        self.output_dir = output_dir
        self.file_name = file_name
        self.log_prefix = log_prefix
        self.history: list = []  # [{"step": int, "distance": float}], steps increasing

    # -------------------------------------------------------------- results

    @property
    def converged_step(self):
        """The first recorded step whose distance is below the threshold (``None`` until then)."""
        for entry in self.history:
            if entry["distance"] < self.threshold:
                return entry["step"]
        return None

    def should_check(self, step: int) -> bool:
        return step > 0 and step % self.every == 0

    def measure(self, images, conditions) -> float:
        """Mean distance over the pairs (image i, condition i); one condition serves every image."""
        images = list(images)
        if hasattr(conditions, "ndim") and conditions.ndim == 4:  # a (N, C, H, W) batch
            conditions = list(conditions)
        elif not isinstance(conditions, (list, tuple)):
            conditions = [conditions]
        if not images:
            raise ValueError("no generated images to compare with the conditions")
        if len(conditions) not in (1, len(images)):
            raise ValueError(f"{len(images)} images but {len(conditions)} conditions: give one condition per image, or one")
        distances = [
            condition_distance(self.extractor(image), conditions[i % len(conditions)], self.distance)
            for i, image in enumerate(images)
        ]
        return float(np.mean(distances))

    def record(self, step: int, distance: float) -> dict:
        """Record a check's distance; return the log records for the trackers.

        A step at or before the last recorded one (a resumed run re-doing steps) replaces the
        history from there on.
        """
        before = self.converged_step
        self.history = [entry for entry in self.history if entry["step"] < step]
        self.history.append({"step": int(step), "distance": float(distance)})
        converged = self.converged_step
        records = {f"{self.log_prefix}/distance": float(distance),
                   f"{self.log_prefix}/converged": 1.0 if converged is not None else 0.0}
        if converged is not None:
            records[f"{self.log_prefix}/converged_step"] = converged
        if converged is not None and before is None:
            records[f"{self.log_prefix}/sudden_convergence"] = 1.0  # the check where it happened
        self.save()
        return records

    def update(self, step: int, images, conditions) -> dict:
        """Re-extract the condition from ``images``, compare with ``conditions``, record; return the log records."""
        return self.record(step, self.measure(images, conditions))

    def evaluate(self, step: int, adapter, pipeline, conditions, prompts=None, seed: int = 0,
                 num_inference_steps: int = 20, scheduler=None, guidance_scale=None) -> dict:
        """Sample one image per condition with ``adapter.sample`` (same ``seed`` at every check, so
        only the model changes between checks), then :meth:`update`."""
        import torch

        conditions = list(conditions) if not isinstance(conditions, (list, tuple)) else list(conditions)
        images = adapter.sample(
            pipeline, len(conditions), torch.Generator().manual_seed(seed), num_inference_steps=num_inference_steps,
            prompts=prompts, conditioning_images=conditions, scheduler=scheduler, guidance_scale=guidance_scale,
        )
        return self.update(step, images, conditions)

    # -------------------------------------------------------------- saving

    def to_dict(self) -> dict:
        return {
            "converged_step": self.converged_step,
            "threshold": self.threshold,
            "every": self.every,
            "distance": self.distance,
            "extractor": self.extractor_name,
            "history": list(self.history),
        }

    def save(self):
        """Write ``output_dir/convergence.json`` (atomically); nothing without an ``output_dir``."""
        if self.output_dir is None:
            return None
        return write_json_atomically(os.path.join(self.output_dir, self.file_name), self.to_dict())

    def state_dict(self) -> dict:
        """The history, for Accelerate's ``register_for_checkpointing`` (a resumed run continues it)."""
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = [{"step": int(e["step"]), "distance": float(e["distance"])} for e in state.get("history", [])]
        self.save()


__all__ = [
    "BUILTIN_EXTRACTORS",
    "CONVERGENCE_FILE",
    "DISTANCES",
    "ConvergenceTracker",
    "condition_distance",
    "load_condition_extractor",
    "outline_extractor",
]
