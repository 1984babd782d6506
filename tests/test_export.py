"""Uploading the export: the hub client is called as documented (never the network in tests)."""
import huggingface_hub

from sieve_pl.models.hf import push_to_hub


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
