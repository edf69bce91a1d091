"""`train_scripts/benchmark_families.py --quick` on one family (issue 16, "Measured"): the JSON's
structure, positive measurements, caching lowering the peak, exact per-parameter bytes in fp32, and
the markdown table with the command line. One in-process run shared by every test."""

import json
import os

import pytest
import torch

from trainer_utils import REPO
from train_scripts_loader import load_script


bench = load_script("benchmark_families")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_families")
    bench.main(["--quick", "--families", "sd3", "--output_dir", str(out)])
    with open(out / "benchmark_families.json") as f:
        report = json.load(f)
    return out, report


def test_report_structure_and_positive_numbers(quick):
    _, report = quick
    assert report["command"].endswith("--quick --families sd3 --output_dir " + str(quick[0]))
    assert report["memory_measure"] == "cpu_resident_tensors_plus_profiler_peak"
    assert list(report["families"]) == ["sd3"]
    r = report["families"]["sd3"]
    # the tiny SD3 preset: a transformer, a VAE and three text encoders (CLIP-L, CLIP-G, T5)
    assert set(r["parameters"]) == {"denoiser", "lora", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}
    assert all(v > 0 for v in r["parameters"].values())
    assert list(r["memory"]) == ["fp32"]  # --quick: fp32 only
    for kind in ("uncached", "cached"):
        m = r["memory"]["fp32"][kind]
        assert m["peak_mb"] > 0 and m["step_peak_mb"] > 0 and m["resident_mb"] > 0
        assert m["peak_mb"] == pytest.approx(m["resident_mb"] + m["step_peak_mb"])
    assert set(r["seconds_per_step"]) == {"none", "uw", "pcgrad"}
    assert all(t > 0 for t in r["seconds_per_step"].values())
    assert r["ratio_to_vanilla"]["none"] == 1.0
    assert all(x > 0 for x in r["ratio_to_vanilla"].values())
    real = r["real_checkpoint"]
    assert real["denoiser_parameters"] == bench.SD35_LARGE_TRANSFORMER_PARAMS
    assert real["weights_gb"]["fp32"]["uncached"] > real["weights_gb"]["fp32"]["cached"] > 0


def test_caching_frees_the_encoders_and_lowers_the_peak(quick):
    r = quick[1]["families"]["sd3"]["memory"]["fp32"]
    uncached, cached = r["uncached"], r["cached"]
    assert cached["peak_mb"] < uncached["peak_mb"]
    assert cached["resident_mb"] < uncached["resident_mb"]
    # --cache_text_embeddings dropped the three text encoders; --cache_latents the VAE's encoder half
    assert {"text_encoder", "text_encoder_2", "text_encoder_3"} <= set(uncached["resident_bytes"])
    assert not any(k.startswith("text_encoder") for k in cached["resident_bytes"])
    assert 0 < cached["resident_bytes"]["vae"] < uncached["resident_bytes"]["vae"]
    assert cached["cache_mb"] > 0 and uncached["cache_mb"] == 0
    # the cache's files (on disk, as the trainer keeps them) are gone once measured
    assert (quick[0] / "run").is_dir() and not list((quick[0] / "run").glob(".training_cache_*"))
    # the denoiser and its LoRA state are untouched by caching
    assert cached["resident_bytes"]["denoiser"] == uncached["resident_bytes"]["denoiser"]


def test_per_parameter_cost_is_measured_from_the_weights(quick):
    r = quick[1]["families"]["sd3"]
    bpp = r["real_checkpoint"]["bytes_per_parameter"]["fp32"]
    # fp32 weights: exactly 4 bytes per parameter of the frozen denoiser base and of the text encoders
    assert bpp["uncached"]["denoiser"] == 4.0 and bpp["uncached"]["text_encoders"] == 4.0
    assert bpp["cached"]["text_encoders"] == 0.0 and 0 < bpp["cached"]["vae"] < 4.0
    assert r["memory"]["fp32"]["uncached"]["resident_bytes"]["denoiser"] == 4 * r["parameters"]["denoiser"]


def test_markdown_table(quick):
    out, report = quick
    text = (out / "benchmark_families.md").read_text()
    assert report["command"] in text
    rows = [line for line in text.splitlines() if line.startswith("| sd3 |")]
    assert len(rows) == 2  # the memory row (fp32) and the time row
    assert "stable-diffusion-3.5-large" in rows[0]


def test_bad_family_is_one_line():
    with pytest.raises(SystemExit):
        bench.parse_args(["--families", "sd4"])


@pytest.mark.slow  # 7 s alone, 27 s on a loaded machine (the tiny SD3 pipeline is built whole)
def test_quantized_base_bytes_are_measured_through_bitsandbytes_layers(tmp_path, monkeypatch):
    """Part 4 (--quantize_base): the tiny denoiser loaded by diffusers with the quantization config has
    exactly the bytes the per-shape sum gives (the way the real checkpoints are scaled); nf4 stores a
    Linear weight in about half a byte, int8 in about one, the rest of the denoiser in bf16."""
    pytest.importorskip("bitsandbytes")
    # a small SD3 transformer stands in for SD3.5-Large's config (same class, 256-wide layers): seconds, not minutes
    monkeypatch.setitem(bench.REAL_DENOISERS, "sd3", ("SD3Transformer2DModel", {
        "sample_size": 32, "num_layers": 2, "attention_head_dim": 64, "num_attention_heads": 4,
        "joint_attention_dim": 256, "caption_projection_dim": 256, "pooled_projection_dim": 128}))
    opts = bench.parse_args(["--families", "sd3", "--output_dir", str(tmp_path)])
    result = bench.measure_quantized_base("sd3", opts, bench.QuantizedLayerBytes())
    for kind in ("nf4", "int8"):
        tiny = result["tiny"][kind]
        assert tiny["quantized_layers"] > 0 and tiny["bytes"] == tiny["tiny_by_shapes_bytes"]
        real = result["real"][kind]
        assert 0 < real["quantized_weight_parameters"] < real["denoiser_parameters"]
    nf4, int8 = result["real"]["nf4"], result["real"]["int8"]
    # 4 bits + one 8-bit scale per 64 weights + a float32 per 256 scales; int8: 1 byte + a float32 per row
    # (plus each layer's code tables, about 1 KB: at these 256-wide layers the 4-bit figure is 0.52)
    assert 0.5 < nf4["bytes_per_quantized_weight"] < 0.53 and 1.0 < int8["bytes_per_quantized_weight"] < 1.02
    assert nf4["bytes_per_parameter"] < int8["bytes_per_parameter"] < 2.0


def test_gradient_checkpointing_and_8bit_adam_savings_are_measured(tmp_path):
    """The two memory flags the README documents by what they save: the step with
    `--gradient_checkpointing` keeps fewer activations (a lower step peak, the same resident tensors), and
    bitsandbytes' AdamW8bit keeps about a quarter of AdamW's state on a weight it quantizes (>= 4,096
    elements: 2 uint8 moments + a fp32 scale per 256 + two 256-entry code tables) and the same on the
    tiny LoRA's small factors, which it keeps in fp32."""
    opts = bench.parse_args(["--families", "sd3", "--precisions", "fp32", "--no_quantized", "--no_timing",
                             "--resolution", "16", "--batch_size", "2", "--output_dir", str(tmp_path)])
    opts.device, opts.samples = "cpu", 8
    context = bench.FamilyContext("sd3", "no", opts)
    runner = bench.FamilyRunner("none", context)
    warm, batch = context.batches(2)
    runner.step(warm)
    plain = bench.step_memory(context, runner, batch)
    checkpointed = bench.checkpointed_step_memory(context, runner, batch)
    assert checkpointed["resident_mb"] == plain["resident_mb"]
    assert checkpointed["step_peak_mb"] < plain["step_peak_mb"]
    assert not context.adapter.model.is_gradient_checkpointing  # turned off again
    n = 4096 * 4
    assert bench.adam_state_bytes([torch.zeros(n)], eight_bit=False) == 8 * n  # two fp32 moments
    eight = bench.adam_state_bytes([torch.zeros(n)], eight_bit=True)
    assert eight == 2 * n + 2 * 4 * (n // 256) + 2 * 4 * 256  # uint8 moments, fp32 block scales, code tables
    lora_state = bench.adam_state_bytes(context.params, eight_bit=False)
    assert lora_state == 8 * sum(p.numel() for p in context.params)
    bench.reset_accelerate_state()


def test_a_run_stopped_halfway_leaves_the_measured_step_times_in_place(tmp_path, monkeypatch):
    """`--no_timing` carries the step times of the earlier benchmark_families.json over; each family was written
    over that file as it finished, so a run stopped after the first family left a file without the timings (and
    without the other families), which the next run then carried nothing from. A finished run alone replaces it;
    the families measured so far are kept in benchmark_families.partial.json."""
    earlier = {"command": "timed", "steps": 8, "warmup": 2,
               "families": {"sd": {"seconds_per_step": {"none": 1.0}}, "sdxl": {"seconds_per_step": {"none": 2.0}}}}
    (tmp_path / "benchmark_families.json").write_text(json.dumps(earlier))

    def measure(family, opts):
        if family == "sdxl":
            raise RuntimeError("stopped")
        return {"peak_mb": 1.0}

    monkeypatch.setattr(bench, "measure_family", measure)
    with pytest.raises(RuntimeError, match="stopped"):
        bench.main(["--families", "sd,sdxl", "--no_timing", "--no_quantized", "--output_dir", str(tmp_path)])
    assert json.loads((tmp_path / "benchmark_families.json").read_text()) == earlier
    partial = json.loads((tmp_path / "benchmark_families.partial.json").read_text())
    assert partial["families"] == {"sd": {"peak_mb": 1.0}}
