"""``mpskern <verb> [options]``: one entry point for the tool's commands (pyproject's ``mpskern`` script)."""
from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# verb -> (module with main(argv, prog), one-line description); modules are imported only when used
VERBS: dict[str, tuple[str, str]] = {
    "overlap": ("mpskern.overlap", "measure the throughput gain of N processes sharing one GPU (MPS, "
                                   "time-slicing, streams)"),
}


def usage() -> str:
    width = max(map(len, VERBS))
    verbs = "\n".join(f"  {verb:<{width}}  {desc}" for verb, (_, desc) in VERBS.items())
    return f"usage: mpskern <verb> [options]   (mpskern <verb> --help for its options)\n\nverbs:\n{verbs}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"mpskern: error: unknown verb {verb!r}; verbs: {', '.join(VERBS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb][0])
    return module.main(rest, prog=f"mpskern {verb}")


if __name__ == "__main__":
    sys.exit(main())
