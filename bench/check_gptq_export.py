"""Do the standard GPTQ readers run our export? transformers + optimum + gptqmodel (CPU, torch kernel, float32)
load a `train.py --export-gptq` folder; their logits are compared with the project's own quantized model.

Needs transformers and gptqmodel, which the project does not depend on: run it in an environment that has them
and torch (the project's modules are imported from this checkout), e.g.

    python -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.14.1 gptqmodel optimum transformers
    /tmp/refvenv/bin/python bench/check_gptq_export.py --model assets/smollm2-135m --bits 2 4

Without --quantized/--export the base is RTN-quantized here (the format, not the quantizer, is under test) and
exported as train.py --export-gptq does: fp16-exact scales (gptq.fp16_exact_scales), the dense tensors in
gptq_format.dense_dtype; --plain-scales and --dense float16 show what each of the two contributes. With them, a
train.py run's quantized.safetensors and --export-gptq folder are compared. Prints per bit width the largest
|logit difference| and its ratio to the largest |logit| (the check passes below 1e-3), then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gptq  # noqa: E402
import gptq_format  # noqa: E402
import model as model_lib  # noqa: E402
from prepare import load_model  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. In 1969, the first people walked on the Moon; "
        "Tom has 3 apples and buys 4 more, so he has 7 apples.")


def ours_rtn(model_dir: Path, bits: int, group_size: int, fp16_exact: bool = True):
    m = model_lib.from_pretrained(model_dir, dtype=torch.float32)
    for name in model_lib.linear_names(m):
        W = model_lib.get_module(m, name).weight.detach()
        state = gptq.quantize_rtn(W, bits, group_size, fp16_exact=fp16_exact)
        model_lib.set_module(m, name, gptq.QuantLinear.from_state(state))
    return m.eval()


def theirs(folder: Path, bits: int):
    from transformers import AutoModelForCausalLM, GPTQConfig
    qc = GPTQConfig(bits=bits, backend="torch")
    m = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu",
                                             quantization_config=qc)
    kernels = sorted({type(mod).__name__ for mod in m.modules() if hasattr(mod, "qweight")})
    return m.eval(), kernels


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF-style model folder (the original weights)")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--quantized", help="our quantized.safetensors (with --export; one bit width)")
    p.add_argument("--export", help="the train.py --export-gptq folder of the same run")
    p.add_argument("--plain-scales", action="store_true", help="RTN with plain fp16 scales (not fp16-exact)")
    p.add_argument("--dense", choices=["auto", "float16", "bfloat16", "float32"], default="auto",
                   help="dtype of the exported dense tensors (auto: gptq_format.dense_dtype)")
    args = p.parse_args(argv)
    tok = model_lib.Tokenizer.from_pretrained(args.model)
    ids = torch.tensor([tok.encode(TEXT, add_bos=True)])                          # (1, T)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.bits:
            if args.export:
                ours, _ = load_model(args.model, args.quantized)
                folder = Path(args.export)
            else:
                ours = ours_rtn(Path(args.model), bits, args.group_size, not args.plain_scales)
                folder = Path(tmp) / f"gptq{bits}"
                dense = gptq_format.dense_dtype(ours) if args.dense == "auto" else getattr(torch, args.dense)
                gptq_format.export_gptq(folder, ours, args.model, dtype=dense)
            with torch.no_grad():
                ref = ours(ids).float()                                           # (1, T, V)
            hf, kernels = theirs(folder, gptq_format.quant_config(folder)["bits"])
            with torch.no_grad():
                got = hf(ids).logits.float()
            diff = float((got - ref).abs().max())
            top = float(ref.abs().max())
            dense = json.loads((folder / "config.json").read_text())["torch_dtype"]
            inexact = len(gptq_format.fp16_inexact(gptq_format.quantized_linears(ours)))
            rows.append({"bits": gptq_format.quant_config(folder)["bits"], "tokens": ids.shape[1],
                         "dense": dense, "fp16_inexact_layers": inexact,
                         "max_abs_diff": diff, "max_abs_logit": top, "ratio": diff / top,
                         "argmax_agree": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
                         "kernels": kernels, "pass": diff / top < 1e-3})
            if args.export:
                break
    print(f"{'bits':>4} {'dense':>8} {'inexact':>7} {'max|Δlogit|':>12} {'max|logit|':>10} {'ratio':>10} "
          f"{'argmax agree':>12}  kernel")
    for r in rows:
        print(f"{r['bits']:>4} {r['dense']:>8} {r['fp16_inexact_layers']:>7} {r['max_abs_diff']:>12.3e} "
              f"{r['max_abs_logit']:>10.3f} {r['ratio']:>10.2e} {r['argmax_agree']:>12.3f}  {','.join(r['kernels'])}")
    res = {"model": args.model, "group_size": args.group_size, "plain_scales": args.plain_scales,
           "dense": args.dense, "rows": rows}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
