"""A model's reasoning apart from its answer, token by token.

Reasoning models write their thinking before the answer, marked by tokens of their vocabulary:
Qwen3, GLM-4.5 and DeepSeek-R1 between `<think>` and `</think>`; gpt-oss in harmony's channels
(`<|channel|>analysis<|message|>...<|end|>`, the answer in the `final` channel). A splitter says
for each generated token whether it is reasoning, answer, or markup that belongs to neither, so
that chat can show (or hide) the reasoning apart, keep only the answer in its history, and
`generate --json` and batch records carry the reasoning in a field of its own.
"""

REASONING, ANSWER = "reasoning", "answer"


class ThinkTags:
    """`<think>`...`</think>`. A template that opens the block in the prompt (its last <think>
    not closed) starts the reply in it."""

    def __init__(self, open_id: int, close_id: int, prompt: list[int]):
        self.open_id, self.close_id = open_id, close_id
        last_open = max((i for i, t in enumerate(prompt) if t == open_id), default=-1)
        last_close = max((i for i, t in enumerate(prompt) if t == close_id), default=-1)
        self.thinking = last_open > last_close

    def route(self, token: int) -> str | None:
        if token in (self.open_id, self.close_id):
            self.thinking = token == self.open_id
            return None
        return REASONING if self.thinking else ANSWER


class Harmony:
    """gpt-oss's messages: `<|start|>`role, `<|channel|>`name, `<|message|>`text, ended by
    `<|end|>`, `<|return|>` or `<|call|>`. The `final` channel is the answer, any other
    (analysis, commentary) reasoning; markup and headers are neither."""

    def __init__(self, ids: dict[str, int], prompt: list[int], decode):
        self.ids, self.decode = ids, decode
        self.ends = {ids[name] for name in ("end", "return", "call") if name in ids}
        markers = {ids["start"], ids["channel"], ids["message"]} | self.ends
        last = next((t for t in reversed(prompt) if t in markers), None)
        # the generation prompt ends in a header (<|start|>assistant): the reply opens with one
        self.header = last in (ids["start"], ids["channel"])
        self.channel_tokens: list[int] | None = [] if last == ids["channel"] else None
        self.part = ANSWER

    def route(self, token: int) -> str | None:
        ids = self.ids
        if token == ids["start"]:
            self.header, self.channel_tokens = True, None
        elif token == ids["channel"]:
            self.header, self.channel_tokens = True, []
        elif token == ids["message"]:
            name = self.decode(self.channel_tokens or []).strip()
            self.header, self.part = False, ANSWER if name in ("", "final") else REASONING
        elif token in self.ends:
            self.header = False
        elif self.header:
            if self.channel_tokens is not None:
                self.channel_tokens.append(token)
        else:
            return self.part
        return None


HARMONY_TOKENS = {"start": "<|start|>", "channel": "<|channel|>", "message": "<|message|>",
                  "end": "<|end|>", "return": "<|return|>", "call": "<|call|>"}  # fmt: skip


def splitter(tokenizer, prompt: list[int]):
    """A splitter for this tokenizer's reasoning markup, fresh for one reply, or None where its
    vocabulary has none."""
    if tokenizer is None:
        return None
    find = tokenizer.hf.token_to_id
    harmony = {name: find(text) for name, text in HARMONY_TOKENS.items()}
    harmony = {name: i for name, i in harmony.items() if i is not None}
    if {"start", "channel", "message", "end"} <= set(harmony):
        return Harmony(harmony, prompt, tokenizer.decode)
    open_id, close_id = find("<think>"), find("</think>")
    if open_id is not None and close_id is not None:
        return ThinkTags(open_id, close_id, prompt)
    return None
