"""Write the presets table of ``docs/backbones.md``: every registered backbone with its parameters and forward
FLOPs at its default input, counted (never typed in) on the ``meta`` device, so nothing is allocated and the giant
presets count in seconds.

    python tools/backbone_table.py            # print the table (Markdown)
    python tools/backbone_table.py --check    # exit 1 if docs/backbones.md's table differs (run by the tests)

FLOPs are ``torch.utils.flop_counter.FlopCounterMode``'s (a multiply-add counts 2, attention included through
``scaled_dot_product_attention``'s formula), for one sample of the preset's default size: its ``img_size`` (224 for
images), 8 × 224² clips for TimeSformer, the 96³ window of UNETR. A super-network is counted at its largest network.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import torch
from doc_block import print_or_check  # tools/doc_block.py
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import backbones
from backbones.registry import _REGISTRY as REGISTRY

DOC = ROOT / "docs" / "backbones.md"
BEGIN, END = "<!-- presets table: python tools/backbone_table.py -->", "<!-- end of presets table -->"


def sample_shape(model: torch.nn.Module) -> tuple[int, ...]:
    """One sample of the preset's default input: ``[1, C, H, W]``, ``[1, C, T, H, W]`` or ``[1, C, D, H, W]``
    (the model's ``img_size``, a side or one size per spatial dimension; 224² for those built for any size)."""
    size = getattr(model, "img_size", 224)
    sizes = (size,) * model.spatial_dims if isinstance(size, int) else tuple(size)
    return (1, model.in_chans, *sizes)


def source(name: str) -> str:
    """Where the preset is defined (``backbones/<file>.py``) and the first sentence of its docstring."""
    fn = REGISTRY[name]
    doc = " ".join((inspect.getdoc(fn) or "").split("\n\n")[0].split())
    doc = doc.split(". ")[0].rstrip(".").replace("``", "`").replace("|", "/")
    path = Path(inspect.getsourcefile(fn)).relative_to(ROOT).as_posix()
    return f"`{path}`" + (f": {doc}" if doc else "")


def count(name: str) -> tuple[int, float, tuple[int, ...]]:
    with torch.device("meta"):
        model = backbones.create_backbone(name).eval()
    params = sum(p.numel() for p in model.parameters())
    shape = sample_shape(model)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(shape, device="meta"))
    return params, counter.get_total_flops() / 1e9, shape


def table() -> str:
    rows = ["| preset | parameters | forward GFLOPs | input | defined in |", "| --- | ---: | ---: | --- | --- |"]
    for name in backbones.list_backbones():
        params, gflops, shape = count(name)
        rows.append(f"| `{name}` | {params:,} | {gflops:,.2f} | {'×'.join(map(str, shape[1:]))} | {source(name)} |")
    return "\n".join(rows)


def main() -> int:
    return print_or_check(__doc__.split("\n")[0], DOC, BEGIN, END, table, "table")

if __name__ == "__main__":
    sys.exit(main())
