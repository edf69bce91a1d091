"""Diff-Tuning knowledge banks for the families of issue 16 (sdxl, sd3, flux, qwenimage).

Model-type detection of all eight types (saved folders and loaded pipelines, one rule in
`diffusers_ant.models.families`); a 4-image bank sampled from a tiny SD3 base with a prompts file by
its own FlowMatchEuler pipeline, each image stored with its prompt; 2 training steps on it whose bank
rows carry those prompts and draw low noise by psi on the flow-matching sigma axis; a bank of another
family refused in one line. One bank and one training run, shared through module-scoped fixtures."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from trainer_utils import REPO, TINY_RUN, train_in_process

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_TYPES = ("unet", "dit", "sd", "controlnet", "sdxl", "sd3", "flux", "qwenimage")
PROMPTS = ["a red apple on a table", "a sailing boat at dawn", "a cat on a sofa"]  # none is an MNIST caption


@pytest.fixture(scope="module")
def tiny_pipelines(one_thread):
    """Each type's tiny preset as the diffusers pipeline it samples with (not saved)."""
    from diffusers_ant.models import get_model_adapter

    options = {"unet": {"num_channels": 1}, "dit": {"num_channels": 1}}
    return {t: get_model_adapter(t).load(model_config_name_or_path="tiny", resolution=16, **options.get(t, {}))
            .make_pipeline() for t in ALL_TYPES}


@pytest.fixture(scope="module")
def saved_folders(tiny_pipelines, tmp_path_factory):
    root = tmp_path_factory.mktemp("family-folders")
    folders = {}
    for model_type, pipeline in tiny_pipelines.items():
        folders[model_type] = root / model_type
        pipeline.save_pretrained(folders[model_type], safe_serialization=True)
    return folders


def _load_bank_script():
    spec = importlib.util.spec_from_file_location(
        "build_knowledge_bank", os.path.join(REPO, "train_scripts", "build_knowledge_bank.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sd3_bank(saved_folders, tmp_path_factory):
    """A 4-image bank of the tiny SD3 base, built by the command line from a prompts file (2 steps, batches of 2)."""
    root = tmp_path_factory.mktemp("sd3-bank")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    bank = root / "bank"
    code = _load_bank_script().main([
        "--pretrained_model_name_or_path", str(saved_folders["sd3"]), "--output_dir", str(bank), "--num_images", "4",
        "--prompts_file", str(prompts), "--num_inference_steps", "2", "--batch_size", "2", "--device", "cpu",
        "--no_progress"])
    assert code == 0
    return bank


def _train_on_bank(model_type, base, bank, out):
    """2 LoRA steps of `model_type` with retention on `bank` (its prompts kept), recording what each source
    trained on."""
    from diffusers_ant.training import step as step_module

    seen = []
    original = step_module.DiffusionObjective._prepare_source

    def recording(self, index, source, batch, generator, chunk_size):
        prepared = original(self, index, source, batch, generator, chunk_size)
        captions = list(batch.get("captions") or [])
        if not captions and "input_ids" in batch:  # sdxl tokenizes in the data loader: the prompts' rows by their ids
            ids = [tuple(row.tolist()) for row in batch["input_ids"]]
            known = dict(zip((tuple(row.tolist()) for row in self.adapter.tokenize(PROMPTS)[0]), PROMPTS))
            captions = [known.get(row, f"<not a bank prompt: {row[:4]}>") for row in ids]
        seen.append({"source": source.name, "captions": captions, "t": prepared["t"].clone(),
                     "sampler": source.sampler, "scheduler": self.scheduler})
        return prepared

    step_module.DiffusionObjective._prepare_source = recording
    try:
        run = [a for a in TINY_RUN]
        i = run.index("--model_config_name_or_path")
        del run[i:i + 2]
        train_in_process(["--model_type", model_type, "--pretrained_model_name_or_path", str(base),
                          "--dataset_name", "mnist5k_captions", "--output_dir", str(out), *run,
                          "--train_batch_size", "4", "--max_train_samples", "8", "--num_validation_images", "1",
                          "--num_inference_steps", "1", *([] if model_type == "sd3" else ["--resolution", "16"]),
                          "--rank", "4", "--knowledge_bank", str(bank), "--bank_fraction", "0.5",
                          "--bank_keep_prompts", "--max_train_steps", "2"])
    finally:
        step_module.DiffusionObjective._prepare_source = original
    return out, seen


@pytest.fixture(scope="module")
def bank_run(saved_folders, sd3_bank, tmp_path_factory):
    """2 LoRA steps of SD3 with retention on the bank (its prompts kept), recording what each source trained on."""
    return _train_on_bank("sd3", saved_folders["sd3"], sd3_bank, tmp_path_factory.mktemp("sd3-bank-run") / "out")


@pytest.fixture(scope="module")
def family_banks(saved_folders, tmp_path_factory):
    """A 2-image bank of each other family's tiny base (one sampling step, two prompts), by `build_knowledge_bank`."""
    from diffusers_ant.diff_tuning.bank import build_knowledge_bank

    root = tmp_path_factory.mktemp("family-banks")
    banks = {}
    for model_type in ("sdxl", "flux", "qwenimage"):
        banks[model_type] = root / model_type
        manifest = build_knowledge_bank(str(saved_folders[model_type]), banks[model_type], 2, prompts=PROMPTS[:2],
                                        num_inference_steps=1, batch_size=2, device="cpu", progress=False,
                                        **({} if model_type == "sdxl" else {"resolution": 16}))
        banks[model_type] = (banks[model_type], manifest)
    return banks


# ------------------------------------------------------------------------------ detection


def test_every_model_type_is_detected_from_its_folder_and_its_pipeline(tiny_pipelines, saved_folders):
    from diffusers_ant.analysis.common import infer_model_type
    from diffusers_ant.diff_tuning.bank import model_type_of_pipeline
    from diffusers_ant.models.families import model_type_of_index

    for model_type in ALL_TYPES:
        assert model_type_of_pipeline(tiny_pipelines[model_type]) == model_type
        assert infer_model_type(str(saved_folders[model_type])) == model_type  # no training config: model_index.json
    # a pipeline class outside the table (img2img variants) falls back to the components
    for model_type, variant in (("flux", "FluxImg2ImgPipeline"), ("sd3", "StableDiffusion3Img2ImgPipeline"),
                                ("qwenimage", "QwenImageImg2ImgPipeline"), ("sdxl", "StableDiffusionXLImg2ImgPipeline"),
                                ("sd", "StableDiffusionImg2ImgPipeline")):
        index = json.loads((saved_folders[model_type] / "model_index.json").read_text())
        index["_class_name"] = variant
        assert model_type_of_index(index) == model_type, variant
    with pytest.raises(ValueError, match="no model_index.json\\): pass --model_type"):
        infer_model_type(str(saved_folders["sd3"] / "transformer"))


# ------------------------------------------------------------------------------ a bank of the SD3 base


def test_sd3_bank_is_sampled_by_its_flow_matching_pipeline_with_its_prompts(sd3_bank):
    from diffusers_ant.diff_tuning.bank import load_knowledge_bank

    dataset, manifest = load_knowledge_bank(sd3_bank)
    assert manifest["model_type"] == "sd3" and manifest["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert manifest["num_inference_steps"] == 2 and manifest["batch_size"] == 2 and manifest["resolution"] == 16
    assert manifest["columns"]["caption_column"] == "text" and manifest["prompts"]["count"] == 3
    assert dataset["text"] == [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0]]  # cycled, one per image
    images = [torch.tensor(list(im.convert("RGB").getdata()), dtype=torch.float32) for im in dataset["image"]]
    assert all(im.shape == (16 * 16, 3) for im in images)
    assert not torch.equal(images[0], images[1])  # each image from its own generator


def test_training_on_the_bank_keeps_its_prompts_and_draws_low_noise_on_the_sigma_axis(bank_run):
    from diffusers_ant.diff_tuning.densities import reconsolidation_weights, retention_weights
    from diffusers_ant.schedule import _flow_sigmas, is_flow_matching

    out, seen = bank_run
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    bank = [s for s in seen if s["source"] == "bank"]
    data = [s for s in seen if s["source"] != "bank"]
    assert len(bank) == 2 and len(data) == 2  # one draw per source per step
    assert all(len(s["captions"]) == 2 and set(s["captions"]) <= set(PROMPTS) for s in bank)
    assert all(s["captions"] and not set(s["captions"]) & set(PROMPTS) for s in data)
    scheduler = bank[0]["scheduler"]
    assert is_flow_matching(scheduler)
    sigmas = _flow_sigmas(scheduler)  # index 0 cleanest: psi's mass sits on low sigma
    T = sigmas.numel()
    psi = retention_weights(T) / retention_weights(T).sum()
    xi = reconsolidation_weights(T) / reconsolidation_weights(T).sum()
    assert torch.allclose(bank[0]["sampler"].probabilities.double(), psi)
    assert torch.allclose(data[0]["sampler"].probabilities.double(), xi)
    # on the shifted table (the tiny SD3's shift is 3.0, as SD3's): psi below uniform draws, xi above them
    assert scheduler.config.shift == 3.0
    assert float((psi * sigmas).sum()) < float(sigmas.mean()) - 0.1 < float(sigmas.mean()) + 0.1 < float((xi * sigmas).sum())
    assert all(int(s["t"].max()) < T for s in bank)


def test_a_flux_bank_takes_the_datasets_captions_and_its_resolution(saved_folders, tmp_path, capsys):
    """No --prompts_file: a text-to-image base samples the dataset's captions; flux samples at --resolution."""
    from diffusers_ant.diff_tuning.bank import load_knowledge_bank
    from diffusers_ant.data import load_training_dataset

    main = _load_bank_script().main
    common = ["--pretrained_model_name_or_path", str(saved_folders["flux"]), "--num_images", "2",
              "--num_inference_steps", "2", "--batch_size", "2", "--device", "cpu", "--no_progress"]
    assert main([*common, "--output_dir", str(tmp_path / "bank"), "--dataset_name", "mnist5k_captions",
                 "--resolution", "32"]) == 0
    dataset, manifest = load_knowledge_bank(tmp_path / "bank")
    captions = load_training_dataset("mnist5k_captions")["text"]  # 2 images: spread over all the captions
    assert dataset["text"] == [captions[0], captions[len(captions) // 2]]
    assert manifest["prompts"]["source"] == "dataset mnist5k_captions, captions"
    assert manifest["model_type"] == "flux" and manifest["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert manifest["resolution"] == 32 and all(im.size == (32, 32) for im in dataset["image"])
    # without --resolution: the size the trainer takes for this base without one (512, diffusers' scripts'), so
    # that a bank and a run both left at their defaults agree (the pipeline's own 1024 was refused at training)
    from diffusers_ant.diff_tuning.bank import check_bank_compatible
    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.training.components import pixel_resolution

    assert main([*common[:3], "1", "--num_inference_steps", "1", *common[6:], "--output_dir", str(tmp_path / "b1"),
                 "--prompts_file", str(_prompts_file(tmp_path))]) == 0
    _, manifest = load_knowledge_bank(tmp_path / "b1")
    trained = get_model_adapter("flux").load(pretrained_model_name_or_path=str(saved_folders["flux"]))
    assert manifest["resolution"] == pixel_resolution(trained) == 512
    # and FluxPipeline's own distilled guidance (3.5 in diffusers), not the trainer's input value 1.0
    assert manifest["guidance_scale"] == 3.5
    check_bank_compatible(manifest, model_type="flux", resolution=pixel_resolution(trained), channels=trained.num_channels)
    capsys.readouterr()
    # an SD3 base sampled at another size than its own (SD3 at 512, diffusers' script default, from a 1024
    # checkpoint): the bank has the size of a run trained at that --resolution, from the same weights (it was
    # refused, so such a run could never use a bank)
    from diffusers_ant.diff_tuning.bank import check_bank_source

    own = get_model_adapter("sd3").load(pretrained_model_name_or_path=str(saved_folders["sd3"]))
    assert pixel_resolution(own) != 32
    assert main([*common[:1], str(saved_folders["sd3"]), *common[2:], "--output_dir", str(tmp_path / "b2"),
                 "--dataset_name", "mnist5k_captions", "--resolution", "32"]) == 0
    dataset, manifest = load_knowledge_bank(tmp_path / "b2")
    assert manifest["resolution"] == 32 and all(im.size == (32, 32) for im in dataset["image"])
    run = get_model_adapter("sd3").load(pretrained_model_name_or_path=str(saved_folders["sd3"]), resolution=32)
    check_bank_compatible(manifest, model_type="sd3", resolution=pixel_resolution(run), channels=run.num_channels)
    check_bank_source(manifest, str(saved_folders["sd3"]))
    capsys.readouterr()
    assert main([*common[:1], str(saved_folders["sd3"]), *common[2:], "--output_dir", str(tmp_path / "b3"),
                 "--resolution", "33"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must be a positive multiple of the VAE's factor" in err


@pytest.mark.parametrize("model_type", ["sdxl", "qwenimage"])
def test_sdxl_and_qwenimage_banks_sample_through_their_adapters(model_type, saved_folders, family_banks):
    from diffusers_ant.diff_tuning.bank import load_knowledge_bank

    bank, manifest = family_banks[model_type]
    dataset, _ = load_knowledge_bank(bank)
    own = json.loads((saved_folders[model_type] / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    assert manifest["model_type"] == model_type and manifest["scheduler"] == own  # the pipeline's own sampler
    assert own == {"sdxl": "DDPMScheduler", "qwenimage": "FlowMatchEulerDiscreteScheduler"}[model_type]
    assert dataset["text"] == PROMPTS[:2] and all(im.size == (16, 16) for im in dataset["image"])


@pytest.mark.parametrize("model_type", ["sdxl", "flux", "qwenimage"])
def test_diff_tuning_trains_on_each_familys_bank_with_its_prompts_and_psi(model_type, saved_folders, family_banks,
                                                                          tmp_path):
    """Diff-Tuning with a bank on sdxl, flux and qwenimage (sd3: the tests above): 2 LoRA steps whose bank
    rows carry the bank's prompts and draw their timesteps by psi, the data rows by xi; the LoRA trained."""
    from safetensors.torch import load_file

    from diffusers_ant.diff_tuning.densities import reconsolidation_weights, retention_weights
    from diffusers_ant.schedule import num_train_timesteps

    out, seen = _train_on_bank(model_type, saved_folders[model_type], family_banks[model_type][0], tmp_path / "out")
    bank = [s for s in seen if s["source"] == "bank"]
    data = [s for s in seen if s["source"] != "bank"]
    assert len(bank) == 2 and len(data) == 2  # one draw per source per step
    assert all(len(s["captions"]) == 2 and set(s["captions"]) <= set(PROMPTS[:2]) for s in bank)
    assert all(s["captions"] and not set(s["captions"]) & set(PROMPTS) for s in data)
    T = num_train_timesteps(bank[0]["scheduler"])
    psi = retention_weights(T) / retention_weights(T).sum()
    xi = reconsolidation_weights(T) / reconsolidation_weights(T).sum()
    assert torch.allclose(bank[0]["sampler"].probabilities.double(), psi)
    assert torch.allclose(data[0]["sampler"].probabilities.double(), xi)
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert max(t.abs().max().item() for k, t in lora.items() if "lora_B" in k or "lora.up" in k) > 0


def test_a_bank_of_another_family_is_refused_in_one_line(sd3_bank, saved_folders):
    from diffusers_ant.diff_tuning.bank import check_bank_compatible, check_bank_source, read_bank_manifest

    manifest = read_bank_manifest(sd3_bank)
    check_bank_compatible(manifest, "sd3", 16, 3)
    check_bank_source(manifest, str(saved_folders["sd3"]))  # the family's own base passes the fingerprint
    with pytest.raises(ValueError, match=r"sampled from a sd3 model .*, this run trains a flux model: "
                                         r"build the bank from the pretrained flux model") as err:
        check_bank_compatible(manifest, "flux", 16, 3)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="fingerprints differ") as err:
        check_bank_source(manifest, str(saved_folders["qwenimage"]))
    assert "\n" not in str(err.value)


def _prompts_file(folder):
    path = folder / "prompts.txt"
    path.write_text("a handwritten digit 3\n")
    return path


def test_an_unfinished_flux_bank_of_an_earlier_version_resumes_with_its_own_size_and_guidance(saved_folders, tmp_path):
    """Banks begun before the FLUX.1 defaults changed (1024 px, guidance recorded as None and sampled at 1.0)
    must resume as they began: left out, --resolution and --guidance_scale take the unfinished bank's values
    (the new defaults, 512 px and 3.5, made every such bank refuse to resume)."""
    import json

    from diffusers_ant.diff_tuning import build_knowledge_bank
    from diffusers_ant.diff_tuning.bank import load_knowledge_bank

    class Interrupt(Exception):
        pass

    def stop_after_one(index):
        raise Interrupt

    bank = tmp_path / "bank"
    options = dict(num_images=2, batch_size=1, num_inference_steps=1, prompts=["a digit"], device="cpu", progress=False)
    with pytest.raises(Interrupt):
        build_knowledge_bank(str(saved_folders["flux"]), str(bank), resolution=32, guidance_scale=1.0,
                             on_image_written=stop_after_one, **options)
    manifest = json.loads((bank / "bank.json").read_text())
    manifest.update(guidance_scale=None)  # as the earlier version recorded "the adapter's default"
    manifest.pop("fingerprint_excludes", None)
    (bank / "bank.json").write_text(json.dumps(manifest))
    build_knowledge_bank(str(saved_folders["flux"]), str(bank), **options)  # no --resolution, no --guidance_scale
    dataset, finished = load_knowledge_bank(bank)
    assert finished["resolution"] == 32 and finished["guidance_scale"] is None and len(dataset) == 2


def test_a_bank_fingerprinted_with_the_safety_checker_is_told_to_rebuild(saved_folders):
    """An earlier version fingerprinted the safety checker too: such a bank cannot match, whatever the weights;
    the refusal says so instead of 'sampled from other weights'."""
    from diffusers_ant.diff_tuning.bank import check_bank_source

    manifest = {"model_fingerprint": "0" * 64, "source_model": "old-bank", "torch_dtype": "float32"}
    with pytest.raises(ValueError, match="earlier version whose fingerprint included the pipeline's safety checker"):
        check_bank_source(manifest, str(saved_folders["sd3"]))
    with pytest.raises(ValueError, match="sampled from other weights"):
        check_bank_source({**manifest, "fingerprint_excludes": ["controlnet", "safety_checker"]}, str(saved_folders["sd3"]))
