"""How much a search's found network beats chance, on the super-network and data it searched.

Two figures: the hold-out top-1 of ``--samples`` random sub-networks (genes drawn uniformly, as the evolution's
initial population is), whose spread says whether the hold-out separates candidates at all; and the validation top-1
of the found network against the median of ``--matches`` random sub-networks whose Mobile Efficiency Score lies within
``--tolerance`` of the found one's (the same cost, chosen blindly). Every network is scored as the search scores it
(extracted, BatchNorm statistics re-estimated on the same calibration batches). The latency table and MES constants
are the search's (``<search_dir>/latency_table.json``, re-timed if it came from another machine, and ``state.json``).

    python tools/search_random_baseline.py --ckpt_path runs/checkpoints/last.ckpt \\
        --search_dir search/efficientformerv2_cpu --supernet efficientformerv2_supernet_s

Writes ``<search_dir>/random_baseline.json`` and prints a summary.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.utils.data import DataLoader

from datamodules.classification import ClassificationDataModule
from search.costs import Costs, MobileEfficiency
from search.holdout import calibration_batches, holdout_batches
from search.latency import LatencyTable
from search.network import Fitness, load_supernet


def validation_batches(data_hparams: dict, batch_size: int) -> list:
    data = ClassificationDataModule(**data_hparams)
    data.setup("validate")
    return [(b["input"], b["target"]) for b in DataLoader(data.datasets["val"], batch_size=batch_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--search_dir", required=True, type=Path)
    parser.add_argument("--supernet", default="efficientformerv2_supernet_s")
    parser.add_argument("--holdout_per_class", type=int, default=25)
    parser.add_argument("--calibration_batches", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--samples", type=int, default=50, help="random networks for the hold-out spread")
    parser.add_argument("--matches", type=int, default=15, help="random networks of about the found MES")
    parser.add_argument("--tolerance", type=float, default=0.05, help="relative MES window of a match")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    checkpoint = load_supernet(args.ckpt_path, args.supernet)
    net, data_hparams = checkpoint.supernet, dict(checkpoint.data_hparams)
    table = LatencyTable(net, args.search_dir / "latency_table.json")
    state = json.loads((args.search_dir / "state.json").read_text())["settings"]
    costs = Costs(net, table, MobileEfficiency(**(state.get("mes") or {})))  # the search's constants and unit
    calibration = calibration_batches(data_hparams, args.holdout_per_class, args.calibration_batches, args.batch_size)
    holdout = Fitness(checkpoint.network, holdout_batches(data_hparams, args.holdout_per_class, args.batch_size),
                      calibration)
    val_data = {**data_hparams, "search_holdout_per_class": 0}
    validation = Fitness(checkpoint.network, validation_batches(val_data, args.batch_size), calibration)

    with open(args.search_dir / "candidates.csv") as f:
        found_row = [r for r in csv.DictReader(f) if r["chosen"] == "1"][-1]
    found = json.loads(found_row["subnet"])
    found_mes = costs(found).mes

    rng = random.Random(args.seed)
    choices = [values for _, values in net.search_space()]
    draw = lambda: net.subnet([rng.choice(values) for values in choices])
    population = [draw() for _ in range(args.samples)]
    scores = [holdout(c) for c in population]
    matches = []
    for _ in range(20_000):
        if len(matches) == args.matches:
            break
        config = draw()
        if abs(costs(config).mes - found_mes) <= args.tolerance * found_mes:
            matches.append(config)
    match_val = [validation(c) for c in matches]
    result = {
        "population": args.samples, "holdout_min": min(scores), "holdout_median": statistics.median(scores),
        "holdout_max": max(scores), "holdout_spread": max(scores) - min(scores),
        "found_mes": found_mes, "found_holdout": holdout(found), "found_val": validation(found),
        "matches": len(matches), "match_mes": [costs(c).mes for c in matches], "match_val": match_val,
        "match_val_median": statistics.median(match_val) if match_val else None,
        "match_holdout_median": statistics.median(holdout(c) for c in matches) if matches else None,
        "mes_unit_ms": costs.mes.latency_unit_ms,
    }
    (args.search_dir / "random_baseline.json").write_text(json.dumps(result, indent=1))
    print(f"hold-out top-1 of {args.samples} random networks: min {result['holdout_min']:.4f}, median "
          f"{result['holdout_median']:.4f}, max {result['holdout_max']:.4f} (spread {result['holdout_spread']:.4f})")
    if match_val:
        print(f"validation top-1: found {result['found_val']:.4f} (MES {found_mes:.1f}) vs median "
              f"{result['match_val_median']:.4f} of {len(matches)} random networks within {args.tolerance:.0%} of its "
              f"MES (difference {result['found_val'] - result['match_val_median']:+.4f})")
    else:
        print(f"no random network within {args.tolerance:.0%} of the found MES {found_mes:.1f}")


if __name__ == "__main__":
    main()
