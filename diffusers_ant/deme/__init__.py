"""DeMe, *Decouple-Then-Merge* (PAPERS.md section 2): per-interval fine-tunes of one pretrained model,
merged back into one model.

- ``merge``: ``merge_task_vectors`` (task arithmetic, TIES, DARE on the task vectors).
- ``projection``: the channel-wise projection (``add_channel_projection``, ``has_channel_projection``,
  saving it beside diffusers' files and re-attaching it on load).
- ``finetunes``: reading the fine-tune folders a DeMe run writes (full pipelines or LoRA folders),
  their intervals and base, and checking they can be merged.
- ``search``: the merge-weight search (grid or coordinate) on any metric.
- ``merging``: the whole merge of ``train_scripts/merge_deme.py`` (merged pipeline, search table, card).
- ``ensemble``: the un-merged ensemble, a pipeline whose denoiser is a ``TimestepRouter`` over the fine-tunes.
- ``lora_merge``: LoRA fine-tunes merged as one LoRA of rank N*r (equal to the dense merge, no dense weight).
- ``lora_ensemble``: the ensemble of LoRA fine-tunes, their adapters switched by timestep on one base denoiser.
- ``card``: the model card of a merged or ensemble folder (``model_cards/deme_template.md``).
- ``benchmark``: what ``train_scripts/benchmark_deme.py`` adds to ``analysis.benchmark``: the disjoint
  search / evaluation references of the merge-weight search.

Only ``merge`` and ``projection`` are imported here (torch only); the rest load diffusers when used.
"""

from .merge import DEFAULT_DENSITY, MERGE_METHODS, merge_task_vectors
from .projection import (
    ChannelProjection,
    add_channel_projection,
    attach_saved_channel_projection,
    channel_projection_detached,
    channel_projections,
    has_channel_projection,
    load_channel_projection,
    save_adapter_output,
    save_channel_projection,
    save_pipeline,
)



def attach_saved_deme(pipeline, folder: str):
    """Re-attach what DeMe adds to a saved folder: channel projections (``channel_projection.json``),
    then the ensemble router (``deme_ensemble.json``). A no-op for other folders; called by
    ``diffusers_ant.models.load_pipeline``."""
    from .ensemble import attach_saved_ensemble

    return attach_saved_ensemble(attach_saved_channel_projection(pipeline, folder), folder)


__all__ = [
    "DEFAULT_DENSITY",
    "MERGE_METHODS",
    "ChannelProjection",
    "add_channel_projection",
    "attach_saved_channel_projection",
    "attach_saved_deme",
    "channel_projection_detached",
    "channel_projections",
    "has_channel_projection",
    "load_channel_projection",
    "merge_task_vectors",
    "save_adapter_output",
    "save_channel_projection",
    "save_pipeline",
]
