"""DeMe's optimiser parameter groups: no weight decay on the channel projections and the norms.

The authors fine-tune with AdamW, weight decay 1e-6 (MqLeet/DeMe ``train_unconditional_deme.py``,
``--adam_weight_decay 1e-6``; ``training.args.DEME_AUTHORS_DEFAULTS``). AdamW's decay pulls every
decayed parameter toward zero, but a channel projection starts at, and should stay near, the
identity (a projection decayed toward zero scales its block's output down), and a norm's scale
starts at one; so both are excluded, as is common for norm parameters (e.g. timm's
``param_groups_weight_decay``). Everything else keeps the run's ``--adam_weight_decay``.
"""

from __future__ import annotations

from .projection import ChannelProjection

__all__ = ["decay_exempt", "weight_decay_groups"]


def decay_exempt(model) -> set:
    """``id``s of the parameters of ``model`` that get no weight decay: each ``ChannelProjection``'s
    matrix and the parameters a norm layer owns directly (any class whose name contains ``Norm``:
    torch's GroupNorm / LayerNorm, diffusers' RMSNorm ...; an adaptive norm's inner Linear is not its
    own parameter and keeps its decay)."""
    exempt = set()
    for module in model.modules():
        if isinstance(module, ChannelProjection) or "Norm" in type(module).__name__:
            exempt.update(id(p) for p in module.parameters(recurse=False))
    return exempt


def weight_decay_groups(model, params) -> list:
    """``params`` (the trained parameters of ``model``, in order) as AdamW parameter groups: the
    decayed ones first (the optimiser's ``weight_decay``), then the exempt ones with
    ``weight_decay`` 0. Empty groups are left out."""
    exempt = decay_exempt(model)
    params = list(params)
    decayed = [p for p in params if id(p) not in exempt]
    undecayed = [p for p in params if id(p) in exempt]
    groups = [{"params": decayed}] if decayed else []
    if undecayed:
        groups.append({"params": undecayed, "weight_decay": 0.0})
    return groups
