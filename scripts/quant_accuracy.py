"""Accuracy of each quantization mode against float32: mean KL divergence of the next-token
distribution and top-1 agreement over a few hundred positions, as in the README's table.

    python scripts/quant_accuracy.py                           # the embedded default model
    python scripts/quant_accuracy.py cache/models/mixtral-medium --positions 256
"""

import argparse

import torch

import moelocal


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--positions", type=int, default=300)
    parser.add_argument("--modes", default="bf16,int8,int4,nf4")
    args = parser.parse_args()
    reference = moelocal.load(args.model, device="cpu", dtype="float32")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, reference.config.vocab_size, (args.positions,), generator=gen).tolist()
    ref = reference.logits(ids).log_softmax(-1)
    del reference
    print(f"{'mode':<6}{'mean KL':>10}{'top-1':>8}")
    for mode in args.modes.split(","):
        if mode == "bf16":
            engine = moelocal.load(args.model, device="cpu", dtype="bfloat16")
        else:
            engine = moelocal.load(args.model, device="cpu", quant=mode)
        logp = engine.logits(ids).log_softmax(-1)
        kl = (ref.exp() * (ref - logp)).sum(-1).mean().item()
        top1 = (logp.argmax(-1) == ref.argmax(-1)).float().mean().item()
        print(f"{mode:<6}{kl:>10.4f}{top1:>8.3f}")


if __name__ == "__main__":
    main()
