"""model_cards/diff_tuning_template.md renders through huggingface_hub's ModelCard.from_template (the
mechanism diffusers_ant.hub uses), with every optional section and with none."""

import os

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_cards", "diff_tuning_template.md")

COMMON = dict(
    title="animals-difftuned: a Diff-Tuning fine-tuned diffusion model",
    summary="A 🧨 diffusers model fine-tuned with Diff-Tuning.",
    model_line="a UNet2DModel denoiser, fine-tuned from `mnist-pretrained`",
    dataset_line="`animal_mnist` (built into diffusers_ant, offline)",
    reconsolidation_exponent=1,
    retention_exponent=1,
    bank_weight=0.1,
    bank_fraction=0.2,
    loss_weighting_line="none (plain MSE)",
    steps_line="2000",
    usage_snippet="from diffusers import DDPMPipeline",
)


def render(**values):
    card = ModelCard.from_template(ModelCardData(license="apache-2.0"), template_path=TEMPLATE, **{**COMMON, **values})
    return str(card)


def test_full_card():
    text = render(
        retention="bank",
        retention_line="knowledge bank of 1000 samples of `mnist-pretrained` (50 DDPMScheduler steps, seed 0)",
        finetune_mode="difffit",
        finetune_line="DiffFit (Xie et al., 2023): 8,385 of 177,377 parameters trained (4.73%)",
        difffit_merged=True,
        method_line="UW, uncertainty weighting (Kendall et al., 2018)",
        tasks=[{"name": "reconsolidation", "samples": "downstream", "timesteps": "xi(t) ∝ (t + 1)^1"},
               {"name": "retention", "samples": "knowledge bank", "timesteps": "psi(t) ∝ (T - t)^1"}],
        bank_rows=[("num_images", 1000), ("scheduler", "DDPMScheduler")],
        convergence_step=1200, convergence_extractor="outline", convergence_distance="mse",
        convergence_threshold=0.02, convergence_every=100,
        benchmark_rows=[{"metric": "domain FID", "baseline": "40.1", "diff_tuning": "31.0", "change": "-22.7%"}],
        benchmark_caption="Animal-MNIST, 3 seeds.",
        config_rows=[("bank_weight", "0.1")],
        grid_file="samples.png",
    )
    assert "{{" not in text and "{%" not in text
    for expected in (
        "license: apache-2.0",
        "**Parameters trained**: DiffFit (Xie et al., 2023): 8,385 of 177,377",
        "at timesteps drawn with probability proportional to (T - t)^1",
        "mean over downstream samples + 0.1 × mean over knowledge-bank samples; a fraction 0.2 of every batch comes from",
        "**DiffFit scales**: merged",
        "| retention | knowledge bank | psi(t) ∝ (T - t)^1 |",
        "whose losses the task weighting balanced",
        "| `num_images` | `1000` |",
        "at step **1200** (checked every 100 steps)",
        "| domain FID | 40.1 | 31.0 | -22.7% |",
        "![samples](samples.png)",
        "zhong2024diffusion",
        "xie2023difffit",
    ):
        assert expected in text, expected


def test_minimal_kd_card():
    text = render(retention="kd", retention_line="knowledge distillation from the frozen pretrained model",
                  finetune_mode="full", finetune_line="full fine-tuning", method_line="none: one loss",
                  convergence_step=None)
    assert "{{" not in text and "{%" not in text
    assert "× mean over retention samples" in text and "a fraction" not in text
    for absent in ("### Tasks", "### Knowledge bank", "### ControlNet sudden convergence", "### Results",
                   "## Samples", "DiffFit scales", "xie2023difffit", "benzaken2022bitfit"):
        assert absent not in text, absent


def test_a_class_conditional_unets_bank_line_says_its_rows_keep_their_labels(tmp_path):
    """A UNet2DModel has no null class: its bank rows train with the class labels they were sampled for
    (`null_condition_batch` keeps them), and the card said 'training the unconditional branch'."""
    from types import SimpleNamespace

    from diffusers_ant.diff_tuning.card import card_values

    def line(model_type, **extra):
        args = SimpleNamespace(retention="bank", bank_keep_prompts=False, model_type=model_type, bank_fraction=0.25,
                               train_batch_size=8, reconsolidation_exponent=1.0, retention_exponent=1.0,
                               bank_weight=0.1, rank=None, knowledge_bank=None, condition_extractor="outline",
                               convergence_distance="mse", convergence_threshold=0.05, convergence_steps=100, **extra)
        finetune = SimpleNamespace(mode="full", description="full fine-tuning", difffit_merged=False)
        return card_values(args, finetune, ["data", "bank"], str(tmp_path), {"num_images": 8})["retention_line"]

    assert "class labels they were sampled for" in line("unet", num_classes=10, class_column="label")
    assert "unconditional branch" in line("dit", num_classes=10, class_column="label")
    assert "unconditional branch" in line("unet", num_classes=None, class_column=None)


def test_the_bank_rows_name_the_source_folder_and_version_and_an_earlier_runs_convergence_is_left_out(tmp_path):
    """The bank's source model was shown relative to the bank folder (meaningless beside this model), its
    version row ('package_version') was never in a manifest, and a convergence.json an earlier run left in the
    output folder went into the card of a run that tracked nothing."""
    import json
    from types import SimpleNamespace

    from diffusers_ant.diff_tuning.card import card_values

    args = SimpleNamespace(retention="bank", bank_keep_prompts=False, model_type="controlnet", bank_fraction=0.25,
                           train_batch_size=8, reconsolidation_exponent=1.0, retention_exponent=1.0, bank_weight=0.1,
                           rank=None, knowledge_bank="bank", condition_extractor="outline", convergence_distance="iou",
                           convergence_threshold=0.5, convergence_steps=50, track_convergence=False)
    finetune = SimpleNamespace(mode="full", description="full fine-tuning", difffit_merged=False)
    manifest = {"source_model": "../../models/sd-base", "source_model_local": True, "num_images": 8,
                "versions": {"diffusers_ant": "0.9.0", "diffusers": "0.35.0"}}
    (tmp_path / "convergence.json").write_text(json.dumps({"converged_step": 150}))
    values = card_values(args, finetune, ["data", "bank"], str(tmp_path), manifest)
    assert dict(values["bank_rows"]) == {"source_model": "sd-base", "num_images": 8, "diffusers_ant": "0.9.0"}
    assert "convergence_step" not in values
    args.track_convergence = True
    assert card_values(args, finetune, ["data", "bank"], str(tmp_path), manifest)["convergence_step"] == 150


def test_a_lora_card_says_what_the_folder_holds():
    """The Diff-Tuning card said 'only the adapter weights are in this repository' for every LoRA, where a
    ControlNet LoRA's folder also holds base_model/ (and a new ControlNet's conditioning embedding): it now takes
    the LoRA and base lines the ANT card writes from the folder."""
    text = render(retention="kd", retention_line="distillation", finetune_mode="lora", finetune_line="LoRA",
                  method_line="none", convergence_step=None, lora_rank=4,
                  lora_line="rank 4, alpha 4; this repository holds the adapter weights and `base_model/`",
                  base_line="`base_model/` in this repository (built with the model, not published elsewhere)")
    assert "**LoRA**: rank 4, alpha 4; this repository holds the adapter weights and `base_model/`." in text
    assert "**Base pipeline**: `base_model/` in this repository" in text and "only the adapter weights" not in text


def test_the_tasks_table_gives_each_cluster_its_interval_and_shares_the_rows_of_its_source(tmp_path):
    """The table printed a source's whole count on every cluster's row ("13 per micro-batch" on data/0..4 and
    "3" on bank/0..4: 80 rows for a batch of 16) and no bounds, so the five rows of a source read the same."""
    from types import SimpleNamespace

    from diffusers_ant.clustering import TimestepIntervals
    from diffusers_ant.diff_tuning.card import card_values

    args = SimpleNamespace(retention="bank", bank_keep_prompts=False, model_type="unet", bank_fraction=0.2,
                           train_batch_size=16, reconsolidation_exponent=1.0, retention_exponent=1.0, bank_weight=0.1,
                           rank=None, knowledge_bank="bank", track_convergence=False)
    finetune = SimpleNamespace(mode="full", description="full fine-tuning", difffit_merged=False)
    intervals = TimestepIntervals([(0, 399), (400, 999)], 1000)
    names = ["data/0", "data/1", "bank/0", "bank/1"]
    tasks = card_values(args, finetune, names, str(tmp_path), {"num_images": 8}, intervals)["tasks"]
    assert [t["samples"] for t in tasks] == ["its share of the 13 data rows per micro-batch"] * 2 + \
        ["its share of the 3 bank rows per micro-batch"] * 2
    assert [t["timesteps"] for t in tasks] == ["[0, 399], drawn ∝ (t + 1)^1", "[400, 999], drawn ∝ (t + 1)^1",
                                               "[0, 399], drawn ∝ (T - t)^1", "[400, 999], drawn ∝ (T - t)^1"]
