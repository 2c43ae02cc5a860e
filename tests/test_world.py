"""The synthetic training world: determinism, captions, ground truth vs rendered pixels, splits."""

from __future__ import annotations

import itertools
import logging
import time

import numpy as np
import pytest

from framepack.train import world
from framepack.train.world import WorldParams

LOG = logging.getLogger(__name__)


def _params(motion: str, shape: str = "circle", **kwargs) -> WorldParams:
    defaults = {"color": "yellow", "background": "plain", "background_color": "blue"}
    return WorldParams(shape=shape, motion=motion, **{**defaults, **kwargs})


def test_constants():
    assert world.FPS == 30 and world.SIZE == 128
    assert set(world.SHAPES) == {"circle", "square", "triangle"}
    assert set(world.BACKGROUNDS) == {"plain", "gradient", "stripes"}
    assert len(world.MOTIONS) == 11 and "pan left" in world.MOTIONS
    assert {"red", "green", "blue", "yellow", "white", "purple", "orange", "cyan"} <= set(world.PALETTE)


def test_render_shape_dtype_and_determinism():
    p = world.sample_params(np.random.default_rng(3))
    frames = world.render(p, 12, size=64)
    assert frames.shape == (12, 64, 64, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames, world.render(p, 12, size=64))
    # frame k of a clip starting at `start` is frame start + k of the clip from 0
    assert np.array_equal(world.render(p, 4, size=64, start=8), frames[8:])
    assert world.render(p, 0).shape == (0, 128, 128, 3)


def test_stream_is_deterministic():
    first = list(itertools.islice(world.stream(5), 50))
    assert first == list(itertools.islice(world.stream(5), 50))
    assert first != list(itertools.islice(world.stream(6), 50))
    assert len(set(first)) == 50


def test_sampled_params_respect_constraints():
    params = list(itertools.islice(world.stream(1), 3000))
    assert {p.motion for p in params} == set(world.MOTIONS)
    assert {p.shape for p in params} == set(world.SHAPES)
    for p in params:
        assert not (p.shape == "circle" and p.motion == "rotate")
        assert p.motion not in world.PANS or p.background == "stripes"
        assert world.HUE[p.color] != world.HUE[p.background_color]
        assert world.contrast(p.color, p.background_color) >= world.MIN_CONTRAST
        if p.motion != "stay":
            assert world.SPEED_RANGE[0] <= p.speed <= world.SPEED_RANGE[1]


def test_invalid_params_raise():
    with pytest.raises(ValueError, match="rotate"):
        _params("rotate")
    with pytest.raises(ValueError, match="contrast"):
        _params("stay", color="blue", background_color="blue")
    with pytest.raises(ValueError, match="striped"):
        _params("pan left")
    with pytest.raises(ValueError, match="motion"):
        _params("jump")


@pytest.mark.parametrize(
    ("params", "text"),
    [
        (
            WorldParams("circle", "red", "plain", "blue", "right"),
            "a red circle moves to the right on a plain blue background",
        ),
        (
            WorldParams("square", "green", "stripes", "purple", "bounce"),
            "a green square bounces on a striped purple background",
        ),
        (
            WorldParams("triangle", "white", "gradient", "orange", "grow"),
            "a white triangle grows on a gradient orange background",
        ),
        (
            WorldParams("circle", "yellow", "plain", "teal", "stay"),
            "a yellow circle stays still on a plain teal background",
        ),
        (
            WorldParams("circle", "red", "stripes", "gray", "pan left"),
            "the camera pans left over a red circle on a striped gray background",
        ),
        (
            WorldParams("square", "orange", "plain", "blue", "up"),
            "an orange square moves up on a plain blue background",
        ),
        (
            WorldParams("triangle", "cyan", "gradient", "red", "rotate"),
            "a cyan triangle rotates on a gradient red background",
        ),
    ],
)
def test_caption(params, text):
    assert world.caption(params) == text


@pytest.mark.parametrize("motion", ["left", "right", "up", "down", "bounce", "stay"])
@pytest.mark.parametrize("shape", ["circle", "triangle"])
def test_ground_truth_matches_rendered_centroid(motion, shape):
    p = _params(motion, shape, speed=12.0, x=0.5, y=0.5, size=0.1, heading=35.0, color="white")
    frames = world.render(p, 150)[::15]  # 0 .. 4.5 s; left/right/up/down reach the border and stop
    track = world.track_colour(frames, world.PALETTE[p.color])
    truth = np.array([world.object_centre(p, k / world.FPS) for k in range(0, 150, 15)])
    assert not np.isnan(track).any()
    assert np.abs(track - truth).max() < 1.5


def test_trajectory_matches_object_centre():
    p = _params("bounce", speed=11.0, heading=60.0)
    traj = world.trajectory(p, 40, size=96, start=7)
    assert traj.shape == (40, 2)
    assert np.allclose(traj[5], world.object_centre(p, 12 / world.FPS, size=96))


def test_motion_direction_on_held_out_clips():
    """Every held-out clip with a single direction (not bounce) is recovered from 1 s of frames."""
    checked = 0
    for p in world.held_out():
        expected = world.expected_direction(p)
        if expected is None:
            continue
        frames = world.render(p, 2, start=0)[:1]
        frames = np.concatenate([frames, world.render(p, 1, start=world.FPS)])  # t = 0 s and 1 s
        track = world.track_colour(frames, world.PALETTE[p.color])
        assert world.motion_direction(track) == expected, (world.caption(p), p, track)
        checked += 1
    assert checked >= 40


def test_motion_direction_rules():
    assert world.motion_direction(np.array([[10.0, 10.0], [10.5, 11.0]])) == "still"
    assert world.motion_direction(np.array([[10.0, 10.0], [np.nan, np.nan], [4.0, 11.0]])) == "left"
    assert world.motion_direction(np.array([[10.0, 10.0], [12.0, 20.0]])) == "down"
    assert world.motion_direction(np.full((3, 2), np.nan)) == "still"


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_grow_and_shrink_change_area(shape):
    for motion, sign in (("grow", 1), ("shrink", -1)):
        p = _params(motion, shape, speed=9.0, size=0.12, color="green", background="gradient")
        frames = world.render(p, 1, start=0)
        frames = np.concatenate([frames] + [world.render(p, 1, start=s) for s in (30, 60, 150)])
        area = world.colour_mask(frames, world.PALETTE[p.color]).sum(axis=(1, 2))
        assert np.all(np.sign(np.diff(area)) == sign), (motion, area)
        radii = [world.object_radius(p, s / world.FPS) for s in (0, 150)]
        assert radii[1] / radii[0] > 1.5 if sign > 0 else radii[1] / radii[0] < 0.7


def test_rotate_changes_pixels_not_centre():
    p = _params("rotate", "square", speed=10.0)
    frames = np.concatenate([world.render(p, 1, start=s) for s in (0, 15)])
    assert np.abs(frames[0].astype(int) - frames[1]).max() > 100
    track = world.track_colour(frames, world.PALETTE[p.color])
    assert np.abs(track[1] - track[0]).max() < 0.5


def test_pan_moves_background_and_object_together():
    p = WorldParams("square", "orange", "stripes", "blue", "pan left", speed=10.0, x=0.3)
    shift = 10  # px in 1 s
    a, b = world.render(p, 1, start=0)[0], world.render(p, 1, start=world.FPS)[0]
    # background rows away from the object scroll right by exactly `shift` pixels
    assert np.abs(a[:10, : -shift].astype(int) - b[:10, shift:]).max() <= 1
    track = world.track_colour(np.stack([a, b]), world.PALETTE[p.color])
    assert track[1, 0] - track[0, 0] == pytest.approx(shift, abs=0.5)


def test_bounce_stays_inside_the_frame():
    for shape, heading in (("circle", 25.0), ("square", 110.0), ("triangle", 290.0)):
        p = _params("bounce", shape, speed=12.0, size=0.16, heading=heading, x=0.4, y=0.6)
        centres = world.trajectory(p, 30 * world.FPS)
        extent = {"circle": 1.0, "square": 0.9 * np.sqrt(2), "triangle": 1.3}[shape] * 0.16 * 128
        assert centres.min() >= extent - 1e-6 and centres.max() <= 128 - extent + 1e-6
        # x and y each reach both walls within 30 s
        assert np.ptp(centres[:, 0]) > 128 - 2 * extent - 2 and np.ptp(centres[:, 1]) > 128 - 2 * extent - 2
        frames = world.render(p, 60, start=60)[::4]  # around a wall or two
        mask = world.colour_mask(frames, world.PALETTE[p.color])
        border = mask[:, 0].any() or mask[:, -1].any() or mask[:, :, 0].any() or mask[:, :, -1].any()
        assert not border


def test_held_out_is_fixed_and_disjoint_from_training_streams():
    evaluation = world.held_out()
    assert len(evaluation) == 64 and len(set(evaluation)) == 64
    assert evaluation == world.held_out()
    assert all(world.is_held_out(p) for p in evaluation)
    held = set(evaluation)
    for seed in range(10):
        assert held.isdisjoint(itertools.islice(world.stream(seed), 10_000))


def test_background_always_contrasts():
    """Every background pixel of every valid colour pair stays > tol from the object colour."""
    for color, background_color in {(c[1], c[3]) for c in world.combinations()}:
        p = WorldParams("circle", color, "stripes", background_color, "stay", size=0.05, x=0.0, y=0.0)
        frame = world.render(p, 1, size=32)
        far = np.ones((32, 32), dtype=bool)
        far[:6, :6] = False  # the object sits in the corner
        assert not world.colour_mask(frame, world.PALETTE[color])[0][far].any()


def test_render_speed_sanity():
    p = WorldParams("triangle", "yellow", "stripes", "purple", "pan right", x=0.7)
    begin = time.perf_counter()
    frames = world.render(p, 150)
    LOG.info("render 150 frames at 128 px: %.3f s", time.perf_counter() - begin)
    assert frames.shape == (150, 128, 128, 3)


_MIRRORED_DIRECTION = {"left": "right", "right": "left"}


def test_mirror_is_the_left_right_reflection():
    """A scene's mirror renders as its frames flipped left to right (the analytic reflection; stripes
    excepted, whose phase the world fixes), moves the other way across and the same way up and down,
    and mirrored twice is the scene itself; rotations, which only turn clockwise, have none."""
    scenes = list(itertools.islice(world.stream(3), 200))
    checked = set()
    for p in scenes:
        m = world.mirror(p)
        if p.motion == "rotate":
            assert m is None
            continue
        assert world.mirror(m) == p
        track, mirrored = world.trajectory(p, 31), world.trajectory(m, 31)
        np.testing.assert_allclose(mirrored[:, 0], world.SIZE - track[:, 0], atol=1e-6)
        np.testing.assert_allclose(mirrored[:, 1], track[:, 1], atol=1e-9)
        expected = world.expected_direction(p)
        assert world.expected_direction(m) == _MIRRORED_DIRECTION.get(expected, expected)
        if p.background != "stripes":
            flipped = world.render(p, 5, start=20)[:, :, ::-1].astype(int)
            assert np.abs(flipped - world.render(m, 5, start=20)).max() <= 1, world.caption(p)
            checked.add(p.motion)
    assert {"left", "right", "up", "down", "bounce", "grow", "shrink", "stay"} <= checked
    assert world.caption(world.mirror(_params("left"))) == world.caption(_params("right"))
