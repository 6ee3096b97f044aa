"""Hub ids are downloaded as vLLM downloads them: through huggingface_hub, only the files a model
needs, at a revision, into download_dir or the HF cache, with the hub's environment honoured.
A local stand-in answers for the hub (HF_ENDPOINT), so the real download path runs."""

import json
import os
import shutil

import pytest
import torch
from hub_stub import LocalHub
from safetensors.torch import load_file

from pagedllm import LLM, SamplingParams
from pagedllm.entrypoints.cli import main

GREEDY = SamplingParams(temperature=0, max_tokens=6)


@pytest.fixture(scope="module")
def repos(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("repos")
    main_dir = shutil.copytree(tiny_checkpoint("llama"), root / "main")
    (main_dir / "pytorch_model.bin").write_bytes(b"not needed: the safetensors are there")
    (main_dir / "model.onnx").write_bytes(b"never needed")
    v2 = shutil.copytree(tiny_checkpoint("llama"), root / "v2")
    config = json.loads((v2 / "config.json").read_text())
    (v2 / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 128}))
    bin_only = shutil.copytree(tiny_checkpoint("gpt2"), root / "bin", ignore=shutil.ignore_patterns("*.safetensors"))
    weights = load_file(os.path.join(tiny_checkpoint("gpt2"), "model.safetensors"))
    torch.save(weights, bin_only / "pytorch_model.bin")  # as older transformers saved them
    return {"org/tiny": {"main": str(main_dir), "v2": str(v2)}, "org/gpt2-bin": {"main": str(bin_only)}}


@pytest.fixture
def hub(repos, monkeypatch):
    stand_in = LocalHub(repos)
    monkeypatch.setenv("HF_ENDPOINT", stand_in.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield stand_in
    stand_in.close()


def greedy(llm: LLM) -> list[int]:
    return llm.generate("def main():", GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_hub_id_downloads_only_what_the_model_needs(hub, repos, tmp_path):
    llm = LLM("org/tiny", device="cpu", download_dir=str(tmp_path))
    assert greedy(llm) == greedy(LLM(repos["org/tiny"]["main"], device="cpu"))
    fetched = {name.removeprefix("org/tiny/") for name in hub.downloaded}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= fetched
    assert not fetched & {"pytorch_model.bin", "model.onnx"}
    assert llm.llm_engine.config.model_path.startswith(str(tmp_path / "models--org--tiny" / "snapshots"))
    hub.downloaded.clear()
    LLM("org/tiny", device="cpu", download_dir=str(tmp_path))
    assert hub.downloaded == []  # cached: nothing fetched again


def test_revision_picks_the_snapshot(hub, tmp_path):
    def max_model_len(**kwargs) -> int:
        return LLM("org/tiny", device="cpu", download_dir=str(tmp_path), **kwargs).llm_engine.config.max_model_len

    assert max_model_len(revision="v2") == 128 and max_model_len() == 256
    with pytest.raises(FileNotFoundError, match="'org/tiny' has no revision 'v3'"):
        LLM("org/tiny", device="cpu", download_dir=str(tmp_path), revision="v3")


def test_bin_weights_are_fetched_where_there_are_no_safetensors(hub, tmp_path):
    llm = LLM("org/gpt2-bin", device="cpu", download_dir=str(tmp_path), dtype="float32")
    assert any(name.endswith(".bin") for name in hub.downloaded) and len(greedy(llm)) == 6


def test_offline_uses_the_cache_and_says_so_when_absent(hub, tmp_path, monkeypatch):
    LLM("org/tiny", device="cpu", download_dir=str(tmp_path))
    hub.downloaded.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert len(greedy(LLM("org/tiny", device="cpu", download_dir=str(tmp_path)))) == 6
    assert hub.downloaded == []
    with pytest.raises(FileNotFoundError, match=r"'org/tiny' at revision 'v2' is not in the local Hugging Face cache "
                                                r".* and HF_HUB_OFFLINE is set"):
        LLM("org/tiny", device="cpu", download_dir=str(tmp_path), revision="v2")


def test_an_unreachable_hub_falls_back_to_the_cache(hub, tmp_path, monkeypatch):
    LLM("org/tiny", device="cpu", download_dir=str(tmp_path))
    hub.close()
    assert len(greedy(LLM("org/tiny", device="cpu", download_dir=str(tmp_path)))) == 6
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache .* the hub could not be reached"):
        LLM("org/gpt2-bin", device="cpu", download_dir=str(tmp_path))


def test_unknown_repo_and_private_repo(repos, tmp_path, monkeypatch):
    private = LocalHub(repos, token="hf_secret")
    monkeypatch.setenv("HF_ENDPOINT", private.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    try:
        with pytest.raises(FileNotFoundError, match="'org/tiny' is neither a local directory nor a model on the hub "
                                                    r"\(a private one needs HF_TOKEN or hf_token\)"):
            LLM("org/tiny", device="cpu", download_dir=str(tmp_path))
        with pytest.raises(FileNotFoundError, match="neither a local directory nor a model on the hub"):
            LLM("org/tiny", device="cpu", download_dir=str(tmp_path), hf_token="hf_wrong")
        # vLLM's hf_token: the token for this model, without the environment
        assert len(greedy(LLM("org/tiny", device="cpu", download_dir=str(tmp_path / "own"),
                              hf_token="hf_secret"))) == 6
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        assert len(greedy(LLM("org/tiny", device="cpu", download_dir=str(tmp_path)))) == 6
        with pytest.raises(FileNotFoundError, match="'org/nothing' is neither a local directory nor a model"):
            LLM("org/nothing", device="cpu", download_dir=str(tmp_path))
    finally:
        private.close()


def test_hf_home_is_the_default_cache(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    llm = LLM("org/tiny", device="cpu", revision="v2")
    assert llm.llm_engine.config.model_path.startswith(str(tmp_path / "hf" / "hub" / "models--org--tiny"))


def test_command_line_takes_hub_ids(hub, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"id": 1, "prompt": "def main():"}) + "\n")
    assert main(["generate", "--model", "org/tiny", "--download-dir", str(tmp_path / "cache"), "--input", str(inp),
                 "--output", str(out), "--device", "cpu", "--temperature", "0", "--max-tokens", "6"]) == 0
    assert json.loads(out.read_text())["completion_tokens"] == 6
    assert os.path.isdir(tmp_path / "cache" / "models--org--tiny")
