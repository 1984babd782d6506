"""The model card: hub metadata a hub (and a reader) can trust, from a small run summary."""
from __future__ import annotations

import json

import yaml

from sieve_pl.models.loading import hub_id
from sieve_pl.report import model_card

LAYOUT = {"base_model_type": "llama", "ranks": {"model.layers.0.self_attn.q_proj": 8},
          "shapes": {"model.layers.1.mlp.down_proj": [32, 24]}, "heads": {},
          "intermediate_sizes": [48, 24]}


def _summary() -> dict:
    row = {"target_params_kept": 600, "params": 2_000_000}
    return {"strategy": "genetic", "epsilon": 0.05, "relative": True, "target_params": 1000,
            "final": "pruned+lora",
            "rows": {"base": {**row, "target_params_kept": 1000, "validation": 0.8,
                              "test": 0.79, "confirmation": 0.81},
                     "pruned": {**row, "validation": 0.77, "test": 0.75, "confirmation": 0.74},
                     "pruned+lora": {**row, "validation": 0.78, "test": 0.765,
                                     "confirmation": 0.7525}},
            "transfer": {"drug_reviews": {"examples": 16, "base": 0.8, "pruned": 0.7,
                                          "pruned+lora": 0.6875}}}


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_front_matter_holds_the_exported_rows_results():
    card = model_card(_summary(), "HuggingFaceTB/SmolLM2-135M-Instruct", "Classification",
                      "rotten_tomatoes", "Review: {text}\nSentiment:", LAYOUT,
                      repo="me/smol-sieve")
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers" and "sieve-pl" in meta["tags"]
    (index,) = meta["model-index"]
    assert index["name"] == "me/smol-sieve"
    found = {(r["dataset"]["name"], r["dataset"].get("split")): r for r in index["results"]}
    assert set(found) == {("rotten_tomatoes", "validation"), ("rotten_tomatoes", "test"),
                          ("rotten_tomatoes", "confirmation"), ("drug_reviews", None)}
    for (dataset, split), expected in {("rotten_tomatoes", "validation"): 0.78,
                                       ("rotten_tomatoes", "test"): 0.765,
                                       ("rotten_tomatoes", "confirmation"): 0.7525,
                                       ("drug_reviews", None): 0.6875}.items():
        result = found[(dataset, split)]  # the exported row's (pruned+lora), not pruned's
        assert result["task"]["type"] == "text-classification"
        assert result["dataset"]["type"] == dataset
        (metric,) = result["metrics"]
        assert metric["type"] == "accuracy" and metric["value"] == expected
    # the config's standard MLP size and the per-layer widths are explained
    assert "widest MLP the model holds (48 neurons)" in card and "(48, 24)" in card
    assert "AutoTokenizer.from_pretrained(path, trust_remote_code=False)" in card
    assert "**pruned+lora**: 60.0% of the decoder Linear weights kept" in card
    assert "&id" not in card  # plain YAML, no anchors


def test_card_of_a_local_model_names_no_path(tmp_path):
    data = tmp_path / "reviews.csv"
    data.write_text("text,label\n")
    summary = _summary()
    summary["transfer"] = {}
    card = model_card(summary, None, "Generation", str(data), None, LAYOUT, metric="f1")
    meta = _front_matter(card)
    assert "base_model" not in meta and str(tmp_path) not in card
    (index,) = meta["model-index"]
    assert {r["dataset"]["name"] for r in index["results"]} == {"reviews.csv"}
    assert {r["task"]["type"] for r in index["results"]} == {"text-generation"}
    assert {m["type"] for r in index["results"] for m in r["metrics"]} == {"f1"}


def test_hub_id_is_never_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"  # not on this disk
    for path in ("./llama", "/no/such/model", "~/models", "a/b/c"):
        assert hub_id(path) is None
    folder = tmp_path / "org" / "model"  # looks like a hub id, but it is a folder here
    folder.mkdir(parents=True)
    assert hub_id("org/model") is None  # no config.json
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "Qwen/Qwen2.5-0.5B"}))
    assert hub_id("org/model") == "Qwen/Qwen2.5-0.5B"  # what it was downloaded as
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/qwen"}))
    assert hub_id(str(folder)) is None
    (folder / "config.json").write_text("[1, 2]")
    assert hub_id(str(folder)) is None


def test_card_says_how_each_engine_runs_the_formats_written():
    args = (_summary(), None, "Classification", "rotten_tomatoes", None, LAYOUT)
    plain = model_card(*args)
    assert "which vLLM does not load" in plain and "vllm serve" not in plain
    card = model_card(*args, gguf={"model-q8_0.gguf": {"bytes": 2**20, "architecture": "deci"}},
                      decilm={"mlp_widths": [48, 24], "written_widths": [256, 256]},
                      standard=True)
    assert "llama-cli -m model-q8_0.gguf" in card and "architecture `deci`" in card
    assert "vllm serve ../decilm --trust-remote-code" in card and "(256, 256)" in card
    assert "vllm serve ../standard" in card and "which vLLM does not load" not in card
