"""Token ids cached once per (corpus, tokenizer) in memory-mapped files.

Layout: ``CACHE/tokens/<corpus hash>-<tokenizer hash>/{train,val}.bin`` plus ``meta.json`` with
each split's length, dtype and SHA-256. ``meta.json`` is written last and every file is replaced
atomically, so a build cut short leaves no meta and is rebuilt. On load the sizes and checksums
are verified: a truncated or corrupt cache is rebuilt with a warning, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from optarena import atomic
from optarena.data.corpus import SPLITS, Corpus
from optarena.data.tokenizer import TextTokenizer

CACHE_VERSION = 1
ENCODE_BATCH = 256  # documents per encode_batch call


def default_cache_dir() -> Path:
    """``$OPTARENA_CACHE`` or ``~/.cache/optarena``."""
    return Path(os.environ.get("OPTARENA_CACHE") or Path.home() / ".cache" / "optarena")


def cache_path(cache_dir: Path, corpus: Corpus, tokenizer: TextTokenizer) -> Path:
    return cache_dir / "tokens" / f"{corpus.fingerprint[:20]}-{tokenizer.fingerprint[:20]}"


def _dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def verify(folder: Path) -> dict | str:
    """The cache's metadata if every split matches its recorded length and checksum, else the
    reason it does not."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION:
            return "written by another cache version"
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in SPLITS:
            path, info = folder / f"{split}.bin", meta["splits"][split]
            size, expected = path.stat().st_size, info["count"] * itemsize
            if size != expected:
                return f"{split}.bin has {size} bytes, expected {expected} (truncated?)"
            if _sha256(path) != info["sha256"]:
                return f"{split}.bin does not match its checksum"
    except FileNotFoundError as err:
        return f"missing {Path(err.filename).name}"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable metadata ({err})"
    return meta


def _write_split(
    corpus: Corpus,
    tokenizer: TextTokenizer,
    split: str,
    dest: Path,
    dtype: np.dtype,
    progress: bool,
) -> dict:
    """Encode one split in batches of documents, appending ids (and end-of-text) to ``dest``."""
    from tqdm import tqdm

    count, h = 0, hashlib.sha256()
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    bar = tqdm(desc=f"tokenizing {split}", unit=" docs", disable=not progress, leave=False)
    with dest.open("wb") as f:
        batch: list[str] = []

        def flush() -> None:
            nonlocal count
            ids = [i for enc in tokenizer.encode_batch(batch) for i in (*enc, *eos)]
            arr = np.asarray(ids, dtype=dtype)
            f.write(arr.tobytes())
            h.update(arr.tobytes())
            count += len(arr)
            bar.update(len(batch))
            batch.clear()

        for doc in corpus.documents(split):
            batch.append(doc)
            if len(batch) >= ENCODE_BATCH:
                flush()
        if batch:
            flush()
        f.flush()
        os.fsync(f.fileno())
    bar.close()
    return {"count": count, "sha256": h.hexdigest()}


def load_tokens(
    corpus: Corpus, tokenizer: TextTokenizer, cache_dir: Path, progress: bool = False
) -> dict[str, np.ndarray]:
    """Token ids of both splits as read-only memory maps, built on first use."""
    folder = cache_path(cache_dir, corpus, tokenizer)
    meta = verify(folder) if folder.exists() else "absent"
    if isinstance(meta, str):
        if folder.exists():
            warnings.warn(f"token cache {folder} is invalid ({meta}); rebuilding it", stacklevel=2)
        meta = _build(corpus, tokenizer, folder, progress)
    dtype = np.dtype(meta["dtype"])
    out = {}
    for split in SPLITS:
        n = meta["splits"][split]["count"]
        # copy-on-write maps are writable views, so torch.from_numpy does not warn; the file is
        # never modified
        out[split] = (
            np.memmap(folder / f"{split}.bin", dtype=dtype, mode="c", shape=(n,))
            if n
            else np.zeros(0, dtype=dtype)
        )
    return out


def _build(corpus: Corpus, tokenizer: TextTokenizer, folder: Path, progress: bool) -> dict:
    """Encode both splits into a temporary folder beside ``folder``, then move the files in
    with ``meta.json`` (their checksums) last: a cache without a matching meta is rebuilt."""
    atomic.clean_temp_files(folder.parent)  # the folders of builds that were killed
    tmp = atomic.temp_name(folder)
    with atomic.storage_errors(folder):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            return _build_into(corpus, tokenizer, folder, tmp, progress)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _build_into(
    corpus: Corpus, tokenizer: TextTokenizer, folder: Path, tmp: Path, progress: bool
) -> dict:
    dtype = _dtype(tokenizer.vocab_size)
    splits = {
        s: _write_split(corpus, tokenizer, s, tmp / f"{s}.bin", dtype, progress) for s in SPLITS
    }
    meta = {
        "version": CACHE_VERSION,
        "dtype": dtype.name,
        "splits": splits,
        "corpus": corpus.name,
        "corpus_fingerprint": corpus.fingerprint,
        "tokenizer": tokenizer.name,
        "tokenizer_fingerprint": tokenizer.fingerprint,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)  # invalid until the new meta lands
    for s in SPLITS:
        os.replace(tmp / f"{s}.bin", folder / f"{s}.bin")
    atomic.write_json(folder / "meta.json", meta, indent=1)
    return meta


__all__ = ["cache_path", "default_cache_dir", "load_tokens", "verify"]
