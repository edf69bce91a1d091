"""``dit``: a ``DiTTransformer2DModel`` (Peebles & Xie 2023), class-conditional, on pixels or VAE latents.

DiT's adaLN-Zero blocks always take a class label. The label embedding has ``num_embeds_ada_norm``
classes plus one null class at index ``num_embeds_ada_norm`` (diffusers' DiT drops labels to it
with probability 0.1 during training, for classifier-free guidance). So:

- a batch with ``class_labels`` trains those classes (load with ``num_classes`` = the class count);
- a batch without them trains the null class, i.e. an unconditional model; from scratch without
  ``num_classes`` the DiT gets a single class and is used through its null class only.

A pretrained DiT fine-tuned on a data set with another class count keeps its label table, as the
Diff-Tuning authors' code does (thuml/Diffusion-Tuning ``train.py``: ``num_classes=1000`` whatever the
data, ``load_state_dict(strict=False)``): the data set's classes 0..K-1 train the pretrained rows
0..K-1, or the rows a class map names (``--class_map``, :func:`parse_class_map`), and the null row
stays the pretrained null row in every block, so knowledge retention on the null class (Diff-Tuning's
bank) anchors what was pretrained and the frozen teacher is the pretrained model itself. Only a data
set with more classes than the table grows it (:func:`grow_label_tables`). Sampling defaults to the
data set's classes through the map, and the saved folder records the map (``class_map.json``).

Pixel space (preset ``tiny``, or a pretrained folder without ``vae/``) samples through this
project's ``PixelDiTPipeline``, with DDPM-family and flow-matching schedulers alike; latent space
(preset ``tiny-latent``, or a pretrained ``DiTPipeline`` folder) through diffusers' ``DiTPipeline``,
which cannot step a flow-matching scheduler (``ModelAdapter.load`` refuses that combination). A DiT
with learned variance (``out_channels = 2 * in_channels``, as DiT-XL-2) is trained on its first
``in_channels`` outputs, the noise prediction. The DiT and Diff-Tuning reference code also keep the
variational-bound (vb) term that trains the variance half; it is left out here because diffusers'
samplers never read that half (``DiTPipeline`` splits it off and steps with the scheduler's fixed
variance), so it would train outputs nothing downstream uses. A run that needs learned-variance
sampling outside diffusers should keep the reference code's loss.
"""

import torch

import json
import os

from .base import CLASS_MAP_NAME, ModelAdapter, _copy_scheduler, check_class_labels, repeat_to

# Beside a saved pipeline: which pretrained label row each data-set class trained (see the module docstring).
# DiT's initialisation of its label table (Peebles & Xie, facebookresearch/DiT models.py
# initialize_weights: normal, std 0.02), for rows a grown table adds.
LABEL_TABLE_INIT_STD = 0.02


def _label_embeddings(model) -> list:
    from diffusers.models.embeddings import LabelEmbedding

    return [module for module in model.modules() if isinstance(module, LabelEmbedding)]


@torch.no_grad()
def grow_label_tables(model, num_classes: int, generator=None) -> None:
    """Give every block's label table ``num_classes`` class rows, in place, keeping what was pretrained.

    Rows 0..N-1 keep the pretrained classes, the null row moves from N to ``num_classes`` with its
    pretrained values, and the new rows N..num_classes-1 start as DiT initialises its table (normal,
    std 0.02), drawn once for all blocks so that equal per-block copies stay equal (DiffFit shares
    them, see ``peft_modes``). Only for more classes than the table has (fewer keep the table)."""
    tables = _label_embeddings(model)
    old = model.config.num_embeds_ada_norm
    if num_classes <= old:
        raise ValueError(f"grow_label_tables: the table already has {old} classes")
    new_rows = None
    for module in tables:
        weight = module.embedding_table.weight
        has_null = weight.shape[0] == module.num_classes + 1
        if new_rows is None:
            new_rows = torch.randn((num_classes - old, weight.shape[1]), generator=generator, dtype=torch.float32)
        table = torch.nn.Embedding(num_classes + has_null, weight.shape[1], device=weight.device, dtype=weight.dtype)
        table.weight.requires_grad_(weight.requires_grad)
        table.weight[:old] = weight[:old]
        table.weight[old:num_classes] = (LABEL_TABLE_INIT_STD * new_rows).to(weight.device, weight.dtype)
        if has_null:
            table.weight[num_classes] = weight[old]
        module.embedding_table = table
        module.num_classes = num_classes
    model.register_to_config(num_embeds_ada_norm=num_classes)


def _rebuild_position_embedding(model) -> None:
    """`model.pos_embed` as a `DiTTransformer2DModel` of the new `config.sample_size` builds it, with its trained
    patch projection. At another input size, the pretrained `PatchEmbed` recomputes its sin-cos table with the old
    grid as `base_size` (positions scaled to the old grid), while the saved model, rebuilt from its config, uses
    the new grid as its base: the saved folder computed another function (a difference of 1.2 on outputs of mean
    0.5). Rebuilt here, training and the saved model use the same table."""
    old = model.pos_embed
    size = model.config.sample_size
    new = type(old)(height=size, width=size, patch_size=model.config.patch_size, in_channels=model.config.in_channels,
                    embed_dim=model.inner_dim)
    new.proj.load_state_dict(old.proj.state_dict())
    new.proj.to(old.proj.weight.device, old.proj.weight.dtype)
    if new.pos_embed is not None:  # the sin-cos table in the old one's dtype (float32, as PatchEmbed builds it)
        reference = old.pos_embed if old.pos_embed is not None else new.pos_embed
        new.pos_embed = new.pos_embed.to(device=old.proj.weight.device, dtype=reference.dtype)
    model.pos_embed = new
    model.height = model.width = size


def saved_class_rows(folder) -> list | None:
    """The label rows of the data set's classes recorded in a saved folder's ``class_map.json`` (what
    :meth:`DiTAdapter.save` writes for a DiT trained on another class count), or None."""
    path = os.path.join(os.fspath(folder), CLASS_MAP_NAME) if folder is not None else None
    if path is None or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return [int(row) for row in json.load(f)["rows"]]


def _read_class_map(spec: str):
    """A JSON file, inline JSON, or a comma list of rows -> a dict or a list."""
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            text = f.read()
    else:
        text = spec.strip()
    if text.startswith(("{", "[")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--class_map is not valid JSON ({err.msg}, line {err.lineno}): give a JSON object "
                             "{\"class name\": row}, a JSON list or a comma list of rows") from None
    if spec.lower().endswith(".json"):
        raise ValueError(f"--class_map {spec!r} does not exist: give a JSON file, inline JSON or a comma list of rows")
    return [item.strip() for item in text.split(",")]


def parse_class_map(spec: str, class_names, num_model_classes: int) -> list:
    """The pretrained label row of each data-set class (index = the data set's class id), from ``--class_map``.

    ``spec`` is a JSON object ``{"class name": row}`` (inline or a ``.json`` file; a class may also be
    named by its id, ``"0"``), or the rows in the data set's class-id order, as a JSON list or a
    comma list (``"207,360,387"``). Every data-set class needs a row of its own among the model's
    classes 0..N-1 (the null row N is the unconditional branch, not a class). Any problem is a
    one-line ``ValueError`` naming ``--class_map``.
    """
    if not class_names:
        raise ValueError("--class_map maps the data set's classes, but the data set has no class column: "
                         "pass --class_column or drop --class_map")
    names = [str(name) for name in class_names]
    raw = _read_class_map(spec)
    if isinstance(raw, dict):
        by_name = {}
        for key, row in raw.items():
            key = str(key)
            if key in names:
                by_name[names.index(key)] = row
            elif key.isdigit() and int(key) < len(names):
                by_name[int(key)] = row
            else:
                raise ValueError(f"--class_map names {key!r}, which is not a class of the data set "
                                 f"({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})")
        missing = [names[i] for i in range(len(names)) if i not in by_name]
        if missing:
            raise ValueError(f"--class_map has no row for the data set's class {missing[0]!r}: give every class a row")
        rows = [by_name[i] for i in range(len(names))]
    elif isinstance(raw, list):
        rows = raw
        if len(rows) != len(names):
            raise ValueError(f"--class_map gives {len(rows)} rows for the data set's {len(names)} classes "
                             f"({', '.join(names[:10])}): give one row per class, in this order")
    else:
        raise ValueError("--class_map must be a JSON object {\"class name\": row}, a JSON list or a comma list of rows")
    parsed = []
    for name, row in zip(names, rows):
        try:
            value = int(row) if not isinstance(row, (bool, float)) else None
        except (TypeError, ValueError):
            value = None
        if value is None:
            raise ValueError(f"--class_map row {row!r} for {name!r} is not a class number of the pretrained DiT")
        if not 0 <= value < num_model_classes:
            null = f"; {num_model_classes} is its null class" if value == num_model_classes else ""
            raise ValueError(f"--class_map maps {name!r} to class {value}, which the pretrained DiT does not have "
                             f"(its classes are 0..{num_model_classes - 1}{null})")
        parsed.append(value)
    seen = {}
    for name, value in zip(names, parsed):
        if value in seen:
            raise ValueError(f"--class_map maps {seen[value]!r} and {name!r} to the same class {value}: "
                             "give each class its own row")
        seen[value] = name
    return parsed


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

        class_rows = grown_label_table = None
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
            model, from_pretrained = source.load(DiTTransformer2DModel, subfolder=subfolder, denoiser=True), True
            pretrained_classes = model.config.num_embeds_ada_norm
            saved_rows = saved_class_rows(source.path) if os.path.isdir(os.fspath(source.path)) else None
            if num_classes is not None and saved_rows is not None and len(saved_rows) == num_classes:
                # a folder this project saved from a class-mapped run: its classes keep their rows
                class_rows = saved_rows
            elif num_classes is not None and num_classes < pretrained_classes:
                # fewer classes: the pretrained table is kept and they train its rows 0..K-1, as the
                # Diff-Tuning authors' code does (see the module docstring)
                class_rows = list(range(num_classes))
            elif num_classes is not None and num_classes > pretrained_classes:
                grow_label_tables(model, num_classes)  # more classes: the pretrained rows and null row kept
                grown_label_table = (pretrained_classes, num_classes)
                from_pretrained = False  # the base is no longer the pretrained folder's (a LoRA output carries it)
            if resolution is not None and resolution // scale != model.config.sample_size:
                # pipelines read sample_size; the position table is rebuilt for it as well
                model.register_to_config(sample_size=resolution // scale)
                _rebuild_position_embedding(model)
                # a LoRA output then carries its base (`base_model/` at this size): the pretrained folder, loaded
                # back, would compute with its own size's table
                from_pretrained = False
        channels = vae.config.in_channels if vae is not None else model.config.in_channels
        if num_channels is not None and num_channels != channels:
            raise ValueError(f"the pretrained DiT takes {channels} image channels, the data has {num_channels}")
        # the label names of a pretrained DiTPipeline (ImageNet's, in facebook/DiT-XL-2-256's model_index.json),
        # which DiTPipeline.get_label_ids reads; kept for the saved pipeline, with the rows a data set's classes
        # trained renamed after them (`saved_id2label`)
        id2label = (source.index or {}).get("id2label") if source is not None and vae is not None else None
        return {
            "model": model,
            "vae": vae,
            "num_channels": channels,
            "sample_size": model.config.sample_size,
            "model_from_pretrained": from_pretrained,
            "class_rows": class_rows,
            "id2label": id2label,
            "grown_label_table": grown_label_table,
        }

    def __init__(self, model, noise_scheduler, class_rows=None, id2label=None, grown_label_table=None, **kwargs):
        super().__init__(model, noise_scheduler, **kwargs)
        self.id2label = id2label
        # (pretrained class count, the run's) when the label table grew for this run's classes (`grow_label_tables`)
        self.grown_label_table = grown_label_table
        self.class_dropout_prob = take_over_label_dropout(model)
        # The label-table row of each data-set class (index = class id); None: the labels are the rows.
        self.class_rows = class_rows
        self.class_names = None

    @property
    def num_classes(self) -> int:
        """Classes of the label embedding (not counting the null class)."""
        return self.model.config.num_embeds_ada_norm

    def set_data_classes(self, class_names=None, class_map=None) -> None:
        """Tell the adapter the data set's classes (names in class-id order, or None) and ``--class_map``.

        With a class map (:func:`parse_class_map`, checked against this model's classes) the data
        set's class i trains row ``class_rows[i]``; without one the rows chosen at load time stay
        (0..K-1 of a kept table, or the labels themselves). The names go into ``class_map.json``."""
        if class_map is not None:
            self.class_rows = parse_class_map(class_map, class_names, self.num_classes)
        if class_names is not None:
            self.class_names = [str(name) for name in class_names]

    @property
    def class_map_record(self):
        """What ``class_map.json`` holds, or None when the labels are the rows."""
        if self.class_rows is None:
            return None
        names = self.class_names or [str(i) for i in range(len(self.class_rows))]
        return {"class_names": names, "rows": list(self.class_rows), "null_row": self.null_class,
                "num_model_classes": self.num_classes}

    def save(self, output_dir: str, model=None, lora: bool = False):
        """:meth:`ModelAdapter.save`, plus ``class_map.json`` when the data set's classes are mapped to rows."""
        super().save(output_dir, model, lora=lora)
        record = self.class_map_record
        if record is not None:
            with open(os.path.join(output_dir, CLASS_MAP_NAME), "w", encoding="utf-8") as f:
                json.dump(record, f, indent=2)

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
            rows = batch["pixel_values"] if "pixel_values" in batch else batch["latent_moments"]  # --cache_latents
            labels = torch.full((rows.shape[0],), self.null_class, dtype=torch.long, device=rows.device)
        else:
            if self.class_rows is not None:
                # the data set's class ids -> the label-table rows they train (the kept pretrained table)
                check_class_labels(labels, len(self.class_rows), "the data set's class map")
                labels = torch.as_tensor(self.class_rows, device=labels.device)[labels.long()]
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

    @property
    def saved_id2label(self) -> dict | None:
        """The label names the saved pipeline gets: the pretrained ones, except the rows the data set's classes
        trained (`class_rows`), which take the data set's class names (a class-mapped fine-tune's row 0 is the
        data set's class 0, no longer the pretrained 'tench'); None without pretrained names."""
        if not self.id2label:
            return None
        names = dict(self.id2label)
        if self.class_rows is not None and self.class_names:
            for row, name in zip(self.class_rows, self.class_names):
                names[str(row)] = str(name)
        return names

    def make_pipeline(self, model=None, scheduler=None):
        from diffusers import DiTPipeline

        from .pipelines import PixelDiTPipeline

        model = model if model is not None else self.model
        scheduler = _copy_scheduler(scheduler if scheduler is not None else self.noise_scheduler)
        if self.vae is not None:
            id2label = self.saved_id2label
            pipeline = DiTPipeline(transformer=model, vae=self.vae, scheduler=scheduler, id2label=id2label)
            if id2label:
                # DiTPipeline takes id2label but does not record it: in its config it reaches model_index.json, so
                # that from_pretrained passes it back (pipe.get_label_ids("golden retriever") then works)
                pipeline.register_to_config(id2label=id2label)
        else:
            pipeline = PixelDiTPipeline(transformer=model, scheduler=scheduler)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def _sample(self, pipeline, num_images, generator, num_inference_steps, class_labels=None, guidance_scale=None, **unused):
        """``class_labels`` are label-table rows, as the pipeline takes them; by default the data set's
        classes through the class map (a kept pretrained table), else every class of the table."""
        num_classes = pipeline.transformer.config.num_embeds_ada_norm
        if class_labels is None and self.class_rows is not None:
            class_labels = list(self.class_rows)  # the data set's classes, through the map
        elif class_labels is None:
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
