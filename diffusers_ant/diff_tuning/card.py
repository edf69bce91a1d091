"""The values of the Diff-Tuning model card (`model_cards/diff_tuning_template.md`) for a `train_ant.py` run.

`diffusers_ant.hub.write_model_card(..., template="diff_tuning_template.md", template_values=card_values(...))`
fills the common parts (model, data, usage snippet, configuration); this adds what Diff-Tuning
trained with: the retention source, the two timestep densities, lambda, the parameter-efficient
mode, the tasks, the knowledge bank's manifest and, for ControlNet, the sudden-convergence step.
"""

from __future__ import annotations

import json
import os

from .convergence import CONVERGENCE_FILE

TEMPLATE = "diff_tuning_template.md"
# manifest entries shown in the card (paths in it are already relative or Hub ids)
_BANK_KEYS = ("source_model", "revision", "model_type", "num_images", "resolution", "channels", "scheduler",
              "num_inference_steps", "guidance_scale", "seed")


def _bank_rows(manifest) -> list:
    """The knowledge bank's settings for the card: a local source model by its folder name (the manifest names it
    relative to the bank, not to this model), and the diffusers_ant version that built the bank."""
    if not manifest:
        return []
    rows = [(key, manifest[key]) for key in _BANK_KEYS if manifest.get(key) is not None]
    if manifest.get("source_model_local"):
        rows = [(key, os.path.basename(os.path.normpath(value)) if key == "source_model" else value)
                for key, value in rows]
    version = (manifest.get("versions") or {}).get("diffusers_ant")
    return rows + ([("diffusers_ant", version)] if version else [])


def card_values(args, finetune_summary, task_names, output_dir: str, manifest: dict | None = None,
                intervals=None) -> dict:
    """Template values for a Diff-Tuning run (`args`: the trainer's parsed arguments; `intervals`: its timestep
    clusters, whose bounds the tasks table gives)."""
    retention_kd = args.retention == "kd"
    if retention_kd:
        retention_line = "distillation: downstream images with the frozen pretrained model's prediction as target"
    else:
        images = (manifest or {}).get("num_images", "?")
        retention_line = f"a knowledge bank of {images} images sampled once from the pretrained model"
        # a class-conditional UNet2DModel has no null class: its bank rows keep their labels (null_condition_batch)
        labelled_unet = args.model_type == "unet" and (getattr(args, "num_classes", None) not in (None, 1)
                                                       or bool(getattr(args, "class_column", None)))
        retention_line += (", trained with their prompts" if args.bank_keep_prompts
                           else ", trained with the class labels they were sampled for (a UNet2DModel has no null class)"
                           if labelled_unet else ", training the unconditional branch (null class / empty prompt)")
    from . import retention_share

    retained = retention_share(args.train_batch_size, args.bank_fraction)
    bounds = list(getattr(intervals, "bounds", intervals) or [])
    tasks = []
    for name in task_names:
        source, _, cluster = name.partition("/")
        retention = source in ("bank", "retention")
        rows = retained if retention else args.train_batch_size - retained
        density = f"∝ (T - t)^{args.retention_exponent:g}" if retention else f"∝ (t + 1)^{args.reconsolidation_exponent:g}"
        # a source's rows per micro-batch are shared by its clusters (each row falls in the one its timestep does):
        # the count on every cluster's row read as that many per cluster (80 rows for a batch of 16)
        where = (f"[{bounds[int(cluster)][0]}, {bounds[int(cluster)][1]}], " if cluster.isdigit() and int(cluster) < len(bounds)
                 else "")
        tasks.append({
            "name": name,
            "samples": f"its share of the {rows} {source} rows per micro-batch" if cluster else f"{rows} per micro-batch",
            "timesteps": f"{where}drawn {density}",
        })
    values = {
        "finetune_line": finetune_summary.description,
        "finetune_mode": finetune_summary.mode,
        "retention": args.retention,
        "retention_line": retention_line,
        "retention_exponent": f"{args.retention_exponent:g}",
        "reconsolidation_exponent": f"{args.reconsolidation_exponent:g}",
        "bank_weight": f"{args.bank_weight:g}",
        "bank_fraction": f"{args.bank_fraction:g}",
        "lora_rank": args.rank,
        "difffit_merged": finetune_summary.mode == "difffit",
        "tasks": tasks,
        "bank_rows": _bank_rows(manifest),
        "summary": ("A 🧨 diffusers model transferred to new data with Diff-Tuning (Zhong et al., NeurIPS 2024), "
                    "trained with diffusers_ant: knowledge retention at low noise, reconsolidation at high noise."),
    }
    convergence_file = os.path.join(output_dir, CONVERGENCE_FILE)
    if getattr(args, "track_convergence", False) and os.path.isfile(convergence_file):  # (not an earlier run's)
        with open(convergence_file, encoding="utf-8") as f:
            record = json.load(f)
        values.update(convergence_step=record.get("converged_step"), convergence_extractor=args.condition_extractor,
                      convergence_distance=args.convergence_distance, convergence_threshold=args.convergence_threshold,
                      convergence_every=args.convergence_steps)
    return values
