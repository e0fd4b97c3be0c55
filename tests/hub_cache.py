"""A Hugging Face hub cache built by hand, in the client's own on-disk layout, for offline tests.

    <hub>/models--ORG--NAME/refs/<revision>          the commit sha (no newline), per branch or tag
    <hub>/models--ORG--NAME/snapshots/<sha>/<file>   relative symlinks to ...
    <hub>/models--ORG--NAME/blobs/<sha256 of file>   ... the file contents, stored once

This is what `huggingface_hub.snapshot_download` writes and, with HF_HUB_OFFLINE=1, reads back.
Used by test_models.py.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def repo_folder(hub: Path, repo_id: str) -> Path:
    return hub / ("models--" + repo_id.replace("/", "--"))


def add_model(
    hub: Path,
    repo_id: str,
    folder: Path,
    revision: str = "main",
    skip: tuple[str, ...] = (),
) -> str:
    """Put every file of ``folder`` (but ``skip``) into the cache as one commit of ``repo_id`` named by
    ``revision`` (a branch or tag); returns the commit sha. The sha hashes the files, as a commit would."""
    repo = repo_folder(hub, repo_id)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in skip)
    commit = hashlib.sha1(
        b"".join(p.relative_to(folder).as_posix().encode() + p.read_bytes() for p in files) + repo_id.encode()
    ).hexdigest()
    snapshot = repo / "snapshots" / commit
    for file in files:
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit


def drop_blob(hub: Path, repo_id: str, commit: str, name: str) -> None:
    """Delete the blob behind one snapshot file: the symlink dangles, as after an interrupted download."""
    link = repo_folder(hub, repo_id) / "snapshots" / commit / name
    (link.parent / os.readlink(link)).resolve().unlink()
