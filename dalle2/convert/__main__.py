"""``python -m dalle2.convert karlo src=<diffusers dir> out=<dir> [check=true] [force=true]`` (see :mod:`dalle2.convert`).

``check=true`` compares the converted directory with diffusers' ``UnCLIPPipeline`` on ``src`` (needs ``diffusers`` and
``transformers``), prints the result as JSON and exits 1 when a difference is above tolerance; ``check_only=true``
runs the check on an ``out`` converted earlier, without converting again.
"""

from __future__ import annotations

import json
import sys

USAGE = "usage: python -m dalle2.convert karlo src=DIR out=DIR [check=true] [check_only=true] [force=true]"
KEYS = {"src", "out", "check", "check_only", "force"}


def _flag(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "karlo":
        raise SystemExit(f"{USAGE} (known converters: karlo)")
    args: dict[str, str] = {}
    for a in argv[1:]:
        key, sep, value = a.partition("=")
        if not sep or key not in KEYS:
            raise SystemExit(f"{USAGE}; got {a!r}")
        args[key] = value
    if "src" not in args or "out" not in args:
        raise SystemExit(f"{USAGE} (src and out are required)")
    from dalle2.convert.karlo import ConversionError, convert_karlo

    if not _flag(args.get("check_only")):
        try:
            manifest = convert_karlo(args["src"], args["out"], force=_flag(args.get("force")))
        except (ConversionError, FileExistsError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}") from None
        spec = json.loads(manifest.read_text())
        files = [spec["clip"], spec["prior"], spec["decoder"], *spec["upsamplers"]]
        print(f"[dalle2] converted {args['src']} -> {args['out']}: {', '.join(files)} + {manifest.name}")
    if _flag(args.get("check")) or _flag(args.get("check_only")):
        from dalle2.convert.karlo_check import check_karlo

        result = check_karlo(args["src"], args["out"])
        print(json.dumps(result, indent=2))
        if not result["ok"]:
            print("[dalle2] check failed: a difference is above tolerance", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
