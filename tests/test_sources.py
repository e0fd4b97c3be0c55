"""Problem files (JSONL, Parquet, datasets folders), trace datasets, GSM problems, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raykd.problems.sources import (
    ProblemFileError,
    gsm_problems,
    load_problems,
    load_trace_dataset,
    save_problems,
)
from raykd.problems.tasks import Problem, make_problems

ROWS = [
    {"question": "What is 1/2 + 1/4?", "solution": "\\frac{3}{4}", "uid": "q-a"},
    {"question": "How many legs have 3 cats?", "solution": 12, "uid": "q-b"},
    {"question": "Écrivez π à deux décimales.", "solution": "3.14", "uid": "q-c"},
]
EXPECTED = [
    Problem(id="q-a", prompt="What is 1/2 + 1/4?", answer="\\frac{3}{4}"),
    Problem(id="q-b", prompt="How many legs have 3 cats?", answer="12"),
    Problem(id="q-c", prompt="Écrivez π à deux décimales.", answer="3.14"),
]


def _jsonl(path: Path, rows: list[dict], blank_lines: bool = False) -> Path:
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    path.write_text(("\n\n" if blank_lines else "\n").join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", ROWS, blank_lines=True)
    assert load_problems(path, "question", "solution", id_field="uid") == EXPECTED


def test_default_ids_name_the_file_and_row(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "mine.jsonl", ROWS)
    assert [p.id for p in load_problems(path, "question", "solution")] == ["mine-0", "mine-1", "mine-2"]


def test_parquet(tmp_path: Path) -> None:
    rows = [{**row, "solution": str(row["solution"])} for row in ROWS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    assert load_problems(tmp_path / "p.parquet", "question", "solution", id_field="uid") == EXPECTED


def test_datasets_folder_and_dataset_dict(tmp_path: Path) -> None:
    import datasets

    rows = [{**row, "solution": str(row["solution"])} for row in ROWS]
    single = datasets.Dataset.from_list(rows)
    single.save_to_disk(str(tmp_path / "single"))
    assert load_problems(tmp_path / "single", "question", "solution", id_field="uid") == EXPECTED

    datasets.DatasetDict({"train": single, "test": single.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert load_problems(tmp_path / "dict", "question", "solution", "uid", split="test") == EXPECTED[:1]
    with pytest.raises(ProblemFileError, match=r"splits \['test', 'train'\]: pass split="):
        load_problems(tmp_path / "dict", "question", "solution")


def test_save_then_load_round_trip(tmp_path: Path) -> None:
    problems = make_problems("cups", "eval", 20, seed=0)
    path = save_problems(tmp_path / "out" / "cups.jsonl", problems)
    assert load_problems(path, id_field="id") == problems
    assert [p.name for p in path.parent.iterdir()] == ["cups.jsonl"]  # no temporary file left


# --- bad input: each error names the file, the row and the field ----------------------------------------


def test_missing_field(tmp_path: Path) -> None:
    rows = [ROWS[0], {"question": "no answer here", "uid": "q-x"}]
    path = _jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(ProblemFileError) as caught:
        load_problems(path, "question", "solution")
    assert str(caught.value).startswith(f"{path}: row 1, field 'solution': missing field")
    assert (caught.value.row, caught.value.field) == (1, "solution")


def test_missing_field_parquet(tmp_path: Path) -> None:
    pq.write_table(pa.Table.from_pylist([{"question": "q", "solution": None}]), tmp_path / "p.parquet")
    with pytest.raises(
        ProblemFileError, match=r"p\.parquet: row 0, field 'solution': expected text, got NoneType"
    ):
        load_problems(tmp_path / "p.parquet", "question", "solution")
    with pytest.raises(
        ProblemFileError, match=r"row 0, field 'prompt': missing field \(fields present: question"
    ):
        load_problems(tmp_path / "p.parquet", "prompt", "solution")


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.parquet"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(ProblemFileError, match=rf"^{path}: "):
        load_problems(path)


def test_only_blank_lines_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "blank.jsonl"
    path.write_text("\n  \n\n")
    with pytest.raises(ProblemFileError, match="holds no rows"):
        load_problems(path)


def test_empty_parquet_table(tmp_path: Path) -> None:
    schema = pa.schema([("prompt", pa.string()), ("answer", pa.string())])
    pq.write_table(schema.empty_table(), tmp_path / "none.parquet")
    with pytest.raises(ProblemFileError, match=r"none\.parquet: the file holds no rows"):
        load_problems(tmp_path / "none.parquet")


def test_not_utf8_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"prompt": "fine", "answer": "1"}).encode()
    bad = '{"prompt": "caf\u00e9 au lait", "answer": "2"}'.encode("latin-1")  # é as the single byte 0xe9
    path.write_bytes(good + b"\n" + bad + b"\n")
    with pytest.raises(ProblemFileError) as caught:
        load_problems(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: row 1, field 'prompt': line 2: bytes that are not UTF-8 (b'\\xe9'")


def test_not_utf8_parquet_binary_column(tmp_path: Path) -> None:
    table = pa.table({"prompt": pa.array([b"ok", b"\xff\xfe"], pa.binary()), "answer": ["1", "2"]})
    pq.write_table(table, tmp_path / "bin.parquet")
    with pytest.raises(
        ProblemFileError, match=r"bin\.parquet: row 1, field 'prompt': bytes that are not UTF-8"
    ):
        load_problems(tmp_path / "bin.parquet")


def test_other_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n')
    with pytest.raises(ProblemFileError, match=r"row 1: line 2 is not valid JSON"):
        load_problems(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(ProblemFileError, match=r"row 0: line 1 is a JSON list, not an object"):
        load_problems(path)
    path.write_text('{"prompt": "  ", "answer": "1"}\n')
    with pytest.raises(ProblemFileError, match=r"row 0, field 'prompt': empty text"):
        load_problems(path)
    _jsonl(path, [{"prompt": "a", "answer": "1", "k": "x"}, {"prompt": "b", "answer": "2", "k": "x"}])
    with pytest.raises(ProblemFileError, match=r"row 1, field 'k': duplicate id 'x'"):
        load_problems(path, id_field="k")


def test_unknown_format_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("prompt,answer\na,1\n")
    with pytest.raises(ProblemFileError, match="unknown format"):
        load_problems(tmp_path / "p.csv")
    with pytest.raises(ProblemFileError, match="no such file"):
        load_problems(tmp_path / "absent.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ProblemFileError, match=r"not a datasets\.save_to_disk folder"):
        load_problems(tmp_path / "folder")


# --- trace datasets ---------------------------------------------------------------------------------------

THOUGHT = "Let me add: 1/2 = 2/4, so 2/4 + 1/4 = 3/4."
SOLUTION = "The sum is $\\boxed{\\frac{3}{4}}$."
ASSISTANT = (
    f"<|begin_of_thought|>\n\n{THOUGHT}\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n{SOLUTION}\n\n"
    "<|end_of_solution|>"
)
STRATOS_ROW = {
    "system": "Your role as an assistant involves thoroughly exploring questions...",
    "conversations": [
        {"from": "user", "value": "What is 1/2 + 1/4?"},
        {"from": "assistant", "value": ASSISTANT},
    ],
}


def test_trace_dataset_jsonl_and_parquet(tmp_path: Path) -> None:
    _jsonl(tmp_path / "t.jsonl", [STRATOS_ROW])
    pq.write_table(pa.Table.from_pylist([STRATOS_ROW]), tmp_path / "t.parquet")
    for path in (tmp_path / "t.jsonl", tmp_path / "t.parquet"):
        (trace,) = load_trace_dataset(path)
        assert trace["prompt"] == "What is 1/2 + 1/4?"
        assert trace["completion"] == ASSISTANT
        assert trace["thought"] == THOUGHT and trace["solution"] == SOLUTION
        assert trace["answer"] == "\\frac{3}{4}"
        start, end = trace["cot_span"]
        assert ASSISTANT[start:end].startswith("<|begin_of_thought|>")
        assert ASSISTANT[start:end].endswith("<|end_of_thought|>")
        assert trace["answer_span"] == (end, len(ASSISTANT))
        assert trace["think_completion"] == f"<think>\n{THOUGHT}\n</think>\n\n{SOLUTION}"
        assert trace["system"].startswith("Your role") and trace["id"] == f"{path.stem}-0"


def test_trace_dataset_sharegpt_roles(tmp_path: Path) -> None:
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ASSISTANT}]}
    (trace,) = load_trace_dataset(_jsonl(tmp_path / "t.jsonl", [row]))
    assert trace["prompt"] == "q" and trace["system"] is None


def test_trace_dataset_bad_rows(tmp_path: Path) -> None:
    no_markers = {"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "just 4"}]}
    no_answer = {"conversations": [{"from": "user", "value": "q"}]}
    empty_value = {"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": ""}]}
    cases = [
        ({"messages": []}, r"row 1, field 'conversations': missing or not a list"),
        (no_markers, r"row 1, field 'conversations': assistant text lacks <\|begin_of_thought\|>"),
        (no_answer, r"row 1, field 'conversations': no turn from assistant or gpt"),
        (empty_value, r"row 1, field 'conversations\[1\].value': missing or empty text"),
    ]
    for bad, pattern in cases:
        path = _jsonl(tmp_path / "t.jsonl", [STRATOS_ROW, bad])
        with pytest.raises(ProblemFileError, match=rf"^{path}: {pattern}"):
            load_trace_dataset(path)


# --- reasoning-gym GSM ------------------------------------------------------------------------------------


def test_gsm_problems() -> None:
    pytest.importorskip("reasoning_gym")
    train = gsm_problems("train", 30, seed=0)
    held_out = gsm_problems("eval", 10, seed=0)
    assert train == gsm_problems("train", 30, seed=0)
    assert len({p.prompt for p in train}) == 30 and len(held_out) == 10
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}
    assert all(p.answer.lstrip("-").isdigit() for p in train + held_out)
    assert len({p.id for p in train + held_out}) == 40 and train[0].id.startswith("gsm-")
