"""Everything between a corpus on disk (or on the hub) and the packed, modality-tagged batches."""

from ds_train.data.codec import delinearize, linearize

__all__ = ["delinearize", "linearize"]
