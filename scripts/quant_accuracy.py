"""Accuracy of each quantization mode against float32: mean KL divergence of the next-token
distribution and top-1 agreement over a few hundred positions, as in the README's table.

    python scripts/quant_accuracy.py                           # the embedded default model
    python scripts/quant_accuracy.py cache/models/mixtral-medium --positions 256

Two columns per mode: the logits of the whole sequence at once (a prefill: int8/int4 weights
dequantized into the bf16 GEMM) and token by token (decode: the CPU kernels, which also round the
activations to int8). `q4_0` is a simulation of llama.cpp's Q4_0 rounding (the largest magnitude
at code 0, no fit) in moelocal's int4 layout and kernels: the same bits as int4, for comparison.
"""

import argparse
from functools import partial

import torch

import moelocal
import moelocal.quant
from moelocal.models.attention import KVCache


@torch.inference_mode()
def decode_logits(engine: moelocal.Engine, ids: list[int]) -> torch.Tensor:
    """Next-token logits at every position, one decode step per token."""
    model = engine.model
    cache = KVCache(model.cfg.num_hidden_layers, len(ids))
    return torch.cat([model(torch.tensor([[t]]), cache)[0] for t in ids])


def q4_0_rounding(w, steps=0):
    """llama.cpp's Q4_0: scale = largest magnitude / -8 (fp16), nearest codes."""
    scale = (w.gather(-1, w.abs().argmax(-1, keepdim=True)) / -8).half()
    inv = torch.where(scale != 0, 1 / scale.float(), 0.0)
    return (w * inv).round().add(8).clamp(0, 15).to(torch.uint8), scale[..., 0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--positions", type=int, default=300)
    parser.add_argument("--modes", default="bf16,int8,int4,q4_0,nf4")
    args = parser.parse_args()
    # quant none: a checkpoint of 4-bit experts (MXFP4, nf4) in float32, exactly as stored
    reference = moelocal.load(args.model, device="cpu", dtype="float32", quant="none")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, reference.config.vocab_size, (args.positions,), generator=gen).tolist()
    ref = reference.logits(ids).log_softmax(-1)
    del reference
    print(f"{'mode':<6}{'prefill KL':>12}{'top-1':>8}{'decode KL':>12}{'top-1':>8}")
    units = moelocal.quant.quantize_units
    for mode in args.modes.split(","):
        moelocal.quant.quantize_units = (
            partial(units, fit=q4_0_rounding) if mode == "q4_0" else units
        )
        if mode == "bf16":
            engine = moelocal.load(args.model, device="cpu", dtype="bfloat16", quant="none")
        else:
            engine = moelocal.load(args.model, device="cpu", quant=mode.replace("q4_0", "int4"))
        row = f"{mode:<6}"
        for logits in (engine.logits(ids), decode_logits(engine, ids)):
            logp = logits.log_softmax(-1)
            kl = (ref.exp() * (ref - logp)).sum(-1).mean().item()
            top1 = (logp.argmax(-1) == ref.argmax(-1)).float().mean().item()
            row += f"{kl:>12.4f}{top1:>8.3f}"
        print(row)
    moelocal.quant.quantize_units = units


if __name__ == "__main__":
    main()
