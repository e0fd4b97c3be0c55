"""Checks of the teacher/student pair, before any generation: one vocabulary, a chat template to render with.

What an engine itself needs (a model folder, a context that fits, GPUs) is `raykd.engine.checks`. Reads only
config and tokenizer files (transformers' tokenizer loader), never weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raykd.chat import load_tokenizer
from raykd.engine.checks import SetupError
from raykd.files import TOKENIZER_CORE, has_tokenizer, read_model_config


def pair_problems(
    teacher: str, student: str, tokenizer: str | None = None, trust_remote_code: bool = False
) -> list[str]:
    """Every reason the pair cannot be distilled (`check_vocabulary`, `check_chat_template`), one message
    each; a tokenizer transformers cannot load is one too. The one place both checks run from: the sweep's
    driver before Ray (raykd.models.check_pair), or `generate_traces` when its caller names the student."""
    tokenizer = tokenizer or teacher
    problems = []
    for check, args in (
        (check_vocabulary, (teacher, student, tokenizer)),
        (check_chat_template, (tokenizer, student, teacher)),
    ):
        try:
            check(*args, trust_remote_code)
        except (ValueError, OSError) as error:
            problems.append(str(error))
    return problems


def check_vocabulary(
    teacher: str, student: str, tokenizer: str | None = None, trust_remote_code: bool = False
) -> None:
    """Refuse a teacher/student pair whose token ids mean different things: KD compares them id by id.

    Over every id the teacher's tokenizer (``tokenizer``, default the teacher's folder) can emit, the
    student's tokenizer must hold the same token; the student's embedding needs a row for the largest. The
    embedding sizes may differ (models pad them: Qwen2.5-7B has 152064 rows, 0.5B 151936, one tokenizer). A
    student folder without tokenizer files is checked on its rows only (it is trained and saved with the
    teacher's tokenizer). Reads tokenizers and config.json, never weights.
    """
    t_vocab = _teacher_tokenizer(tokenizer or teacher, teacher, trust_remote_code).get_vocab()
    s_vocab = load_tokenizer(student, trust_remote_code).get_vocab() if has_tokenizer(student) else None
    pair = f"student.model {student} does not share the vocabulary of teacher.model {teacher}"
    fix = "distillation compares token ids: pick a student of the teacher's family (one tokenizer)"
    if s_vocab is not None:
        differ = _differing_ids(t_vocab, s_vocab)
        if differ:
            first = "; ".join(
                f"id {i}: {t!r} for the teacher, {s!r} for the student" for i, t, s in differ[:3]
            )
            raise SetupError(f"{pair}: {len(differ)} id(s) map to other tokens, first {first}; {fix}")
    rows = read_model_config(student).get("vocab_size")
    top = max(t_vocab.values())
    if rows is not None and top >= rows:
        raise SetupError(
            f"{pair}: the teacher's tokenizer emits ids up to {top} but the student's embedding has {rows} "
            f"rows (config.json vocab_size); {fix}"
        )


def _teacher_tokenizer(source: str, teacher: str, trust_remote_code: bool) -> Any:
    if not has_tokenizer(source):
        raise SetupError(
            f"teacher.model {teacher}: no tokenizer files in {source} ({', '.join(TOKENIZER_CORE)}); "
            "give a model folder that holds its tokenizer"
        )
    return load_tokenizer(source, trust_remote_code)


def _differing_ids(teacher: dict[str, int], student: dict[str, int]) -> list[tuple[int, str, str | None]]:
    """(id, teacher token, student token or None) for every teacher id the student reads otherwise, by id."""
    by_id = {i: token for token, i in student.items()}
    return sorted((i, token, by_id.get(i)) for token, i in teacher.items() if by_id.get(i) != token)


def check_chat_template(
    tokenizer: str, student: str | None, teacher: str | None = None, trust_remote_code: bool = False
) -> None:
    """Every prompt is rendered with the teacher's chat template, which the student then learns and is saved
    and evaluated with; a base student without one is fine, a teacher without one is refused."""
    if _teacher_tokenizer(tokenizer, teacher or tokenizer, trust_remote_code).chat_template:
        return
    student_has = student is not None and has_tokenizer(student)
    student_has = student_has and bool(load_tokenizer(student, trust_remote_code).chat_template)
    where = f"teacher.model {teacher or tokenizer} has no chat template"
    if student_has:
        raise SetupError(
            f"{where} (student.model {student} has one): raykd renders the traces, the trained student and "
            "its evaluation with the teacher's template; add a chat_template to the teacher's "
            "tokenizer_config.json (the student's, if that is the format you want) or use an instruct teacher"
        )
    raise SetupError(
        f"{where}, nor has student.model {student}: the traces need a chat format for their prompts; "
        "use an instruct teacher (its tokenizer_config.json holds a chat_template) or add one to it"
    )


@dataclass(frozen=True)
class TeacherRows:
    """A teacher's embedding rows against its tokenizer: ``tokens`` the ids the tokenizer holds, ``padding``
    the rows it does not (both sorted)."""

    tokens: list[int]
    padding: list[int]


def teacher_rows(tokenizer: str, teacher: str, trust_remote_code: bool = False) -> TeacherRows | None:
    """Which of the teacher's rows are tokens, None when its config.json names no vocab_size.

    Models pad their embeddings past the tokenizer (Qwen3-8B: 151936 rows, 151669 tokens). vLLM samples
    over every row, and an untrained padding row can win: its id decodes to nothing and is past a smaller
    student's embedding. Generation masks those rows out of sampling (`raykd.traces.pipeline.sampling_params`)
    after vLLM has taken the logprobs (raw_logprobs), so the cached top-k still shows them; the KD loss drops
    them (`raykd.kd.teachers.shared_rows`).
    """
    rows = read_model_config(teacher).get("vocab_size")
    if rows is None:
        return None
    held = set(_teacher_tokenizer(tokenizer, teacher, trust_remote_code).get_vocab().values())
    tokens = sorted(i for i in held if 0 <= i < rows)
    return TeacherRows(tokens, sorted(set(range(rows)) - held))
