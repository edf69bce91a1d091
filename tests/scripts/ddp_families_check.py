"""Two processes train each family of issue 16 in turn (launched by tests/test_family_matrix.py).

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no tests/scripts/ddp_families_check.py --output_dir OUT

(`--multi_gpu` runs two real gloo processes on a CPU-only machine.) One launch for the four families,
so that torch, diffusers and transformers are imported once per process: every family is trained by
the trainer's own `train()` (in-process, Accelerate's state reset between runs, the process group kept)
on its tiny preset with LoRA and one method each:

* sdxl: ANT with UW (loss-based: DDP averages the gradients), on cached text embeddings (each process its own
  store on disk, `.training_cache_<rank>`);
* sd3: ANT with PCGrad on the LoRA subset (the engine all-reduces the per-task gradients);
* flux: Diff-Tuning's distillation (`--retention kd`, the teacher is the student with adapters off);
* qwenimage: DeMe's interval 0 (LoRA and the channel projections, averaged outside DDP).

Each process writes `{family}_rank{r}.safetensors`: its trainable parameters before the first and after
the last step, and a fingerprint (the per-row pixel sums) of every micro-batch it trained on.
"""

import argparse
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: trainer_utils

from trainer_utils import TINY_RUN  # noqa: E402

RES = 16
STEPS = 2
FAMILIES = {
    "sdxl": ["--mtl_method", "uw", "--cache_text_embeddings"],
    "sd3": ["--mtl_method", "pcgrad", "--task_gradient_subset", "lora"],
    "flux": ["--retention", "kd", "--bank_fraction", "0.5"],
    "qwenimage": ["--deme_interval", "0", "--no-use_ema"],
}


def family_args(family, base, output_dir):
    run = list(TINY_RUN)
    i = run.index("--model_config_name_or_path")
    del run[i:i + 2]
    return ["--model_type", family, "--pretrained_model_name_or_path", base, "--dataset_name", "mnist5k_captions",
            "--output_dir", output_dir, *run,
            "--resolution", str(RES), "--train_batch_size", "2", "--max_train_samples", "8", "--rank", "4",
            "--num_clusters", "2", "--max_train_steps", str(STEPS), "--learning_rate", "1e-2",
            "--num_validation_images", "1", "--num_inference_steps", "1", "--checkpointing_steps", "100",
            *FAMILIES[family]]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--bases", default=None, help="a folder holding each family's saved tiny pipeline, by name")
    options = parser.parse_args()

    from accelerate.state import AcceleratorState, GradientState, PartialState

    import diffusers_ant.training.loop as loop
    from diffusers_ant.training import parse_args, train
    from diffusers_ant.training.cache_store import TensorStore

    stores = []  # the training caches this process opened, kept alive here: a store's garbage collection deletes
    open_store = TensorStore.__init__  # its files too, and what is checked is that training deleted them

    def recorded_store(self, directory, *args, **kwargs):
        stores.append(self)
        open_store(self, directory, *args, **kwargs)

    TensorStore.__init__ = recorded_store

    # `Accelerator.end_training` destroys the process group; keep it for the next family (one group, one port)
    destroy = PartialState.destroy_process_group
    PartialState.destroy_process_group = lambda self, group=None: None
    original_step = loop.training_step
    families = options.families.split(",")

    # the pretrained tiny bases the LoRA runs start from (given, or written here once by process 0)
    bases = {family: os.path.join(options.bases or options.output_dir, family if options.bases else f"{family}-base")
             for family in families}
    if not options.bases:
        state = PartialState(cpu=True)
        if state.is_main_process:
            from diffusers_ant.models import get_model_adapter

            for family in families:
                torch.manual_seed(0)
                get_model_adapter(family).load(model_config_name_or_path="tiny", resolution=RES).save(bases[family])
        state.wait_for_everyone()

    for family in families:
        record = {"batches": [], "model": None, "init": None}

        def step(accelerator, objective, model, window, *args, **kwargs):
            module = accelerator.unwrap_model(model)
            if record["init"] is None:
                record["init"] = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
            record["model"] = module
            for batch in window:  # a composed batch (Diff-Tuning) holds its sources' rows
                parts = [batch] if "pixel_values" in batch else [p for p in batch.values() if isinstance(p, dict)]
                pixels = torch.cat([part["pixel_values"] for part in parts])
                record["batches"].append(pixels.detach().float().flatten(1).sum(1))
            return original_step(accelerator, objective, model, window, *args, **kwargs)

        loop.training_step = step
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        try:
            train(parse_args(family_args(family, bases[family], os.path.join(options.output_dir, family))))
        finally:
            loop.training_step = original_step
        rank = torch.distributed.get_rank()
        final = {n: p.detach().clone() for n, p in record["model"].named_parameters() if p.requires_grad}
        assert final.keys() == record["init"].keys() and final, family
        tensors = {f"final.{n}": p.float().contiguous() for n, p in final.items()}
        tensors.update({f"init.{n}": p.float().contiguous() for n, p in record["init"].items()})
        tensors["batches"] = torch.stack(record["batches"]).contiguous()
        save_file(tensors, os.path.join(options.output_dir, f"{family}_rank{rank}.safetensors"))
        print(f"{family}: rank {rank} trained {len(record['batches'])} micro-batches on "
              f"{torch.distributed.get_world_size()} processes", flush=True)
        for store in stores:
            print(f"{family}: rank {rank} cached in {os.path.relpath(store.directory, options.output_dir)}, "
                  f"{'left' if os.path.exists(store.directory) else 'removed'} at the end", flush=True)
        stores.clear()
    PartialState.destroy_process_group = destroy
    PartialState().destroy_process_group()


if __name__ == "__main__":
    main()
