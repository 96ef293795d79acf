"""The three SAM 2 presets on CHAOS and CMR in both protocols, beside the published figures: one command
for a machine with the weights (and, in practice, a GPU: about a day on 2 CPU cores).

    python -m fewshot models download                     # once: SAM 2.1 hiera-tiny, DINOv2-S, LPIPS
    python scripts/sam2_papers.py --data ../shared/data --out out/sam2-papers [--max-queries N] [--device cuda]

Runs ``python -m fewshot eval`` for each (preset, dataset, protocol) into OUT/<preset>-<dataset>-<protocol>/
(an existing finished run is kept, so the command resumes), then writes OUT/table.md: mean Dice per
run with the published 1-shot figures of the same benchmarks beside them. Every figure comes from a
run's metrics.json. ``--set random_weights=true`` (passed through) exercises the whole script
without weights; its Dice is meaningless.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PRESETS = ("foundation", "rag-sam2", "lpips-sam2")
DATASETS = ("chaos-t2", "cmr-bssfp")
# (protocol, extra eval arguments): the literature's 1-way 1-shot protocol, and the tool's own.
PROTOCOLS = (("alpnet", []), ("clinical", ["--shots", "1"]))
# Mean Dice % on the alpnet protocol (setting 1), as docs/results.md cites them.
PUBLISHED = {
    "SSL-ALPNet (self-supervised on the target data)": {"chaos-t2": 78.8, "cmr-bssfp": 76.9},
    "SAM 2-based training-free": {"chaos-t2": 83.3, "cmr-bssfp": 84.5},
}


def run_dir(out: Path, preset: str, dataset: str, protocol: str) -> Path:
    return out / f"{preset}-{dataset}-{protocol}"


def run_one(data: Path, out: Path, preset: str, dataset: str, protocol: str, extra: list[str], passthrough: list[str]) -> None:
    folder = run_dir(out, preset, dataset, protocol)
    if (folder / "metrics.json").is_file():
        print(f"kept {folder} (finished before)")
        return
    cmd = [sys.executable, "-m", "fewshot", "eval", "--data", str(data / dataset), "--protocol", protocol,
           "--preset", preset, "--out", str(folder), *extra, *passthrough]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def table(out: Path) -> str:
    lines = ["| method | protocol | " + " | ".join(DATASETS) + " |", "|---|---|" + "---|" * len(DATASETS)]
    for name, figures in PUBLISHED.items():
        lines.append(f"| {name} (published) | alpnet | " + " | ".join(f"{figures[d]:.1f}" for d in DATASETS) + " |")
    for preset in PRESETS:
        for protocol, _ in PROTOCOLS:
            cells = []
            for dataset in DATASETS:
                metrics = run_dir(out, preset, dataset, protocol) / "metrics.json"
                cells.append(f"{100 * json.loads(metrics.read_text())['mean_dice']:.1f}" if metrics.is_file() else "–")
            lines.append(f"| `{preset}` | {protocol} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder holding chaos-t2/ and cmr-bssfp/")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS,
                        help="a subset (the table keeps a column for each; a run not made shows '–')")
    args, passthrough = parser.parse_known_args(argv)  # e.g. --max-queries 2 --device cuda --set random_weights=true
    args.out.mkdir(parents=True, exist_ok=True)
    for preset in args.presets:
        for dataset in args.datasets:
            for protocol, extra in PROTOCOLS:
                run_one(args.data, args.out, preset, dataset, protocol, extra, passthrough)
    text = table(args.out)
    (args.out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
