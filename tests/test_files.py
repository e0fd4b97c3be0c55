"""raykd.files: atomic writes leave the old file or the new one, folders appear whole, config.json reading."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from raykd import files


def test_json_written_whole_and_no_temporary_left(tmp_path: Path) -> None:
    path = files.write_json_atomic(tmp_path / "sub" / "a.json", {"b": 1, "a": 2})
    assert json.loads(path.read_text()) == {"a": 2, "b": 1}
    assert path.read_text().index('"a"') < path.read_text().index('"b"')  # sorted keys by default
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]
    assert path.stat().st_mode & 0o777 == 0o644


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = files.write_text_atomic(tmp_path / "a.txt", "old")
    with pytest.raises(TypeError):
        files.write_json_atomic(path, {"x": object()})  # not JSON: fails before anything is written
    with pytest.raises(TypeError):
        files.write_text_atomic(path, 3)  # type: ignore[arg-type]  # fails while writing the temporary
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_jsonl(tmp_path: Path) -> None:
    path = files.write_jsonl_atomic(tmp_path / "p.jsonl", [{"id": "é"}, {"id": 2}])
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == [
        {"id": "é"},
        {"id": 2},
    ]


def test_atomic_folder_replaces_on_success_only(tmp_path: Path) -> None:
    final = tmp_path / "model"
    with files.atomic_folder(final) as tmp:
        (tmp / "w.bin").write_text("1")
        assert not final.exists()
    assert (final / "w.bin").read_text() == "1"
    assert final.stat().st_mode & 0o777 == files.FOLDER_MODE
    with pytest.raises(RuntimeError), files.atomic_folder(final) as tmp:
        (tmp / "w.bin").write_text("2")
        raise RuntimeError("build failed")
    assert (final / "w.bin").read_text() == "1"
    with files.atomic_folder(final) as tmp:
        (tmp / "other").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["other"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_build_once_builds_once_under_concurrency(tmp_path: Path) -> None:
    final = tmp_path / "cache" / "models-abc"
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / ".models-abc.killed").mkdir()  # debris of a killed build
    builds: list[int] = []

    def build(folder: Path) -> None:
        builds.append(1)
        (folder / "info.json").write_text("{}")

    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(files.build_once(final, build, marker="info.json")))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and sorted(results) == [False, False, False, True]
    assert (final / "info.json").is_file()
    assert not (tmp_path / "cache" / ".models-abc.killed").exists()


def test_read_model_config(tmp_path: Path) -> None:
    assert files.read_model_config(tmp_path) == {}
    (tmp_path / "config.json").write_text(
        json.dumps({"eos_token_id": 1, "text_config": {"vocab_size": 9, "eos_token_id": 2}})
    )
    assert files.read_model_config(tmp_path)["vocab_size"] == 9
    assert files.read_model_config(tmp_path)["eos_token_id"] == 2
    assert files.read_model_config(tmp_path, text=False)["eos_token_id"] == 1
