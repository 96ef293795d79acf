"""``python -m fewshot bank build|stats``: bring a datastore's support bank up to date, or describe it."""
from __future__ import annotations

import argparse
import json

from fewshot.cli.common import add_common_options, engine_for, sync_bank


def add_bank_command(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bank", help="build or describe a datastore's support bank")
    p.add_argument("action", choices=["build", "stats"])
    p.add_argument("--datastore", required=True)
    p.add_argument("--bank", default=None, help="bank directory (default: <datastore>/.fewshot/bank-<preset>)")
    add_common_options(p)
    p.set_defaults(func=main)
    return p


def main(args) -> int:
    # stats only looks: a bank built with other settings is reported, never discarded.
    engine, report = engine_for(args, args.datastore, read_only=args.action == "stats")
    if args.action == "build":
        result = sync_bank(engine, args.datastore)
        print(json.dumps({"reconcile": result, "bank": engine.bank.stats()}, indent=1))
        return 1 if result["failed"] else 0
    stats = engine.bank.stats()
    stats["directory"] = str(engine.bank.directory)
    if report.dropped or report.discarded_all:
        stats["needs_rebuild"] = {"dropped": report.dropped, "discarded_all": report.discarded_all}
    print(json.dumps(stats, indent=1))
    return 0
