"""Text corpora: the built-in one every Python carries, local text files, C4 shards, and C4 itself.

A :class:`Corpus` yields documents for a split (``"train"`` or ``"val"``) and has a fingerprint
(a hash of its content and split rule), which keys the tokenizer and token caches. Splits are by
document: a document lands in validation when a hash of its text falls below ``val_fraction``, so
the split is stable however the files are ordered and never cuts a document in two. Local files
must be UTF-8 text: a byte that is not UTF-8 (latin-1, random bytes) or a NUL byte (binary) is a
one-line error naming the file and the byte's offset, never replaced and trained on.
"""

from __future__ import annotations

import ast
import glob
import gzip
import hashlib
import json
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from optarena import atomic
from optarena.errors import UserError

SPLITS = ("train", "val")
BUILTIN_VERSION = 1  # bump when the builtin corpus recipe changes

# Standard-library folders that are tests, GUIs, vendored packages or installer payloads.
_STDLIB_SKIP = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idlelib",
    "tkinter",
    "turtledemo",
    "__pycache__",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "venv",
    "__phello__",
}


@dataclass
class Corpus:
    """A named, fingerprinted source of documents split into train and validation."""

    name: str
    fingerprint: str
    _documents: Callable[[str], Iterator[str]]

    def documents(self, split: str) -> Iterator[str]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        return self._documents(split)


def split_of(text: str, val_fraction: float) -> str:
    """``"val"`` for a stable ``val_fraction`` of documents (by content hash), else ``"train"``."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    return "val" if h / 2**64 < val_fraction else "train"


def split_documents(docs: list[str], val_fraction: float) -> dict[str, list[str]]:
    """Hash split of an in-memory document list that leaves neither split empty."""
    docs = [d for d in docs if d.strip()]
    out: dict[str, list[str]] = {"train": [], "val": []}
    for d in docs:
        out[split_of(d, val_fraction)].append(d)
    if len(docs) >= 2 and val_fraction > 0:
        if not out["val"]:
            out["val"].append(out["train"].pop())
        if not out["train"]:
            out["train"].append(out["val"].pop())
    return out


def _fingerprint(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _from_lists(name: str, fingerprint: str, splits: dict[str, list[str]]) -> Corpus:
    return Corpus(name, fingerprint, lambda split: iter(splits[split]))


# --------------------------------------------------------------------------- builtin


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if set(rel.parts[:-1]) & _STDLIB_SKIP or rel.name in ("this.py", "antigravity.py"):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstring_document(module: str, source: str) -> str | None:
    """Module, class and function docstrings of one module, headed by their qualified names.

    Parsed with :mod:`ast`, never imported, so no module's side effects run."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    parts: list[str] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    parts.append(f"{qual}\n{doc}")
                visit(child, qual)

    head = ast.get_docstring(tree)
    if head:
        parts.append(f"{module}\n{head}")
    visit(tree, module)
    return "\n\n".join(parts) if parts else None


def build_builtin_documents() -> list[str]:
    """The built-in corpus, deterministic for a given Python: the ``pydoc_data`` help topics,
    every stdlib module's docstrings, and the source text of every fourth module (about 4-5 MB)."""
    from pydoc_data.topics import topics

    docs = [f"{key}\n\n{topics[key]}" for key in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for i, path in enumerate(_stdlib_files()):
        rel = path.relative_to(root).with_suffix("").as_posix()
        module = rel.replace("/", ".").removesuffix(".__init__")
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        doc = _docstring_document(module, source)
        if doc:
            docs.append(doc)
        if i % 4 == 0 and source.strip():
            docs.append(f"# {module}\n{source}")
    return docs


def builtin_corpus(cache_dir: Path, val_fraction: float) -> Corpus:
    """The built-in corpus, assembled once per Python version and cached as JSON lines."""
    version = sys.implementation.name + "-" + ".".join(map(str, sys.version_info[:3]))
    path = cache_dir / "corpus" / f"builtin-v{BUILTIN_VERSION}-{version}.jsonl"
    docs: list[str] | None = None
    if path.is_file():
        try:
            with path.open(encoding="utf-8") as f:
                docs = [json.loads(line) for line in f]
        except (OSError, ValueError):
            docs = None  # torn or corrupt: rebuild below
    if not docs:
        docs = build_builtin_documents()
        with atomic.storage_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_open(path) as f:
            for d in docs:
                f.write(json.dumps(d) + "\n")
    digest = hashlib.sha256("\x1e".join(docs).encode("utf-8")).hexdigest()
    fp = _fingerprint("builtin", digest, repr(val_fraction))
    return _from_lists("builtin", fp, split_documents(docs, val_fraction))


# --------------------------------------------------------------------------- files

_JSONL_SUFFIXES = (".json.gz", ".jsonl.gz", ".jsonl", ".json")
_PARAGRAPH = re.compile(r"\n\s*\n")


def _expand(spec: str) -> list[Path]:
    """A file, a directory (its ``*.json.gz``, ``*.jsonl`` and ``*.txt`` files) or a glob."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = [p for p in sorted(path.iterdir()) if p.is_file() and _is_data_file(p)]
        if not files:
            raise UserError(f"data directory {spec} holds no .txt, .jsonl or .json.gz files")
        return files
    if path.is_file():
        return [path]
    if path.exists():
        raise UserError(
            f"data path {spec} is not a regular file (a device, a pipe or a socket); give a "
            "text file, a folder of them or a glob"
        )
    if glob.has_magic(spec):
        files = [Path(p) for p in sorted(glob.glob(os.path.expanduser(spec), recursive=True))]
        files = [p for p in files if p.is_file()]
        if not files:
            raise UserError(f"no files match the data pattern {spec!r}")
        return files
    raise UserError(f"data file {spec} does not exist (use --data builtin, c4, a file or a glob)")


def _is_data_file(path: Path) -> bool:
    return path.name.endswith((*_JSONL_SUFFIXES, ".txt", ".md", ".rst"))


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith(_JSONL_SUFFIXES)


def _text_documents(text: str) -> list[str]:
    """A plain text file as documents: its blank-line-separated paragraphs, or chunks of 50
    lines when it has none (so a single file still splits into train and validation)."""
    paragraphs = [p for p in _PARAGRAPH.split(text) if p.strip()]
    if len(paragraphs) >= 2:
        return paragraphs
    lines = text.splitlines(keepends=True)
    return ["".join(lines[i : i + 50]) for i in range(0, len(lines), 50)]


def _decode(data: bytes, path: Path, offset: int = 0) -> str:
    """``data`` (read from ``path`` at byte ``offset``) as UTF-8 text. Bytes that are not UTF-8
    (latin-1, random bytes) or a NUL byte (a binary file) are a one-line error naming the byte
    and its offset in the file: training on replacement characters would be silent garbage."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"data file {path} is not UTF-8 text: byte 0x{data[err.start]:02x} at offset "
            f"{offset + err.start}; convert it (e.g. iconv -f latin1 -t utf-8) or give UTF-8 files"
        ) from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise UserError(
            f"data file {path} holds a NUL byte at offset {offset + nul}: it is binary, not "
            "text; give text files or C4-style JSON lines"
        )
    return text


def _read_text(path: Path) -> str:
    """A text file's content (UTF-8, a leading byte-order mark dropped); see :func:`_decode`."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read data file {path}: {err.strerror}") from None
    return _decode(data, path).removeprefix("\ufeff")


def _read_jsonl(path: Path) -> Iterator[str]:
    """Documents of a C4-style shard (JSON lines with a ``text`` field), streamed."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            offset = 0
            for lineno, raw in enumerate(f, 1):
                line = _decode(raw, path, offset)
                offset += len(raw)
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError) as err:
                    raise UserError(
                        f"{path}:{lineno}: not a JSON line with a 'text' field ({err})"
                    ) from None
                if isinstance(text, str) and text.strip():
                    yield text
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise UserError(f"cannot read data shard {path}: {err}") from None


def _file_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        with p.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def file_corpus(spec: str, val_fraction: float) -> Corpus:
    """Local text files and/or C4-format shards. Shards whose name contains ``validation`` form
    the validation split (as in C4's own layout); otherwise documents are split by hash."""
    files = _expand(spec)
    for p in files:
        try:
            with p.open("rb"):
                pass
        except OSError as err:
            raise UserError(f"cannot read data file {p}: {err.strerror}") from None
    fp = _fingerprint("files", _file_hash(files), repr(val_fraction))
    jsonl = [p for p in files if _is_jsonl(p)]
    text = [p for p in files if not _is_jsonl(p)]
    name = spec

    if not jsonl:
        docs: list[str] = []
        for p in text:
            docs.extend(_text_documents(_read_text(p)))
        if not any(d.strip() for d in docs):
            raise UserError(f"the corpus {spec} is empty (no text in {len(text)} file(s))")
        return _from_lists(name, fp, split_documents(docs, val_fraction))

    val_files = [p for p in jsonl if "validation" in p.name]
    train_files = [p for p in jsonl if p not in val_files]

    def documents(split: str) -> Iterator[str]:
        for p in text:
            for d in _text_documents(_read_text(p)):
                if split_of(d, val_fraction) == split:
                    yield d
        if val_files and train_files:
            yield from (
                d for p in (val_files if split == "val" else train_files) for d in _read_jsonl(p)
            )
        else:
            yield from _hash_split_nonempty(
                (d for p in jsonl for d in _read_jsonl(p)), split, val_fraction
            )

    return Corpus(name, fp, documents)


def _hash_split_nonempty(docs: Iterable[str], split: str, val_fraction: float) -> Iterator[str]:
    """Hash split of a stream; if no document hashes into validation, the first document is
    used for validation (tiny shard sets such as test fixtures)."""
    first: str | None = None
    any_val = False
    for i, d in enumerate(docs):
        if i == 0:
            first = d
            continue
        s = split_of(d, val_fraction)
        any_val |= s == "val"
        if s == split:
            yield d
    if first is not None:
        s = split_of(first, val_fraction) if any_val else "val"
        if s == split:
            yield first


# --------------------------------------------------------------------------- C4 from the hub


def c4_corpus(max_documents: int, val_fraction: float) -> Corpus:
    """English C4 (``allenai/c4``, ``en``) streamed through Hugging Face ``datasets``: the first
    ``max_documents`` training documents and a proportional slice of C4's validation split."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            "--data c4 needs Hugging Face datasets: pip install 'optarena[c4]'"
        ) from None
    n_val = max(1, int(max_documents * val_fraction))

    def documents(split: str) -> Iterator[str]:
        hf_split, n = ("train", max_documents) if split == "train" else ("validation", n_val)
        try:
            stream = datasets.load_dataset("allenai/c4", "en", split=hf_split, streaming=True)
            for i, row in enumerate(stream):
                if i >= n:
                    break
                yield row["text"]
        except (OSError, ConnectionError) as err:
            raise UserError(
                f"cannot stream C4 from the Hugging Face hub (offline?): {err}"
            ) from None

    fp = _fingerprint("hf:allenai/c4:en", str(max_documents), repr(val_fraction))
    return Corpus("c4", fp, documents)


def load_corpus(
    spec: str, cache_dir: Path, val_fraction: float = 0.05, max_documents: int = 200_000
) -> Corpus:
    """``builtin``, ``c4``, or a path / directory / glob of text files and C4-format shards."""
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1, not {val_fraction}")
    if spec == "builtin":
        return builtin_corpus(cache_dir, val_fraction)
    if spec == "c4":
        return c4_corpus(max_documents, val_fraction)
    return file_corpus(spec, val_fraction)


__all__ = ["Corpus", "build_builtin_documents", "load_corpus", "split_documents", "split_of"]
