"""The CLI end to end: config parsing, one-line errors before heavy work, fit / rerun / test."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from sieve_pl.cli import main
from sieve_pl.io import read_json

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def run_cli(*args):
    try:
        main(list(args))
    except SystemExit as exit_:
        return exit_.code
    return 0


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(config, capsys):
    assert run_cli("fit", "--config", str(config), "--print_config") == 0
    out = capsys.readouterr().out
    for section in ("model:", "data:", "search:", "projection:", "calibration:", "run:"):
        assert section in out


def test_help_documents_options(capsys):
    assert run_cli("fit", "--help") == 0
    out = capsys.readouterr().out
    for option in ("--search.epsilon", "--projection.method", "--data.sizes.calibration",
                   "--model.pretrained", "--run.name", "allowed accuracy loss"):
        assert option in out


# a benchmark figure: a decimal percentage, a before -> after, "x% vs / instead of y", points,
# multiples, "measured on" (figures live in bench/README; help and configs give the why and
# point there). Fractions that define an option ("95% of the base model's") are not figures.
FIGURE = re.compile(r"\d+\.\d+\s*%|\d(\.\d+)?\s*%?\s*(->|→)\s*\d|\d%\s+(vs|instead of)\b"
                    r"|\b\d+(\.\d+)?\s+points\b|\b\d+(\.\d+)?x\s+(the|faster|slower|fewer|more)\b"
                    r"|\bmeasured on\b", re.IGNORECASE)


def test_help_and_shipped_configs_quote_no_benchmark_figures(capsys):
    assert run_cli("fit", "--help") == 0 and run_cli("plan", "--help") == 0
    text = " ".join(capsys.readouterr().out.split())  # help wraps lines anywhere
    assert "--search.epsilon" in text and "--tflops" in text
    found = [m.group(0) for m in FIGURE.finditer(text)]
    assert found == [], [text[max(0, text.find(f) - 80):text.find(f) + 40] for f in found]
    for config in CONFIGS:
        comments = " ".join(line.partition("#")[2].strip()
                            for line in config.read_text().splitlines() if "#" in line)
        assert not FIGURE.search(comments), (config.name,
                                                     FIGURE.search(comments).group(0))
    assert FIGURE.search("it lowers validation 77.0% -> 73.5%, so it is off")
    assert FIGURE.search("for 27% instead of 38% of a naive GA's tokens")
    assert not FIGURE.search("keep validation accuracy >= 95% of the base model's")


@pytest.fixture
def bert_config_only(tmp_path):
    """A folder with a config and no weights: the architecture check must not need weights."""
    from transformers import BertConfig

    BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
               intermediate_size=8).save_pretrained(tmp_path / "bert")
    return str(tmp_path / "bert")


@pytest.mark.parametrize("extra,message", [
    (["--search.epsilon", "1.5"], "search.epsilon must be in (0, 1)"),
    (["--data.task.init_args.text_field", "review"], "dataset has no column 'review'; columns: text, label"),
    (["--data.task.init_args.label_words", "{fresh: ' good', rotten: ' good'}"],
     "are the same tokens"),
    (["--data.sizes.test", "100000"], "but 'rotten_tomatoes' has 12808"),
    (["--model.pretrained", "no-such-org/no-such-model"], "cannot load model 'no-such-org/no-such-model'"),
    (["--data.source", "missing.csv"], "data file 'missing.csv' does not exist"),
    (["--export.push_to_hub", "no repo"], "export.push_to_hub must be a repo id like user/name"),
    (["--export.push_to_hub", "me/model"], "needs the network, but HF_HUB_OFFLINE is set"),
    (["--run.name", "../elsewhere"], "run.name"),
    (["--ckpt_path", "/nonexistent.ckpt"], "--ckpt_path is not used"),
    (["--export.formats", "[hf, standard]"], "export.formats standard needs search.space standard"),
    (["--export.formats", "[gguf]"], "export.formats must list hf"),
    (["--search.space", "standard"], "set search.strategy uniform"),
    (["--search.space", "standard", "--search.strategy", "uniform", "--projection.mlp",
      "factored"], "search.space standard prunes MLP neurons"),
])
def test_bad_input_fails_with_one_line(tmp_path, capsys, extra, message):
    code = run_cli("fit", "--config", str(CONFIGS[0]), "--run.root", str(tmp_path), *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("sieve-pl: error:") and message in err[-1]
    assert not (tmp_path / "demo" / "calibrate").exists()  # failed before any heavy work


@pytest.mark.parametrize("form", ["gguf", "decilm"])
def test_engine_formats_of_other_architectures_fail_before_weights(tmp_path, capsys, form):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")  # no weights
    code = run_cli("fit", "--config", str(CONFIGS[0]), "--run.root", str(tmp_path),
                   "--model.pretrained", str(tmp_path / "gpt2"), "--export.formats",
                   f"[hf, {form}]")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and f"export.formats {form} writes Llama-architecture models" in err[-1]


def test_unsupported_architecture_named_before_weights(tmp_path, capsys, bert_config_only):
    code = run_cli("fit", "--run.root", str(tmp_path), "--model.pretrained", bert_config_only)
    err = capsys.readouterr().err
    assert code == 2 and "unsupported architecture 'bert'" in err and "llama" in err


def test_fit_rerun_skips_and_config_change_reruns_downstream(tmp_path, tiny_llama, capsys):
    args = ["fit", "--model.pretrained", tiny_llama, "--run.root", str(tmp_path),
            "--run.name", "tiny", "--data.sizes.calibration", "12", "--data.sizes.validation",
            "10", "--data.sizes.test", "10", "--data.batch_size", "5", *QUIET,
            "--transfer.sources", "{drug_reviews: {positive: fresh, negative: rotten}}",
            "--transfer.examples", "6", "--projection.attention", "heads"]
    assert run_cli(*args) == 0
    run = tmp_path / "tiny"
    summary = read_json(run / "summary.json")
    cross = summary["transfer"]["drug_reviews"]
    assert cross["examples"] == 6 and {"base", "pruned"} <= cross.keys()
    assert "cross-dataset, drug_reviews (6 examples)" in capsys.readouterr().out
    stages = ["calibrate", "project", "search", "refit", "distill", "recover", "export", "evaluate"]
    first = {s: read_json(run / s / "stage.json")["fingerprint"] for s in stages}
    assert (run / "export" / "model" / "model.safetensors").exists()
    assert (run / "config.yaml").exists()
    assert 0 < summary["rows"]["pruned"]["target_params_kept"] <= summary["target_params"]
    assert summary["units"] == 2 * 2 + 2 * 2  # per layer: MLP neurons, v/o heads, q, k
    capsys.readouterr()

    assert run_cli(*args) == 0  # same command: every stage skipped, same result
    assert read_json(run / "summary.json")["rows"] == summary["rows"]
    mtimes = {s: (run / s / "stage.json").stat().st_mtime_ns for s in stages}
    # a disabled stage's options change nothing (refit and recovery are off here)
    assert run_cli(*args, "--refit.ridge", "0.5", "--recover.rank", "4") == 0
    changed = [s for s in stages if (run / s / "stage.json").stat().st_mtime_ns != mtimes[s]]
    assert not changed

    assert run_cli(*args, "--search.epsilon", "0.3") == 0  # search and later re-run
    after = {s: (run / s / "stage.json").stat().st_mtime_ns for s in stages}
    assert after["calibrate"] == mtimes["calibrate"] and after["project"] == mtimes["project"]
    assert after["search"] != mtimes["search"] and after["evaluate"] != mtimes["evaluate"]
    assert read_json(run / "search" / "stage.json")["fingerprint"] != first["search"]

    # a later split's size touches only the stages that read it (train follows test)
    assert run_cli(*args, "--search.epsilon", "0.3", "--data.sizes.test", "8") == 0
    last = {s: (run / s / "stage.json").stat().st_mtime_ns for s in stages}
    assert all(last[s] == after[s] for s in ("calibrate", "project", "search", "refit"))
    # recovery is off: the train split it would read does not concern it
    assert last["recover"] == after["recover"] and last["evaluate"] != after["evaluate"]
    assert not list(run.glob(".*.tmp"))  # no temporary stage folder left behind

    # a finished run scored on another dataset of the same task, base and pruned side by side
    capsys.readouterr()
    assert run_cli("test", "--config", str(run / "config.yaml"), "--data.source", "drug_reviews",
                   "--data.label_map", "{positive: fresh, negative: rotten}", "--data.sizes",
                   "{calibration: 0, validation: 0, test: 6, train: 0}", *QUIET) == 0
    out = capsys.readouterr().out
    assert "base: test accuracy" in out and "pruned: test accuracy" in out and "(6 examples" in out


def test_recovery_distils_on_the_pool_and_is_judged_on_confirmation(tmp_path, tiny_llama,
                                                                     capsys):
    args = ["fit", "--model.pretrained", tiny_llama, "--run.root", str(tmp_path),
            "--run.name", "tiny", "--data.sizes",
            "{calibration: 12, validation: 10, test: 8, train: 10, confirmation: 12}",
            "--data.batch_size", "5", "--data.pool.sisters", "{drug_reviews: 20}",
            "--transfer.sources", "{drug_reviews: {positive: fresh, negative: rotten}}",
            "--transfer.examples", "6", "--recover.enabled", "true", "--recover.epochs", "1",
            "--recover.steps", "12", "--recover.batch_size", "4", "--recover.lr", "0.005",
            "--search.population", "4", "--search.generations", "1", *QUIET]
    assert run_cli(*args) == 0
    run = tmp_path / "tiny"
    summary = read_json(run / "summary.json")
    rows, recovered = summary["rows"], summary["recover"]
    for row in ("base", "pruned", "pruned+lora", "dense+lora"):
        assert 0 <= rows[row]["confirmation"] <= 1, row
    assert "confirmation" not in rows["uniform"]  # the search's reference points: test only
    # the deliverable was confirmed: at the search's levels the rows are what recovery
    # measured; stepped back, what the step back measured, LoRA still judged on confirmation
    confirmed = summary["confirmation"]
    lora_first = recovered["confirmation_after"] >= recovered["confirmation_before"] - 1e-6
    # the search's levels as exported; stepping back, the recovered model
    assert confirmed["examples"] == 12
    assert confirmed["with_lora"] == (lora_first if confirmed["passed"] else True)
    if confirmed["passed"]:
        assert rows["pruned"]["confirmation"] == recovered["confirmation_before"]
        assert rows["pruned+lora"]["confirmation"] == recovered["confirmation_after"]
        assert confirmed["kept"] == confirmed["searched_kept"]
    else:
        assert confirmed["kept"] > confirmed["searched_kept"]
        assert rows["pruned"]["target_params_kept"] == confirmed["kept"]
    if confirmed["passed"] or confirmed["with_lora"]:
        exported = (rows["pruned+lora"]["confirmation"]
                    >= rows["pruned"]["confirmation"] - 1e-6)
        assert summary["final"] == ("pruned+lora" if exported else "pruned")
    assert recovered["used"] == (summary["final"] == "pruned+lora")
    # 42 pool prompts (12 + 10 + 20 drug reviews) and 10 train examples, by 4: 14 steps
    assert recovered["steps"] == 14 and recovered["epochs"] == 1
    assert len(recovered["train_distill"]) == len(recovered["train_label"]) == 1
    out = capsys.readouterr().out
    assert "| confirmation acc |" in out and "confirmation accuracy" in out
    card = (run / "export" / "model" / "README.md").read_text()
    assert "| model | validation | test | confirmation |" in card
    stage = read_json(run / "recover" / "stage.json")["config"]
    assert stage["data"]["pool"]["held_out"] == {"drug_reviews": 6}
    assert not list(run.glob(".*.work"))  # the dense answers went with the work folder


@pytest.mark.slow
def test_user_logger_gets_search_recovery_and_final_metrics(tmp_path, tiny_llama):
    import csv

    logs = tmp_path / "logs"
    assert run_cli("fit", "--model.pretrained", tiny_llama, "--run.root", str(tmp_path),
                   "--data.sizes", "{calibration: 12, validation: 10, test: 10, train: 10}",
                   "--data.batch_size", "5", "--recover.enabled", "true", "--recover.epochs", "1",
                   "--recover.steps", "0", "--search.population", "4", "--search.generations",
                   "1", "--trainer.logger",
                   f"{{class_path: lightning.pytorch.loggers.CSVLogger, init_args: "
                   f"{{save_dir: {logs}, name: mine}}}}", *QUIET) == 0
    (metrics,) = logs.glob("mine/version_*/metrics.csv")
    with open(metrics) as f:
        columns = set(next(csv.reader(f)))
    assert {"search/best", "search/mean", "search/uniform_keep", "train_loss", "val_acc",
            "final/base/test", "final/pruned/test"} <= columns


def test_search_plots_go_to_loggers_that_take_images(tmp_path):
    from types import SimpleNamespace

    import matplotlib.pyplot as plt
    import numpy as np
    from lightning.pytorch.loggers import CSVLogger

    from sieve_pl.pipeline import Pipeline, RunConfig

    class ImageLogger(CSVLogger):  # W&B's interface: log_image(key, images)
        images: dict = {}

        def log_image(self, key, images, **kwargs):
            self.images[key] = images

    pipeline = Pipeline.__new__(Pipeline)
    pipeline.run = RunConfig(name="run", root=str(tmp_path))
    search = pipeline.run.path / "search"
    search.mkdir(parents=True)
    for name in ("fitness", "levels"):
        plt.imsave(search / f"{name}.png", np.zeros((4, 4, 3)))
    logger, csv = ImageLogger(str(tmp_path)), CSVLogger(str(tmp_path))
    pipeline.trainer = SimpleNamespace(loggers=[logger, csv])
    pipeline._log_plots()
    assert logger.images == {"search/fitness": [str(search / "fitness.png")],
                             "search/levels": [str(search / "levels.png")]}


def test_default_logger_writes_into_the_run_folder(tmp_path, tiny_llama):
    assert run_cli("fit", "--model.pretrained", tiny_llama, "--run.root", str(tmp_path),
                   "--data.sizes", "{calibration: 12, validation: 10, test: 10, train: 0}",
                   "--data.batch_size", "5", "--search.strategy", "uniform", *QUIET) == 0
    assert list((tmp_path / "demo" / "lightning_logs").glob("version_*/metrics.csv"))


def test_measure_writes_one_models_numbers(tmp_path, tiny_llama, capsys):
    """``measure``: one model's accuracy, latency, memory and size as JSON; the export it would
    measure must exist."""
    data = ["--model.pretrained", tiny_llama, "--run.root", str(tmp_path), "--data.sizes",
            "{calibration: 0, validation: 6, test: 8, train: 0}", "--data.batch_size", "4", *QUIET]
    out = tmp_path / "base.json"
    assert run_cli("measure", *data, "--out", str(out), "--examples", "4") == 0
    measured = read_json(out)
    assert measured["test_examples"] == 4 and measured["validation"] is None
    assert measured["disk_mb"] > 0 and measured["latency_ms_per_example"] > 0
    assert "base: test" in capsys.readouterr().out
    assert run_cli("measure", *data, "--out", str(out), "--evaluate", "pruned") == 2
    assert "no exported model" in capsys.readouterr().err


def test_demo_end_to_end_on_real_offline_model(tmp_path, capsys):
    """The real SmolLM2 on Rotten Tomatoes with every stage of the demo config, small splits:
    fit, then `test` reloads the export and agrees; the quantized forms stay close."""
    args = ["--config", str(Path(__file__).parents[1] / "configs" / "demo.yaml"),
            "--run.root", str(tmp_path), "--data.sizes.calibration", "32",
            "--data.sizes.validation", "48", "--data.sizes.test", "48",
            "--data.sizes.train", "32", "--data.sizes.confirmation", "48",
            "--data.pool.sisters", "{drug_reviews: 16}", "--calibration.pool", "16",
            "--search.strategy", "genetic", "--search.population", "6",
            "--search.generations", "2", "--recover.epochs", "1", "--recover.steps", "8",
            "--distill.epochs", "1", "--transfer.examples", "16",
            # 48 validation examples: too few for the confidence bound to allow any cut
            "--search.confidence", "0", "--export.formats", "[hf, gguf]",
            "--export.gguf_types", "[q8_0]", *QUIET]
    assert run_cli("fit", *args) == 0
    run = tmp_path / "demo"
    _llama_cpp_answers_as_the_hf_export(run)
    summary = read_json(run / "summary.json")
    rows = summary["rows"]
    base, uniform, pruned = rows["base"], rows["uniform"], rows["pruned"]
    assert base["validation"] > 0.6  # the task is learnable by the base model
    eps = read_json(run / "search" / "stage.json")["config"]["epsilon"]
    for row in (uniform, pruned):
        assert row["validation"] >= (1 - eps) * base["validation"] - 1e-9
    # the GA starts from the uniform level, so it never removes less — unless confirmation
    # stepped its levels back toward dense
    confirmed = read_json(run / "confirm" / "confirm.json")
    if summary["confirmation"]["passed"]:
        assert pruned["target_params_kept"] <= uniform["target_params_kept"]
        assert confirmed["levels"] == read_json(run / "search" / "search.json")["levels"]
    else:
        assert pruned["target_params_kept"] == confirmed["confirmation"]["kept"]
    assert uniform["target_params_kept"] < summary["target_params"]
    assert summary["pruned_units"] > 0
    assert summary["transfer"]["drug_reviews"]["examples"] == 16
    for plot in ("levels.png", "fitness.png", "logbook.csv", "levels.json"):
        assert (run / "search" / plot).exists()
    # LoRA is exported only when it does not lower confirmation accuracy (at the search's
    # levels; stepped back, at the levels stepped back to)
    lora_helped = rows["pruned+lora"]["confirmation"] >= pruned["confirmation"] - 1e-6
    if summary["confirmation"]["passed"] or summary["confirmation"]["with_lora"]:
        assert summary["final"] == ("pruned+lora" if lora_helped else "pruned")
    assert summary["recover"]["used"] == (summary["final"] == "pruned+lora")
    assert "dense+lora" in rows
    assert summary["recover"]["steps"] >= 8
    final = summary["final"]
    card = (run / "export" / "model" / "README.md").read_text()  # the model card
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert (f"| {final} | {100 * rows[final]['validation']:.1f}% | {100 * rows[final]['test']:.1f}%"
            f" | {100 * rows[final]['confirmation']:.1f}% |") in card
    assert "trust_remote_code=True" in card and "drug_reviews (16 examples)" in card
    for form in (final, f"{final}+int8", f"{final}+nf4", "base"):
        assert {"disk_mb", "peak_memory_mb", "weights_mb", "latency_ms_per_example", "test"} <= rows[form].keys()
    assert rows[f"{final}+int8"]["disk_mb"] < rows[final]["disk_mb"] < rows["base"]["disk_mb"]
    # nf4 on CPU is not asserted smaller: bitsandbytes' CPU kernel needs ranks that are
    # multiples of 64, and with rank_multiple 32 every factored child may be left in float32
    capsys.readouterr()
    assert run_cli("test", *args) == 0
    text = capsys.readouterr().out
    base_line = next(line for line in text.splitlines() if line.strip().startswith("base:"))
    pruned_line = next(line for line in text.splitlines() if line.strip().startswith("pruned:"))
    assert f"{100 * base['test']:.2f}%" in base_line
    # the exported folder (reloaded through trust_remote_code) scores exactly what fit measured
    assert f"{100 * rows[final]['test']:.2f}%" in pruned_line
    assert f"{rows[final]['params'] / 1e6:.2f}M" in pruned_line
    _quantized_logits_stay_close(run / "export" / "model")


def _llama_cpp_answers_as_the_hf_export(run: Path) -> None:
    """The GGUF the export wrote (q8_0), read by llama.cpp itself, picks the HF export's label
    word on the test prompts; the card says how to run it; it is smaller than the base model
    written by the same writer."""
    import numpy as np
    import torch

    from sieve_pl.models.loading import DEFAULT_MODEL, builtin_gguf, load_model, load_tokenizer
    from sieve_pl.models.to_gguf import write_gguf
    from sieve_pl.tasks import SplitSizes, TaskDataModule

    folder = run / "export" / "model"
    written = read_json(run / "export" / "gguf.json")["model-q8_0.gguf"]
    assert (folder / "Modelfile").read_text() == "FROM ./model-q8_0.gguf\n"
    assert "## llama.cpp and Ollama" in (folder / "README.md").read_text()
    assert written["architecture"] in ("llama", "deci")
    base, _ = load_model(DEFAULT_MODEL)
    dense = write_gguf(base, None, run / "base-q8_0.gguf", "q8_0", builtin_gguf(DEFAULT_MODEL))
    assert written["bytes"] < dense["bytes"]
    llama_cpp = pytest.importorskip("llama_cpp")
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    data = TaskDataModule(sizes=SplitSizes(calibration=4, validation=4, test=48))
    data.prepare(tokenizer)
    task = data.task
    labels = [ids[0] for ids in task._tokenize(tokenizer)]
    net, _ = load_model(str(folder))
    # (logits_all: llama-cpp-python keeps no logits after eval without it)
    llm = llama_cpp.Llama(model_path=str(folder / "model-q8_0.gguf"), n_ctx=512, n_threads=2,
                          logits_all=True, verbose=False)
    same = []
    for row in data.splits["test"]:
        ids = tokenizer(task.prompt_text(row))["input_ids"]
        with torch.no_grad():
            hf = net(input_ids=torch.tensor([ids])).logits[0, -1, labels].argmax().item()
        llm.reset()
        llm.eval(ids)
        same.append(int(np.argmax(np.asarray(llm.scores[llm.n_tokens - 1])[labels])) == hf)
    assert np.mean(same) >= 0.9, np.mean(same)


def _quantized_logits_stay_close(folder: Path) -> None:
    """int8 / nf4 reloads run and stay near the float32 logits.

    Compared up to softmax's free constant: the cosine of the centred last-position logits
    must exceed 0.95 for int8 and 0.8 for nf4; a broken load (random or mis-scaled weights)
    is near 0. Measured on this machine (CPU kernels): 0.97-0.99 (int8) and 0.89-0.94 (nf4)
    on the base SmolLM2, 0.84-0.95 (nf4) on the demo's exports. The raw L2 error is not used:
    nf4 shifts the logits by a per-row constant (1.1 relative on an export whose centred
    cosine is 0.94), which no probability sees.
    """
    from sieve_pl.models.loading import load_model, load_tokenizer
    from sieve_pl.models.forward import last_logits
    from sieve_pl.tasks.base import encode_prompts

    tokenizer = load_tokenizer(str(folder))
    texts = ["A three-hour cinema master class.", "Dull, lifeless and far too long.",
             "It's always fascinating to watch.", "A mess from start to finish."]
    batch = encode_prompts(tokenizer, [f"Review: {t}\nSentiment:" for t in texts], 64)
    reference = last_logits(load_model(str(folder), trust_remote_code=True)[0], batch)
    for fmt in ("int8", "nf4"):
        model, _ = load_model(str(folder), trust_remote_code=True, quantize=fmt)
        if fmt == "int8":
            assert any(type(m).__name__ == "Linear8bitLt" for m in model.modules())
        with torch.no_grad():
            logits = last_logits(model, batch)
        centred = [x - x.mean(-1, keepdim=True) for x in (logits, reference)]
        cosine = torch.nn.functional.cosine_similarity(*centred, dim=-1)
        assert (cosine > {"int8": 0.95, "nf4": 0.8}[fmt]).all() and (cosine < 1).all(), (fmt, cosine)


def test_fit_with_learned_projection_refit_and_distillation(tmp_path, tiny_llama, capsys):
    args = ["fit", "--model.pretrained", tiny_llama, "--run.root", str(tmp_path),
            "--run.name", "tiny", "--data.sizes",
            "{calibration: 12, validation: 10, test: 6, train: 8}", "--data.batch_size", "4",
            "--projection.method", "learned", "--projection.learned.epochs", "2",
            "--refit.enabled", "true", "--refit.examples", "8",
            "--distill.enabled", "true", "--distill.epochs", "1", "--search.generations", "1",
            "--search.population", "4", *QUIET]
    assert run_cli(*args) == 0
    run = tmp_path / "tiny"
    summary = read_json(run / "summary.json")
    refit, distill = summary["refit"], summary["distill"]
    assert refit["used"] == (refit["accuracy_after"] >= refit["accuracy_before"] - 1e-6)
    # distillation starts from what refit left: its accuracy if kept, the search's if not
    assert distill["accuracy_before"] == (refit["accuracy_after"] if refit["used"]
                                          else refit["accuracy_before"])
    assert distill["accuracy_after"] is not None and "val_kl" in distill
    assert (run / "distill" / "stage.json").exists() and (run / "project" / "stage.json").exists()
    assert read_json(run / "project" / "stage.json")["config"]["learned"]["epochs"] == 2
    assert "distillation: validation accuracy" in capsys.readouterr().out


def test_standard_space_exports_the_base_architecture_and_gguf(tmp_path, tiny_llama):
    """search.space standard: one MLP width in every layer, attention dense; the standard
    export loads with plain from_pretrained (no remote code) with the logits of the trusted
    load of the hf export, and its GGUF is the llama architecture; the DeciLM folder and the
    card's vLLM recipes come with it."""
    from transformers import AutoModelForCausalLM

    from sieve_pl.models.loading import load_model

    args = ["fit", "--model.pretrained", tiny_llama, "--run.root", str(tmp_path),
            "--run.name", "std", "--data.sizes", "{calibration: 12, validation: 10, test: 10}",
            "--data.batch_size", "5", "--search.space", "standard", "--search.strategy",
            "uniform", "--search.epsilon", "0.5", "--search.confidence", "0",
            "--export.formats", "[hf, standard, gguf, decilm]", "--export.gguf_types", "[f32]",
            "--transfer.sources", "{}", *QUIET]
    assert run_cli(*args) == 0
    export = tmp_path / "std" / "export"
    levels = read_json(tmp_path / "std" / "search" / "search.json")["levels"]
    assert {v for n, v in levels.items() if not n.endswith(".mlp")} == {1.0}
    assert {v for n, v in levels.items() if n.endswith(".mlp")} != {1.0}  # something was cut
    standard = AutoModelForCausalLM.from_pretrained(export / "standard", trust_remote_code=False)
    assert type(standard).__name__ == "LlamaForCausalLM"
    width = standard.config.intermediate_size
    assert width < 48 and standard.model.layers[1].mlp.down_proj.in_features == width
    trusted, _ = load_model(str(export / "model"))
    ids = torch.tensor([[1, 504, 3437, 314, 253, 1345, 28]])
    with torch.no_grad():
        torch.testing.assert_close(standard(input_ids=ids).logits, trusted(input_ids=ids).logits)
    written = read_json(export / "gguf.json")["model-f32.gguf"]
    assert written["architecture"] == "llama" and set(written["mlp_widths"]) == {width}
    assert read_json(export / "decilm.json")["mlp_widths"] == [width, width]
    assert (export / "decilm" / "model.safetensors.index.json").exists()
    card = (export / "model" / "README.md").read_text()
    assert "vllm serve ../standard" in card and "vllm serve ../decilm" in card

