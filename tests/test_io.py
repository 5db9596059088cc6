"""fastlesson._io: atomic writes, and the one JSON writer every module uses."""

import json

import pytest

from fastlesson._io import write_json


def test_write_json_round_trips_with_indent_and_newline(tmp_path):
    path = write_json(tmp_path / "sub" / "a.json", {"b": [1, 2], "p": tmp_path}, indent=1)
    text = path.read_text()
    assert text.endswith("}\n") and '\n "b": [\n  1,' in text  # indent=1, a trailing newline
    assert json.loads(text) == {"b": [1, 2], "p": str(tmp_path)}  # non-JSON values (paths) as str
    assert write_json(tmp_path / "c.json", {"x": 1}).read_text() == '{\n  "x": 1\n}\n'  # default indent 2


def test_write_json_failure_keeps_the_old_file(tmp_path):
    path = write_json(tmp_path / "a.json", {"old": True})
    with pytest.raises(ValueError):
        write_json(path, {"x": _Unprintable()})
    assert json.loads(path.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary file left


class _Unprintable:
    """Not JSON, and default=str cannot turn it into text either."""

    def __str__(self):
        raise ValueError("cannot serialise")


def test_export_write_json_is_the_shared_one():
    import fastlesson.export as export
    import fastlesson.recipe as recipe

    assert export.write_json is write_json and recipe.write_json is write_json
