"""DeMe in the authors' settings (issue 17 items 7-9; MqLeet/DeMe): projection on by default, their
optimiser as defaults, no decay on projections and norms, the global-range coin per micro-batch and
the antithetic draw, the merge-weight search's defaults, no silent merge, parallel workers, the card."""

import argparse
import subprocess
import sys

import pytest
import torch

from trainer_utils import TRAIN_SCRIPT, offline_env

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _parse(*extra, pretrained=None):
    from diffusers_ant.training.args import parse_args

    return parse_args(["--dataset_name", "mnist5k", *(["--pretrained_model_name_or_path", pretrained] if pretrained else []),
                       *extra])


# ------------------------------------------------------------------------------ item 7: defaults


def test_deme_run_takes_the_authors_optimiser_and_projection_unless_flags_are_given(tmp_path):
    deme = ("--deme_interval", "1", "--num_clusters", "4")
    args = _parse(*deme, pretrained=str(tmp_path))
    assert (args.learning_rate, args.adam_beta1, args.adam_weight_decay) == (5e-5, 0.95, 1e-6)
    assert args.use_ema and args.channel_projection
    # what the user gives wins, abbreviated or with '=' too
    args = _parse(*deme, "--learn", "1e-3", "--adam_beta1=0.9", "--no-use_ema", "--no_channel_projection",
                  pretrained=str(tmp_path))
    assert (args.learning_rate, args.adam_beta1, args.adam_weight_decay) == (1e-3, 0.9, 1e-6)
    assert not args.use_ema and not args.channel_projection
    # without --deme_interval nothing changes
    args = _parse()
    assert (args.learning_rate, args.adam_beta1, args.adam_weight_decay, args.use_ema, args.channel_projection) == (
        1e-4, 0.9, 1e-2, False, False)


def test_help_states_the_authors_settings():
    from diffusers_ant.training.args import build_parser

    text = " ".join(build_parser().format_help().split())
    for needle in ("--learning_rate 5e-05", "--adam_beta1 0.95", "--adam_weight_decay 1e-06", "--no-use_ema",
                   "--no_channel_projection", "no weight decay", "once per micro-batch", "lo + hi - t",
                   "skip connections unprojected"):
        assert needle in text, needle


def test_no_channel_projection_without_deme_interval_is_one_line():
    result = subprocess.run([sys.executable, TRAIN_SCRIPT, "--dataset_name", "mnist5k", "--no_channel_projection"],
                            env=offline_env(), capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr
    assert "--no_channel_projection" in lines[0] and "--deme_interval" in lines[0]


def test_projections_and_norms_get_no_weight_decay():
    """A step of AdamW with zero gradients is pure decay: the projection stays the identity and the
    norms' scales stay one, while a convolution's weights shrink by lr x decay."""
    from diffusers_ant.deme import add_channel_projection, channel_projections
    from diffusers_ant.deme.optim import weight_decay_groups
    from diffusers_ant.models import get_model_adapter

    torch.manual_seed(0)
    model = get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=16, num_channels=1).model
    add_channel_projection(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = weight_decay_groups(model, params)
    assert sum(len(g["params"]) for g in groups) == len(params)
    optimizer = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.5)
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.GroupNorm))
    conv = model.conv_in
    before = conv.weight.detach().clone()
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for projection in channel_projections(model).values():
        assert torch.equal(projection.weight, torch.eye(projection.channels))
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    torch.testing.assert_close(conv.weight, before * (1 - 0.1 * 0.5), rtol=0, atol=0)


# ------------------------------------------------------------------------------ item 7: the coin


def test_global_coin_is_flipped_per_micro_batch_of_a_window():
    """A window of 4 micro-batches of 8 rows is drawn in one call: each micro-batch is wholly inside
    the interval or wholly from the whole range, and micro-batches of one window differ."""
    from diffusers_ant.timesteps import IntervalTimestepSampler

    sampler = IntervalTimestepSampler(0, 0, 1000, p_full=0.5, per_batch=True, group_size=8)
    g = torch.Generator().manual_seed(0)
    mixed = 0
    for _ in range(200):
        window = sampler.sample(32, generator=g).view(4, 8)
        inside = (window == 0).all(dim=1)
        assert all(inside[i] or (window[i] > 0).sum() >= 6 for i in range(4))  # never half and half
        mixed += bool(inside.any() and not inside.all())
    assert mixed > 100  # one coin per window would give 0; per micro-batch 1 - 2 / 16 of windows


def test_build_sources_flips_per_micro_batch_and_draws_antithetic_pairs():
    from diffusers_ant import TimestepIntervals
    from diffusers_ant.training.sources import build_sources

    args = argparse.Namespace(diff_tuning=False, deme_interval=1, deme_global_prob=0.3, deme_sampling="per_batch",
                              train_batch_size=6, deme_antithetic=True, consistency_weight=1.0)
    intervals = TimestepIntervals([(0, 249), (250, 499), (500, 749), (750, 999)], 1000)
    (source,) = build_sources(args, intervals, 1000, None)
    assert source.sampler.group_size == 6 and source.sampler.antithetic
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        for mb in source.sampler.sample(24, generator=g).view(4, 6):
            lo, hi = (250, 499) if ((mb >= 250) & (mb <= 499)).all() else (0, 999)
            assert torch.equal(mb[:3] + mb[3:], torch.full((3,), lo + hi))  # t and lo + hi - t
