"""Checkpoints quantized by bitsandbytes (transformers' load_in_4bit / load_in_8bit) load directly
and match the same model quantized on load; so do per-expert quantized experts, as older
transformers wrote them."""

import json

import pytest
import torch
from tiny import VOCAB

import moelocal

bnb = pytest.importorskip("bitsandbytes")  # a dependency of moelocal: always installed in CI


def prompt(n=16, seed=4):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def quantized_weights(engine):
    """(name, the (N, K) matrix each QuantLinear multiplies with)."""
    from moelocal.quant import QuantLinear, matmul

    for name, m in engine.model.named_modules():
        if isinstance(m, QuantLinear):
            segs = {seg: getattr(m, seg) for seg, _, _ in m.fmt.segments}
            yield name, matmul(torch.eye(m.fmt.K), segs, m.fmt).t()


def save_with_transformers(src, out, **bnb_config):
    import transformers

    config = transformers.BitsAndBytesConfig(**bnb_config)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        src, quantization_config=config, device_map="cpu", dtype=torch.bfloat16
    )
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((src / name).read_bytes())
    return out


@pytest.mark.parametrize(
    "arch, bnb_config, mode, exact",
    [
        ("mixtral", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"), "nf4", True),
        ("mixtral", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                         bnb_4bit_use_double_quant=True), "nf4", False),
        ("olmoe", dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"), "fp4", True),
        # o_proj (64, 48), kv_b_proj (80, 16): rows that are not whole blocks of 64
        ("deepseek_v3", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"), "nf4", True),
        ("mixtral", dict(load_in_8bit=True), "int8", False),
    ],
)  # fmt: skip
def test_prequantized_matches_quantized_on_load(tiny, tmp_path, arch, bnb_config, mode, exact):
    """transformers quantizes the Linear layers (attention, dense and shared MLPs) and leaves the
    experts to moelocal: quantizing the float model on load gives the same weights."""
    src = tiny(arch)[0]
    out = save_with_transformers(src, tmp_path / "bnb", **bnb_config)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    prequantized = moelocal.load(out, device="cpu")
    assert prequantized.plan.quant == mode
    on_load = moelocal.load(src, device="cpu", dtype="bfloat16", quant=mode)
    ids = prompt()
    a, b = prequantized.logits(ids), on_load.logits(ids)
    if exact:  # the very same weights
        assert torch.equal(a, b)
        tokens = on_load.generate(ids, max_new_tokens=6).token_ids
        assert prequantized.generate(ids, max_new_tokens=6).token_ids == tokens
    else:
        # bitsandbytes rounds differently here (an 8-bit double-quantized absmax; LLM.int8's row
        # scales in bf16), which these tiny x3-scaled models amplify in the logits: compare the
        # weights that every quantized layer multiplies with instead.
        assert torch.isfinite(a).all()
        pairs = zip(quantized_weights(prequantized), quantized_weights(on_load), strict=True)
        for (name, wa), (_, wb) in pairs:
            assert ((wa - wb).norm() / wb.norm()).item() < 0.02, name


def test_convert_keeps_a_bitsandbytes_checkpoint_format(tiny, tmp_path):
    """Without --quant a pre-quantized checkpoint converts to its own format, and the converted
    model gives the checkpoint's tokens (its quantized Linear layers are read dequantized)."""
    from typer.testing import CliRunner

    from moelocal.cli import app

    src = tiny("deepseek_v3")[0]
    bnb_dir = save_with_transformers(src, tmp_path / "bnb", load_in_4bit=True,
                                     bnb_4bit_quant_type="nf4")  # fmt: skip
    out = tmp_path / "packed"
    result = CliRunner().invoke(app, ["convert", str(bnb_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "moelocal.json").read_text())["quant"] == "nf4"
    ids = prompt()
    direct = moelocal.load(bnb_dir, device="cpu").generate(ids, max_new_tokens=6).token_ids
    assert moelocal.load(out, device="cpu").generate(ids, max_new_tokens=6).token_ids == direct


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_weights_decode_whatever_their_shape(quant_type, double_quant):
    """bitsandbytes' blocks run through the flattened matrix; its CPU dequantize (0.50) starts a
    block at every row, which garbles matrices whose rows are not whole blocks. A round trip
    through a checkpoint's tensors stays within 4-bit rounding (~0.09 of the weights' norm for
    NF4 in blocks of 64, where the garbled ones measured 0.2-0.4)."""
    from bitsandbytes.functional import quantize_4bit

    from moelocal.quant import dequantize_checkpoint

    gen = torch.Generator().manual_seed(0)
    for shape in [(80, 16), (64, 48), (96, 24), (7, 9), (64, 128)]:
        w = torch.randn(*shape, generator=gen).to(torch.bfloat16)
        q, state = quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                 compress_statistics=double_quant)  # fmt: skip
        back = dequantize_checkpoint(q, state.as_dict(packed=True))
        assert back.shape == shape
        rel = ((back - w.float()).norm() / w.float().norm()).item()
        assert rel < (0.12 if quant_type == "nf4" else 0.17), (shape, rel)


def test_per_expert_quantized_experts(tiny, tmp_path):
    """Experts stored one nf4 Linear each (double quantized), as transformers 4 wrote them."""
    from bitsandbytes.functional import quantize_4bit
    from safetensors.torch import load_file, save_file

    src = tiny("mixtral", intermediate_size=64)[0]  # whole 64-blocks: see test_quant
    out = tmp_path / "per-expert"
    out.mkdir()
    tensors = load_file(src / "model.safetensors")
    for key in [k for k in tensors if ".experts." in k]:
        q, state = quantize_4bit(tensors[key].to(torch.bfloat16), blocksize=64, quant_type="nf4",
                                 compress_statistics=True)  # fmt: skip
        tensors[key] = q
        for suffix, t in state.as_dict(packed=True).items():
            tensors[f"{key}.{suffix}"] = t
    save_file(tensors, out / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4",
                                     "bnb_4bit_use_double_quant": True}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    engine = moelocal.load(out, device="cpu")
    assert engine.plan.quant == "nf4"
    reference = moelocal.load(src, device="cpu", dtype="float32", quant="nf4")
    ids = prompt()
    a, b = engine.logits(ids), reference.logits(ids)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8
    # streamed from disk, the packed experts are dequantized as they are read: same result
    streamed = moelocal.load(out, device="cpu", cache_experts=1)
    assert torch.equal(streamed.logits(ids), a)
