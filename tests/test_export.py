"""The export folder: what loads it without sieve-pl, what its config states, the upload (the
hub client is called as documented; never the network in tests)."""
import json
import os
import subprocess
import sys

import huggingface_hub
import pytest

from sieve_pl.models.hf import push_to_hub, save_pruned


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", folder_path, repo_id))
            return f"https://huggingface.co/{repo_id}/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    (tmp_path / "README.md").write_text("card")
    url = push_to_hub(tmp_path, "me/pruned", private=True)
    assert calls == [("create", "me/pruned", True, True), ("upload", str(tmp_path), "me/pruned")]
    assert url.endswith("/me/pruned/commit/abc")


def _shrunk(family: str, tokenizer, widths: list[int]):
    """A tiny random model of ``family`` whose MLPs hold ``widths`` neurons (one per layer) and
    whose first target is factored: what save_pruned sees after a search."""
    import torch
    from transformers import AutoModelForCausalLM

    from sieve_pl.models.adapters import adapter_for
    from sieve_pl.models.factored import FactoredLinear, dense_shape, new_linear, set_submodule
    from test_adapters import family_config

    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(
        family_config(family, len(tokenizer), tokenizer.pad_token_id)).eval()
    adapter = adapter_for(net.config)
    for (inputs, down, blocks), width in zip(adapter.mlps(net).values(), widths):
        for name in inputs:
            old = net.get_submodule(name)
            set_submodule(net, name, new_linear(old, blocks * width, dense_shape(old)[1],
                                                old.bias is not None))
        old = net.get_submodule(down)
        set_submodule(net, down, new_linear(old, dense_shape(old)[0], width,
                                            old.bias is not None))
    first = net.get_submodule(adapter.targets(net)[0])
    set_submodule(net, adapter.targets(net)[0],
                  FactoredLinear(*reversed(dense_shape(first)), 4, first.bias is not None))
    return net


def test_export_tokenizer_loads_without_the_models_code(tmp_path, tokenizer):
    """transformers 4 picks the tokenizer from tokenizer_config.json alone: its class must be
    one every version knows (transformers 5's ``TokenizersBackend`` is not). transformers 5
    reads config.json first, whose model type needs the folder's code: ``trust_remote_code=
    False`` loads the tokenizer there, without a prompt and without running that code."""
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    folder = tmp_path / "model"
    save_pruned(_shrunk("llama", tokenizer, [40, 24]), tokenizer, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer_class_from_name(config["tokenizer_class"]) is not None
    assert "local_files_only" not in config and "is_local" not in config
    text = "<|im_start|>user\nIs this review fresh? Great film.<|im_end|>"
    script = ("import json, sys\nfrom transformers import AutoTokenizer\n"
              "t = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=False)\n"
              "assert not any(m.startswith('transformers_modules') for m in sys.modules)\n"
              "print(json.dumps(t(sys.argv[2]).input_ids))\n")
    # stdin closed: a prompt for the folder's code would fail the load
    done = subprocess.run([sys.executable, "-c", script, str(folder), text],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[y/N]" not in done.stdout + done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == tokenizer(text).input_ids


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3", "gpt2"])
def test_export_config_states_the_mlp_widths_it_holds(tmp_path, tokenizer, family):
    """config.json's standard MLP size is the widest MLP held (not the unpruned width), the
    per-layer widths are in ``sieve``, and the folder still reloads exactly."""
    import torch
    from transformers import AutoModelForCausalLM

    from sieve_pl.models.adapters import adapter_for
    from sieve_pl.models.loading import load_model

    def mlp_size(config: dict) -> int | None:
        for key in adapter_for(net.config).mlp_size.split("."):
            config = config[key]
        return config

    net = _shrunk(family, tokenizer, [40, 24])
    unpruned = mlp_size(net.config.to_dict())
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        expected = net(input_ids=ids).logits
    save_pruned(net, tokenizer, tmp_path / "model")
    assert mlp_size(net.config.to_dict()) == unpruned  # the in-memory config is untouched
    assert net.config.model_type == family
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert mlp_size(config) == 40
    assert config["sieve"]["intermediate_sizes"] == [40, 24]
    for reloaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "model",
                                                          trust_remote_code=True),
                     load_model(str(tmp_path / "model"))[0]):
        with torch.no_grad():
            torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, expected,
                                       rtol=0, atol=0)
        assert (sum(p.numel() for p in reloaded.parameters())
                == sum(p.numel() for p in net.parameters()))


def test_exported_files_are_readable_by_other_users(tmp_path, tokenizer):
    """transformers writes model.safetensors with mode 0600; the export's files get the modes
    of any file written under the process's umask, so a server running as another user (a
    vLLM or llama.cpp container) can read them."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        folder = tmp_path / "model"
        save_pruned(_shrunk("llama", tokenizer, [40, 24]), tokenizer, folder)
    finally:
        os.umask(old)
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
