"""Teacher and student models by hub id or folder, resolved once on the driver into local folders.

    resolve_models(spec)   # before any Ray work: {"teacher": ResolvedModel, "student": ResolvedModel}

A hub id ('Qwen/Qwen3-8B', optionally with `revision`) is fetched with huggingface_hub into the Hugging Face
cache (`$HF_HOME/hub`, or `$HF_HUB_CACHE`): only the files a model needs (config, weights, tokenizer, chat
template, generation config). The result is the snapshot folder of one commit, and from then on every stage
gets that local path, never the id: Ray workers and vLLM engines never reach the hub, and a new upload of the
model cannot change a running sweep. On a cluster HF_HOME must name shared storage (cluster/ sets
/mnt/raykd/huggingface), so every node reads the one copy the driver fetched. With HF_HUB_OFFLINE=1 the cache
alone is used.

Every problem (a hub id that does not resolve, a revision that does not exist, a folder or snapshot without
weights or without a tokenizer) is reported at once, each naming the spec key and the fix, before anything
starts. `check_models(spec)` does the same for `--dry-run` without downloading: from the cache, or from the
hub's file listing.

Credentials: HF_TOKEN is read by huggingface_hub on the driver only, where models are downloaded. It is never
put into a Ray runtime_env: Ray keeps a job's and each task's runtime_env in its state (the dashboard's job
page and `ray list jobs/tasks --detail` show env_vars), so a token there is readable by anyone who reaches the
dashboard. Workers need no token (they read local snapshots); where something on a node must reach the hub,
give the nodes the token in their own environment (a secret) or as `$HF_HOME/token` on the shared storage.
`forwarded_env()` lists the non-secret settings that do travel.

Imports only the standard library (and raykd.files, which does too) at module level; huggingface_hub (light,
no torch) inside functions.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raykd.files import TOKENIZER_CORE, has_tokenizer

# The files a model needs to be loaded by transformers and vLLM, and nothing else (no README, no ONNX, GGUF or
# other exports, no original checkpoints). Weights come as safetensors, or as PyTorch .bin where a
# repository has no safetensors (fetched in a second pass, so a repository with both is downloaded once).
CONFIG_FILES = ["config.json", "generation_config.json"]
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
]
SAFETENSORS = ["*.safetensors", "*.safetensors.index.json"]
TORCH_BIN = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
REMOTE_CODE = ["*.py"]  # only with trust_remote_code

# Hugging Face settings every Ray process gets from the driver (cache location, offline mode, endpoint).
HF_ENV = (
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_ENDPOINT",
    "HF_HUB_DISABLE_TELEMETRY",
    "HF_XET_CACHE",
)
# Secrets: read where they are set, never copied into a runtime_env, a log, a result or a checkpoint.
HF_SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_TRUE = {"1", "ON", "YES", "TRUE"}


class ModelError(ValueError):
    """Models that cannot be used; `problems` lists each as 'spec.key: what is wrong; fix'."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"{len(problems)} model problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class ResolvedModel:
    """One model as the run uses it: ``path`` is a local folder (None only when `check_models` found a hub
    id on the hub that is not downloaded yet); ``revision`` is the hub commit (None for a folder)."""

    role: str  # "teacher" or "student": the spec section
    name: str  # as the spec names it (hub id or absolute folder)
    path: str | None
    revision: str | None = None
    note: str | None = None  # what a dry run could not check

    @property
    def label(self) -> str:
        """'org/name@<commit>' for a hub model, the folder for a local one (results and logs)."""
        return f"{self.name}@{self.revision}" if self.revision else self.name


def resolve_models(spec: Any, download: bool = True) -> dict[str, ResolvedModel]:
    """The spec's teacher and student as local folders ({} for the embedded pair); ModelError lists every
    problem of both. ``download=False`` (the dry run) fetches nothing (see `check_models`)."""
    if spec.teacher.model == "embedded":
        return {}
    resolved, problems = {}, []
    for role in ("teacher", "student"):
        try:
            resolved[role] = resolve_model(role, getattr(spec, role), download)
        except ModelError as error:
            problems += error.problems
    if problems:
        raise ModelError(problems)
    return resolved


def check_models(spec: Any) -> dict[str, ResolvedModel]:
    """What `--dry-run` can check cheaply: folders' files; hub ids in the cache, or else on the hub (its file
    listing, no download). Raises ModelError like `resolve_models`."""
    return resolve_models(spec, download=False)


def check_pair(spec: Any, resolved: dict[str, ResolvedModel]) -> None:
    """The resolved teacher and student as one run needs them, on the driver before Ray starts: one
    vocabulary and a chat template to render the prompts with (raykd.traces.checks.pair_problems; the
    sweep's generation does not check them again). Raises ModelError listing both problems. Loads the two
    tokenizers (transformers, which imports torch), so the dry run, which must stay light, leaves this to
    the run."""
    if not resolved:
        return  # the embedded pair shares one tokenizer with a ChatML template by construction
    from raykd.traces.checks import pair_problems

    teacher, student = resolved["teacher"].path, resolved["student"].path
    _raise(pair_problems(teacher, student, teacher, spec.teacher.trust_remote_code))


def resolve_model(role: str, model: Any, download: bool = True) -> ResolvedModel:
    """``model``: raykd.spec.ModelSpec (already through raykd.spec.resolve_paths: a folder is absolute)."""
    name, revision = model.model, model.revision
    folder = Path(name).expanduser()
    if folder.is_dir():
        if revision is not None:
            raise ModelError(
                [
                    f"{role}.revision: {revision!r} is set but {role}.model names a local folder ({name}); "
                    "revisions select hub commits, so drop revision or name a hub id"
                ]
            )
        _raise(folder_problems(folder, f"{role}.model", f"the folder {name}"))
        return ResolvedModel(role, name, str(folder))
    if not _HUB_ID.match(name) or name.startswith((".", "~")):
        raise ModelError(
            [f"{role}.model: no such model folder: {name}; give an existing folder or a hub id (org/name)"]
        )
    patterns = CONFIG_FILES + TOKENIZER_FILES + (REMOTE_CODE if model.trust_remote_code else [])
    if not download and not _offline():
        cached = _cached_snapshot(role, name, revision, patterns)
        return cached or _listed_on_hub(role, name, revision)
    path = _snapshot(role, name, revision, patterns + SAFETENSORS, download)
    if not weight_files(Path(path)):  # no safetensors: the PyTorch .bin of the same commit
        path = _snapshot(role, name, Path(path).name, patterns + TORCH_BIN, download, revision)
    snapshot = Path(path)
    where = f"the hub model {name} at commit {snapshot.name} (cached in {snapshot})"
    _raise(folder_problems(snapshot, f"{role}.model", where, hub=True))
    return ResolvedModel(role, name, str(snapshot), snapshot.name)


def folder_problems(folder: Path, key: str, where: str, hub: bool = False) -> list[str]:
    """What a model folder lacks to be loaded: config.json, weights (every shard an index names), a
    tokenizer."""
    fix = (
        "the snapshot is incomplete or the repository lacks it: fetch it again with network access, or name "
        "another repository or revision"
        if hub
        else "name a Hugging Face model folder (save_pretrained writes all of these)"
    )
    problems = []
    if not (folder / "config.json").is_file():
        problems.append(f"{key}: {where} has no config.json; {fix}")
    if not weight_files(folder):
        problems.append(f"{key}: {where} has no weights (*.safetensors or pytorch_model*.bin); {fix}")
    missing = missing_shards(folder)
    if missing:
        problems.append(f"{key}: {where} lacks weight shard(s) {missing[:3]} its index names; {fix}")
    if not has_tokenizer(folder):
        problems.append(f"{key}: {where} has no tokenizer ({', '.join(TOKENIZER_CORE)}); {fix}")
    return problems


def weight_files(folder: Path) -> list[Path]:
    """The weight files in ``folder`` (a broken cache symlink, whose blob is missing, does not count)."""
    found = [p for pattern in ("*.safetensors", "pytorch_model*.bin") for p in folder.glob(pattern)]
    return sorted(p for p in found if p.is_file())


def missing_shards(folder: Path) -> list[str]:
    """Shards a weight index (model.safetensors.index.json, pytorch_model.bin.index.json) names but the
    folder lacks: an interrupted download of a large model."""
    missing: set[str] = set()
    for index in folder.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError):
            continue
        missing |= {s for s in shards if not (folder / s).is_file()}
    return sorted(missing)


def hub_snapshot(path: str | Path) -> tuple[str, str] | None:
    """(repo id, commit) when ``path`` is a snapshot folder of the hub cache
    (.../models--ORG--NAME/snapshots/<commit>), else None."""
    path = Path(path)
    repo = path.parent.parent.name
    if path.parent.name != "snapshots" or not repo.startswith("models--") or not _COMMIT.match(path.name):
        return None
    return repo.removeprefix("models--").replace("--", "/"), path.name


def content_id(path: str) -> str:
    """What names a model in a content key: 'hub:org/name@<commit>' for a hub snapshot (a commit fixes
    every file), the content fingerprint for a folder, the bare string when it is neither."""
    from raykd.traces.store import fingerprint_path

    snapshot = hub_snapshot(path)
    if snapshot is not None:
        return f"hub:{snapshot[0]}@{snapshot[1]}"
    return fingerprint_path(path) if Path(path).exists() else path


def describe_models(resolved: dict[str, ResolvedModel]) -> str:
    """Lines for the dry run: where each model comes from and at which commit."""
    lines = []
    for model in resolved.values():
        if model.note:
            state = f"not checked: {model.note}; the run fetches it before starting"
        elif model.path is None:
            state = f"on the hub at commit {model.revision}; the run downloads it into {hub_cache()}"
        elif model.revision:
            state = f"cached at commit {model.revision} ({model.path})"
        else:
            state = "local folder"
        lines.append(f"{model.role}.model: {model.name}: {state}")
    return "\n".join(lines)


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The Hugging Face settings set here that Ray processes should share (never a token)."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in HF_ENV if k in environ}


def hub_cache() -> Path:
    """The hub cache by huggingface_hub's own rules, read from the environment now (its constants are read
    once at import, which may have happened before a test or caller set HF_HOME)."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


# --- the hub ----------------------------------------------------------------------------------------------


def _offline() -> bool:
    return any(os.environ.get(k, "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _raise(problems: list[str]) -> None:
    if problems:
        raise ModelError(problems)


def _snapshot(
    role: str,
    name: str,
    revision: str | None,
    patterns: list[str],
    download: bool,
    asked: str | None = None,
) -> str:
    """snapshot_download of ``patterns`` into the hub cache (cache only when offline or not ``download``);
    hub errors become ModelError naming the spec key. ``asked``: the revision the spec gave, for messages."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return snapshot_download(
            name,
            revision=revision,
            allow_patterns=patterns,
            cache_dir=hub_cache(),
            local_files_only=_offline() or not download,
        )
    except HFValidationError as error:
        raise ModelError([f"{role}.model: {name!r} is not a valid hub id ({error}); use org/name"]) from None
    except Exception as error:
        raise ModelError([_hub_problem(role, name, asked or revision, error)]) from None


def _hub_problem(role: str, name: str, revision: str | None, error: Exception) -> str:
    """One line for a hub error: which key, what happened, the fix."""
    from huggingface_hub.errors import (
        GatedRepoError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = revision or "main"
    cache = hub_cache()
    if isinstance(error, RevisionNotFoundError):
        return (
            f"{role}.revision: {rev!r} does not exist in the hub repository {name}; give one of its "
            "branches, tags or commits"
        )
    if isinstance(error, GatedRepoError):
        return (
            f"{role}.model: {name} is gated; accept its terms on the hub with your account and set HF_TOKEN "
            "(in the driver's environment) to a token of that account"
        )
    if isinstance(error, RepositoryNotFoundError):
        return (
            f"{role}.model: no hub model {name!r} (not found, or private and HF_TOKEN is unset or has no "
            "access); check the id, or set HF_TOKEN"
        )
    if isinstance(error, IncompleteSnapshotError):
        return (
            f"{role}.model: the cached snapshot of {name} (revision {rev!r}) in {cache} is incomplete; "
            "fetch it again with network access (unset HF_HUB_OFFLINE)"
        )
    if isinstance(error, LocalEntryNotFoundError):
        return _not_cached(role, name, revision, cache)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{role}.model: resolving {name} (revision {rev!r}) failed: {first[:300]}"


def _not_cached(role: str, name: str, revision: str | None, cache: Path) -> str:
    """The hub was not asked (offline) or not reached, and the cache lacks the model or the revision."""
    repo = cache / ("models--" + name.replace("/", "--"))
    why = "HF_HUB_OFFLINE is set" if _offline() else "the hub could not be reached"
    if repo.is_dir() and revision is not None:
        cached = sorted(p.name for p in (repo / "refs").glob("*")) + sorted(
            p.name[:12] for p in (repo / "snapshots").glob("*")
        )
        return (
            f"{role}.revision: {revision!r} of {name} is not in the Hugging Face cache {cache} and {why} "
            f"(cached: {', '.join(cached) or 'nothing'}); give a cached revision, or fetch it with network "
            "access"
        )
    return (
        f"{role}.model: {name!r} is neither a local folder nor a hub model in the Hugging Face cache "
        f"{cache}, and {why}; fetch it once with network access (`hf download {name}` with the same "
        "HF_HOME), point HF_HOME at the cache that holds it, or name a folder"
    )


def _cached_snapshot(role: str, name: str, revision: str | None, patterns: list[str]) -> ResolvedModel | None:
    """The dry run's first look: the model as the cache holds it, or None when it is not cached."""
    try:
        path = _snapshot(role, name, revision, patterns, download=False)
    except ModelError:
        return None
    snapshot = Path(path)
    where = f"the hub model {name} at commit {snapshot.name} (cached in {snapshot})"
    _raise(folder_problems(snapshot, f"{role}.model", where, hub=True))
    return ResolvedModel(role, name, str(snapshot), snapshot.name)


def _listed_on_hub(role: str, name: str, revision: str | None) -> ResolvedModel:
    """The dry run's second look, for a model not cached yet: the hub's file listing at the revision."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = HfApi().model_info(name, revision=revision)
    except HfHubHTTPError as error:  # the hub answered: not found, gated, no such revision
        raise ModelError([_hub_problem(role, name, revision, error)]) from None
    except Exception as error:  # no answer (no network): the run itself will fetch it, or say why not
        note = f"not in the cache {hub_cache()} and the hub could not be reached ({type(error).__name__})"
        return ResolvedModel(role, name, None, None, note)
    files = {s.rfilename for s in info.siblings or []}
    where = f"the hub model {name} at commit {info.sha}"
    problems = []
    if "config.json" not in files:
        problems.append(f"{role}.model: {where} has no config.json; name another repository or revision")
    if not any(f.endswith(".safetensors") or re.match(r"pytorch_model.*\.bin$", f) for f in files):
        problems.append(f"{role}.model: {where} has no weights (*.safetensors or pytorch_model*.bin)")
    if not files & set(TOKENIZER_CORE):
        problems.append(f"{role}.model: {where} has no tokenizer ({', '.join(TOKENIZER_CORE)})")
    _raise(problems)
    return ResolvedModel(role, name, None, info.sha)
