"""Print one of the README's set-up commands, read from the README itself (never a copy).

The README's first fenced ``bash`` block installs probe and profiles SmolLM2 (``first``); its
second installs what the tests need and runs them (``test``). CI runs both from here, so a
README that stops working on a fresh machine fails CI.

    python3 tools/readme_commands.py first|test [README]
    python3 tools/readme_commands.py check-output FILE   # the first command's output reads as English
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
WHICH = {"first": 0, "test": 1}
_FENCE = re.compile(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
#: the line `probe run` prints the model's answer on
_GENERATED = re.compile(r"^generated\s+(.*)$", re.M)


def bash_blocks(text: str) -> list[str]:
    """The fenced ``bash`` blocks of a Markdown text, in order, each stripped."""
    return [m.group(1).strip() for m in _FENCE.finditer(text)]


def command(which: str, readme: Path = README) -> str:
    """The README's ``first`` (install + first run) or ``test`` (install + tests) command."""
    blocks = bash_blocks(readme.read_text(encoding="utf-8"))
    index = WHICH[which]
    if len(blocks) <= index:
        raise SystemExit(f"{readme} has {len(blocks)} fenced bash block(s); the {which} command is block {index + 1}")
    return blocks[index]


def answer_problems(output: str) -> list[str]:
    """What is wrong with the first command's output: it must show a generated English answer."""
    problems = []
    for bad in ("Traceback", "Exception in thread"):
        if bad in output:
            problems.append(f"the output holds {bad!r}")
    m = _GENERATED.search(output)
    if m is None:
        return problems + ["no 'generated' line in the output"]
    text = m.group(1)
    words = re.findall(r"\b[A-Za-z]{2,}\b", text)
    if len(words) < 5:
        problems.append(f"the answer has {len(words)} English words (want >= 5): {text}")
    if "<|" in text:
        problems.append(f"the answer holds special tokens: {text}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "check-output":
        problems = answer_problems(Path(argv[1]).read_text(encoding="utf-8", errors="replace"))
        for p in problems:
            print(f"README first command: {p}", file=sys.stderr)
        return 1 if problems else 0
    if not argv or argv[0] not in WHICH:
        print(__doc__, file=sys.stderr)
        return 2
    print(command(argv[0], Path(argv[1]) if len(argv) > 1 else README))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
