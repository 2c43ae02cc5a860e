"""What the README and docs/ state about defaults and measurements agrees with the code and data.

Each fact is written in the docs in a fixed phrase, so that these checks find it; a doc that
stops stating it fails as surely as one that states it wrong.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from framepack.settings import GenerationSettings

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "src" / "framepack" / "assets" / "tiny" / "framepack.json"
MODEL_CARD = ROOT / "src" / "framepack" / "assets" / "tiny" / "MODEL_CARD.md"
USER_DOCS = ["README.md", "docs/generation.md", "docs/demo-model.md"]


def text(name: str) -> str:
    """The file with every run of whitespace made one space, so phrases may wrap anywhere."""
    return re.sub(r"\s+", " ", (ROOT / name).read_text())


def stated(pattern: str, name: str) -> list[tuple[str, ...]]:
    found = [m.groups() for m in re.finditer(pattern, text(name), flags=re.IGNORECASE)]
    assert found, f"{name} no longer states /{pattern}/"
    return found


@pytest.mark.parametrize("name", USER_DOCS)
def test_the_demo_models_default_cfg_is_the_manifests(name):
    cfg = json.loads(MANIFEST.read_text())["cfg"]
    for (value,) in stated(r"the demo model's default CFG is (\d+(?:\.\d+)?)", name):
        assert float(value) == cfg, f"{name} says the demo model's default CFG is {value}; its manifest says {cfg}"


@pytest.mark.parametrize("name", ["README.md", "docs/generation.md"])
def test_the_stated_generation_defaults_are_the_settings_defaults(name):
    defaults = {f.name: f.default for f in dataclasses.fields(GenerationSettings)}
    for seconds, seed, steps in stated(r"Defaults: `--seconds (\S+?)`, `--seed (\d+)`, `--steps (\d+)`", name):
        assert (float(seconds), int(seed), int(steps)) == (defaults["seconds"], defaults["seed"], defaults["steps"])


def test_no_doc_names_another_default_seed():
    seed = next(f.default for f in dataclasses.fields(GenerationSettings) if f.name == "seed")
    for name in ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]:
        for other in re.findall(r"default seed (?:is )?(\d+)|seed \(default (\d+)\)", text(name), flags=re.IGNORECASE):
            assert int("".join(other)) == seed, f"{name} names the default seed {''.join(other)}, not {seed}"


def test_the_demo_timing_is_one_range_everywhere():
    number = r"\d+(?:\.\d+)?"
    phrase = rf"({number}-{number}) s of generation and ({number}-{number}) s for the whole command, over several runs on (\d+) CPU cores"
    ranges = {found for name in ["README.md", "docs/demo-model.md"] for found in stated(phrase, name)}
    assert len(ranges) == 1, f"the demo's timing is stated as several ranges: {sorted(ranges)}"
    (generation, command, cores), = ranges
    low, high = (float(x) for x in generation.split("-"))
    assert low <= high and float(command.split("-")[0]) >= low  # the command includes the generation

    # `framepack demo --help` and `framepack --help` state the same measurement
    demo_help = re.sub(r"\s+", " ", cli("demo", "--help"))
    assert re.search(rf"{cores} CPU cores: {re.escape(generation)} s of generation, {re.escape(command)} s for the whole "
                     "command", demo_help), demo_help
    top_help = re.sub(r"\s+", " ", cli("--help"))
    assert re.search(rf"\({re.escape(command)} s for the whole command on {cores} CPU cores\)", top_help), top_help


def cli(*args: str) -> str:
    """stdout of the real `framepack` entry point (the one beside this Python)."""
    exe = Path(sys.executable).with_name("framepack")
    done = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def published_table(markdown: str) -> str:
    """The evaluation table the package writes: from its 'model NAME, N steps, ...' line to the last
    row of its measurements."""
    start = re.search(r"^model \S+, \d+ steps, ", markdown, flags=re.MULTILINE).start()
    rows = markdown[start:].split("\n\n", 2)
    return rows[0] + "\n\n" + rows[1]


SIZE_OPTIONS = ("--start-frames", "--long-videos", "--caption-seconds", "--shape-seconds", "--persistence-seconds",
                "--drift-seconds", "--steps", "--cfg", "--seed", "--start", "--yardstick", "--prompts")


def test_the_published_test_table_is_the_model_cards_and_was_measured_at_the_models_defaults():
    doc = (ROOT / "docs" / "demo-model.md").read_text()
    shipped = doc[doc.index("### The shipped model on the test split"):doc.index("## History")]
    table = published_table(shipped)
    # the table the model card carries is the one the docs publish
    assert table == published_table(MODEL_CARD.read_text())
    first = table.splitlines()[0]
    cfg = json.loads(MANIFEST.read_text())["cfg"]
    assert re.search(rf"\bcfg {cfg:g}\b", first), "the table was not measured at the manifest's cfg"
    from framepack.train.evaluate import YardstickConfig

    assert "test split" in first and "25 steps" in first and f"{YardstickConfig.start} starts" in first, first

    # Where the docs tell a user how to evaluate (the README, the usage block at the top of
    # docs/demo-model.md) and where `make demo-model` measures the shipped teacher (its last
    # `framepack eval`; the ones before it replay the earlier models' tables, on the world they were
    # measured on), `framepack eval` is the test split at the yardstick's defaults, as the table was
    # measured. The history sections keep their own commands.
    recipe = "framepack eval --split test"
    usage = doc[: doc.index("## The world")]
    chain = re.findall(r"framepack eval\b[^`#\n]*", (ROOT / "Makefile").read_text())
    assert chain and all("--split test" in command for command in chain)
    for where, words in [("README.md", (ROOT / "README.md").read_text()), ("docs/demo-model.md usage", usage),
                         ("Makefile", chain[-1])]:
        commands = re.findall(r"framepack eval\b[^`#\n]*", words)
        assert commands, f"{where} shows no `framepack eval`"
        for command in commands:
            assert "--split test" in command and not any(o in command for o in SIZE_OPTIONS), \
                f"{where}: `{command.strip()}` is not the published table's settings"
    assert recipe in shipped[: shipped.index("\n|")], "the shipped model's section does not name its table's command"
