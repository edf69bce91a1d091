"""Model cards and push to the Hugging Face Hub for the folders that training writes.

Three entry points for the end of a training run:

- `write_model_card(output_dir, ...)` writes `README.md` (and a sample grid `samples.png`) into the
  output folder (`training_summary(args, ...)` gives it a `train_ant.py` run's settings): YAML metadata the Hub indexes (license, base_model, tags, datasets) and a body that
  says how the model was trained (ANT's timestep clusters, the multi-task weighting, steps, loss
  weighting) and how to load it. The body comes from `model_cards/ant_template.md`.
- `push_to_hub(output_dir, hub_model_id, ...)` creates the repo and uploads the folder without the
  training checkpoints, exactly as diffusers' example scripts do (`create_repo` + `upload_folder`).
- `check_hub_token_safety(report_to, hub_token)` and `drop_secrets(config)` keep the Hub token out of
  trackers, logs, saved configurations and the card; `portable_config(config, output_dir)` and
  `portable_path(path, output_dir)` keep this machine's absolute paths out of them.

The method described by the card is ANT (Go et al., "Addressing Negative Transfer in Diffusion
Models", NeurIPS 2023): the T denoising tasks are clustered into k timestep intervals and the k
interval losses are balanced by a multi-task-learning method (UW, PCGrad, Nash-MTL, ...).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

TEMPLATE_NAME = "ant_template.md"
SAMPLE_GRID_NAME = "samples.png"
CARD_NAME = "README.md"

# The offline datasets built into diffusers_ant (see diffusers_ant.data): not Hub datasets, so they
# get no `datasets:` metadata entry.
BUILTIN_DATASETS = ("mnist5k", "animal_mnist", "digits", "mnist5k_captions", "animal_mnist_captions")

# What never goes to the Hub: Accelerate checkpoints (`checkpoint-<step>`, and their temporary names
# while being written), anything under `checkpoints/`, temporary files and tracker logs' lock files.
# Patterns are matched by huggingface_hub with fnmatch on folder-relative paths, where `*` also
# matches `/`, so `checkpoint-*` covers every file inside a checkpoint folder.
# (.freed_encoders: the text encoders `--cache_text_embeddings` set aside, GBs of T5 after a crashed run;
# .training_cache_<process>: the cached latents and embeddings themselves, left by a crashed run)
DEFAULT_PUSH_IGNORE_PATTERNS = ("checkpoint-*", "checkpoints/*", "*.tmp", "*.tmp/*", "tmp-*", "*.lock",
                                ".freed_encoders/*", ".training_cache_*")

# Per model type (`--model_type`): the diffusers pipeline that loads the output, the Hub tags that
# diffusers' own training scripts put on such models, and the Hub `pipeline_tag`.
MODEL_TYPES = {
    "unet": {
        "pipeline": "DDPMPipeline",
        "tags": ("unconditional-image-generation",),
        "pipeline_tag": "unconditional-image-generation",
        "description": "a UNet2DModel denoiser",
    },
    "dit": {
        "pipeline": "DiTPipeline",
        "tags": ("dit", "class-conditional-image-generation"),
        "pipeline_tag": None,  # the Hub has no class-conditional pipeline tag
        "description": "a DiT (DiTTransformer2DModel) denoiser",
    },
    "sd": {
        "pipeline": "StableDiffusionPipeline",
        "tags": ("stable-diffusion", "stable-diffusion-diffusers", "text-to-image"),
        "pipeline_tag": "text-to-image",
        "description": "a Stable Diffusion UNet2DConditionModel",
        # as diffusers' train_text_to_image.py writes it: SD 1.x derivatives carry the CreativeML OpenRAIL-M
        "license": "creativeml-openrail-m",
    },
    # license and tags as diffusers' train_dreambooth_lora_sdxl.py writes them (`save_model_card`)
    "sdxl": {
        "pipeline": "StableDiffusionXLPipeline",
        "tags": ("text-to-image", "stable-diffusion-xl", "stable-diffusion-xl-diffusers"),
        "lora_tags": ("template:sd-lora",),
        "license": "openrail++",
        "pipeline_tag": "text-to-image",
        "description": "a Stable Diffusion XL UNet2DConditionModel",
    },
    "controlnet": {
        "pipeline": "StableDiffusionControlNetPipeline",
        "tags": ("stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "controlnet"),
        "pipeline_tag": "text-to-image",
        "description": "a ControlNet for Stable Diffusion (the UNet frozen)",
        # as diffusers' train_controlnet.py writes it: a ControlNet starts as a copy of the SD UNet's encoder
        "license": "creativeml-openrail-m",
    },
    # As diffusers' train_dreambooth_lora_sd3.py writes its cards: license "other" (Stability AI's
    # community license), "template:sd-lora", and "sd3" / "sd3.5" variant tags (see `_variant_tags`).
    "sd3": {
        "pipeline": "StableDiffusion3Pipeline",
        "tags": ("text-to-image", "template:sd-lora"),
        "pipeline_tag": "text-to-image",
        "description": "a Stable Diffusion 3 transformer (SD3Transformer2DModel, flow matching)",
        "license": "other",
    },
    # as diffusers' train_dreambooth_lora_flux.py writes its card: these tags, license "other" (the
    # FLUX.1-dev non-commercial licence; schnell is apache-2.0, pass license= for it)
    "flux": {
        "pipeline": "FluxPipeline",
        "tags": ("text-to-image", "flux", "flux-diffusers", "template:sd-lora"),
        "pipeline_tag": "text-to-image",
        "description": "a FLUX.1 transformer (FluxTransformer2DModel)",
        "license": "other",
    },
    # the tags of diffusers' train_dreambooth_lora_qwen_image.py (its license, apache-2.0, is the card's default)
    "qwenimage": {
        "pipeline": "QwenImagePipeline",
        "tags": ("text-to-image", "qwen-image", "qwen-image-diffusers", "template:sd-lora"),
        "pipeline_tag": "text-to-image",
        "description": "a Qwen-Image QwenImageTransformer2DModel",
    },
}


def _variant_tags(model_type: str, base_model: str | None) -> list:
    """diffusers' SD3 LoRA script: SD3.5-Large bases (a name with "large") are tagged sd3.5, others sd3."""
    if model_type != "sd3":
        return []
    if base_model is not None and "large" in str(base_model).lower():
        return ["sd3.5-large", "sd3.5", "sd3.5-diffusers"]
    return ["sd3", "sd3-diffusers"]


# Readable names of the multi-task weightings (diffusers_ant.WEIGHTINGS keys), for the card body.
METHOD_NAMES = {
    "none": "none: plain diffusion training, one loss over all timesteps",
    "ls": "LS, linear scalarisation (equal cluster weights)",
    "rlw": "RLW, random loss weighting (Lin et al., 2022)",
    "uw": "UW, uncertainty weighting (Kendall et al., 2018)",
    "dwa": "DWA, dynamic weight average (Liu et al., 2019)",
    "pcgrad": "PCGrad, projecting conflicting gradients (Yu et al., 2020)",
    "nash_mtl": "Nash-MTL, a Nash bargaining solution over cluster gradients (Navon et al., 2022)",
    "imtl": "IMTL-G, impartial multi-task learning (Liu et al., 2021)",
    "mgda": "MGDA-UB, multiple-gradient descent (Sener & Koltun, 2018)",
    "cagrad": "CAGrad, conflict-averse gradient descent (Liu et al., 2021)",
}

LOSS_WEIGHTING_NAMES = {
    "none": "none (plain MSE)",
    "min_snr": "Min-SNR-gamma (Hang et al., 2023)",
    "p2": "P2 weighting (Choi et al., 2022)",
}

# Keys of a configuration that must never reach a card, a log or a saved file.
# (`hub_token`, `access_token`, `wandb_api_key`; not `tokenizer_name` or `max_tokens`)
_SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_key|apikey)$", re.IGNORECASE)
# A Hugging Face access token, in case one hides under an innocent key.
_HF_TOKEN_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{8,}")


# --------------------------------------------------------------------------------------- secrets


def check_hub_token_safety(report_to: str | Sequence[str] | None, hub_token: str | None) -> None:
    """Refuse `--hub_token` together with a tracker that records the command line.

    Mirrors diffusers' example scripts, which refuse `--report_to wandb` with `--hub_token`: wandb
    (and comet_ml) upload the full command line, token included, to a third-party service. `all`
    enables every installed tracker, wandb among them.
    """
    if not hub_token:
        return
    if report_to is None:
        trackers: set[str] = set()
    elif isinstance(report_to, str):
        trackers = {name.strip() for name in report_to.split(",")}
    else:
        trackers = {str(name).strip() for name in report_to}
    risky = sorted(trackers & {"wandb", "comet_ml", "all"})
    if risky:
        raise ValueError(
            f"--hub_token cannot be used with --report_to {','.join(risky)}: the tracker would record the token. "
            "Log in once with `hf auth login` (`huggingface-cli login` in older huggingface_hub) or set HF_TOKEN, "
            "and drop --hub_token."
        )


def drop_secrets(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `config` without tokens, for tracker configs, saved JSON and the model card.

    Drops every key that names a secret (`hub_token`, `*_api_key`, `password`, ...) and every string
    value that looks like a Hugging Face token, recursively through nested mappings.
    """
    clean: dict[str, Any] = {}
    for key, value in config.items():
        if _SECRET_KEY.search(str(key)):
            continue
        if isinstance(value, str) and _HF_TOKEN_VALUE.search(value):
            continue
        if isinstance(value, Mapping):
            value = drop_secrets(value)
        clean[key] = value
    return clean


# ---------------------------------------------------------------------------------- local paths

# Configuration keys whose values are file system paths (or a Hub id / a name, which stay as they are).
# `logging_dir` is relative to the output folder by meaning, so only an absolute one is rewritten.
_PATH_KEY = re.compile(r"(_dir|_path|_file|_image|_images|_name_or_path)$|^(dataset_name|resume_from_checkpoint|knowledge_bank)$")


def portable_path(path: str | os.PathLike | None, output_dir: str | os.PathLike) -> str | None:
    """`path` as it may be published beside `output_dir`: never an absolute path of this machine.

    A Hub id, a preset name or any other string that is neither absolute nor an existing path is
    returned unchanged. A local path becomes relative to `output_dir` (`"."`, `"base_model"`,
    `"../sd-base"`), except when the two share nothing but the file system root (a base under the
    home folder, an output under /tmp): the relative path would then spell out the absolute one,
    so only the base name is kept.
    """
    if path is None:
        return None
    text = os.fspath(path)
    expanded = os.path.expanduser(text)
    if not os.path.isabs(expanded) and not os.path.exists(expanded):
        return text
    absolute = os.path.abspath(expanded)
    out = os.path.abspath(os.fspath(output_dir))
    try:
        common = os.path.commonpath([absolute, out])
    except ValueError:  # different drives (Windows)
        common = None
    if common is None or os.path.dirname(common) == common:  # only the root in common
        return os.path.basename(absolute.rstrip(os.sep)) or text
    return os.path.relpath(absolute, out)


def portable_config(config: Mapping[str, Any], output_dir: str | os.PathLike) -> dict[str, Any]:
    """`config` (e.g. the run's arguments, after `drop_secrets`) with every path made `portable_path`.

    For `training_config.json`, tracker configurations and anything else written into an output
    folder that may be pushed: values of path-like keys (`*_dir`, `*_name_or_path`, `dataset_name`,
    `validation_image`, ...) that are existing or absolute paths become relative to `output_dir`
    (the output folder itself is `"."`); under any other key, a value that is an absolute path of an
    existing file or folder is rewritten too (a prompt that merely starts with "/" is left alone).
    Nested mappings and lists are followed.
    """

    def convert(key: str, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: convert(str(k), v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(key, v) for v in value]
        if not isinstance(value, (str, os.PathLike)):
            return value
        text = os.fspath(value)
        expanded = os.path.expanduser(text)
        if _PATH_KEY.search(key) and (key != "logging_dir" or os.path.isabs(expanded)):
            return portable_path(text, output_dir)
        if os.path.isabs(expanded) and os.path.exists(expanded):
            return portable_path(text, output_dir)
        return value

    return {key: convert(str(key), value) for key, value in config.items()}


# ------------------------------------------------------------------------------------ model card


def _template_path(name: str = TEMPLATE_NAME) -> Path:
    """The card template, both in a source checkout / editable install and in a regular install.

    The design keeps templates in the repository's `model_cards/`. An editable install (and a plain
    checkout) imports this module from `<repo>/diffusers_ant/`, so the template is one level up. A
    regular wheel cannot reach outside the package, so setup.py maps `model_cards/` into the package
    as `diffusers_ant/model_cards/`; that location is tried first.
    """
    package_dir = Path(__file__).resolve().parent
    candidates = [package_dir / "model_cards" / name, package_dir.parent / "model_cards" / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"model card template {name} not found in {[str(c.parent) for c in candidates]}: "
        "reinstall diffusers_ant (pip install -e .)"
    )


def is_hub_id(name: str | os.PathLike | None) -> bool:
    """True for a Hub repo id (`user/name` or `name`), False for None or a local path."""
    if not name:
        return False
    name = os.fspath(name)
    if os.path.exists(name) or name.startswith((".", "/", "~")):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _interval_rows(intervals: Any) -> list[dict[str, int]]:
    """Rows of the cluster table from a TimestepIntervals (`.bounds`) or a list of (start, end)."""
    if intervals is None:
        return []
    bounds = getattr(intervals, "bounds", intervals)
    rows = []
    for index, (start, end) in enumerate(bounds):
        start, end = int(start), int(end)
        rows.append({"index": index, "start": start, "end": end, "size": end - start + 1})
    return rows


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _sample_grid(images: Any) -> Any:
    """One PIL image from a list of samples (diffusers' make_image_grid), padded to a full grid.

    Tiny samples (16x16 digits) are enlarged by an integer factor with nearest-neighbour resampling
    so the grid is legible on the Hub page without blurring the pixels.
    """
    from PIL import Image

    if isinstance(images, Image.Image):
        return images
    images = list(images)
    if not images:
        raise ValueError("images is empty: pass at least one sample, or images=None for a card without samples")
    from diffusers.utils import make_image_grid

    width, height = images[0].size
    scale = max(1, math.ceil(64 / max(1, min(width, height))))
    images = [img.convert("RGB").resize((width * scale, height * scale), Image.NEAREST) for img in images]
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    # make_image_grid wants exactly rows * cols images: fill the last row with blank tiles.
    images += [Image.new("RGB", images[0].size, "white")] * (rows * cols - len(images))
    return make_image_grid(images, rows=rows, cols=cols)


def _q(text: str) -> str:
    """A Python string literal for generated code (JSON's quoting is valid Python for strings)."""
    return json.dumps(str(text), ensure_ascii=False)


# What a saved output folder says about itself (written by diffusers_ant.models' `save`; names
# repeated here so that writing a card never imports torch).
_LORA_INFO = "ant_lora.json"
# A DiT fine-tuned on another class count: the label row of each data-set class (models/dit.py CLASS_MAP_NAME).
_CLASS_MAP = "class_map.json"
_CONTROLNET_INFO = "ant_controlnet.json"
_BASE_MODEL_DIR = "base_model"
_COND_EMBEDDING_FILE = "controlnet_cond_embedding.safetensors"
_LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
_DENOISER = {"unet": "unet", "dit": "transformer", "sd": "unet", "sdxl": "unet", "controlnet": "controlnet", "flux": "transformer",
             "sd3": "transformer", "qwenimage": "transformer"}


def _read_json(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class _Location:
    """Where a pipeline (or ControlNet) is, in the snippet's code and, when known, on this machine.

    `expr` is Python code for a path or Hub id (`"me/model"`, `os.path.join(folder, "base_model")`);
    `local` is the folder on this machine that it names, read to choose classes and call arguments.
    The output folder itself is `repo`: a Hub id, or a local folder when the card is used offline.
    """

    def __init__(self, expr: str, local: Path | None, code: "_Snippet | None" = None):
        self.expr, self.local, self._code = expr, local, code

    def folder_expr(self) -> str:
        """Code for a local folder of this location, to join relative paths to."""
        if self._code is not None:  # the output folder: download it when it is a Hub repo
            return self._code.folder()
        return self.expr

    def join(self, recorded: str) -> "_Location":
        """The location of a base recorded in this one's JSON (relative to it, or a Hub id)."""
        local = self.local / recorded if self.local is not None and (self.local / recorded).is_dir() else None
        if local is None and recorded != _BASE_MODEL_DIR and is_hub_id(recorded):
            return _Location(_q(recorded), None)
        self_code = self._code
        if self_code is not None:
            self_code.use("os")
        return _Location(f"os.path.join({self.folder_expr()}, {_q(recorded)})", local)


class _Snippet:
    """The `How to use` code being built: imports and lines; `folder` when the output's files are read."""

    def __init__(self, ref: str):
        self.ref = ref
        self.imports: dict[str, set[str]] = {}
        self.lines: list[str] = []
        self.needs_folder = False

    def use(self, module: str, *names: str) -> None:
        self.imports.setdefault(module, set()).update(names)

    def folder(self) -> str:
        self.needs_folder = True
        self.use("os")
        self.use("huggingface_hub", "snapshot_download")
        return "folder"

    def render(self) -> str:
        order = ["os", "diffusers", "huggingface_hub", "peft", "PIL", "safetensors.torch"]
        imports = []
        for module in sorted(self.imports, key=lambda m: order.index(m) if m in order else len(order)):
            names = sorted(self.imports[module])
            imports.append(f"from {module} import {', '.join(names)}" if names else f"import {module}")
        preamble = []
        lines = self.lines
        if self.needs_folder:
            # the output folder's own files are read: the local folder, or a download of the Hub repo
            preamble = [
                f"repo = {_q(self.ref)}  # the Hub repo, or the local output folder",
                "folder = repo if os.path.isdir(repo) else snapshot_download(repo)",
            ]
            lines = [line.replace(_q(self.ref), "folder") for line in lines]
        if "os" in self.imports and len(imports) > 1:
            imports.insert(1, "")  # the standard library apart
        return "\n".join(imports + [""] + preamble + lines)


def _named_base(base_model: str | None) -> str:
    """A base model as a card may show it: a Hub id, else a placeholder with the folder's name only."""
    if base_model is None:
        return "path/to/base-pipeline"
    return base_model if is_hub_id(base_model) else f"path/to/{Path(base_model).name}"


def _load_pipeline_code(code: _Snippet, model_type: str, where: _Location, pipeline_class: str | None,
                        base_model: str | None = None, controlnet_alone: bool = False,
                        revision: str | None = None) -> dict:
    """Lines that make `pipe` from the pipeline (or ControlNet output) at `where`; returns what was
    learnt of it: the pipeline class name and the denoiser's config (None when `where` is unknown here).

    `controlnet_alone`: `where` is a ControlNet output even if nothing can be read there (a card
    written without the weights); its base is then `base_model`."""
    local = where.local
    controlnet_info = _read_json(local / _CONTROLNET_INFO) if local is not None else None
    index = _read_json(local / "model_index.json") if local is not None else None
    if controlnet_info is not None or (controlnet_alone and model_type == "controlnet" and index is None):
        # a ControlNet saved alone, as diffusers' train_controlnet.py does: the pipeline comes from its base
        if controlnet_info is not None:
            base = where.join(controlnet_info["base_model"])
        else:
            base = _Location(_q(_named_base(base_model)), None)
        code.use("diffusers", "ControlNetModel", "StableDiffusionControlNetPipeline")
        code.lines.append(f"controlnet = ControlNetModel.from_pretrained({where.expr})")
        at = (controlnet_info or {}).get("revision")  # the Hub revision of the base it trained on
        pinned = f", revision={_q(at)}" if at else ""
        code.lines.append(f"pipe = StableDiffusionControlNetPipeline.from_pretrained({base.expr}, controlnet=controlnet"
                          f"{pinned})")
        unet_config = _read_json(base.local / "unet" / "config.json") if base.local is not None else None
        controlnet_config = _read_json(local / "config.json") if local is not None else None
        return {"pipeline": "StableDiffusionControlNetPipeline", "config": unet_config, "unet_config": unet_config,
                "controlnet_config": controlnet_config}
    class_name = index.get("_class_name") if index else None
    denoiser = _DENOISER.get(model_type, "unet") if model_type != "controlnet" else "unet"
    config = _read_json(local / denoiser / "config.json") if local is not None else None
    if isinstance(class_name, list):
        # this project's class-conditional UNet / pixel DiT pipeline, shipped in the folder as a
        # community pipeline file: plain diffusers runs it with trust_remote_code
        code.use("diffusers", "DiffusionPipeline")
        code.lines.append(f"pipe = DiffusionPipeline.from_pretrained({where.expr}, trust_remote_code=True)"
                          f"  # {class_name[-1]}, from the folder's {class_name[0]}.py")
        return {"pipeline": class_name[-1], "config": config, "unet_config": None}
    pipeline = pipeline_class or class_name or MODEL_TYPES[model_type]["pipeline"]
    code.use("diffusers", pipeline)
    # an SD3 base saved without T5 loads as diffusers' docs load it: text_encoder_3=None, tokenizer_3=None
    no_t5 = model_type == "sd3" and index is not None and (index.get("text_encoder_3") or [None])[0] is None
    absent = ", text_encoder_3=None, tokenizer_3=None" if no_t5 else ""
    pinned = f", revision={_q(revision)}" if revision else ""  # a LoRA's base at the revision it trained on
    code.lines.append(f"pipe = {pipeline}.from_pretrained({where.expr}{absent}{pinned})")
    unet_config = config if denoiser == "unet" else None
    return {"pipeline": pipeline, "config": config, "unet_config": unet_config}


def _call_code(code: _Snippet, model_type: str, facts: dict, prompt: str, resolution: int | None) -> None:
    """The sampling call, with the class labels / prompt / control image the model takes."""
    config = facts["config"] or {}
    if model_type == "unet":
        num_classes = config.get("num_class_embeds")
        if num_classes:
            labels = [i % num_classes for i in range(4)]
            code.lines.append(f"images = pipe(class_labels={labels}, num_inference_steps=50).images")
        else:
            code.lines.append("images = pipe(batch_size=4, num_inference_steps=50).images")
    elif model_type == "dit":
        num_classes = config.get("num_embeds_ada_norm")
        own = facts["pipeline"] != "DiTPipeline"
        class_map = facts.get("class_map")
        if class_map and class_map.get("rows"):
            # the kept pretrained label table: the data set's classes are the rows the map names
            pairs = list(zip(class_map.get("class_names") or [], class_map["rows"]))
            shown = ", ".join(f"{name!r} = {row}" for name, row in pairs[:8]) + (", ..." if len(pairs) > 8 else "")
            labels = [class_map["rows"][i % len(class_map["rows"])] for i in range(4)]
            code.lines.append(f"# the data set's classes are rows of the pretrained label table ({_CLASS_MAP}): {shown}")
            guidance = "" if own or num_classes == 1000 else ", guidance_scale=1.0"
            code.lines.append(f"images = pipe(class_labels={labels}{guidance}, num_inference_steps=50).images")
        elif num_classes == 1 and own:
            code.lines.append("# trained unconditionally: without class labels the pipeline samples the null class")
            code.lines.append("images = pipe(batch_size=4, num_inference_steps=50).images")
        elif num_classes == 1:
            code.lines.append("# trained unconditionally: label 1 is the null class")
            code.lines.append("images = pipe(class_labels=[1, 1, 1, 1], guidance_scale=1.0, num_inference_steps=50).images")
        elif num_classes and not own and num_classes != 1000:
            labels = [i % num_classes for i in range(4)]
            code.lines.append("# DiTPipeline's guidance assumes ImageNet's null class 1000: sample without it")
            code.lines.append(f"images = pipe(class_labels={labels}, guidance_scale=1.0, num_inference_steps=50).images")
        else:
            labels = [i % num_classes for i in range(4)] if num_classes else [0, 1, 2, 3]
            code.lines.append(f"images = pipe(class_labels={labels}, num_inference_steps=50).images")
    elif model_type in ("sd", "sdxl", "sd3"):
        code.lines.append(f"image = pipe({_q(prompt)}, num_inference_steps=30).images[0]")
    elif model_type == "flux":
        # FluxPipeline's own defaults (28 steps, distilled guidance 3.5; schnell ignores the guidance), at the
        # training resolution when known (the pipeline's default is 1024 pixels)
        size = f", height={resolution}, width={resolution}" if resolution else ""
        code.lines.append(f"image = pipe({_q(prompt)}{size}, num_inference_steps=28, guidance_scale=3.5).images[0]")
    elif model_type == "qwenimage":
        size = f"height={resolution}, width={resolution}, " if resolution else ""  # the trained size (default 1024)
        code.lines.append(f"image = pipe({_q(prompt)}, {size}num_inference_steps=30).images[0]")
    else:
        if resolution is None:
            unet = facts.get("unet_config") or {}
            resolution = int(unet["sample_size"]) * 8 if unet.get("sample_size") else 512
        channels = (facts.get("controlnet_config") or {}).get("conditioning_channels", 3)
        if channels == 3:
            code.use("PIL", "Image")
            code.lines.append(f'control_image = Image.new("RGB", ({resolution}, {resolution}))'
                              "  # your conditioning image, e.g. diffusers.utils.load_image(...)")
        else:
            # the pipeline converts a PIL condition to RGB; a tensor in [0, 1] keeps its channels
            code.use("torch")
            code.lines.append(f"control_image = torch.zeros(1, {channels}, {resolution}, {resolution})"
                              f"  # your {channels}-channel conditioning image, values in [0, 1]")
        code.lines.append(f"image = pipe({_q(prompt)}, image=control_image, num_inference_steps=30).images[0]")


def _usage_snippet(output_dir: Path, model_type: str, ref: str, base_model: str | None, lora: bool,
                   prompt: str, resolution: int | None, pipeline_class: str | None) -> tuple[str, dict]:
    """The `How to use` code for what `output_dir` holds; returns it and what was learnt (see
    `_load_pipeline_code`). Runs as written, with the Hub id `ref` or, offline, the local folder."""
    code = _Snippet(ref)
    output = _Location(_q(ref), output_dir, code)
    lora_info = _read_json(output_dir / _LORA_INFO)
    if not lora:
        facts = _load_pipeline_code(code, model_type, output, pipeline_class, base_model, controlnet_alone=True)
        facts["class_map"] = _read_json(output_dir / _CLASS_MAP) if model_type == "dit" else None
        _call_code(code, model_type, facts, prompt, resolution)
        return code.render(), facts
    # A LoRA adapter: the base pipeline, then the adapter weights.
    if lora_info is not None:
        base = output.join(lora_info["base_model"])
    else:
        base = _Location(_q(_named_base(base_model)), None)
    facts = _load_pipeline_code(code, model_type, base, pipeline_class,
                                revision=(lora_info or {}).get("revision"))
    if model_type in ("sd", "sdxl", "flux", "sd3", "qwenimage"):
        # diffusers-format LoRA (as train_text_to_image_lora.py / train_dreambooth_lora_sdxl.py / _flux.py /
        # _sd3.py / _qwen_image.py write it): the pipeline's own loader
        code.lines.append(f"pipe.load_lora_weights({_q(ref)})")
        if lora_info is not None and lora_info.get("vae"):
            # trained with --pretrained_vae_model_name_or_path (the fp16-fixed SDXL VAE): sample with it too
            vae = output.join(lora_info["vae"])
            subfolder = ', subfolder="vae"' if vae.local is not None and (vae.local / "vae").is_dir() else ""
            code.use("diffusers", "AutoencoderKL")
            code.lines.append(f"pipe.vae = AutoencoderKL.from_pretrained({vae.expr}{subfolder})")
    else:
        # UNet2DModel, DiTTransformer2DModel and ControlNetModel have no diffusers LoRA loader: the
        # adapter is re-created with peft from the folder's adapter_config.json (rank, alpha, targets)
        component = _DENOISER[model_type]
        folder = code.folder()
        code.use("peft", "LoraConfig", "inject_adapter_in_model", "set_peft_model_state_dict")
        code.use("safetensors.torch", "load_file")
        code.lines.append(f"inject_adapter_in_model(LoraConfig.from_pretrained({folder}), pipe.{component})")
        code.lines.append(f"set_peft_model_state_dict(pipe.{component}, "
                          f"load_file(os.path.join({folder}, {_q(_LORA_WEIGHTS_FILE)})))")
        if (output_dir / _COND_EMBEDDING_FILE).is_file():
            code.lines.append("# the conditioning embedding of this new ControlNet was trained in full")
            code.lines.append(f"pipe.controlnet.controlnet_cond_embedding.load_state_dict("
                              f"load_file(os.path.join({folder}, {_q(_COND_EMBEDDING_FILE)})))")
    facts["class_map"] = _read_json(output_dir / _CLASS_MAP) if model_type == "dit" else None
    _call_code(code, model_type, facts, prompt, resolution)
    return code.render(), facts


def training_summary(args: Any, intervals: Any, global_step: int, resolution: int | None = None,
                     num_processes: int = 1) -> dict[str, Any]:
    """The `method_summary` of `write_model_card` for a `train_ant.py` run (`args`: its parsed arguments).

    The method (weighting, clusters, timestep sampling), the timestep loss weighting with its own
    settings (`snr_gamma` for min_snr, `p2_k` / `p2_gamma` for p2), the optimisation settings (the batch of
    an update over the accumulation window and the `num_processes` processes, and the learning rate the
    updates used, scaled by that batch under `--scale_lr`), LoRA, the pixel `resolution` and the validation
    prompt (the snippet's prompt).
    """
    bounds = getattr(intervals, "bounds", intervals)
    loss_weighting = getattr(args, "loss_weighting", "none")
    summary = {
        "model_type": args.model_type, "mtl_method": args.mtl_method, "clustering": args.clustering,
        "num_clusters": len(bounds), "intervals": [list(b) for b in bounds],
        "timestep_sampling": args.timestep_sampling, "loss_weighting": loss_weighting,
    }
    if loss_weighting == "min_snr":
        summary["snr_gamma"] = args.snr_gamma
    elif loss_weighting == "p2":
        summary.update(p2_k=args.p2_k, p2_gamma=args.p2_gamma)
    accumulation = getattr(args, "gradient_accumulation_steps", 1) or 1
    total_batch = args.train_batch_size * accumulation * num_processes
    scaled = bool(getattr(args, "scale_lr", False))
    summary.update({
        "max_train_steps": global_step, "train_batch_size": args.train_batch_size,
        "gradient_accumulation_steps": accumulation, "num_processes": num_processes, "total_batch_size": total_batch,
        # the rate the updates used (the trainer's optimizer: --learning_rate x the total batch under --scale_lr)
        "learning_rate": args.learning_rate * total_batch if scaled else args.learning_rate,
        **({"scale_lr": True} if scaled else {}),
        "lora_rank": args.rank, "use_ema": args.use_ema, "resolution": resolution,
    })
    if args.rank is not None:
        summary["lora_alpha"] = args.lora_alpha if args.lora_alpha is not None else args.rank
    prompt = getattr(args, "validation_prompt", None)
    if prompt:  # the card's snippet shows the first of the validation prompts
        summary["validation_prompt"] = prompt[0] if isinstance(prompt, (list, tuple)) else prompt
    if getattr(args, "finetune", None) not in (None, "full", "lora"):
        summary["finetune"] = args.finetune
    if getattr(args, "controlnet_model_name_or_path", None):  # the ControlNet the run started from (a Hub id, or
        # its path from the output folder: no absolute path of this machine in a card that may be pushed)
        summary["controlnet_model_name_or_path"] = portable_path(args.controlnet_model_name_or_path, args.output_dir)
    if getattr(args, "deme_interval", None) is not None:
        bounds_i = bounds[args.deme_interval]
        summary.update(deme_interval=args.deme_interval, deme_timesteps=list(bounds_i),
                       consistency_weight=args.consistency_weight, deme_global_prob=args.deme_global_prob,
                       deme_sampling=getattr(args, "deme_sampling", None),
                       deme_antithetic=bool(getattr(args, "deme_antithetic", False)),
                       channel_projection=args.channel_projection)
    return summary


def write_model_card(
    output_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    model_type: str,
    method_summary: Mapping[str, Any],
    dataset_name: str | None = None,
    images: Sequence[Any] | Any | None = None,
    license: str | None = None,
    extra_tags: Iterable[str] = (),
    lora: bool | None = None,
    pipeline_class: str | None = None,
    usage_snippet: str | None = None,
    validation_prompt: str | None = None,
    template: str = TEMPLATE_NAME,
    template_values: Mapping[str, Any] | None = None,
) -> Path:
    """Write `output_dir/README.md`, the model card of a diffusers_ant training run; return its path.

    Args:
        output_dir: the training output folder (the card and the sample grid are written into it).
        repo_id: the Hub repo the folder will be pushed to; the loading snippet uses it (else the
            folder's name: replace it with the folder's path, or the repo id once pushed).
        base_model: the pretrained model fine-tuned; put in the metadata only when it is a Hub id
            (a local path is named in the body by its folder name only, since the Hub rejects
            non-repo `base_model`s and the card may be published). A LoRA or ControlNet folder's own
            record of its base (`ant_lora.json`, `ant_controlnet.json`) is what the snippet loads.
        model_type: `unet`, `dit`, `sd`, `sdxl`, `controlnet` or `flux` (`--model_type`).
        method_summary: the run's method settings: `mtl_method`, `clustering`, `num_clusters`,
            `intervals` (a TimestepIntervals or a list of inclusive (start, end) pairs),
            `loss_weighting` with `snr_gamma` (min_snr) or `p2_k` / `p2_gamma` (p2),
            `max_train_steps`, `lora_rank`, `resolution`, `validation_prompt`, ...
            (`training_summary(args, ...)` builds it from the trainer's arguments). Every entry is
            listed in the card's configuration table; secrets (`hub_token`, ...) are dropped first,
            and local paths are made relative to the folder (`portable_config`).
        dataset_name: `--dataset_name`; a Hub dataset id becomes a `datasets:` metadata entry.
        images: samples (a list of PIL images, gridded with diffusers' `make_image_grid`, or one
            ready grid), saved as `samples.png` and shown in the card. None keeps an existing
            `samples.png` if there is one.
        license: the card's license (default: the model type's, as diffusers' script for it writes it,
            e.g. `openrail++` for SDXL, "other" for flux; else apache-2.0).
        extra_tags: more Hub tags.
        lora: whether the folder holds LoRA weights; default: `method_summary["lora_rank"]` is set
            or the folder has `ant_lora.json`.
        pipeline_class: overrides the diffusers pipeline named in the snippet (default: the one the
            saved folder names, else per type).
        usage_snippet: overrides the whole `How to use` code.
        validation_prompt: the prompt of the snippet for `sd` / `controlnet` (default:
            `method_summary["validation_prompt"]`, else a generic one).
        template: the card template's file name in `model_cards/` (`ant_template.md`; Diff-Tuning runs
            use `diff_tuning_template.md`).
        template_values: more values for the template (and overrides of the title / summary), e.g.
            `diffusers_ant.diff_tuning.card.card_values(...)`.

    The `How to use` code is written for what the folder holds (write the card after saving the
    model): the pipeline class its `model_index.json` names (this project's class-conditional UNet
    and pixel DiT pipelines through `DiffusionPipeline(..., trust_remote_code=True)`), the class
    labels its denoiser takes, a LoRA adapter with its base pipeline (`base_model/` inside the
    folder, a Hub id, or a folder beside it), a ControlNet with its base. It runs as written with
    the Hub repo id, or offline with the local folder in its place.

    Builds on huggingface_hub's `ModelCard.from_template` (a jinja2 template, the mechanism that
    diffusers' `load_or_create_model_card` uses) and diffusers' `populate_model_card` (library name
    and tags). `load_or_create_model_card` itself is not called: given a repo id it first downloads
    the card already on the Hub (a network call, and it would keep that card instead of this run's),
    and its training template is diffusers' fixed one with TODO sections in place of ours.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}: use one of {sorted(MODEL_TYPES)}")
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = portable_config(drop_secrets(method_summary), output_dir)
    info = MODEL_TYPES[model_type]
    license = license or info.get("license", "apache-2.0")
    lora_info = _read_json(output_dir / _LORA_INFO)
    if lora is None:
        lora = bool(summary.get("lora_rank")) or lora_info is not None
    recorded = (lora_info if lora else None) or _read_json(output_dir / _CONTROLNET_INFO) or {}
    recorded_base = recorded.get("base_model")
    method = str(summary.get("mtl_method") or "none")
    loss_weighting = str(summary.get("loss_weighting") or "none")
    if base_model is None and recorded_base is not None and recorded_base != _BASE_MODEL_DIR and is_hub_id(recorded_base):
        base_model = recorded_base
    hub_base = base_model if is_hub_id(base_model) else None
    hub_dataset = dataset_name if dataset_name not in BUILTIN_DATASETS and is_hub_id(dataset_name) else None

    # Tags as diffusers' training scripts set them, plus this project's and the method's.
    tags = ["diffusers", "diffusers-training", *info["tags"], *_variant_tags(model_type, base_model), "ant"]
    if lora:
        tags += ["lora", *info.get("lora_tags", ())]
    if method != "none":
        tags.append(method)
    tags += list(extra_tags)
    tags = list(dict.fromkeys(tags))  # de-duplicated, order kept

    grid_file = None
    if images is not None:
        _sample_grid(images).save(output_dir / SAMPLE_GRID_NAME)
        grid_file = SAMPLE_GRID_NAME
    elif (output_dir / SAMPLE_GRID_NAME).is_file():
        grid_file = SAMPLE_GRID_NAME

    # No absolute path of this machine in the card: the repo id, else the folder's name.
    ref = repo_id or output_dir.name
    prompt = validation_prompt or summary.get("validation_prompt") or "a photo of a cat"
    pipeline = pipeline_class or info["pipeline"]
    if usage_snippet is None:
        usage_snippet, facts = _usage_snippet(output_dir, model_type, ref, base_model, lora, prompt,
                                              summary.get("resolution"), pipeline_class)
        pipeline = facts["pipeline"]

    if base_model is None:
        model_line = f"{info['description']}, trained from scratch"
    else:
        shown = base_model if hub_base else Path(base_model).name  # never a local absolute path
        link = f"[{shown}](https://huggingface.co/{shown})" if hub_base else f"`{shown}`"
        model_line = f"{info['description']}, {'LoRA-' if lora else ''}fine-tuned from {link}"
    if dataset_name is None:
        dataset_line = "not recorded"
    elif hub_dataset:
        dataset_line = f"[{hub_dataset}](https://huggingface.co/datasets/{hub_dataset})"
    elif dataset_name in BUILTIN_DATASETS:
        dataset_line = f"`{dataset_name}` (built into diffusers_ant, offline)"
    else:
        dataset_line = f"`{Path(dataset_name).name}` (a local image folder)"

    intervals = _interval_rows(summary.get("intervals"))
    method_line = METHOD_NAMES.get(method, method)
    if intervals and method != "none":
        method_line += f", balancing the {len(intervals)} timestep-cluster losses"
    deme = summary.get("deme_interval") is not None
    if deme:  # a DeMe interval fine-tune: how its timesteps were drawn and what its loss held, not ANT's weighting
        start, end = summary.get("deme_timesteps") or ("?", "?")
        p = summary.get("deme_global_prob")
        coin = {"per_batch": "one coin per micro-batch", "per_sample": "one coin per sample"}.get(summary.get("deme_sampling"))
        method_line = (f"DeMe fine-tune of interval {summary['deme_interval']} (timesteps {start} to {end}): timesteps "
                       f"from the interval, or from the whole range with probability {_format_value(p)}"
                       + (f" ({coin}" + (", antithetic pairs t, lo + hi - t" if summary.get("deme_antithetic") else "")
                          + ")" if coin else "")
                       + (f"; consistency loss against the frozen pretrained model, weight "
                          f"{_format_value(summary.get('consistency_weight'))}" if summary.get("consistency_weight")
                          else "; no consistency loss"))
    clustering = summary.get("clustering")
    clustering_line = f"clustering objective `{clustering}`" if clustering else "clustering objective not recorded"
    if summary.get("timestep_sampling"):
        clustering_line += f", timesteps sampled `{summary['timestep_sampling']}`"
    loss_weighting_line = LOSS_WEIGHTING_NAMES.get(loss_weighting, loss_weighting)
    if loss_weighting == "min_snr" and summary.get("snr_gamma") is not None:
        loss_weighting_line += f", gamma = {_format_value(summary['snr_gamma'])}"
    elif loss_weighting == "p2":
        settings = [f"{name} = {_format_value(summary[key])}" for name, key in (("k", "p2_k"), ("gamma", "p2_gamma"))
                    if summary.get(key) is not None]
        loss_weighting_line += "".join(f", {setting}" for setting in settings)
    steps = summary.get("max_train_steps")
    steps_line = f"{steps}" if steps is not None else "not recorded"

    kind = "LoRA adapter" if lora else "model"
    # (no task weighting: plain diffusion training, which the title and the intervals' section must not call ANT)
    weighted = method != "none"
    title = (f"{repo_id.split('/')[-1] if repo_id else output_dir.name}: "
             + (f"an ANT-trained diffusion {kind}" if weighted else f"a diffusion {kind} trained with diffusers_ant"))
    trained_as = (
        f"with {METHOD_NAMES.get(method, method).split(',')[0]} over {len(intervals)} timestep clusters"
        if weighted and intervals
        else f"with task weighting `{method}`"
    )
    summary_text = (
        f"A 🧨 diffusers {kind} ({pipeline}) trained with diffusers_ant {trained_as}: diffusion training "
        "treated as multi-task learning over timesteps (ANT, Go et al., NeurIPS 2023)."
    )
    if deme:
        summary_text = (f"A 🧨 diffusers {kind} ({pipeline}): one interval fine-tune of DeMe (Decouple-Then-Merge, "
                        "Ma et al., CVPR 2025), trained with diffusers_ant, to be merged with the other intervals' "
                        "fine-tunes (`merge_deme.py`).")
    if (output_dir / "channel_projection.safetensors").is_file():
        # DeMe's channel projections sit beside diffusers' files: plain from_pretrained (the snippet below)
        # loads the model without them, a different model, and says nothing
        summary_text += (" **Load it with `diffusers_ant.models.load_pipeline`**: it carries DeMe's channel "
                         "projections (`channel_projection.safetensors`), which plain diffusers' `from_pretrained` "
                         "(the snippet below) drops without an error, giving a different model.")

    config_rows = [(key, _format_value(value)) for key, value in summary.items() if key != "intervals"]

    given_controlnet = summary.get("controlnet_model_name_or_path")  # a ControlNet the run started from
    if recorded_base == _BASE_MODEL_DIR and model_type == "controlnet" and given_controlnet:
        source = (f"[{given_controlnet}](https://huggingface.co/{given_controlnet})" if is_hub_id(given_controlnet)
                  else f"`{Path(str(given_controlnet)).name}`")
        base_line = f"`{_BASE_MODEL_DIR}/` in this repository: the ControlNet before training, from {source}"
    elif recorded_base == _BASE_MODEL_DIR:
        base_line = f"`{_BASE_MODEL_DIR}/` in this repository (built with the model, not published elsewhere)"
    elif recorded_base is not None and is_hub_id(recorded_base):
        base_line = f"[{recorded_base}](https://huggingface.co/{recorded_base})"
    elif recorded_base is not None:
        base_line = f"`{Path(recorded_base).name}`, a local folder (`{recorded_base}` from this folder)"
    else:
        base_line = None
    lora_line = None
    if lora:
        rank = (lora_info or {}).get("rank", summary.get("lora_rank"))
        alpha = (lora_info or {}).get("lora_alpha", summary.get("lora_alpha"))
        lora_line = f"rank {rank}" + (f", alpha {alpha}" if alpha is not None else "")
        targets = (lora_info or {}).get("target_modules") or summary.get("lora_target_modules")
        if targets:
            lora_line += f", on {', '.join(f'`{t}`' for t in targets[:8])}" + (" ..." if len(targets) > 8 else "")
        held = ["the adapter weights"]
        if "controlnet_cond_embedding" in (lora_info or {}).get("trained_in_full", ()):
            held.append("the ControlNet's conditioning embedding (trained in full: a new ControlNet's is zero-initialised)")
        if recorded_base == _BASE_MODEL_DIR:
            held.append((f"the ControlNet before training in `{_BASE_MODEL_DIR}/`" if given_controlnet
                         else f"the untrained ControlNet in `{_BASE_MODEL_DIR}/`") if model_type == "controlnet"
                        else f"the base pipeline in `{_BASE_MODEL_DIR}/`")
        lora_line += "; this repository holds " + ", ".join(held[:-1]) + (" and " if len(held) > 1 else "") + held[-1]

    card_data = ModelCardData(
        license=license,
        base_model=hub_base,
        datasets=[hub_dataset] if hub_dataset else None,
        pipeline_tag=info["pipeline_tag"],
        inference=True,
    )
    values = dict(title=title, summary=summary_text)
    values.update(template_values or {})
    card = ModelCard.from_template(
        card_data,
        template_path=_template_path(template),
        model_line=model_line,
        dataset_line=dataset_line,
        method_line=method_line,
        loss_weighting_line=loss_weighting_line,
        steps_line=steps_line,
        lora_line=lora_line,
        base_line=base_line,
        intervals=intervals,
        intervals_line=(f"Training treated denoising as {len(intervals or [])} tasks, one per contiguous timestep "
                        "interval" if weighted else "Training used one loss over all timesteps (no task weighting); "
                        f"its loss was logged per timestep interval, {len(intervals or [])} of them"),
        clustering_line=clustering_line,
        config_rows=config_rows,
        usage_snippet=usage_snippet,
        grid_file=grid_file,
        **values,
    )
    card = populate_model_card(card, tags=tags)  # library_name: diffusers, and the tags
    path = output_dir / CARD_NAME
    card.save(path)
    return path


# ------------------------------------------------------------------------------------------- push


def create_hub_repo(hub_model_id: str | None, output_dir: str | os.PathLike, token: str | None = None,
                    private: bool | None = None) -> str:
    """Create the run's Hub repo before training (if new) and return its full id, `namespace/name`.

    As diffusers' scripts do at start-up (`create_repo(...).repo_id`): a bad login, a taken name or no network
    then stops the run before it trains, not after; and a `--hub_model_id` without a namespace (or none: the
    output folder's name) becomes the id the Hub gave it, under the token's user, so the model card's
    snippet names the repo the weights are uploaded to."""
    from huggingface_hub import constants, create_repo

    if constants.HF_HUB_OFFLINE:
        raise ValueError("--push_to_hub needs the network but HF_HUB_OFFLINE is set: unset it, or drop --push_to_hub")
    name = hub_model_id or os.path.basename(os.path.abspath(os.fspath(output_dir)))
    try:
        repo_id = create_repo(name, exist_ok=True, token=token, private=private).repo_id
        role = _token_role(token)
    except Exception as err:  # noqa: BLE001 - HfHubHTTPError (a bad token, a name taken), the HTTP client's
        # connection errors (not OSError subclasses): whatever stops the repo, one line before any training
        # one line naming the fix; the first line of the Hub's answer, never the token
        raise ValueError(f"--push_to_hub could not create the Hub repo {name!r} ({hub_error_reason(err)}): check the "
                         "login (hf auth login, --hub_token) and --hub_model_id, or drop --push_to_hub") from None
    if role == "read":
        # create_repo(exist_ok=True) accepts an existing repo whatever the token may do; the upload after hours
        # of training would then be refused
        raise ValueError(f"--push_to_hub: the Hub token is read-only, and the upload to {repo_id!r} would be refused "
                         "after training: log in with a write token (hf auth login, --hub_token), or drop --push_to_hub")
    return repo_id


def hub_error_reason(error: BaseException) -> str:
    """The first line of a Hub or connection error, for a one-line message (the Hub's answer, never the token)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _token_role(token: str | None) -> str | None:
    """What the Hub says the token may do ("read", "write", "fineGrained"; None when it does not say)."""
    from huggingface_hub import whoami

    return ((whoami(token=token) or {}).get("auth") or {}).get("accessToken", {}).get("role")


def push_to_hub(
    output_dir: str | os.PathLike,
    hub_model_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "End of training",
    ignore_patterns: Iterable[str] = DEFAULT_PUSH_IGNORE_PATTERNS,
) -> str:
    """Create the Hub repo `hub_model_id` (if new) and upload `output_dir` to it; return the repo URL.

    The same two huggingface_hub calls as diffusers' example scripts (`create_repo(exist_ok=True)`,
    then `upload_folder`), leaving out training checkpoints and temporary files
    (`DEFAULT_PUSH_IGNORE_PATTERNS`). `token=None` uses the stored login (`hf auth login`) or
    `HF_TOKEN`. `private=None` leaves the visibility of a new repo to the Hub's default for the
    namespace, as diffusers' scripts do; True / False set it. The token only ever travels in the request's Authorization header: it is not
    printed, logged, or written anywhere.
    """
    from huggingface_hub import constants, create_repo, get_token, upload_folder

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ValueError(f"nothing to push: {output_dir} is not a folder; train first or fix --output_dir")
    ignore_patterns = list(ignore_patterns)
    _refuse_files_with_token(output_dir, token or get_token(), ignore_patterns)
    if constants.HF_HUB_OFFLINE:
        raise ValueError("--push_to_hub needs the network but HF_HUB_OFFLINE is set: unset it, or drop --push_to_hub")
    repo_url = create_repo(hub_model_id, exist_ok=True, token=token, private=private)
    upload_folder(
        repo_id=repo_url.repo_id,
        folder_path=output_dir,
        commit_message=commit_message,
        ignore_patterns=ignore_patterns,
        token=token,
    )
    return str(repo_url)


# Files larger than this are weights, not places a token ends up in (configs, cards, tracker logs).
_TOKEN_SCAN_MAX_BYTES = 64 * 2**20


def _refuse_files_with_token(folder: Path, token: str | None, ignore_patterns: list[str]) -> None:
    """Last line of defence before an upload: no file about to be pushed may contain the token.

    A token reaches the output folder when a run logs its whole configuration (TensorBoard hparams,
    a saved args JSON) without `drop_secrets`; uploading it would publish it. Checks the files that
    `upload_folder` would send (same ignore patterns, matched by huggingface_hub's own filter).
    """
    if not token:
        return
    from huggingface_hub.utils import filter_repo_objects

    files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    needle = token.encode()
    for relpath in filter_repo_objects(sorted(files), ignore_patterns=ignore_patterns):
        path = files[relpath]
        if path.stat().st_size <= _TOKEN_SCAN_MAX_BYTES and needle in path.read_bytes():
            raise ValueError(
                f"refusing to push: {relpath} contains the Hub token; remove it (log configs through "
                "diffusers_ant.hub.drop_secrets) and push again"
            )
