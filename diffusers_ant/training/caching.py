"""`--cache_latents` and `--cache_text_embeddings`: encode the training data once, then free the encoders.

As diffusers' DreamBooth LoRA scripts for SD3 / Flux (`--cache_latents`: `latents_cache.append(vae.encode(
pixel_values).latent_dist)`, then `del vae` unless validating; the instance prompts' embeddings computed
once, then `del text_encoder_one, ...`), through the generic adapter interface so that every model type
inherits it:

* Latents: the VAE posterior of every training image (`ModelAdapter.encode_moments`: mean and
  log-variance, deterministic) is computed once and kept on disk, one tensor per row (rows of
  different aspect-ratio buckets differ in shape). The latent *sample* is still drawn every step from
  the step's generator (`ModelAdapter.latents_from_moments`), in the same order as without the cache,
  so a cached run draws the same latents, timesteps and noise as an uncached one. The VAE's encoder
  half is then freed; its decoder stays for validation.
* Text: `ModelAdapter.encode_text` of every distinct caption a row can carry in any epoch (each of
  its captions, and the empty prompt that `--proportion_empty_prompts` and the unconditional branch
  use) is computed once; rows then carry their caption's cached entries (`cached_text/<key>`), chosen
  per (seed, epoch, row) exactly as the captions are, so caption dropout keeps working. The validation
  prompts are encoded with the pipeline's own `encode_prompt` (`ModelAdapter.validation_prompt_kwargs`)
  before the text encoders are freed.

Randomness that caching would freeze is refused, not cached per variant: `--random_flip`, and the
random square crop (`--cache_latents` needs `--center_crop` or `--aspect_ratio_buckets`, which
centre-crops). Under several processes every process caches every row: its shard of the batches changes
every epoch (the seeded permutation), so each needs all of them; a resumed run rebuilds the same cache,
and the data position is still (seed, epoch, batches seen), so resume stays exact.

The trainer keeps both caches on disk, in `.training_cache_<process>` in the output folder or, with
`--training_cache_dir`, in a folder of this run's own there (`training_cache_root`), as safetensors shards read back row by row and removed when training ends
(`training/cache_store.py`), not in CPU memory: a data set's FLUX.1 embeddings are GBs. `cache_latents` /
`cache_text` without a store keep them in memory (a list, a dict).

Freed encoders are dropped (the adapter's reference becomes None). When the run writes a whole pipeline
at the end (full fine-tuning, or a LoRA on a model trained from scratch, whose `base_model/` is written),
their weights are first stashed as safetensors in the output folder and put back only while saving.
"""

from __future__ import annotations

import gc
import os
import shutil
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

STASH_DIR = ".freed_encoders"
CACHE_DIR_PREFIX = ".training_cache_"  # + the process index: each process caches every row (see above)


def validate_caching_args(args) -> None:
    """Checks of the three flags that need no model (called by `validate_args`); one-line UsageErrors."""
    from .args import UsageError

    caching = [flag for flag, on in (("--cache_latents", args.cache_latents),
                                     ("--cache_text_embeddings", args.cache_text_embeddings)) if on]
    if getattr(args, "training_cache_dir", None) and not caching:
        raise UsageError("--training_cache_dir is where --cache_latents / --cache_text_embeddings keep their cache: add "
                         "one of them, or drop --training_cache_dir")
    if getattr(args, "training_cache_dir", None) and os.path.isfile(args.training_cache_dir):
        raise UsageError(f"--training_cache_dir {args.training_cache_dir} is a file: give a folder (it is created)")
    if args.cache_text_embeddings and args.train_text_encoder:
        raise UsageError("--cache_text_embeddings freezes the text encoder's outputs, --train_text_encoder trains it: "
                         "drop one of them")
    if args.cache_latents and args.random_flip:
        raise UsageError("--cache_latents would freeze --random_flip's draw (one flip for the whole run): drop --random_flip")
    if args.cache_latents and not (args.center_crop or args.aspect_ratio_buckets):
        raise UsageError("--cache_latents would freeze the random crop: add --center_crop (or --aspect_ratio_buckets)")
    if caching and args.retention == "bank":
        raise UsageError(f"{caching[0]} caches the training data, but the knowledge bank is encoded every step: "
                         f"drop {caching[0]} or use --retention kd")
    if args.bucket_step is not None and not args.aspect_ratio_buckets:
        raise UsageError("--bucket_step is the aspect-ratio buckets' step: add --aspect_ratio_buckets, or drop it")
    # (whether the step is a multiple of the model's latent patch is known once the model is loaded: loop.bucket_step)
    if args.bucket_step is not None and args.bucket_step < 1:
        raise UsageError(f"--bucket_step {args.bucket_step}: the buckets' step must be a positive number of pixels, e.g. 64")
    if args.bucket_step is not None and args.resolution is not None and args.bucket_step > args.resolution:
        raise UsageError(f"--bucket_step {args.bucket_step} is larger than --resolution {args.resolution}: no bucket "
                         "fits; use a step of at most resolution / 8 (64 at 512 pixels and above)")
    if args.aspect_ratio_buckets and args.retention == "bank":
        raise UsageError("--aspect_ratio_buckets: the knowledge bank's square images cannot share a batch with "
                         "bucketed ones: drop --aspect_ratio_buckets or use --retention kd")
    if args.model_type == "unet" and (args.aspect_ratio_buckets or args.cache_latents):
        flag = "--aspect_ratio_buckets" if args.aspect_ratio_buckets else "--cache_latents"
        raise UsageError(f"{flag} is for latent models: --model_type unet trains pixels (use sd, controlnet or a latent dit)")
    if args.cache_text_embeddings and args.model_type in ("unet", "dit"):
        raise UsageError(f"--cache_text_embeddings: --model_type {args.model_type} has no text encoder, drop it")


def check_adapter_support(args, adapter) -> None:
    """Checks that need the loaded model (a pixel-space DiT, a type without the caching hooks)."""
    if (args.aspect_ratio_buckets or args.cache_latents) and not adapter.latent:
        flag = "--aspect_ratio_buckets" if args.aspect_ratio_buckets else "--cache_latents"
        raise ValueError(f"{flag} is for latent models: this {args.model_type} model trains pixels (no VAE); "
                         "use a latent model (e.g. --model_config_name_or_path tiny-latent)")
    if args.cache_latents and not adapter.supports_latent_caching:
        raise ValueError(f"--cache_latents: --model_type {args.model_type} encodes pixels its own way (it needs "
                         "encode_moments / latents_from_moments); drop --cache_latents")
    if args.cache_text_embeddings and not adapter.supports_text_caching:
        raise ValueError(f"--cache_text_embeddings: --model_type {args.model_type} does not implement encode_text; "
                         "drop --cache_text_embeddings")


class TrainingCache:
    """What was encoded: `latents[row]` (the VAE posterior's moments) and `text[caption]` (the adapter's
    `encode_text` entries for one caption, without the batch axis), on the CPU: a list and a dict, or
    `StoredRows` and `StoredCaptions` over a `TensorStore` on disk (the trainer's); either may be None.
    `crop_coords[row]`: the row's `(original_sizes, crop_top_lefts)` when the dataset records them (SDXL's
    micro-conditioning; deterministic, since caching refuses random crops and flips)."""

    def __init__(self, latents=None, text=None, crop_coords=None, text_dtypes=None, text_lengths=None):
        self.owns_parent = False  # the stores' parent folder is this run's own (`training_cache_root`)
        self.latents = latents
        self.text = text
        self.crop_coords = crop_coords
        self.text_dtypes = text_dtypes or {}  # key -> the dtype the encoder returned, where stored narrower
        self.text_lengths = text_lengths or {}  # key -> the length `encode_text` zero-padded it to, where stored cut

    def text_fields(self, caption: str) -> dict:
        """A row's cached text entries for `caption` (keys `cached_text/<key>`), as the encoder returned them: in
        its dtype, and zero-padded again to its length where the cache keeps the caption's own tokens only."""
        from ..models.base import ModelAdapter

        fields = {}
        for key, value in self.text[caption].items():
            value = value.to(self.text_dtypes.get(key, value.dtype))
            length = self.text_lengths.get(key)
            if length is not None and value.shape[0] < length:
                value = torch.cat([value, value.new_zeros(length - value.shape[0], *value.shape[1:])])
            fields[ModelAdapter.CACHED_TEXT_PREFIX + key] = value
        return fields

    def nbytes(self) -> int:
        """Bytes the cached tensors take (on disk for a stored cache)."""
        total = sum(store.nbytes for store in self.stores)
        if self.latents is not None and not isinstance(self.latents, _Stored):
            total += sum(t.numel() * t.element_size() for t in self.latents)
        if self.text is not None and not isinstance(self.text, _Stored):
            for entries in self.text.values():
                total += sum(t.numel() * t.element_size() for t in entries.values())
        return total

    @property
    def stores(self) -> list:
        """The `TensorStore`s the cache reads from (none for an in-memory cache)."""
        return list({id(part.store): part.store for part in (self.latents, self.text) if isinstance(part, _Stored)}.values())

    def remove_files(self) -> None:
        """Delete the stores' files (training is over: nothing reads the cache again), and their parent folder
        once no process's cache is left in it, when it is this run's own folder under --training_cache_dir."""
        for store in self.stores:
            store.remove()
            if self.owns_parent:
                try:  # (fails while another process's cache is still there: the last one removes it)
                    os.rmdir(os.path.dirname(store.directory))
                except OSError:
                    pass


class _Stored:
    """A cache part whose tensors are in a `TensorStore` (written as they are cached, read as rows need them)."""

    def __init__(self, store):
        self.store = store


class StoredRows(_Stored):
    """`latents[row]`, a list's indexing over the store's `latents/<row>` tensors."""

    def __init__(self, store, length: int):
        super().__init__(store)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __setitem__(self, row: int, value: torch.Tensor) -> None:
        self.store.add(f"latents/{int(row)}", value)

    def __getitem__(self, row: int) -> torch.Tensor:
        if not 0 <= int(row) < self.length:
            raise IndexError(f"row {row} of a cache of {self.length} rows")
        return self.store.get(f"latents/{int(row)}")

    def __iter__(self):
        return (self[row] for row in range(self.length))


class StoredCaptions(_Stored):
    """`text[caption]`: a dict's indexing over the store's `text/<n>/<key>` tensors (the n-th caption cached);
    the captions and their keys stay in memory."""

    def __init__(self, store):
        super().__init__(store)
        self._entries = {}  # caption -> (n, its keys)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, caption) -> bool:
        return caption in self._entries

    def __iter__(self):
        return iter(self._entries)

    def __setitem__(self, caption: str, entries: dict) -> None:
        number = len(self._entries)
        for key, value in entries.items():
            self.store.add(f"text/{number}/{key}", value)
        self._entries[caption] = (number, list(entries))

    def __getitem__(self, caption: str) -> dict:
        number, keys = self._entries[caption]
        return {key: self.store.get(f"text/{number}/{key}") for key in keys}


def _chunks(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def cache_latents(adapter, dataset, batch_size: int, disable_progress: bool = False, store=None) -> tuple:
    """The VAE posterior (`adapter.encode_moments`) of every row of a `TrainingDataset`, one tensor per row
    (a list in CPU memory, or `StoredRows` written into `store`, a `TensorStore`), and each row's crop
    coordinates (None unless the dataset records them). Rows are encoded `batch_size` at a time, grouped by
    shape (aspect-ratio buckets)."""
    by_size = {}
    for row in range(len(dataset)):
        by_size.setdefault(dataset.bucket_size(row), []).append(row)
    latents = [None] * len(dataset) if store is None else StoredRows(store, len(dataset))
    crop_coords = [None] * len(dataset) if getattr(dataset, "crop_coords", False) else None
    with tqdm(total=len(dataset), desc="caching latents", disable=disable_progress) as progress:
        for rows in by_size.values():
            for chunk in _chunks(rows, batch_size):
                images = [dataset.transformed_image(row, with_crop_coords=True) for row in chunk]
                pixels = torch.stack([image[0] for image in images])
                for row, image, moments in zip(chunk, images, adapter.encode_moments(pixels).cpu()):
                    latents[row] = moments.clone()
                    if crop_coords is not None:
                        crop_coords[row] = image[1:]
                progress.update(len(chunk))
    return latents, crop_coords


def _narrowest_exact(value: torch.Tensor) -> torch.Tensor:
    """`value` in bfloat16 or float16 where that holds every entry exactly, else as it is. The families' encoders
    return float32 (`.float()` of what a bf16 / fp16 text encoder computed under mixed precision): those values
    fit the half type they came from, and a cache of thousands of captions (FLUX.1: 512 x 4096 values each) then
    takes half the memory for the same bits."""
    if value.dtype != torch.float32:
        return value
    for dtype in (torch.bfloat16, torch.float16):
        narrow = value.to(dtype)
        if torch.equal(narrow.to(torch.float32), value):
            return narrow
    return value


def _without_padding(entries: dict, mask_key: str, length: int) -> dict:
    """One caption's entries cut to its own tokens where `encode_text` zero-padded them to `length` positions
    (`ModelAdapter.padded_text`): the mask's leading ones, every padded position zero. Entries that do not have
    that form are kept whole, so that reading them back (`TrainingCache.text_fields`) gives the same bits."""
    mask = entries.get(mask_key)
    if mask is None or mask.dim() != 1 or mask.shape[0] != length:
        return entries
    tokens = int(mask.count_nonzero())
    padded = {key: value for key, value in entries.items() if value.dim() >= 1 and value.shape[0] == length}
    if not bool((mask[:tokens] == 1).all()) or any(value[tokens:].count_nonzero() for value in padded.values()):
        return entries
    return {key: value[:tokens] if key in padded else value for key, value in entries.items()}  # (cache_text copies)


@torch.no_grad()
def cache_text(adapter, dataset, batch_size: int, disable_progress: bool = False, store=None) -> dict:
    """`adapter.encode_text` of every caption variant of a `TrainingDataset` (`caption_variants`), as
    `TrainingCache`'s arguments: the entries per caption (`text`: a dict in CPU memory, or `StoredCaptions`
    written into `store`, a `TensorStore`), each kept in the narrowest dtype that holds it
    exactly and, for a type whose `encode_text` pads to a fixed length (`padded_text`: Qwen-Image's 512 tokens),
    cut to the caption's own tokens; the dtypes (`text_dtypes`) and lengths (`text_lengths`) to return them in."""
    from torch.utils.data import default_collate

    padding = getattr(adapter, "padded_text", None)  # (mask key, length) or None
    captions = dataset.caption_variants()
    text, dtypes, lengths = ({} if store is None else StoredCaptions(store)), {}, {}
    with tqdm(total=len(captions), desc="caching text embeddings", disable=disable_progress) as progress:
        for chunk in _chunks(captions, batch_size):
            encoded = adapter.encode_text(default_collate([dataset.text_fields(c) for c in chunk]))
            for key, value in encoded.items():
                dtypes[key] = value.dtype
                if padding is not None and value.dim() >= 2 and value.shape[1] == padding[1]:
                    lengths[key] = padding[1]
            for i, caption in enumerate(chunk):
                entries = {key: value[i].detach().cpu() for key, value in encoded.items()}
                if padding is not None:
                    entries = _without_padding(entries, *padding)
                # (clone: a row of the batch would keep the whole batch's storage alive)
                text[caption] = {key: _narrowest_exact(value.clone()) for key, value in entries.items()}
            progress.update(len(chunk))
    return {"text": text, "text_dtypes": dtypes, "text_lengths": lengths}


def build_training_cache(args, accelerator, adapter, dataset, batch_size: int) -> TrainingCache:
    """Encode what the flags ask for into this process's store on disk, `.training_cache_<process>` in
    `training_cache_root(args)`, and attach it to `dataset` (rows then carry cached entries).
    `TrainingCache.remove_files` deletes it."""
    from .cache_store import TensorStore

    disable = not accelerator.is_local_main_process
    root = training_cache_root(args)
    if accelerator.is_main_process:
        remove_unused_caches(root, accelerator.num_processes)
    store = TensorStore(os.path.join(root, f"{CACHE_DIR_PREFIX}{accelerator.process_index}"))
    latents, crop_coords = (cache_latents(adapter, dataset, batch_size, disable, store) if args.cache_latents
                            else (None, None))
    text = cache_text(adapter, dataset, batch_size, disable, store) if args.cache_text_embeddings else {}
    store.flush()
    cache = TrainingCache(latents=latents, crop_coords=crop_coords, **text)
    cache.owns_parent = root != args.output_dir
    dataset.cache = cache
    accelerator.print(f"cached {len(cache.latents or [])} latents and {len(cache.text or {})} captions "
                      f"({cache.nbytes() / 2**20:.1f} MiB on disk in {store.directory}, read back as batches need them)")
    return cache


def training_cache_root(args) -> str:
    """The folder that holds this run's `.training_cache_<process>` folders: the output folder, or under
    `--training_cache_dir` a folder of this output folder's own (its name and a hash of its absolute path): one
    scratch folder given to several runs at once must not let one run's caches replace or delete another's."""
    if not getattr(args, "training_cache_dir", None):
        return args.output_dir
    import hashlib

    output = os.path.abspath(args.output_dir)
    key = hashlib.sha256(output.encode()).hexdigest()[:12]
    return os.path.join(args.training_cache_dir, f"{os.path.basename(output.rstrip(os.sep)) or 'output'}-{key}")


def remove_unused_caches(root: str, num_processes: int) -> None:
    """Delete the cache folders in ``root`` (`training_cache_root`) of process indexes this run does not have
    (`.training_cache_4` to `_7` of a killed 8-process run resumed on 4): no process of this run writes them again."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        index = name[len(CACHE_DIR_PREFIX):]
        if name.startswith(CACHE_DIR_PREFIX) and index.isdigit() and int(index) >= num_processes:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def probe_cached_batch(args, adapter, dataset) -> None:
    """Encode one cached row with the encoders gone (a generator of its own: the run's stream is not
    touched), so that a model type whose `encode_batch` / `conditioning` still reads pixels or calls a
    text encoder fails here, in one line, rather than at the first step."""
    from torch.utils.data import default_collate

    batch = default_collate([dataset[0]])
    try:
        adapter.encode_batch(batch, generator=torch.Generator(device="cpu").manual_seed(0))
    except (KeyError, AttributeError, TypeError) as err:
        flags = " / ".join(f for f, on in (("--cache_latents", args.cache_latents),
                                           ("--cache_text_embeddings", args.cache_text_embeddings)) if on)
        raise ValueError(f"{flags}: --model_type {args.model_type} encodes batches without the cache hooks "
                         f"({type(err).__name__}: {err}); drop {flags}") from err


# ------------------------------------------------------------------------------------------ freeing


def _tied_names(module) -> dict:
    """``{alias: first name}`` for every parameter of ``module`` reachable under more than one name."""
    first, aliases = {}, {}
    for key, value in module.named_parameters(remove_duplicate=False):
        if id(value) in first:
            aliases[key] = first[id(value)]
        else:
            first[id(value)] = key
    return aliases


class FreedEncoders:
    """The encoders dropped after caching, with their weights stashed as safetensors when the run must
    write them again at the end (`restored` puts them back while saving)."""

    def __init__(self, adapter, text: dict, vae: dict, stash_dir=None):
        self.adapter = adapter
        self.text = text  # adapter attribute -> module
        self.vae = vae  # vae attribute -> module
        self.stash_dir = stash_dir
        self.tied = {}  # (kind, name) -> {alias: first name} of tied parameters (see `stash`)

    def _modules(self):
        return [("text", name, module) for name, module in self.text.items()] + \
               [("vae", name, module) for name, module in self.vae.items()]

    def stash(self):
        """Write every freed module's parameters and buffers (non-persistent ones too) to the stash, then
        move the module to the meta device: its memory is released, its structure kept."""
        from safetensors.torch import save_file

        os.makedirs(self.stash_dir, exist_ok=True)
        for kind, name, module in self._modules():
            # tied parameters (T5's `shared` and `encoder.embed_tokens`) are stored once, under their first
            # name; moving to meta unties them, so `restored` ties them again from this record
            self.tied[(kind, name)] = _tied_names(module)
            tensors = {f"p:{k}": v.detach().contiguous().cpu() for k, v in module.named_parameters()}
            tensors.update({f"b:{k}": v.detach().contiguous().cpu() for k, v in module.named_buffers()})
            save_file(tensors, os.path.join(self.stash_dir, f"{kind}-{name}.safetensors"))
            module.to("meta")

    @contextmanager
    def restored(self):
        """The freed modules back in place (CPU, float32) for as long as the block runs (saving)."""
        if self.stash_dir is None:
            yield
            return
        from safetensors.torch import load_file

        # what stands in each freed module's place (None, or a family's placeholder: qwenimage's empty VAE
        # encoder), put back afterwards, since validation samples after the save
        owners = [(self.adapter if kind == "text" else self.adapter.vae, name) for kind, name, _ in self._modules()]
        placeholders = [getattr(owner, name, None) for owner, name in owners]
        for kind, name, module in self._modules():
            tensors = load_file(os.path.join(self.stash_dir, f"{kind}-{name}.safetensors"))
            module.to_empty(device="cpu")
            for alias, first in self.tied.get((kind, name), {}).items():
                owner, _, attribute = alias.rpartition(".")
                setattr(module.get_submodule(owner), attribute, module.get_parameter(first))
            with torch.no_grad():
                for key, value in list(module.named_parameters()) + list(module.named_buffers()):
                    prefix = "p:" if isinstance(value, torch.nn.Parameter) else "b:"
                    value.copy_(tensors[prefix + key])
            module.float()  # as `finish` lifts every frozen part before saving
            setattr(self.adapter if kind == "text" else self.adapter.vae, name, module)
        try:
            yield
        finally:
            for (owner, name), placeholder, (_, _, module) in zip(owners, placeholders, self._modules()):
                setattr(owner, name, placeholder)
                module.to("meta")

    def remove_stash(self):
        if self.stash_dir is not None:
            shutil.rmtree(self.stash_dir, ignore_errors=True)


def free_encoders(args, accelerator, adapter) -> FreedEncoders:
    """Drop what was cached: the text encoders (`--cache_text_embeddings`), the VAE's encoder half
    (`--cache_latents`). Their weights are stashed in the output folder only when the run will write a
    whole pipeline (full fine-tuning, or a `base_model/` copy under a LoRA trained from scratch)."""
    text = adapter.free_text_encoders() if args.cache_text_embeddings else {}
    vae = adapter.free_vae_encoder() if args.cache_latents else {}
    writes_pipeline = args.rank is None or not adapter.model_from_pretrained
    stash_dir = None
    if writes_pipeline and accelerator.is_main_process and (text or vae):
        stash_dir = os.path.join(args.output_dir, STASH_DIR)
    freed = FreedEncoders(adapter, text, vae, stash_dir)
    if stash_dir is not None:
        freed.stash()
    else:  # nothing to put back: hold no reference, so the memory is released
        freed.text, freed.vae = {}, {}
    del text, vae
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return freed
