"""Decode speed of moelocal int8/int4 beside llama.cpp Q8_0/Q4_0 on the same shapes (the same bits
per weight), measured in turns on the same machine, every weight resident, 2 threads.

    pip install gguf                        # writes the GGUF file
    python scripts/vs_llama_cpp.py cache/models/mixtral-medium --llama-bin LLAMA_CPP/build/bin

LLAMA_CPP/build/bin holds llama-bench and llama-quantize, built from llama.cpp's sources (e.g.
`cmake -B build -DGGML_NATIVE=ON && cmake --build build --target llama-bench llama-quantize`).
The Mixtral checkpoint is written once as an f16 GGUF beside it under cache/gguf/ (q and k rows
reordered for llama.cpp's rotary layout; a placeholder vocabulary, as llama-bench feeds token ids)
and quantized by llama-quantize with its defaults. Each round runs both engines, best of 5 runs
each (moelocal: scripts/decode_floor.py's decode steps; llama.cpp with its defaults, which repack
the weights for its kernels, and with --repack 0); the machine's drift hits both alike. Medians of
the rounds close the table. --prefill adds pp512 (a 512-token prompt) for both.
Accuracy of both sides' rounding: scripts/quant_accuracy.py (its q4_0 simulates llama.cpp's).
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import moelocal

sys.path.insert(0, str(Path(__file__).parent))
from decode_floor import measure  # noqa: E402

PAIRS = (("int8", "Q8_0"), ("int4", "Q4_0"))


def rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's q/k rows (halves rotated together) -> llama.cpp's (adjacent pairs rotated)."""
    n, k = w.shape
    return w.reshape(heads, 2, n // heads // 2, k).transpose(1, 2).reshape(n, k)


def write_gguf(model: Path, out: Path):
    import numpy as np

    try:
        import gguf
    except ImportError:
        raise SystemExit("error: writing a GGUF file needs gguf: pip install gguf") from None

    cfg = json.loads((model / "config.json").read_text())
    if cfg["model_type"] != "mixtral":
        raise SystemExit(f"error: {model}: only mixtral checkpoints ({cfg['model_type']} given)")
    t = {}
    for f in sorted(model.glob("*.safetensors")):
        t.update(load_file(f))
    H, KV, V = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(cfg["hidden_size"] // H)
    w.add_rope_freq_base(cfg.get("rope_theta", 1e6))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(cfg["num_local_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>".encode() for i in range(V)])
    w.add_token_scores([0.0] * V)
    w.add_token_types([gguf.TokenType.NORMAL] * V)
    w.add_bos_token_id(cfg.get("bos_token_id", 1))
    w.add_eos_token_id(cfg.get("eos_token_id", 2))

    def add(name, tensor):  # norms in float32, as llama.cpp's own converter keeps them
        w.add_tensor(name, tensor.float().numpy().astype(np.float32 if tensor.dim() == 1
                                                          else np.float16))  # fmt: skip

    add("token_embd.weight", t["model.embed_tokens.weight"])
    add("output_norm.weight", t["model.norm.weight"])
    add("output.weight", t.get("lm_head.weight", t["model.embed_tokens.weight"]))
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        add(b + "attn_norm.weight", t[p + "input_layernorm.weight"])
        add(b + "attn_q.weight", rope_rows(t[p + "self_attn.q_proj.weight"], H))
        add(b + "attn_k.weight", rope_rows(t[p + "self_attn.k_proj.weight"], KV))
        add(b + "attn_v.weight", t[p + "self_attn.v_proj.weight"])
        add(b + "attn_output.weight", t[p + "self_attn.o_proj.weight"])
        add(b + "ffn_norm.weight", t[p + "post_attention_layernorm.weight"])
        add(b + "ffn_gate_inp.weight", t[p + "block_sparse_moe.gate.weight"])
        for ours, theirs in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
            experts = [t[f"{p}block_sparse_moe.experts.{e}.{ours}.weight"]
                       for e in range(cfg["num_local_experts"])]  # fmt: skip
            add(f"{b}ffn_{theirs}_exps.weight", torch.stack(experts))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_tok_s(bench: Path, gguf_file: Path, tokens: int, repack: int = 1,
                prompt: int = 0) -> float:  # fmt: skip
    """llama-bench's best of 5 runs, 2 threads, in tokens/s: decode of `tokens`, or with `prompt`
    a prefill of that many; NaN (said on stderr) where llama-bench fails."""
    cmd = [str(bench), "-m", str(gguf_file), "-t", "2", "-p", str(prompt), "-n",
           "0" if prompt else str(tokens), "-r", "5", "--repack", str(repack),
           "-o", "json"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        print(f"llama-bench failed (exit {run.returncode}): {' '.join(cmd[3:])}", file=sys.stderr)
        return math.nan
    return max(json.loads(run.stdout)[0]["samples_ts"])


@torch.inference_mode()
def prefill_tok_s(engine: moelocal.Engine, tokens: int, repeats: int = 3) -> float:
    """moelocal's best of `repeats` prefills of a `tokens`-token prompt, in tokens/s."""
    import time

    from moelocal.models.attention import KVCache

    ids = torch.randint(3, engine.config.vocab_size, (1, tokens),
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    best = float("inf")
    for _ in range(repeats):
        cache = KVCache(engine.config.num_hidden_layers, tokens)
        start = time.perf_counter()
        engine.model(ids, cache, last_only=True)
        best = min(best, time.perf_counter() - start)
    return tokens / best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--llama-bin", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prefill", action="store_true", help="also pp512 for both engines")
    args = parser.parse_args()
    for tool in ("llama-bench", "llama-quantize"):
        if not (args.llama_bin / tool).is_file():
            raise SystemExit(f"error: --llama-bin {args.llama_bin}: no {tool} there")
    work = Path(__file__).resolve().parents[1] / "cache" / "gguf" / args.model.name
    work.mkdir(parents=True, exist_ok=True)
    f16 = work / "f16.gguf"
    if not f16.exists():
        write_gguf(args.model, f16.with_suffix(".part"))
        f16.with_suffix(".part").rename(f16)
    for _, q in PAIRS:
        quantized = work / f"{q}.gguf"
        if not quantized.exists():
            quantize = [str(args.llama_bin / "llama-quantize"), str(f16), str(quantized), q]
            subprocess.run(quantize, capture_output=True, check=True)
    engines = {ours: moelocal.load(args.model, device="cpu", quant=ours) for ours, _ in PAIRS}
    bench = args.llama_bin / "llama-bench"
    columns = ["moelocal", "llama.cpp", "llama.cpp --repack 0"]
    tests = ["tg"] + (["pp512"] if args.prefill else [])
    print(f"{'round':<7}{'test':<7}{'ours':<6}{'theirs':<7}" + "".join(f"{c:>22}" for c in columns)
          + f"{'ratio':>8}{'ratio --repack 0':>18}")  # fmt: skip
    results = {}
    for r in range(1, args.rounds + 1):
        for ours, q in PAIRS:
            for test in tests:
                gguf_file = work / f"{q}.gguf"
                if test == "tg":
                    row = [1 / measure(engines[ours], args.tokens)[0]]
                    row += [llama_tok_s(bench, gguf_file, args.tokens, repack) for repack in (1, 0)]
                else:
                    row = [prefill_tok_s(engines[ours], 512)]
                    row += [llama_tok_s(bench, gguf_file, 0, repack, 512) for repack in (1, 0)]
                row += [row[0] / row[1], row[0] / row[2]]
                results.setdefault((test, ours, q), []).append(row)
                print(f"{r:<7}{test:<7}{ours:<6}{q:<7}" + "".join(f"{v:>22.1f}" for v in row[:3])
                      + f"{row[3]:>8.2f}{row[4]:>18.2f}", flush=True)  # fmt: skip
    for (test, ours, q), rows in results.items():
        med = [statistics.median([v for v in column if not math.isnan(v)] or [math.nan])
               for column in zip(*rows, strict=True)]  # fmt: skip
        print(f"{'median':<7}{test:<7}{ours:<6}{q:<7}" + "".join(f"{v:>22.1f}" for v in med[:3])
              + f"{med[3]:>8.2f}{med[4]:>18.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
