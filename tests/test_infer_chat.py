"""`scratchlm chat`: fitting the conversation to the context, the loop on a real engine
(in-process), and the command in a pseudo-terminal, driven as a user drives it."""

from __future__ import annotations

import io
import os
import pty
import select
import signal
import sys
import time
from dataclasses import replace

import pytest

from scratchlm.cli import main
from scratchlm.infer.chat import Conversation, chat_loop, terminal_text
from scratchlm.post.chat import render_prompt
from scratchlm.tokenizer import Tokenizer
from tests.conftest import REPO_ROOT
from tests.tiny_chat import save_tiny_model

HELLO = "hello there how are you"  # 30 tokens rendered alone in a chat model's prompt


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("chat") / "model", chat=True, context_length=64)


@pytest.fixture(scope="module")
def roomy_dir(tmp_path_factory):
    """A chat model with room for whole conversations of random replies (which re-encode
    to more tokens than were sampled: the bytes of U+FFFD)."""
    return save_tiny_model(tmp_path_factory.mktemp("roomy") / "model", chat=True, context_length=256)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("base") / "model", chat=False, context_length=64)


# --------------------------------------------------------------------------- fitting the context
def test_fit_drops_the_oldest_exchanges_and_keeps_the_system_prompt(chat_dir):
    tokenizer = Tokenizer.load(chat_dir)
    exchanges = [("one", "first answer"), ("two", "second answer"), ("three", "third answer")]
    conversation = Conversation("be brief", list(exchanges))
    everything = render_prompt(tokenizer, conversation.messages("four"))
    assert conversation.fit(tokenizer, "four", len(everything)) == (everything, 0)

    last_only = render_prompt(tokenizer, Conversation("be brief", exchanges[2:]).messages("four"))
    ids, dropped = conversation.fit(tokenizer, "four", len(last_only))
    assert (ids, dropped) == (last_only, 2)
    assert conversation.exchanges == exchanges[2:]  # dropped for good, the system prompt kept
    assert tokenizer.decode(ids).count("be brief") == 1


def test_fit_refuses_a_message_that_does_not_fit_alone_and_changes_nothing(chat_dir):
    tokenizer = Tokenizer.load(chat_dir)
    conversation = Conversation(None, [("one", "first answer")])
    alone = render_prompt(tokenizer, [{"role": "user", "content": HELLO}])
    assert conversation.fit(tokenizer, HELLO, len(alone) - 1) == (None, 0)
    assert conversation.exchanges == [("one", "first answer")]


# --------------------------------------------------------------------------- the loop, in-process
class _Recorder(io.StringIO):
    """An output stream that remembers each write, to see a reply arrive in pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


class _Engine:
    """The real engine, seen through what the chat loop sends it; `interrupt_after` makes the
    next reply raise KeyboardInterrupt after that many deltas, as Ctrl-C would."""

    def __init__(self, engine) -> None:
        self.engine, self.tokenizer, self.context_length = engine, engine.tokenizer, engine.context_length
        self.prompts: list[str] = []
        self.cancelled = 0
        self.interrupt_after: int | None = None

    def submit(self, ids, params):
        self.prompts.append(self.tokenizer.decode(ids))
        stream, limit, self.interrupt_after = self.engine.submit(ids, params), self.interrupt_after, None
        outer = self

        class Interrupting:
            finish_reason = property(lambda _: stream.finish_reason)

            def __iter__(self):
                for n, delta in enumerate(stream):
                    if n == limit:
                        raise KeyboardInterrupt
                    yield delta

            def cancel(self):
                outer.cancelled += 1
                stream.cancel()

        return Interrupting()


@pytest.fixture
def engine(roomy_dir):
    from scratchlm.infer.engine import Engine, SamplingParams

    engine = Engine.from_directory(roomy_dir, device="cpu", max_batch=1)
    engine.start()
    yield _Engine(engine), SamplingParams(max_tokens=16, temperature=1.0, seed=3)
    engine.shutdown(drain=False)


def _run(engine, params, lines: list[str], **kwargs) -> _Recorder:
    output = _Recorder()
    chat_loop(engine, params, input=io.StringIO("".join(f"{line}\n" for line in lines)), output=output,
              **kwargs)
    return output


def test_replies_stream_and_the_conversation_is_sent_back_each_turn(engine):
    engine, params = engine
    output = _run(engine, params, ["hi", "and then?", "/exit"], system="be brief")
    text = output.getvalue()
    assert "chat model (ChatML), context 256 tokens, replies up to 16 tokens" in text
    assert text.count(">>> ") == 3  # a prompt before each line, including /exit
    # The first reply arrived in more than one write, between the first two prompts.
    first, second = [i for i, piece in enumerate(output.writes) if piece == ">>> "][:2]
    first_reply = output.writes[first + 1:second]
    assert len([piece for piece in first_reply if piece.strip()]) > 1
    # The second request held the system prompt and the first exchange, reply included.
    reply = "".join(first_reply).strip().splitlines()[0]
    assert engine.prompts[1].count("be brief") == 1 and "<|im_start|>user\nhi<|im_end|>" in engine.prompts[1]
    assert reply in terminal_text(engine.prompts[1])


def test_a_seeded_session_is_reproducible(engine):
    engine, params = engine
    lines = ["hi", "again", "/exit"]
    assert _run(engine, params, lines).getvalue() == _run(engine, params, lines).getvalue()


def test_commands_change_the_conversation(engine):
    engine, params = engine
    output = _run(engine, params, ["/system talk like a pirate", "hi", "/reset", "hello", "/system",
                                   "/nonsense", "bye"]).getvalue()
    assert "[system prompt set]" in output and "[system prompt removed]" in output
    assert "[conversation forgotten (the system prompt stays)]" in output
    assert "[unknown command /nonsense: /reset" in output
    turns = [prompt.count("<|im_start|>user") for prompt in engine.prompts]
    assert turns == [1, 1, 2]  # /reset forgot "hi" and its reply; "hello" and its reply stayed
    assert ["pirate" in prompt for prompt in engine.prompts] == [True, True, False]
    assert output.endswith(">>> \n")  # end of input ends the session


def test_ctrl_c_mid_reply_stops_it_and_keeps_what_was_written(engine):
    engine, params = engine
    engine.interrupt_after = 3
    output = _run(engine, params, ["hi", "go on", "/exit"])
    assert engine.cancelled == 1 and "[stopped]\n" in output.writes
    written = "".join(output.writes[output.writes.index(">>> ") + 1:output.writes.index("[stopped]\n")]).strip()
    assert written and written in terminal_text(engine.prompts[1])  # the partial reply is kept
    assert output.getvalue().count(">>> ") == 3  # and the session went on


def test_a_message_too_long_for_the_context_is_not_sent(engine):
    engine, params = engine
    output = _run(engine, replace(params, max_tokens=240), [HELLO, "/exit"]).getvalue()
    assert "[message not sent: too long to leave 240 tokens for the reply in the 256-token context;" in output
    assert engine.prompts == []


# --------------------------------------------------------------------------- the command, in a terminal
class Terminal:
    """`scratchlm chat ...` in a pseudo-terminal: its own session and controlling terminal, so
    Ctrl-C typed there is a SIGINT for it, as in a real one. `runner` is the module run (one
    of the tests' wrappers around the CLI, or the CLI itself). Deadlines only guard against
    hangs."""

    def __init__(self, *args: str, runner: tuple[str, ...] = ("scratchlm",)) -> None:
        path = [str(REPO_ROOT / "src"), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb", "PYTHONPATH": os.pathsep.join(path)}
        pid, fd = pty.fork()
        if pid == 0:  # the child: become the command
            try:
                os.execve(sys.executable, [sys.executable, "-m", *runner, "chat", *args], env)
            finally:
                os._exit(127)
        self.pid, self.fd, self.seen, self.read_to = pid, fd, "", 0

    def _read(self, waiting_for: str, end: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, end - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {waiting_for} after {self.seen[self.read_to:]!r}")
        try:
            chunk = os.read(self.fd, 4096)
        except OSError:  # EIO: the child has gone and closed the terminal
            chunk = b""
        if not chunk:
            raise AssertionError(f"the program ended before {waiting_for}: {self.seen[self.read_to:]!r}")
        self.seen += chunk.decode("utf-8", "replace").replace("\r\n", "\n")

    def expect(self, needle: str, deadline_s: float = 120) -> str:
        """Wait for `needle` after what earlier calls consumed; return the text up to its end."""
        end = time.monotonic() + deadline_s
        while needle not in self.seen[self.read_to:]:
            self._read(repr(needle), end)
        start = self.read_to
        self.read_to = self.seen.index(needle, start) + len(needle)
        return self.seen[start:self.read_to]

    def more(self, deadline_s: float = 120) -> str:
        """Wait for any output after what earlier calls consumed; consume and return it."""
        end = time.monotonic() + deadline_s
        while len(self.seen) == self.read_to:
            self._read("more output", end)
        start, self.read_to = self.read_to, len(self.seen)
        return self.seen[start:]

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def exit_code(self, deadline_s: float = 60) -> int:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            try:  # keep the terminal drained so the child never blocks writing
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.seen += os.read(self.fd, 4096).decode("utf-8", "replace").replace("\r\n", "\n")
            except OSError:
                pass
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("the program did not exit")


def test_terminal_chat_with_a_chat_model(chat_dir):
    term = Terminal(str(chat_dir), "--max-tokens", "16", "--seed", "1", "--device", "cpu")
    banner = term.expect(">>> ")
    assert "chat model (ChatML), context 64 tokens, replies up to 16 tokens" in banner
    assert "plain text" not in banner and "/reset forgets the conversation" in banner
    term.type(HELLO + "\r")
    reply = term.expect(">>> ")  # the echo of the message, the streamed reply, the prompt again
    assert reply.startswith(HELLO + "\n")
    assert reply[len(HELLO) + 1:-len(">>> ")].strip()
    # Two 30-token messages and the reply cannot share 64 - 16 tokens: the first goes.
    term.type(HELLO + "\r")
    assert "[dropped the oldest exchange to fit the 64-token context]" in term.expect(">>> ")
    term.type("/system be brief\r")
    assert "[system prompt set]" in term.expect(">>> ")
    term.type("/reset\r")
    assert "[conversation forgotten (the system prompt stays)]" in term.expect(">>> ")
    # Ctrl-C at the prompt: a hint, not the end. Python's terminal input() checks for signals
    # only when its wait for input is interrupted, so a SIGINT that lands between the prompt
    # being written and that wait starting (the test types as soon as it sees the prompt; a
    # person cannot) is noticed only when more input comes: pressing Ctrl-C again is what a user does.
    term.type("\x03")
    try:
        hint = term.expect(">>> ", deadline_s=10)
    except AssertionError:
        term.type("\x03")
        hint = term.expect(">>> ")
    assert "[/exit or Ctrl-D quits]" in hint
    term.type("/exit\r")
    assert term.exit_code() == 0


def test_terminal_chat_with_a_base_model_uses_plain_text(base_dir):
    term = Terminal(str(base_dir), "--max-tokens", "8", "--temperature", "0", "--device", "cpu")
    banner = term.expect(">>> ")
    assert "base model" in banner and "no chat template: the conversation is written as plain text" in banner
    term.type("hi\r")
    assert term.expect(">>> ").startswith("hi\n")
    term.type("\x04")  # Ctrl-D: end of input ends the session
    assert term.exit_code() == 0


def test_ctrl_c_stops_a_reply_not_the_session(roomy_dir):
    # The first reply stalls after a few tokens until it is cancelled (tests/stall_reply.py),
    # so the Ctrl-C lands mid-reply, with the main thread blocked waiting for the next token.
    term = Terminal(str(roomy_dir), "--max-tokens", "64", "--seed", "2", "--device", "cpu",
                    runner=("tests.stall_reply", "--"))
    term.expect(">>> ")
    term.type("hi\r")
    term.expect("hi\n")
    assert term.more().strip()  # the reply has begun
    term.type("\x03")
    assert "[stopped]" in term.expect(">>> ")
    term.type("again\r")  # the session goes on, and so do replies
    reply = term.expect(">>> ")
    assert reply.startswith("again\n") and reply[len("again\n"):-len(">>> ")].strip()
    term.type("/exit\r")
    assert term.exit_code() == 0


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("problem", ["missing", "corrupt"])
def test_a_bad_model_directory_is_one_line(tmp_path, capsys, problem):
    model_dir = tmp_path / "model"
    if problem == "corrupt":
        model_dir.mkdir()
        (model_dir / "config.json").write_text("{not json")
    assert main(["chat", str(model_dir)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("scratchlm: error: ") and err.count("\n") == 1 and str(model_dir) in err


def test_bad_sampling_options_fail_before_loading(capsys, tmp_path):
    assert main(["chat", str(tmp_path / "nowhere"), "--temperature", "-1"]) == 1
    assert "temperature must be a number >= 0" in capsys.readouterr().err
