"""What every engine command shares: the common options, the preset's settings, the engine and the
bank directory it holds, a progress bar, and bringing a bank up to date with a datastore."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fewshot.folders import bank_dir_for

logger = logging.getLogger("fewshot")


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="foundation", help="preset name from configs/presets (default: foundation)")
    parser.add_argument("--models-dir", default=None, help="models directory (default: $FEWSHOT_MODELS_DIR or ./models)")
    parser.add_argument("--device", default=None, help="cpu, cuda or auto (default: the preset's)")
    parser.add_argument("--labels", default=None, help="label names and values, e.g. liver=1,spleen=4")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset setting, e.g. --set retrieval.top_k=8 (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true")


def settings_from(args) -> dict:
    from fewshot.config import load_preset, parse_overrides

    overrides = parse_overrides(args.overrides)
    if args.device:
        overrides["device"] = args.device
    return load_preset(args.preset, overrides)


def engine_for(args, datastore: str, read_only: bool = False):
    """The preset's engine and its bank. A writing command holds the bank directory it uses (see
    ``fewshot.bank_holders``) until it ends, and never replaces a bank another process (a server)
    holds: see ``choose_bank``."""
    from fewshot.config import parse_label_map
    from fewshot.engine import Engine

    settings = settings_from(args)
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


held: list[Path] = []  # bank directories this command holds; released when it ends (cli.main)


def _hold(directory: Path) -> Path:
    from fewshot import bank_holders

    bank_holders.hold(directory)
    held.append(directory)
    return directory


def progress_bar(desc: str, unit: str = "slice"):
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


def sync_bank(engine, datastore: str) -> dict:
    from fewshot.annotation import Annotation
    from fewshot.folders import final_label_annotations, labelled, scan_datastore

    sources = labelled(scan_datastore(datastore))
    if not sources:
        raise SystemExit(f"{datastore}: no final labels under labels/final/; label at least one image first")
    partial = final_label_annotations(datastore)
    return engine.reconcile(sources, progress=progress_bar("building support bank"),
                            annotation_of=lambda image_id: partial.get(image_id, Annotation()))


def release_held() -> None:
    """Let go of every bank directory this command held (at its end)."""
    from fewshot import bank_holders

    while held:
        bank_holders.release(held.pop())
