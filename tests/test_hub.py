"""Model cards and push to the Hub (diffusers_ant.hub), end to end against a loopback fake Hub.

The push runs the real huggingface_hub client in a subprocess whose HF_ENDPOINT points at
tests/hub_server.py on 127.0.0.1 (huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE at import,
and this test process runs with HF_HUB_OFFLINE=1), so the fake receives the client's real requests.
"""

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from diffusers_ant.hub import (
    SAMPLE_GRID_NAME,
    check_hub_token_safety,
    drop_secrets,
    push_to_hub,
    write_model_card,
)
from hub_server import FakeHub
from trainer_utils import failure_output

REPO_ROOT = Path(__file__).resolve().parents[1]
INTERVALS = [[0, 11], [12, 30], [31, 55], [56, 99]]  # inclusive bounds over T = 100, deliberately uneven


def _summary(**overrides):
    summary = {
        "mtl_method": "uw",
        "clustering": "snr",
        "num_clusters": len(INTERVALS),
        "intervals": INTERVALS,
        "loss_weighting": "min_snr",
        "snr_gamma": 5.0,
        "max_train_steps": 37,
        "lora_rank": None,
    }
    summary.update(overrides)
    return summary


def _samples(n, size=16):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)) for _ in range(n)]


def _python_block(card_text):
    """The code of the card's `How to use` section."""
    section = card_text.split("## How to use", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    """A DDPMPipeline folder in safetensors, as training writes it (a tiny 8x8 UNet2DModel)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    path = tmp_path_factory.mktemp("pipeline")
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(
        path, safe_serialization=True
    )
    return path


@pytest.fixture
def fake_hub():
    with FakeHub(max_seconds=60) as hub:
        yield hub


# ------------------------------------------------------------------------------------ model card


@pytest.mark.parametrize("model_type, licence", [("unet", "apache-2.0"), ("sd", "creativeml-openrail-m"),
                                                 ("controlnet", "creativeml-openrail-m")])
def test_the_card_carries_the_licence_diffusers_script_for_the_type_writes(model_type, licence, tmp_path):
    """diffusers' train_controlnet.py writes creativeml-openrail-m (the ControlNet is a copy of SD's encoder);
    the ControlNet card here fell back to apache-2.0."""
    data = ModelCard.load(write_model_card(tmp_path, repo_id="me/m", model_type=model_type,
                                           method_summary=_summary())).data
    assert data.license == licence


def test_card_metadata_and_body_for_a_full_model(tmp_path):
    path = write_model_card(
        tmp_path, repo_id="me/ant-mnist", model_type="unet", method_summary=_summary(),
        dataset_name="mnist5k", images=_samples(7),
    )
    card = ModelCard.load(path)
    data = card.data
    assert data.license == "apache-2.0"
    assert data.library_name == "diffusers"
    assert data.pipeline_tag == "unconditional-image-generation"
    for tag in ("diffusers", "diffusers-training", "ant", "uw", "unconditional-image-generation"):
        assert tag in data.tags
    assert "lora" not in data.tags
    assert len(data.tags) == len(set(data.tags))
    # trained from scratch on a built-in dataset: neither is a Hub reference
    assert data.base_model is None and data.datasets is None
    assert "base_model" not in data.to_dict() and "datasets" not in data.to_dict()

    body = card.text
    for index, (start, end) in enumerate(INTERVALS):  # every cluster with its bounds and size
        assert f"| {index} | {start} | {end} | {end - start + 1} |" in body
    assert "Uncertainty weighting" in body or "uncertainty weighting" in body
    assert "Min-SNR" in body and "37" in body
    # the grid: 7 samples -> 3 x 3 tiles, 16 px upscaled to 64 px, saved next to the card and linked
    assert f"![samples]({SAMPLE_GRID_NAME})" in body
    assert Image.open(tmp_path / SAMPLE_GRID_NAME).size == (3 * 64, 3 * 64)
    assert 'DDPMPipeline.from_pretrained("me/ant-mnist")' in body


def test_card_lists_the_clusters_of_a_timestep_intervals_object(tmp_path):
    from diffusers import DDPMScheduler

    from diffusers_ant import cluster_timesteps

    intervals = cluster_timesteps(DDPMScheduler(num_train_timesteps=100), 3, objective="snr")
    path = write_model_card(tmp_path, model_type="dit", method_summary=_summary(intervals=intervals, num_clusters=3))
    text = path.read_text()
    for index, (start, end) in enumerate(intervals.bounds):
        assert f"| {index} | {start} | {end} | {end - start + 1} |" in text
    assert len(re.findall(r"^\| \d+ \| \d+ \| \d+ \| \d+ \|$", text, re.M)) == len(intervals.bounds) == 3


def test_card_for_a_lora_text_to_image_model(tmp_path):
    base, dataset = "stable-diffusion-v1-5/stable-diffusion-v1-5", "lambdalabs/naruto-blip-captions"
    path = write_model_card(
        tmp_path, repo_id="me/ant-lora", base_model=base, model_type="sd",
        method_summary=_summary(mtl_method="pcgrad", lora_rank=4, validation_prompt="a red fox"),
        dataset_name=dataset, extra_tags=("my-tag",),
    )
    card = ModelCard.load(path)
    assert card.data.base_model == base
    assert card.data.datasets == [dataset]
    assert card.data.pipeline_tag == "text-to-image"
    for tag in ("diffusers-training", "ant", "pcgrad", "lora", "text-to-image", "stable-diffusion", "my-tag"):
        assert tag in card.data.tags
    assert "uw" not in card.data.tags
    code = _python_block(card.text)
    assert f'StableDiffusionPipeline.from_pretrained("{base}")' in code
    assert 'pipe.load_lora_weights("me/ant-lora")' in code
    assert '"a red fox"' in code
    assert "rank 4" in card.text
    assert not (tmp_path / SAMPLE_GRID_NAME).exists() and "![samples]" not in card.text


def test_card_lora_on_a_model_without_a_lora_loader_uses_peft(tmp_path):
    path = write_model_card(
        tmp_path, repo_id="me/dit-lora", base_model="me/dit-base", model_type="dit",
        method_summary=_summary(lora_rank=8, lora_target_modules=["to_q", "to_v"]),
    )
    card = ModelCard.load(path)
    code = _python_block(card.text)
    assert 'DiTPipeline.from_pretrained("me/dit-base")' in code
    # rank, alpha and target modules exactly as trained: peft reads the repo's adapter_config.json
    assert "inject_adapter_in_model(LoraConfig.from_pretrained(folder), pipe.transformer)" in code
    assert 'folder = repo if os.path.isdir(repo) else snapshot_download(repo)' in code
    assert 'repo = "me/dit-lora"' in code
    assert "load_lora_weights" not in code
    assert "rank 8, on `to_q`, `to_v`" in card.text


def test_controlnet_card_loads_the_controlnet_into_the_base_pipeline(tmp_path):
    path = write_model_card(
        tmp_path, repo_id="me/cn", base_model="me/sd-base", model_type="controlnet", method_summary=_summary()
    )
    card = ModelCard.load(path)
    assert "controlnet" in card.data.tags
    code = _python_block(card.text)
    assert 'ControlNetModel.from_pretrained("me/cn")' in code
    assert 'StableDiffusionControlNetPipeline.from_pretrained("me/sd-base", controlnet=controlnet)' in code


def test_local_base_model_and_dataset_stay_out_of_the_metadata(tmp_path):
    base = tmp_path / "my-pretrained"
    base.mkdir()
    data_dir = tmp_path / "my-images"
    data_dir.mkdir()
    out = tmp_path / "out"
    path = write_model_card(
        out, base_model=str(base), model_type="sd", method_summary=_summary(mtl_method="none", lora_rank=4),
        dataset_name=str(data_dir),
    )
    card = ModelCard.load(path)
    # The Hub rejects a local path as base_model; the card names the folder, never its full path.
    assert card.data.base_model is None and card.data.datasets is None
    assert "`my-pretrained`" in card.text and str(base) not in card.text
    assert 'from_pretrained("path/to/my-pretrained")' in _python_block(card.text)
    assert str(data_dir) not in card.text
    assert "ant" in card.data.tags and "none" not in card.data.tags


def test_card_snippet_loads_and_samples_the_saved_pipeline(tiny_pipeline_dir, tmp_path):
    """The `How to use` code, run as written, loads the output folder and samples from it."""
    out = tmp_path / "out"
    out.mkdir()
    for item in tiny_pipeline_dir.iterdir():
        (out / item.name).symlink_to(item, target_is_directory=item.is_dir())
    path = write_model_card(out, model_type="unet", method_summary=_summary(), images=_samples(4, size=8))
    code = _python_block(ModelCard.load(path).text)
    # no repo id: the snippet names the folder, never this machine's absolute path
    assert str(out) not in code and str(tmp_path) not in code and 'DDPMPipeline.from_pretrained("out")' in code
    assert "num_inference_steps=50" in code
    code = code.replace('"out"', json.dumps(str(out)))  # where the folder is here
    code = code.replace("num_inference_steps=50", "num_inference_steps=2")  # the same call, CPU-cheap
    namespace = {}
    torch.manual_seed(0)
    exec(code, namespace)
    images = namespace["images"]
    assert len(images) == 4 and images[0].size == (8, 8)


def test_secrets_never_reach_the_card(tmp_path):
    token = "hf_" + secrets.token_hex(12)
    summary = _summary(hub_token=token, report_to="tensorboard", note=f"token {token}", nested={"api_key": "x"})
    path = write_model_card(tmp_path, model_type="unet", method_summary=summary)
    text = path.read_text()
    assert token not in text and "hub_token" not in text and "api_key" not in text
    assert "`report_to` | `tensorboard`" in text  # ordinary settings are kept
    config = {"hub_token": token, "tokenizer_name": "t", "b": {"password": "p", "wandb_api_key": "k", "c": 2}}
    assert drop_secrets(config) == {"tokenizer_name": "t", "b": {"c": 2}}


def test_unknown_model_type_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown model_type 'vae'.*'controlnet', 'dit', .*'sd', .*'unet'"):
        write_model_card(tmp_path, model_type="vae", method_summary=_summary())


# ------------------------------------------------------------------------------------- the token


@pytest.mark.parametrize("report_to", ["wandb", "all", "tensorboard,wandb", ["tensorboard", "wandb"], "comet_ml"])
def test_hub_token_refused_with_trackers_that_record_the_command_line(report_to):
    with pytest.raises(ValueError, match="hf auth login"):
        check_hub_token_safety(report_to, "hf_testtoken123456")


@pytest.mark.parametrize("report_to,token", [("tensorboard", "hf_testtoken123456"), ("wandb", None), (None, "hf_x")])
def test_hub_token_allowed_otherwise(report_to, token):
    check_hub_token_safety(report_to, token)


# ------------------------------------------------------------------------------------------ push


_PUSH_DRIVER = """
import os, sys
from diffusers_ant.hub import push_to_hub
token = os.environ.pop("ANT_TEST_TOKEN")  # kept off the command line, where `ps` would show it
for private in (None, True):  # twice: the second create_repo meets an existing repo (409, exist_ok)
    print(push_to_hub(sys.argv[1], sys.argv[2], token=token, private=private))
"""


_CREATE_DRIVER = """
import os, sys
from diffusers_ant.hub import create_hub_repo
try:
    print(create_hub_repo(sys.argv[1], ".", token=os.environ.pop("ANT_TEST_TOKEN")))
except ValueError as error:
    print(error, file=sys.stderr)
    sys.exit(1)
"""


@pytest.mark.parametrize("role", ["write", "read"])
def test_a_read_only_token_is_refused_before_training(role, fake_hub, tmp_path):
    """create_repo(exist_ok=True) accepts an existing repo whatever the token may do, so a read-only token
    passed the start-up check and the upload failed after training. The token's role (the Hub's whoami) is
    now checked with the repo, and a read-only one is one line naming the fix."""
    fake_hub.state.token_role = role
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=fake_hub.endpoint, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf_home"),
               HF_HUB_DISABLE_TELEMETRY="1", ANT_TEST_TOKEN="hf_" + "x" * 30,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", _CREATE_DRIVER, "me/ant-run"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    if role == "write":
        assert result.returncode == 0 and result.stdout.split() == ["me/ant-run"], result.stderr[-2000:]
    else:
        assert result.returncode == 1 and result.stderr.strip().startswith("--push_to_hub: the Hub token is read-only")
        assert len(result.stderr.strip().splitlines()) == 1 and "hf_xxx" not in result.stderr
    assert ("GET", "/api/whoami-v2") in [(r.method, r.path.split("?")[0]) for r in fake_hub.state.requests]


def _tree_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_push_uploads_the_folder_without_checkpoints_and_never_leaks_the_token(
    fake_hub, tiny_pipeline_dir, tmp_path
):
    token = "hf_testtoken" + secrets.token_hex(16)
    out = tmp_path / "out"
    out.mkdir()
    for item in tiny_pipeline_dir.iterdir():  # real copies: the upload reads them
        if item.is_dir():
            (out / item.name).mkdir()
            for f in item.iterdir():
                (out / item.name / f.name).write_bytes(f.read_bytes())
        else:
            (out / item.name).write_bytes(item.read_bytes())
    (out / "ant_config.json").write_text(json.dumps({"mtl_method": "uw", "intervals": INTERVALS}))
    write_model_card(out, repo_id="me/ant-push", model_type="unet", method_summary=_summary(), images=_samples(4))
    for checkpoint in ("checkpoint-10", "checkpoint-20.tmp"):  # a finished and a half-written checkpoint
        (out / checkpoint).mkdir()
        (out / checkpoint / "model.safetensors").write_bytes(b"weights")
        (out / checkpoint / "random_states_0.pkl").write_bytes(b"rng")
    # the text encoder --cache_text_embeddings set aside, left by a run that crashed
    (out / ".freed_encoders" / "text_encoder_2").mkdir(parents=True)
    (out / ".freed_encoders" / "text_encoder_2" / "model.safetensors").write_bytes(b"t5 weights")
    # and the cached embeddings such a run left (each process its own store)
    (out / ".training_cache_1").mkdir()
    (out / ".training_cache_1" / "shard-00000.safetensors").write_bytes(b"cached embeddings")
    hf_home = tmp_path / "hf_home"

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=fake_hub.endpoint,
        HF_HUB_OFFLINE="0",
        HF_HOME=str(hf_home),  # no stored login: the token can only come from the argument
        HF_HUB_DISABLE_TELEMETRY="1",
        ANT_TEST_TOKEN=token,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    )
    result = subprocess.run(
        [sys.executable, "-c", _PUSH_DRIVER, str(out), "me/ant-push"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, failure_output(result.stderr)
    assert result.stdout.split() == [f"{fake_hub.endpoint}/me/ant-push"] * 2

    state = fake_hub.state
    routes = [(r.method, r.path.split("?")[0]) for r in state.requests]
    assert routes.count(("POST", "/api/repos/create")) == 2
    assert routes.count(("POST", "/api/models/me/ant-push/preupload/main")) == 2
    assert routes.count(("POST", "/api/models/me/ant-push/commit/main")) == 2
    unrouted = [r for r in routes if r[1] not in ("/api/repos/create", "/api/validate-yaml")
                and not r[1].startswith(("/api/models/me/ant-push/preupload/", "/api/models/me/ant-push/commit/"))]
    assert unrouted == []
    create_bodies = [json.loads(r.body) for r in state.requests if r.path == "/api/repos/create"]
    assert create_bodies[0]["name"] == "ant-push" and create_bodies[0]["organization"] == "me"
    assert "visibility" not in create_bodies[0] and create_bodies[1]["visibility"] == "private"
    assert state.commits[0]["header"]["summary"] == "End of training"

    # The Hub received exactly the output folder, minus the checkpoints, the set-aside encoders and the cache.
    expected = {p: b for p, b in _tree_files(out).items()
                if not p.startswith(("checkpoint-", ".freed_encoders/", ".training_cache_"))}
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "unet/config.json",
            "scheduler/scheduler_config.json", "README.md", SAMPLE_GRID_NAME, "ant_config.json"} <= set(expected)
    assert state.files["me/ant-push"] == expected
    assert not any(p.startswith("checkpoint-") for commit in state.commits for p in commit["paths"])
    uploaded_card = ModelCard(state.files["me/ant-push"]["README.md"].decode())
    assert "diffusers-training" in uploaded_card.data.tags

    # The token travels in the Authorization header of every request, and nowhere else.
    for request in state.requests:
        assert request.headers.get("authorization") == f"Bearer {token}"
        assert token not in request.path
        assert token.encode() not in request.body
        assert all(token not in v for k, v in request.headers.items() if k != "authorization")
    for content in state.files["me/ant-push"].values():
        assert token.encode() not in content
    for root in (out, hf_home):
        for name, content in _tree_files(root).items() if root.exists() else ():
            assert token.encode() not in content, name
    assert token not in result.stdout and token not in result.stderr


def test_push_refuses_offline_mode_and_a_missing_folder(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        push_to_hub(tmp_path, "me/x", token="hf_testtoken123456")
    with pytest.raises(ValueError, match="not a folder"):
        push_to_hub(tmp_path / "missing", "me/x")


def test_push_refuses_a_folder_that_contains_the_token(tmp_path, monkeypatch):
    """A tracker log with the token (a config logged without drop_secrets) must never be uploaded."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # nothing here may reach a network
    token = "hf_testtoken" + secrets.token_hex(16)
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "events.out.tfevents").write_bytes(b"\x00hparams hub_token=" + token.encode())
    with pytest.raises(ValueError, match=r"logs/events.out.tfevents contains the Hub token"):
        push_to_hub(tmp_path, "me/x", token=token)
    # inside an ignored checkpoint folder it is never sent, so it does not block the push
    (tmp_path / "logs" / "events.out.tfevents").unlink()
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "args.json").write_text(json.dumps({"hub_token": token}))
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):  # got past the scan, stopped by offline mode
        push_to_hub(tmp_path, "me/x", token=token)


def test_portable_paths_and_config(tmp_path, monkeypatch):
    from diffusers_ant.hub import portable_config, portable_path

    out = tmp_path / "runs" / "out"
    base = tmp_path / "models" / "sd"
    base.mkdir(parents=True)
    (out / "base_model").mkdir(parents=True)
    assert portable_path(str(base), out) == "../../models/sd"
    assert portable_path(str(out / "base_model"), out) == "base_model"
    assert portable_path(str(out), out) == "."
    assert portable_path("me/sd-base", out) == "me/sd-base"  # a Hub id
    assert portable_path("/only/the/root/in/common", out) == "common"  # the relative path would spell it out
    monkeypatch.chdir(tmp_path)
    assert portable_path("models/sd", out) == "../../models/sd"  # relative to the cwd -> to the output folder
    config = {"output_dir": str(out), "pretrained_model_name_or_path": str(base), "dataset_name": "mnist5k",
              "model_config_name_or_path": "tiny", "logging_dir": "logs", "validation_prompt": "/imagine a cat",
              "note": str(base), "validation_image": [str(base)], "learning_rate": 1e-4, "resume_from_checkpoint": "latest"}
    assert portable_config(config, out) == {
        "output_dir": ".", "pretrained_model_name_or_path": "../../models/sd", "dataset_name": "mnist5k",
        "model_config_name_or_path": "tiny", "logging_dir": "logs", "validation_prompt": "/imagine a cat",
        "note": "../../models/sd", "validation_image": ["../../models/sd"], "learning_rate": 1e-4,
        "resume_from_checkpoint": "latest"}
