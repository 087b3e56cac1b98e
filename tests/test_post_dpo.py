"""`scratchlm dpo`: the loss against a hand computation and TRL's documented formula, the
gradient vanishing with beta, the reference frozen, and a run that learns the preferences."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scratchlm.model.directory import load_model
from scratchlm.post import FinetuneSettings, dpo, sft
from scratchlm.post.preference import REFERENCE_FILE, PairLoader, dpo_loss, reference_logps
from tests.test_post_sft import PHRASES, SOUNDS, base_dir, data_file  # noqa: F401  (fixtures)

POLICY_CHOSEN = torch.tensor([-5.0, -12.5, -3.25, -40.0])
POLICY_REJECTED = torch.tensor([-6.0, -11.0, -9.5, -2.0])
REF_CHOSEN = torch.tensor([-5.5, -12.0, -4.0, -41.0])
REF_REJECTED = torch.tensor([-5.0, -12.0, -9.0, -3.0])


def test_loss_equals_a_hand_computation_and_trls_formula():
    beta = 0.1
    loss, chosen, rejected = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta)
    for i in range(4):
        z = beta * ((POLICY_CHOSEN[i] - REF_CHOSEN[i]) - (POLICY_REJECTED[i] - REF_REJECTED[i])).item()
        assert loss[i].item() == pytest.approx(math.log(1 + math.exp(-z)), rel=1e-6)
        assert chosen[i].item() == pytest.approx(beta * (POLICY_CHOSEN[i] - REF_CHOSEN[i]).item())
    # TRL's DPOTrainer, loss_type="sigmoid", label_smoothing=0 (its documentation):
    # logits = (pi_logratios - ref_logratios); losses = -F.logsigmoid(beta * logits)
    logits = (POLICY_CHOSEN - POLICY_REJECTED) - (REF_CHOSEN - REF_REJECTED)
    assert torch.allclose(loss, -F.logsigmoid(beta * logits), atol=1e-7)
    # Stable where log(1 + exp(-z)) would overflow.
    big, _, _ = dpo_loss(torch.tensor([-1e4]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), 1.0)
    assert big.item() == pytest.approx(1e4)


def test_gradients_vanish_as_beta_goes_to_zero():
    norms = []
    for beta in (1.0, 1e-2, 1e-4, 1e-6):
        policy_chosen = POLICY_CHOSEN.clone().requires_grad_()
        policy_rejected = POLICY_REJECTED.clone().requires_grad_()
        loss, _, _ = dpo_loss(policy_chosen, policy_rejected, REF_CHOSEN, REF_REJECTED, beta)
        loss.mean().backward()
        norms.append(torch.cat([policy_chosen.grad, policy_rejected.grad]).norm().item())
    # d loss / d policy = -beta * sigmoid(-z) (+/-): proportional to beta once z ~ 0.
    assert norms[0] > norms[1] > norms[2] > norms[3] and norms[3] < 1e-6 and norms[3] > 0


@pytest.fixture(scope="module")
def chat_dir(base_dir, data_file, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("sft") / "chat"
    sft(base_dir, [data_file], out, FinetuneSettings(steps=150, lr=3e-3, batch_size=8, micro_batch_size=8,
                                                     eval_every=0, threads=1, progress=False, val_fraction=0.1))
    return out


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """A preference that holds across prompts, so held-out pairs can show it: the answer
    once ("meow") over the answer repeated ("meow meow meow"), which SFT never showed."""
    records = [{"instruction": phrase, "input": "", "output": sound, "chosen": sound,
                "rejected": " ".join([sound] * (2 + i % 2))}
               for i, (phrase, sound) in enumerate((p.format(a), s) for a, s in SOUNDS.items() for p in PHRASES)]
    path = tmp_path_factory.mktemp("pairs") / "pairs.json"
    path.write_text(json.dumps(records))
    return path


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dpo_learns_the_preferences_against_a_frozen_reference(chat_dir, pairs_file, tmp_path):
    weights_before = _digest(chat_dir / "model.safetensors")
    out = tmp_path / "dpo"
    summary = dpo(chat_dir, [pairs_file], out, FinetuneSettings(steps=40, lr=3e-4, batch_size=4, micro_batch_size=2,
                                                                eval_every=20, threads=1, progress=False,
                                                                val_fraction=0.25), beta=0.5)
    assert summary["val_preference_accuracy"] >= 0.8 and summary["val_reward_margin"] > 0
    assert summary["val_loss"] < summary["base_val_loss"] == pytest.approx(math.log(2), abs=1e-3)
    # The reference is the SFT model, untouched: its weights file is the same, and the stored
    # reference log-probabilities are what it computes now.
    assert _digest(chat_dir / "model.safetensors") == weights_before
    reference, _ = load_model(chat_dir)
    for split in ("train", "val"):
        loader = PairLoader(out / "data", split, 4, reference.config.context_length, with_reference=False)
        stored = np.load(out / "data" / REFERENCE_FILE.format(split=split))
        assert np.allclose(reference_logps(reference, loader), stored, atol=1e-4)
    # ... while the policy moved away from it.
    policy, _ = load_model(out)
    assert any(not torch.equal(a, b) for a, b in zip(policy.state_dict().values(), reference.state_dict().values()))
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["kind"] == "eval"] == [0, 20, 40]
    assert (out / "loss.png").is_file()


def test_a_base_model_is_refused(base_dir, pairs_file, tmp_path):  # noqa: F811
    from scratchlm.errors import ScratchLMError

    with pytest.raises(ScratchLMError, match="not a chat model"):
        dpo(base_dir, [pairs_file], tmp_path / "out")
    assert not (tmp_path / "out").exists()
