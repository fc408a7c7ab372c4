"""`moelocal generate --input`: JSONL in, a line per finished prompt out, resumable, batched."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

import moelocal
from moelocal.cli import app

runner = CliRunner()


def write_jsonl(path, items):
    lines = [item if isinstance(item, str) else json.dumps(item) for item in items]
    path.write_text("\n".join(lines) + "\n")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_with_a_malformed_line(tmp_path, random_model):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [
        {"id": "a", "prompt": "Hello"},
        "{not json",
        {"id": "b", "messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 3},
        {"id": "c"},
        {"id": "d", "prompt": "x", "temperature": "hot"},
        {"id": "e", "prompt": "Bye", "seed": 1, "temperature": 0.9},
    ])  # fmt: skip
    args = ["generate", str(random_model), "-i", str(inp), "-o", str(out), "-n", "5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1  # some lines failed
    records = read_jsonl(out)
    errors = {r["line"]: r for r in records if "error" in r}
    assert set(errors) == {2, 4, 5}
    assert errors[2]["id"] is None and "invalid JSON" in errors[2]["error"]
    assert errors[4]["id"] == "c" and "prompt" in errors[4]["error"]
    assert "temperature" in errors[5]["error"]
    done = {r["id"]: r for r in records if "error" not in r}
    assert set(done) == {"a", "b", "e"}
    assert done["b"]["generated_tokens"] == 3 and done["a"]["generated_tokens"] == 5
    assert isinstance(done["a"]["text"], str) and done["a"]["prompt_tokens"] > 0
    assert "3 done, 3 failed" in result.stderr


def test_rerun_skips_what_is_done_and_keeps_it(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [{"id": i, "prompt": f"prompt {i}"} for i in range(4)])
    # a previous run finished ids 0 and 2, and was killed while writing a third line
    engine = moelocal.load()
    earlier = [{"id": i, "text": "kept", "generated_tokens": 0} for i in (0, 2)]
    out.write_text("".join(json.dumps(r) + "\n" for r in earlier) + '{"id": 1, "te')
    result = runner.invoke(app, ["generate", "-i", str(inp), "-o", str(out), "-n", "4"])
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert [r["id"] for r in records] == [0, 2, 1, 3]  # no duplicates, nothing lost
    assert records[0]["text"] == "kept"
    expected = engine.generate(engine.prompt_ids("prompt 1"), max_new_tokens=4)
    assert records[2]["token_ids"] == expected.token_ids


def test_batched_results_equal_single_results(tmp_path, random_model):
    inp = tmp_path / "in.jsonl"
    prompts = ["a", "a much longer prompt than the others", "mid length one", "b", "ccc"]
    write_jsonl(
        inp, [{"id": i, "prompt": p, "max_new_tokens": 6 + i} for i, p in enumerate(prompts)]
    )
    outs = {}
    for batch in (1, 3):
        out = tmp_path / f"out{batch}.jsonl"
        args = ["generate", str(random_model), "-i", str(inp), "-o", str(out), "--batch-size",
                str(batch), "--cache-experts", "3"]  # fmt: skip
        assert runner.invoke(app, args).exit_code == 0
        outs[batch] = {r["id"]: r["token_ids"] for r in read_jsonl(out)}
    assert outs[1] == outs[3]
    assert [len(outs[1][i]) for i in range(5)] == [6, 7, 8, 9, 10]


def test_interrupted_run_resumes_without_loss(tmp_path):
    """A real process killed with SIGINT mid-run; the rerun completes the rest exactly once."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [{"id": i, "prompt": f"p{i}", "max_new_tokens": 48} for i in range(30)])
    cmd = [sys.executable, "-m", "moelocal.cli", "generate", "-i", str(inp), "-o", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "rerun" in stderr
    partial = read_jsonl(out)
    assert 3 <= len(partial) < 30
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    ids = [r["id"] for r in read_jsonl(out)]
    assert sorted(ids) == list(range(30)) and len(ids) == 30
    assert read_jsonl(out)[: len(partial)] == partial


def test_missing_input_file(tmp_path):
    result = runner.invoke(app, ["generate", "-i", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 1 and "no such file" in result.stderr


def test_an_output_that_cannot_be_written_is_one_line(tmp_path):
    inp = tmp_path / "in.jsonl"
    write_jsonl(inp, [{"id": 1, "prompt": "Hi", "max_new_tokens": 2}])
    for out, reason in ((tmp_path, "is a directory"), (tmp_path / "no" / "o.jsonl", "no such")):
        result = runner.invoke(app, ["generate", "-i", str(inp), "-o", str(out)])
        assert result.exit_code == 1, result.output
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
        assert f"--output {out}: {reason}" in result.stderr


def test_prompt_and_input_are_exclusive(tmp_path):
    result = runner.invoke(app, ["generate", "-p", "x", "-i", str(tmp_path / "in.jsonl")])
    assert result.exit_code == 1 and "either --prompt or --input" in result.stderr


def test_stdout_when_no_output(tmp_path):
    inp = tmp_path / "in.jsonl"
    write_jsonl(inp, [{"id": 7, "prompt": "Hi", "max_new_tokens": 2}])
    result = runner.invoke(app, ["generate", "-i", str(inp)])
    assert result.exit_code == 0
    assert json.loads(result.stdout.splitlines()[0])["id"] == 7
    assert os.path.exists(inp)


def run_batch(inp, out, *args):
    return runner.invoke(app, ["generate", "-i", str(inp), "-o", str(out), "-n", "3", *args])


def test_a_last_record_without_its_newline_is_kept(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [{"id": i, "prompt": f"prompt {i}"} for i in range(3)])
    out.write_text(json.dumps({"id": 1, "text": "kept", "generated_tokens": 0}))
    assert run_batch(inp, out).exit_code == 0
    records = read_jsonl(out)
    assert [r["id"] for r in records] == [1, 0, 2] and records[0]["text"] == "kept"


@pytest.mark.parametrize("content", [
    "my notes\nline two\nthe last line, no newline",
    "first line\nsecond line\n",
    '{"id": 1, "text": "ok"}\n{"user": "data"}\n',
    '[1, 2, 3]',
])  # fmt: skip
def test_a_file_that_is_not_our_output_is_refused_untouched(tmp_path, content):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [{"id": 0, "prompt": "Hi"}])
    out.write_text(content)
    result = run_batch(inp, out)
    assert result.exit_code == 1 and "not a moelocal result" in result.stderr
    assert out.read_text() == content


def test_duplicate_ids_are_refused_before_anything_runs(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"},
                      {"id": "a", "prompt": "z"}])  # fmt: skip
    result = run_batch(inp, out)
    assert result.exit_code == 1 and "lines 1 and 3" in result.stderr
    assert not out.exists() or out.read_text() == ""


def test_failed_lines_run_again_on_a_rerun(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [{"id": "ok", "prompt": "x"}, {"id": "fix", "prompt": "y", "seed": "one"}])
    assert run_batch(inp, out).exit_code == 1
    again = run_batch(inp, out)  # nothing changed: still failing, still exit 1
    assert again.exit_code == 1 and "1 failed" in again.stderr
    write_jsonl(inp, [{"id": "ok", "prompt": "x"}, {"id": "fix", "prompt": "y", "seed": 1}])
    fixed = run_batch(inp, out)
    assert fixed.exit_code == 0, fixed.output
    records = read_jsonl(out)
    assert [r["id"] for r in records if "error" not in r] == ["ok", "fix"]


def test_bad_values_become_error_records_and_the_run_goes_on(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [
        '{"id": 1, "prompt": "a", "temperature": NaN}',
        '{"id": 2, "prompt": "b", "temperature": Infinity}',
        '{"id": 3, "prompt": "c", "seed": 1e23}',
        '{"id": 4, "prompt": "d", "seed": 100000000000000000000000000}',
        '{"id": 5, "prompt": "\\udcff lone surrogate"}',
        "[" * 100_000 + "]" * 100_000,
        '{"id": 7, "prompt": "e", "max_new_tokens": -2}',
        '{"id": NaN, "prompt": "f"}',
        '{"id": 9, "prompt": "tiny temperature", "temperature": 1e-300, "seed": 3}',
        '{"id": 10, "prompt": "good"}',
    ]
    data = "\n".join(lines).encode() + b'\n{"id": 11, "prompt": "\xff\xfe bytes"}\n'
    inp.write_bytes(data)
    result = run_batch(inp, out)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    records = read_jsonl(out)
    errors = {r["line"]: r["error"] for r in records if "error" in r}
    assert sorted(errors) == [1, 2, 3, 4, 5, 6, 7, 8, 11]
    assert "temperature" in errors[1] and "temperature" in errors[2] and "seed" in errors[3]
    assert "seed" in errors[4] and "Unicode" in errors[5] and "nested" in errors[6]
    assert "max_new_tokens" in errors[7] and "'id'" in errors[8] and "UTF-8" in errors[11]
    done = {r["id"]: r for r in records if "error" not in r}
    assert set(done) == {9, 10}
    engine = moelocal.load()
    greedy = engine.generate(engine.prompt_ids("tiny temperature"), max_new_tokens=3)
    assert done[9]["token_ids"] == greedy.token_ids  # a vanishing temperature is greedy


def test_same_file_for_input_and_output_or_output_without_input(tmp_path):
    inp = tmp_path / "in.jsonl"
    write_jsonl(inp, [{"id": 0, "prompt": "Hi"}])
    before = inp.read_text()
    result = run_batch(inp, inp)
    assert result.exit_code == 1 and "same file" in result.stderr and inp.read_text() == before
    alone = runner.invoke(app, ["generate", "-p", "Hi", "-o", str(tmp_path / "o.jsonl")])
    assert alone.exit_code == 1 and "--output goes with --input" in alone.stderr
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("option, value", [("--temperature", "-1"), ("--temperature", "nan"),
                                           ("--temperature", "inf"), ("--top-p", "0"),
                                           ("--top-p", "1.5"), ("--top-k", "-5"),
                                           ("--seed", str(2**70))])  # fmt: skip
def test_sampling_options_out_of_range_are_one_line(option, value):
    result = runner.invoke(app, ["generate", "-p", "Hi", "-n", "2", option, value])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.stderr.strip().count("\n") == 0 and result.stderr.strip(), result.output


def test_input_from_a_pipe_and_an_output_that_is_not_a_file(tmp_path):
    """-i <(...) is a pipe, not a regular file: it is read. A FIFO as --output would block on
    reading it back: refused."""
    import os

    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen(
        ["sh", "-c", f'printf \'%s\\n\' \'{{"id": 1, "prompt": "Hi"}}\' > {fifo}']
    )
    result = runner.invoke(app, ["generate", "-i", str(fifo), "-n", "2"])
    writer.wait(timeout=30)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[0])["id"] == 1
    out_fifo = tmp_path / "out.fifo"
    os.mkfifo(out_fifo)
    inp = tmp_path / "in.jsonl"
    write_jsonl(inp, [{"id": 1, "prompt": "Hi"}])
    refused = runner.invoke(app, ["generate", "-i", str(inp), "-o", str(out_fifo)])
    assert refused.exit_code == 1 and "not a regular file" in refused.stderr


@pytest.fixture
def contexts(monkeypatch):
    """The context each load in the test was asked to plan for, in order."""
    from moelocal import engine as engine_module

    asked = []
    real_load = engine_module.load

    def load(*args, **kwargs):
        asked.append(kwargs["context"])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(engine_module, "load", load)
    return asked


def test_the_plan_holds_the_kv_cache_the_lines_need(tmp_path, random_model, contexts):
    """Without --context the model is planned for what the lines to run need: batch-size rows
    of the longest prompt and the most new tokens (a budget's default context would hold too
    much for short lines and too little for a batch); bad lines and lines already done count
    for nothing, and every line then fits."""
    from moelocal.tokenizer import Tokenizer

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    long_prompt = "a b c d e f g h i j k l m n o p"
    items = [
        {"id": 1, "prompt": "Hi", "max_new_tokens": 9},
        {"id": 2, "messages": [{"role": "user", "content": long_prompt}], "max_new_tokens": 2},
        {"id": 3, "prompt": "x" * 400, "max_new_tokens": "many"},  # bad: counts for nothing
    ]
    write_jsonl(inp, items)
    tok = Tokenizer(random_model)
    longest = len(tok.encode_chat(items[1]["messages"]))
    assert longest > len(tok.encode_prompt("Hi"))
    args = ["generate", str(random_model), "-i", str(inp), "-o", str(out), "--batch-size", "3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1  # the bad line
    assert contexts == [2 * (longest + 9)]  # two good lines: two rows
    assert sorted(r["id"] for r in read_jsonl(out) if "error" not in r) == [1, 2]
    # a rerun runs the failed line again (still bad): nothing left to plan for, the default
    result = runner.invoke(app, args)
    assert contexts[1] is None
    # with --context given, that is the plan's
    write_jsonl(inp, items[:2] + [{"id": 4, "prompt": "Hi", "max_new_tokens": 3}])
    runner.invoke(app, args + ["--context", "512"])
    assert contexts[2] == 512


def test_a_line_the_budget_cannot_hold_fails_alone(tmp_path, random_model, contexts):
    """Where the lines' KV cache does not fit the budget, the plan is a budget's default and
    only the line that needs more fails (not the whole run)."""
    small = moelocal.engine.plan(random_model, device="cpu", context=256, cpu_mem=10**10)
    budget = small.fixed_bytes + 2 * small.moe_layers * small.expert_bytes
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [{"id": "short", "prompt": "Hi", "max_new_tokens": 4},
                      {"id": "long", "prompt": "Hi", "max_new_tokens": 4000}])  # fmt: skip
    args = ["generate", str(random_model), "-i", str(inp), "-o", str(out), "--device", "cpu",
            "--cpu-mem", str(budget)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert contexts == [None]
    records = {r["id"]: r for r in read_jsonl(out)}
    assert "error" not in records["short"] and "exceeds" in records["long"]["error"]
