"""Redo one section (issue 20.4): which sections a branch keeps, and the branch itself through the CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from framepack.planning import plan_sections
from framepack.redo import regenerated_steps, video_order

FRAMEPACK = str(Path(sys.executable).with_name("framepack"))


def _reads(plan) -> set[int]:
    return {s for s in plan.context_sources() if isinstance(s, int)}


@pytest.mark.parametrize("mode", ["forward", "inverted", "vanilla"])
@pytest.mark.parametrize("count", [1, 3, 5])
def test_a_section_is_redone_exactly_when_it_is_k_or_reads_one_that_is(mode, count):
    plans = plan_sections(count, mode)
    for section in range(1, count + 1):
        redone = set(regenerated_steps(plans, section))
        target = video_order(plans)[section - 1].step
        assert target in redone
        written = {p for plan in plans if plan.step in redone for p in plan.positions}
        for plan in plans:
            reads_redone = bool(_reads(plan) & written)
            if plan.step != target:
                # made again if and only if it reads a section made again (which exists only after K)
                assert (plan.step in redone) == (plan.step > target and reads_redone), (mode, section, plan.step)
        # what is kept is a prefix in generation order, so the branch continues like a resumed job
        assert redone == set(range(min(redone), count))


def test_which_sections_are_kept_depends_on_the_generation_order():
    forward, inverted = plan_sections(3, "forward"), plan_sections(3, "inverted")
    # the first section in time: forward makes it first (everything after reads it), inverted last
    assert regenerated_steps(forward, 1) == [0, 1, 2]
    assert regenerated_steps(inverted, 1) == [video_order(inverted)[0].step] == [2]
    # the last section in time: the opposite
    assert regenerated_steps(forward, 3) == [2]
    assert regenerated_steps(inverted, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="between 1 and 3"):
        regenerated_steps(forward, 4)


def test_a_later_section_that_reads_nothing_made_again_is_kept():
    from dataclasses import replace

    from framepack.planning import LevelPlan
    from framepack.redo import kept_prefix

    plans = plan_sections(3, "forward")
    # a made-up last section whose context holds only the start image: nothing of section 2
    blind = [LevelPlan(level.kernel, level.indices, tuple("start" if s == "start" else None for s in level.sources))
             for level in plans[2].levels]
    plans[2] = replace(plans[2], levels=tuple(blind))
    assert regenerated_steps(plans, 2) == [1]
    assert kept_prefix(plans, [1]) == 1  # a job continues from a prefix: step 2 is made again all the same
