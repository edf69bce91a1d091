"""The flags of diffusers' example scripts that train_ant.py carries over (issue 9, item 8), and
validation images reaching every tracker (item 9)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from tolerances import unit_roundoff
from trainer_utils import TINY_RUN, load_safetensors_dir, train_in_process


def _sd_args(out, *extra):
    return ["--model_type", "sd", "--dataset_name", "mnist5k_captions", "--output_dir", str(out), *TINY_RUN, *extra]


def test_proportion_empty_prompts_drops_that_share_of_captions_deterministically():
    from diffusers_ant.data import load_builtin_dataset, make_train_dataloader, resolve_columns
    from diffusers_ant.models import tiny_clip_tokenizer

    dataset = load_builtin_dataset("mnist5k_captions").select(range(200))
    columns = resolve_columns(dataset, need_captions=True)
    tokenizer = tiny_clip_tokenizer()
    empty = tokenizer("", max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                      return_tensors="pt").input_ids[0]

    def share(p, epoch=0):
        loader = make_train_dataloader(dataset, columns, resolution=8, batch_size=200, tokenizer=tokenizer,
                                       proportion_empty_prompts=p, seed=1)
        loader.sampler.set_epoch(epoch)
        ids = next(iter(loader))["input_ids"]
        return (ids == empty).all(dim=1).float().mean().item(), ids

    assert share(0.0)[0] == 0.0 and share(1.0)[0] == 1.0
    half, ids = share(0.5)
    assert 0.35 < half < 0.65
    assert torch.equal(ids, share(0.5)[1])  # the same draw for the same (seed, epoch, sample)
    with pytest.raises(ValueError, match="proportion_empty_prompts"):
        share(1.5)


def test_resize_filter_defaults_to_the_scripts_of_each_type():
    """diffusers' text-to-image scripts resize with lanczos by default, its unconditional and ControlNet scripts
    with bilinear (the trainer used bilinear for every type); every filter name they accept is accepted, and a
    checkpoint written under the old default resumes with it."""
    from PIL import Image

    from diffusers_ant.data.transforms import INTERPOLATIONS, ImageTransform
    from diffusers_ant.training import parse_args
    from diffusers_ant.training.args import IMAGE_INTERPOLATIONS
    from diffusers_ant.training.loop import adopt_recorded_defaults

    def mode(model_type, *extra):
        dataset = "mnist5k_captions" if model_type in ("sd", "controlnet") else "mnist5k"
        return parse_args(["--model_type", model_type, "--dataset_name", dataset, *extra])

    assert mode("sd").image_interpolation_mode == "lanczos"
    assert mode("unet").image_interpolation_mode == mode("controlnet").image_interpolation_mode == "bilinear"
    assert mode("sd", "--image_interpolation_mode", "box").image_interpolation_mode == "box"
    old = mode("sd")
    assert adopt_recorded_defaults(old, {"image_interpolation_mode": "bilinear"}) and old.image_interpolation_mode == "bilinear"
    assert not adopt_recorded_defaults(mode("sd", "--image_interpolation_mode", "lanczos"),
                                       {"image_interpolation_mode": "bilinear"})
    # the flag's choices are the transform's filters; nearest_exact is PIL's nearest, as torchvision maps it
    assert tuple(IMAGE_INTERPOLATIONS) == INTERPOLATIONS
    image = Image.effect_noise((23, 17), 60).convert("RGB")
    resized = {name: ImageTransform(8, center_crop=True, interpolation=name)(image) for name in INTERPOLATIONS}
    assert torch.equal(resized["nearest_exact"], resized["nearest"])
    assert not torch.equal(resized["lanczos"], resized["bilinear"])


def test_validation_prompts_and_images_are_paired_and_cycled(tmp_path):
    from PIL import Image

    from diffusers_ant.training import parse_args
    from diffusers_ant.training.loop import default_validation_inputs

    paths = []
    for colour in ("white", "black"):
        path = tmp_path / f"{colour}.png"
        Image.new("RGB", (8, 8), colour).save(path)
        paths.append(str(path))
    args = parse_args(["--model_type", "controlnet", "--dataset_name", "mnist5k_captions", "--num_validation_images",
                       "4", "--validation_prompt", "a digit 1", "a digit 2", "--validation_image", *paths])
    inputs = default_validation_inputs(args, None, None)
    assert inputs["prompts"] == ["a digit 1", "a digit 2", "a digit 1", "a digit 2"]
    colours = [img.getpixel((0, 0)) for img in inputs["conditioning_images"]]
    assert colours == [(255, 255, 255), (0, 0, 0), (255, 255, 255), (0, 0, 0)]


@pytest.mark.parametrize("extra,needle", [
    (["--use_8bit_adam"], "pip install bitsandbytes"),
    (["--enable_xformers_memory_efficient_attention"], "pip install xformers"),
    (["--proportion_empty_prompts", "0.5"], "sd and controlnet"),
    (["--validation_epochs", "0"], "--validation_epochs"),
    (["--lr_num_cycles", "0"], "--lr_num_cycles"),
    (["--loss_weighting", "p2", "--snr_gamma", "5"], "drop --snr_gamma (P2 takes --p2_k and --p2_gamma)"),
    # P2's flags alone trained plain MSE without a word; bad values failed only at the first step
    (["--p2_gamma", "0.5"], "--p2_gamma is P2's, which --loss_weighting none does not use: add --loss_weighting p2"),
    (["--snr_gamma", "5", "--p2_k", "2"], "--p2_k is P2's, which --loss_weighting min_snr does not use"),
    (["--snr_gamma", "0"], "--snr_gamma must be > 0"),
    # found after training (the end's samples, card and push lost), or never (a negative norm reverses every step)
    (["--num_inference_steps", "0"], "--num_inference_steps 0: the validation samples need 1 or more"),
    (["--max_grad_norm", "-1"], "give a positive norm, or 0 to turn clipping off"),
    (["--ddp_timeout", "0"], "--ddp_timeout 0: give the seconds a process may wait in a collective, 1 or more"),
    (["--use_ema", "--ema_inv_gamma", "0"], "--ema_inv_gamma must be > 0"),
    (["--use_ema", "--ema_max_decay", "1.5"], "--ema_max_decay must be between 0 and 1"),
    (["--loss_weighting", "p2", "--p2_k", "0"], "P2 needs --p2_k > 0 and --p2_gamma >= 0"),
    (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be at least 1"),
    # as diffusers' scripts: wandb uploads the command line, token included, with or without --push_to_hub
    (["--report_to", "wandb", "--hub_token", "hf_abcdefghijkl"], "--hub_token"),
    # before training, not at the upload after it (this suite runs with HF_HUB_OFFLINE=1)
    (["--push_to_hub"], "--push_to_hub needs the network but HF_HUB_OFFLINE is set"),
])
def test_flags_that_need_a_package_or_a_model_type_fail_in_one_line(extra, needle, tmp_path, capsys, monkeypatch):
    from train_scripts_loader import load_train_main

    for package in ("bitsandbytes", "xformers"):
        if package in needle:  # the error path needs it absent: hidden if installed (the test extra has bitsandbytes)
            monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(SystemExit):
        load_train_main()(["--dataset_name", "mnist5k", "--output_dir", str(tmp_path), *TINY_RUN, *extra])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_default_validation_prompts_take_one_caption_of_a_list():
    """A caption column of lists (diffusers' scripts draw one per sample): the validation prompts are strings,
    the first caption of each row; a list handed to the pipeline was encoded as a text pair or refused."""
    import datasets

    from diffusers_ant.training import parse_args
    from diffusers_ant.training.loop import default_validation_inputs

    dataset = datasets.Dataset.from_dict({"text": [["a red cat", "a cat on a mat"], ["a dog"], ["a bird", "an owl"]]})
    args = parse_args(["--model_type", "sd", "--dataset_name", "mnist5k_captions", "--num_validation_images", "4"])
    inputs = default_validation_inputs(args, dataset, {"caption_column": "text"})
    assert inputs["prompts"] == ["a red cat", "a dog", "a bird", "a red cat"]


def test_lr_cycles_and_power_reach_the_scheduler():
    """--lr_scheduler polynomial --lr_power 2 decays quadratically; cosine_with_restarts restarts."""
    from diffusers_ant.training import parse_args
    from diffusers_ant.training.components import build_lr_scheduler

    def lrs(*flags):
        args = parse_args(["--dataset_name", "mnist5k", "--max_train_steps", "10", "--learning_rate", "1.0", *flags])
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = build_lr_scheduler(args, optimizer, num_processes=1)
        values = []
        for _ in range(10):
            values.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return values

    linear, quadratic = lrs("--lr_scheduler", "polynomial"), lrs("--lr_scheduler", "polynomial", "--lr_power", "2")
    assert quadratic[5] == pytest.approx(linear[5] ** 2, rel=1e-3) and quadratic[5] < linear[5]
    one, two = lrs("--lr_scheduler", "cosine_with_restarts"), lrs("--lr_scheduler", "cosine_with_restarts",
                                                                  "--lr_num_cycles", "2")
    assert two[5] > two[4] and one[5] < one[4]  # the second cycle starts again at the top


def test_the_ema_state_of_a_checkpoint_is_read_after_the_device_has_finished(monkeypatch):
    """--offload_ema queues each update's copy back to the CPU without waiting (as diffusers' scripts): a
    checkpoint reads the shadow weights on the host only after the device is synchronised, and a CPU run
    waits for nothing. (A GPU device object, and a recording synchronize, stand in for a GPU here.)"""
    from types import SimpleNamespace

    from diffusers.training_utils import EMAModel

    from diffusers_ant.training.ema import ema_state

    ema = EMAModel([torch.nn.Parameter(torch.ones(3))])
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    assert ema_state(ema, SimpleNamespace(device=torch.device("cpu")))["shadow_params"][0].tolist() == [1.0] * 3
    assert waited == []
    state = ema_state(ema, SimpleNamespace(device=torch.device("cuda", 1)))
    assert waited == [torch.device("cuda", 1)] and state["optimization_step"] == 0


@pytest.mark.slow
def test_offloaded_foreach_ema_equals_plain_ema_and_epochs_validate(tmp_path):
    common = ["--model_type", "unet", "--dataset_name", "mnist5k", *TINY_RUN, "--max_train_steps", "4",
              "--use_ema", "--max_train_samples", "16", "--num_validation_images", "1"]
    train_in_process([*common, "--output_dir", str(tmp_path / "plain")])
    train_in_process([*common, "--output_dir", str(tmp_path / "offload"), "--offload_ema", "--foreach_ema",
                      "--validation_epochs", "2"])
    a = load_safetensors_dir(tmp_path / "plain" / "unet")
    b = load_safetensors_dir(tmp_path / "offload" / "unet")
    # The same training (EMA does not feed back into it); the EMA updates differ in rounding alone: each side
    # rounds s - p, (1 - decay)(s - p) and s minus that once a step (foreach may fuse the last two), at most
    # u (2M + 2M + M), M the largest |weight| the tensor had (its final one plus 4 Adam steps of about the
    # learning rate each), and a step carries the earlier errors on times decay <= 1: 4 steps x 2 sides x 5uM.
    # Measured: 1.8u max |w|; one EMA step fewer moves a tensor by up to 0.2 max |w|, 1e5 x the bound.
    lr = float(TINY_RUN[TINY_RUN.index("--learning_rate") + 1])
    for key in a:
        largest = float(a[key].abs().max()) + 4 * lr
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=4 * 2 * 5 * unit_roundoff() * largest)
    # 2 batches an epoch: epochs end at steps 2 and 4; step 4 is the end of training (final grid). Every 2
    # epochs counts from the first, as in diffusers' scripts (`epoch % validation_epochs == 0`): a grid at step 2
    assert (tmp_path / "offload" / "samples" / "step-2.png").is_file()
    assert not (tmp_path / "plain" / "samples" / "step-2.png").exists()


@pytest.mark.slow
def test_sd_with_caption_dropout_and_validation_guidance_trains(tmp_path, monkeypatch):
    """--proportion_empty_prompts 0.5: about half the captions the objective gets are the empty prompt."""
    from diffusers_ant.models import tiny_clip_tokenizer
    from trainer_utils import record_batches

    seen = record_batches(monkeypatch, lambda objective, batch: batch["input_ids"].clone())
    out = tmp_path / "sd"
    train_in_process(_sd_args(out, "--max_train_steps", "2", "--proportion_empty_prompts", "0.5",
                              "--guidance_scale", "3.0", "--validation_prompt", "a handwritten digit 7"))
    assert (out / "samples" / "step-2.png").is_file()
    tokenizer = tiny_clip_tokenizer()
    empty = tokenizer("", max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                      return_tensors="pt").input_ids[0]
    rows = torch.cat(seen)
    dropped = int((rows == empty).all(dim=1).sum())
    assert len(rows) == 16 and 2 <= dropped <= 14, dropped  # Binomial(16, 0.5): outside [2, 14] once in 2,000


def _recording_tracker(tracker_name: str):
    """An Accelerate tracker named `tracker_name` that keeps what it is given (`logged`, `images`)."""
    from accelerate.tracking import GeneralTracker

    class Recording(GeneralTracker):
        name = tracker_name
        requires_logging_directory = False

        def __init__(self):
            super().__init__()
            self.logged, self.images = [], []

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            self.logged.append((values, step))

        def log_images(self, values, step=None, **kwargs):
            self.images.append((values, step))

    return Recording()


def test_validation_images_reach_every_tracker(tmp_path):
    from accelerate.tracking import TensorBoardTracker
    from PIL import Image

    from diffusers_ant.training.validation import log_images_to_trackers

    recording = _recording_tracker("recording")
    board = TensorBoardTracker("run", str(tmp_path / "tb"))
    board.start()  # what accelerator.init_trackers does
    accelerator = types.SimpleNamespace(trackers=[board, recording])
    images = [Image.new("L", (8, 8), 10), Image.new("L", (8, 8), 200)]
    log_images_to_trackers(accelerator, images, step=3)
    board.finish()
    assert recording.images == [({"validation": images}, 3)]
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*")), "tensorboard wrote no event file"


def test_wandb_gets_each_validation_image_with_its_prompt_as_caption(monkeypatch):
    """diffusers' scripts log `wandb.Image(image, caption=f"{i}: {prompt}")`; Accelerate's `log_images` wraps
    the images without one, so a text-to-image run's grid on wandb said nothing of its prompts. (`wandb` is not
    a dependency: a module standing in for it records what the tracker is given.)"""
    from PIL import Image

    from diffusers_ant.training.validation import log_images_to_trackers

    class WandbImage:
        def __init__(self, data, caption=None):
            self.data, self.caption = data, caption

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Image=WandbImage))

    tracker = _recording_tracker("wandb")
    accelerator = types.SimpleNamespace(trackers=[tracker])
    images = [Image.new("L", (8, 8), 10), Image.new("L", (8, 8), 200)]
    log_images_to_trackers(accelerator, images, step=5, captions=["a cat", "a dog"])
    [(values, step)] = tracker.logged
    assert step == 5 and [(w.data, w.caption) for w in values["validation"]] == [(images[0], "0: a cat"),
                                                                                  (images[1], "1: a dog")]
    log_images_to_trackers(accelerator, images, step=6)  # class-conditional or unconditional: no captions
    assert tracker.images == [({"validation": images}, 6)]


def test_variant_reaches_the_controlnet_folder(tmp_path):
    """`--variant` (and --revision, --cache_dir) apply to --controlnet_model_name_or_path as to the base."""
    from diffusers import ControlNetModel

    from diffusers_ant.models import get_model_adapter

    base = get_model_adapter("sd").load(model_config_name_or_path="tiny", resolution=16, num_channels=3)
    pipeline = base.make_pipeline()
    pipeline.save_pretrained(tmp_path / "sd")
    pipeline.save_pretrained(tmp_path / "sd", variant="fp16")
    ControlNetModel.from_unet(base.model, conditioning_embedding_out_channels=(16, 32)).save_pretrained(
        tmp_path / "cn", variant="fp16")  # the ControlNet exists only as the fp16 variant
    adapter = get_model_adapter("controlnet").load(pretrained_model_name_or_path=str(tmp_path / "sd"),
                                                   controlnet_model_name_or_path=str(tmp_path / "cn"), variant="fp16")
    assert list(adapter.model.config.conditioning_embedding_out_channels) == [16, 32]
    with pytest.raises(ValueError, match="not found"):
        get_model_adapter("controlnet").load(pretrained_model_name_or_path=str(tmp_path / "sd"),
                                             controlnet_model_name_or_path=str(tmp_path / "cn"))
    # a ControlNet without the base's variant (train_controlnet.py's outputs, most Hub ControlNets): its own
    # weights, not "not found" (diffusers' script loads the ControlNet without the base's variant)
    ControlNetModel.from_unet(base.model, conditioning_embedding_out_channels=(16, 64)).save_pretrained(tmp_path / "plain")
    adapter = get_model_adapter("controlnet").load(pretrained_model_name_or_path=str(tmp_path / "sd"),
                                                   controlnet_model_name_or_path=str(tmp_path / "plain"), variant="fp16")
    assert list(adapter.model.config.conditioning_embedding_out_channels) == [16, 64]


def test_uw_log_variances_keep_their_constant_learning_rate_under_the_schedule():
    """ANT trains UW's log-variances at a constant lr 0.025: warm-up and cosine decay apply to the model only."""
    from diffusers_ant.training import parse_args
    from diffusers_ant.training.components import build_lr_scheduler
    from diffusers_ant.weighting import get_weighting

    args = parse_args(["--dataset_name", "mnist5k", "--max_train_steps", "10", "--lr_scheduler", "cosine",
                       "--lr_warmup_steps", "3", "--learning_rate", "1.0"])
    model = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [model]}, *get_weighting("uw", 3).param_groups()], lr=1.0)
    scheduler = build_lr_scheduler(args, optimizer, num_processes=1)
    model_lrs, uw_lrs = [], []
    for _ in range(10):
        model_lrs.append(optimizer.param_groups[0]["lr"])
        uw_lrs.append(optimizer.param_groups[1]["lr"])
        optimizer.step()
        scheduler.step()
    assert model_lrs[0] == 0.0 and max(model_lrs) == pytest.approx(1.0) and model_lrs[-1] < 0.2
    assert uw_lrs == [pytest.approx(0.025)] * 10


def _wsd(*flags):
    return ["--lr_scheduler", "warmup_stable_decay", *flags]


def test_warmup_stable_decay_warms_up_holds_cools_down_and_agrees_with_constant_with_warmup_before():
    """--lr_scheduler warmup_stable_decay: linear warm-up from 0 (diffusers' constant_with_warmup's),
    constant, a half-cosine cool-down of --lr_decay_steps to --lr_min_ratio, then held there."""
    import math

    from diffusers_ant.training.components import lr_factors

    wsd = lr_factors({"lr_scheduler": "warmup_stable_decay", "lr_warmup_steps": 4, "lr_stable_steps": 6,
                      "lr_decay_steps": 8, "lr_min_ratio": 0.1}, 24)
    constant = lr_factors({"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 4}, 24)
    assert wsd[:11] == constant[:11] and wsd[0] == 0.0 and wsd[2] == 0.5 and wsd[10] == 1.0
    assert wsd[14] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert all(a > b for a, b in zip(wsd[10:18], wsd[11:18]))  # decaying through the cool-down
    assert wsd[18:] == [0.1] * 6
    # without --lr_stable_steps the cool-down ends at --max_train_steps
    ends = lr_factors({"lr_scheduler": "warmup_stable_decay", "lr_warmup_steps": 2, "lr_decay_steps": 5,
                       "max_train_steps": 12}, 12)
    assert ends[6] == 1.0 and ends[7] == 1.0 and ends[8] < 1.0 and ends[11] < 0.1


@pytest.mark.parametrize("flags, message", [
    (_wsd(), "--lr_scheduler warmup_stable_decay needs --lr_decay_steps"),
    (_wsd("--lr_decay_steps", "5", "--lr_min_ratio", "1.5"), "--lr_min_ratio must lie in [0, 1)"),
    (["--lr_decay_steps", "5"], "--lr_decay_steps applies to --lr_scheduler warmup_stable_decay only"),
    (["--lr_min_ratio", "0.1"], "--lr_min_ratio applies to --lr_scheduler warmup_stable_decay only"),
])
def test_warmup_stable_decay_bad_flags_are_refused_in_one_line(flags, message):
    from diffusers_ant.training import parse_args
    from diffusers_ant.training.args import UsageError

    with pytest.raises(UsageError) as refused:
        parse_args(["--dataset_name", "mnist5k", *flags])
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_schedule_change_on_resume_is_refused_unless_it_agrees_up_to_the_checkpoint():
    from diffusers_ant.training.checkpoint import check_resume_config

    old = {"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 10, "max_train_steps": 100}
    cool = {**old, "lr_scheduler": "warmup_stable_decay", "lr_stable_steps": 40, "lr_decay_steps": 20}
    assert check_resume_config(old, cool, "out/checkpoint-50") == [
        "--lr_scheduler: 'constant_with_warmup' -> 'warmup_stable_decay'"]
    with pytest.raises(ValueError, match="changes the learning rate from step 51 .* step 60"):
        check_resume_config(old, cool, "out/checkpoint-60")  # the cool-down began after step 50
    with pytest.raises(ValueError, match="changes the learning rate from step 11 .* step 30"):
        check_resume_config(old, {**old, "lr_scheduler": "cosine"}, "out/checkpoint-30", num_processes=2)
    # training longer is resume-safe under a schedule that does not depend on the run's length...
    assert check_resume_config(old, {**old, "max_train_steps": 300}, "out/checkpoint-100") == ["--max_train_steps: 100 -> 300"]
    assert check_resume_config(cool, {**cool, "max_train_steps": 300}, "out/checkpoint-100") == ["--max_train_steps: 100 -> 300"]
    # ...but a cosine drawn over more steps gives the steps already trained other rates
    cosine = {**old, "lr_scheduler": "cosine"}
    with pytest.raises(ValueError, match="--max_train_steps was 100 .* is 300 now, which changes the learning rate from step 11"):
        check_resume_config(cosine, {**cosine, "max_train_steps": 300}, "out/checkpoint-50")


def test_a_precision_change_on_resume_is_allowed_except_into_fp16():
    """A bf16 checkpoint resumed in fp16 stopped in Accelerate's load_state on a missing scaler.pt, with a
    traceback: it is refused in one line naming the value to resume with. Other changes go through."""
    from diffusers_ant.training.checkpoint import check_resume_config

    for old, new in (("bf16", "no"), ("no", "bf16"), ("fp16", "bf16")):
        assert check_resume_config({"mixed_precision": old}, {"mixed_precision": new}, "out/checkpoint-5") == [
            f"--mixed_precision: {old!r} -> {new!r}"]
    for old in ("bf16", "no"):
        with pytest.raises(ValueError) as refused:
            check_resume_config({"mixed_precision": old}, {"mixed_precision": "fp16"}, "out/checkpoint-5")
        assert "resume with --mixed_precision bf16 or no" in str(refused.value) and "\n" not in str(refused.value)


def test_a_cool_down_branched_off_a_constant_rate_checkpoint_equals_the_schedule_run_from_scratch(tmp_path):
    """Resuming a constant_with_warmup run with a warmup_stable_decay schedule that agrees up to the
    checkpoint trains exactly the weights of that schedule run from the start (and not those of the
    constant rate: the cool-down takes effect)."""
    common = ["--model_type", "unet", "--dataset_name", "mnist5k", *TINY_RUN, "--max_train_steps", "4",
              "--lr_warmup_steps", "1", "--checkpointing_steps", "2", "--learning_rate", "5e-3"]
    cool_down = _wsd("--lr_stable_steps", "1", "--lr_decay_steps", "2")
    train_in_process([*common, *cool_down, "--output_dir", str(tmp_path / "scratch")])
    train_in_process([*common, "--lr_scheduler", "constant_with_warmup", "--output_dir", str(tmp_path / "branched")])
    constant = load_safetensors_dir(tmp_path / "branched" / "unet")
    train_in_process([*common, *cool_down, "--output_dir", str(tmp_path / "branched"),
                      "--resume_from_checkpoint", "checkpoint-2"])
    scratch, branched = load_safetensors_dir(tmp_path / "scratch" / "unet"), load_safetensors_dir(tmp_path / "branched" / "unet")
    assert scratch.keys() == branched.keys()
    assert all(torch.equal(scratch[k], branched[k]) for k in scratch)
    assert any(not torch.equal(constant[k], branched[k]) for k in constant), "the cool-down changed nothing"


def test_a_run_resumes_under_another_exact_task_gradient_engine_but_not_last_layers():
    """A checkpoint written when `split` was the default resumes under the new default `auto`: the exact
    engines give the same gradients to float rounding. `last_layers` chooses its weights from other
    gradients, so a change to or from it is refused."""
    from diffusers_ant.training.checkpoint import check_resume_config

    old = {"task_gradients": "split", "mtl_method": "pcgrad"}
    assert check_resume_config(old, {**old, "task_gradients": "auto"}, "out/checkpoint-10") == [
        "--task_gradients: 'split' -> 'auto'"]
    assert check_resume_config({**old, "task_gradients": "retain_graph"}, {**old, "task_gradients": "batched"},
                               "out/checkpoint-10") == ["--task_gradients: 'retain_graph' -> 'batched'"]
    with pytest.raises(ValueError, match="--task_gradients was 'split' .* is 'last_layers' now"):
        check_resume_config(old, {**old, "task_gradients": "last_layers"}, "out/checkpoint-10")


@pytest.mark.parametrize("foreach", [False, True])
def test_ema_over_low_precision_parameters_keeps_float32_shadow_weights(foreach):
    """DeepSpeed with bf16 casts the trained parameters themselves to bf16: an EMA cloned from them was kept
    in bf16, where (1 - decay) times a small difference rounds away. make_ema keeps float32 shadow weights,
    which follow the EMA of the same (bf16-valued) weights computed in float32 exactly, where a bf16 EMA lags."""
    import argparse

    from diffusers.training_utils import EMAModel

    from diffusers_ant.training.ema import make_ema

    args = argparse.Namespace(ema_max_decay=0.9999, ema_inv_gamma=1.0, ema_power=2 / 3, foreach_ema=foreach)
    weights = torch.nn.Parameter(torch.zeros(16, dtype=torch.bfloat16))
    ema = make_ema(args, [weights])
    reference = EMAModel([weights.detach().float()], decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3)
    in_bf16 = EMAModel([weights], decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3)
    for step in range(1, 3001):
        with torch.no_grad():
            weights.copy_(torch.full((16,), step * 1e-3))  # steady drift, as training moves the weights
        for e in (ema, reference, in_bf16):
            e.step([weights])
    assert ema.shadow_params[0].dtype == torch.float32
    torch.testing.assert_close(ema.shadow_params[0], reference.shadow_params[0], rtol=0, atol=0)
    moved, lagging = float(ema.shadow_params[0][0]), float(in_bf16.shadow_params[0][0])
    assert moved > 2.0 and lagging < 0.8 * moved, (moved, lagging)


def test_trackers_are_closed_when_training_fails_and_a_stale_weighting_record_goes(tmp_path, monkeypatch):
    """`accelerator.end_training()` (the trackers' flush and close) ran only at the end of a successful run: an
    error in validation, a failed push or Ctrl-C skipped it. And a run without a weighting in the folder of an
    earlier UW run kept that run's weighting_config.json, describing a weighting the model never had."""
    from accelerate import Accelerator

    from diffusers_ant.training import loop

    run = ["--model_type", "unet", "--dataset_name", "mnist5k", "--output_dir", str(tmp_path), *TINY_RUN,
           "--max_train_steps", "1", "--num_validation_images", "1"]
    train_in_process([*run, "--mtl_method", "uw"])
    assert (tmp_path / "weighting_config.json").is_file()
    ended = []
    monkeypatch.setattr(Accelerator, "end_training", lambda self: ended.append(True))

    def failing_finish(*args, **kwargs):
        raise RuntimeError("validation ran out of memory")

    monkeypatch.setattr(loop, "finish", failing_finish)
    with pytest.raises(RuntimeError, match="out of memory"):
        train_in_process([*run, "--mtl_method", "none", "--output_dir", str(tmp_path / "again")])
    assert ended == [True]
    monkeypatch.undo()
    train_in_process([*run, "--mtl_method", "none"])
    assert not (tmp_path / "weighting_config.json").exists()


def test_xformers_reaches_a_controlnet_and_its_frozen_unet(monkeypatch):
    """As diffusers' train_controlnet.py: the frozen UNet's attention takes xformers too, not only the
    ControlNet's (recorded at diffusers' own method: xformers is not installed here)."""
    from diffusers.models.modeling_utils import ModelMixin

    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.training import parse_args
    from diffusers_ant.training.loop import prepare_model

    enabled = []
    monkeypatch.setattr(ModelMixin, "enable_xformers_memory_efficient_attention",
                        lambda self, *a, **k: enabled.append(type(self).__name__))
    args = parse_args(["--model_type", "controlnet", "--dataset_name", "mnist5k_captions", *TINY_RUN])
    args.enable_xformers_memory_efficient_attention = True  # (parse_args refuses it without the package)
    adapter = get_model_adapter("controlnet").load(model_config_name_or_path="tiny", resolution=16)
    prepare_model(args, types.SimpleNamespace(device=torch.device("cpu"), mixed_precision="no", print=lambda *a: None,
                                              autocast=None), adapter)
    assert sorted(enabled) == ["ControlNetModel", "UNet2DConditionModel"]


def test_a_controlnet_run_on_another_target_than_its_frozen_unet_is_refused(tmp_path):
    """The ControlNet's residuals steer a frozen UNet whose output is the prediction: a v-prediction base (SD 2.1)
    trained with --prediction_type epsilon pushed the ControlNet towards a target the pair cannot reach. One line,
    before training; the base's own target trains."""
    from diffusers_ant.models import get_model_adapter

    base = get_model_adapter("sd").load(model_config_name_or_path="tiny", resolution=16)
    base.noise_scheduler.register_to_config(prediction_type="v_prediction")
    base.save(str(tmp_path / "sd21"))
    run = [a for a in TINY_RUN if a != "tiny"]
    run.remove("--model_config_name_or_path")

    def train(out, *extra):
        train_in_process(["--model_type", "controlnet", "--dataset_name", "mnist5k_captions", "--output_dir",
                          str(tmp_path / out), "--pretrained_model_name_or_path", str(tmp_path / "sd21"),
                          "--max_train_steps", "1", "--num_validation_images", "0", *run, *extra])

    with pytest.raises(ValueError, match="which predicts v_prediction, and this run trains epsilon "
                                         "\\(--prediction_type epsilon\\): drop --prediction_type"):
        train("eps", "--prediction_type", "epsilon")
    assert not (tmp_path / "eps" / "checkpoint-1").exists()
    train("v", "--prediction_type", "v_prediction")
    assert (tmp_path / "v" / "config.json").is_file()
