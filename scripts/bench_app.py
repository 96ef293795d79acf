"""Time the MONAI Label app the way Slicer uses it: a real server on loopback, MONAI Label's client.

    python scripts/bench_app.py --out out/bench-app [--preset classic] [--data ../shared/data/chaos-t2]

Starts ``monailabel start_server`` on a copy of a few real volumes (two with final labels), then times
``PUT /datastore/label`` (the issue's <= 0.5 s target: ingestion must not be in the response),
``GET /info``, and ``POST /infer`` (first call, then the same image again). Saves are timed with the
bank idle and again back to back, so each lands while the previous one is still being ingested on
the same two cores. Writes ``OUT/bench_app.json`` and ``OUT/bench_app.png``.

The engine's own bench (``python -m fewshot bench``) cannot time this: the engine has no server.
``classic`` is the default preset here because its ingestion is real work on any machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

PROJECT = Path(__file__).resolve().parents[1]

TARGET_PUT_S = 0.5
IDLE_TIMEOUT = 1800  # foundation-random ingests a CHAOS volume in about 100 s on 2 cores


class AppServer:
    """``monailabel start_server`` on loopback in its own process group, as a user starts it (README)."""

    def __init__(self, studies: Path, models_dir: Path, log: Path, preset: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(PROJECT / "apps" / "fewshot"),
                    "--studies", str(studies), "--host", "127.0.0.1", "--port", str(self.port),
                    "-c", "preset", preset, "-c", "models_dir", str(models_dir)]
        self.log_path = log

    def start(self) -> "AppServer":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, cwd=PROJECT, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def client(self):
        from monailabel.client import MONAILabelClient

        return MONAILabelClient(self.url, tmpdir=str(self.log_path.parent))

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                return self.client().info()
            except Exception:
                time.sleep(0.5)
        raise SystemExit(f"the server was not ready after {timeout} s; see {self.log_path}")

    def wait_bank_idle(self, timeout: float) -> dict:
        """Until nothing is queued, resyncing or ingesting: the support bank of the app's infer task."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            bank = next(m["support_bank"] for m in self.client().info()["models"].values() if "support_bank" in m)
            work = bank["ingestion"]
            if work["state"] == "idle" and not work["pending"] and not work["resync_pending"]:
                return bank
            time.sleep(0.25)
        raise SystemExit(f"the bank was still busy after {timeout} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def timed(call, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    out = call(*args, **kwargs)
    return out, time.perf_counter() - start


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "n": len(values), "median_s": statistics.median(values), "max_s": ordered[-1],
        "p90_s": ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))], "all_s": values,
    }


def uint8_copy(source: Path, target: Path, drop: int | None = None) -> Path:
    """A label as viewers export it (uint8), with the source's geometry; ``drop`` erases one value,
    so that consecutive saves differ and each one is really re-ingested."""
    ref = nib.load(source)
    header = ref.header.copy()
    header.set_data_dtype(np.uint8)
    values = np.asarray(ref.dataobj).astype(np.uint8)
    if drop is not None:
        values[values == drop] = 0
    nib.save(nib.Nifti1Image(values, ref.affine, header), target)
    return target


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("PUT label\n(bank idle)", results["put_idle"]), ("PUT label\n(ingesting)", results["put_while_ingesting"]),
              ("GET /info", results["info"])]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.boxplot([g["all_s"] for _, g in groups], showfliers=True)
    ax.set_xticks(range(1, len(groups) + 1), [name for name, _ in groups])
    ax.axhline(TARGET_PUT_S, color="tab:red", linestyle="--", label=f"target {TARGET_PUT_S} s (PUT)")
    ax.set_ylabel("seconds")
    ax.set_title(f"MONAI Label app on loopback, preset {results['preset']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--preset", default="classic")
    parser.add_argument("--data", type=Path, default=PROJECT.parent / "shared" / "data" / "chaos-t2")
    parser.add_argument("--models-dir", type=Path, default=Path(os.environ.get("FEWSHOT_MODELS_DIR", PROJECT / "models")))
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    if not any(args.data.glob("image_*")):
        raise SystemExit(f"no image_N/label_N pairs in {args.data}")
    cases = sorted((p.name[len("image_"):].split(".")[0] for p in args.data.glob("image_*.nii.gz")), key=int)[:4]
    labelled, saved, queried = cases[:2], cases[2], cases[3]
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="bench-app-") as tmp:
        studies = Path(tmp) / "studies"
        (studies / "labels" / "final").mkdir(parents=True)
        for case in cases:
            shutil.copyfile(args.data / f"image_{case}.nii.gz", studies / f"image_{case}.nii.gz")
        for case in labelled:
            shutil.copyfile(args.data / f"label_{case}.nii.gz", studies / "labels" / "final" / f"image_{case}.nii.gz")
        uploads = [uint8_copy(args.data / f"label_{saved}.nii.gz", Path(tmp) / "upload_a.nii.gz"),
                   uint8_copy(args.data / f"label_{saved}.nii.gz", Path(tmp) / "upload_b.nii.gz", drop=1)]

        app = AppServer(studies, args.models_dir, args.out / "server.log", args.preset).start()
        try:
            start = time.perf_counter()
            app.wait_ready(timeout=600)
            app.wait_bank_idle(timeout=IDLE_TIMEOUT)
            ready_s = time.perf_counter() - start
            client = app.client()
            image = f"image_{saved}"
            put_idle, put_busy, info, ingest = [], [], [], []
            for i in range(args.repeats):  # one save at a time, the bank idle before each
                app.wait_bank_idle(timeout=IDLE_TIMEOUT)
                put_idle.append(timed(client.save_label, image, str(uploads[i % 2]))[1])
                info.append(timed(client.info)[1])
                ingest.append(app.wait_bank_idle(timeout=IDLE_TIMEOUT)["ingestion"]["last"]["seconds"])
            for i in range(args.repeats):  # back to back: each lands while the last is being ingested
                put_busy.append(timed(client.save_label, image, str(uploads[i % 2]))[1])
                info.append(timed(client.info)[1])
            app.wait_bank_idle(timeout=IDLE_TIMEOUT)
            _, first_infer = timed(client.infer, "fewshot", f"image_{queried}", {})
            _, second_infer = timed(client.infer, "fewshot", f"image_{queried}", {})
        finally:
            app.stop()

    results = {
        "preset": args.preset, "data": str(args.data), "supports": labelled, "saved_image": f"image_{saved}",
        "cpu_count": os.cpu_count(), "load_before": os.getloadavg(),
        "server_ready_s": ready_s,
        "put_idle": summary(put_idle), "put_while_ingesting": summary(put_busy), "info": summary(info),
        "ingestion_s": summary(ingest),
        "infer_first_s": first_infer, "infer_second_s": second_infer,
        "target": {"what": "PUT /datastore/label response (ingestion is asynchronous)", "target_s": TARGET_PUT_S,
                   "measured_median_s": statistics.median(put_idle + put_busy),
                   "measured_max_s": max(put_idle + put_busy),
                   "met": max(put_idle + put_busy) <= TARGET_PUT_S},
    }
    (args.out / "bench_app.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "bench_app.png")
    print(f"PUT /datastore/label: idle median {results['put_idle']['median_s']:.3f} s (max {results['put_idle']['max_s']:.3f}), "
          f"while ingesting median {results['put_while_ingesting']['median_s']:.3f} s (max {results['put_while_ingesting']['max_s']:.3f}); "
          f"ingestion {results['ingestion_s']['median_s']:.1f} s; GET /info median {results['info']['median_s']:.3f} s; "
          f"infer {first_infer:.1f} s then {second_infer:.2f} s")
    print(f"wrote {args.out / 'bench_app.json'} and {args.out / 'bench_app.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
