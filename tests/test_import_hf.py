"""Import of Hugging Face checkpoints: GPT-2's own layout from a local server that answers like
the Hub (`--from-hub`), sharded safetensors, pytorch_model.bin, padded vocabularies, and the
refusals (features scratchlm cannot compute, missing shards, mismatched shapes), checked
against transformers' own model on the same files (fp32 logits 1e-4)."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from scratchlm.cli import main
from scratchlm.errors import ScratchLMError
from scratchlm.export import export_hf, import_hf
from scratchlm.export.hf_tokenizer import tokenizer_json
from scratchlm.model.directory import load_model
from scratchlm.tokenizer import Tokenizer
from tests.conftest import shared_file
from tests.fake_hub import FakeHub, serving
from tests.test_export import _ids, make_model_dir, trained_tokenizer
from tests.test_train_fixtures import build_train_corpus, tiny_config

transformers = pytest.importorskip("transformers")

REPO = "openai-community/gpt2"


def _gpt2_tokenizer() -> Tokenizer:
    return Tokenizer.from_gpt2(shared_file("tokenizers/gpt2/encoder.json"), shared_file("tokenizers/gpt2/vocab.bpe"))


def gpt2_repo_files(with_tokenizer_json: bool) -> dict[str, bytes]:
    """A random model in the layout of openai-community/gpt2: its config.json fields, weights
    saved from GPT2Model (no `transformer.` prefix, no head, the old causal-mask buffers),
    GPT-2's own vocab.json/merges.txt and, optionally, a tokenizer.json as that repo has."""
    config = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
              "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
              "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 128, "n_embd": 32, "n_head": 4,
              "n_layer": 2, "n_positions": 128, "resid_pdrop": 0.1, "summary_activation": None,
              "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
              "summary_use_proj": True, "task_specific_params": {"text-generation": {"do_sample": True,
                                                                                     "max_length": 50}},
              "vocab_size": 50257}
    torch.manual_seed(3)
    body = transformers.GPT2Model(transformers.GPT2Config(**config))
    state = {name: tensor.detach().clone() + 0.02 * torch.randn_like(tensor) for name, tensor in body.state_dict().items()}
    for i in range(config["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
    weights = Path("/tmp") / f"gpt2-layout-{id(state)}.safetensors"
    try:
        save_file(state, str(weights), metadata={"format": "pt"})
        weights_bytes = weights.read_bytes()
    finally:
        weights.unlink(missing_ok=True)
    encoder = shared_file("tokenizers/gpt2/encoder.json").read_bytes()
    merges = shared_file("tokenizers/gpt2/vocab.bpe").read_bytes()
    files = {"config.json": json.dumps(config).encode(), "model.safetensors": weights_bytes,
             "vocab.json": encoder, "merges.txt": merges}
    if with_tokenizer_json:
        merge_lines = [line for line in merges.decode().split("\n") if line and not line.startswith("#version")]
        document = {"version": "1.0", "truncation": None, "padding": None,
                    "added_tokens": [{"id": 50256, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                                      "rstrip": False, "normalized": True, "special": True}],
                    "normalizer": None,
                    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                      "use_regex": True},
                    "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                                       "use_regex": True},
                    "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                "use_regex": True},
                    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                              "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                              "vocab": json.loads(encoder), "merges": merge_lines}}
        files["tokenizer.json"] = json.dumps(document).encode()
    return {f"{REPO}/{name}": data for name, data in files.items()}


@pytest.mark.parametrize("with_tokenizer_json", [True, False], ids=["tokenizer.json", "vocab+merges"])
def test_import_gpt2_from_hub(with_tokenizer_json, tmp_path, monkeypatch, capsys):
    files = gpt2_repo_files(with_tokenizer_json)
    with serving(files, monkeypatch, tmp_path / "hf_home"):
        out = tmp_path / "gpt2"
        assert main(["import", "hf", out.as_posix(), "--from-hub", REPO, "--cache-dir", str(tmp_path / "cache")]) == 0
        assert ("GET", f"/{REPO}/resolve/main/model.safetensors") in FakeHub.requests
        # Cached: a second import downloads no file body again.
        gets = sum(1 for method, _ in FakeHub.requests if method == "GET")
        import_hf(None, tmp_path / "again", from_hub=REPO, cache_dir=tmp_path / "cache")
        assert sum(1 for method, _ in FakeHub.requests if method == "GET") == gets
    capsys.readouterr()

    ours, tokenizer = load_model(out)
    assert tokenizer.fingerprint() == _gpt2_tokenizer().fingerprint()
    snapshot = next((tmp_path / "cache").glob("models--*/snapshots/*"))
    theirs = transformers.GPT2LMHeadModel.from_pretrained(snapshot).eval()
    idx = _ids(ours.config)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, atol=1e-4, rtol=1e-4)
    # The imported directory is a model directory like any other.
    assert main(["generate", str(out), "--prompt", "Hello", "--max-tokens", "4", "--seed", "1"]) == 0


def test_hub_errors_are_one_line(tmp_path, monkeypatch, capsys):
    files = gpt2_repo_files(False)
    del files[f"{REPO}/model.safetensors"]
    with serving(files, monkeypatch, tmp_path / "hf_home"):
        assert main(["import", "hf", str(tmp_path / "out"), "--from-hub", REPO,
                     "--cache-dir", str(tmp_path / "cache")]) == 1
        assert "openai-community/gpt2: the repository has no weights" in capsys.readouterr().err
        assert main(["import", "hf", str(tmp_path / "out"), "--from-hub", "someone/missing",
                     "--cache-dir", str(tmp_path / "cache")]) == 1
        assert "someone/missing: the repository has no config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_fails_at_once(tmp_path, monkeypatch, capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert main(["import", "hf", str(tmp_path / "out"), "--from-hub", REPO, "--cache-dir", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert err == f"scratchlm: error: cannot download model '{REPO}': http://127.0.0.1:{port} is unreachable " \
                  f"(Connection refused)\n"
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- local layouts
@pytest.fixture()
def llama_checkpoint(tmp_path) -> tuple[Path, Path]:
    """(our model directory, its export): a Llama with grouped-query attention."""
    model_dir = make_model_dir(tmp_path / "model", trained_tokenizer("gpt2"), n_heads=4, n_kv_heads=2)
    return model_dir, export_hf(model_dir, tmp_path / "hf")


def _same_weights(a: Path, b: Path) -> None:
    first, second = load_model(a)[0].state_dict(), load_model(b)[0].state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_import_sharded_safetensors_and_pytorch_bin(llama_checkpoint, tmp_path):
    model_dir, hf_dir = llama_checkpoint
    sharded = tmp_path / "sharded"
    transformers.AutoModelForCausalLM.from_pretrained(hf_dir).save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_dir / name, sharded / name)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file()
    _same_weights(model_dir, import_hf(sharded, tmp_path / "from-shards"))

    # pytorch_model.bin (read with weights_only=True), the same tensors.
    legacy = tmp_path / "legacy"
    shutil.copytree(hf_dir, legacy)
    torch.save(load_file(str(legacy / "model.safetensors")), legacy / "pytorch_model.bin")
    (legacy / "model.safetensors").unlink()
    _same_weights(model_dir, import_hf(legacy, tmp_path / "from-bin"))

    # A missing shard is named; nothing is written.
    shards[0].unlink()
    with pytest.raises(ScratchLMError, match=f"{shards[0].name}: shard listed in model.safetensors.index.json"):
        import_hf(sharded, tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_pickled_code_is_refused(llama_checkpoint, tmp_path):
    _, hf_dir = llama_checkpoint
    (hf_dir / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "payload": Path("/")}, hf_dir / "pytorch_model.bin")
    with pytest.raises(ScratchLMError, match="pytorch_model.bin: unreadable weights"):
        import_hf(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _edit_config(hf_dir: Path, **changes) -> None:
    path = hf_dir / "config.json"
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))


@pytest.mark.parametrize("changes, message", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "field rope_scaling"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}), "rope_parameters.rope_type"),
    (dict(num_local_experts=8), "field num_local_experts"),
    (dict(sliding_window=512), "field sliding_window"),
    (dict(architectures=["MistralForCausalLM"]), "architecture 'MistralForCausalLM' is not supported"),
    (dict(hidden_act="gelu"), "field hidden_act"),
    (dict(attention_bias=True), "fields attention_bias and mlp_bias differ"),
    (dict(intermediate_size=200), "has shape"),
    (dict(num_hidden_layers=5), "tensor model.layers.4.self_attn.q_proj.weight is missing"),
    (dict(num_hidden_layers=1), "scratchlm has no place for (model.layers.1"),
])
def test_unrepresentable_checkpoints_are_refused_naming_the_field(changes, message, llama_checkpoint, tmp_path, capsys):
    _, hf_dir = llama_checkpoint
    _edit_config(hf_dir, **changes)
    assert main(["import", "hf", str(hf_dir), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_unexpected_bias_tensors_and_tokenizers_are_refused(llama_checkpoint, tmp_path):
    _, hf_dir = llama_checkpoint
    tensors = load_file(str(hf_dir / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(hf_dir / "model.safetensors"))
    with pytest.raises(ScratchLMError, match="no place for .*q_proj.bias"):
        import_hf(hf_dir, tmp_path / "out")
    document = json.loads((hf_dir / "tokenizer.json").read_text())
    document["model"]["type"] = "Unigram"
    (hf_dir / "tokenizer.json").write_text(json.dumps(document))
    with pytest.raises(ScratchLMError, match="tokenizer model 'Unigram' is not supported"):
        import_hf(hf_dir, tmp_path / "out")
    (hf_dir / "config.json").unlink()
    with pytest.raises(ScratchLMError, match="config.json: not found"):
        import_hf(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_padded_vocabulary_gets_placeholder_tokens(tmp_path):
    tokenizer = trained_tokenizer("gpt2")
    padded = 448
    config = transformers.LlamaConfig(vocab_size=padded, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    hf_dir = tmp_path / "hf"
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
    (hf_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json(tokenizer)))
    model, imported = load_model(import_hf(hf_dir, tmp_path / "out"))
    assert model.config.vocab_size == imported.vocab_size == padded
    assert imported.decode([padded - 1]) == f"<|unused_{padded - 1}|>"
    text = "def main(argv=None):\n    return 0\n"
    assert imported.encode(text) == tokenizer.encode(text)


def test_training_continues_from_an_imported_model(tmp_path):
    (tmp_path / "corpus").mkdir()
    corpus = build_train_corpus(tmp_path / "corpus")
    tokenizer = Tokenizer.load(corpus["tokenizer"])
    model_dir = make_model_dir(tmp_path / "model", tokenizer, context_length=32, d_model=64, n_layers=2,
                               n_heads=4, n_kv_heads=2)
    imported = import_hf(export_hf(model_dir, tmp_path / "hf"), tmp_path / "imported")
    config = tiny_config(corpus, run={"max_steps": 2, "eval_every": 2, "checkpoint_every": 2})
    config["model"] = {"init_from": str(imported)}
    config["data"]["tokenizer"] = None
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(tmp_path / "train.yaml"), "--out", str(tmp_path / "run")]) == 0
    trained, _ = load_model(tmp_path / "run" / "final")
    assert trained.config == load_model(imported)[0].config
