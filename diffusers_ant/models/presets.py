"""Named model presets for training from scratch (``--model_config_name_or_path tiny``).

Every model type has a ``tiny`` preset, small enough that a training step takes well under a
second on two CPU cores (see the speed table in the project's ENVIRONMENT notes); ``unet`` also
has ``small``, the attention UNet of the embedded MNIST demo (about 1.1M parameters at 16x16).

A preset is a plain dict of component configs: ``{"model": {...}, "vae": {...} | None,
"text_encoder": {...} | None, "scheduler": {...}}``. The keys inside ``model`` / ``vae`` / ``scheduler``
are the constructor arguments of the diffusers classes (UNet2DModel, DiTTransformer2DModel,
UNet2DConditionModel, AutoencoderKL, DDPMScheduler), so a preset reads like the ``config.json``
diffusers would write. Image size and channel counts are filled in at load time from the data
(``resolution``, ``num_channels``) by each adapter.
"""

import copy
import json
import os
import re

# Pixel-space diffusion at 8x8 to 32x32: the cosine schedule of Nichol & Dhariwal (2021) keeps the
# tiny images from being mostly noise for most of the chain, which the linear schedule does.
PIXEL_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}
# Latent diffusion: Stable Diffusion's own training schedule (scaled_linear, 0.00085 -> 0.012).
LATENT_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "steps_offset": 1,  # as SD's own scheduler config; its pipelines warn otherwise
}

# A 2-block VAE downsamples by 2 (diffusers: factor 2 ** (len(block_out_channels) - 1)),
# so a 16x16 image becomes an 8x8x4 latent.
TINY_VAE = {
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,
}

TINY_TEXT_ENCODER = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "layer_norm_eps": 1e-5,
    "projection_dim": 32,
}

TINY_UNET2D_CONDITION = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": TINY_TEXT_ENCODER["hidden_size"],
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}

# SDXL's UNet as diffusers' SDXL pipeline tests size it (tests/pipelines/stable_diffusion_xl,
# get_dummy_components): the text_time added conditioning, linear projections, two transformer layers
# in the second block. cross_attention_dim and projection_class_embeddings_input_dim follow from the two
# text encoders at load time (models/sdxl.py).
TINY_SDXL_UNET = {
    "block_out_channels": [2, 4],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": [1, 2],
    "norm_num_groups": 1,
}

PRESETS = {
    "unet": {
        # 0.16M parameters at 16x16, no attention: the fastest thing that still learns digits.
        "tiny": {
            "model": {
                "block_out_channels": [16, 32],
                "layers_per_block": 1,
                "down_block_types": ["DownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "UpBlock2D"],
                "norm_num_groups": 8,
            },
            "scheduler": PIXEL_SCHEDULER,
        },
        # The demo's attention UNet: 1.1M parameters, attention at the lowest resolution only.
        "small": {
            "model": {
                "block_out_channels": [32, 64, 64],
                "layers_per_block": 1,
                "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
                "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
                "attention_head_dim": 8,
                "norm_num_groups": 8,
            },
            "scheduler": PIXEL_SCHEDULER,
        },
        # The UNet and noise schedule that diffusers' examples/unconditional_image_generation/
        # train_unconditional.py builds (its defaults: 114M parameters, linear betas, epsilon), so
        # that script's commands carry over with `--model_config_name_or_path ddpm`.
        "ddpm": {
            "model": {
                "block_out_channels": [128, 128, 256, 256, 512, 512],
                "layers_per_block": 2,
                "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                                     "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
            },
            "scheduler": {"num_train_timesteps": 1000, "beta_schedule": "linear"},
        },
    },
    "dit": {
        # Pixel-space DiT: patch 2, 2 blocks, width 32.
        "tiny": {
            "model": {"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2, "patch_size": 2},
            "scheduler": PIXEL_SCHEDULER,
        },
        # The same DiT on the latents of a tiny VAE, sampled with diffusers' own DiTPipeline.
        "tiny-latent": {
            "model": {"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2, "patch_size": 2},
            "vae": TINY_VAE,
            "scheduler": LATENT_SCHEDULER,
        },
    },
    "sd": {
        "tiny": {
            "model": TINY_UNET2D_CONDITION,
            "vae": TINY_VAE,
            "text_encoder": TINY_TEXT_ENCODER,
            "scheduler": LATENT_SCHEDULER,
        },
    },
    "sdxl": {
        # two CLIP text encoders of the same tiny config (the second with its projection head)
        "tiny": {
            "model": TINY_SDXL_UNET,
            "vae": TINY_VAE,
            "text_encoder": TINY_TEXT_ENCODER,
            "text_encoder_2": TINY_TEXT_ENCODER,
            "scheduler": LATENT_SCHEDULER,
        },
    },
    "qwenimage": {
        # Qwen-Image at the size of diffusers' own pipeline tests (tests/pipelines/qwenimage/test_qwenimage.py,
        # get_dummy_components): a 2-block QwenImageTransformer2DModel (3 heads of 16, joint dim 16), an
        # AutoencoderKLQwenImage with z_dim 4 and two spatial downsamplings (factor 4; with the 2x2 packing
        # a 16-pixel image is 2x2 = 4 tokens), a 2-layer Qwen2.5-VL text encoder of width 16 and the
        # default FlowMatchEulerDiscreteScheduler. The tokenizer is built in memory (`tiny_qwen_tokenizer`).
        "tiny": {
            "model": {
                "patch_size": 2,
                "num_layers": 2,
                "attention_head_dim": 16,
                "num_attention_heads": 3,
                "joint_attention_dim": 16,
                "guidance_embeds": False,
                "axes_dims_rope": [8, 4, 4],
            },
            "vae": {
                "base_dim": 24,
                "z_dim": 4,
                "dim_mult": [1, 2, 4],
                "num_res_blocks": 1,
                "temperal_downsample": [False, True],
                "latents_mean": [0.0] * 4,
                "latents_std": [1.0] * 4,
            },
            "text_encoder": {
                "text_config": {
                    "hidden_size": 16,
                    "intermediate_size": 16,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                    "num_key_value_heads": 2,
                    "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                    "rope_theta": 1000000.0,
                },
                "vision_config": {"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                                  "out_hidden_size": 16},
                "hidden_size": 16,
            },
            "scheduler": {"num_train_timesteps": 1000},
        },
    },
    "controlnet": {
        # The frozen UNet, VAE and text encoder of sd/tiny, and a ControlNet copied from that UNet
        # (its conditioning embedding gets as many blocks as the VAE: here 2, downsampling by 2).
        "tiny": {
            "model": {},
            "unet": TINY_UNET2D_CONDITION,
            "vae": TINY_VAE,
            "text_encoder": TINY_TEXT_ENCODER,
            "scheduler": LATENT_SCHEDULER,
        },
    },
}


def resolve_model_config(model_type: str, model_config_name_or_path: str) -> dict:
    """Return a preset (a fresh copy) by name, or read a config JSON as the trained module's config.

    A JSON file is the ``config.json`` of the trained module (what ``model.save_config`` writes);
    it becomes ``{"model": <that dict>}`` and the other components keep the type's ``tiny`` preset
    unless a pretrained folder supplies them.
    """
    presets = PRESETS[model_type]
    if model_config_name_or_path in presets:
        return copy.deepcopy(presets[model_config_name_or_path])
    path = model_config_name_or_path
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        path = os.path.join(path, "config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            model_config = json.load(f)
        # diffusers' own bookkeeping keys are not constructor arguments
        model_config = {k: v for k, v in model_config.items() if not k.startswith("_")}
        config = copy.deepcopy(presets["tiny"])
        config["model"] = model_config
        return config
    raise ValueError(
        f"unknown model config {model_config_name_or_path!r} for model type {model_type!r}: "
        f"use a preset ({', '.join(sorted(presets))}) or a path to a config JSON"
    )


# Characters the tiny tokenizer knows. CLIP's BPE marks a word's last symbol with "</w>", so each
# character appears twice in the vocabulary; with no merges every character is one token.
_TINY_TOKENIZER_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
TINY_TOKENIZER_MAX_LENGTH = 32


def tiny_clip_tokenizer():
    """A character-level ``CLIPTokenizer`` built in memory from a vocabulary written here.

    Why not ``CLIPTokenizer.from_pretrained(<hub id>)``: nothing can be downloaded here, and with
    ``HF_HUB_OFFLINE=1`` that call silently returns a 2-token tokenizer instead of failing. The
    size is asserted so such a tokenizer can never slip through.
    """
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in _TINY_TOKENIZER_CHARS:
            vocab[char + suffix] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TINY_TOKENIZER_MAX_LENGTH)
    expected = 2 + 2 * len(_TINY_TOKENIZER_CHARS)
    assert len(tokenizer) == expected, f"tiny tokenizer has {len(tokenizer)} tokens, expected {expected}"
    return tokenizer


def tiny_text_encoder(tokenizer, config: dict):
    """A randomly initialised ``CLIPTextModel`` sized for ``tokenizer``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config,
    )
    return CLIPTextModel(text_config)


# ---------------------------------------------------------------------------------------- flux
# FluxTransformer2DModel, its VAE and CLIP text encoder sized as diffusers' Flux pipeline tests size
# them (tests/pipelines/flux/test_pipeline_flux.py, get_dummy_components), with a 2-block VAE (factor
# 2, so packing and the VAE factor are both exercised) and a tiny T5 built from a config here (the
# tests download hf-internal-testing/tiny-random-t5). `in_channels`, `joint_attention_dim` and
# `pooled_projection_dim` are filled in from the VAE and the text encoders at load time.
TINY_FLUX_TRANSFORMER = {
    "patch_size": 1, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
    "num_attention_heads": 2, "axes_dims_rope": [4, 4, 8], "guidance_embeds": True,
}
TINY_FLUX_VAE = {
    "block_out_channels": [4, 4],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "layers_per_block": 1, "latent_channels": 1, "norm_num_groups": 1,
    "use_quant_conv": False, "use_post_quant_conv": False, "shift_factor": 0.0609, "scaling_factor": 1.5035,
}
TINY_T5_ENCODER = {"d_model": 32, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4,
                   "relative_attention_num_buckets": 8}
# FLUX.1-dev's scheduler config (dynamic shift for the image's sequence length) and FLUX.1-schnell's (static, 1.0).
FLUX_DEV_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                      "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
FLUX_SCHNELL_SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}
PRESETS["flux"] = {
    # guidance-distilled with a dynamic shift, like FLUX.1-dev
    "tiny": {"model": TINY_FLUX_TRANSFORMER, "vae": TINY_FLUX_VAE, "text_encoder": TINY_TEXT_ENCODER,
             "text_encoder_2": TINY_T5_ENCODER, "scheduler": FLUX_DEV_SCHEDULER},
    # no guidance embedding, static shift 1.0, like FLUX.1-schnell
    "tiny-schnell": {"model": {**TINY_FLUX_TRANSFORMER, "guidance_embeds": False}, "vae": TINY_FLUX_VAE,
                     "text_encoder": TINY_TEXT_ENCODER, "text_encoder_2": TINY_T5_ENCODER,
                     "scheduler": FLUX_SCHNELL_SCHEDULER},
}


def tiny_t5_tokenizer():
    """A character-level ``T5TokenizerFast`` (a ``tokenizers`` Unigram model) built in memory.

    Why not ``from_pretrained``: nothing can be downloaded here, and sentencepiece (which T5's
    ``spiece.model`` needs) is not required by this project; a Unigram vocabulary given as
    (piece, score) pairs builds the fast tokenizer without it. Each character, alone or after the
    word-start mark, is one token; ``</s>`` ends every sequence as in T5."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(char, -2.0) for char in _TINY_TOKENIZER_CHARS] + [("\u2581" + char, -1.5) for char in _TINY_TOKENIZER_CHARS]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=TINY_TOKENIZER_MAX_LENGTH)
    assert len(tokenizer) == len(vocab), f"tiny T5 tokenizer has {len(tokenizer)} tokens, expected {len(vocab)}"
    return tokenizer


def tiny_t5_encoder(tokenizer, config: dict):
    """A randomly initialised ``T5EncoderModel`` sized for ``tokenizer``."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                                   **config))


# ---------------------------------------------------------------------------------------- sd3
# SD3Transformer2DModel sized as diffusers' SD3 pipeline tests size it (tests/pipelines/stable_diffusion_3,
# get_dummy_components), with patch 2 as the real model and two layers; a 2-block VAE (factor 2) with SD3's
# latent shift / scale and no quant convs; two tiny CLIP encoders (with projection, models/sd3.py) and a
# tiny T5 as wide as the two CLIP widths together (as T5-XXL's 4096 >= 768 + 1280), so the CLIP states are
# padded, not cut. `in_channels`, `joint_attention_dim` and `pooled_projection_dim` follow from the VAE and
# the text encoders at load time. The scheduler is SD3's (stable-diffusion-3-medium-diffusers: shift 3.0).
TINY_SD3_TRANSFORMER = {"patch_size": 2, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 4,
                        "caption_projection_dim": 32, "pos_embed_max_size": 32}
# Flux's tiny VAE (SD3's shift / scale, no quant convs) with SD3's 4 latent channels, and the tiny T5 twice as wide
TINY_SD3_VAE = {**TINY_FLUX_VAE, "block_out_channels": [8, 16], "latent_channels": 4, "norm_num_groups": 8}
TINY_SD3_T5_ENCODER = {**TINY_T5_ENCODER, "d_model": 64}
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
PRESETS["sd3"] = {
    "tiny": {"model": TINY_SD3_TRANSFORMER, "vae": TINY_SD3_VAE, "text_encoder": TINY_TEXT_ENCODER,
             "text_encoder_3": TINY_SD3_T5_ENCODER, "scheduler": SD3_SCHEDULER},
    # SD3.5's transformer options: RMS-norm on queries / keys, MMDiT-X dual attention in block 0
    "tiny-3.5": {"model": {**TINY_SD3_TRANSFORMER, "qk_norm": "rms_norm", "dual_attention_layers": [0]},
                 "vae": TINY_SD3_VAE, "text_encoder": TINY_TEXT_ENCODER, "text_encoder_3": TINY_SD3_T5_ENCODER,
                 "scheduler": SD3_SCHEDULER},
}


# QwenImagePipeline's prompt template (pipeline_qwenimage.py, `prompt_template_encode`), whose first
# 34 tokens (`prompt_template_encode_start_idx`) the pipeline drops from the text encoder's output.
QWEN_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
QWEN_TEMPLATE_DROP = 34


def tiny_qwen_tokenizer():
    """A byte-level BPE ``Qwen2Tokenizer`` built in memory, in which QwenImagePipeline's template tokenizes
    as Qwen's own tokenizer does it.

    Why not ``Qwen2Tokenizer.from_pretrained``: nothing can be downloaded here (and sentencepiece is not
    needed: Qwen2's tokenizer is a `tokenizers` BPE). The vocabulary is the 256 byte symbols of the
    byte-level pre-tokenizer plus every word of the template, reached by merges that grow each word from
    its first symbol; so the template's prefix is exactly the 34 tokens the pipeline drops (each of
    its words one token, as in Qwen2.5's vocabulary) and any caption falls back to single bytes.
    """
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    special = ["<|im_start|>", "<|im_end|>"]
    vocab = {"<|endoftext|>": 0}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    splitter = Qwen2Tokenizer(vocab=dict(vocab), merges=[])._tokenizer.pre_tokenizer  # Qwen2's own split
    words = []
    for text in re.split("|".join(re.escape(token) for token in special) + r"|\{\}", QWEN_PROMPT_TEMPLATE):
        words += [word for word, _ in splitter.pre_tokenize_str(text) if word not in words]
    merges = []
    for word in words:
        for i in range(1, len(word)):
            if (word[:i], word[i]) not in merges:
                merges.append((word[:i], word[i]))
            vocab.setdefault(word[: i + 1], len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=special,
                               model_max_length=32768)  # Qwen2.5's; the pipeline truncates at 1024 + 34
    prefix = tokenizer(QWEN_PROMPT_TEMPLATE.split("{}")[0]).input_ids
    assert len(prefix) == QWEN_TEMPLATE_DROP, f"the template prefix is {len(prefix)} tokens, expected {QWEN_TEMPLATE_DROP}"
    return tokenizer


def tiny_qwen_text_encoder(tokenizer, config: dict):
    """A randomly initialised ``Qwen2_5_VLForConditionalGeneration`` of the preset's size, for ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = copy.deepcopy(config)
    ids = {"vocab_size": len(tokenizer), "bos_token_id": None, "pad_token_id": tokenizer.pad_token_id,
           "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>")}
    config["text_config"].update(ids)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config, **ids)).eval()
