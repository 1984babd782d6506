"""lm-evaluation-harness scoring on a local multiple-choice task and a tiny random Llama."""
from __future__ import annotations

import json
import os
import textwrap

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("lm_eval")

from sieve_pl.errors import SieveError  # noqa: E402
from sieve_pl.models.loading import load_model, load_tokenizer  # noqa: E402
from sieve_pl.stages.lm_eval import LmEvalConfig, _metrics, score  # noqa: E402

ROWS = [("The sky is", ["blue", "green"], 0), ("Fire is", ["cold", "hot"], 1),
        ("Snow is", ["white", "black"], 0), ("Two plus two is", ["five", "four"], 1),
        ("The sun rises in the", ["east", "west"], 0), ("Ice is", ["warm", "frozen"], 1)]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A folder holding one local task YAML over a jsonl file (no hub, no network)."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n"
                            for q, c, y in ROWS))
    (folder / "tiny_mc.yaml").write_text(textwrap.dedent(f"""\
        task: sieve_tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: label
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))
    return str(folder)


@pytest.fixture(scope="module")
def tiny(make_tiny_llama):
    path = make_tiny_llama("lm_eval_llama")
    model, _ = load_model(path)
    return model, load_tokenizer(path)


def test_scores_local_task_deterministically(tiny, tasks):
    model, tokenizer = tiny
    config = LmEvalConfig(tasks=["sieve_tiny_mc"], include_path=tasks, batch_size=4)
    config.check()
    first = score(model, tokenizer, config)
    assert "sieve_tiny_mc" in first
    assert 0.0 <= first["sieve_tiny_mc"]["acc"] <= 1.0
    assert all(isinstance(v, float) for v in first["sieve_tiny_mc"].values())
    assert "alias" not in first["sieve_tiny_mc"]
    assert score(model, tokenizer, config) == first
    assert tokenizer.padding_side == "left" and not model.training


def test_rng_state_restored(tiny, tasks):
    import torch

    model, tokenizer = tiny
    config = LmEvalConfig(tasks=["sieve_tiny_mc"], include_path=tasks, limit=2)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    scores = score(model, tokenizer, config)
    assert torch.equal(torch.rand(3), expected)
    assert set(scores) == {"sieve_tiny_mc"}


def test_check_errors(tmp_path, tasks):
    with pytest.raises(SieveError, match="include_path"):
        LmEvalConfig(tasks=["sieve_tiny_mc"], include_path=str(tmp_path / "missing")).check()
    with pytest.raises(SieveError, match="unknown task"):
        LmEvalConfig(tasks=["no_such_task_xyz"], include_path=tasks).check()
    with pytest.raises(SieveError, match="batch_size"):
        LmEvalConfig(tasks=["sieve_tiny_mc"], batch_size=0).check()
    LmEvalConfig().check()  # off: nothing to check, lm_eval not even imported
    assert score(None, None, LmEvalConfig()) == {}


def test_fingerprint(tmp_path, tasks):
    off = LmEvalConfig(batch_size=2).fingerprint()
    assert off == LmEvalConfig(batch_size=16).fingerprint() and "lm_eval_version" not in off
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "t.yaml").write_text("task: a\n")
    config = LmEvalConfig(tasks=["a"], include_path=str(folder))
    before = config.fingerprint()
    assert before["lm_eval_version"] and set(before["include_files"]) == {"t.yaml"}
    (folder / "t.yaml").write_text("task: b\n")
    assert config.fingerprint() != before


def test_check_without_lm_eval(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(SieveError, match=r"pip install 'sieve-pl\[lm-eval\]'"):
        LmEvalConfig(tasks=["hellaswag"]).check()


def test_metrics_keep_numbers_only():
    raw = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A",
                 "exact_match,strict-match": 1, "flag": True}}
    assert _metrics(raw) == {"t": {"acc": 0.5, "exact_match,strict-match": 1.0}}


def test_fit_scores_base_and_export_with_lm_eval(tmp_path, tiny_llama, tasks, capsys):
    """``--lm_eval.tasks`` adds an lm_eval stage: both models scored, shown in the summary."""
    from sieve_pl.cli import main
    from sieve_pl.io import read_json

    args = ["fit", "--model.pretrained", tiny_llama, "--run.root", str(tmp_path),
            "--data.sizes.calibration", "12", "--data.sizes.validation", "10",
            "--data.sizes.test", "10", "--data.batch_size", "5", "--recover.enabled", "false",
            "--trainer.enable_progress_bar", "false", "--lm_eval.tasks", "[sieve_tiny_mc]",
            "--lm_eval.include_path", tasks]
    main(args)
    summary = read_json(tmp_path / "demo" / "summary.json")
    scores = summary["lm_eval"]
    assert set(scores) == {"base", summary["final"]}
    for row in scores.values():
        assert 0 <= row["sieve_tiny_mc"]["acc"] <= 1
    assert "lm-eval sieve_tiny_mc acc: base" in capsys.readouterr().out
    # a summary setting re-runs the summary, not lm_eval, which reads the export only
    stamp = {s: (tmp_path / "demo" / s / "stage.json").stat().st_mtime_ns
             for s in ("export", "evaluate", "lm_eval")}
    main([*args, "--quantize.formats", "[int8]", "--quantize.examples", "2"])
    again = {s: (tmp_path / "demo" / s / "stage.json").stat().st_mtime_ns for s in stamp}
    assert [s for s in stamp if again[s] != stamp[s]] == ["evaluate"]
    assert f"{summary['final']}+int8" in read_json(tmp_path / "demo" / "summary.json")["rows"]
