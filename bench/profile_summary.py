"""Where a process's CPU went, from `py-spy record --format raw --threads` output.

    .venv/bin/python bench/profile_summary.py /tmp/prof/ours-burst.txt [--per-tr 1000]

Prints the share of samples per thread, per module where the CPU was spent
(the innermost frame: "self"), per module and function on the stack
("inclusive", each stack counted once per label), and the innermost functions.
With `--per-tr N` and `--cpu-ms X` (the run's CPU per TokenRequest), each share
is also shown in ms per TokenRequest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from devenv.benchfigures import frame_function, frame_module, parse_collapsed, shares


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--cpu-ms", type=float, default=None, help="CPU ms per TokenRequest")
    args = parser.parse_args(argv)
    stacks = parse_collapsed(args.profile.read_text())
    total = sum(stack.samples for stack in stacks)
    print(f"{args.profile}: {total} samples")

    def show(title: str, table: dict[str, float]) -> None:
        print(f"\n{title}")
        for label, share in list(table.items())[: args.top]:
            per_tr = f"{share * args.cpu_ms / 100:7.3f} ms" if args.cpu_ms else ""
            print(f"  {share:5.1f} %  {per_tr}  {label}")

    show("by thread", shares(stacks, lambda s: [s.thread.split(" ")[0]]))
    show("self, by module", shares(stacks, lambda s: [frame_module(s.frames[-1])]))
    show("inclusive, by module", shares(stacks, lambda s: map(frame_module, s.frames)))
    show("inclusive, by function", shares(stacks, lambda s: map(frame_function, s.frames)))
    show("self, by function", shares(stacks, lambda s: [frame_function(s.frames[-1])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
