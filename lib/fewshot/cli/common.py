"""``python -m fewshot segment|batch|bank|models|eval|bench``."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

logger = logging.getLogger("fewshot")


def bank_dir_for(datastore: str | os.PathLike, preset: str) -> Path:
    """Where a datastore's bank for a preset lives; the MONAI Label app uses the same place."""
    return Path(datastore) / ".fewshot" / f"bank-{preset}"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="foundation", help="preset name from configs/presets (default: foundation)")
    parser.add_argument("--models-dir", default=None, help="models directory (default: $FEWSHOT_MODELS_DIR or ./models)")
    parser.add_argument("--device", default=None, help="cpu, cuda or auto (default: the preset's)")
    parser.add_argument("--labels", default=None, help="label names and values, e.g. liver=1,spleen=4")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset setting, e.g. --set retrieval.top_k=8 (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true")


def _settings(args) -> dict:
    from fewshot.config import load_preset, parse_overrides

    overrides = parse_overrides(args.overrides)
    if args.device:
        overrides["device"] = args.device
    return load_preset(args.preset, overrides)


def _engine(args, datastore: str, read_only: bool = False):
    """The preset's engine and its bank. A writing command holds the bank directory it uses (see
    ``fewshot.bank_holders``) until it ends, and never replaces a bank another process (a server)
    holds: see ``choose_bank``."""
    from fewshot.config import parse_label_map
    from fewshot.pipeline import Engine

    settings = _settings(args)
    explicit = getattr(args, "bank", None)
    shared = Path(explicit) if explicit else bank_dir_for(datastore, args.preset)
    overridden = bool(args.overrides or args.device)
    bank_dir = shared if read_only else (lambda fingerprint: choose_bank(shared, fingerprint, overridden, bool(explicit)))
    engine, report = Engine.from_settings(
        settings, bank_dir=bank_dir, models_dir=args.models_dir, label_names=parse_label_map(args.labels),
        read_only=read_only,
    )
    return engine, report


def choose_bank(shared: Path, fingerprint: str, overridden: bool, explicit: bool) -> Path:
    """The bank directory a writing run uses, held from here on.

    The shared bank when it is absent or was built with the same settings. When it was built with
    others: if another process holds it (a server), or this run's own ``--set``/``--device`` changed
    the settings, a bank of this run's own beside it (``bank-<preset>-<digest>``, kept for the next
    run with the same settings); otherwise it is a stale bank nobody uses and is rebuilt in place.
    A ``--bank`` directory another process holds with other settings is refused."""
    from fewshot import bank_holders
    from fewshot.bank import BankError

    recorded = bank_holders.recorded_fingerprint(shared)
    if recorded is None or recorded == fingerprint:
        return _hold(shared)
    busy = bank_holders.used_elsewhere(shared)
    if explicit:
        if busy:
            raise BankError(
                f"support bank {shared} was built with other settings ({recorded}) and another process (a server?) is "
                f"using it; this run needs {fingerprint}. Give --bank another directory, or run with the same settings."
            )
        return _hold(shared)
    if not busy and not overridden:
        return _hold(shared)  # stale for this preset: rebuilt in place, as a server starting now would
    own = bank_holders.sibling(shared, fingerprint)
    logger.warning(
        "the shared support bank %s was built with other settings (%s)%s; this run uses a bank of its own, %s "
        "(built from the final labels if needed), and leaves the shared one as it is",
        shared, recorded or "unreadable manifest", ", and another process (a server?) is using it" if busy else "", own,
    )
    return _hold(own)


_held: list[Path] = []  # bank directories this command holds; released when it ends (main)


def _hold(directory: Path) -> Path:
    from fewshot import bank_holders

    bank_holders.hold(directory)
    _held.append(directory)
    return directory


def _progress_bar(desc: str, unit: str = "slice"):
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return update


def _sync_bank(engine, datastore: str) -> dict:
    from fewshot.datastore import labelled, scan_datastore

    sources = labelled(scan_datastore(datastore))
    if not sources:
        raise SystemExit(f"{datastore}: no final labels under labels/final/; label at least one image first")
    return engine.reconcile(sources, progress=_progress_bar("building support bank"))


def cmd_segment(args) -> int:
    engine, _ = _engine(args, args.support)
    _sync_bank(engine, args.support)
    requested = [s for s in args.only.split(",") if s] if args.only else None
    # Progress counts slices, or for a multi-atlas preset atlases aligned and registered, then fusion.
    unit = "step" if engine.scan_level else "slice"
    seg = engine.segment(args.image, labels=requested, progress=_progress_bar("segmenting", unit))
    sidecar = seg.save(args.output)
    summary = {k: v for k, v in seg.summary().items() if k != "provenance"}
    summary["seconds_per_volume"] = round(float(seg.timings.get("total", 0.0)), 2)
    summary["output"] = str(args.output)
    summary["sidecar"] = str(sidecar)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_bank(args) -> int:
    # stats only looks: a bank built with other settings is reported, never discarded.
    engine, report = _engine(args, args.datastore, read_only=args.action == "stats")
    if args.action == "build":
        result = _sync_bank(engine, args.datastore)
        print(json.dumps({"reconcile": result, "bank": engine.bank.stats()}, indent=1))
        return 1 if result["failed"] else 0
    stats = engine.bank.stats()
    stats["directory"] = str(engine.bank.directory)
    if report.dropped or report.discarded_all:
        stats["needs_rebuild"] = {"dropped": report.dropped, "discarded_all": report.discarded_all}
    print(json.dumps(stats, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fewshot", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment a volume from a datastore's labelled images")
    seg.add_argument("--image", required=True, help="volume to segment (NIfTI, NRRD, DICOM folder, ...)")
    seg.add_argument("--support", required=True, help="MONAI Label datastore: images + labels/final/")
    seg.add_argument("--output", required=True, help="output label file (.nii.gz); a .json sidecar goes beside it")
    seg.add_argument("--bank", default=None, help="bank directory (default: <support>/.fewshot/bank-<preset>)")
    seg.add_argument("--only", default=None, help="comma-separated label names or values to segment (default: all)")
    _common(seg)
    seg.set_defaults(func=cmd_segment)

    bank = sub.add_parser("bank", help="build or describe a datastore's support bank")
    bank.add_argument("action", choices=["build", "stats"])
    bank.add_argument("--datastore", required=True)
    bank.add_argument("--bank", default=None, help="bank directory (default: <datastore>/.fewshot/bank-<preset>)")
    _common(bank)
    bank.set_defaults(func=cmd_bank)

    from fewshot.weights import add_models_commands, run_models_command

    add_models_commands(sub).set_defaults(func=run_models_command)

    from fewshot.bench import add_bench_command
    from fewshot.eval.runner import add_eval_command

    add_eval_command(sub)
    add_bench_command(sub)

    from fewshot.batch.cli import add_batch_command

    add_batch_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from fewshot.bank import BankError
    from fewshot.batch.manifest import ManifestError
    from fewshot.batch.runner import BatchError
    from fewshot.config import ConfigError
    from fewshot.volume import VolumeError
    from fewshot.weights import WeightsError

    from fewshot.transfer import workers

    def stop(signum, frame):
        # The default action kills this process without exit handlers, leaving its registration
        # workers behind: stop them, then exit as the signal would (status 128 + 15).
        workers.terminate_all()
        raise SystemExit(128 + signum)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
    try:
        return int(args.func(args) or 0)
    except (WeightsError, BankError, VolumeError, ConfigError, FileNotFoundError, ValueError,
            BatchError, ManifestError) as exc:  # InputError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        workers.terminate_all()
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        from fewshot import bank_holders

        while _held:
            bank_holders.release(_held.pop())
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
