"""What SAM 2's own memory settings cost: spatial memories of recent slices (`transfer.neighbours`,
SAM 2: 6) and object pointers of recent slices (`transfer.pointers`, SAM 2: 15), on the real SAM 2.1
hiera-tiny architecture with random weights (speed does not depend on weight values).

    python scripts/bench_sam2_memories.py --out docs/bench/sam2-memories.json [--image-size 512] [--slices 12]

One synthetic volume, k supports per slice, one label, presence forced so every slice runs; each
setting segments the same volume with image features cached (the first, untimed pass fills the
cache), so the figures are memory attention, decoding and memory encoding only. Ratios are taken
within one run, on wall time and on the process's CPU time (less sensitive to other work on a shared
machine).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fewshot.transfer.sam2_memory import Sam2Transfer
from fewshot.transfer.sam2_parts import PAYLOAD_KEYS
from fewshot.transfer.sam2_model import save_random_checkpoint
from fewshot.types import SlicePlan, Support, SupportRef

CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"  # inside the installed sam2 package
SETTINGS = ((2, 2), (2, 15), (6, 6), (6, 15))  # (neighbours, pointers); (2, 2) was the old default


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    S = 256
    images = rng.random((args.k, S, S), dtype=np.float32)
    masks = np.zeros((args.k, S, S), np.uint16)
    masks[:, 80:170, 90:160] = 1
    query = rng.random((args.slices, S, S), dtype=np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_random_checkpoint(CONFIG, Path(tmp) / "hiera_t_random.pt", seed=0)
        base = {"image_size": args.image_size, "feature_cache": 1, "fill_hole_area": 0}
        transfer = Sam2Transfer.from_settings(dict(base, neighbours=6, pointers=15), checkpoint, CONFIG, "cpu", "sam2.1-hiera-tiny-random")
        with torch.no_grad():
            transfer.model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(10.0)  # every slice runs
        payload = transfer.encode_supports(images, masks, [1])
        supports = [Support(SupportRef("s", i), images[i], masks[i], (1,), score=0.5,
                            payload={k: payload[k][i] for k in PAYLOAD_KEYS}) for i in range(args.k)]
        plans = [SlicePlan(z, supports, (1,)) for z in range(args.slices)]
        transfer.segment_volume(query, plans, [1], cache_key="q")  # fills the image-feature cache
        # Settings interleaved over rounds, medians reported: load from other work on the machine
        # then hits every setting alike.
        times: dict[tuple, list[dict]] = {setting: [] for setting in SETTINGS}
        for round_ in range(args.rounds):
            for neighbours, pointers in SETTINGS:
                transfer.neighbours, transfer.pointers = neighbours, pointers
                start, cpu_start = time.perf_counter(), time.process_time()
                result = transfer.segment_volume(query, plans, [1], cache_key="q")
                seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
                assert result.seconds["encode"] == 0.0
                times[(neighbours, pointers)].append({"total": seconds, "cpu": cpu, **result.seconds})
                print(round_, neighbours, pointers, round(seconds / args.slices, 3), round(cpu / args.slices, 3), flush=True)
        for (neighbours, pointers), runs in times.items():
            med = {k: float(np.median([r[k] for r in runs])) / args.slices for k in ("total", "cpu", "attention_decode", "memory_encode")}
            rows.append({"neighbours": neighbours, "pointers": pointers, "seconds_per_slice": round(med["total"], 3),
                         "cpu_seconds_per_slice": round(med["cpu"], 3),
                         "attention_decode_s": round(med["attention_decode"], 3), "memory_encode_s": round(med["memory_encode"], 3)})
    base_s, base_cpu = rows[0]["seconds_per_slice"], rows[0]["cpu_seconds_per_slice"]
    for row in rows:
        row["ratio_to_2_2"] = round(row["seconds_per_slice"] / base_s, 2)
        # CPU time moves less than wall time with other work on the machine (the bench reports both).
        row["cpu_ratio_to_2_2"] = round(row["cpu_seconds_per_slice"] / base_cpu, 2)
    report = {"image_size": args.image_size, "k": args.k, "slices": args.slices, "labels": 1, "rounds": args.rounds,
              "threads": torch.get_num_threads(), "rows": rows,
              "command": f"python scripts/bench_sam2_memories.py --out {args.out} --image-size {args.image_size} --slices {args.slices} --k {args.k} --rounds {args.rounds}"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
