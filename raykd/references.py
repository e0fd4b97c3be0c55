"""The teacher's and the base student's scores on every evaluation set: the lines a trained student is read
against in results.md and frontier.png.

Both are measured by the evaluator every trained student goes through (`raykd.evaluate.evaluate_sets`):
prompts rendered with the teacher's chat template, sampling that stops on its end-of-turn token and on the
model's own EOS, each set's own sampling and answer check. A base student without a template is rendered
with the teacher's, as its trained copies are. With no evaluation sets they are measured on the held-out
problems under the `evaluation` settings, except for the embedded pair, which measured itself when it was
built.

Each (model, set, evaluation settings) is kept as one entry under ``<output.dir>/references/``, named by a
hash of what decides it: the model and tokenizer by content, the set's problems by content, its check and
sampling, the evaluator's device. Every sweep under that output.dir shares them, as it shares the traces: a
rerun, or another sweep with the same models and sets, measures nothing, and editing one set measures only
that set again (one engine per model for every set it lacks). The sweep's own ``references.json`` lists the
figures it used; the entries keep their completions beside them, so a figure can be recounted.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from raykd.evalsets import EvalSet
from raykd.files import write_json_atomic
from raykd.report_rows import References

FILE = "references.json"
CACHE = "references"
# Bump when the evaluator changes what it measures (rendering, stop rules, scoring): old entries then miss.
FORMAT = 1
ROLES = ("teacher", "student")
# What results keep of an evaluation (raykd.evaluate.EvalResult).
KEPT = ("accuracy", "stderr", "n_problems", "n_samples", "pass_at_k", "pass_at_k_stderr", "truncated_share")


def reference_sets(spec: Any, eval_sets: list[EvalSet], eval_problems: list[Any]) -> list[EvalSet]:
    """The sets the references are measured on: the evaluation sets, else the held-out problems under the
    `evaluation` settings (named 'heldout', as a trial names them)."""
    if eval_sets:
        return eval_sets
    ev = spec.evaluation
    heldout = EvalSet(
        name="heldout",
        problems=eval_problems,
        check=spec.problems.answer_check,
        samples=ev.samples,
        temperature=ev.temperature,
        top_p=ev.top_p,
        max_tokens=ev.max_tokens,
        source="heldout",
    )
    return [heldout]


def entry_key(spec: Any, role: str, identity: dict[str, str], eval_set: EvalSet) -> dict[str, Any]:
    """Everything one reference figure depends on; ``identity`` is raykd.identity.run_identity's."""
    from raykd.traces.store import problems_digest

    return {
        "format": FORMAT,
        "model": identity[f"{role}.model"],
        "tokenizer": identity["tokenizer"],  # the teacher's: its template renders every prompt
        "trust_remote_code": getattr(spec, role).trust_remote_code,
        "gpus": min(1, spec.generation.gpus_per_engine),  # the evaluator's device, as a trial's
        "set": {
            "problems": problems_digest(eval_set.problems),
            "check": eval_set.check,
            "samples": eval_set.samples,
            "temperature": eval_set.temperature,
            "top_p": eval_set.top_p,
            "max_tokens": eval_set.max_tokens,
        },
    }


def entry_path(cache: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache / f"{digest}.json"


def measure(
    spec: Any,
    models: Any,
    eval_sets: list[EvalSet],
    eval_problems: list[Any],
    out: Path,
    identity: dict[str, str],
) -> References:
    """The teacher's and the base student's results on every set, from the cache or measured now; writes
    ``<out>/references.json``. ``models`` is raykd.run.Models; ``identity`` raykd.identity.run_identity's."""
    sets = reference_sets(spec, eval_sets, eval_problems)
    cache = Path(spec.output.dir).expanduser().resolve() / CACHE
    by_set: dict[str, dict[str, Any]] = {s.name: {} for s in sets}
    for role in ROLES:
        found = lookup(spec, role, identity, sets, cache)
        todo = [s for s in sets if found[s.name] is None]
        if todo:
            _measure_role(spec, role, models, todo, identity, cache, out)
            found = lookup(spec, role, identity, sets, cache)
        for name, result in found.items():
            by_set[name][role] = result
        _log(role, getattr(models, f"{role}_dir"), by_set, len(sets) - len(todo))
    first = by_set[sets[0].name]
    teacher, student = first["teacher"]["accuracy"], first["student"]["accuracy"]
    entries = {
        role: [str(entry_path(cache, entry_key(spec, role, identity, s))) for s in sets] for role in ROLES
    }
    saved = {"teacher_accuracy": teacher, "student_accuracy": student, "sets": by_set, "entries": entries}
    write_json_atomic(out / FILE, saved)
    return References(teacher, student, sets=by_set if eval_sets else {})


def lookup(
    spec: Any, role: str, identity: dict[str, str], sets: list[EvalSet], cache: Path
) -> dict[str, dict[str, Any] | None]:
    """Each set's cached result for ``role``'s model: None where it was never measured under the current
    model, set and settings (a hash collision or a half-copied cache also reads as None)."""
    found: dict[str, dict[str, Any] | None] = {}
    for eval_set in sets:
        key = entry_key(spec, role, identity, eval_set)
        path = entry_path(cache, key)
        saved = json.loads(path.read_text()) if path.is_file() else {}
        found[eval_set.name] = saved["result"] if saved.get("key") == key else None
    return found


def store(cache: Path, key: dict[str, Any], set_name: str, role: str, result: dict[str, Any]) -> Path:
    """One entry: what it was measured under, and its result (``result``: an EvalResult as a dict)."""
    kept = {name: result[name] for name in KEPT} | {"counts": result["counts"]}
    return write_json_atomic(
        entry_path(cache, key), {"key": key, "set": set_name, "role": role, "result": kept}
    )


def _measure_role(
    spec: Any,
    role: str,
    models: Any,
    todo: list[EvalSet],
    identity: dict[str, str],
    cache: Path,
    out: Path,
) -> None:
    """One engine for ``role``'s model over every set it lacks; each set's entry written to the cache, its
    completions first, then its result (which marks it complete)."""
    from raykd.evaluate import evaluate_sets

    cache.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".completions.", dir=cache))
    try:
        results = evaluate_sets(
            getattr(models, f"{role}_dir"),
            todo,
            tokenizer_dir=models.tokenizer_dir,
            gpus=min(1, spec.generation.gpus_per_engine),
            resources=spec.generation.engine_resources,
            trust_remote_code=getattr(spec, role).trust_remote_code,  # the evaluated model's own flag
            log_file=str(out / f"{role}_eval.log"),
            completions_dir=scratch,
        )
        for eval_set in todo:
            key = entry_key(spec, role, identity, eval_set)
            completions = entry_path(cache, key).with_suffix(".completions.jsonl")
            (scratch / f"{eval_set.name}.jsonl").replace(completions)
            store(cache, key, eval_set.name, role, asdict(results[eval_set.name]))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _log(role: str, model_dir: str, by_set: dict[str, dict[str, Any]], cached: int) -> None:
    scores = ", ".join(
        f"{name} {roles[role]['accuracy']:.3f} ± {roles[role]['stderr']:.3f}"
        for name, roles in by_set.items()
    )
    print(f"[raykd] reference {role} {model_dir}: {scores} ({cached} of {len(by_set)} cached)", flush=True)
