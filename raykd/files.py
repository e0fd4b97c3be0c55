"""Files that are whole or absent: write to a temporary name beside the target, then rename over it.

A rename within one folder is atomic on POSIX filesystems, so a crash (SIGKILL included) leaves either the
old file or the new one, never a half-written one that a later run would trust. Temporary names start with
a dot and the target's name, so whatever a killed writer left behind is easy to spot (and `build_once`
removes it). Also here: reading a model folder's config.json, the one place raykd parses it, and which of
its files make a tokenizer.

Light: standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# mkdtemp makes a private (0700) folder; model folders are meant to be served (vLLM) and shared.
FOLDER_MODE = 0o755


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` (UTF-8) through a temporary file in the same folder; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a record or manifest from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, data: Any, *, sort_keys: bool = True, newline: bool = False) -> Path:
    """``data`` as indented JSON at ``path``, written atomically (see `write_text_atomic`)."""
    text = json.dumps(data, indent=2, sort_keys=sort_keys) + ("\n" if newline else "")
    return write_text_atomic(path, text)


def write_jsonl_atomic(path: str | Path, rows: Any) -> Path:
    """One JSON object per line, written atomically."""
    return write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


@contextlib.contextmanager
def atomic_folder(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``final``; when the block ends normally it replaces ``final``
    (an existing one is removed first), otherwise it is deleted and ``final`` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    os.chmod(tmp, FOLDER_MODE)
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_once(final: str | Path, build: Callable[[Path], None], *, marker: str) -> bool:
    """Build the cache folder ``final`` once: ``build(tmp)`` fills a temporary folder that is then renamed.

    ``marker`` is a file ``build`` writes last; ``final/marker`` present means the folder is finished. A
    concurrent caller for the same ``final`` waits on a lock file beside it, then finds it built. Temporary
    folders of a build that was killed (SIGKILL skips cleanup) are removed under the lock, where only the
    lock holder writes them. Returns True when this call built it, False when it was already there.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in final.parent.glob(f".{final.name}.*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        if (final / marker).exists():
            return False
        with atomic_folder(final) as tmp:
            build(tmp)
        return True


def read_model_config(folder: str | Path, *, text: bool = True) -> dict[str, Any]:
    """A model folder's config.json as a dict ({} when there is none).

    Multimodal configs keep the language model's settings (vocab_size, max_position_embeddings) under
    ``text_config``: with ``text`` that part is returned, falling back to the top level for keys it lacks;
    ``text=False`` returns the file as it is.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    part = data.get("text_config")
    return {**data, **part} if text and isinstance(part, dict) else data


# One of these makes a tokenizer that transformers can load (tokenizer_config.json alone does not).
TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json")


def has_tokenizer(folder: str | Path) -> bool:
    """Whether a model folder holds its own tokenizer (one of TOKENIZER_CORE)."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_CORE)


__all__ = [
    "TOKENIZER_CORE",
    "atomic_folder",
    "build_once",
    "has_tokenizer",
    "read_model_config",
    "write_json_atomic",
    "write_jsonl_atomic",
    "write_text_atomic",
]
