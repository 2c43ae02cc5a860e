"""The demo model says when a job leaves its world (issue 18.5): unknown words, far start images.

Both checks are driven by what the model ships (its manifest's "world" entry and its tokenizer), are
checked both ways (the world's own captions and frames pass, everything else is named), and a model
without a world description never warns.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from framepack.components import asset, resolve_model
from framepack.images import prepare_image
from framepack.settings import GenerationSettings
from framepack.train import world
from framepack.world_check import (MAX_FOREIGN_SHARE, MIN_BACKGROUND_SHARE, World, colour_shares, image_problem,
                                   model_world, unknown_words, world_notes)

FRAMEPACK = str(Path(sys.executable).with_name("framepack"))
HELD_OUT = 200  # start frames of the world's held-out splits: none may warn


@pytest.fixture(scope="module")
def tiny() -> tuple[World, Path]:
    source = resolve_model("tiny")
    found = model_world(source)
    assert found is not None, "the shipped demo model must describe its world"
    return found, Path(source.hunyuan) / "tokenizer" / "tokenizer.json"


def held_out_scenes() -> list[world.WorldParams]:
    """Both worlds' held-out scenes: the second world's validation and test splits, the first's set."""
    quarter = HELD_OUT // 4
    return world.scenes("validation", 2 * quarter) + world.scenes("test", quarter) + world.held_out(quarter)


# ---- words -------------------------------------------------------------------------------------------------------


def test_the_shipped_world_is_the_one_its_encoders_were_built_over(tiny):
    from framepack.train.package import world_description

    shipped = json.loads(asset("tiny", "framepack.json").read_text())["world"]
    assert shipped == world_description()


def test_every_caption_of_the_world_is_known_and_other_words_are_named(tiny):
    vocabulary, tokenizer = tiny[0].vocabulary, tiny[1]
    captions = [world.caption(p) for p in held_out_scenes()]
    assert unknown_words(tokenizer, vocabulary, captions) == []
    assert unknown_words(tokenizer, vocabulary, ["A RED Circle moves to the LEFT"]) == []  # the tokenizer lowercases
    # a word its tokenizer has (a common prompt word) but no caption ever used, one it cannot spell
    # (<unk>), punctuation: each named once, as written, in order
    found = unknown_words(tokenizer, vocabulary, ["a red tree moves up.", "a Zyzzyva moves up, a red tree too"])
    assert found == ["tree", ".", "Zyzzyva", ",", "too"]


def test_unknown_means_what_the_tokenizer_does(tiny):
    """The exact rule: a piece is unknown iff its id is not a caption word's id; '<unk>' is among them."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny[1]))
    unk = tokenizer.token_to_id("<unk>")
    text = "a Zyzzyva qwrtx moves left"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert ids.count(unk) == 2  # the word-level tokenizer cannot spell either
    assert unknown_words(tiny[1], tiny[0].vocabulary, [text]) == ["Zyzzyva", "qwrtx"]


# ---- start images ----------------------------------------------------------------------------------------------


def _jpeg_at(frame: np.ndarray, size: int) -> np.ndarray:
    """A world frame as a user might hand it over: scaled up and saved as a JPEG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame).resize((size, size), Image.BICUBIC).save(buffer, "JPEG", quality=75)
    return np.asarray(Image.open(buffer).convert("RGB"))


def photo_like(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Natural-image statistics: colour noise with a 1/f^2 power spectrum, at mid brightness."""
    f2 = np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[None] ** 2
    f2[0, 0] = 1.0
    channels = []
    for _ in range(3):
        x = np.real(np.fft.ifft2((rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) / np.sqrt(f2)))
        channels.append((x - x.mean()) / x.std())
    image = 128 + 50 * np.stack(channels, -1) + 40 * rng.normal(size=3)
    return np.clip(image, 0, 255).astype(np.uint8)


def drawing_on_white(size: int = 200) -> np.ndarray:
    """A user's own take on the world: a red circle, in the world's red, on a white page."""
    yy, xx = np.mgrid[:size, :size]
    image = np.full((size, size, 3), 255, np.uint8)
    image[(yy - size // 2) ** 2 + (xx - size // 2) ** 2 < (size // 6) ** 2] = world.PALETTE["red"]
    return image


def test_the_worlds_own_start_frames_never_warn(tiny):
    """False warnings on held-out start frames: 0 of 200, as rendered and after a JPEG round trip."""
    scenes = held_out_scenes()
    assert len(scenes) == HELD_OUT
    frames = [world.render(p, 1)[0] for p in scenes]
    shares = np.array([colour_shares(prepare_image(f, 128), tiny[0]) for f in frames])
    assert [i for i, f in enumerate(frames) if image_problem(prepare_image(f, 128), tiny[0])] == []
    # with a margin: the thresholds sit well beyond the worst held-out frame
    assert shares[:, 0].min() > MIN_BACKGROUND_SHARE + 0.2 and shares[:, 1].max() < MAX_FOREIGN_SHARE / 3
    assert [i for i, f in enumerate(frames[:50]) if image_problem(prepare_image(_jpeg_at(f, 512), 128), tiny[0])] == []


def test_images_from_outside_the_world_warn(tiny):
    rng = np.random.default_rng(0)
    outside = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8), drawing_on_white()]
    outside += [photo_like(rng) for _ in range(10)]
    for image in outside:
        problem = image_problem(prepare_image(image, 128), tiny[0])
        assert problem is not None and "stripes" in problem and "\n" not in problem
    # a world background with a foreign object pasted over a third of it: the foreign share says so
    scene = world.render(held_out_scenes()[0], 1)[0].copy()
    scene[:, : scene.shape[1] // 3] = photo_like(rng, 128)[:, : scene.shape[1] // 3]
    background, foreign = colour_shares(prepare_image(scene, 128), tiny[0])
    assert background >= MIN_BACKGROUND_SHARE and foreign > MAX_FOREIGN_SHARE
    assert image_problem(prepare_image(scene, 128), tiny[0]) is not None


# ---- a job, a model --------------------------------------------------------------------------------------------


def _png(path: Path, image: np.ndarray) -> str:
    from PIL import Image

    Image.fromarray(image).save(path)
    return str(path)


def test_notes_for_a_job_and_none_without_a_world(tiny, tmp_path):
    start = _png(tmp_path / "start.png", world.render(held_out_scenes()[1], 1)[0])
    noise = _png(tmp_path / "noise.png", np.random.default_rng(1).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    caption = world.caption(held_out_scenes()[1])
    assert world_notes([GenerationSettings(image=start, prompt=caption, model="tiny")]) == []
    timeline = GenerationSettings(image=start, model="tiny", prompt="[0s-1s: a red circle moves up] [1s-2s: it jumps]")
    notes = world_notes([timeline])  # the segments' words are checked, not the timeline's brackets and times
    assert len(notes) == 1 and "'it', 'jumps'" in notes[0] and "'['" not in notes[0] and "'0'" not in notes[0]
    notes = world_notes([GenerationSettings(image=noise, end_image=start, prompt="a dog sleeps", model="tiny")])
    assert len(notes) == 2 and "'dog', 'sleeps'" in notes[0] and notes[1].startswith("the start image is far")
    keyframed = GenerationSettings(image=start, prompt=caption, model="tiny", keyframes=((1.2, noise),))
    assert [n.split(":")[0] for n in world_notes([keyframed])] == ["the keyframe image is far from the model's world"]
    # a batch: each problem said once, the words of all its jobs in one line
    batch = [GenerationSettings(image=noise, prompt=p, model="tiny", seed=s) for p in ("a dog sleeps", "a cat sleeps")
             for s in (1, 2)]
    notes = world_notes(batch)
    assert len(notes) == 2 and "'dog', 'sleeps', 'cat';" in notes[0]
    # no world description, no notes: a model that never said what it knows (the 13B ones) is not judged
    bare = tmp_path / "bare"  # the demo model's own components, under a manifest without its world
    bare.mkdir()
    manifest = {k: v for k, v in json.loads(asset("tiny", "framepack.json").read_text()).items() if k != "world"}
    for part in ("transformer", "hunyuan", "vae"):
        manifest[part] = str(asset("tiny", manifest[part]))
    (bare / "framepack.json").write_text(json.dumps(manifest))
    assert model_world(resolve_model(str(bare))) is None
    assert model_world(resolve_model("framepack-i2v")) is None
    assert world_notes([GenerationSettings(image=noise, prompt="a dog sleeps", model=str(bare))]) == []


def test_a_malformed_world_entry_is_one_line(tmp_path):
    for entry in ({"vocabulary": ["a"]}, {"vocabulary": [], "backgrounds": [[1, 2, 3]], "shade_range": [1, 1],
                                          "objects": []}, {"vocabulary": ["a"], "backgrounds": [[1, 2]],
                                                           "shade_range": [1, 1], "objects": []}, "junk"):
        with pytest.raises(ValueError, match="world") as error:
            World.from_manifest(entry)
        assert "\n" not in str(error.value)


def test_generate_warns_one_line_per_problem_and_still_makes_the_video(tmp_path):
    noise = _png(tmp_path / "noise.png", np.random.default_rng(2).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    out = tmp_path / "v.mp4"
    result = subprocess.run([FRAMEPACK, "generate", "--model", "tiny", "--image", noise, "--prompt",
                             "a purple dog jumps", "--seconds", "1.2", "--steps", "1", "--out", str(out)],
                            check=False, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("framepack: warning:")]
    assert len([w for w in warnings if "never learned: 'dog', 'jumps';" in w]) == 1
    assert len([w for w in warnings if "start image is far" in w and "stripes" in w]) == 1
    assert "Traceback" not in result.stderr and out.is_file()
