#!/usr/bin/env python
"""Writes the OHIF build the app serves at /ohif/ to a folder, for serving it elsewhere (nginx, ...).

    python scripts/build_ohif.py out/ohif          # a full copy of MONAI Label's build, patched
    python scripts/build_ohif.py --check           # only check that every patch applies

The app itself needs no build step: it applies the same patches (``apps/fewshot/lib/ohif.py``, the
panel code in ``apps/fewshot/ohif/``) in memory to the build inside the installed monailabel wheel
and serves the result. Fails naming the patch when a target is not found (another monailabel).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps" / "fewshot"))

from lib import ohif  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", nargs="?", type=Path, help="folder to write (replaced if it exists)")
    parser.add_argument("--check", action="store_true", help="only check that the patches apply")
    args = parser.parse_args()
    if not args.check and args.dest is None:
        parser.error("give a folder to write, or --check")
    try:
        if args.check:
            names = sorted(ohif.build())
        else:
            names = ohif.write(args.dest)
    except ohif.PatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    where = "checked" if args.check else f"written to {args.dest}"
    print(f"{len(ohif.patches())} patches in {', '.join(names)}; stock build {ohif.STOCK}; {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
