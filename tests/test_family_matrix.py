"""Issue 16's test matrix for the four new families, and the cells no other module fills.

Issue 16's "Tests" section, cell by cell: which test covers each item for each new family (tiny presets,
in-process unless said). Files: sdxl = test_family_sdxl.py, sd3 = test_family_sd3.py, flux =
test_family_flux.py, qwen = test_family_qwenimage.py, banks = test_family_banks.py, gaps =
test_family_gaps.py, here = this module.

item                     | sdxl                          | sd3                              | flux                             | qwenimage
-------------------------|-------------------------------|----------------------------------|----------------------------------|---------------------------------
vanilla LoRA trains      | sdxl vanilla_run (+ own VAE)  | here buckets runs (vanilla LoRA) | flux vanilla_bf16                | qwen vanilla
ANT uw                   | sdxl resume test (+ TE LoRA); here 2-proc | sd3 lora_uw (stratified) | flux resume_runs              | qwen resumed
ANT pcgrad, LoRA subset  | sdxl pcgrad (bf16)            | sd3 pcgrad (bf16, no T5); here 2-proc | flux pcgrad (stratified)    | qwen pcgrad (--lora_layers)
Diff-Tuning, bank        | banks test_diff_tuning_trains_on_each_familys_bank[sdxl] | banks bank_run (built by the CLI) | banks ..[flux] | banks ..[qwenimage]
Diff-Tuning, kd          | here kd[sdxl]                 | here kd[sd3]                     | here 2-proc (kd)                 | qwen test_diff_tuning_kd_trains_a_lora
DeMe, two intervals      | here deme_runs                | here deme_runs                   | here deme_runs                   | gaps qwen_deme_* (cached, projections); here deme_runs; here 2-proc
DeMe merged as a LoRA    | here merge[sdxl] (== dense)   | here merge[sd3] (== dense)       | here merge[flux] (== dense)      | gaps merge (projections); here merge (== dense)
DeMe ensemble            | here ensemble[sdxl]           | here ensemble[sd3]               | here ensemble[flux]              | here ensemble[qwenimage]
loads: pipeline + load_lora_weights, samples | sdxl test_lora_output_loads.. (+ card snippet) | sd3 test_lora_with_uw_saves.. | flux test_lora_output_loads.. | qwen test_vanilla_lora_loads..; merged LoRAs: here merge
resume 20 == 10 + 10     | sdxl resume test (LoRA, UW, EMA, TE LoRA) | sd3 LoRA (UW, EMA); sd3 full fine-tune (EMA, UW) | flux resume (LoRA, UW, EMA) | qwen resumed (LoRA, UW, shift)
bf16                     | sdxl pcgrad                   | sd3 pcgrad                       | flux vanilla_bf16                | qwen bf16 test
two processes identical  | here 2-proc (uw)              | here 2-proc (pcgrad, LoRA subset) | here 2-proc (kd)                | here 2-proc (DeMe + projections)
cached == uncached loss  | here buckets[sdxl] (losses); sdxl time-id cache (encoding) | here buckets[sd3] | here buckets[flux]; gaps flux cached (encoding, training) | here buckets[qwenimage]; qwen caching hooks (encoding)
buckets: right bucket, resume exact | here buckets[sdxl] (4 == 2 + 2) | here buckets[sd3]   | here buckets[flux]               | here buckets[qwenimage]
LoRA-merged DeMe == dense | here merge[sdxl]             | here merge[sd3]                  | here merge[flux]                 | here merge[qwenimage]
kd teacher shares storage | here kd[sdxl]; here teacher[sdxl] | here kd[sd3]; here teacher[sd3] | here teacher[flux] (DeMe's run: the same make_teacher) | here teacher[qwenimage] (same)

Bucket resumes are 4 == 2 + resume + 2 (mid-epoch); the 20 == 10 + resume + 10 checks are the family modules'.

Two processes: one `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU) of
tests/scripts/ddp_families_check.py trains the four families in turn in the same two processes (one
import of torch / diffusers / transformers per process), each with LoRA and one method.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tolerances import output_tolerance, task_arithmetic_tolerance
from trainer_utils import failure_output, offline_env, run_command

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: two threads contend on a shared 2-core machine

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("sdxl", "sd3", "flux", "qwenimage")
DDP_STEPS = 2  # tests/scripts/ddp_families_check.py's STEPS


@pytest.fixture(scope="module")
def two_process_families(bases, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-families")
    env = offline_env(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", "0",  # a free port: other test runs may hold the default 29500
        str(REPO / "tests" / "scripts" / "ddp_families_check.py"), "--output_dir", str(out),
        "--bases", str(bases["sdxl"].parent),
    ]
    result = run_command(command, env=env, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + failure_output(result.stderr)
    for family in FAMILIES:
        for rank in (0, 1):
            assert f"{family}: rank {rank} trained {DDP_STEPS} micro-batches on 2 processes" in result.stdout, family
    # sdxl's cached text embeddings: each process wrote a store of its own and removed it when training ended
    for rank in (0, 1):
        assert f"sdxl: rank {rank} cached in sdxl/.training_cache_{rank}, removed at the end" in result.stdout
    assert "cached in" not in result.stdout.replace("sdxl: rank 0 cached in", "").replace("sdxl: rank 1 cached in", "")
    return {family: [load_file(out / f"{family}_rank{rank}.safetensors") for rank in (0, 1)] for family in FAMILIES}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_two_processes_train_each_family_identically_on_their_own_shards(two_process_families, family):
    """sdxl: UW (on cached text embeddings); sd3: PCGrad on the LoRA subset; flux: Diff-Tuning kd; qwenimage: DeMe (LoRA and channel
    projections). Both processes end with bit-identical trainable weights, which moved from the (shared)
    initial ones, after each trained on micro-batches of its own."""
    rank0, rank1 = two_process_families[family]
    assert rank0.keys() == rank1.keys()
    names = [k[len("final."):] for k in rank0 if k.startswith("final.")]
    assert names and all("lora" in n or "channel_projection" in n for n in names), names[:4]
    for name in names:
        assert torch.equal(rank0[f"final.{name}"], rank1[f"final.{name}"]), name
        assert torch.equal(rank0[f"init.{name}"], rank1[f"init.{name}"]), name
    moved = {n: (rank0[f"final.{n}"] - rank0[f"init.{n}"]).abs().max().item() for n in names}
    assert max(moved.values()) > 1e-3  # the steps trained (B starts at zero: a no-op run would leave it)
    assert max(v for n, v in moved.items() if "lora_B" in n or "lora.up" in n) > 1e-3
    if family == "qwenimage":  # DeMe's projections: averaged outside DDP, identical and trained
        assert max(v for n, v in moved.items() if "channel_projection" in n) > 1e-3
    # two shards: each process trained DDP_STEPS micro-batches of 2 rows, none of them the other's
    seen0, seen1 = rank0["batches"], rank1["batches"]
    assert seen0.shape == seen1.shape == (DDP_STEPS, 2)
    assert not set(seen0.flatten().tolist()) & set(seen1.flatten().tolist())


# --------------------------------------------------------------------------- in-process runs on the tiny bases

RES = 16


@pytest.fixture(scope="module")
def bases(one_thread, tmp_path_factory):
    """Each family's tiny preset saved as the pretrained pipeline folder the LoRA runs start from."""
    from diffusers_ant.models import get_model_adapter

    root = tmp_path_factory.mktemp("family-bases")
    folders = {}
    for family in FAMILIES:
        folders[family] = root / family
        torch.manual_seed(0)
        get_model_adapter(family).load(model_config_name_or_path="tiny", resolution=RES).save(str(folders[family]))
    return folders


def _args(family, base, out, *extra):
    from trainer_utils import TINY_RUN

    run = list(TINY_RUN)
    i = run.index("--model_config_name_or_path")
    del run[i:i + 2]
    return ["--model_type", family, "--pretrained_model_name_or_path", str(base), "--dataset_name", "mnist5k_captions",
            "--output_dir", str(out), *run, "--resolution", str(RES), "--train_batch_size", "2",
            "--max_train_samples", "4", "--rank", "4", "--num_clusters", "2", "--max_train_steps", "2",
            "--learning_rate", "1e-2", "--num_validation_images", "1", "--num_inference_steps", "1",
            "--checkpointing_steps", "100", *extra]


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _train_capturing_the_teacher(args):
    """Run the trainer; return the teacher it built and the inputs / output of the teacher's last call."""
    from diffusers_ant import teacher as teachers
    from trainer_utils import train_in_process

    made, calls = [], []
    make = teachers.make_teacher

    def capture(*a, **k):
        teacher = make(*a, **k)
        predict = teacher.predict

        def recording(x_t, model_t, conditioning, *rest, **kw):
            out = predict(x_t, model_t, conditioning, *rest, **kw)
            calls[:] = [(_clone(x_t), _clone(model_t), _clone(conditioning), out.detach().clone())]
            return out

        teacher.predict = recording
        made.append(teacher)
        return teacher

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(teachers, "make_teacher", capture)
        train_in_process(args)
    assert len(made) == 1 and calls
    return made[0], calls[0]


def _base_adapter(family, base):
    from diffusers_ant.models import get_model_adapter

    return get_model_adapter(family).load(pretrained_model_name_or_path=str(base), resolution=RES)


def _storage(module):
    return {p.data_ptr() for p in module.parameters()}


def _check_teacher_shares_the_student(family, base, teacher, call):
    """The teacher is the student with its adapters disabled (no second copy: the same parameter storage), and
    at its last call (the LoRA already moved) it predicted exactly what the base model predicts."""
    from diffusers_ant.teacher import AdapterDisabledTeacher

    x_t, model_t, cond, taught = call
    assert isinstance(teacher, AdapterDisabledTeacher) and teacher.shares_student
    assert teacher.model is teacher.adapter.model and _storage(teacher.model) == _storage(teacher.adapter.model)
    assert any("lora_" in n for n, _ in teacher.model.named_parameters())
    reference = _base_adapter(family, base)
    with torch.no_grad():
        expected = reference.predict(reference.model.eval(), x_t, model_t, cond).float()
        student = teacher.adapter.predict(teacher.model.eval(), x_t, model_t, cond).float()
    # the same function (the base's weights; the LoRA layers return their base layer's output exactly), the teacher's
    # computed inside the training step (autograd on: other kernels may run): rounding alone, tests/tolerances.py's
    # output_tolerance (L the base denoiser's layers: 3e-4 to 8e-4; observed 0 to 3e-7). A teacher that kept the
    # LoRA on predicts the student, 0.02 to 2 away: 64x the bound at least
    tolerance = output_tolerance(reference.model, expected)
    torch.testing.assert_close(taught, expected, rtol=0, atol=tolerance)
    assert (student - expected).abs().max() > 50 * tolerance  # the student differs: the comparison can fail


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "sd3"])  # flux: the two-process run above; qwenimage: its own module
def test_diff_tuning_kd_trains_and_its_teacher_is_the_student_with_adapters_off(family, bases, tmp_path):
    """2 LoRA steps of `--retention kd` train the LoRA, with the teacher the student with adapters off (the
    same teacher DeMe's runs use: checked for every family on them, below)."""
    out = tmp_path / "kd"
    teacher, call = _train_capturing_the_teacher(
        _args(family, bases[family], out, "--retention", "kd", "--bank_fraction", "0.5"))
    _check_teacher_shares_the_student(family, bases[family], teacher, call)
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert max(t.abs().max().item() for k, t in lora.items() if "lora_B" in k or "lora.up" in k) > 0  # trained


# --------------------------------------------------------------------------- DeMe: two intervals, merged and ensembled


@pytest.fixture(scope="module")
def deme_runs(bases, tmp_path_factory):
    """Per family, DeMe's two interval LoRA fine-tunes (2 steps each, channel projections on), and the
    inputs of one teacher call of interval 0's run (a batch of the family's own conditioning)."""
    root = tmp_path_factory.mktemp("deme")
    runs = {}
    for family in FAMILIES:
        folders = [root / family / f"interval-{i}" for i in (0, 1)]
        teacher, call = _train_capturing_the_teacher(_args(family, bases[family], folders[0], "--deme_interval", "0",
                                                           "--no-use_ema"))
        from trainer_utils import train_in_process

        train_in_process(_args(family, bases[family], folders[1], "--deme_interval", "1", "--no-use_ema",
                               "--seed", "1"))
        runs[family] = ([str(f) for f in folders], call, teacher)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_the_lora_teacher_is_the_student_with_adapters_off(family, bases, deme_runs):
    """The LoRA teacher (DeMe's consistency loss here; Diff-Tuning's kd builds the same one) holds no second copy
    and predicts the base model, on every new family."""
    _, call, teacher = deme_runs[family]
    _check_teacher_shares_the_student(family, bases[family], teacher, call)


def _denoiser(pipeline):
    from diffusers_ant.deme.projection import denoiser_component

    return getattr(pipeline, denoiser_component(pipeline))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_deme_interval_loras_merge_as_one_lora_equal_to_the_dense_merge(family, bases, deme_runs, tmp_path):
    """merge_deme's LoRA merge of the two interval fine-tunes: one LoRA of rank 4 + 4 (no dense copy) that the
    family pipeline's own `load_lora_weights` loads, whose folded weights equal the dense task-arithmetic merge
    up to float32 rounding (the family pipelines sample a LoRA: the modules above, and the ensemble below)."""
    from diffusers_ant.deme.finetunes import dense_denoiser, read_finetunes
    from diffusers_ant.deme.merge import merge_task_vectors
    from diffusers_ant.deme.merging import load_merge_inputs, merge_finetunes
    from diffusers_ant.models import load_pipeline

    folders, _, _ = deme_runs[family]
    weights = [0.6, 0.4]
    out = tmp_path / "merged"
    record = merge_finetunes(str(bases[family]), folders, str(out), weights=weights, log=lambda *_: None)
    assert record["merged_as"] == "lora" and record["lora_rank"] == 8
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "model_index.json").exists()
    pipeline = load_pipeline(str(out))
    merged = dense_denoiser(_denoiser(pipeline)).state_dict()
    inputs = load_merge_inputs(str(bases[family]), read_finetunes(folders))
    dense = merge_task_vectors(inputs.base_state, inputs.states, weights)
    assert merged.keys() == dense.keys()
    # the LoRA merge folds W + [w_i s_i B_i] [A_i] (one product of rank R = 8, then the sum), the dense one
    # (1 - sum w) W + sum_i w_i (W + s_i B_i A_i): task arithmetic whose terms each pass through the rank-R product
    # and its addition too, R + 4 roundings (tests/tolerances.py's task_arithmetic_tolerance; the LoRA products'
    # summed |terms| taken as |theta_i - W|, no cancellation by orders of magnitude, as tests/tolerances.py
    # assumes): 5e-6 at most
    # (observed 6e-8); swapping the two weights moves the merged weights by 9e-3, 1,700x that
    moved = 0.0
    for key, value in dense.items():
        finetuned = [state[key].float() for state in inputs.states]
        base = inputs.base_state[key].float()
        tolerance = task_arithmetic_tolerance(base, finetuned, weights, term_roundings=record["lora_rank"] + 4)
        assert (merged[key].float() - value.float()).abs().max().item() <= tolerance, key
        moved = max(moved, (value.float() - base).abs().max().item())
    assert moved > 1e-4  # the merge moved the weights: not base against base
    # the family pipeline's own loader reads the merged LoRA (projections are this project's addition)
    plain = type(pipeline).from_pretrained(str(bases[family]))
    plain.load_lora_weights(str(out))
    folded = dense_denoiser(_denoiser(plain)).state_dict()
    assert all(torch.equal(folded[k], merged[k]) for k in folded if "channel_projection" not in k)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_deme_lora_ensemble_calls_each_intervals_lora_at_its_timesteps(family, bases, deme_runs, tmp_path):
    """merge_deme's --ensemble of the two interval LoRAs: one base denoiser, each call (by the family's own
    timestep convention, through its adapter's `predict`) is the fine-tune of that timestep's interval; and
    the ensemble pipeline samples."""
    from diffusers_ant.clustering import TimestepIntervals
    from diffusers_ant.deme.merging import write_ensemble_folder
    from diffusers_ant.models import load_pipeline
    from diffusers_ant.schedule import model_timesteps

    folders, (x_t, _, cond, _), _ = deme_runs[family]
    out = tmp_path / "ensemble"
    write_ensemble_folder(str(bases[family]), folders, str(out), log=lambda *_: None)
    pipeline = load_pipeline(str(out))
    ensemble = _denoiser(pipeline).eval()
    finetuned = [_denoiser(load_pipeline(folder)).eval() for folder in folders]
    adapter = _base_adapter(family, bases[family])
    with open(Path(folders[0]) / "timestep_intervals.json", encoding="utf-8") as f:
        bounds = TimestepIntervals.from_json(f.read()).bounds
    rows = x_t.shape[0]
    outputs = {}
    with torch.no_grad():
        for index in (0, 1, 0):  # switch there and back
            t = model_timesteps(adapter.noise_scheduler, torch.full((rows,), (bounds[index][0] + bounds[index][1]) // 2))
            expected = adapter.predict(finetuned[index], x_t, t, cond).float()
            got = adapter.predict(ensemble, x_t, t, cond).float()
            # bitwise: the same base weights and the same LoRA file (alpha / r included), run by the same peft
            # layers; the ensemble only chooses which adapter is active
            assert torch.equal(got, expected), index
            outputs[index] = got
    assert (outputs[0] - outputs[1]).abs().max() > 1e-5
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a handwritten digit 3", num_inference_steps=2, output_type="pt",
                     generator=torch.Generator().manual_seed(0),
                     **({} if family in ("sdxl", "sd3") else {"height": RES, "width": RES})).images
    assert image.shape == (1, 3, RES, RES) and torch.isfinite(image).all()


# --------------------------------------------------------------------------- buckets and caches, per family

from test_caching_buckets import SHAPES, _encode_row_by_row, _Recorder, nonsquare_folder  # noqa: E402,F401 - the non-square folder fixture

_BUCKET_RUNS = {}


def _bucket_runs(family, base, folder, root):
    """Three LoRA runs with --aspect_ratio_buckets on the non-square folder (batch 2, the same seed): uncached 4
    steps (checkpoint at 2); its checkpoint-2 resumed to 4 in another folder; cached latents and text, 4 steps.
    Each records its losses, latent shapes and, per step, the original (width, height) of its images."""
    import shutil

    import diffusers_ant.training.loop as loop

    if family in _BUCKET_RUNS:
        return _BUCKET_RUNS[family]
    root = root / family
    shape_of = {"wide": (32, 16), "tall": (16, 32), "square": (24, 24)}

    def run(name, *extra):
        args = _args(family, base, root / name, "--aspect_ratio_buckets", "--max_train_steps", "4",
                     "--checkpointing_steps", "2", "--num_clusters", "1", "--max_train_samples", "12", *extra)
        i = args.index("--dataset_name")
        args[i:i + 2] = ["--train_data_dir", str(folder)]
        with pytest.MonkeyPatch.context() as monkeypatch:
            recorder = _Recorder(monkeypatch)
            recorder.sizes = []
            recorded = loop.training_step

            def step(accelerator, objective, model, window, *a, **k):
                for batch in window:
                    if "original_sizes" in batch:  # sdxl: (height, width) of each image
                        recorder.sizes.append([(int(w), int(h)) for h, w in batch["original_sizes"].tolist()])
                    elif "captions" in batch:  # (a cached run's batches hold the cached text instead)
                        recorder.sizes.append([shape_of[c.split()[1]] for c in batch["captions"]])
                return recorded(accelerator, objective, model, window, *a, **k)

            monkeypatch.setattr(loop, "training_step", step)
            from trainer_utils import train_in_process

            train_in_process(args)
        return recorder

    with pytest.MonkeyPatch.context() as monkeypatch:
        batch_sizes = _encode_row_by_row(monkeypatch, family)
        runs = {"root": root, "straight": run("straight")}
        runs["straight"].encoded_batch_sizes = list(batch_sizes)
        shutil.copytree(root / "straight" / "checkpoint-2", root / "resumed" / "checkpoint-2")
        runs["resumed"] = run("resumed", "--resume_from_checkpoint", "checkpoint-2")
        before = len(batch_sizes)
        runs["cached"] = run("cached", "--cache_latents", "--cache_text_embeddings", "--checkpointing_steps", "100")
        runs["cached"].encoded_batch_sizes = batch_sizes[before:]
    _BUCKET_RUNS[family] = runs
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_buckets_hold_each_image_in_its_bucket_resume_exactly_and_cached_runs_have_the_same_losses(
        family, bases, nonsquare_folder, tmp_path_factory):
    from diffusers_ant.data.buckets import bucket_sizes, nearest_bucket
    from trainer_utils import assert_same_tensors, load_safetensors_dir

    runs = _bucket_runs(family, bases[family], nonsquare_folder, tmp_path_factory.mktemp("buckets"))
    straight, resumed, cached = runs["straight"], runs["resumed"], runs["cached"]
    buckets = bucket_sizes(RES, cached.adapter.pixel_multiple)
    # every image of every step in the bucket nearest its aspect ratio; one bucket per batch
    assert len(straight.sizes) == 4 and len(straight.shapes) == 4
    for sizes, shape in zip(straight.sizes, straight.shapes):
        wanted = {buckets[nearest_bucket(w, h, buckets)] for w, h in sizes}
        assert len(wanted) == 1, sizes
        width, height = wanted.pop()
        scale = height / shape[-2]
        assert shape[0] == 2 and (width / shape[-1], height / shape[-2]) == (scale, scale), (shape, width, height)
    assert len(set(straight.shapes)) > 1  # several buckets trained, not only the square
    # 4 == 2 + resume + 2, mid-epoch: the same losses, shapes and LoRA
    assert resumed.losses == straight.losses[2:] and resumed.shapes == straight.shapes[2:]
    assert_same_tensors(load_safetensors_dir(runs["root"] / "straight" / "checkpoint-4"),
                        load_safetensors_dir(runs["root"] / "resumed" / "checkpoint-4"))
    assert_same_tensors(load_file(runs["root"] / "straight" / "pytorch_lora_weights.safetensors"),
                        load_file(runs["root"] / "resumed" / "pytorch_lora_weights.safetensors"))
    # cached latents and text embeddings: the same draws, the losses of the uncached run
    assert len(cached.losses) == 4 and min(cached.losses) > 0 and cached.shapes == straight.shapes
    # in both runs batches of two reached the encoders, which took them row by row
    assert max(straight.encoded_batch_sizes) == 2 and max(cached.encoded_batch_sizes) == 2
    assert cached.losses == straight.losses  # (bit for bit: both runs' encoders see one row at a time)
    assert getattr(cached, "freed", None) is not None and getattr(straight, "freed", None) is None
