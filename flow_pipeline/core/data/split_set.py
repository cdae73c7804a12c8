"""One split set on disk: ``{train,val,test}.npy`` (float32), their row indices, when the source has text one
JSON-lines file of sentences per split (row-aligned), and a ``splits.json`` manifest written last. Read back
memory-mapped; :mod:`flow_pipeline.core.data.split_store` keeps one such set per subset size.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from flow_pipeline.core.atomic import TEMP_PREFIX, fsync_directory, remove_stale_temp_files, write_bytes_atomic
from flow_pipeline.core.data import DataError, MissingDataError
from flow_pipeline.core.data.files import absolute, open_npy, require_file
from flow_pipeline.core.data.splits import DEFAULT_CHUNK_ROWS, SPLIT_NAMES, Splits, check_same_dim

MANIFEST_NAME = "splits.json"
MANIFEST_VERSION = 1


def save_splits(splits: Splits, directory: str | os.PathLike, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Path:
    """Write a split set into ``directory``; returns the manifest path.

    Files: ``{train,val,test}.npy`` (float32), ``{train,val,test}_indices.npy`` (int64), when the splits carry
    sentences ``{train,val,test}.jsonl`` (one ``{"index": id, "text": sentence}`` per line, row-aligned with the
    ``.npy``), and ``splits.json`` (format version, counts, dim, source, seed, fractions, size, file sizes). Arrays are copied ``chunk_rows`` rows at a time,
    so memory-mapped inputs larger than RAM work.

    Atomicity: every file is first written to a temp name in the same directory and fsynced; on any error the temps
    are removed and an existing set is untouched. Then the old manifest is removed, the data files are moved into
    place with ``os.replace``, and the new manifest is written last (also atomically). A crash in that short window
    leaves no manifest, so :func:`load_saved_splits` reports an incomplete set instead of reading a mixed one.
    """
    directory = absolute(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(directory)
    check_same_dim(splits.arrays(), splits.source or "splits")
    staged: dict[str, Path] = {}
    try:
        for name, array in splits.arrays().items():
            staged[f"{name}.npy"] = _write_npy_temp(directory, array, np.float32, chunk_rows)
        for name, idx in splits.indices().items():
            staged[f"{name}_indices.npy"] = _write_npy_temp(directory, np.asarray(idx), np.int64, chunk_rows)
        for name, sentences in (splits.sentences or {}).items():
            staged[f"{name}.jsonl"] = _write_sentences_temp(directory, sentences, splits.indices()[name])
    except BaseException:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        raise
    manifest = _manifest(splits, {final: tmp.stat().st_size for final, tmp in staged.items()})
    (directory / MANIFEST_NAME).unlink(missing_ok=True)
    fsync_directory(directory)
    try:
        for final, tmp in staged.items():
            os.replace(tmp, directory / final)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)  # only temps that were not moved into place remain
    for name in SPLIT_NAMES:
        if f"{name}.jsonl" not in staged:
            (directory / f"{name}.jsonl").unlink(missing_ok=True)  # sentences of an earlier set
    write_bytes_atomic(directory / MANIFEST_NAME, json.dumps(manifest, indent=2).encode())
    return directory / MANIFEST_NAME


def load_saved_splits(directory: str | os.PathLike) -> Splits:
    """Read a split set written by :func:`save_splits`; embeddings come back memory-mapped, indices in memory.

    Raises DataError naming the file for a missing manifest (absent or incompletely written set), a missing or
    corrupt ``.npy``, or a file whose size/shape disagrees with the manifest.
    """
    directory = absolute(directory)
    manifest = _read_manifest(directory / MANIFEST_NAME)
    arrays, indices = {}, {}
    for name in SPLIT_NAMES:
        arrays[name] = _load_checked(directory / f"{name}.npy", manifest, (manifest["counts"][name], manifest["dim"]))
        indices[name] = np.asarray(
            _load_checked(directory / f"{name}_indices.npy", manifest, (manifest["counts"][name],)), dtype=np.int64
        )
    fractions = manifest.get("fractions")
    return Splits(
        train=arrays["train"],
        val=arrays["val"],
        test=arrays["test"],
        train_indices=indices["train"],
        val_indices=indices["val"],
        test_indices=indices["test"],
        source=str(manifest["source"]),
        seed=manifest.get("seed"),
        fractions=tuple(fractions) if fractions is not None else None,
        size=manifest.get("size"),
        truth=manifest.get("truth"),
    )


def load_sentences(directory: str | os.PathLike, split: str) -> list[str] | None:
    """The sentences of one saved split, row-aligned with its ``.npy``; ``None`` when the source had no text.
    Raises DataError naming the file when it is missing, malformed or has another row count than the manifest."""
    directory = absolute(directory)
    manifest = _read_manifest(directory / MANIFEST_NAME)
    if not manifest.get("sentences"):
        return None
    path = directory / f"{split}.jsonl"
    require_file(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): U+2028 may occur in a sentence
        sentences = [json.loads(line)["text"] for line in lines if line]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: malformed sentences file: {exc!r}") from exc
    if len(sentences) != manifest["counts"][split]:
        raise DataError(f"{path}: {len(sentences)} sentences but the manifest says {manifest['counts'][split]} rows")
    return sentences


def _manifest(splits: Splits, file_bytes: dict[str, int]) -> dict:
    return {
        "format_version": MANIFEST_VERSION,
        "counts": {name: int(a.shape[0]) for name, a in splits.arrays().items()},
        "dim": splits.dim,
        "dtype": "float32",
        "source": splits.source,
        "seed": splits.seed,
        "fractions": list(splits.fractions) if splits.fractions is not None else None,
        "size": splits.size,
        "truth": splits.truth,
        "sentences": splits.sentences is not None,
        "file_bytes": file_bytes,
    }


def _read_manifest(path: Path) -> dict:
    if not path.is_file():
        raise MissingDataError(f"{path}: file not found (no split set here, or its last save did not finish)")
    try:
        manifest = json.loads(path.read_text())
        manifest["counts"] = {name: int(manifest["counts"][name]) for name in SPLIT_NAMES}
        manifest["dim"] = int(manifest["dim"])
        missing = [key for key in ("source", "file_bytes") if key not in manifest]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: malformed split manifest: {exc!r}") from exc
    if missing:
        raise DataError(f"{path}: malformed split manifest: missing keys {missing}")
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise DataError(f"{path}: unsupported format_version {manifest.get('format_version')!r}")
    return manifest


def _load_checked(path: Path, manifest: dict, shape: tuple[int, ...]) -> np.ndarray:
    """Memory-map one ``.npy`` of the set and check it against the manifest's byte size and expected shape."""
    require_file(path)
    expected_bytes = manifest["file_bytes"].get(path.name)
    if expected_bytes is not None and path.stat().st_size != expected_bytes:
        raise DataError(
            f"{path}: size {path.stat().st_size} bytes does not match the manifest's {expected_bytes} "
            f"(the split set is inconsistent)"
        )
    array = open_npy(path)
    if tuple(array.shape) != tuple(shape):
        raise DataError(f"{path}: shape {tuple(array.shape)} does not match the manifest's {tuple(shape)}")
    return array


def _write_npy_temp(directory: Path, array: np.ndarray, dtype: type, chunk_rows: int) -> Path:
    """Copy ``array`` into a fsynced temp ``.npy`` in ``directory``, chunk by chunk; returns the temp path."""
    fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".npy", dir=directory)
    os.close(fd)
    tmp = Path(name)
    try:
        if array.shape[0] == 0 or array.size == 0:
            np.save(tmp, np.empty(array.shape, dtype=dtype))  # open_memmap cannot map zero bytes
        else:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(array.shape))
            for start in range(0, array.shape[0], chunk_rows):
                out[start : start + chunk_rows] = np.asarray(array[start : start + chunk_rows], dtype=dtype)
            out.flush()
            del out
        _fsync_file(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _write_sentences_temp(directory: Path, sentences: list[str], indices: np.ndarray) -> Path:
    """One ``{"index": id, "text": sentence}`` JSON line per row into a fsynced temp file; returns its path."""
    if len(sentences) != len(indices):
        raise DataError(f"{directory}: {len(sentences)} sentences for {len(indices)} rows")
    fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".jsonl", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for index, text in zip(indices.tolist(), sentences):
                handle.write(json.dumps({"index": index, "text": text}, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
