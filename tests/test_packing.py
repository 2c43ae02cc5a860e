"""Context schedules: notation, token accounting, and the bounded-context property."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from framepack import ContextLevel, ContextSchedule, FramePackTransformer, context_bound, context_budget
from framepack.packing import RELEASED_SCHEDULE, kernel_for_rate, tokens_for


def test_released_schedule_notation_and_kernels():
    schedule = ContextSchedule.parse("f1k1f2k2f16k4")
    assert schedule == RELEASED_SCHEDULE
    assert schedule.kernels == ((1, 2, 2), (2, 4, 4), (4, 8, 8))
    assert [level.frames for level in schedule.levels] == [1, 2, 16]
    assert schedule.frames == 19
    assert str(schedule) == "f1k1f2k2f16k4"
    assert ContextSchedule.parse("f1k1f2k2f16k4_td") == schedule


@pytest.mark.parametrize("bad", ["", "k1f1", "f1k1 f2k2", "f0k1", "f1k0", "f2k4f1k1", "f1k1x", "banana"])
def test_malformed_notation_is_rejected(bad):
    with pytest.raises(ValueError):
        ContextSchedule.parse(bad)


# Token counts of the 640 buckets, from the specification's table (noisy 9f, 1x 2f, 2x 2f, 4x 16f).
SPEC_TABLE = {
    (544, 704): (13464, 2992, 374, 396, 17226),
    (608, 640): (13680, 3040, 380, 400, 17500),
    (512, 768): (13824, 3072, 384, 384, 17664),
    (480, 832): (14040, 3120, 390, 416, 17966),
}


@pytest.mark.parametrize("bucket", sorted(SPEC_TABLE))
def test_budget_matches_the_specification_table(bucket):
    noisy, k1_two_frames, k2, k4, total = SPEC_TABLE[bucket]
    h, w = bucket[0] // 8, bucket[1] // 8
    budget = context_budget(RELEASED_SCHEDULE, h, w, window=9, anchors=1)
    assert budget.noisy == noisy
    assert budget.anchors + budget.levels[0] == k1_two_frames  # start frame + nearest frame, both k1
    assert budget.levels[1:] == (k2, k4)
    assert budget.total == total == context_bound(RELEASED_SCHEDULE, h, w)


@settings(max_examples=40, deadline=None)
@given(
    frames=st.integers(1, 9),
    h=st.integers(2, 12).map(lambda v: 2 * v),
    w=st.integers(2, 12).map(lambda v: 2 * v),
    rate=st.sampled_from([1, 2, 4]),
)
def test_token_count_equals_what_the_embedders_produce(frames, h, w, rate):
    """tokens_for is checked against the model's real patchify convs (with replicate padding)."""
    model = _tiny()
    latents = torch.zeros(1, 16, frames, h, w)
    with torch.no_grad():
        produced = model.clean_x_embedder(latents, kernel_for_rate(rate)).shape[1]
    assert produced == tokens_for(frames, h, w, kernel_for_rate(rate))


_MODEL: list[FramePackTransformer] = []


def _tiny() -> FramePackTransformer:
    if not _MODEL:
        _MODEL.append(FramePackTransformer("tiny"))
    return _MODEL[0]


schedules = st.lists(
    st.tuples(st.integers(1, 24), st.sampled_from([1, 2, 4, 8])), min_size=1, max_size=5
).map(lambda levels: ContextSchedule(tuple(ContextLevel(f, kernel_for_rate(r)) for f, r in sorted(levels, key=lambda x: x[1]))))


@settings(max_examples=200, deadline=None)
@given(
    schedule=schedules,
    h=st.integers(1, 96),
    w=st.integers(1, 96),
    window=st.integers(1, 33),
    sections=st.integers(1, 300),
)
def test_context_never_exceeds_the_bound_as_history_grows(schedule, h, w, window, sections):
    """Grow a history section by section with tail deletion; the context stays under the bound."""
    bound = context_bound(schedule, h, w, window=window)
    history = 0
    largest = 0
    for _ in range(sections):
        kept = min(history, schedule.frames)  # tail deletion: older latents are dropped
        budget = context_budget(schedule, h, w, window=window, history_frames=kept)
        largest = max(largest, budget.total)
        assert budget.total <= bound
        history += window
    # the bound is reached once the schedule is full, so it is tight, not just an upper bound
    if history - window >= schedule.frames:
        assert largest == bound


@given(schedule=schedules)
def test_notation_round_trips(schedule):
    assert ContextSchedule.parse(str(schedule)) == schedule


def test_split_fills_nearest_levels_first():
    assert RELEASED_SCHEDULE.split(19) == [(0, 1), (1, 3), (3, 19)]
    assert RELEASED_SCHEDULE.split(2) == [(0, 1), (1, 2), (2, 2)]
    assert RELEASED_SCHEDULE.split(100) == [(0, 1), (1, 3), (3, 19)]
