"""Section plans: properties, and equality with the reference loop transcribed from the spec."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framepack.packing import RELEASED_SCHEDULE, ContextSchedule, context_bound, tokens_for
from framepack.planning import (
    END,
    START,
    frame_count,
    inverted_paddings,
    parse_timeline,
    plan_sections,
    prompts_for_sections,
    real_seconds,
    section_count,
)


def reference_inverted(n: int) -> list[dict]:
    """The reference's inverted loop (spec section 2), run on labels instead of latents."""
    paddings = [3] + [2] * (n - 3) + [1, 0] if n > 4 else list(reversed(range(n)))
    history = ["zero"] * 19
    layouts = []
    for step, p in enumerate(paddings):
        sizes = [1, 9 * p, 9, 1, 2, 16]
        idx = list(range(sum(sizes)))
        cuts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        start_i, _, window, post, two, four = (idx[cuts[i] : cuts[i + 1]] for i in range(len(sizes)))
        layouts.append({
            "window": window,
            "k1": (start_i + post, ["start", history[0]]),
            "k2": (two, history[1:3]),
            "k4": (four, history[3:19]),
            "generated": [f"s{step}f{k}" for k in range(9)],
        })
        generated = layouts[-1]["generated"]
        if p == 0:
            generated = ["start"] + generated
        history = generated + history
    video = history[: 9 * n + 1]  # the finished video, front to back
    return _label_positions(layouts, video)


def reference_f1(n: int) -> list[dict]:
    history = ["zero"] * 19 + ["start"]
    layouts = []
    for step in range(n):
        idx = list(range(29))
        start_i, four, two, one, window = idx[0:1], idx[1:17], idx[17:19], idx[19:20], idx[20:29]
        layouts.append({
            "window": window,
            "k1": (start_i + one, ["start", history[-1]]),
            "k2": (two, history[-3:-1]),
            "k4": (four, history[-19:-3]),
            "generated": [f"s{step}f{k}" for k in range(9)],
        })
        history = history + layouts[-1]["generated"]
    return _label_positions(layouts, history[19:])


def _label_positions(layouts, video):
    position = {label: i for i, label in enumerate(video)}
    position["start"] = "start"
    position["zero"] = None
    for layout in layouts:
        layout["positions"] = [position[label] for label in layout.pop("generated")]
        for key in ("k1", "k2", "k4"):
            indices, labels = layout[key]
            layout[key] = (indices, [position[label] for label in labels])
    return layouts


def as_layout(plan) -> dict:
    k1, k2, k4 = plan.levels
    return {
        "window": list(plan.window_indices),
        "k1": (list(k1.indices), list(k1.sources)),
        "k2": (list(k2.indices), list(k2.sources)),
        "k4": (list(k4.indices), list(k4.sources)),
        "positions": list(plan.positions),
    }


@pytest.mark.parametrize("n", range(1, 7))
def test_inverted_layouts_equal_the_reference(n):
    ours = [as_layout(p) for p in plan_sections(n, "inverted")]
    ref = reference_inverted(n)
    for a, b in zip(ours, ref):
        # a label the reference reads as position 0 is the start latent itself
        for key in ("k1", "k2", "k4"):
            b[key] = (b[key][0], [START if s == 0 else s for s in b[key][1]])
        assert a == b


@pytest.mark.parametrize("n", range(1, 7))
def test_forward_layouts_equal_the_f1_reference(n):
    ours = [as_layout(p) for p in plan_sections(n, "forward")]
    ref = reference_f1(n)
    for a, b in zip(ours, ref):
        for key in ("k1", "k2", "k4"):
            a[key] = (a[key][0], [START if s == 0 else s for s in a[key][1]])
        assert a == b


schedules = st.lists(st.tuples(st.integers(1, 12), st.sampled_from([1, 2, 4])), min_size=1, max_size=4).map(
    lambda lv: ContextSchedule.parse("".join(f"f{f}k{r}" for f, r in sorted(lv, key=lambda x: x[1])))
)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 40), mode=st.sampled_from(["inverted", "forward", "vanilla"]), schedule=schedules,
       window=st.integers(1, 12))
def test_plan_properties(n, mode, schedule, window):
    plans = plan_sections(n, mode, schedule, window)
    made = sorted(p for plan in plans for p in plan.positions)
    # every latent after the start image is made exactly once: 9N + 1 in all
    assert made == list(range(1, n * window + 1))
    for plan in plans:
        indices = [i for level in plan.levels for i in level.indices] + list(plan.window_indices)
        assert len(indices) == len(set(indices)), "two latents share a RoPE index"
        assert [level.kernel for level in plan.levels] == list(schedule.kernels)
        # bounded context: the number of packed latents never exceeds anchor + schedule
        assert sum(len(level.indices) for level in plan.levels) == schedule.frames + (mode != "vanilla")
        # sources only ever point at latents that exist by the time the section runs
        done = {0} | {p for other in plans[: plan.step] for p in other.positions}
        for source in plan.context_sources():
            assert source in (None, START) or source in done
    if mode != "inverted":
        assert all(plan.levels[0].sources[-1] == plan.positions[0] - 1 for plan in plans)


def test_token_budget_is_the_bound():
    for plan in plan_sections(7, "inverted"):
        tokens = tokens_for(9, 68, 88, (1, 2, 2)) + sum(
            tokens_for(len(level.indices), 68, 88, level.kernel) for level in plan.levels
        )
        assert tokens == context_bound(RELEASED_SCHEDULE, 68, 88) == 17226


def test_end_image_fills_the_first_sections_post_slot():
    plans = plan_sections(3, "inverted", end_image=True)
    assert plans[0].levels[0].sources == (START, END)
    assert END not in plans[1].context_sources()
    with pytest.raises(ValueError, match="end image"):
        plan_sections(3, "forward", end_image=True)


def test_counts():
    assert section_count(5) == 4  # round(150 / 36)
    assert section_count(1) == 1 and section_count(0.1) == 1
    assert section_count(60) == 50
    assert frame_count(9 * 4 + 1) == 145
    assert inverted_paddings(6) == [3, 2, 2, 2, 1, 0]


@given(st.floats(0.05, 120), st.integers(1, 33))
def test_real_length_is_the_frames_the_plan_makes(seconds, window):
    """The length reported to the user is the decoded frame count of the planned sections: one latent
    for the start frame, ``window`` per section, 4 frames per latent after the first."""
    sections = section_count(seconds, window)
    frames = 1 + 4 * sections * window
    assert real_seconds(seconds, window) == pytest.approx(frames / 30)
    assert real_seconds(real_seconds(seconds, window), window) == pytest.approx(real_seconds(seconds, window))


def test_real_lengths_named_in_the_issue():
    assert round(real_seconds(5), 2) == 4.83
    assert round(real_seconds(2), 2) == round(real_seconds(3), 2) == 2.43


def test_timeline():
    timeline = parse_timeline("[0s-2s: a cat sits] [2s-5s: the cat jumps]")
    assert [(t.start, t.end, t.text) for t in timeline] == [(0, 2, "a cat sits"), (2, 5, "the cat jumps")]
    plans = plan_sections(section_count(5), "inverted")  # 4 sections of 1.2 s, made back to front
    prompts = prompts_for_sections(timeline, plans)
    by_time = [prompts[plans.index(p)] for p in sorted(plans, key=lambda p: p.positions[0])]
    # section midpoints: 0.6 s, 1.8 s, 3.0 s, 4.2 s
    assert by_time == ["a cat sits", "a cat sits", "the cat jumps", "the cat jumps"]
    assert prompts_for_sections(["a", "b", "c", "d"], plans) == ["d", "c", "b", "a"]  # generation order
    assert [t.text for t in parse_timeline("just a prompt")] == ["just a prompt"]


@pytest.mark.parametrize("bad", [
    "[0s-2s a cat]", "[2s-1s: backwards]", "[0s-2s: a] stray [2s-3s: b]", "[0s-3s: a] [2s-4s: overlap]",
    "[0s-2s: ]", "[0s-2s: unclosed", "   ",
])
def test_malformed_timelines(bad):
    with pytest.raises(ValueError):
        parse_timeline(bad)
