"""Multi-process check of the weightings under data parallelism (launched by tests/test_distributed.py).

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no tests/scripts/ddp_weighting_check.py --methods uw,pcgrad,nash_mtl --output_dir OUT

(`--multi_gpu` runs two real gloo processes on a CPU-only machine.) For each method, every process
trains the same tiny diffusers UNet2DModel for a few steps on its OWN random shard, with K = 4
timestep clusters of equal width, the way the trainer does it:

* loss-based methods: the closure runs the DDP-wrapped model, `weighted_backward` syncs the task
  losses, `accelerator.backward` lets DDP average the gradients once;
* gradient-based methods: the closure runs the unwrapped model, the engine all-reduces the per-task
  gradients (count-weighted) and writes the update; DDP's reducer must not fire (a counting comm hook
  checks it). `pcgrad+subset` forms the task gradients over the up-blocks only (subset mode: one
  extra weighted backward over all parameters, whose gradients the engine all-reduces itself);
  Nash-MTL re-solves every 2 steps and takes reused-weight steps in between.

`rank_noise` is a weighting whose weights depend on the process rank: the engine's broadcast from
process 0 must still make both processes take the same step. `<method>+chunks` runs each step as
a window of two chunks (gradient accumulation), which must change nothing; `<method>+batched` uses the
engine's batched mode instead of the split one; `+lockstep` and `+write_update` the engine's paths for
FSDP and DeepSpeed (`training/sharding.py`).

Then process 0 repeats the run on ONE process over the concatenated global batch (engine and loss
sync switched off), which is what the distributed run must equal. Each process writes
`{method}_rank{r}.safetensors` (final and initial parameters, UW's log-variances, the step-0 task
gradients, each step's largest gradient entry, task loss and UW coefficient, the number of DDP all-reduce
calls); process 0 also writes `{method}_reference.safetensors`.
"""

import argparse
import os

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from diffusers_ant.weighting import get_weighting
from diffusers_ant.weighting.base import GradientWeighting
from diffusers_ant.weighting.engine import TaskGradientEngine, weighted_backward

NUM_TASKS = 4
NUM_TIMESTEPS = 1000
# Options that make the short run exercise each method's state: Nash-MTL re-solves every 2 steps
# (reusing alpha in between), UW's log-variances move fast enough to be seen.
METHOD_OPTIONS = {"nash_mtl": {"update_every": 2}, "uw": {"lr": 0.5}, "uw+pcgrad": {"lr": 0.5},
                  "uw+nash_mtl": {"lr": 0.5, "update_every": 2}}
# Case names use "+" for variants (`+subset`, `+chunks`); a combined weighting is named with "_and_".
COMBINED = {"uw_and_pcgrad": "uw+pcgrad", "uw_and_nash_mtl": "uw+nash_mtl"}


class RankDependentWeighting(GradientWeighting):
    """A stand-in for a solver whose floating-point result differs between processes: its weights
    depend on the process rank. The engine broadcasts process 0's weights, so every process must
    still take process 0's step."""

    name = "rank_noise"

    def task_weights(self, gram, present):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return torch.ones(int(present.sum()), dtype=gram.dtype) * (1.0 + 0.25 * rank)


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )


def shard(step: int, rank: int, batch_size: int, scheduler: DDPMScheduler):
    """Process `rank`'s data for `step`: images, noisy images, timesteps, targets, task ids."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    clean = torch.randn(batch_size, 1, 8, 8, generator=g)
    noise = torch.randn(batch_size, 1, 8, 8, generator=g)
    timesteps = torch.randint(0, NUM_TIMESTEPS, (batch_size,), generator=g)
    noisy = scheduler.add_noise(clean, noise, timesteps)
    task_ids = timesteps * NUM_TASKS // NUM_TIMESTEPS  # K clusters of equal width
    return noisy, timesteps, noise, task_ids


def make_closure(model, noisy, timesteps, target):
    def per_sample_loss_fn(indices):
        sel = slice(None) if indices is None else indices
        pred = model(noisy[sel], timesteps[sel]).sample
        return ((pred - target[sel]) ** 2).mean(dim=(1, 2, 3))

    return per_sample_loss_fn


def write_into_grad(params, update):
    for p, u in zip(params, update):
        p.grad = u.clone() if p.grad is None else p.grad.add_(u)


def flat(tensors):
    return torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors])


def build(method):
    model = tiny_unet()
    name = method.split("+")[0]
    name = COMBINED.get(name, name)
    if name == "rank_noise":
        weighting = RankDependentWeighting(NUM_TASKS)
    else:
        weighting = get_weighting(name, NUM_TASKS, **METHOD_OPTIONS.get(name, {}))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    if hasattr(weighting, "param_groups"):
        for group in weighting.param_groups():
            optimizer.add_param_group(group)
    return model, weighting, optimizer


def train(method, args, accelerator=None, ranks=None):
    """Train `args.steps` steps. With `accelerator`: the distributed run on this process's shard.
    Without: one process over the concatenation of the shards of `ranks`, no syncing."""
    scheduler = DDPMScheduler(num_train_timesteps=NUM_TIMESTEPS)
    model, weighting, optimizer = build(method)
    init = flat(model.parameters())
    hook_calls = [0]
    sync = accelerator is not None
    if sync:
        # The weighting module is NOT prepared: it is not a DDP module, its parameters get identical
        # gradients on every process from the synced task losses.
        model, optimizer = accelerator.prepare(model, optimizer)
        if isinstance(model, DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def counting_hook(state, bucket):
                hook_calls[0] += 1
                return allreduce_hook(state, bucket)

            model.register_comm_hook(None, counting_hook)
        unwrapped = accelerator.unwrap_model(model)
        backward_fn = accelerator.backward
    else:
        unwrapped = model
        backward_fn = None
    # "<method>+subset": task gradients over the up-blocks only, then one weighted pass over all.
    subset = [unwrapped.up_blocks] if "+subset" in method else None
    # "<method>+batched": the engine's batched mode (one forward, one backward, per-cluster weight gradients).
    # "<method>+lockstep": every process runs the same passes (FSDP's collectives), padding where it has fewer
    # samples of a cluster; "<method>+write_update": the update handed to a callable, the task gradients
    # taken by autograd.grad (DeepSpeed's path; here the callable writes `.grad`). Neither may change a step.
    engine = TaskGradientEngine([p for p in unwrapped.parameters() if p.requires_grad], subset=subset, sync=sync,
                                mode="batched" if "+batched" in method else "split", modules=[unwrapped],
                                lockstep="+lockstep" in method,
                                write_update=write_into_grad if "+write_update" in method else None)
    # Gradient-based: the closure must bypass DDP (the engine syncs); loss-based: through DDP.
    closure_model = unwrapped if weighting.needs_task_gradients else model
    # "<method>+chunks": the distributed run sees each step as a window of two micro-batches (chunks
    # of half the shard, DDP's all-reduce deferred to the last chunk); the reference does not chunk.
    chunk_size = args.batch_size // 2 if "+chunks" in method and sync else None
    no_sync = None
    if chunk_size is not None and not weighting.needs_task_gradients:
        no_sync = lambda: accelerator.no_sync(model)  # noqa: E731

    first_task_grads = torch.zeros(0)
    # each step's largest gradient entry of the model, task loss and UW coefficient: the test's tolerances
    # scale with them
    weights_log, largest_grads, largest_losses, largest_coefficients = [], [], [], []
    uw = getattr(weighting, "loss_weighting", weighting)  # a combined weighting's loss part
    for step in range(args.steps):
        parts = [shard(step, r, args.batch_size, scheduler) for r in ranks]
        noisy, timesteps, target, task_ids = (torch.cat(x) for x in zip(*parts))
        closure = make_closure(closure_model, noisy, timesteps, target)
        stats = weighted_backward(weighting, closure, task_ids, NUM_TASKS, engine=engine,
                                  backward_fn=backward_fn, sync=sync, chunk_size=chunk_size, no_sync=no_sync)
        if step == 0 and weighting.needs_task_gradients:
            first_task_grads = engine.task_grads.detach().clone()
        weights_log.append(stats["weights"].float())
        largest_grads.append(max(float(p.grad.abs().max()) for p in unwrapped.parameters() if p.grad is not None))
        largest_losses.append(float(stats["task_losses"].abs().max()))
        if hasattr(uw, "log_vars"):  # UW's largest loss coefficient 0.5 exp(-s_i) this step
            largest_coefficients.append(float(0.5 * torch.exp(-uw.log_vars.detach()).max()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    out = {
        "params": flat(unwrapped.parameters()),
        "init_params": init,
        "task_grads_step0": first_task_grads.float().contiguous(),
        "weights": torch.stack(weights_log),
        "largest_grads": torch.tensor(largest_grads),
        "largest_losses": torch.tensor(largest_losses),
        "ddp_allreduce_calls": torch.tensor([hook_calls[0]]),
        "engine_passes": torch.tensor([engine.num_forward_calls, engine.num_task_backward_calls]),
    }
    if hasattr(uw, "log_vars"):
        out["log_vars"] = uw.log_vars.detach().clone()
        out["largest_coefficients"] = torch.tensor(largest_coefficients)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="uw,pcgrad,nash_mtl")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=6, help="per process")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)  # two processes on a 2-core machine

    # On a machine without CUDA, Accelerate only sets up torch.distributed (gloo, MULTI_CPU) when
    # told to run on the CPU; otherwise every launched process silently trains alone.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.num_processes < 2:
        raise SystemExit("launch with `accelerate launch --multi_gpu --num_processes 2`: this check needs two processes")
    rank, world = accelerator.process_index, accelerator.num_processes
    os.makedirs(args.output_dir, exist_ok=True)
    for method in args.methods.split(","):
        result = train(method, args, accelerator=accelerator, ranks=[rank])
        save_file(result, os.path.join(args.output_dir, f"{method}_rank{rank}.safetensors"))
        if accelerator.is_main_process:
            reference = train(method, args, accelerator=None, ranks=list(range(world)))
            save_file(reference, os.path.join(args.output_dir, f"{method}_reference.safetensors"))
        accelerator.wait_for_everyone()
    accelerator.print(f"done: {args.methods} on {world} processes ({accelerator.distributed_type})")


if __name__ == "__main__":
    main()
