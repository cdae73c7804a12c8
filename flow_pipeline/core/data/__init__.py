"""Embedding data, from a source to the batches a run trains on. One job per module:

- :mod:`.synthetic`: the built-in SONAR-like Gaussian mixture with known parameters (the default source);
- :mod:`.sonar_like`: an older seeded SONAR-like generator, kept for tests and benchmarks that need fast data;
- :mod:`.files`: loading one embeddings file (``.npy`` memory-mapped, ``.pt``);
- :mod:`.split_files`: the research plan's Phase-1 split files, validated key by key;
- :mod:`.splits`: a train/val/test split set in memory (:class:`~.splits.Splits`), drawing and validating it;
- :mod:`.sources`: the ``dataset_splits`` source (synthetic, a file, split files) -> a validated split set;
- :mod:`.split_set`: one split set on disk (``.npy`` + sentences + manifest), written atomically;
- :mod:`.split_store`: split sets per dataset size, and the rows a run with a given ``dataset`` uses;
- :mod:`.stats`: streaming moments over memory-mapped arrays, the Ledoit-Wolf weight;
- :mod:`.normalization`: :class:`~.normalization.Normalizer` (``fit``, the one std floor, its ``.npz`` file);
- :mod:`.batching`: the seeded resumable batch sampler and the augmentations.

Every problem with input data raises :class:`DataError` whose message starts with the offending file's absolute
path (or the caller's name for an in-memory array) and then says what is wrong.
"""


class DataError(ValueError):
    """Bad input data: a missing, corrupt or malformed file, or an array with the wrong shape or values."""


class MissingDataError(DataError):
    """An input file is not there (not written yet, or its last save did not finish)."""


class DatasetChoiceError(DataError):
    """The run's ``dataset`` choice does not fit the splits: an unknown size, one the store lacks, or more training
    rows than the train split has. The message starts with ``dataset:``."""
