"""Every bad data file or setting fails as one SieveError line naming it, when first read.

No model weights are loaded here: data files, DataModule settings and a model's config.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sieve_pl.cli import main
from sieve_pl.errors import SieveError
from sieve_pl.models.loading import load_config
from sieve_pl.tasks import SplitSizes, TaskDataModule
from sieve_pl.tasks.sources import check_local_file, load_source

DEMO = str(Path(__file__).parents[1] / "configs" / "demo.yaml")
GOOD = b"".join(json.dumps({"text": f"review {i}", "label": "fresh"}).encode() + b"\n"
                for i in range(5))


def one_line(err: pytest.ExceptionInfo, *names: str) -> str:
    message = str(err.value)
    assert err.type is SieveError and "\n" not in message and message.strip() == message
    for name in names:
        assert name in message, message
    return message


def prepare(source: Path, tokenizer, **kwargs) -> None:
    """What the pipeline does before loading weights: construct, then prepare(tokenizer)."""
    data = TaskDataModule(source=str(source), sizes=SplitSizes(calibration=1, validation=1,
                                                               test=1), **kwargs)
    data.prepare(tokenizer)


@pytest.mark.parametrize("name,content,message", [
    # past the first block of a large file datasets takes this row, to crash at evaluation
    ("late.jsonl", GOOD + b'{"text": "bad \xc3\x28", "label": "rotten"}\n',
     r"line 6: invalid UTF-8"),
    ("bad.csv", b"text,label\nok,fresh\nbad \xff,rotten\n", r"line 3: invalid UTF-8 \(byte 0xff"),
    ("bad.json", b'[{"text": "caf\xe9", "label": "fresh"}]\n', r"line 1: invalid UTF-8"),
    ("empty.jsonl", b"", r"is empty"),
    ("blank.jsonl", b"\n\n  \n", r"is empty"),
    ("empty.csv", b"", r"is empty \(a csv file needs a header and rows\)"),
    ("header.csv", b"text,label\n", r"has a header but no rows"),
    ("extra.csv", b'text,label\n"a, b",fresh\nc,rotten,oops\n',
     r"line 3: 3 values but the header has 2 columns"),
    ("broken.jsonl", GOOD + b'{"text": "x", "label": }\n', r"line 6 column 24: not valid JSON"),
    ("list.jsonl", b'["x", "fresh"]\n', r"line 1: a JSON object per line is needed, got list"),
    ("broken.json", b'[{"text": "a", "label": "fresh"},\n {"text": "b" "label": "x"}]\n',
     r"cannot read data file .*broken.json: "),
])
def test_bad_data_file_is_one_line_naming_it(tmp_path, tokenizer, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SieveError, match=message) as err:
        prepare(path, tokenizer)
    one_line(err, str(path))


def test_bad_row_in_a_local_dataset_folder_is_named(tmp_path):
    folder = tmp_path / "org_reviews"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(GOOD + b'{"text": "\xff"}\n')
    with pytest.raises(SieveError, match="line 6: invalid UTF-8") as err:
        load_source(str(folder), None, "train")
    one_line(err, str(folder / "train.jsonl"))


def test_valid_files_pass_the_check(tmp_path):
    """A BOM, quoted newlines and commas, a field over csv's 128 kB default, short rows and
    blank lines are valid input: the check must not reject what datasets reads."""
    long = "x" * 200_000
    csv_path = tmp_path / "ok.csv"
    csv_path.write_bytes(b'\xef\xbb\xbftext,label\n"line one\nline two, still",fresh\n\n'
                         + f"{long},rotten\nshort\n".encode())
    jsonl_path = tmp_path / "ok.jsonl"
    jsonl_path.write_bytes(GOOD + b"\n")
    for path in (csv_path, jsonl_path):
        check_local_file(path)
    data = load_source(str(csv_path))
    assert data["text"][:2] == ["line one\nline two, still", long] and len(data) == 3
    assert len(load_source(str(jsonl_path))) == 5


@pytest.mark.parametrize("kwargs,message", [
    ({"batch_size": 0}, "data.batch_size must be >= 1, got 0"),
    ({"batch_size": -4}, "data.batch_size must be >= 1, got -4"),
    ({"max_length": 4}, "data.max_length must be >= 8 tokens, got 4"),
])
def test_bad_data_settings_fail_at_construction(kwargs, message):
    with pytest.raises(SieveError, match=message) as err:
        TaskDataModule(**kwargs)
    one_line(err)


def test_bad_data_setting_is_one_cli_line(capsys):
    """The DataModule is built while the config is parsed: jsonargparse passes the error on."""
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", DEMO, "--data.batch_size", "0"])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["sieve-pl: error: data.batch_size must be >= 1, got 0"]


@pytest.mark.parametrize("cls,kwargs,message", [
    ("recover", {"rank": 0}, "recover needs rank >= 1"),
    ("distill", {"temperature": 0}, "distill needs epochs >= 1, lr > 0 and temperature > 0"),
    ("projection", {"ridge": 0}, "projection.ridge must be > 0, got 0"),
    ("run", {"name": "a/b"}, "run.name 'a/b' contains a path separator"),
    ("export", {"push_to_hub": "no-slash"}, "export.push_to_hub must be a repo id"),
    ("lm_eval", {"batch_size": 0}, "lm_eval needs batch_size >= 1"),
    ("search", {"epsilon": 1.5}, r"search.epsilon must be in \(0, 1\), got 1.5"),
    ("quantize", {"examples": -1}, "quantize.examples must be >= 0"),
])
def test_bad_stage_settings_fail_at_construction(cls, kwargs, message):
    from sieve_pl.cli import STAGE_CONFIGS

    with pytest.raises(SieveError, match=message) as err:
        STAGE_CONFIGS[cls](**kwargs)
    one_line(err)


def test_bad_stage_setting_is_one_cli_line(capsys):
    """A stage config is built while the config is parsed: one line, before any work."""
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", DEMO, "--recover.rank", "0"])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["sieve-pl: error: recover needs rank >= 1, epochs >= 1 and lr > 0"]


@pytest.mark.parametrize("content,message", [
    (b'{"model_type": "llama",\n "hidden_size": }\n',
     r"is not valid JSON \(line 2\): Expecting value"),
    (b'{"model_type": "ll\xffama"}', r"is not valid UTF-8 \(byte 0xff at offset 18\)"),
    (b'["llama"]', r"must hold a JSON object, got list"),
])
def test_corrupt_config_json_is_named(tmp_path, content, message):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(SieveError, match=message) as err:
        load_config(str(tmp_path))
    assert one_line(err).startswith(f"{tmp_path / 'config.json'} ")


def test_folder_without_config_json_is_still_not_a_model_folder(tmp_path):
    with pytest.raises(SieveError, match="not a local model folder") as err:
        load_config(str(tmp_path))
    one_line(err, str(tmp_path))
