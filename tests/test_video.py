"""Streaming video assembly equals the reference's whole-video-in-RAM blend; mp4 round trips."""

from __future__ import annotations

import numpy as np
import pytest

from framepack.video import Assembler, concat_segments, decode_batch, read_frames, read_metadata, to_uint8, write_segment


def reference_append(history: np.ndarray | None, current: np.ndarray, overlap: int, backwards: bool) -> np.ndarray:
    """The reference's soft append on the full pixel history (spec section 2), kept in RAM."""
    if history is None:
        return current
    first, second = (current, history) if backwards else (history, current)
    w = np.linspace(1, 0, overlap, dtype=np.float32)[:, None, None, None]
    blended = w * first[-overlap:] + (1 - w) * second[:overlap]
    return np.concatenate([first[:-overlap], blended, second[overlap:]])


@pytest.mark.parametrize("backwards", [True, False])
@pytest.mark.parametrize("sections", [1, 2, 5])
def test_streaming_assembly_equals_the_in_ram_reference(backwards, sections):
    rng = np.random.default_rng(0)
    overlap = 33
    # decoded clip lengths as the pipeline produces them (decode_span): forward 37 then 69 each;
    # inverted 33 first, 69 each, and the start latent in front of the last (73, or 37 alone)
    lengths = [33 if backwards else 37] + [69] * (sections - 1)
    if backwards:
        lengths[-1] += 4
    clips = [rng.uniform(0, 255, size=(n, 4, 6, 3)).astype(np.float32) for n in lengths]

    history = None
    for clip in clips:
        history = reference_append(history, clip, overlap, backwards)

    assembler = Assembler(backwards=backwards, overlap=overlap)
    pieces = [assembler.add(clip, last=i == len(clips) - 1) for i, clip in enumerate(clips)]
    streamed = np.concatenate(list(reversed(pieces)) if backwards else pieces)
    assert streamed.shape == history.shape
    assert np.array_equal(streamed, history)
    assert len(streamed) == 36 * sections + 1
    # memory: at most one overlap of frames is ever held back
    assert assembler.pending is None


def test_segments_concatenate_without_reencoding(tmp_path):
    rng = np.random.default_rng(1)
    parts, frames = [], []
    for i, n in enumerate([4, 36, 33]):
        clip = to_uint8(rng.uniform(0, 255, size=(n, 32, 48, 3)))
        clip[:] = clip.mean(axis=(1, 2, 3), keepdims=True).astype(np.uint8)  # flat frames: little codec error
        write_segment(tmp_path / f"s{i}.mp4", clip, crf=0)
        parts.append(tmp_path / f"s{i}.mp4")
        frames.append(clip)
    out = tmp_path / "video.mp4"
    concat_segments(parts, out, metadata={"framepack": {"seed": 7}})
    decoded = read_frames(out)
    expected = np.concatenate(frames)
    assert decoded.shape == expected.shape == (73, 32, 48, 3)
    assert np.abs(decoded.astype(int) - expected.astype(int)).max() <= 3
    assert read_metadata(out) == {"framepack": {"seed": 7}}
    assert not list(tmp_path.glob("*.tmp"))


def test_read_metadata_errors(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(ValueError, match="cannot read video"):
        read_metadata(bad)
    plain = tmp_path / "plain.mp4"
    write_segment(plain, np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="no framepack settings"):
        read_metadata(plain)


def test_concat_refuses_a_missing_or_unreadable_segment(tmp_path):
    """A segment that is not there would make a video silently short: it is named instead."""
    good = tmp_path / "good.mp4"
    write_segment(good, np.zeros((3, 16, 16, 3), np.uint8))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\0" * 100)
    out = tmp_path / "out.mp4"
    with pytest.raises(ValueError, match=r"video segment .*missing\.mp4 is missing"):
        concat_segments([good, tmp_path / "missing.mp4"], out)
    with pytest.raises(ValueError, match=r"video segment .*broken\.mp4 is unreadable"):
        concat_segments([good, broken], out)
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_a_decode_batch_gives_each_new_latent_the_one_before_it_where_the_decoder_reads_it():
    forward = list(range(9, 27))  # the window before (decoded last section) and 9 new latents
    inverted = list(range(9, 27))  # 9 new latents and the window after them (decoded)
    new_forward, new_inverted = set(range(18, 27)), set(range(9, 18))
    assert decode_batch(forward, new_forward, context=False) == [9, *range(18, 27)]
    assert decode_batch(forward, new_forward, context=True) == [9, 17, *range(18, 27)]  # 17: context only
    assert decode_batch(inverted, new_inverted, context=True) == list(range(9, 18))  # the head is the context
    assert decode_batch([0, *inverted], new_inverted, context=True) == [0, *range(9, 18)]
