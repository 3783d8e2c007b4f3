"""Corpora: the built-in offline one (the Python standard library's own sources), local text
files or folders, and Hugging Face ``datasets`` names when the network allows."""

from __future__ import annotations

import dataclasses
import os
import random
import sysconfig
from pathlib import Path
from typing import List, Optional

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".csv", ".html", ".tex", ".c", ".h", ".rs")


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: its text, a source label (for specialisation reports) and a name."""

    text: str
    source: str
    name: str


def _take(docs: List[Document], max_bytes: Optional[int], seed: int) -> List[Document]:
    """A seeded random subset of whole documents holding at most ``max_bytes`` of UTF-8 text."""
    docs = sorted(docs, key=lambda d: d.name)
    random.Random(seed).shuffle(docs)
    if max_bytes is None:
        return docs
    out, used = [], 0
    for doc in docs:
        n = len(doc.text.encode("utf-8"))
        if used + n > max_bytes:
            continue
        out.append(doc)
        used += n
    return out


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def stdlib_corpus(max_bytes: Optional[int] = 4_000_000, seed: int = 0, include_tests: bool = False,
                  max_doc_bytes: int = 100_000) -> List[Document]:  # fmt: skip
    """The standard library's ``.py`` files (no site-packages; no test suites unless asked; no
    file over ``max_doc_bytes``, which leaves out generated tables such as ``pydoc_data``).

    The source of a document is its top-level package (``asyncio``, ``email``, ...) or
    ``"modules"`` for top-level modules. The exact corpus depends on the Python version, which
    run reports record.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        skip = {"site-packages", "dist-packages", "__pycache__"} | (set() if include_tests else {"test", "tests", "idle_test"})
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            text = _read(Path(dirpath) / name)
            if text and len(text.encode("utf-8")) <= max_doc_bytes:
                source = rel.parts[0] if rel.parts else "modules"
                docs.append(Document(text, source, str(rel / name)))
    if not docs:
        raise RuntimeError(f"no standard-library sources found under {root}")
    return _take(docs, max_bytes, seed)


def text_corpus(path: str, max_bytes: Optional[int] = None, seed: int = 0) -> List[Document]:
    """A text file (one document) or a folder (each text file below it is a document; the
    source is its first sub-folder)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"corpus path does not exist: {path}")
    if p.is_file():
        text = _read(p)
        if text is None:
            raise ValueError(f"corpus file is not UTF-8 text: {path}")
        return [Document(text, p.stem, p.name)]
    docs = []
    for f in sorted(p.rglob("*")):
        if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES:
            text = _read(f)
            if text:
                rel = f.relative_to(p)
                docs.append(Document(text, rel.parts[0] if len(rel.parts) > 1 else p.name, str(rel)))
    if not docs:
        raise ValueError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under {path}")
    return _take(docs, max_bytes, seed)


def hf_corpus(name: str, split: str = "train", text_field: str = "text", max_bytes: Optional[int] = None, seed: int = 0) -> List[Document]:
    """Documents of a Hugging Face dataset (needs the ``datasets`` package and the network)."""
    try:
        import datasets
    except ImportError as exc:
        raise RuntimeError("Hugging Face corpora need the `datasets` package: pip install datasets") from exc
    ds = datasets.load_dataset(name, split=split, streaming=True)
    docs, used = [], 0
    for i, row in enumerate(ds):
        text = row[text_field]
        used += len(text.encode("utf-8"))
        if max_bytes is not None and used > max_bytes:
            break
        docs.append(Document(text, name, f"{name}/{split}/{i}"))
    return _take(docs, None, seed)


def load_corpus(spec: str, max_bytes: Optional[int] = 4_000_000, seed: int = 0) -> List[Document]:
    """``"stdlib"`` (built-in, offline), ``"hf:NAME"`` (a Hugging Face dataset) or a path."""
    if spec == "stdlib":
        return stdlib_corpus(max_bytes, seed)
    if spec.startswith("hf:"):
        return hf_corpus(spec[3:], max_bytes=max_bytes, seed=seed)
    return text_corpus(spec, max_bytes, seed)
