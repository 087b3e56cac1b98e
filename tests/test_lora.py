"""LoRA: the wrapped model starts as the base, merging is exact, only adapters train, peft (an
independent implementation, through our Hugging Face export) computes the same logits, and
adapter directories load as merged models that refuse a changed or missing base.
Tolerances: fp32 logits 1e-5 between our own computations, 1e-4 against transformers/peft."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from scratchlm.errors import ScratchLMError
from scratchlm.model import ModelConfig, Transformer
from scratchlm.model.directory import (
    adapter_base,
    is_adapter_directory,
    load_config,
    load_model,
    merge_adapter,
    model_files,
    read_adapter_weights,
    save_adapter,
    save_model,
)
from scratchlm.model.lora import (
    TARGETS,
    LoraConfig,
    LoraLinear,
    adapter_shapes,
    apply_lora,
    count_trainable,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
)
from tests.test_model_directory import byte_tokenizer

# Tiny members of both families: Llama (SwiGLU, grouped-query attention, RoPE, no biases) and
# GPT-2 (GELU, multi-head attention, learned positions, biases, LayerNorm).
ARCHITECTURES = {
    "llama": dict(preset="tiny", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64),
    "llama-bias-untied": dict(preset="tiny", d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, d_ff=64,
                              bias=True, tie_embeddings=False, qk_norm=True),
    "gpt2": dict(preset="gpt2-124m", d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=128),
}
GELU_TARGETS = tuple(t for t in TARGETS if t != "gate")


def make_model(name: str, vocab_size: int = 257) -> Transformer:
    """Random weights, every one perturbed (norms and biases too), so a weight used in the
    wrong place changes the logits."""
    fields = dict(ARCHITECTURES[name])
    config = ModelConfig.from_preset(fields.pop("preset"), vocab_size=vocab_size, context_length=32, **fields)
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """Give B (zero at init) and A values, so the adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in lora_state_dict(model).items():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)


def ids(vocab_size: int = 257, length: int = 20) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(2))


def all_targets(name: str) -> tuple[str, ...]:
    return GELU_TARGETS if name == "gpt2" else TARGETS


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("fields, message", [
    (dict(rank=0), "field rank: must be an integer >= 1"),
    (dict(rank=2.0), "field rank"),
    (dict(alpha=0), "field alpha: must be a number > 0"),
    (dict(alpha=float("nan")), "field alpha"),
    (dict(dropout=1.0), r"field dropout: must be in \[0, 1\)"),
    (dict(dropout=-0.1), "field dropout"),
    (dict(targets=("q", "wq")), "field targets: unknown target.*wq.*valid: q, k, v, o, gate, up, down"),
    (dict(targets=()), "field targets: needs at least one"),
    (dict(targets=[1]), "field targets: must be a list"),
])
def test_config_validation_names_the_field(fields, message):
    with pytest.raises(ScratchLMError, match=f"lora config {message}"):
        LoraConfig(**fields)


def test_config_round_trips_and_canonicalises_targets():
    config = LoraConfig(rank=4, alpha=8, dropout=0.1, targets="v, q,v")
    assert config.targets == ("q", "v") and config.scale == 2.0
    assert LoraConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ScratchLMError, match="x.json: unknown lora field.*colour"):
        LoraConfig.from_dict({"rank": 4, "colour": "red"}, source="x.json")
    with pytest.raises(ScratchLMError, match="x.json: lora config field rank"):
        LoraConfig.from_dict({"rank": -1}, source="x.json")


def test_gate_does_not_exist_in_a_gelu_mlp():
    with pytest.raises(ScratchLMError, match="targets: gate does not exist in a gelu MLP "
                                             r"\(valid: q, k, v, o, up, down\)"):
        apply_lora(make_model("gpt2"), LoraConfig(targets=("q", "gate")))


# --------------------------------------------------------------------------- the wrapped model
SUBSETS = [("q", "v"), ("k",), ("v", "o"), ("up", "down"), ("gate",)]
CASES = [(arch, targets) for arch in ARCHITECTURES for targets in [all_targets(arch), *SUBSETS]
         if not (arch == "gpt2" and "gate" in targets)]


@pytest.mark.parametrize("arch, targets", CASES, ids=[f"{a}-{','.join(t)}" for a, t in CASES])
def test_starts_as_the_base_and_merges_exactly(arch, targets):
    model = make_model(arch)
    base_state = {name: t.clone() for name, t in model.state_dict().items()}
    idx = ids()
    base_logits = model(idx)
    apply_lora(model, LoraConfig(rank=3, alpha=5.0, targets=targets))
    # B starts at zero: the adapters add exact zeros.
    assert torch.equal(model(idx), base_logits)
    # The base weights keep their names; adapters are the extra keys, named after the targets.
    assert set(base_state) <= set(model.state_dict())
    adapters = lora_state_dict(model)
    assert {name.split(".")[-2] for name in adapters} == set(targets)
    assert {name: tuple(t.shape) for name, t in adapters.items()} == \
        adapter_shapes(model.config, LoraConfig(rank=3, alpha=5.0, targets=targets))

    randomize_adapters(model)
    lora_logits = model(idx)
    assert not torch.allclose(lora_logits, base_logits, atol=1e-3)
    merged = merge_lora(model)
    assert merged is model and not any(isinstance(m, LoraLinear) for m in merged.modules())
    torch.testing.assert_close(merged(idx), lora_logits, atol=1e-5, rtol=1e-5)
    state = merged.state_dict()
    assert set(state) == set(base_state)
    assert all(p.requires_grad for p in merged.parameters())
    # Each adapter lands in its own rows of the fused q|k|v matrix: the others are untouched.
    config = model.config
    rows = dict(zip("qkv", state["blocks.0.attn.qkv.weight"].split(
        [config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim,
         config.n_kv_heads * config.head_dim])))
    base_rows = dict(zip("qkv", base_state["blocks.0.attn.qkv.weight"].split(
        [len(rows["q"]), len(rows["k"]), len(rows["v"])])))
    for name in "qkv":
        assert torch.equal(rows[name], base_rows[name]) == (name not in targets), name


def test_only_the_adapters_train():
    model = apply_lora(make_model("llama"), LoraConfig(rank=2, targets=("q", "v", "down"))).train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) and trainable
    count = count_trainable(model)
    assert count.trainable == sum(p.numel() for p in lora_state_dict(model).values())
    assert count.total == model.num_params() and 0 < count.fraction < 0.2
    assert count.memory_saved_bytes() == (count.total - count.trainable) * 12
    assert "trainable of" in count.describe()

    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    before = {name: t.clone() for name, t in lora_state_dict(model).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = ids()
    model(idx, targets=idx).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    # At B = 0 only B gets a gradient that is not zero (dL/dA = B^T ...), as in the paper.
    assert all(p.grad.abs().sum() > 0 for name, p in model.named_parameters() if name.endswith(".B"))
    optimizer.step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    after = lora_state_dict(model)
    assert all(not torch.equal(after[name], before[name]) for name in after if name.endswith(".B"))


def test_dropout_applies_in_training_only():
    model = apply_lora(make_model("llama"), LoraConfig(rank=2, dropout=0.5, targets=("q",)))
    randomize_adapters(model)
    idx = ids()
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_applying_twice_or_merging_a_plain_model_is_refused():
    model = apply_lora(make_model("llama"), LoraConfig(rank=2))
    with pytest.raises(ScratchLMError, match="already has LoRA adapters"):
        apply_lora(model, LoraConfig(rank=2))
    with pytest.raises(ScratchLMError, match="no LoRA adapters to merge"):
        merge_lora(make_model("llama"))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_with_the_kv_cache_matches_the_merged_model(arch):
    model = apply_lora(make_model(arch), LoraConfig(rank=4, targets=all_targets(arch)))
    randomize_adapters(model, seed=3)
    prompt = ids(length=5)[:1]
    idx = ids()
    cache = model.new_kv_cache(2)
    cached = torch.cat([model(idx[:, :12], kv_cache=cache), model(idx[:, 12:], kv_cache=cache)], dim=1)
    torch.testing.assert_close(cached, model(idx), atol=1e-5, rtol=1e-5)
    ours = list(model.generate(prompt, 20, temperature=0.0))
    merged = list(merge_lora(model).generate(prompt, 20, temperature=0.0))
    assert ours == merged


def test_compiled_blocks_capture_one_graph_and_train():
    """torch.compile traces a LoRA block without graph breaks (fullgraph) and gradients reach the
    adapters; aot_eager checks tracing and autograd without the minutes of C++ code generation."""
    model = apply_lora(make_model("llama"), LoraConfig(rank=2, dropout=0.1, targets=("q", "v", "o"))).train()
    randomize_adapters(model)
    eager_logits = model.eval()(ids())
    for block in model.blocks:
        block.compile(backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(model(ids()), eager_logits, atol=1e-5, rtol=1e-5)
    model.train()
    model(ids(), targets=ids()).backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if name.endswith((".A", ".B")))


def test_adapter_weights_load_into_blocks_wrapped_for_activation_checkpointing():
    """The trainer restores a LoRA checkpoint into its model after wrapping the blocks."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    source = apply_lora(make_model("llama"), LoraConfig(rank=2))
    randomize_adapters(source)
    target = apply_lora(make_model("llama"), LoraConfig(rank=2))
    for i, block in enumerate(target.blocks):
        target.blocks[i] = checkpoint_wrapper(block)
    assert set(lora_state_dict(target)) == set(lora_state_dict(source))  # the wrapper's prefix is stripped
    load_lora_state_dict(target, lora_state_dict(source))
    torch.testing.assert_close(target(ids()), source(ids()), atol=1e-6, rtol=1e-6)


def test_loading_adapters_checks_names_and_shapes():
    model = apply_lora(make_model("llama"), LoraConfig(rank=2, targets=("q", "v")))
    tensors = {name: t.clone() for name, t in lora_state_dict(model).items()}
    with pytest.raises(ScratchLMError, match="a.safetensors: the adapter tensors do not match the model.*missing: blocks.0.attn.qkv.lora.q.A"):
        load_lora_state_dict(model, {k: v for k, v in tensors.items() if k != "blocks.0.attn.qkv.lora.q.A"},
                             source="a.safetensors")
    with pytest.raises(ScratchLMError, match=r"unexpected: blocks.0.attn.qkv.lora.k.A"):
        load_lora_state_dict(model, {**tensors, "blocks.0.attn.qkv.lora.k.A": tensors["blocks.0.attn.qkv.lora.q.A"]})
    tensors["blocks.1.attn.qkv.lora.v.B"] = torch.zeros(16, 3)
    with pytest.raises(ScratchLMError, match=r"blocks.1.attn.qkv.lora.v.B has shape \(16, 3\), the model needs \(16, 2\)"):
        load_lora_state_dict(model, tensors)
    with pytest.raises(ScratchLMError, match="no LoRA adapters"):
        load_lora_state_dict(make_model("llama"), tensors)


# --------------------------------------------------------------------------- against peft
HF_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
OUR_PATHS = {"q": "attn.qkv", "k": "attn.qkv", "v": "attn.qkv", "o": "attn.out",
             "gate": "mlp.gate", "up": "mlp.up", "down": "mlp.proj"}


def export_base(tmp_path, preset: str, **fields):
    """(our base model, transformers' model of the same weights) through export_hf."""
    transformers = pytest.importorskip("transformers")
    from scratchlm.export import export_hf
    from tests.test_export import make_model_dir, trained_tokenizer

    model_dir = make_model_dir(tmp_path / "model", trained_tokenizer("gpt2"), preset, **fields)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(export_hf(model_dir, tmp_path / "hf")).eval()
    return load_model(model_dir)[0], theirs


@pytest.mark.parametrize("fields, targets", [
    (dict(n_heads=4, n_kv_heads=2), TARGETS),
    (dict(n_heads=4, n_kv_heads=2), ("q", "v")),
    (dict(n_heads=4, n_kv_heads=4, bias=True, tie_embeddings=False), ("k", "o", "gate")),
], ids=["gqa-all", "gqa-q,v", "mha-bias-k,o,gate"])
def test_llama_adapters_compute_what_peft_computes(tmp_path, fields, targets):
    peft = pytest.importorskip("peft")
    ours, theirs = export_base(tmp_path, "tiny", **fields)
    idx = ids(ours.config.vocab_size)
    base_logits = ours(idx)
    lora = LoraConfig(rank=4, alpha=12.0, targets=targets)
    apply_lora(ours, lora)
    randomize_adapters(ours)
    wrapped = peft.get_peft_model(theirs, peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
        target_modules=[HF_NAMES[t].split(".")[1] for t in targets]))
    adapters = lora_state_dict(ours)
    with torch.no_grad():
        for i in range(ours.config.n_layers):
            for target in targets:
                module = wrapped.base_model.model.get_submodule(f"model.layers.{i}.{HF_NAMES[target]}")
                prefix = f"blocks.{i}.{OUR_PATHS[target]}.lora.{target}"
                module.lora_A["default"].weight.copy_(adapters[prefix + ".A"])
                module.lora_B["default"].weight.copy_(adapters[prefix + ".B"])
    with torch.no_grad():
        torch.testing.assert_close(wrapped(idx).logits, ours(idx), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours(idx), base_logits, atol=1e-2)  # the adapters matter


def test_gpt2_adapters_compute_what_peft_computes(tmp_path):
    """GPT-2 fuses q, k, v in one Conv1D (c_attn), which peft adapts as a whole: our three
    rank-r adapters are its one rank-3r adapter with A stacked and B block-diagonal (and alpha
    tripled, keeping alpha / rank)."""
    peft = pytest.importorskip("peft")
    ours, theirs = export_base(tmp_path, "gpt2-124m", context_length=64, d_model=64, n_layers=2, n_heads=4,
                               n_kv_heads=4, d_ff=256)
    idx = ids(ours.config.vocab_size)
    base_logits = ours(idx)
    lora = LoraConfig(rank=2, alpha=6.0, targets=GELU_TARGETS)
    apply_lora(ours, lora)
    randomize_adapters(ours)
    wrapped = peft.get_peft_model(theirs, peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, fan_in_fan_out=True,
        target_modules=["c_attn", "c_proj", "c_fc"],
        rank_pattern={"c_attn": 3 * lora.rank}, alpha_pattern={"c_attn": 3 * lora.alpha}))
    adapters = lora_state_dict(ours)
    with torch.no_grad():
        for i in range(ours.config.n_layers):
            ours_at, theirs_at = f"blocks.{i}.", f"transformer.h.{i}."
            qkv = [ours_at + f"attn.qkv.lora.{t}" for t in "qkv"]
            pairs = {"attn.c_attn": (torch.cat([adapters[p + ".A"] for p in qkv]),
                                     torch.block_diag(*[adapters[p + ".B"] for p in qkv])),
                     "attn.c_proj": (adapters[ours_at + "attn.out.lora.o.A"], adapters[ours_at + "attn.out.lora.o.B"]),
                     "mlp.c_fc": (adapters[ours_at + "mlp.fc.lora.up.A"], adapters[ours_at + "mlp.fc.lora.up.B"]),
                     "mlp.c_proj": (adapters[ours_at + "mlp.proj.lora.down.A"],
                                    adapters[ours_at + "mlp.proj.lora.down.B"])}
            for name, (a, b) in pairs.items():
                module = wrapped.base_model.model.get_submodule(theirs_at + name)
                module.lora_A["default"].weight.copy_(a)
                module.lora_B["default"].weight.copy_(b)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(idx).logits, ours(idx), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours(idx), base_logits, atol=1e-2)  # the adapters matter


# --------------------------------------------------------------------------- adapter directories
def trained_adapter(tmp_path, arch: str = "llama", lora: LoraConfig | None = None, seed: int = 1):
    """(base model directory, LoRA model with random adapters, its LoraConfig)."""
    base_dir = tmp_path / "base"
    if not base_dir.exists():
        save_model(base_dir, make_model(arch), byte_tokenizer())
    lora = lora or LoraConfig(rank=4, alpha=8.0, targets=all_targets(arch))
    model = apply_lora(load_model(base_dir)[0], lora)
    randomize_adapters(model, seed)
    return base_dir, model, lora


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_directory_loads_as_the_merged_model(tmp_path, arch):
    base_dir, model, lora = trained_adapter(tmp_path, arch)
    idx = ids()
    expected = model(idx)
    save_adapter(tmp_path / "adapter", model, byte_tokenizer(), base_dir, lora, extra={"step": 5})

    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == sorted(["adapter.safetensors", "adapter_config.json", "merges.txt", "tokenizer.json", "vocab.txt"])
    stored = load_file(tmp_path / "adapter" / "adapter.safetensors")
    assert stored.keys() == lora_state_dict(model).keys() and all(".lora." in name for name in stored)
    assert (tmp_path / "adapter" / "adapter.safetensors").stat().st_size < \
        (base_dir / "model.safetensors").stat().st_size / 3
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["base"] == str(base_dir.resolve()) and meta["base_relative"] == "../base"
    assert meta["rank"] == 4 and meta["targets"] == list(lora.targets) and meta["extra"] == {"step": 5}

    assert is_adapter_directory(tmp_path / "adapter") and not is_adapter_directory(base_dir)
    assert load_config(tmp_path / "adapter") == (model.config, {"step": 5})
    loaded, tokenizer = load_model(tmp_path / "adapter")
    assert type(loaded) is Transformer and not any(isinstance(m, LoraLinear) for m in loaded.modules())
    assert not loaded.training and tokenizer.vocab_size == 257
    torch.testing.assert_close(loaded(idx), expected, atol=1e-5, rtol=1e-5)

    merged_dir = merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    assert not is_adapter_directory(merged_dir)
    merged, _ = load_model(merged_dir)
    torch.testing.assert_close(merged(idx), expected, atol=1e-5, rtol=1e-5)
    extra = load_config(merged_dir)[1]
    assert extra["step"] == 5 and extra["merged_adapter"]["rank"] == 4
    assert extra["merged_adapter"]["adapter"] == str((tmp_path / "adapter").resolve())
    # The merged directory stands alone: the base may go.
    shutil.rmtree(base_dir)
    torch.testing.assert_close(load_model(merged_dir)[0](idx), expected, atol=1e-5, rtol=1e-5)


def test_a_changed_base_is_refused(tmp_path):
    base_dir, model, lora = trained_adapter(tmp_path)
    save_adapter(tmp_path / "adapter", model, byte_tokenizer(), base_dir, lora)
    assert adapter_base(tmp_path / "adapter") == base_dir.resolve()
    other = make_model("llama")
    with torch.no_grad():
        other.tok_emb.weight.mul_(2)
    save_model(base_dir, other, byte_tokenizer(), overwrite=True)
    with pytest.raises(ScratchLMError, match=r"adapter .*adapter: its base .*base changed since training "
                                             r"\(hash of its model.safetensors is now [0-9a-f]{16}"):
        load_model(tmp_path / "adapter")
    for check in (adapter_base, lambda adapter: merge_adapter(adapter, tmp_path / "merged")):
        with pytest.raises(ScratchLMError, match="changed since training"):
            check(tmp_path / "adapter")
    assert not (tmp_path / "merged").exists()


def test_a_missing_base_is_refused(tmp_path):
    base_dir, model, lora = trained_adapter(tmp_path)
    save_adapter(tmp_path / "adapter", model, byte_tokenizer(), base_dir, lora)
    shutil.rmtree(base_dir)
    for load in (load_model, load_config):
        with pytest.raises(ScratchLMError, match=r"adapter .*adapter: its base model .*base was not found "
                                                 r"\(nor \.\./base relative to the adapter directory\)"):
            load(tmp_path / "adapter")


def test_the_base_is_found_after_moving_the_adapter_alone_or_both(tmp_path):
    base_dir, model, lora = trained_adapter(tmp_path)
    expected = model(ids())
    save_adapter(tmp_path / "runs" / "adapter", model, byte_tokenizer(), base_dir, lora)
    # The adapter alone moves: the relative path now leads nowhere, the absolute one still works.
    (tmp_path / "runs" / "adapter").rename(tmp_path / "adapter")
    torch.testing.assert_close(load_model(tmp_path / "adapter")[0](ids()), expected, atol=1e-5, rtol=1e-5)
    # Both move together: the absolute path leads nowhere, the relative one works.
    save_adapter(tmp_path / "beside", model, byte_tokenizer(), base_dir, lora)
    (tmp_path / "moved").mkdir()
    base_dir.rename(tmp_path / "moved" / "base")
    (tmp_path / "beside").rename(tmp_path / "moved" / "beside")
    torch.testing.assert_close(load_model(tmp_path / "moved" / "beside")[0](ids()), expected, atol=1e-5, rtol=1e-5)


def test_adapters_on_an_adapter_directory_stack(tmp_path):
    """E.g. DPO adapters trained on the merged model of SFT adapters: the SFT adapter directory
    is the base, pinned by the hash of its adapter.safetensors."""
    base_dir, first, lora = trained_adapter(tmp_path)
    save_adapter(tmp_path / "sft", first, byte_tokenizer(), base_dir, lora)
    second = apply_lora(load_model(tmp_path / "sft")[0], lora)
    randomize_adapters(second, seed=7)
    expected = second(ids())
    save_adapter(tmp_path / "dpo", second, byte_tokenizer(), tmp_path / "sft", lora)
    torch.testing.assert_close(load_model(tmp_path / "dpo")[0](ids()), expected, atol=1e-5, rtol=1e-5)
    # Changing the first adapters changes the second's base.
    randomize_adapters(first, seed=8)
    save_adapter(tmp_path / "sft", first, byte_tokenizer(), base_dir, lora, overwrite=True)
    with pytest.raises(ScratchLMError, match="dpo: its base .*sft changed since training .*adapter.safetensors"):
        load_model(tmp_path / "dpo")


def test_saving_checks_the_base_the_config_and_the_tokenizer(tmp_path):
    base_dir, model, lora = trained_adapter(tmp_path, lora=LoraConfig(rank=4, alpha=8.0, targets=("q", "v")))
    with pytest.raises(ScratchLMError, match="cannot replace its own base"):
        save_adapter(base_dir, model, byte_tokenizer(), base_dir, lora, overwrite=True)
    with pytest.raises(ScratchLMError, match=r"adapters are scaled by 2, the lora config says alpha / rank = 4"):
        save_adapter(tmp_path / "a", model, byte_tokenizer(), base_dir, LoraConfig(rank=4, alpha=16.0, targets="q,v"))
    with pytest.raises(ScratchLMError, match=r"the model: the adapter tensors do not match the lora config \(rank 4, targets q,v,o\) "
                                                   r"\(missing: blocks.0.attn.out.lora.o.A"):
        save_adapter(tmp_path / "a", model, byte_tokenizer(), base_dir, LoraConfig(rank=4, alpha=8.0, targets="q,v,o"))
    save_model(tmp_path / "other", make_model("gpt2"), byte_tokenizer())
    with pytest.raises(ScratchLMError, match="other: this base model's config differs.*mlp 'gelu' -> 'swiglu'"):
        save_adapter(tmp_path / "a", model, byte_tokenizer(), tmp_path / "other", lora)
    with pytest.raises(ScratchLMError, match="tokenizer has 258 tokens"):
        save_adapter(tmp_path / "a", model, byte_tokenizer("<|pad|>"), base_dir, lora)
    with pytest.raises(ScratchLMError, match="nowhere/config.json: not found"):
        save_adapter(tmp_path / "a", model, byte_tokenizer(), tmp_path / "nowhere", lora)
    assert not (tmp_path / "a").exists()


def test_broken_adapter_directories_name_the_problem(tmp_path):
    base_dir, model, lora = trained_adapter(tmp_path)
    save_adapter(tmp_path / "adapter", model, byte_tokenizer(), base_dir, lora)
    config_path, weights_path = tmp_path / "adapter" / "adapter_config.json", tmp_path / "adapter" / "adapter.safetensors"
    meta = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**meta, "rank": 0}))
    with pytest.raises(ScratchLMError, match="adapter_config.json: lora config field rank"):
        load_model(tmp_path / "adapter")
    config_path.write_text(json.dumps({**meta, "base_hash": None}))
    with pytest.raises(ScratchLMError, match="adapter_config.json: field base_hash must be a non-empty string"):
        load_model(tmp_path / "adapter")
    config_path.write_text(json.dumps({**meta, "format_version": 9}))
    with pytest.raises(ScratchLMError, match="adapter_config.json: format_version 9"):
        load_config(tmp_path / "adapter")
    config_path.write_text(json.dumps({**meta, "base_relative": "."}))
    with pytest.raises(ScratchLMError, match="adapter .*adapter: its base .*adapter is built on this adapter directory"):
        load_config(tmp_path / "adapter")
    config_path.write_text(json.dumps(meta))
    tensors = load_file(weights_path)
    save_file({k: v for k, v in tensors.items() if "blocks.1." not in k}, weights_path)
    with pytest.raises(ScratchLMError, match=r"adapter.safetensors: the adapter tensors do not match.*missing: blocks.1"):
        load_model(tmp_path / "adapter")
    weights_path.unlink()
    with pytest.raises(ScratchLMError, match="adapter.safetensors: not found"):
        read_adapter_weights(tmp_path / "adapter")


def test_a_directory_holds_one_kind_after_overwriting(tmp_path):
    base_dir, model, lora = trained_adapter(tmp_path)
    save_model(tmp_path / "out", make_model("llama"), byte_tokenizer())
    save_adapter(tmp_path / "out", model, byte_tokenizer(), base_dir, lora, overwrite=True)
    assert not (tmp_path / "out" / "config.json").exists() and is_adapter_directory(tmp_path / "out")
    save_model(tmp_path / "out", make_model("llama"), byte_tokenizer(), overwrite=True)
    assert not is_adapter_directory(tmp_path / "out") and not (tmp_path / "out" / "adapter.safetensors").exists()
    # Merging an adapter directory into itself turns it into a model directory.
    save_adapter(tmp_path / "out", model, byte_tokenizer(), base_dir, lora, overwrite=True)
    with pytest.raises(ScratchLMError, match="not empty.*--overwrite"):
        merge_adapter(tmp_path / "out", tmp_path / "out")
    merge_adapter(tmp_path / "out", tmp_path / "out", overwrite=True)
    assert not is_adapter_directory(tmp_path / "out") and (tmp_path / "out" / "config.json").exists()
    torch.testing.assert_close(load_model(tmp_path / "out")[0](ids()), model(ids()), atol=1e-5, rtol=1e-5)
    assert {"adapter_config.json", "adapter.safetensors", "config.json", "model.safetensors"} <= set(model_files())
