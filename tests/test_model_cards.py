"""Every model card's `How to use` code runs as written (issue 9, item 4).

For each model type (unet unconditional and class-conditional, pixel DiT, latent DiT, sd, controlnet),
with and without LoRA, an output folder is made the way training makes it (the adapter's `save`, then
`write_model_card`), the python block is taken from its README.md, the Hub repo id is replaced by the
local folder, and the code runs in its own Python process, offline, with plain diffusers (nothing of
diffusers_ant is imported by the snippet; `checks_for` asserts it). The process is forked from one that
has imported torch, diffusers, transformers and peft and nothing else (`snippet_runner`). Only the number
of sampling steps is lowered, for the CPU.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys

import pytest
import torch

from diffusers_ant.hub import write_model_card
from diffusers_ant.models import get_model_adapter
from trainer_utils import failure_output

RES = 16
PROMPT = "a red fox"
# (model type, preset, load options)
CASES = {
    "unet": ("unet", "tiny", {"num_channels": 1}),
    "unet-class": ("unet", "tiny", {"num_channels": 1, "num_classes": 3}),
    "dit": ("dit", "tiny", {"num_channels": 1, "num_classes": 3}),
    "dit-unconditional": ("dit", "tiny", {"num_channels": 1}),
    "dit-latent": ("dit", "tiny-latent", {"num_channels": 3, "num_classes": 3}),
    "sd": ("sd", "tiny", {}),
    "controlnet": ("controlnet", "tiny", {}),
}
DENOISER = {"unet": "unet", "dit": "transformer", "sd": "unet", "controlnet": "controlnet"}


def python_block(card_text: str) -> str:
    section = card_text.split("## How to use", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def summary(model_type, lora):
    return {"model_type": model_type, "mtl_method": "uw", "num_clusters": 2, "intervals": [[0, 499], [500, 999]],
            "loss_weighting": "min_snr", "snr_gamma": 5.0, "max_train_steps": 1, "lora_rank": 4 if lora else None,
            "resolution": RES, "validation_prompt": PROMPT}


def make_output(case, out, lora):
    model_type, preset, options = CASES[case]
    torch.manual_seed(0)
    adapter = get_model_adapter(model_type).load(model_config_name_or_path=preset, resolution=RES, **options)
    if lora:
        adapter.add_lora(rank=4, alpha=8)
        with torch.no_grad():  # non-zero adapter weights, so that loading them is visible
            for name, param in adapter.model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.1)
    adapter.save(str(out), lora=lora)
    return adapter


# The snippets' own imports (torch, diffusers, transformers, peft) take about 7 of the 10 seconds a
# fresh Python process spends on one. `snippet_runner` pays them once: a server process imports the
# libraries and nothing else (never diffusers_ant: `checks_for` asserts it stays unimported), then runs
# each snippet in a child forked from that state, so every snippet still starts from a clean interpreter
# with the same modules a fresh process would load, and one snippet cannot leave state for the next.
_SNIPPET_SERVER = r"""
import json, os, runpy, sys, traceback
import torch, diffusers, transformers, peft  # noqa: F401  (imported once, before the forks)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the child runs one snippet, its output to files, and never returns to the loop
        code = 1
        try:
            os.chdir(job["cwd"])
            out, err = open(job["stdout"], "w"), open(job["stderr"], "w")
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.argv, sys.path[0] = [job["script"]], os.path.dirname(job["script"])
            runpy.run_path(job["script"], run_name="__main__")
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


class SnippetRunner:
    """Runs scripts, one at a time, each in a child forked from `_SNIPPET_SERVER`."""

    def __init__(self, cwd):
        self.cwd, self.server = cwd, None

    def _start(self):
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   OMP_NUM_THREADS="1", PYTHONPATH="")
        # its own process group: `close` then also stops a snippet's child that is still running
        self.server = subprocess.Popen([sys.executable, "-c", _SNIPPET_SERVER], cwd=self.cwd, env=env, text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)

    def run(self, script, timeout=300):
        if self.server is None or self.server.poll() is not None:  # first use, or closed after a timeout
            self._start()
        stdout, stderr = script.with_suffix(".out"), script.with_suffix(".err")
        job = {"script": str(script), "cwd": str(script.parent), "stdout": str(stdout), "stderr": str(stderr)}
        self.server.stdin.write(json.dumps(job) + "\n")
        self.server.stdin.flush()
        ready, _, _ = select.select([self.server.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise TimeoutError(f"{script} ran for more than {timeout} s")
        line = self.server.stdout.readline()
        if not line:
            raise RuntimeError("the snippet server exited (its error is in the test's captured stderr)")
        return subprocess.CompletedProcess(str(script), int(line), stdout.read_text(), stderr.read_text())

    def close(self):
        if self.server is None:
            return
        try:
            os.killpg(self.server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.server.wait()


@pytest.fixture(scope="module")
def snippet_runner(tmp_path_factory):
    runner = SnippetRunner(tmp_path_factory.mktemp("snippet-server"))
    yield runner
    runner.close()


def run_snippet(runner, code, cwd, checks=""):
    script = cwd / "snippet.py"
    script.write_text(code + "\n" + checks)
    return runner.run(script)


def snippet_for(out, repo_id, model_type, lora, base_model=None):
    path = write_model_card(out, repo_id=repo_id, base_model=base_model, model_type=model_type,
                            method_summary=summary(model_type, lora))
    code = python_block(path.read_text())
    assert json.dumps(repo_id) in code, code
    assert "diffusers_ant" not in code and str(out.parent) not in code, code
    if model_type in ("sd", "controlnet"):
        assert json.dumps(PROMPT) in code  # the validation prompt, not a stock one
    code = code.replace(json.dumps(repo_id), json.dumps(str(out)))  # offline: the local folder for the repo id
    return re.sub(r"num_inference_steps=\d+", "num_inference_steps=2", code)


def checks_for(model_type, lora, cond_embedding=False):
    """Lines run after the snippet: it sampled, and a LoRA snippet really put the adapter in place."""
    lines = ["result = images if 'images' in globals() else [image]",
             "assert len(result) >= 1 and result[0].size == (%d, %d), result[0].size" % (RES, RES)]
    if lora:
        component = DENOISER[model_type]
        lines += ["from peft.tuners.tuners_utils import BaseTunerLayer",
                  f"assert any(isinstance(m, BaseTunerLayer) for m in pipe.{component}.modules()), 'no LoRA layers'"]
    if cond_embedding:
        lines += ["import torch",
                  "from safetensors.torch import load_file as _load",
                  "_saved = _load(os.path.join(folder, 'controlnet_cond_embedding.safetensors'))",
                  "_now = pipe.controlnet.controlnet_cond_embedding.state_dict()",
                  "assert all(torch.equal(_now[k], v) for k, v in _saved.items()), 'embedding not loaded'"]
    # plain diffusers: the snippet must not have needed this project (it is installed here, so look)
    lines += ["import sys",
              "assert not [m for m in sys.modules if m.split('.')[0] == 'diffusers_ant'], 'imported diffusers_ant'"]
    lines.append("print('SNIPPET_OK')")
    return "\n".join(lines)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("case", list(CASES))
def test_card_snippet_runs_as_written(case, lora, tmp_path, snippet_runner):
    model_type = CASES[case][0]
    out = tmp_path / "out"
    adapter = make_output(case, out, lora)
    repo_id = f"me/ant-{case}"
    code = snippet_for(out, repo_id, model_type, lora)
    if case in ("unet-class", "dit"):
        assert "trust_remote_code=True" in code  # this project's pipeline file, run by plain diffusers
    if case == "dit-latent":
        assert "DiTPipeline.from_pretrained" in code and "guidance_scale=1.0" in code
    if lora:
        assert "base_model" in code  # trained from a preset: the base travels in the folder
    cond_embedding = lora and model_type == "controlnet" and adapter.trains_cond_embedding
    result = run_snippet(snippet_runner, code, tmp_path, checks_for(model_type, lora, cond_embedding))
    assert result.returncode == 0 and "SNIPPET_OK" in result.stdout, f"{code}\n---\n{failure_output(result.stderr)}"


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["sd", "controlnet"])
def test_card_snippet_with_a_local_base_beside_the_folder(model_type, tmp_path, snippet_runner):
    """A run on a local pretrained pipeline names it relative to the output folder, and the snippet finds it."""
    torch.manual_seed(0)
    get_model_adapter("sd").load(model_config_name_or_path="tiny", resolution=RES).save(str(tmp_path / "sd-base"))
    adapter = get_model_adapter(model_type).load(pretrained_model_name_or_path=str(tmp_path / "sd-base"))
    lora = model_type == "sd"
    if lora:
        adapter.add_lora(rank=2)
    out = tmp_path / "out"
    adapter.save(str(out), lora=lora)
    code = snippet_for(out, "me/ant-local-base", model_type, lora, base_model=str(tmp_path / "sd-base"))
    assert '"../sd-base"' in code
    result = run_snippet(snippet_runner, code, tmp_path, checks_for(model_type, lora))
    assert result.returncode == 0 and "SNIPPET_OK" in result.stdout, f"{code}\n---\n{failure_output(result.stderr)}"


def test_dit_card_samples_what_the_model_was_trained_on(tmp_path):
    """Unconditional DiTs sample their null class; class-conditional ones their classes (no files run)."""
    for case, expected in (("dit-unconditional", "pipe(batch_size=4"), ("dit", "class_labels=[0, 1, 2, 0]"),
                           ("unet-class", "class_labels=[0, 1, 2, 0]"), ("unet", "pipe(batch_size=4")):
        out = tmp_path / case
        make_output(case, out, lora=False)
        code = python_block(write_model_card(out, model_type=CASES[case][0], method_summary=summary("x", False)).read_text())
        assert expected in code, code


@pytest.mark.slow
def test_one_channel_controlnet_trains_samples_and_its_card_snippet_runs(tmp_path, snippet_runner):
    """A ControlNet with `conditioning_channels=1` (a greyscale condition): the data loader reads the
    conditions as L, validation samples through diffusers' pipeline (which converts a PIL condition to
    RGB, so the adapter passes a 1-channel tensor), and the card's snippet builds a 1-channel condition."""
    from diffusers import ControlNetModel

    from trainer_utils import TINY_RUN, train_in_process

    torch.manual_seed(0)
    get_model_adapter("sd").load(model_config_name_or_path="tiny", resolution=RES).save(str(tmp_path / "sd-base"))
    preset = get_model_adapter("controlnet").load(model_config_name_or_path="tiny", resolution=RES).model.config
    base_unet = get_model_adapter("sd").load(pretrained_model_name_or_path=str(tmp_path / "sd-base")).model
    ControlNetModel.from_unet(base_unet, conditioning_channels=1,
                              conditioning_embedding_out_channels=preset.conditioning_embedding_out_channels
                              ).save_pretrained(tmp_path / "cn-grey")
    out = tmp_path / "out"
    run = [a for a in TINY_RUN if a != "tiny"]
    run.remove("--model_config_name_or_path")
    train_in_process(["--model_type", "controlnet", "--dataset_name", "mnist5k_captions", "--output_dir", str(out),
                      "--pretrained_model_name_or_path", str(tmp_path / "sd-base"),
                      "--controlnet_model_name_or_path", str(tmp_path / "cn-grey"), "--max_train_steps", "1",
                      "--validation_prompt", PROMPT, *run])
    assert json.loads((out / "config.json").read_text())["conditioning_channels"] == 1
    assert (out / "samples" / "step-1.png").is_file()  # validation sampled through the pipeline
    code = python_block((out / "README.md").read_text())
    assert "torch.zeros(1, 1," in code, code
    code = re.sub(r"num_inference_steps=\d+", "num_inference_steps=2", code)
    result = run_snippet(snippet_runner, code, tmp_path, checks_for("controlnet", lora=False))
    assert result.returncode == 0 and "SNIPPET_OK" in result.stdout, f"{code}\n---\n{failure_output(result.stderr)}"


def test_a_batch_of_one_channel_conditions_keeps_its_images_apart():
    """Conditions given as one (N, 1, H, W) tensor are split into (1, H, W) images: each must come back as
    (1, 1, H, W), not be joined into one image of N channels."""
    from diffusers_ant.models.controlnet import pil_to_condition

    batch = torch.rand(4, 1, 8, 8)
    parts = [pil_to_condition(image, 1) for image in list(batch)]
    assert all(p.shape == (1, 1, 8, 8) for p in parts) and torch.equal(torch.cat(parts), batch)


def test_a_lora_on_a_given_controlnet_names_it_in_its_card(tmp_path):
    """A ControlNet LoRA on --controlnet_model_name_or_path: base_model/ holds a copy of that ControlNet before
    training, and the card called it 'the untrained ControlNet ... not published elsewhere', never naming it."""
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    sd = get_model_adapter("sd").load(model_config_name_or_path="tiny", resolution=RES)
    sd.save(str(tmp_path / "sd"))
    ControlNetModel.from_unet(sd.model, conditioning_embedding_out_channels=(16, 32)).save_pretrained(tmp_path / "my-cn")
    adapter = get_model_adapter("controlnet").load(pretrained_model_name_or_path=str(tmp_path / "sd"),
                                                   controlnet_model_name_or_path=str(tmp_path / "my-cn"))
    adapter.add_lora(rank=2)
    adapter.save(str(tmp_path / "out"), lora=True)
    assert (tmp_path / "out" / "base_model").is_dir()
    card = write_model_card(tmp_path / "out", model_type="controlnet", lora=True,
                            method_summary={**summary("controlnet", True),
                                            "controlnet_model_name_or_path": str(tmp_path / "my-cn")}).read_text()
    assert "the ControlNet before training, from `my-cn`" in card and "untrained ControlNet" not in card


def test_the_card_names_the_data_folder_and_the_batch_and_rate_of_an_update(tmp_path):
    """A --train_data_dir run's card said 'Data: not recorded', gave the per-device batch alone and the
    unscaled --learning_rate under --scale_lr. It now names the folder (its name only: no path of this
    machine), the batch of an update (4 per device x 2 accumulated x 1 process) and the rate the optimizer
    used (1e-3 x 8)."""
    import numpy as np
    from PIL import Image

    from trainer_utils import TINY_RUN, train_in_process

    data = tmp_path / "my-digits"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(data / f"{i:02d}.png")
    out = tmp_path / "out"
    train_in_process(["--model_type", "unet", "--train_data_dir", str(data), "--output_dir", str(out), *TINY_RUN,
                      "--max_train_samples", "16", "--num_validation_images", "1", "--max_train_steps", "1",
                      "--train_batch_size", "4", "--gradient_accumulation_steps", "2", "--scale_lr"])
    card = (out / "README.md").read_text()
    assert "`my-digits` (a local image folder)" in card and str(tmp_path) not in card
    rows = dict(line.strip("|").split("|")[:2] for line in card.splitlines() if line.startswith("| ") and line.count("|") == 3)
    rows = {k.strip().strip("`"): v.strip().strip("`") for k, v in rows.items()}
    assert rows["train_batch_size"] == "4" and rows["gradient_accumulation_steps"] == "2", rows
    assert rows["total_batch_size"] == "8" and rows["num_processes"] == "1" and rows["scale_lr"] == "True", rows
    assert float(rows["learning_rate"]) == pytest.approx(8e-3, rel=1e-12), rows


def test_a_card_without_task_weighting_does_not_call_the_run_ant(tmp_path):
    """`--mtl_method none` (plain diffusion training): the card was titled 'an ANT-trained diffusion model' and said
    'Training treated denoising as 2 tasks' beside 'Task weighting: none: ... one loss over all timesteps'."""
    from diffusers_ant.hub import write_model_card

    (tmp_path / "plain").mkdir()
    (tmp_path / "ant").mkdir()
    plain = write_model_card(tmp_path / "plain", model_type="unet",
                             method_summary={**summary("unet", False), "mtl_method": "none"}).read_text()
    assert "an ANT-trained" not in plain and "plain: a diffusion model trained with diffusers_ant" in plain
    assert "treated denoising as" not in plain and "one loss over all timesteps (no task weighting)" in plain
    weighted = write_model_card(tmp_path / "ant", model_type="unet", method_summary=summary("unet", False)).read_text()
    assert "ant: an ANT-trained diffusion model" in weighted and "Training treated denoising as 2 tasks" in weighted
