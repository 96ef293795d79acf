"""``python -m fewshot models download|verify|list``: the network weights of ``fewshot.weights``."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from fewshot.config import ConfigError
from fewshot.weights import (
    DOWNLOAD_COMMAND,
    WeightsError,
    download,
    list_models,
    load_registry,
    preset_models,
    verify,
)


def add_models_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("models", help="list, download and verify network weights")
    sub = parser.add_subparsers(dest="models_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--models-dir", default=None, help="default: $FEWSHOT_MODELS_DIR or <project>/models")
        p.add_argument("--json", action="store_true", help="print machine-readable results")

    p = sub.add_parser("download", help="fetch weights (default: the models of the foundation preset)")
    p.add_argument("names", nargs="*", help="registry names (see `models list`)")
    p.add_argument("--preset", default=None, help="fetch the models this preset uses")
    p.add_argument("--all", action="store_true", help="fetch every model in the registry")
    p.add_argument("--force", action="store_true", help="fetch again even if present")
    common(p)
    p = sub.add_parser("verify", help="check weights on disk against published sha256 digests; exits 1 if any is "
                                      "missing or altered")
    p.add_argument("names", nargs="*", help="registry names (default: the models of the foundation preset)")
    p.add_argument("--preset", default=None, help="check the models this preset uses")
    p.add_argument("--all", action="store_true", help="check every model in the registry")
    p.add_argument("--rehash", action="store_true", help="ignore cached digests and hash every file again")
    common(p)
    p = sub.add_parser("list", help="show the registry and what is on disk")
    common(p)
    parser.set_defaults(func=main)
    return parser


def _download_names(args: argparse.Namespace) -> list[str]:
    """What ``download`` fetches and ``verify`` checks: the names given, every downloadable model
    (``--all``), or a preset's models (``--preset``, default foundation)."""
    if args.names:
        return list(args.names)
    if args.all:
        return [n for n, s in load_registry().items() if not s.random_only]
    from fewshot.config import load_preset

    return preset_models(load_preset(args.preset or "foundation"))


def main(args: argparse.Namespace) -> int:
    try:
        if args.models_command == "download":
            results = download(_download_names(args), args.models_dir, force=args.force)
            _print(args, [r.as_dict() for r in results], ("name", "status", "path", "detail"))
            return 0
        if args.models_command == "verify":
            names = _download_names(args)
            results = verify(names, args.models_dir, use_cache=not args.rehash)
            _print(args, [r.as_dict() for r in results], ("name", "status", "detail"))
            bad = [r for r in results if not r.ok]
            if bad and not getattr(args, "json", False):
                missing = [r.name for r in bad if r.status == "missing"]
                altered = [r.name for r in bad if r.status != "missing"]
                flag = f" --models-dir {args.models_dir}" if args.models_dir else ""
                if missing:
                    print(f"missing: {', '.join(missing)}. Fetch them with `{DOWNLOAD_COMMAND} {' '.join(missing)}{flag}`, "
                          f"or copy the files `python -m fewshot models list{flag}` names into place", file=sys.stderr)
                if altered:
                    print(f"failed verification: {', '.join(altered)}. Fetch them again with "
                          f"`{DOWNLOAD_COMMAND} {' '.join(altered)} --force{flag}`", file=sys.stderr)
            return 1 if bad else 0
        if args.models_command == "list":
            rows = list_models(args.models_dir)
            if not args.json:
                for row in rows:
                    row["present"] = "yes" if row["present"] else "no"
                    row["size"] = f"{row['size'] / 1e6:.1f} MB" if row["size"] else "-"
            _print(args, rows, ("name", "kind", "present", "size", "sha256", "path"))
            return 0
    except (WeightsError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    raise ValueError(f"unknown models command {args.models_command!r}")


def _print(args: argparse.Namespace, rows: list[dict], columns: Sequence[str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2, default=str))
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) if rows else len(c) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns).rstrip())
