"""Built-in fact data, known-fact filtering, edit-set building and loaders for public formats."""
from kn_lens.datasets.core import Dataset, builtin_dataset, load_dataset

__all__ = ["Dataset", "builtin_dataset", "load_dataset"]
