"""The README's paper-scale recipe cannot rot: every python command in it parses with its script's own flag parser
and passes the checks that need no files (flags the run would ignore, values out of range)."""
import re
import shlex
from pathlib import Path

import pytest

import evaluate
import overgen
import train_pref
import train_sft
from porover import judging, reward
from porover.config import parse

README = Path(__file__).resolve().parent.parent / "README.md"


def recipe_commands() -> list[list[str]]:
    """The recipe block's commands, continuation lines joined, comments and shell-only lines (cat) left out."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- recipe -->\n```bash\n(.*?)```\n<!-- /recipe -->", text, re.S).group(1)
    lines = re.sub(r"\\\n\s*", " ", block).splitlines()
    commands = [shlex.split(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [c[c.index(next(w for w in c if w.endswith(".py"))):] for c in commands if any(w.endswith(".py") for w in c)]


def config_of(argv: list[str]):
    script, rest = argv[0], argv[1:]
    if script in ("overgen.py", "evaluate.py"):
        return parse({"overgen.py": overgen, "evaluate.py": evaluate}[script].COMMANDS[rest[0]][0], rest[1:])
    return parse({"train_sft.py": train_sft.Config, "train_pref.py": train_pref.Config}[script], rest)


def test_the_recipe_has_every_step():
    steps = [" ".join(c[:2]) for c in recipe_commands()]
    for step in ("overgen.py generate", "overgen.py select", "train_sft.py --model", "overgen.py overrefused",
                 "overgen.py pairs", "train_pref.py --model", "evaluate.py run", "evaluate.py winrate"):
        assert step in steps, step


@pytest.mark.parametrize("argv", recipe_commands(), ids=lambda c: " ".join(c[:2]))
def test_every_recipe_command_parses_and_checks(argv):
    cfg = config_of(argv)
    if isinstance(cfg, overgen.GenerateConfig):
        overgen.resolve(cfg)
    if isinstance(cfg, judging.JudgeConfig):
        assert judging.config_errors(cfg) == []
    if isinstance(cfg, reward.RewardConfig):
        assert reward.reward_errors(cfg) == []
    if isinstance(cfg, overgen.PairsConfig):
        assert cfg.tau == 0.01 and cfg.k_student == 1
