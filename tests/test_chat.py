"""`moelocal chat`: piped stdin (lines in, replies out) and a real terminal (streaming, Ctrl-C)."""

import os
import select
import subprocess
import sys
import time

import pytest

import moelocal
from moelocal.chat import Chat

EXE = [sys.executable, "-m", "moelocal.cli"]


def run_chat(stdin: str, *args):
    return subprocess.run([*EXE, "chat", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_two_turns_stats_reset_over_a_pipe():
    proc = run_chat("Hello there\nHow are you?\n/stats\n/reset\nAgain\n/exit\nnever read\n",
                    "-n", "6")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    engine = moelocal.load()
    first = [{"role": "user", "content": "Hello there"}]
    reply1 = engine.generate(engine.chat_prompt(first), max_new_tokens=6).text
    second = first + [{"role": "assistant", "content": reply1},
                      {"role": "user", "content": "How are you?"}]  # fmt: skip
    reply2 = engine.generate(engine.chat_prompt(second), max_new_tokens=6).text
    after_reset = engine.generate(engine.chat_prompt([{"role": "user", "content": "Again"}]),
                                  max_new_tokens=6).text  # fmt: skip
    lines = proc.stdout.split("\n")
    assert lines[0] == reply1 and lines[1] == reply2  # the history went into the second turn
    assert "decode tok/s" in proc.stdout and "hit rate" in proc.stdout  # the /stats table
    assert after_reset in proc.stdout.split("stats")[-1]  # /reset: a fresh conversation
    assert "conversation reset" in proc.stderr
    assert "never read" not in proc.stdout + proc.stderr


def test_system_prompt_and_unknown_command():
    proc = run_chat("/nonsense\nHi\n", "-n", "3", "--system", "Be brief.")
    assert proc.returncode == 0
    assert "unknown command /nonsense" in proc.stderr
    engine = moelocal.load()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert proc.stdout.startswith(engine.generate(engine.chat_prompt(messages),
                                                  max_new_tokens=3).text)  # fmt: skip


def test_oldest_turns_are_dropped_to_fit_the_context(capsys, random_model):
    engine = moelocal.load(random_model, context=200)
    chat = Chat(engine, max_new_tokens=40)
    chat.run(["first message " * 4, "second message " * 4, "third message " * 4])
    notes = capsys.readouterr().err
    assert "dropped" in notes
    assert len(engine.chat_prompt(chat.messages())) <= 200
    assert chat.session.history[-2]["content"].startswith("third")


def test_message_too_long_for_the_context_is_one_error(capsys):
    chat = Chat(moelocal.load(context=64), max_new_tokens=8)
    chat.run(["x" * 500, "/exit"])
    err = capsys.readouterr().err
    assert "error:" in err and "does not fit the context" in err
    assert chat.session.history == []


def test_model_without_chat_template_falls_back_to_a_transcript(tmp_path, tiny):
    import shutil

    from moelocal.chat import transcript

    path = tmp_path / "m"
    shutil.copytree(tiny("olmoe")[0], path)
    (path / "tokenizer_config.json").write_text("{}")
    proc = subprocess.run([*EXE, "chat", str(path), "-n", "4"], input="hi\n",
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "no chat template" in proc.stderr and "transcript" in proc.stderr
    engine = moelocal.load(path)
    ids = engine.encode(transcript([{"role": "user", "content": "hi"}]))
    expected = engine.generate(ids, max_new_tokens=4, stop=["\nUser:"]).text
    assert proc.stdout.split("\n")[0] == expected


def test_no_chat_template_option_and_a_line_that_is_not_utf8():
    proc = subprocess.run([*EXE, "chat", "--no-chat-template", "-n", "3"],
                          input=b"caf\xe9 au lait\nHello\n", capture_output=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.decode()
    assert "error:" in err and "Unicode" in err and "Traceback" not in err
    assert "no chat template" not in err  # asked for, not a fallback
    engine = moelocal.load()
    from moelocal.chat import transcript

    ids = engine.encode(transcript([{"role": "user", "content": "Hello"}]))
    expected = engine.generate(ids, max_new_tokens=3, stop=["\nUser:"]).text
    assert expected in proc.stdout.decode()


def test_a_closed_stdout_pipe_ends_quietly():
    """moelocal generate ... | head -c 1: no traceback, no error line."""
    proc = subprocess.Popen([*EXE, "generate", "-p", "hi", "-n", "40", "--no-chat-template"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.read(1)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in stderr and "error:" not in stderr, stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs a POSIX pseudo-terminal")
def test_real_terminal_streams_and_ctrl_c_returns_to_the_prompt(random_model):
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: moelocal chat in a real terminal, on a model that never stops
        os.execv(sys.executable, [*EXE, "chat", str(random_model), "-n", "4000"])

    def read_until(marker: bytes, seconds: float) -> bytes:
        buf, end = b"", time.time() + seconds
        while time.time() < end and marker not in buf:
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    buf += os.read(fd, 4096)
                except OSError:
                    break
        return buf

    try:
        assert b"> " in read_until(b"> ", 120)
        os.write(fd, b"Tell me a long story\r")
        first = read_until(b"\x00never", 2.0)  # two seconds of a 4000-token reply
        assert len(first) > 40  # tokens arrive while the reply is being generated
        os.write(fd, b"\x03")  # Ctrl-C
        start = time.time()
        rest = read_until(b"> ", 30)
        assert b"> " in rest and time.time() - start < 10
        assert b"stopped" in rest
        os.write(fd, b"/exit\r")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
