"""The batched streaming inference engine (scratchlm.infer.engine) and its samplers.

Two kinds of model: a small random transformer with large weights (peaked logits, real
attention), and a scripted "chain" model whose next token depends only on the current one,
so the exact text it writes (emoji, CJK, stop strings) can be chosen.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from scratchlm.errors import ScratchLMError
from scratchlm.infer.engine import Completion, Delta, Engine, SamplingParams
from scratchlm.infer.sampling import (
    apply_presence_frequency, apply_repetition_penalty, draw, min_p_filter, top_k_filter, top_p_filter,
)
from scratchlm.infer.text import IncrementalText
from scratchlm.model import ModelConfig, Transformer
from scratchlm.tokenizer import Tokenizer
from tests.tiny_chat import peaked_tiny_model

VOCAB = 257  # byte tokenizer: 256 bytes + <|endoftext|>
EOT = 256


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])


@pytest.fixture(scope="module")
def model() -> Transformer:
    return peaked_tiny_model(VOCAB, context_length=48)


def chain_model(text: str, start: str, second: dict[int, int] | None = None) -> Transformer:
    """A model that, given the current byte, writes the next byte of `start + text` (then
    <|endoftext|>): every block adds nothing, so the logits are lm_head(norm(embedding)) and
    the embedding of token c is the unit vector c. `second`: a runner-up successor per
    token, half as likely in logits."""
    sequence = list((start + text).encode()) + [EOT]
    assert len(set(sequence[:-1])) == len(sequence) - 1, "each byte needs one successor"
    config = ModelConfig.from_preset("tiny", vocab_size=VOCAB, context_length=32, d_model=264,
                                     n_layers=1, n_heads=4, n_kv_heads=4, d_ff=64, tie_embeddings=False)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.norm.weight.fill_(1.0)
        model.tok_emb.weight.copy_(torch.eye(VOCAB, config.d_model))
        model.lm_head.weight[EOT, :] = 1.0  # by default, any token ends the text
        for current, following in zip(sequence, sequence[1:]):
            model.lm_head.weight[following, current] = 10.0
        for current, runner_up in (second or {}).items():
            model.lm_head.weight[runner_up, current] = 5.0
    return model.eval()


def run(engine: Engine, prompt: list[int], **params) -> Completion:
    return engine.generate(prompt, SamplingParams(**params))


def greedy_without_cache(model: Transformer, prompt: list[int], steps: int) -> tuple[list[int], float]:
    """Greedy continuation recomputed from scratch at every step, and the smallest gap
    between the best and second-best logit met on the way."""
    tokens, gap = list(prompt), float("inf")
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([tokens]))[0, -1]
            top2 = logits.topk(2).values
            gap = min(gap, float(top2[0] - top2[1]))
            tokens.append(int(logits.argmax()))
    return tokens[len(prompt):], gap


# --------------------------------------------------------------------------- generation
def test_greedy_equals_recomputing_the_whole_sequence(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=4)
    prompt = [5, 100, 42, 7]
    expected, _ = greedy_without_cache(model, prompt, 20)
    expected = expected[:expected.index(EOT)] if EOT in expected else expected
    result = run(engine, prompt, max_tokens=20, temperature=0)
    assert result.token_ids == expected
    assert result.text == tokenizer.decode(expected)
    assert (result.prompt_tokens, result.completion_tokens) == (4, len(expected))
    assert engine.running == engine.waiting == 0


def test_a_request_gives_the_same_output_alone_or_batched(model, tokenizer):
    """Greedy and seeded sampling, with every sampler setting, alone vs in a batch that
    changes while they run (requests of other lengths, one leaving early, one joining
    late). Batched matmuls round differently from one-row ones (~1e-5), so this holds
    where no choice is a near-tie: the greedy gaps are checked to be far above that."""
    requests = {
        "greedy": ([5, 100, 42, 7, 9], dict(temperature=0)),
        "top_k": ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], dict(temperature=1.0, top_k=20, seed=1)),
        "mixed": ([200, 13, 77], dict(temperature=0.7, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
                                      presence_penalty=0.5, frequency_penalty=0.3, seed=2)),
        "short": (list(range(30, 47)), dict(temperature=0, max_tokens=3)),
        "late": ([99, 98, 97, 96, 95, 94, 93], dict(temperature=0)),
    }
    params = {name: SamplingParams(**{"max_tokens": 24, **p}) for name, (_, p) in requests.items()}
    alone = {name: Engine(model, tokenizer).generate(prompt, params[name]).token_ids
             for name, (prompt, _) in requests.items()}

    engine = Engine(model, tokenizer, max_batch=8)
    streams = {name: engine.submit(prompt, params[name])
               for name, (prompt, _) in requests.items() if name != "late"}
    for _ in range(4):
        engine.step()
    streams["late"] = engine.submit(requests["late"][0], params["late"])
    while engine.step():
        pass
    batched = {name: [t for d in stream for t in d.token_ids] for name, stream in streams.items()}
    assert batched == alone
    for name in ("greedy", "late"):
        prompt = requests[name][0]
        _, gap = greedy_without_cache(model, prompt, len(alone[name]))
        assert gap > 1e-3, f"{name}: a near-tie makes this comparison meaningless"
    # The batch really changed under them: "short" left after its first steps.
    assert len(alone["short"]) <= 3 and all(len(v) == 24 for k, v in alone.items() if k != "short")


def test_requests_queue_for_rows_and_leave_nothing_behind(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2)
    streams = [engine.submit([i + 1, i + 2], SamplingParams(max_tokens=5 + i, temperature=0))
               for i in range(5)]
    assert engine.waiting == 5
    while engine.step():
        assert engine.running <= 2
        assert engine.running + engine.waiting <= 5
    assert engine.running == engine.waiting == 0
    for i, stream in enumerate(streams):
        ids = [t for d in stream for t in d.token_ids]
        assert ids == Engine(model, tokenizer).generate([i + 1, i + 2], SamplingParams(
            max_tokens=5 + i, temperature=0)).token_ids


def test_a_step_prefills_a_bounded_number_of_prompt_tokens(model, tokenizer):
    engine = Engine(model, tokenizer, prefill_tokens_per_step=9)
    for length in (4, 4, 4, 12, 3):
        engine.submit(list(range(1, length + 1)), SamplingParams(max_tokens=20, temperature=0))
    running = []
    for _ in range(4):
        engine.step()
        running.append(engine.running)
    assert running == [2, 3, 4, 5]  # 4 + 4; 4 (12 more would exceed 9); 12 alone; 3


def test_kv_cache_rows_are_views_and_rows_can_move(model):
    cache = model.new_kv_cache(3, 16)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), kv_cache=cache.rows(1, 2))
    assert cache.lengths.tolist() == [0, 3, 0]
    assert cache.keys[:, 1, :, :3].abs().sum() > 0 and cache.keys[:, 0].abs().sum() == 0
    cache.copy_row(1, 2)
    assert cache.lengths.tolist() == [0, 3, 3]
    assert torch.equal(cache.keys[:, 2, :, :3], cache.keys[:, 1, :, :3])
    assert torch.equal(cache.values[:, 2, :, :3], cache.values[:, 1, :, :3])


def test_seeds_make_sampling_reproducible(model, tokenizer):
    engine = Engine(model, tokenizer)
    def sample(seed):
        return run(engine, [1], max_tokens=20, temperature=1.5, seed=seed).token_ids
    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_lengths_max_tokens_and_context(model, tokenizer):
    engine = Engine(model, tokenizer)  # context 48
    assert run(engine, [1, 2], max_tokens=1, temperature=0).completion_tokens <= 1
    # Prompt + completion never exceed the context: a long prompt leaves 48 - 45 = 3 tokens.
    stop_free = SamplingParams(max_tokens=40, temperature=0)
    result = engine.generate(list(range(60, 105)), stop_free)
    assert result.completion_tokens <= 3
    if result.finish_reason == "length":
        assert result.completion_tokens == 3
    for prompt, message in (([], "empty"), (list(range(48)), "context length is 48"),
                            ([1, 300], "300, which is not a token id"), ([1, -1], "-1")):
        with pytest.raises(ScratchLMError, match=message):
            engine.submit(prompt, SamplingParams())
    assert run(engine, [1], max_tokens=10**9, temperature=0).completion_tokens <= 47  # clipped
    with pytest.raises(ScratchLMError, match="stop_token_ids: 999"):
        engine.submit([1], SamplingParams(stop_token_ids=(999,)))
    with pytest.raises(ScratchLMError, match="integer token ids"):
        engine.submit([1.5], SamplingParams())


def test_context_reached_ends_with_length(tokenizer):
    engine = Engine(chain_model("abcdefghijklmnopqrstuvwxyz0123456789", "@"), tokenizer)  # context 32
    result = run(engine, list(b"@"), max_tokens=32, temperature=0)
    assert (result.text, result.finish_reason) == ("abcdefghijklmnopqrstuvwxyz01234", "length")
    assert result.prompt_tokens + result.completion_tokens == 32


def test_params_are_checked_by_field():
    for field, value in (("max_tokens", 0), ("temperature", -1.0), ("temperature", float("nan")),
                         ("top_k", 0), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 1.5),
                         ("repetition_penalty", 0.0), ("presence_penalty", 2.5),
                         ("frequency_penalty", -3.0), ("stop", ("",)), ("stop_token_ids", (-1,)),
                         ("seed", -1), ("max_tokens", True), ("stop", 5), ("stop_token_ids", "7")):
        with pytest.raises(ScratchLMError, match=field):
            SamplingParams(**{field: value}).check()
    SamplingParams(top_k=1, top_p=1.0, min_p=0.0, presence_penalty=-2.0, seed=0).check(context_length=256)
    assert SamplingParams(stop="\n").stop == ("\n",) and SamplingParams(stop=None).stop == ()
    assert SamplingParams(stop=["a", "b"], stop_token_ids=[3]) == SamplingParams(stop=("a", "b"), stop_token_ids=(3,))


# --------------------------------------------------------------------------- text
def test_deltas_never_split_a_character(tokenizer):
    """Byte tokens split 世 (3 bytes) and 👋 (4 bytes): the deltas of their first bytes
    are empty and the character comes whole with its last byte."""
    engine = Engine(chain_model("世👋b", "a"), tokenizer)
    stream = engine.submit(list(b"a"), SamplingParams(temperature=0))
    deltas = list(stream)
    assert [d.text for d in deltas] == ["", "", "世", "", "", "", "👋", "b", ""]
    assert [len(d.token_ids) for d in deltas] == [1] * 8 + [0]  # the end token is not output
    assert (deltas[-1].finish_reason, stream.finish_reason, stream.completion_tokens) == ("stop", "stop", 8)
    # Cut in the middle of a character, the text ends as Tokenizer.decode ends it.
    cut = run(engine, list(b"a"), temperature=0, max_tokens=5)
    assert (cut.text, cut.finish_reason) == (tokenizer.decode(cut.token_ids), "length")
    assert cut.text == "世\ufffd"


@pytest.mark.parametrize("stop, text, reason", [
    (("e q",), "th", "stop"),          # spans three tokens
    (("quick", "he"), "t", "stop"),    # the earliest of several wins
    (("ick!",), "the quick", "stop"),  # a prefix held back, then released at the end token
    (("x",), "the quick", "stop"),
])
def test_stop_strings_across_tokens(tokenizer, stop, text, reason):
    engine = Engine(chain_model("the quick", ">"), tokenizer)
    result = run(engine, list(b">"), temperature=0, stop=stop)
    assert (result.text, result.finish_reason) == (text, reason)


def test_text_that_may_start_a_stop_string_waits(tokenizer):
    engine = Engine(chain_model("the quick", ">"), tokenizer)
    deltas = list(engine.submit(list(b">"), SamplingParams(temperature=0, stop=("ick!",))))
    assert [d.text for d in deltas] == ["t", "h", "e", " ", "q", "u", "", "", "", "ick"]
    held = run(engine, list(b">"), temperature=0, stop=("ick!",), max_tokens=7)
    assert (held.text, held.finish_reason) == ("the qui", "length")  # released at the end


def test_incremental_text_directly():
    token_bytes = {0: "é".encode()[:1], 1: "é".encode()[1:], 2: b"ab", 3: b"c"}
    text = IncrementalText(token_bytes, stop=("bc",))
    assert text.add(0) == ("", False)
    assert text.add(1) == ("é", False)
    assert text.add(2) == ("a", False)  # "b" may begin "bc"
    assert text.add(3) == ("", True)
    plain = IncrementalText(token_bytes)
    assert [plain.add(i) for i in (2, 0)] == [("ab", False), ("", False)]
    assert plain.finish() == ("\ufffd", False)


def test_stop_token_ids_and_chat_end_tokens(tokenizer):
    engine = Engine(chain_model("help", "*"), tokenizer)
    result = run(engine, list(b"*"), temperature=0, stop_token_ids=(ord("l"),))
    assert (result.text, result.finish_reason) == ("he", "stop")
    assert engine.stop_ids() == [EOT]
    chat = Tokenizer({i: bytes([i]) for i in range(256)}, [],
                     ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], chat_template="chatml")
    config = ModelConfig.from_preset("tiny", vocab_size=259, context_length=16, d_model=32,
                                     n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64)
    assert Engine(Transformer(config), chat).stop_ids() == [258, 256]


def test_penalties_change_the_choice_of_a_seen_token(tokenizer):
    """The chain loops a -> b -> a; b's runner-up is z at half the logit. A repetition
    penalty of 3 divides the seen a's logit by 3, below z's."""
    model = chain_model("b", "a", second={ord("b"): ord("z")})
    with torch.no_grad():
        model.lm_head.weight[EOT, ord("b")] = 1.0  # b -> a instead of the end token
        model.lm_head.weight[ord("a"), ord("b")] = 10.0
    engine = Engine(model, tokenizer)
    assert run(engine, list(b"a"), temperature=0, max_tokens=4).text == "baba"
    assert run(engine, list(b"a"), temperature=0, max_tokens=2, repetition_penalty=3.0).text == "bz"
    # Presence counts generated tokens only: "a" of the prompt is not penalised...
    assert run(engine, list(b"a"), temperature=0, max_tokens=2, presence_penalty=2.0).text == "ba"
    # ...and a frequency penalty of 2 per occurrence is small beside the chain's logits
    # (about 160 for a against 80 for z).
    assert run(engine, list(b"a"), temperature=0, max_tokens=4, frequency_penalty=2.0).text == "baba"


# --------------------------------------------------------------------------- control
def test_cancel_frees_the_row_at_the_next_step(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2)
    running = engine.submit([1, 2, 3], SamplingParams(max_tokens=40, temperature=0))
    queued = [engine.submit([4], SamplingParams(max_tokens=40, temperature=0)) for _ in range(2)]
    engine.step()
    engine.step()
    assert (engine.running, engine.waiting) == (2, 1)
    running.cancel()
    queued[1].cancel()
    engine.step()
    assert (engine.running, engine.waiting) == (1, 0)
    deltas = list(running)
    assert deltas[-1] == Delta("", [], "cancelled")
    assert running.finish_reason == "cancelled" and queued[1].finish_reason == "cancelled"
    while engine.step():
        pass
    assert engine.running == engine.waiting == 0
    assert queued[0].finish_reason in ("stop", "length")


def test_scheduler_thread_serves_concurrent_clients(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=3)
    engine.start()
    expected = {i: Engine(model, tokenizer).generate([i + 1], SamplingParams(max_tokens=10, temperature=0))
                for i in range(6)}
    results = {}

    def client(i):
        results[i] = engine.generate([i + 1], SamplingParams(max_tokens=10, temperature=0))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected
    slow = engine.submit([7], SamplingParams(max_tokens=30, temperature=0))
    engine.shutdown(drain=True)
    assert slow.finish_reason in ("stop", "length") and not engine.started
    with pytest.raises(ScratchLMError, match="shutting down"):
        engine.submit([1], SamplingParams())
    assert engine.running == engine.waiting == 0


def test_shutdown_without_drain_cancels(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1)
    streams = [engine.submit([1, 2], SamplingParams(max_tokens=40, temperature=0)) for _ in range(2)]
    engine.step()
    engine.shutdown(drain=False)
    assert [s.finish_reason for s in streams] == ["cancelled", "cancelled"]
    assert engine.running == engine.waiting == 0


def test_a_failing_scheduler_ends_every_stream_with_the_error(model, tokenizer, monkeypatch):
    engine = Engine(model, tokenizer)
    stream = engine.submit([1, 2], SamplingParams(max_tokens=10, temperature=0))
    engine.step()

    def broken():
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine, "_decode", broken)
    engine.start()
    with pytest.raises(ScratchLMError, match="engine stopped: out of memory"):
        list(stream)
    with pytest.raises(ScratchLMError, match="stopped after an error: out of memory"):
        engine.submit([1], SamplingParams())
    assert engine.running == engine.waiting == 0


def test_async_iteration_with_and_without_the_thread(model, tokenizer):
    expected = Engine(model, tokenizer).generate([3, 4], SamplingParams(max_tokens=12, temperature=0))

    async def consume(engine):
        streams = [engine.submit([3, 4], SamplingParams(max_tokens=12, temperature=0)) for _ in range(3)]

        async def collect(stream):
            return [t async for d in stream for t in d.token_ids]

        return await asyncio.gather(*(collect(s) for s in streams))

    threaded = Engine(model, tokenizer)
    threaded.start()
    try:
        assert asyncio.run(consume(threaded)) == [expected.token_ids] * 3
    finally:
        threaded.shutdown()
    assert asyncio.run(consume(Engine(model, tokenizer))) == [expected.token_ids] * 3


def test_from_directory(model, tokenizer, tmp_path):
    from scratchlm.model.directory import save_model

    save_model(tmp_path / "m", model, tokenizer)
    engine = Engine.from_directory(tmp_path / "m", device="cpu", max_batch=2)
    assert (engine.context_length, engine.max_batch, engine.device.type) == (48, 2, "cpu")
    assert engine.generate([5, 6], SamplingParams(max_tokens=6, temperature=0)).token_ids == \
        Engine(model, tokenizer).generate([5, 6], SamplingParams(max_tokens=6, temperature=0)).token_ids


# --------------------------------------------------------------------------- samplers
def random_logits(rows=6, vocab=50, seed=0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_samplers_match_transformers_logits_processors():
    transformers = pytest.importorskip("transformers")
    logits = random_logits()
    history = torch.randint(0, 50, (6, 12), generator=torch.Generator().manual_seed(1))
    seen = torch.zeros(6, 50, dtype=torch.bool).scatter_(1, history, True)
    column = lambda v: torch.full((6, 1), v)  # noqa: E731
    checks = [
        (transformers.RepetitionPenaltyLogitsProcessor(1.7),
         apply_repetition_penalty(logits, seen, column(1.7))),
        (transformers.TopKLogitsWarper(7), top_k_filter(logits, column(7))),
        (transformers.TopPLogitsWarper(0.8), top_p_filter(logits, column(0.8))),
        (transformers.MinPLogitsWarper(0.1), min_p_filter(logits, column(0.1))),
    ]
    for processor, ours in checks:
        assert torch.equal(ours, processor(history, logits.clone())), type(processor).__name__
    # Rows with their own settings match the reference row by row; neutral settings do nothing.
    top_k = torch.tensor([[1], [3], [50], [0], [7], [60]])
    top_p = torch.tensor([[0.1], [0.5], [0.9], [1.0], [0.99], [0.3]])
    for row in range(6):
        k, p = int(top_k[row]), float(top_p[row])
        expected_k = transformers.TopKLogitsWarper(k)(history, logits.clone())[row] if k else logits[row]
        expected_p = transformers.TopPLogitsWarper(p)(history, logits.clone())[row] if p < 1 else logits[row]
        assert torch.equal(top_k_filter(logits, top_k)[row], expected_k)
        assert torch.equal(top_p_filter(logits, top_p)[row], expected_p)


def test_presence_and_frequency_penalties_follow_openai():
    logits = random_logits(rows=2, vocab=5)
    counts = torch.tensor([[0, 1, 3, 0, 0], [2, 0, 0, 0, 1]], dtype=torch.float32)
    presence, frequency = torch.tensor([[0.5], [-1.0]]), torch.tensor([[0.25], [0.0]])
    expected = logits.clone()
    for r in range(2):
        for t in range(5):
            expected[r, t] -= float(presence[r]) * (counts[r, t] > 0) + float(frequency[r]) * counts[r, t]
    assert torch.allclose(apply_presence_frequency(logits, counts, presence, frequency), expected)


def test_draw_follows_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2])
    n = 1000
    uniforms = (torch.arange(n) + 0.5) / n
    picks = draw(probs.log().expand(n, 4), uniforms)
    assert torch.bincount(picks, minlength=4).tolist() == [500, 0, 300, 200]
    assert draw(torch.tensor([[0.0, -float("inf")]]), torch.tensor([0.999999])).tolist() == [0]


# --------------------------------------------------------------------------- kernels
def test_on_x86_cpus_the_engine_decodes_through_onednn(tokenizer):
    from torch.profiler import ProfilerActivity, profile

    from scratchlm.model.onednn import ONEDNN_LINEAR

    if not ONEDNN_LINEAR:
        pytest.skip("this PyTorch build has no oneDNN linear (not x86, or built without oneDNN)")
    engine = Engine(peaked_tiny_model(VOCAB, context_length=48), tokenizer, max_batch=2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(engine, [5, 100, 42, 7], max_tokens=4, temperature=0)
    names = {event.name for event in prof.events()}
    assert "mkldnn::_linear_pointwise" in names and "aten::linear" not in names
