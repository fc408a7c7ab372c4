"""Train moelocal's embedded default model: a small Mixtral on Debian's `fortunes` quotations.

    apt-get install fortunes                 # ~2.7 MB of English quotations, BSD licence
    python scripts/train_default.py --out moelocal/data/default [--steps N] [--threads T]

A byte-level BPE tokenizer (the `tokenizers` library), then transformers' MixtralForCausalLM
trained with plain torch: AdamW, warm-up and cosine decay, Mixtral's load-balancing loss (per
layer) and a router z-loss, as real MoEs are trained; nothing here shapes the routing to make
caching easy. Every 20th quotation (by a hash of its text) is held out; the script reports
held-out perplexity, routing entropy and expert load, and keeps the checkpoint of the best
held-out loss. Each quotation is trained on twice: as plain text, and as a chat reply (the
default chat template, a request naming the quotation's topic, then EOS) so that replies end.
About 15 minutes on 2 cores (0.7 s a step of 16 x 256 tokens); the corpus is small, so more
steps only overfit (held-out perplexity rises after ~3 passes).

Seeded: the same machine, torch version, and arguments give the same weights.
"""

import argparse
import copy as copy_module
import json
import math
import random
import shutil
import sys
import time
import zlib
from pathlib import Path

import jinja2
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moelocal.model_files import foreign_files  # noqa: E402
from moelocal.synthetic import CHAT_TEMPLATE  # noqa: E402

FORTUNES = Path("/usr/share/games/fortunes")
SKIP_FILES = {"ascii-art"}  # pictures, not sentences
MAX_CHARS = 600  # the toy writes short sentences; long stories are rare and mostly tables
SPECIALS = ["<unk>", "<s>", "</s>"]
REQUESTS = [
    "Tell me something about {topic}.",
    "Say something about {topic}.",
    "Give me a quote about {topic}.",
    "What do people say about {topic}?",
    "Tell me something.",
    "Say something wise.",
    "Give me a quote.",
    "Hi!",
]
ARCH = dict(hidden_size=256, intermediate_size=192, num_hidden_layers=6, num_attention_heads=8,
            num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
            vocab_size=4096, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-5,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
            router_aux_loss_coef=0.01, output_router_logits=True)  # fmt: skip
Z_LOSS = 1e-3


def read_corpus(root: Path) -> list[tuple[str, str]]:
    """(topic, quotation) pairs from the fortune files, whitespace tidied, duplicates dropped."""
    if not root.is_dir():
        sys.exit(f"{root} not found: apt-get install fortunes")
    seen, pairs = set(), []
    for path in sorted(root.iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_symlink() or path.name in SKIP_FILES:
            continue
        for block in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = unwrap(block.strip("%\n ").replace("\t", "    "))
            if text and len(text) <= MAX_CHARS and text not in seen and "\ufffd" not in text:
                seen.add(text)
                pairs.append((path.name.replace("-", " and "), text))
    return pairs


def unwrap(text: str) -> str:
    """Join lines the fortune files wrapped at ~70 columns, so that the model writes sentences
    rather than line breaks; short lines (verse), indented ones (attributions) and paragraph
    breaks stay."""
    lines = text.split("\n")
    out = [lines[0]]
    for line in lines[1:]:
        if len(out[-1]) >= 50 and line[:1].isalnum():
            out[-1] = out[-1].rstrip() + " " + line
        else:
            out.append(line)
    return "\n".join(out)


def held_out(text: str) -> bool:
    return zlib.crc32(text.encode()) % 20 == 0


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def documents(pairs, rng: random.Random, template) -> list[str]:
    """Each quotation once as plain text and once as a chat reply, as the chat template renders
    them (the template writes <s> and </s>)."""
    docs = []
    for topic, text in pairs:
        docs.append(f"<s>{text}</s>")
        request = rng.choice(REQUESTS).format(topic=topic)
        messages = [{"role": "user", "content": request}, {"role": "assistant", "content": text}]
        docs.append(template.render(messages=messages, bos_token="<s>", eos_token="</s>"))
    rng.shuffle(docs)
    return docs


def pack(tok: Tokenizer, docs: list[str], seq: int) -> torch.Tensor:
    """All documents end to end, cut into rows of seq + 1 tokens (input and shifted target)."""
    ids = [i for enc in tok.encode_batch(docs, add_special_tokens=False) for i in enc.ids]
    rows = len(ids) // (seq + 1)
    return torch.tensor(ids[: rows * (seq + 1)]).view(rows, seq + 1)


def router_figures(router_logits, k: int):
    """Mean routing entropy (nats), load-balancing loss, z-loss, and each layer's share of
    top-k picks per expert. The balancing loss is Switch/Mixtral's E * sum_i f_i P_i taken per
    layer and averaged (transformers' helper pools all layers' tokens, which lets each layer
    collapse onto two experts while the pooled load looks even)."""
    logits = torch.stack([r.float() for r in router_logits])  # layers, tokens, experts
    E = logits.shape[-1]
    probs = logits.softmax(-1)
    entropy = -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean()
    z = logits.logsumexp(-1).pow(2).mean()
    picks = F.one_hot(logits.topk(k, -1).indices, E).sum(-2).float().mean(1) / k
    balance = (E * (picks * k * probs.mean(1)).sum(-1)).mean()  # k when even
    return entropy, balance, z, picks


@torch.no_grad()
def evaluate(model, rows: torch.Tensor, batch: int, k: int) -> dict:
    model.eval()
    nll, n, entropy, picks = 0.0, 0, 0.0, 0
    for i in range(0, len(rows), batch):
        x = rows[i : i + batch]
        out = model(input_ids=x[:, :-1])
        logits, targets = out.logits.flatten(0, 1).float(), x[:, 1:].flatten()
        nll += F.cross_entropy(logits, targets, reduction="sum")
        n += x[:, 1:].numel()
        e, _, _, p = router_figures(out.router_logits, k)
        entropy, picks = entropy + e * len(x), picks + p * len(x)
    model.train()
    loss = float(nll) / n
    load = (picks / len(rows)).tolist()  # per layer, per expert: its share of the top-k picks
    return dict(loss=loss, ppl=math.exp(loss), entropy=float(entropy) / len(rows), load=load)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save(model, tok: Tokenizer, out: Path, report: dict):
    """The checkpoint in Hugging Face layout (bf16), tokenizer, chat template and training report;
    written beside `out` and renamed into place."""
    check_replaceable(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    copy = copy_module.deepcopy(model).to(torch.bfloat16)
    copy.config.output_router_logits = False
    copy.save_pretrained(tmp)
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tok.save(str(tmp / "tokenizer.json"))
    tokenizer_config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                        "chat_template": CHAT_TEMPLATE, "model_max_length": 4096}  # fmt: skip
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (tmp / "training.json").write_text(json.dumps(report, indent=2))
    write_notice_and_sums(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


WRITTEN = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "training.json",
    "NOTICE",
    "SHA256SUMS.json",
}


def check_replaceable(out: Path):
    """--out is replaced only when it holds nothing but what this script writes."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        sys.exit(f"--out {out}: not a directory this script wrote")
    if out.is_dir() and (foreign := foreign_files(out, WRITTEN)):
        sys.exit(f"--out {out} holds files this script does not write ({', '.join(foreign[:3])})")


def write_notice_and_sums(model_dir: Path):
    """NOTICE (the corpus's licence, which a model trained on it reproduces) and the SHA-256 sums
    that moelocal checks the installed copy against (moelocal/embedded_model.py)."""
    from moelocal.embedded_model import SUMS, sha256

    licence = Path("/usr/share/doc/fortunes/copyright").read_text()
    (model_dir / "NOTICE").write_text(
        "moelocal's default model was trained on the quotations of Debian's `fortunes` package\n"
        "(scripts/train_default.py). Their copyright and licence, as Debian ships them:\n\n"
        + licence
    )
    names = sorted(p.name for p in model_dir.iterdir() if p.name != SUMS)
    sums = {name: sha256(model_dir / name) for name in names}
    (model_dir / SUMS).write_text(json.dumps(sums, indent=2) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--corpus", type=Path, default=FORTUNES)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", type=json.loads, default={}, help="JSON overrides of ARCH")
    args = ap.parse_args()
    check_replaceable(args.out)  # before an hour of training, not after
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    arch = ARCH | args.arch

    pairs = read_corpus(args.corpus)
    train_pairs = [p for p in pairs if not held_out(p[1])]
    test_pairs = [p for p in pairs if held_out(p[1])]
    tok = train_tokenizer([t for _, t in train_pairs], arch["vocab_size"])
    template = jinja2.Environment().from_string(CHAT_TEMPLATE)
    train_rows = pack(tok, documents(train_pairs, rng, template), args.seq)
    test_rows = pack(tok, documents(test_pairs, rng, template), args.seq)
    print(f"{len(train_pairs)} quotations to train on, {len(test_pairs)} held out; "
          f"{train_rows.numel()} and {test_rows.numel()} tokens")  # fmt: skip

    config = transformers.MixtralConfig(**arch)
    model = transformers.MixtralForCausalLM(config).train()
    k = config.num_experts_per_tok
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other}],
                            lr=args.lr, betas=(0.9, 0.95))  # fmt: skip

    best, history, start = None, [], time.time()
    order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(args.seed))
    cursor = 0
    for step in range(args.steps):
        if cursor + args.batch > len(order):
            order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(step))
            cursor = 0
        x = train_rows[order[cursor : cursor + args.batch]]
        cursor += args.batch
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        out = model(input_ids=x[:, :-1])  # float32: bf16 autocast was no faster here
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), x[:, 1:].flatten())
        _, balance, z, _ = router_figures(out.router_logits, k)
        loss = ce + config.router_aux_loss_coef * balance + Z_LOSS * z
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"step {step} loss {ce.item():.3f} balance {balance.item():.3f} "
                  f"z {z.item():.2f} {time.time() - start:.0f} s", flush=True)  # fmt: skip
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            figures = evaluate(model, test_rows, args.batch, k) | {"step": step + 1}
            history.append(figures)
            print(f"held out: loss {figures['loss']:.3f} ppl {figures['ppl']:.1f} "
                  f"routing entropy {figures['entropy']:.3f}", flush=True)  # fmt: skip
            if best is None or figures["loss"] < best["loss"]:
                best = figures
                report = dict(args=vars(args) | {"out": str(args.out), "corpus": str(args.corpus)},
                              arch=arch, best=best, history=history,
                              train_tokens=train_rows.numel(), test_tokens=test_rows.numel(),
                              torch=torch.__version__, transformers=transformers.__version__,
                              seconds=time.time() - start)  # fmt: skip
                save(model, tok, args.out, report)
    print(json.dumps(best, indent=2))


if __name__ == "__main__":
    main()
