"""Where the rows of a training batch come from: the data alone, Diff-Tuning's two sources, DeMe's interval.

`build_sources` returns the `training.step.Source`s of a run; `compose_sources` turns each data
micro-batch into its sources' rows (the knowledge bank's come from their own loader,
`knowledge_bank_dataloader`, read as an endless resumable stream by `cycle_batches`).
"""

from __future__ import annotations

from .components import pixel_resolution


def build_sources(args, intervals, num_timesteps, sampler):
    """The sources of a batch (`training.step.Source`): the data alone, or Diff-Tuning's two, or DeMe's interval.

    * Diff-Tuning (Zhong et al., NeurIPS 2024, Sec. 4): the downstream data ("reconsolidation") draws
      t with probability proportional to (t + 1)^b, favouring high noise; the retention samples
      (knowledge-bank images, or downstream images with the frozen model's prediction as target in
      the distillation variant) draw t proportional to (T - t)^a, favouring low noise, and their loss
      is weighted by lambda (`--bank_weight`). Bank images train the unconditional branch (null class,
      empty prompt) as the authors do, unless `--bank_keep_prompts`; a DiT's distillation rows train
      the null class too, unless `--class_map` names the pretrained class of each data-set class.
    * DeMe (Sec. 3): the data draws t in interval i, or in the whole range with probability
      `--deme_global_prob` (a coin per micro-batch, or per sample; `--deme_antithetic` pairs t with
      lo + hi - t), and adds the consistency loss against the frozen pretrained model."""
    from ..diff_tuning import reconsolidation_sampler, retention_sampler
    from ..timesteps import IntervalTimestepSampler
    from .step import Source

    if args.diff_tuning:
        reconsolidation = reconsolidation_sampler(num_timesteps, args.reconsolidation_exponent)
        retention = retention_sampler(num_timesteps, args.retention_exponent)
        data = Source("data", reconsolidation)
        if args.retention == "kd":
            # A DiT's data-set classes train label rows the pretrained model knows as other classes (rows
            # 0..K-1 of its table, or new rows): its prediction for those labels is no knowledge of these
            # images. The distillation rows take the null class, as bank rows do, unless --class_map says
            # which pretrained class each data-set class is. (Captions mean the same to the teacher.)
            null_class = args.model_type == "dit" and getattr(args, "class_map", None) is None
            return [data, Source("retention", retention, weight=args.bank_weight, target="teacher",
                                 null_condition=null_class)]
        return [data, Source("bank", retention, weight=args.bank_weight, null_condition=not args.bank_keep_prompts)]
    if args.deme_interval is not None:
        start, end = intervals.bounds[args.deme_interval]
        # The window of a step is its micro-batches one after the other, each of --train_batch_size rows
        # (the loader drops incomplete batches): a coin per micro-batch, as the authors flip it.
        per_batch = args.deme_sampling == "per_batch"
        interval = IntervalTimestepSampler(start, end, num_timesteps, p_full=args.deme_global_prob, per_batch=per_batch,
                                           group_size=args.train_batch_size if per_batch else None,
                                           antithetic=getattr(args, "deme_antithetic", False))
        return [Source("data", interval, consistency=args.consistency_weight)]
    return [Source("data", sampler)]


def knowledge_bank_dataloader(args, adapter, needs: dict, rows: int, num_processes: int = 1):
    """The loader of Diff-Tuning's knowledge bank: `rows` bank images per micro-batch, read like the data
    (same resolution and transforms), after checking the bank fits the model, was sampled from it (its
    weights' fingerprint) and gives each of the `num_processes` processes a batch. `--max_train_samples`
    cuts the downstream data only: the bank is the pretrained model's knowledge, retained whole as in the
    authors' code."""
    from ..data import make_train_dataloader, resolve_columns
    from ..diff_tuning.bank import check_bank_compatible, load_knowledge_bank

    bank, manifest = load_knowledge_bank(args.knowledge_bank)
    check_bank_compatible(manifest, model_type=args.model_type, resolution=pixel_resolution(adapter),
                          channels=adapter.num_channels)
    check_bank_source_once(manifest, args)
    if len(bank) < rows * num_processes:
        # (Accelerate's shards would hold no full batch, and the endless stream would divide by zero; the data
        # loader's own check would name --train_batch_size, the data set's knob)
        raise ValueError(f"the knowledge bank {args.knowledge_bank} has {len(bank)} images, fewer than {rows} bank rows "
                         f"per micro-batch (--bank_fraction x --train_batch_size) x {num_processes} "
                         f"process{'es' if num_processes > 1 else ''}: build a bigger bank "
                         "(build_knowledge_bank.py --num_images) or lower --bank_fraction")
    recorded = manifest.get("columns") or {}
    columns = resolve_columns(bank, image_column=recorded.get("image_column"),
                              caption_column=recorded.get("caption_column"),
                              conditioning_image_column=recorded.get("conditioning_image_column"),
                              class_column=recorded.get("class_column"),
                              need_captions=needs["need_captions"] and args.bank_keep_prompts,
                              need_conditioning=needs["need_conditioning"],
                              classes_if_present=args.model_type in ("unet", "dit"))
    return make_train_dataloader(
        bank, columns, resolution=pixel_resolution(adapter), batch_size=rows, num_channels=adapter.num_channels,
        seed=args.seed + 1, num_workers=args.dataloader_num_workers, **adapter.data_options(),
        center_crop=args.center_crop, random_flip=args.random_flip, max_samples=None,
        interpolation=args.image_interpolation_mode)


def check_bank_source_once(manifest: dict, args) -> None:
    """`diff_tuning.bank.check_bank_source` on process 0 alone, its one-line verdict shared with the others. The
    check loads the whole source pipeline (tens of GB for FLUX.1 or Qwen-Image) to fingerprint it: a copy in
    every process would multiply a node's memory by its processes, beside the model each one trains."""
    from accelerate import PartialState

    from ..diff_tuning.bank import check_bank_source

    state = PartialState()
    problem = None
    if state.is_main_process:
        try:
            check_bank_source(manifest, args.pretrained_model_name_or_path, getattr(args, "revision", None),
                              getattr(args, "cache_dir", None), bank_folder=args.knowledge_bank)
        except ValueError as error:
            problem = str(error)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        problem = broadcast_object_list([problem])[0]  # (every process stops on a mismatch, with the same line)
    if problem is not None:
        raise ValueError(problem)


def retention_rows(args) -> int:
    """Rows of each micro-batch given to Diff-Tuning's retention source (0 without Diff-Tuning): the
    floor of B x `--bank_fraction`, as the authors' `int(0.2 * B)`."""
    from ..diff_tuning import retention_share

    return retention_share(args.train_batch_size, args.bank_fraction) if args.diff_tuning else 0


def compose_sources(args, batch: dict, bank_batches) -> dict:
    """A micro-batch as its sources' rows: `data` and `bank` (a bank batch), or `data` and `retention`
    (the micro-batch's last rows, for distillation), or the plain batch."""
    if not args.diff_tuning:
        return batch
    if args.retention == "bank":
        return {"data": batch, "bank": next(bank_batches)}
    from ..models.base import batch_rows

    keep = batch_rows(batch) - retention_rows(args)
    return {"data": {k: v[:keep] for k, v in batch.items()}, "retention": {k: v[keep:] for k, v in batch.items()}}


def cycle_batches(accelerator, loader, consumed: int):
    """Batches of `loader` forever, epoch after epoch, starting after the first `consumed` ones.

    The position is a pure function of the count, so a resumed run continues the bank exactly where
    the interrupted one was (with the same seeded per-epoch order)."""
    per_epoch = len(loader)
    epoch, skip = divmod(consumed, per_epoch)
    while True:
        loader.set_epoch(epoch)
        for batch in (accelerator.skip_first_batches(loader, skip) if skip else loader):
            yield batch
        epoch, skip = epoch + 1, 0
