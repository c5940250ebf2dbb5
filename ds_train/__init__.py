"""ds_train: modality-relative pre-training (MRPT) of text-to-code language models on DeepSpeed."""

__version__ = "0.1.0"
