"""The hot spots of py-spy profiles in raw (collapsed stacks) format, as
``bench/concurrency.py --py-spy DIR`` writes them: for each file, the
samples, then the functions with the most samples on top of the stack
(self) and anywhere in it (inclusive, each function counted once per
stack).

Usage: .venv/bin/python bench/profile_top.py [--top N] FILE...
"""
from __future__ import annotations

import argparse
import collections
import re
import sys

FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")  # "function (path/file.py:line)"


def short(frame: str) -> str:
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    function, path = m.groups()
    parts = path.split("/")
    for anchor in ("neozodb", "ZODB", "ZEO", "asyncio", "transaction", "persistent",
                   "python3.11"):
        if anchor in parts:
            parts = parts[parts.index(anchor):]
            break
    else:
        parts = parts[-2:]
    return "%s (%s)" % (function, "/".join(parts))


def analyse(path: str) -> tuple[int, collections.Counter, collections.Counter]:
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = [short(fr) for fr in stack.split(";")]
            if frames and frames[0].startswith(("process ", "thread ")):
                frames = [fr for fr in frames if not fr.startswith(("process ", "thread "))]
            if not frames:
                continue
            total += n
            own[frames[-1]] += n
            for fr in set(frames):
                inclusive[fr] += n
    return total, own, inclusive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("files", nargs="+")
    opts = parser.parse_args(argv)
    for path in opts.files:
        total, own, inclusive = analyse(path)
        print("== %s: %d samples" % (path, total))
        if not total:
            continue
        print("  self:")
        for fr, n in own.most_common(opts.top):
            print("    %5.1f%%  %s" % (100 * n / total, fr))
        print("  inclusive:")
        for fr, n in inclusive.most_common(opts.top + 8):
            print("    %5.1f%%  %s" % (100 * n / total, fr))
    return 0


if __name__ == "__main__":
    sys.exit(main())
