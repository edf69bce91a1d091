"""DeepSpeed ZeRO-2 / ZeRO-3 through Accelerate (issue 18, item 2): the trainer under DeepSpeed's engine.

The slow tests launch `train_ant.py` with two processes on this CPU (DeepSpeed's CPU accelerator, gloo):
under ZeRO-2 it must train the weights (and UW's log-variances) that plain data parallelism
(`--multi_gpu`) trains for the same seed, with an accumulation window of two micro-batches that
DeepSpeed owns, and resuming its sharded checkpoint must continue the run exactly. ZeRO-3 (every
parameter sharded) is checked against the same DDP run. A gradient method on the LoRA subset under ZeRO-2 and
ZeRO-3 trains DDP's LoRA weights in float32 and resumes exactly, and in bf16 stays as close to the float32
run as DDP's bf16 run does. `train_scripts/check_engines.sh` runs them on a GPU machine.

Why the comparison can fail: `--adam_epsilon 1` makes AdamW's step proportional to the gradient
(|g| << 1 here), so a gradient of the wrong size (DeepSpeed dividing each chunk by the accumulation
steps, a second step per window, UW's log-variances not stepped) moves the weights by a different
amount, where Adam's usual scale invariance would hide it. `--max_grad_norm 0` must reach the engine:
Accelerate would otherwise clip DeepSpeed's gradients at 1.0, and not DDP's.
"""

import importlib.util
import math
import os
import re
import shutil
import sys

import pytest
import torch

from trainer_utils import (LORA_RUN, LORA_STEPS, RECORDING_SCRIPT, REPO, applied_gradients, failure_output,
                          flag_values, largest_difference, load_safetensors_dir, lora_run_tolerances,
                          offline_env, run_command, save_lora_base)

# `make test-deepspeed` installs DeepSpeed and runs this file; `make test` deselects it (marker `deepspeed`),
# so the check that DeepSpeed is there runs only when a test does (a fixture, not at collection)
pytestmark = pytest.mark.deepspeed
DEEPSPEED = importlib.util.find_spec("deepspeed")
# DeepSpeed may live outside the environment (a --target folder): the launched processes need its path too
DEEPSPEED_PATH = os.path.dirname(os.path.dirname(DEEPSPEED.origin)) if DEEPSPEED else ""


@pytest.fixture(autouse=True, scope="module")
def needs_deepspeed():
    if DEEPSPEED is None:
        pytest.skip("DeepSpeed is not installed: make test-deepspeed installs it")

LR, STEPS = 0.1, 4
RUN = ["--model_type", "unet", "--dataset_name", "mnist5k", "--model_config_name_or_path", "tiny",
       "--train_batch_size", "8", "--num_clusters", "4", "--report_to", "none", "--seed", "0",
       "--num_validation_images", "1", "--num_inference_steps", "2", "--max_train_samples", "64",
       "--learning_rate", str(LR), "--adam_epsilon", "1", "--max_grad_norm", "0", "--mtl_method", "uw",
       "--gradient_accumulation_steps", "2", "--max_train_steps", str(STEPS), "--checkpointing_steps", "2"]
# ZeRO-3 with every parameter sharded (DeepSpeed keeps parameters under 1e5 elements whole by default,
# which would be every parameter of the tiny UNet)
ZERO3_CONFIG = os.path.join(REPO, "examples", "accelerate", "deepspeed_zero3_every_parameter.json")


def launch(engine_flags, output_dir, *extra, run=RUN):
    """`train_ant.py` with `run`'s flags on two processes under `engine_flags`; returns its output."""
    env = offline_env(PYTHONPATH=os.pathsep.join([REPO, DEEPSPEED_PATH]))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", *engine_flags,
               RECORDING_SCRIPT, *run, "--output_dir", str(output_dir), *extra]
    result = run_command(command, env=env, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + failure_output(result.stderr)
    # a resumed run says so (a run that ignored the flag would retrain from step 0 to the same seeded weights)
    assert ("resuming from" in result.stdout) == ("--resume_from_checkpoint" in extra), result.stdout[-2000:]
    return result.stdout + result.stderr


def weights(folder, file="diffusion_pytorch_model.safetensors"):
    """The tensors of one safetensors file under `folder`, by parameter name."""
    return {key.split(":", 1)[1]: value for key, value in load_safetensors_dir(folder).items()
            if key.split(":", 1)[0] == file}


def log_variances(folder):
    from diffusers_ant.training.checkpoint import load_trainer_state

    return load_trainer_state(str(folder), 0)["weighting"]["log_vars"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("deepspeed")


@pytest.fixture(scope="module")
def ddp(root):
    """Plain data parallelism, the reference (checkpoints at steps 2 and 4)."""
    launch(["--multi_gpu"], root / "ddp")
    return root / "ddp"


@pytest.fixture(scope="module")
def zero2(root):
    """ZeRO-2 straight through (checkpoints at steps 2 and 4), and resumed from its step 2 in another folder."""
    flags = ["--use_deepspeed", "--zero_stage", "2"]
    out = launch(flags, root / "zero2")
    assert "process 1 of 2" in out  # two real ranks, not two processes that each believe they are alone
    assert (root / "zero2" / "checkpoint-4" / "pytorch_model").is_dir()  # DeepSpeed's sharded checkpoint
    shutil.copytree(root / "zero2" / "checkpoint-2", root / "zero2_resumed" / "checkpoint-2")
    launch(flags, root / "zero2_resumed", "--resume_from_checkpoint", "latest")
    return root / "zero2", root / "zero2_resumed"


def run_tolerances(*runs):
    """How far two runs of RUN under different engines may end apart: (the UNet's weights, UW's log-variances
    at the last step). Both engines run the same float32 arithmetic except the order of the gradient
    reductions (DDP's buckets against ZeRO's partitioned reduce-scatter), which moves a gradient entry by
    its rounding: tests/tolerances.py's `adam_run_tolerance` (each weight gradient sums the window's
    2 processes x 2 micro-batches x 8 samples x positions; no clipping, `--max_grad_norm 0`; lr 0.1, Adam's
    epsilon 1) and `uw_log_variance_tolerance`, scaled by the largest gradient entry either run applied per
    step (recorded by each process through RECORDING_SCRIPT). Measured: about 1.4e-3 (the largest entries
    applied are near 1: no clipping), where the engines' weights differ by 6e-8. A wrong update (a gradient
    halved by DeepSpeed's division by the 2 accumulation steps, a second optimizer step per window, clipping
    at 1.0) moves weights by about lr |g| / 2 or more, some 0.04; the last two steps moved them by 0.044."""
    from diffusers import UNet2DModel

    from diffusers_ant.weighting.uw import UWConfig
    from tolerances import adam_run_tolerance, uw_log_variance_tolerance

    unet = UNet2DModel.from_pretrained(runs[0] / "unet")
    flag = flag_values(RUN)
    terms = 2 * int(flag["--gradient_accumulation_steps"]) * int(flag["--train_batch_size"]) * unet.config.sample_size ** 2
    applied = applied_gradients(STEPS, *runs)
    largest_weight = max(float(v.abs().max()) for run in runs for v in weights(run / "unet").values())
    largest_log_variance = max(float(log_variances(run / f"checkpoint-{STEPS}").abs().max()) for run in runs)
    eps = float(flag["--adam_epsilon"])
    return (adam_run_tolerance(unet, applied, terms, LR, eps, largest_weight),
            uw_log_variance_tolerance(unet, applied, terms, UWConfig().lr, eps, largest_log_variance))


@pytest.mark.slow
def test_zero2_trains_the_weights_of_plain_data_parallelism(ddp, zero2):
    reference, trained = weights(ddp / "unet"), weights(zero2[0] / "unet")
    assert sorted(reference) == sorted(trained)
    tolerance, log_variance_tolerance = run_tolerances(ddp, zero2[0])
    halfway = weights(ddp / "checkpoint-2", "model.safetensors")  # Accelerate's copy at step 2
    moved = max((reference[k] - halfway[k]).abs().max().item() for k in reference)
    worst = max((reference[k] - trained[k]).abs().max().item() for k in reference)
    print(f"max |ZeRO-2 - DDP|: {worst:.3g} (tolerance {tolerance:.3g}; the last two steps moved {moved:.3g})")
    assert moved > 20 * tolerance
    assert worst <= tolerance, f"ZeRO-2 and DDP weights differ by {worst} (tolerance {tolerance})"
    # UW's log-variances, trained by their own optimizer outside DeepSpeed, match DDP's and moved (from zero)
    ddp_vars, zero2_vars = log_variances(ddp / "checkpoint-4"), log_variances(zero2[0] / "checkpoint-4")
    torch.testing.assert_close(zero2_vars, ddp_vars, rtol=0, atol=log_variance_tolerance)
    assert zero2_vars.abs().max() > 20 * log_variance_tolerance  # (measured: 43 times)


@pytest.mark.slow
def test_zero2_resumes_its_sharded_checkpoint_exactly(zero2):
    straight, resumed = weights(zero2[0] / "unet"), weights(zero2[1] / "unet")
    # The same processes, the same arithmetic: bit for bit on CPU. On a GPU cuDNN's convolution backward
    # is not deterministic from run to run (atomic adds), so there the two runs agree to the rounding bound
    # only (`run_tolerances`; the resumed run recorded its last two steps, the straight one all four).
    atol, log_variance_atol = run_tolerances(zero2[0]) if torch.cuda.is_available() else (0.0, 0.0)
    for key in straight:
        assert (straight[key] - resumed[key]).abs().max() <= atol, key
    torch.testing.assert_close(log_variances(zero2[0] / "checkpoint-4"), log_variances(zero2[1] / "checkpoint-4"),
                               rtol=0, atol=log_variance_atol)


@pytest.mark.slow
def test_zero3_with_every_parameter_sharded_trains_the_weights_of_plain_data_parallelism(root, ddp):
    launch(["--use_deepspeed", "--deepspeed_config_file", ZERO3_CONFIG], root / "zero3")
    reference, trained = weights(ddp / "unet"), weights(root / "zero3" / "unet")
    assert sorted(reference) == sorted(trained)  # gathered from the shards into the whole model
    tolerance, log_variance_tolerance = run_tolerances(ddp, root / "zero3")
    worst = max((reference[k] - trained[k]).abs().max().item() for k in reference)
    print(f"max |ZeRO-3 - DDP|: {worst:.3g} (tolerance {tolerance:.3g})")
    assert worst <= tolerance, f"ZeRO-3 and DDP weights differ by {worst} (tolerance {tolerance})"
    torch.testing.assert_close(log_variances(root / "zero3" / "checkpoint-4"), log_variances(ddp / "checkpoint-4"),
                               rtol=0, atol=log_variance_tolerance)
    assert (root / "zero3" / "samples.png").is_file()  # process 0 sampled with the gathered weights


# ------------------------------------------------------------------ gradient methods on the LoRA subset


# (the one-line refusals of a gradient method under DeepSpeed run with fakes: tests/test_trainer_matrix.py;
# the run, LORA_RUN, and its pretrained base are tests/trainer_utils.py's, shared with tests/test_fsdp.py)


def launch_lora(engine_flags, output_dir, pretrained, *extra):
    return launch(engine_flags, output_dir, *extra, run=[*LORA_RUN, "--pretrained_model_name_or_path", str(pretrained)])


@pytest.fixture(scope="module")
def lora_pretrained(root):
    return save_lora_base(root / "lora-pretrained")


@pytest.fixture(scope="module")
def lora_ddp(root, lora_pretrained):
    """The reference: the same gradient method on the LoRA subset under plain data parallelism."""
    from safetensors.torch import load_file

    launch_lora(["--multi_gpu"], root / "lora-ddp", lora_pretrained)
    return load_file(root / "lora-ddp" / "pytorch_lora_weights.safetensors")


def check_lora_run_against_ddp_and_its_resume(root, lora_pretrained, lora_ddp, name, engine_flags):
    """`name`'s LoRA weights equal DDP's within the tolerance below, and its checkpoint at step 1 resumes
    into the straight run's weights and trainer state bit for bit."""
    from safetensors.torch import load_file

    out = launch_lora(engine_flags, root / f"lora-{name}", lora_pretrained)
    assert "process 1 of 2" in out
    trained = load_file(root / f"lora-{name}" / "pytorch_lora_weights.safetensors")
    assert trained and sorted(trained) == sorted(lora_ddp)
    tolerance, _ = lora_run_tolerances(lora_pretrained, [root / f"lora-{name}", root / "lora-ddp"],
                                       largest_weight=max(float(v.abs().max()) for v in trained.values()),
                                       largest_log_variance=0.0)  # (the log-variances: test_fsdp's LoRA test)
    assert max(float(v.abs().max()) for k, v in trained.items() if "lora_B" in k or "lora.up" in k) > 50 * tolerance
    worst = max(float((trained[k] - lora_ddp[k]).abs().max()) for k in trained)
    print(f"max |{name} - DDP| over the LoRA weights: {worst:.3g} (tolerance {tolerance:.3g})")
    assert worst <= tolerance, f"{name} and DDP LoRA weights differ by {worst} (tolerance {tolerance})"
    # exact resume: 1 step, DeepSpeed's checkpoint (engine, optimizer) and the trainer's state, 1 step == 2 steps
    shutil.copytree(root / f"lora-{name}" / "checkpoint-1", root / f"lora-{name}-resumed" / "checkpoint-1")
    launch_lora(engine_flags, root / f"lora-{name}-resumed", lora_pretrained, "--resume_from_checkpoint", "checkpoint-1")
    resumed = load_file(root / f"lora-{name}-resumed" / "pytorch_lora_weights.safetensors")
    assert sorted(resumed) == sorted(trained)
    for key in trained:
        assert torch.equal(resumed[key], trained[key]), f"resumed {name} run differs from the straight one at {key}"
    for rank in (0, 1):  # the trainer's state: UW's log-variances and their optimizer, the generator
        straight, again = (load_file(root / run / f"checkpoint-{LORA_STEPS}" / f"trainer_state_{rank}.safetensors")
                           for run in (f"lora-{name}", f"lora-{name}-resumed"))
        assert sorted(straight) == sorted(again)
        for key in straight:
            assert torch.equal(again[key], straight[key]), f"resumed trainer state differs at {key} (process {rank})"
    return out


@pytest.mark.slow
def test_a_gradient_method_on_the_lora_subset_trains_under_zero2_what_it_trains_under_ddp_and_resumes_exactly(
        root, lora_pretrained, lora_ddp):
    """ZeRO-2 takes the per-cluster gradients of the LoRA subset by autograd.grad (DeepSpeed's hooks do not
    run), syncs them as DDP does, and hands the update to the engine by one backward whose gradient is the
    update exactly (up to DeepSpeed's divide-then-sum average, exact on 2 processes). The tolerance is
    test_fsdp's for the same run (`trainer_utils.lora_run_tolerances`, from the gradients each step applied).
    Per-process cluster gradients move the LoRA weights by about 7e-2; an update DeepSpeed never steps by
    |B| ~ 0.3."""
    check_lora_run_against_ddp_and_its_resume(root, lora_pretrained, lora_ddp, "zero2",
                                              ["--use_deepspeed", "--zero_stage", "2"])


@pytest.mark.slow
def test_a_gradient_method_on_the_lora_subset_trains_under_zero3_with_the_base_sharded(root, lora_pretrained, lora_ddp):
    """ZeRO-3 from a config that shards every parameter (a persistence threshold of 0): the trainer raises
    the threshold to the largest LoRA matrix, so the LoRA matrices stay whole on every process (persistent
    parameters; so do the base's few tensors smaller than them) while the rest of the base is gathered in
    every forward and backward, and the engine runs as under ZeRO-2, in lockstep. Same weights as DDP within the ZeRO-2 test's tolerance,
    exact resume. Without the raised threshold the run stops at the check that every LoRA matrix persists."""
    out = check_lora_run_against_ddp_and_its_resume(root, lora_pretrained, lora_ddp, "zero3",
                                                    ["--use_deepspeed", "--deepspeed_config_file", ZERO3_CONFIG])
    # the trainer raised the threshold, and DeepSpeed still partitions the base beyond it (read from each
    # parameter's ds_persist after prepare): the LoRA matrices are not whole merely because everything is
    found = re.search(r"stage3_param_persistence_threshold (\d+) keeps the LoRA matrices whole", out)
    assert found and int(found.group(1)) > 0, out[-3000:]
    counts = re.search(r"ZeRO-3: (\d+) parameter tensors whole on every process .*?, (\d+) partitioned", out)
    assert counts, out[-3000:]
    whole, sharded = map(int, counts.groups())
    print(f"ZeRO-3 with the raised threshold {found.group(1)}: {whole} parameter tensors whole, {sharded} partitioned")
    assert whole > 0 and sharded > 0, (whole, sharded)


@pytest.mark.slow
def test_a_gradient_method_on_the_lora_subset_trains_in_bf16_under_zero2_and_zero3_as_closely_as_ddp(root, lora_pretrained, lora_ddp):
    """The ZeRO-2 and ZeRO-3 runs above with `--mixed_precision bf16`, against DDP's bf16 run. DeepSpeed's bf16 mode holds
    the whole module in bf16 (its optimizer keeps float32 masters), so the per-cluster gradients and the update
    are bf16 and the saved LoRA weights are the module's bf16 values; DDP computes under autocast with float32
    LoRA weights. Two different bf16 computations, which agree only to bf16 rounding (2^-9 relative per
    operation, compounded over the network and the steps), for which no bound follows from what the test holds.
    What is checked instead: the weights are bf16 values (the run was bf16), and each stage's distance from the
    float32 run is at most twice DDP's bf16 distance plus half a bf16 unit in the last place of the largest
    weight (the rounding of the saved weights), a margin: measured 3.8e-3 for both stages against DDP's 2.3e-3 (bound 8.6e-3). Per-process
    cluster gradients move the LoRA weights by about 7e-2, an update DeepSpeed never steps by |B| ~ 0.3."""
    from safetensors.torch import load_file

    bf16 = ["--mixed_precision", "bf16"]
    launch_lora(["--multi_gpu", *bf16], root / "lora-ddp-bf16", lora_pretrained, *bf16)
    ddp_bf16 = load_file(root / "lora-ddp-bf16" / "pytorch_lora_weights.safetensors")

    ddp = largest_difference(ddp_bf16, lora_ddp)
    assert 1e-5 < ddp
    for stage, flags in (("zero2", ["--zero_stage", "2"]), ("zero3", ["--deepspeed_config_file", ZERO3_CONFIG])):
        launch_lora(["--use_deepspeed", *flags, *bf16], root / f"lora-{stage}-bf16", lora_pretrained, *bf16)
        trained = load_file(root / f"lora-{stage}-bf16" / "pytorch_lora_weights.safetensors")
        assert sorted(trained) == sorted(lora_ddp) == sorted(ddp_bf16)
        assert all(torch.equal(v, v.bfloat16().float()) for v in trained.values())  # DeepSpeed's bf16 module
        largest = max(float(v.abs().max()) for v in trained.values())
        half_ulp = 2.0 ** (math.floor(math.log2(largest)) - 8)
        zero = largest_difference(trained, lora_ddp)
        print(f"max distance from DDP float32: {stage} bf16 {zero:.3g}, DDP bf16 {ddp:.3g} (half a bf16 ulp {half_ulp:.3g})")
        assert zero <= 2 * ddp + half_ulp, stage
        assert zero < 7e-2 / 4  # (well below a wrong update's distance, should DDP's bf16 run be wrong too)
