"""``python -m fewshot segment|batch|bank|models|eval|bench``."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading


def build_parser() -> argparse.ArgumentParser:
    # One module per command, each a thin main(args) over the library; loaded here so that nothing
    # below the command line imports it.
    from fewshot.cli import bank, batch, bench, eval, models, segment

    parser = argparse.ArgumentParser(prog="python -m fewshot", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    segment.add_segment_command(sub)
    bank.add_bank_command(sub)
    models.add_models_command(sub)
    eval.add_eval_command(sub)
    bench.add_bench_command(sub)
    batch.add_batch_command(sub)
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
    from fewshot.cli.common import release_held
    from fewshot.config import ConfigError
    from fewshot.transfer import workers
    from fewshot.volume import VolumeError
    from fewshot.weights import WeightsError

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
        release_held()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
