"""How much do the box tokens reach the U-Net? The GLIGEN gates of a trained model.

Every `GatedSelfAttention` adds `tanh(gate_attn) * attention` and `tanh(gate_ff) * feed-forward` to the visual
tokens (Li et al. 2023, GLIGEN eq. 8); both gates start at 0, so |tanh(gate)| is how far training opened the box
path (0: the boxes change nothing through the tokens).

    python benchmarks/gligen_gates.py --model runs/ldm_tokens/model-ema drivesim/pretrained/image-ldm-cpu-small \
        --out benchmarks/results/gligen_gates.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def gates(model: torch.nn.Module) -> list[dict[str, float | str]]:
    """tanh of both gates of every gated self-attention layer, in module order."""
    from drivesim.bbox_conditioning.gated_attention import GatedSelfAttention

    return [{"layer": name, "tanh_gate_attn": float(torch.tanh(m.gate_attn.detach().float())),
             "tanh_gate_ff": float(torch.tanh(m.gate_ff.detach().float()))}
            for name, m in model.named_modules() if isinstance(m, GatedSelfAttention)]


def main(argv: list[str] | None = None) -> dict:
    from drivesim.eval.results import write_json

    import drivesim

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, nargs="+", required=True, help="exported models (folders)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    report = {"models": {}}
    for path in args.model:
        layers = gates(drivesim.load(path))
        largest = max((max(abs(g["tanh_gate_attn"]), abs(g["tanh_gate_ff"])) for g in layers), default=0.0)
        report["models"][str(path)] = {"max_abs_tanh_gate": largest, "layers": layers}
        print(f"{path}: {len(layers)} gated layers, max |tanh(gate)| {largest:.2e}")
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
