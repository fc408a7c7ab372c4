"""How the default model routes held-out text, against random weights of the same shape.

    python scripts/routing_study.py [MODEL] [--json FILE]

MODEL defaults to the embedded default model; the text is the quotations train_default.py held
out (Debian's `fortunes`), end to end, in rows of 256 tokens. transformers runs the model and
records each layer's routing; reported per layer:
- load: each expert's share of the top-k picks (balance = their entropy / log E, 1 is uniform);
- entropy: the router's mean softmax entropy per token (nats; log E is uniform);
- reuse: the share of a token's experts that the previous token also used in that layer;
- prediction: layer L+d's router applied to the hidden state after layer L's attention (what
  moelocal's prefetcher sees), its top k and k+1 against L+d's real experts: precision, recall;
  and the k+1 of the map fitted for the pair (moelocal calibrate; shipped for the default model);
- cache: hit rates of LRU, LFU, LRU-2, decayed frequency, moelocal's learned eviction (the
  shipped fits' scores) and Belady's optimum at 1..E-1 slots per layer (cache_sim.py).
"""

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from cache_sim import POLICIES, hit_rate, learned
from tokenizers import Tokenizer
from train_default import FORTUNES, held_out, pack, read_corpus

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moelocal import predictor  # noqa: E402
from moelocal.hub import resolve_model  # noqa: E402
from moelocal.synthetic import make_checkpoint  # noqa: E402

SEQ = 256


@torch.no_grad()
def record(model, rows: torch.Tensor):
    """Per layer: the experts of every token (T, k), the router logits (T, E), and the hidden
    state after the layer's attention (T, D), rows end to end."""
    layers = model.model.layers
    mids = [[] for _ in layers]
    hooks = [
        layer.post_attention_layernorm.register_forward_hook(
            lambda mod, args, out, i=i: mids[i].append(args[0][0])
        )
        for i, layer in enumerate(layers)
    ]
    logits = [[] for _ in layers]
    for row in rows:
        out = model(input_ids=row[None], output_router_logits=True)
        for i, r in enumerate(out.router_logits):
            logits[i].append(r.float())
    for h in hooks:
        h.remove()
    k = model.config.num_experts_per_tok
    logits = [torch.cat(x) for x in logits]
    return [x.topk(k, -1).indices for x in logits], logits, [torch.cat(m) for m in mids]


@torch.no_grad()
def predicted(model, mid: torch.Tensor, layer: int, m: int, gate=None) -> torch.Tensor:
    """Layer `layer`'s router (or `gate`, a fitted stand-in) on hidden states taken earlier: its
    top m experts per token."""
    target = model.model.layers[layer]
    x = target.post_attention_layernorm(mid)
    logits = gate(x) if gate is not None else target.mlp.gate(x)[0]
    return logits.topk(m, -1).indices


def overlap(guess: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Per token: how many of the guessed experts are among the real ones."""
    return (guess[:, :, None] == real[:, None, :]).any(-1).sum(-1).float()


def study(model, rows: torch.Tensor, depths=(1, 2)) -> dict:
    ids, logits, mids = record(model, rows)
    fitted, _ = predictor.find(model)  # moelocal calibrate's fits, where stored
    k, E = model.config.num_experts_per_tok, model.config.num_local_experts
    report = []
    for L, (real, lg) in enumerate(zip(ids, logits, strict=True)):
        load = torch.bincount(real.flatten(), minlength=E).float() / real.numel()
        probs = lg.softmax(-1)
        trace = [set(r) for r in real.tolist()]
        policies = dict(POLICIES)
        if fitted is not None and L in fitted.reuse:  # the scores the learned policy evicts by
            weight, bias = fitted.reuse[L]
            x = model.model.layers[L].post_attention_layernorm(mids[L])
            policies["learned"] = learned(torch.addmm(bias, x, weight.t()).tolist())
        row = dict(
            layer=L,
            load=load.tolist(),
            balance=float(-(load * load.clamp_min(1e-12).log()).sum() / math.log(E)),
            entropy=float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()),
            reuse=float(overlap(real[1:], real[:-1]).mean() / k),
            cache={
                name: [hit_rate(trace, slots, policy) for slots in range(1, E)]
                for name, policy in policies.items()
            },
        )
        for d in depths:
            if L + d < len(ids):
                for m in (k, k + 1):
                    hit = overlap(predicted(model, mids[L], L + d, m), ids[L + d])
                    row[f"precision+{d}@{m}"] = float(hit.mean() / m)
                    row[f"recall+{d}@{m}"] = float(hit.mean() / k)
                gate = fitted.gate(L, L + d) if fitted is not None else None
                if gate is not None:
                    hit = overlap(predicted(model, mids[L], L + d, k + 1, gate), ids[L + d])
                    row[f"fitted recall+{d}@{k + 1}"] = float(hit.mean() / k)
        report.append(row)
    return dict(layers=report, tokens=rows.numel(), k=k, experts=E)


def table(name: str, result: dict) -> str:
    k, E = result["k"], result["experts"]
    lines = [f"### {name} ({result['tokens']} tokens)", "",
             f"| layer | balance | load min-max | entropy | reuse | L+1 P@{k} | L+1 R@{k} "
             f"| L+1 P@{k + 1} | L+1 R@{k + 1} | L+1 R@{k + 1} fitted | L+2 R@{k} "
             f"| L+2 R@{k + 1} |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def cell(row, key):
        return f"{row[key]:.2f}" if key in row else "-"

    for r in result["layers"]:
        spread = f"{min(r['load']):.0%}-{max(r['load']):.0%}"
        lines.append(
            f"| {r['layer']} | {r['balance']:.3f} | {spread} | {r['entropy']:.2f} | "
            f"{r['reuse']:.2f} | {cell(r, f'precision+1@{k}')} | {cell(r, f'recall+1@{k}')} | "
            f"{cell(r, f'precision+1@{k + 1}')} | {cell(r, f'recall+1@{k + 1}')} | "
            f"{cell(r, f'fitted recall+1@{k + 1}')} | {cell(r, f'recall+2@{k}')} | "
            f"{cell(r, f'recall+2@{k + 1}')} |"
        )
    lines += ["", "hit rate, mean over layers, by slots per layer:", "",
              "| policy | " + " | ".join(str(s) for s in range(1, E)) + " |",
              "|---" * E + "|"]  # fmt: skip
    names = [n for n in result["layers"][0]["cache"]
             if all(n in r["cache"] for r in result["layers"])]  # fmt: skip
    for name in names:
        rates = [sum(r["cache"][name][s] for r in result["layers"]) / len(result["layers"])
                 for s in range(E - 1)]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(f"{x:.3f}" for x in rates) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--corpus", type=Path, default=FORTUNES)
    ap.add_argument("--max-tokens", type=int, default=40_000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    path = resolve_model(args.model)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    texts = [f"<s>{t}</s>" for _, t in read_corpus(args.corpus) if held_out(t)]
    rows = pack(tok, texts, SEQ - 1)[: args.max_tokens // SEQ]
    trained = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    results = {"trained": study(trained, rows)}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = trained.config
        names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_local_experts",
                 "num_experts_per_tok", "num_attention_heads", "num_key_value_heads",
                 "vocab_size")  # fmt: skip
        shape = {name: getattr(cfg, name) for name in names}
        random_dir = make_checkpoint(Path(tmp) / "random", "small", **shape)
        random = transformers.AutoModelForCausalLM.from_pretrained(random_dir, dtype=torch.float32)
        results["random"] = study(random.eval(), rows)
    for name, result in results.items():
        print(table(f"{name} weights", result), "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
