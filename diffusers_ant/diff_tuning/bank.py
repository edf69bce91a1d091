"""The knowledge bank of Diff-Tuning: samples of the pretrained model, generated once, kept for retention.

Zhong et al., "Diffusion Tuning" (NeurIPS 2024), Sec. 4.1: before fine-tuning, the pretrained model
samples an augmented dataset (the *knowledge bank*); during fine-tuning its samples keep being
trained on at low noise (timesteps drawn from psi, see ``densities.py``), which retains the
pretrained model's denoising knowledge while the downstream data re-learns the high-noise end.
The authors release no generator for it; this module is one.

Layout of a bank folder (the ``datasets`` imagefolder layout, so ``datasets.load_dataset("imagefolder",
data_dir=BANK)`` and the trainer's ``--train_data_dir BANK`` read it)::

    BANK/bank.json              the manifest: source model, sampler settings, counts, resolution ...
    BANK/metadata.jsonl         one row per image: file_name, and label / text / conditioning image
    BANK/images/000000.png      sample i
    BANK/conditioning/000000.png   (ControlNet) the condition paired with sample i: re-extracted from it, or blank

Columns of the loaded dataset: ``image``; ``label`` (class-conditional ``unet`` / ``dit``: the class
the sample was drawn for); ``text`` (``sd`` / ``controlnet``: its prompt, "" for none);
``conditioning_image`` (``controlnet``). ``manifest["columns"]`` names them for ``resolve_columns``.

ControlNet banks pair each image with a condition that matches it (``bank_condition``): the condition
re-extracted from the generated image by the extractor that made the training conditions
(``"extracted"``, the default; ``--condition_extractor``, needed unless the conditions are the built-in
``mnist5k_captions``' whose ``outline`` is the default, the same extractors ``convergence.py`` measures
sudden convergence with), or a blank (all-zero) condition
(``"blank"``, generated from a blank condition too). Never the condition the image was generated from:
Diff-Tuning starts a ControlNet untrained (zero convolutions), so the pipeline ignores that condition,
and pairing the sample with it would teach the ControlNet to ignore its input (Zhong et al. release no
ControlNet code; re-extraction is how they measure whether an image follows a condition).

Reproducibility and resuming: sample i is drawn with its own ``torch.Generator`` seeded from
``(seed, i)`` (diffusers pipelines take one generator per image), in batches at fixed positions
(images ``[b * batch_size, (b + 1) * batch_size)``), so what sample i is depends on the seed, i and
the settings only. Every file is written to a temporary name and renamed, so a file is either
complete or absent; an interrupted build re-run with the same command skips the images present,
re-draws the batches that are missing some, and ends bit-identical to an uninterrupted build.
``metadata.jsonl`` is a function of the settings alone and is written once, at the end, after
which ``bank.json`` says ``"complete": true``. A re-run with other settings into the same folder
is refused, naming the setting that differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

import numpy as np
import torch

from ..files import write_atomically, write_json_atomically, write_text_atomically

BANK_MANIFEST = "bank.json"
METADATA_NAME = "metadata.jsonl"
IMAGES_DIR = "images"
CONDITIONING_DIR = "conditioning"
BANK_FORMAT = "diffusers_ant.knowledge_bank"
BANK_FORMAT_VERSION = 1
TMP_SUFFIX = ".tmp"  # how the temporaries of `files.write_atomically` end: a build removes a killed one's
BUILD_COMMAND = "train_scripts/build_knowledge_bank.py"

# The settings that decide what the bank holds, with the flag that sets each: a re-run into an
# existing bank must repeat them all.
SETTING_FLAGS = {
    "source_model": "--pretrained_model_name_or_path",
    "revision": "--revision",
    "model_type": "--model_type",
    "model_fingerprint": "--pretrained_model_name_or_path (its weights changed)",
    "torch_dtype": "--torch_dtype",
    "scheduler": "--scheduler",
    "num_inference_steps": "--num_inference_steps",
    "guidance_scale": "--guidance_scale",
    "seed": "--seed",
    "batch_size": "--batch_size",
    "num_images": "--num_images",
    "class_labels": "--class_labels",
    "prompts": "--prompts_file",
    "conditioning": "--conditioning_dir / --dataset_name",
    "bank_condition": "--bank_condition / --condition_extractor",
    "resolution": "--resolution (flux, qwenimage) or the source model's resolution",
    "channels": "the source model's channels",
}

MODEL_TYPES = ("unet", "dit", "sd", "controlnet", "sdxl", "sd3", "flux", "qwenimage")
# the text-conditional types: their bank rows carry the prompt each image was sampled from (`text`)
TEXT_MODEL_TYPES = ("sd", "controlnet", "sdxl", "sd3", "flux", "qwenimage")
# the types whose denoiser has no sample size (packed latents): the bank is sampled at --resolution, default 512
FREE_RESOLUTION_TYPES = ("flux", "qwenimage")
BANK_CONDITIONS = ("extracted", "blank")


# ------------------------------------------------------------------------------ small helpers


def image_seed(seed: int, index: int) -> int:
    """The seed of sample ``index``'s generator: a hash of ``(seed, index)`` (numpy's ``SeedSequence``),
    so neighbouring images get unrelated streams."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])  # < 2**63: a valid torch seed


def image_generator(seed: int, index: int) -> torch.Generator:
    """A CPU ``torch.Generator`` for sample ``index`` (CPU so a seed gives the same noise on any device)."""
    return torch.Generator("cpu").manual_seed(image_seed(seed, index))


def image_file(index: int) -> str:
    return f"{IMAGES_DIR}/{index:06d}.png"


def conditioning_file(index: int) -> str:
    return f"{CONDITIONING_DIR}/{index:06d}.png"


def _write_png(image, path: str) -> None:
    """An image file written atomically and durably (`files.write_atomically`: a resumed build counts every image
    present as drawn)."""
    write_atomically(path, lambda f: image.save(f, format="PNG"))


BUILD_LOCK = ".build.lock"  # inside the bank folder (imagefolder skips hidden files)


@contextlib.contextmanager
def _one_build_at_a_time(output_dir: str):
    """Hold the bank folder's lock while building: two builds into one folder (the same command started twice,
    or under a multi-process launcher) share its temporary names, and one would rename the other's half-written
    image into place or delete it. An OS lock (`fcntl.flock`), released whenever the process ends, a kill
    included; where the OS has none (Windows), no lock is taken."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(os.path.join(output_dir, BUILD_LOCK), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another build is writing the knowledge bank {output_dir!r}: wait for it to end (then run "
                             "the same command to finish the bank if it was stopped), or build into another "
                             "--output_dir") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _image_hash_update(digest, image) -> None:
    digest.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    digest.update(image.tobytes())


def _prepare_image(image, resolution: int):
    """A conditioning image as the bank stores and samples it: L or RGB, ``resolution`` square
    (bilinear resize, as ``make_toy_caption_dataset`` resizes its digits), so the saved file is
    exactly what the sample was conditioned on (the pipeline's own resize is then a no-op)."""
    from PIL import Image

    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BILINEAR)
    return image


def blank_condition(resolution: int):
    """The blank condition of ``--bank_condition blank``: an all-zero greyscale map (no outline, no
    edge; the data loader repeats it to the ControlNet's conditioning channels)."""
    from PIL import Image

    return Image.new("L", (resolution, resolution), 0)


def extracted_condition(extractor, image, resolution: int):
    """The condition ``extractor`` re-extracts from ``image``, as the bank stores it: a PIL image
    kept as it is (L or RGB), an array (uint8 0..255 or floats in [0, 1], read as ``convergence``
    reads conditions) written as greyscale; ``resolution`` square."""
    from PIL import Image

    from .convergence import _as_array

    condition = extractor(image)
    if not isinstance(condition, Image.Image):
        array = _as_array(condition)
        condition = Image.fromarray(np.clip(array * 255 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return _prepare_image(condition, resolution)


# ------------------------------------------------------------------------------ inputs


def read_prompts_file(path: str) -> list:
    """The prompts of a text file, one per line (blank lines skipped)."""
    if not os.path.isfile(path):
        raise ValueError(f"--prompts_file {path!r} does not exist: give a text file with one prompt per line")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts_file {path!r} holds no prompt: write one prompt per line")
    return prompts


def read_dataset_captions(dataset_name: str, caption_column=None, dataset_config_name=None, cache_dir=None) -> list:
    """The captions of a dataset (``--dataset_name``, the built-in offline sets included), one prompt per
    row, for the bank of a text-to-image model (sd, sdxl, sd3, flux, qwenimage) built without
    ``--prompts_file``: the base then samples what the fine-tuning data describes. A row holding a list
    of captions gives its first. One-line ``ValueError`` when the dataset has no caption column."""
    from ..data import load_training_dataset, resolve_columns

    dataset = load_training_dataset(dataset_name, None, dataset_config_name, cache_dir)
    column = resolve_columns(dataset, caption_column=caption_column, need_captions=True)["caption_column"]
    return [v[0] if isinstance(v, (list, tuple)) else str(v) for v in dataset[column]]


class ConditioningImages:
    """The conditioning images of a ControlNet bank, read on demand; sample i uses image ``i % len``.

    Build with :meth:`from_folder` (``--conditioning_dir``: every image file, sorted by name) or
    :meth:`from_dataset` (``--dataset_name``: a column of a dataset, the built-in offline sets
    included, with the row's caption as the prompt when the dataset has a caption column).
    """

    def __init__(self, load_image, count: int, source: str, captions=None):
        if count < 1:
            raise ValueError(f"no conditioning images in {source}: give a folder or dataset column with images")
        self._load_image = load_image
        self.count = count
        self.source = source
        self.captions = captions

    def __len__(self) -> int:
        return self.count

    def image(self, index: int, resolution: int):
        return _prepare_image(self._load_image(index % self.count), resolution)

    def caption(self, index: int):
        return None if self.captions is None else self.captions[index % self.count]

    @classmethod
    def from_folder(cls, folder: str) -> "ConditioningImages":
        from PIL import Image

        if not os.path.isdir(folder):
            raise ValueError(f"--conditioning_dir {folder!r} does not exist: give a folder of conditioning images")
        extensions = {ext.lower() for ext in Image.registered_extensions()}
        names = sorted(n for n in os.listdir(folder) if os.path.splitext(n)[1].lower() in extensions)
        if not names:
            raise ValueError(f"--conditioning_dir {folder!r} holds no image files (.png, .jpg, ...)")

        def load(index):
            with Image.open(os.path.join(folder, names[index])) as image:
                image.load()
                return image

        return cls(load, len(names), f"folder {os.path.basename(os.path.normpath(folder))}")

    @classmethod
    def from_dataset(cls, dataset_name: str, conditioning_image_column=None, caption_column=None,
                     dataset_config_name=None, cache_dir=None) -> "ConditioningImages":
        from ..data import load_training_dataset, resolve_columns
        from ..data.loading import CAPTION_COLUMN_NAMES

        dataset = load_training_dataset(dataset_name, None, dataset_config_name, cache_dir)
        columns = resolve_columns(dataset, conditioning_image_column=conditioning_image_column,
                                  caption_column=caption_column, need_conditioning=True)
        column = columns["conditioning_image_column"]
        captions_column = columns["caption_column"]
        if captions_column is None:
            captions_column = next((c for c in CAPTION_COLUMN_NAMES if c in dataset.column_names), None)
        captions = None
        if captions_column is not None:
            values = dataset[captions_column]
            captions = [v[0] if isinstance(v, (list, tuple)) else str(v) for v in values]

        def load(index):
            return dataset[int(index)][column]

        source = f"dataset {dataset_name}, column {column}" + (f", captions {captions_column}" if captions else "")
        return cls(load, len(dataset), source, captions)


# ------------------------------------------------------------------------------ the pipeline


def model_type_of_pipeline(pipeline) -> str:
    """Any of ``MODEL_TYPES``, from the pipeline's class, else its components: the rule
    ``diffusers_ant.analysis.common.infer_model_type`` applies to a folder's ``model_index.json``
    (one copy, in ``diffusers_ant.models.families``)."""
    from ..models.families import model_type_of_pipeline as _model_type

    return _model_type(pipeline)


def _new_controlnet_pipeline(pipeline):
    """The bank of a ControlNet run that starts from a Stable Diffusion base (`--model_type controlnet` on an
    SD pipeline): the base's ``StableDiffusionControlNetPipeline`` with a new ControlNet copied from its UNet,
    as the run will make it (``models.controlnet.new_controlnet``). Its zero convolutions add nothing, so the
    bank holds the base's own images, paired with conditions re-extracted from them; the fingerprint leaves
    the ControlNet out, so the run's SD base passes the check. (Before, such a bank needed a ControlNet output
    folder made beforehand.)"""
    from diffusers import StableDiffusionControlNetPipeline

    from ..models.controlnet import new_controlnet

    parts = {name: pipeline.components.get(name) for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler",
                                                                "feature_extractor", "image_encoder")}
    controlnet = new_controlnet(pipeline.unet, pipeline.vae).to(pipeline.unet.device, pipeline.unet.dtype)
    return StableDiffusionControlNetPipeline(**parts, controlnet=controlnet, safety_checker=None,
                                             requires_safety_checker=False)


def _set_sample_size(pipeline, model_type: str, resolution: int) -> None:
    """Sample the pipeline at ``resolution`` pixels square: what train_ant.py does to a pretrained model trained
    at another --resolution (the denoiser's ``sample_size`` in its config, which the pipelines size their
    latents by; SDXL's and SD3's pipelines also keep it as ``default_sample_size``). A bank then has the size
    of a run at that resolution (SD3 at 512, diffusers' script default, from a 1024 checkpoint). The weights,
    and so the fingerprint, are untouched."""
    from ..models import get_model_adapter

    vae = getattr(pipeline, "vae", None)
    factor = get_model_adapter(model_type).vae_scale_factor(vae) if vae is not None else 1
    if int(resolution) < 1 or int(resolution) % factor:
        raise ValueError(f"--resolution {resolution} must be a positive multiple of the VAE's factor {factor}")
    size = int(resolution) // factor
    denoiser = pipeline.transformer if hasattr(pipeline, "transformer") else pipeline.unet
    # the denoiser's own step: a UNet2DModel halves the size at each but its last block (its skip connections fail
    # on another size; a UNet2DConditionModel passes its up-blocks the sizes to meet, as SD does at 520 px), and a
    # transformer cuts it into patches
    blocks = denoiser.config.get("block_out_channels") if type(denoiser).__name__ == "UNet2DModel" else None
    step = 2 ** (len(blocks) - 1) if blocks else (denoiser.config.get("patch_size") or 1)
    if size % step:
        raise ValueError(f"--resolution {resolution} must be a multiple of {factor * step} pixels for this "
                         f"{type(denoiser).__name__} (the VAE's factor {factor} x its own {step})")
    if size == denoiser.config.get("sample_size"):
        return
    denoiser.register_to_config(sample_size=size)
    if model_type == "dit":  # as train_ant.py rebuilds its position table for the size (models/dit.py)
        from ..models.dit import _rebuild_position_embedding

        _rebuild_position_embedding(denoiser)
    if hasattr(pipeline, "default_sample_size"):
        pipeline.default_sample_size = size


def adapter_for_pipeline(pipeline, model_type: str, resolution: int | None = None):
    """The model adapter of ``model_type`` around a loaded pipeline's components (for ``sample``).

    The families of issue 16 (sdxl, sd3, flux, qwenimage) build theirs with the adapter's own
    ``from_pipeline`` (``resolution``: the sampling size of flux / qwenimage, whose transformers have
    none; default the pipeline's own default size); the older types are assembled here."""
    from ..models import get_model_adapter

    cls = get_model_adapter(model_type)
    if model_type not in ("unet", "dit", "sd", "controlnet"):
        # `ModelAdapter.from_pipeline` (flux and qwenimage override it for their default size)
        return cls.from_pipeline(pipeline, resolution=resolution)
    vae = getattr(pipeline, "vae", None)
    denoiser = {"controlnet": "controlnet", "dit": "transformer"}.get(model_type, "unet")
    model = getattr(pipeline, denoiser)
    spatial = pipeline.unet if model_type == "controlnet" else model
    parts = {
        "vae": vae,
        "num_channels": vae.config.in_channels if vae is not None else model.config.in_channels,
        "sample_size": spatial.config.sample_size,
        "model_from_pretrained": True,
    }
    if model_type in ("sd", "controlnet"):
        parts.update(text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer)
    if model_type == "controlnet":
        parts["unet"] = pipeline.unet
    if model_type == "dit":
        parts["class_rows"] = getattr(pipeline, "class_rows", None)  # `load_pipeline` read class_map.json
    model.eval()
    return cls(model, pipeline.scheduler, **parts)


def _num_classes(adapter, model_type):
    """Classes to cycle through (``None``: not class-conditional), and the largest valid label."""
    if model_type == "unet":
        n = adapter.model.config.num_class_embeds
        return (n, n - 1) if n else (None, None)
    if model_type == "dit":
        n = adapter.model.config.num_embeds_ada_norm
        return (n, n) if n > 1 else (None, None)  # a 1-class DiT is used through its null class only
    return None, None


# Components left out of the fingerprint: a ControlNet run fine-tunes the ControlNet (given by
# --controlnet_model_name_or_path, or new from the UNet) on top of a frozen Stable Diffusion base; the
# bank's knowledge is that base's, and the run names the base as --pretrained_model_name_or_path.
# The safety checker is no part of the model either (and `_load_source` drops it, below).
FINGERPRINT_EXCLUDED = ("controlnet", "safety_checker")


def _model_fingerprint(pipeline) -> str:
    """sha256 of every weight of the pipeline's modules (names, dtypes, shapes, bytes), the ControlNet
    excepted (``FINGERPRINT_EXCLUDED``): a ControlNet bank and its Stable Diffusion base then agree."""
    digest = hashlib.sha256()
    for name, component in sorted(pipeline.components.items()):
        if not isinstance(component, torch.nn.Module) or name in FINGERPRINT_EXCLUDED:
            continue
        for key, tensor in component.state_dict().items():
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name}.{key}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _load_source(pretrained_model_name_or_path, revision, torch_dtype, cache_dir=None):
    """``(pipeline, is_local_folder)``; a missing folder or an unreachable Hub id is one ``ValueError``. A Hub id
    is cached in ``cache_dir`` (default the Hub's own cache)."""
    from ..models import load_pipeline

    path = os.fspath(pretrained_model_name_or_path)
    local = os.path.isdir(path)
    if local and revision is not None:
        raise ValueError(f"--revision applies to Hub model ids, not to the local folder {path!r}: drop --revision")
    if not local and (os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise ValueError(f"--pretrained_model_name_or_path {path!r} is not a pipeline folder: give a folder saved "
                         "with save_pretrained (or by train_ant.py), or a Hub id")
    errors = (OSError,) if local else (OSError, ValueError)  # a Hub id's errors are long; a folder's are ours
    try:
        if local:
            pipeline = load_pipeline(path, torch_dtype=torch_dtype)
        else:
            from diffusers import DiffusionPipeline

            pipeline = DiffusionPipeline.from_pretrained(path, revision=revision, torch_dtype=torch_dtype,
                                                         cache_dir=cache_dir)
    except errors as err:
        raise ValueError(
            f"pretrained model {path!r} could not be loaded ({type(err).__name__}): give a pipeline folder saved "
            "with save_pretrained, or a Hub id while online"
        ) from err
    if getattr(pipeline, "safety_checker", None) is not None:
        # A bank is training data: an image the checker flags comes back black, and would be trained on as
        # the pretrained model's knowledge. (diffusers' training scripts sample their validation images with
        # safety_checker=None too.) The pipeline's __call__ skips the check when it is None.
        pipeline.safety_checker = None
    return pipeline, local


# ------------------------------------------------------------------------------ manifest


def read_bank_manifest(folder: str) -> dict:
    """``folder/bank.json``; one-line ``ValueError`` for a missing folder or a folder that is not a bank."""
    folder = os.fspath(folder)
    if not os.path.exists(folder):
        raise ValueError(
            f"knowledge bank {folder!r} does not exist: build it with python {BUILD_COMMAND} "
            f"--pretrained_model_name_or_path MODEL --num_images N --output_dir {folder}"
        )
    path = os.path.join(folder, BANK_MANIFEST)
    if not os.path.isdir(folder) or not os.path.isfile(path):
        raise ValueError(f"{folder!r} is not a knowledge bank (no {BANK_MANIFEST}): build one with python {BUILD_COMMAND}")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is unreadable ({type(err).__name__}): rebuild the bank with python {BUILD_COMMAND}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != BANK_FORMAT:
        raise ValueError(f"{path} is not a knowledge-bank manifest: rebuild the bank with python {BUILD_COMMAND}")
    if manifest.get("format_version", 0) > BANK_FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer diffusers_ant (format {manifest['format_version']}): upgrade diffusers_ant")
    return manifest


def bank_source_model(manifest: dict, folder: str) -> str:
    """The source model of a bank: its folder (the manifest keeps it relative to the bank) or Hub id."""
    source = manifest["source_model"]
    if manifest.get("source_model_local"):
        return os.path.normpath(os.path.join(os.path.abspath(folder), source))
    return source


def _comparable(settings: dict, folder: str) -> dict:
    values = dict(settings)
    if settings.get("source_model_local"):
        values["source_model"] = os.path.realpath(bank_source_model(settings, folder))
    return values


def _check_same_settings(old: dict, new: dict, folder: str) -> None:
    before, now = _comparable(old, folder), _comparable(new, folder)
    for key, flag in SETTING_FLAGS.items():
        if before.get(key) != now.get(key):
            shown_old, shown_new = old.get(key), new.get(key)
            if isinstance(shown_old, dict) or isinstance(shown_new, dict):  # prompts / conditioning digests
                shown_old = (shown_old or {}).get("source", shown_old)
                shown_new = (shown_new or {}).get("source", shown_new)
            raise ValueError(
                f"{folder!r} holds a knowledge bank made with {key}={shown_old!r}, this run asks for "
                f"{key}={shown_new!r} ({flag}): repeat the bank's settings to resume it, or choose another --output_dir"
            )


def _versions() -> dict:
    import diffusers

    from .. import __version__

    return {"diffusers_ant": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__}


# ------------------------------------------------------------------------------ building


# How a bank of N images takes its prompts and conditions from a list of M: "spread", evenly over the whole
# list when N < M (row i * M // N: a data set sorted by class or subject gives the bank all of them), cycled
# otherwise; "cycled", row i % M always, the first N rows when N < M (banks begun before "spread": a resumed
# one keeps the order it was begun with).
ROW_ORDERS = ("spread", "cycled")


class _Plan:
    """What sample i is drawn from: its class label (cycled), prompt and generating condition (`ROW_ORDERS`).

    ``paired``: a ControlNet bank (its rows carry a condition); ``blank``: generated from, and paired
    with, the blank condition."""

    def __init__(self, class_labels, prompts, conditioning, resolution, paired=False, blank=False, num_images=None,
                 rows="spread"):
        self.class_labels = class_labels
        self.prompts = prompts
        self.conditioning = conditioning
        self.resolution = resolution
        self.paired = paired
        self.blank = blank
        self.num_images = num_images
        self.rows = rows

    def row(self, i: int, count: int) -> int:
        """The row of a list of `count` prompts or conditions that sample i takes."""
        if self.rows == "spread" and self.num_images is not None and self.num_images < count:
            return i * count // self.num_images
        return i % count

    def condition_rows(self) -> list:
        """The rows of the conditioning images the bank samples from, in order, each once."""
        return sorted({self.row(i, len(self.conditioning)) for i in range(self.num_images)})

    def generating_condition(self, i):
        """The condition the ControlNet pipeline samples image i from (the untrained ControlNet of
        Diff-Tuning ignores it; a blank one when none is given or the bank pairs blanks)."""
        if self.conditioning is None or self.blank:
            return blank_condition(self.resolution)
        return self.conditioning.image(self.row(i, len(self.conditioning)), self.resolution)

    def label(self, i):
        return None if self.class_labels is None else int(self.class_labels[i % len(self.class_labels)])

    def prompt(self, i):
        if self.prompts is not None:
            return self.prompts[self.row(i, len(self.prompts))]
        if self.conditioning is not None and self.conditioning.captions is not None:
            return self.conditioning.caption(self.row(i, len(self.conditioning)))
        return ""

    def metadata_row(self, i, model_type) -> dict:
        row = {"file_name": image_file(i)}
        if self.class_labels is not None:
            row["label"] = self.label(i)
        if model_type in TEXT_MODEL_TYPES:
            row["text"] = self.prompt(i)
        if self.paired:
            row["conditioning_image_file_name"] = conditioning_file(i)
        return row


def _validate_inputs(model_type, adapter, class_labels, prompts, conditioning, guidance_scale):
    num_classes, max_label = _num_classes(adapter, model_type)
    if model_type in ("unet", "dit"):
        if prompts is not None:
            raise ValueError(f"a {model_type} model takes no prompts: drop --prompts_file (use --class_labels)")
        if class_labels is not None:
            if num_classes is None:
                raise ValueError(f"the {model_type} model is unconditional: drop --class_labels")
            bad = [c for c in class_labels if not 0 <= int(c) <= max_label]
            if bad:
                raise ValueError(f"--class_labels {bad[0]} is out of range: the model has classes 0..{max_label}")
            class_labels = [int(c) for c in class_labels]
        elif num_classes is not None:
            class_labels = list(range(num_classes))  # every class in turn
        if model_type == "unet" and guidance_scale not in (None, 1, 1.0):
            raise ValueError("a UNet2DModel learns no null class, so it has no classifier-free guidance: drop --guidance_scale")
    else:
        if class_labels is not None:
            raise ValueError(f"a {model_type} model is text-conditional: drop --class_labels and give --prompts_file")
    if model_type != "controlnet" and conditioning is not None:
        hint = (f": pass --model_type {model_type} with --dataset_name to sample its captions as prompts"
                if model_type in TEXT_MODEL_TYPES else "")
        raise ValueError(f"conditioning images are for ControlNet banks; the source model is a {model_type} model{hint}")
    return class_labels


# The built-in data set whose conditions the built-in `outline` extractor made: the only conditions for which a
# ControlNet bank may leave --condition_extractor out
OUTLINE_DATASET = "mnist5k_captions"


def _bank_condition_setting(model_type, bank_condition, condition_extractor, conditioning=None):
    """``(manifest value, extractor or None)`` of ``--bank_condition`` / ``--condition_extractor``:
    ``None`` for a bank without conditions, ``{"mode": "extracted", "extractor": SPEC}`` or
    ``{"mode": "blank"}`` for a ControlNet bank. One-line ``ValueError`` for a flag that does not apply, and
    for an extracted bank without an extractor, unless its conditions are `OUTLINE_DATASET`'s (the outline
    paired with Canny edges or depth maps would teach the ControlNet another task, silently)."""
    if model_type != "controlnet":
        for flag, value in (("--bank_condition", bank_condition), ("--condition_extractor", condition_extractor)):
            if value is not None:
                raise ValueError(f"{flag} pairs ControlNet bank images with conditions; the source model is a "
                                 f"{model_type} model: drop {flag}")
        return None, None
    mode = "extracted" if bank_condition is None else bank_condition
    if mode not in BANK_CONDITIONS:
        raise ValueError(f"unknown --bank_condition {bank_condition!r}: choose one of {', '.join(BANK_CONDITIONS)}")
    if mode == "blank":
        if condition_extractor is not None:
            raise ValueError("--bank_condition blank pairs every image with a blank condition: drop --condition_extractor")
        return {"mode": "blank"}, None
    from .convergence import load_condition_extractor

    if condition_extractor is None:
        if conditioning is None or not conditioning.source.startswith(f"dataset {OUTLINE_DATASET},"):
            raise ValueError("a ControlNet bank pairs each image with the condition re-extracted from it: give "
                             "--condition_extractor, the function that made your training conditions (module:function "
                             "or file.py:function, e.g. your edge detector; the built-in outline made "
                             f"{OUTLINE_DATASET}'s only), or --bank_condition blank")
        condition_extractor = "outline"
    spec = condition_extractor
    extractor = load_condition_extractor(spec)
    return {"mode": "extracted", "extractor": spec if isinstance(spec, str) else getattr(spec, "__name__", "callable")}, extractor


def build_knowledge_bank(
    pretrained_model_name_or_path: str,
    output_dir: str,
    num_images: int,
    *,
    model_type: str | None = None,
    revision: str | None = None,
    seed: int = 0,
    batch_size: int = 8,
    num_inference_steps: int = 50,
    scheduler: str | None = None,
    guidance_scale: float | None = None,
    class_labels=None,
    prompts=None,
    conditioning: ConditioningImages | None = None,
    bank_condition: str | None = None,
    condition_extractor=None,
    device=None,
    torch_dtype=None,
    progress: bool = True,
    on_image_written=None,
    resolution: int | None = None,
    prompts_source: str = "prompts file",
    cache_dir: str | None = None,
) -> dict:
    """Sample ``num_images`` images of a pretrained pipeline into the bank folder ``output_dir``; return the manifest.

    Args:
        pretrained_model_name_or_path: a pipeline folder (``load_pipeline`` reads it: full pipelines
            and this project's LoRA folders) or a Hub id.
        output_dir: the bank folder: new, empty, or a bank this same command started (it resumes).
        num_images: images in the bank.
        model_type: any of ``MODEL_TYPES`` (``unet``, ``dit``, ``sd``, ``controlnet``, ``sdxl``,
            ``sd3``, ``flux``, ``qwenimage``); inferred from the pipeline when None (its class name,
            ``diffusers_ant.models.families``), and checked against it when given.
        revision: the Hub revision of a Hub id.
        cache_dir: where a Hub id's files are cached (diffusers' ``cache_dir``; default the Hub's own).
        seed: sample i is drawn from a generator seeded with ``(seed, i)``.
        batch_size: images sampled at once. Part of the settings: batches sit at fixed positions,
            so a resumed build redraws exactly the batches an uninterrupted one draws.
        num_inference_steps, scheduler: the sampler (``scheduler``: None for the pipeline's own, or
            ``"ddim"``, ``"ddpm"`` or a diffusers scheduler class name). The paper gives no step
            count; its ablation finds more steps better, with diminishing returns.
        guidance_scale: classifier-free guidance (``dit``, ``sd``, ``controlnet``, ``sdxl``, ``sd3``, Qwen-Image's
            true CFG) or FLUX.1-dev's distilled guidance; None: the pipeline's default (3.5 for FLUX.1).
        class_labels: classes to cycle through (default: every class of a class-conditional model).
        prompts: prompts to draw from (``sd``, ``controlnet``, ...; evenly spread over the list when it is longer
            than the bank, cycled otherwise: `ROW_ORDERS`; default: the conditioning
            dataset's captions, else the empty prompt).
        conditioning: ``ControlNet`` only: the conditions to sample from, spread or cycled as the prompts (their captions serve
            as prompts); None samples from a blank condition. An untrained ControlNet ignores them.
        bank_condition: ``ControlNet`` only: what each image is paired with in the bank,
            ``"extracted"`` (default: the condition re-extracted from the image by
            ``condition_extractor``) or ``"blank"`` (sampled from and paired with an all-zero condition).
        condition_extractor: ``"extracted"`` only: a built-in name (``"outline"``, the outline that made
            ``mnist5k_captions``' conditions, the default for conditions from that data set, and only for
            them: any other source needs the flag), ``"module:function"`` or a callable, as
            :func:`diffusers_ant.diff_tuning.convergence.load_condition_extractor` reads it.
        device, torch_dtype: where and in what precision to sample (default: CUDA when available,
            float32).
        progress: show a tqdm progress bar.
        on_image_written: called with the index of every image written (after its rename).
        resolution: the square size to sample at, the ``--resolution`` the run trains at:
            ``check_bank_compatible`` refuses another. Default: the denoiser's own size; for ``flux`` /
            ``qwenimage``, whose transformers have none, 512, what train_ant.py trains them at without one.
        prompts_source: where ``prompts`` came from, for the manifest (``"prompts file"``, or
            ``"dataset NAME, captions"`` from :func:`read_dataset_captions`).
    """
    from tqdm.auto import tqdm

    for name, value, low in (("num_images", num_images, 1), ("batch_size", batch_size, 1),
                             ("num_inference_steps", num_inference_steps, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"--{name} must be an integer >= {low}, got {value!r}")
    if model_type is not None and model_type not in MODEL_TYPES:
        raise ValueError(f"unknown --model_type {model_type!r}: choose one of {', '.join(MODEL_TYPES)}")
    output_dir = os.fspath(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output_dir {output_dir!r} is a file: give a folder for the bank")
    existing = None
    if os.path.isdir(output_dir) and set(os.listdir(output_dir)) - {BUILD_LOCK}:
        if not os.path.isfile(os.path.join(output_dir, BANK_MANIFEST)):
            raise ValueError(f"--output_dir {output_dir!r} is not empty and holds no knowledge bank: choose a new or empty folder")
        existing = read_bank_manifest(output_dir)

    if isinstance(torch_dtype, str):
        if torch_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"--torch_dtype must be float32, float16 or bfloat16, got {torch_dtype!r}")
        torch_dtype = getattr(torch, torch_dtype)
    pipeline, local = _load_source(pretrained_model_name_or_path, revision, torch_dtype, cache_dir)
    found_type = model_type_of_pipeline(pipeline)
    if model_type == "controlnet" and found_type == "sd":
        pipeline, found_type = _new_controlnet_pipeline(pipeline), "controlnet"
    if model_type is not None and model_type != found_type:
        raise ValueError(f"{pretrained_model_name_or_path!r} holds a {found_type} pipeline, not {model_type}: "
                         f"drop --model_type or pass --model_type {found_type}")
    model_type = found_type
    if resolution is not None and model_type not in FREE_RESOLUTION_TYPES:
        _set_sample_size(pipeline, model_type, resolution)
        resolution = None  # the denoiser's sample size now says it, as for a run trained at --resolution
    if resolution is None and model_type in FREE_RESOLUTION_TYPES:
        # the size train_ant.py trains a checkpoint of these families at without --resolution (512, as diffusers'
        # scripts), so that a bank and a run both left at their defaults agree (the pipeline's own 1024 did not,
        # and the trainer refuses a bank of another size); a bank being resumed keeps its own
        from ..models.flux import default_resolution

        resolution = existing["resolution"] if existing is not None else default_resolution(preset=False)
    adapter = adapter_for_pipeline(pipeline, model_type, resolution)
    if guidance_scale is None and model_type == "flux" and existing is not None:
        guidance_scale = existing.get("guidance_scale")  # a bank being resumed keeps its own (None: sampled at 1.0)
    elif guidance_scale is None and model_type == "flux":
        # FLUX.1-dev's distilled guidance: the pipeline's own default (3.5), what the model is sampled with as
        # released; the adapter's default is the training value (1.0), which would bank weaker samples.
        # Recorded in the manifest as the value used.
        import inspect

        guidance_scale = inspect.signature(type(pipeline).__call__).parameters["guidance_scale"].default
    class_labels = _validate_inputs(model_type, adapter, class_labels, prompts, conditioning, guidance_scale)
    pairing, extractor = _bank_condition_setting(model_type, bank_condition, condition_extractor, conditioning)
    resolution = adapter.sample_size * adapter.vae_scale_factor(adapter.vae)
    channels = adapter.num_channels

    sampler = pipeline.scheduler
    if scheduler is not None:
        from ..models.base import scheduler_by_name

        sampler = scheduler_by_name(scheduler, pipeline.scheduler)
    rows = existing.get("rows", "cycled") if existing is not None else "spread"  # (a bank begun before "spread")
    plan = _Plan(class_labels, list(prompts) if prompts is not None else None, conditioning, resolution,
                 paired=pairing is not None, blank=pairing == {"mode": "blank"}, num_images=num_images, rows=rows)

    prompts_info = None
    if prompts is not None:
        prompts_info = {"source": prompts_source, "count": len(prompts),
                        "sha256": hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()}
    conditioning_info = None
    if conditioning is not None:
        digest = hashlib.sha256(f"{len(conditioning)}:".encode())
        for k in plan.condition_rows():  # only the images the bank uses
            _image_hash_update(digest, conditioning.image(k, resolution))
            digest.update(json.dumps(conditioning.caption(k)).encode())
        conditioning_info = {"source": conditioning.source, "count": len(conditioning), "sha256": digest.hexdigest()}

    source = os.path.abspath(pretrained_model_name_or_path) if local else pretrained_model_name_or_path
    manifest = {
        "format": BANK_FORMAT,
        "format_version": BANK_FORMAT_VERSION,
        "complete": False,
        "source_model": os.path.relpath(source, os.path.abspath(output_dir)) if local else source,
        "source_model_local": local,
        "revision": revision,
        "model_type": model_type,
        "model_fingerprint": _model_fingerprint(pipeline),
        "fingerprint_excludes": list(FINGERPRINT_EXCLUDED),
        "torch_dtype": str(torch_dtype or torch.float32).replace("torch.", ""),
        "scheduler": type(sampler).__name__,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "batch_size": batch_size,
        "num_images": num_images,
        "class_labels": class_labels,
        "rows": rows,  # how the prompts and conditions were taken (ROW_ORDERS)
        "prompts": prompts_info,
        "conditioning": conditioning_info,
        "bank_condition": pairing,
        "resolution": resolution,
        "channels": channels,
        "columns": {
            "image_column": "image",
            "class_column": "label" if class_labels is not None else None,
            "caption_column": "text" if model_type in TEXT_MODEL_TYPES else None,
            "conditioning_image_column": "conditioning_image" if pairing is not None else None,
        },
        "versions": _versions(),
    }
    if existing is not None:
        _check_same_settings(existing, manifest, output_dir)
        manifest["versions"] = existing.get("versions", manifest["versions"])  # the build's first versions

    os.makedirs(output_dir, exist_ok=True)
    with _one_build_at_a_time(output_dir):
        os.makedirs(os.path.join(output_dir, IMAGES_DIR), exist_ok=True)
        if pairing is not None:
            os.makedirs(os.path.join(output_dir, CONDITIONING_DIR), exist_ok=True)
        for sub in (IMAGES_DIR, CONDITIONING_DIR, "."):  # leftovers of a build killed mid-write
            folder = os.path.join(output_dir, sub)
            if os.path.isdir(folder):
                for name in os.listdir(folder):
                    if name.endswith(TMP_SUFFIX):
                        os.remove(os.path.join(folder, name))
        if not _manifest_on_disk_equals(output_dir, manifest):
            write_json_atomically(os.path.join(output_dir, BANK_MANIFEST), manifest)

        done = {i for i in range(num_images) if os.path.isfile(os.path.join(output_dir, image_file(i)))}
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if len(done) < num_images:
            pipeline.to(device)
        bar = tqdm(total=num_images, initial=len(done), unit="image", desc="knowledge bank", disable=not progress)
        try:
            for start in range(0, num_images, batch_size):
                indices = list(range(start, min(start + batch_size, num_images)))
                missing = [i for i in indices if i not in done]
                if not missing:
                    continue
                images = _sample(adapter, pipeline, indices, plan, seed, num_inference_steps, sampler, guidance_scale)
                for i, image in zip(indices, images):
                    if i not in missing:
                        continue
                    if image.size != (resolution, resolution) or len(image.getbands()) != channels:
                        raise ValueError(f"the pipeline returned a {image.size} {image.mode} image, expected "
                                         f"{resolution}x{resolution} with {channels} channels")
                    if pairing is not None:  # the condition that matches the image, never the generating one
                        condition = (blank_condition(resolution) if extractor is None
                                     else extracted_condition(extractor, image, resolution))
                        _write_png(condition, os.path.join(output_dir, conditioning_file(i)))
                    _write_png(image, os.path.join(output_dir, image_file(i)))
                    done.add(i)
                    bar.update(1)
                    if on_image_written is not None:
                        on_image_written(i)
        finally:
            bar.close()

        rows = [json.dumps(plan.metadata_row(i, model_type), ensure_ascii=False) for i in range(num_images)]
        write_text_atomically(os.path.join(output_dir, METADATA_NAME), "\n".join(rows) + "\n")
        manifest["complete"] = True
        if not _manifest_on_disk_equals(output_dir, manifest):
            write_json_atomically(os.path.join(output_dir, BANK_MANIFEST), manifest)
        return manifest


def _manifest_on_disk_equals(folder: str, manifest: dict) -> bool:
    path = os.path.join(folder, BANK_MANIFEST)
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f) == manifest
        except ValueError:
            return False


def _sample(adapter, pipeline, indices, plan, seed, steps, sampler, guidance_scale) -> list:
    """The images of ``indices`` in one pipeline call, each from its own generator (see the module
    docstring). diffusers' ``DiTPipeline`` draws each image's starting latents from its generator but
    its ``scheduler.step`` noise from the global RNG; the DiT adapter seeds a forked global RNG from
    the batch's first generator, so a batch (at its fixed position) is still a function of the seed
    and the settings, and a resumed build redraws it identically."""
    generators = [image_generator(seed, i) for i in indices]
    labels = [plan.label(i) for i in indices] if plan.class_labels is not None else None
    prompts = [plan.prompt(i) for i in indices]
    conditions = [plan.generating_condition(i) for i in indices] if plan.paired else None
    return adapter.sample(pipeline, len(indices), generators, class_labels=labels, prompts=prompts,
                          conditioning_images=conditions, num_inference_steps=steps, guidance_scale=guidance_scale,
                          scheduler=sampler)


# ------------------------------------------------------------------------------ loading


def _count_images(folder: str, num_images: int) -> int:
    return sum(os.path.isfile(os.path.join(folder, image_file(i))) for i in range(num_images))


def load_knowledge_bank(folder: str, cache_dir: str | None = None):
    """``(dataset, manifest)`` of a finished bank: the ``datasets.Dataset`` of its images (columns in
    ``manifest["columns"]``) and its ``bank.json``.

    One-line ``ValueError`` for a missing folder, a folder that is not a bank, and an unfinished
    bank (re-run the build command to finish it).
    """
    manifest = read_bank_manifest(folder)
    folder = os.fspath(folder)
    if not manifest.get("complete") or not os.path.isfile(os.path.join(folder, METADATA_NAME)):
        done = _count_images(folder, int(manifest.get("num_images", 0)))
        raise ValueError(
            f"knowledge bank {folder!r} is incomplete ({done} of {manifest.get('num_images')} images): "
            f"re-run the {BUILD_COMMAND} command that started it to finish it"
        )
    import datasets

    dataset = datasets.load_dataset("imagefolder", data_dir=folder, split="train", cache_dir=cache_dir)
    if len(dataset) != manifest["num_images"]:
        raise ValueError(f"knowledge bank {folder!r} holds {len(dataset)} images, its manifest says "
                         f"{manifest['num_images']}: rebuild it with python {BUILD_COMMAND}")
    return dataset, manifest


def check_bank_compatible(manifest: dict, model_type: str, resolution: int, channels: int) -> None:
    """Refuse a bank this run cannot train on: another model type, resolution or channel count.

    ``resolution`` is the run's image size in pixels (``--resolution``), ``channels`` its image
    channels (1 greyscale, 3 RGB). One-line ``ValueError`` naming the fix.
    """
    source = manifest.get("source_model", "?")
    if manifest.get("model_type") != model_type:
        raise ValueError(
            f"the knowledge bank was sampled from a {manifest.get('model_type')} model ({source}), this run trains a "
            f"{model_type} model: build the bank from the pretrained {model_type} model you fine-tune "
            f"(python {BUILD_COMMAND} --pretrained_model_name_or_path BASE)"
        )
    if int(manifest.get("resolution", -1)) != int(resolution):
        raise ValueError(
            f"the knowledge bank holds {manifest.get('resolution')}x{manifest.get('resolution')} images, this run trains at "
            f"--resolution {resolution}: train at --resolution {manifest.get('resolution')} or build the bank from a "
            f"model at {resolution}x{resolution}"
        )
    if int(manifest.get("channels", -1)) != int(channels):
        raise ValueError(
            f"the knowledge bank holds {manifest.get('channels')}-channel images, this run's data has {channels}: "
            "build the bank from a model with the data's channel count"
        )
    if model_type == "controlnet" and not manifest.get("bank_condition"):
        # banks built before --bank_condition paired each image with the condition it was sampled
        # from, which the untrained ControlNet ignored: training on them teaches it to ignore its input
        raise ValueError(
            f"the ControlNet knowledge bank ({source}) pairs its images with the conditions they were sampled from, "
            f"not conditions that match them: rebuild it with python {BUILD_COMMAND} (it re-extracts each image's condition)"
        )


def check_bank_source(manifest: dict, pretrained_model_name_or_path: str, revision: str | None = None,
                      cache_dir: str | None = None, bank_folder: str | None = None) -> None:
    """Refuse a bank sampled from other weights than the model this run fine-tunes.

    The bank's manifest records ``model_fingerprint``, the sha256 of every weight of the pipeline it
    was sampled from, loaded in the bank's ``torch_dtype``; this loads ``pretrained_model_name_or_path``
    the same way (on the CPU, once, freed at once) and compares. Diff-Tuning's retention anchors the
    model it fine-tunes to that model's own samples (Zhong et al., Sec. 4.1): a bank of another model,
    even of the same type and resolution, anchors it to something else. One-line ``ValueError``, naming a local
    source by its path from here where ``bank_folder`` is given (the manifest records it relative to the bank).
    """
    recorded = manifest.get("model_fingerprint")
    source = manifest.get("source_model", "?")
    if bank_folder is not None and manifest.get("source_model_local"):
        source = os.path.relpath(bank_source_model(manifest, os.fspath(bank_folder)))
    if not recorded:
        raise ValueError(f"the knowledge bank ({source}) records no model fingerprint: rebuild it with python {BUILD_COMMAND}")
    path = os.fspath(pretrained_model_name_or_path)
    dtype = getattr(torch, str(manifest.get("torch_dtype") or "float32"))
    pipeline, _ = _load_source(path, None if os.path.isdir(path) else revision, dtype, cache_dir)
    found = _model_fingerprint(pipeline)
    del pipeline
    if found != recorded:
        if "safety_checker" not in (manifest.get("fingerprint_excludes") or ()):
            # banks built before the safety checker was dropped fingerprinted it too (and it may have blacked out
            # some of their images): they cannot match, whatever the weights
            raise ValueError(
                f"the knowledge bank ({source}) was built by an earlier version whose fingerprint included the "
                "pipeline's safety checker (which may also have blacked out some of its images): rebuild it with "
                f"python {BUILD_COMMAND}")
        raise ValueError(
            f"the knowledge bank was sampled from other weights ({source}) than --pretrained_model_name_or_path "
            f"{path!r} (their fingerprints differ): fine-tune the model the bank came from, or rebuild the bank "
            f"from {path!r} with python {BUILD_COMMAND}"
        )


__all__ = [
    "BANK_MANIFEST",
    "ConditioningImages",
    "adapter_for_pipeline",
    "bank_source_model",
    "build_knowledge_bank",
    "check_bank_compatible",
    "check_bank_source",
    "blank_condition",
    "extracted_condition",
    "image_generator",
    "image_seed",
    "load_knowledge_bank",
    "model_type_of_pipeline",
    "read_bank_manifest",
    "read_dataset_captions",
    "read_prompts_file",
]
