"""`eligen.data.generate`: images from captions, resumable, sharded, with their record in each PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from eligen.data.generate import (
    DataGenerateConfig,
    generate_images,
    image_path,
    load_captions,
    parse_shard,
    shard_from_env,
)
from eligen.generate import read_metadata

CAPTIONS = ["a red cat", "a blue dog on a mat", "a green tree", "a yellow sun", "a white boat"]
SMALL = {"steps": 2, "height": 32, "width": 32, "max_sequence_length": 16, "progress": False}


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    from eligen.generate import load_pipeline

    return load_pipeline(str(tiny_pipeline_dir), "cpu", "float32", [], [])


@pytest.fixture
def captions_txt(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(CAPTIONS[:2]) + "\n\n  \n" + "\n".join(CAPTIONS[2:]) + "\n", encoding="utf-8")
    return path


def make_config(captions, out, model, **overrides) -> DataGenerateConfig:
    return DataGenerateConfig(captions=captions, model=str(model), out=out, **{**SMALL, **overrides})


class CountingPipe:
    """Forwards to a pipeline, counting calls; raises KeyboardInterrupt on call number ``fail_on`` (1-based)."""

    def __init__(self, pipe, fail_on: int | None = None):
        self.pipe, self.fail_on, self.calls = pipe, fail_on, 0

    def __call__(self, **kwargs):
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise KeyboardInterrupt
        return self.pipe(**kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def png_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_pipeline_dir):
    """One uninterrupted, unsharded run loaded through --model (the baseline the other runs must reproduce)."""
    root = tmp_path_factory.mktemp("reference")
    captions = root / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    out = root / "out"
    result = generate_images(make_config(captions, out, tiny_pipeline_dir, device="cpu"))
    return captions, out, result


def test_txt_run_writes_images_metadata_and_captions_index(reference_run, tiny_pipeline_dir):
    _, out, result = reference_run
    assert (result.done, result.skipped, result.out) == (5, 0, out)
    assert sorted(png_bytes(out)) == [f"{i:06d}.png" for i in range(5)]
    for index, prompt in enumerate(CAPTIONS):
        path = image_path(out, index)
        with Image.open(path) as image:
            assert image.size == (32, 32)
        meta = read_metadata(path)
        assert meta["prompt"] == prompt and meta["index"] == index and meta["seed"] == index
        assert meta["model"] == str(tiny_pipeline_dir)
        assert (meta["steps"], meta["guidance"], meta["true_cfg"]) == (2, 3.5, 1.0)
        assert (meta["width"], meta["height"], meta["max_sequence_length"]) == (32, 32, 16)
    lines = [json.loads(line) for line in (out / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert lines == [{"index": i, "image": f"images/{i:06d}.png", "prompt": p, "seed": i}
                     for i, p in enumerate(CAPTIONS)]


def test_blank_lines_are_skipped_and_seed_offsets_apply(captions_txt, tmp_path, tiny_pipeline_dir, pipe):
    items = load_captions(captions_txt)
    assert [(i["index"], i["prompt"], i["seed"]) for i in items] == [(i, p, None) for i, p in enumerate(CAPTIONS)]
    out = tmp_path / "out"
    generate_images(make_config(captions_txt, out, tiny_pipeline_dir, seed=100), pipe)
    assert [read_metadata(image_path(out, i))["seed"] for i in range(5)] == [100, 101, 102, 103, 104]


def test_jsonl_explicit_seed_matches_a_standalone_call(tmp_path, tiny_pipeline_dir, pipe):
    captions = tmp_path / "captions.jsonl"
    records = [{"prompt": "a red cat", "seed": 5}, {"prompt": "a blue dog"}, {"prompt": "a boat", "seed": 5}]
    captions.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    assert [i["seed"] for i in load_captions(captions)] == [5, None, 5]
    out = tmp_path / "out"
    generate_images(make_config(captions, out, tiny_pipeline_dir, seed=40), pipe)
    assert [read_metadata(image_path(out, i))["seed"] for i in range(3)] == [5, 41, 5]
    pipe.set_progress_bar_config(disable=True)
    standalone = pipe(prompt="a red cat", height=32, width=32, num_inference_steps=2, guidance_scale=3.5,
                      generator=torch.Generator("cpu").manual_seed(5), max_sequence_length=16).images[0]
    assert np.array_equal(pixels(image_path(out, 0)), np.asarray(standalone.convert("RGB")).astype(np.int16))
    lines = (out / "captions.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["seed"] for line in lines] == [5, 41, 5]


def test_shards_together_equal_one_unsharded_run(reference_run, tmp_path, tiny_pipeline_dir, pipe):
    captions, reference_out, _ = reference_run
    out = tmp_path / "out"
    first = generate_images(make_config(captions, out, tiny_pipeline_dir, shard="0/2"), pipe)
    assert (first.done, first.skipped) == (3, 0)
    assert sorted(png_bytes(out)) == ["000000.png", "000002.png", "000004.png"]
    second = generate_images(make_config(captions, out, tiny_pipeline_dir, shard="1/2"), pipe)
    assert (second.done, second.skipped) == (2, 0)
    assert png_bytes(out) == png_bytes(reference_out)
    assert (out / "captions.jsonl").read_bytes() == (reference_out / "captions.jsonl").read_bytes()


def test_shard_from_world_size_and_rank(monkeypatch, reference_run, tmp_path, tiny_pipeline_dir, pipe):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    assert shard_from_env() == (1, 3)
    captions, _, _ = reference_run
    out = tmp_path / "out"
    config = make_config(captions, out, tiny_pipeline_dir)
    assert config.shard_spec() == (1, 3)
    assert generate_images(config, pipe).done == 2
    assert sorted(png_bytes(out)) == ["000001.png", "000004.png"]
    assert make_config(captions, out, tiny_pipeline_dir, shard="0/1").shard_spec() == (0, 1)  # the flag wins
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert shard_from_env() == (0, 1)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    assert shard_from_env() == (0, 1)


def test_killed_run_resumes_without_regenerating(reference_run, tmp_path, tiny_pipeline_dir, pipe):
    captions, reference_out, _ = reference_run
    out = tmp_path / "out"
    killed = CountingPipe(pipe, fail_on=3)
    with pytest.raises(KeyboardInterrupt):
        generate_images(make_config(captions, out, tiny_pipeline_dir), killed)
    assert sorted(png_bytes(out)) == ["000000.png", "000001.png"]
    finished = png_bytes(out)
    # a write killed midway leaves save_png's temp file, which is not a finished item
    (out / "images" / ".000002.png.x1y2z3.tmp").write_bytes(b"\x89PNG truncated")
    rerun = CountingPipe(pipe)
    result = generate_images(make_config(captions, out, tiny_pipeline_dir), rerun)
    assert (result.done, result.skipped, rerun.calls) == (3, 2, 3)
    final = png_bytes(out)
    assert {name: final[name] for name in finished} == finished
    assert final == png_bytes(reference_out)
    assert (out / "captions.jsonl").read_bytes() == (reference_out / "captions.jsonl").read_bytes()
    again = CountingPipe(pipe)
    assert generate_images(make_config(captions, out, tiny_pipeline_dir), again).done == 0
    assert again.calls == 0


def test_a_finished_image_is_kept_while_its_caption_and_seed_match(reference_run, tmp_path, tiny_pipeline_dir, pipe):
    captions, _, _ = reference_run
    out = tmp_path / "out"
    generate_images(make_config(captions, out, tiny_pipeline_dir, shard="0/5"), pipe)
    before = image_path(out, 0).stat().st_mtime_ns, image_path(out, 0).read_bytes()
    generate_images(make_config(captions, out, tiny_pipeline_dir), pipe)
    assert (image_path(out, 0).stat().st_mtime_ns, image_path(out, 0).read_bytes()) == before
    generate_images(make_config(captions, out, tiny_pipeline_dir, seed=7), pipe)  # another seed: another image
    assert read_metadata(image_path(out, 0))["seed"] == 7 and read_metadata(image_path(out, 1))["seed"] == 8


def test_batch_size_two_gives_the_same_images(reference_run, tmp_path, tiny_pipeline_dir, pipe):
    captions, reference_out, _ = reference_run
    out = tmp_path / "out"
    counting = CountingPipe(pipe)
    generate_images(make_config(captions, out, tiny_pipeline_dir, batch_size=2), counting)
    assert counting.calls == 3
    for index in range(len(CAPTIONS)):
        # Bit-identical on the machines tried; one uint8 level of slack for batched-matmul rounding elsewhere.
        diff = np.abs(pixels(image_path(out, index)) - pixels(image_path(reference_out, index)))
        assert diff.max() <= 1
        assert read_metadata(image_path(out, index)) == read_metadata(image_path(reference_out, index))


def test_true_cfg_records_the_negative_prompt(tmp_path, captions_txt, tiny_pipeline_dir, pipe):
    out = tmp_path / "out"
    config = make_config(captions_txt, out, tiny_pipeline_dir, true_cfg=2.0, negative_prompt="blurry", batch_size=2,
                         shard="0/4")
    assert generate_images(config, pipe).done == 2
    meta = read_metadata(image_path(out, 4))
    assert (meta["true_cfg"], meta["negative_prompt"]) == (2.0, "blurry")


@pytest.mark.parametrize(("text", "match"), [
    ('{"prompt": "a cat"}\n{"prompt": "  "}\n', "line 2"),
    ('{"prompt": "a cat"}\n\n{"prompt": "a dog"\n', "line 3"),
    ('{"prompt": "a cat", "seed": "x"}\n', "line 1"),
    ('["a cat"]\n', "line 1"),
    ('{"seed": 3}\n', "line 1"),
])
def test_bad_jsonl_names_the_line(tmp_path, text, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_captions(path)


@pytest.mark.parametrize("shard", ["1", "a/b", "2/2", "3/2", "0/0", "-1/2", "1/2/3"])
def test_bad_shard_strings_raise(tmp_path, shard):
    with pytest.raises(ValueError, match="shard"):
        parse_shard(shard)
    with pytest.raises(ValueError, match="shard"):
        DataGenerateConfig(captions=tmp_path / "c.txt", shard=shard)


def test_bad_environment_shard_raises(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="shard"):
        shard_from_env()


@pytest.mark.parametrize("field", ["steps", "height", "width", "batch_size"])
def test_non_positive_sizes_raise(tmp_path, field):
    with pytest.raises(ValueError, match=field.replace("_", "-")):
        DataGenerateConfig(captions=tmp_path / "c.txt", **{field: 0})


def test_missing_captions_out_or_model_raise(tmp_path, captions_txt):
    with pytest.raises(ValueError, match="captions"):
        DataGenerateConfig()
    with pytest.raises(ValueError, match="--out"):
        generate_images(DataGenerateConfig(captions=captions_txt))
    with pytest.raises(ValueError, match="--model"):
        generate_images(DataGenerateConfig(captions=captions_txt, out=tmp_path / "out", model="", **SMALL))
    assert DataGenerateConfig(captions=captions_txt).model == "eligen-tiny"  # every --model defaults to it


def test_editing_the_captions_rerenders_only_the_changed_lines(tmp_path, tiny_pipeline_dir, pipe):
    captions = tmp_path / "captions.txt"
    captions.write_text("a red cat\na blue dog\na green tree\n", encoding="utf-8")
    out = tmp_path / "out"
    generate_images(make_config(captions, out, tiny_pipeline_dir), pipe=pipe)
    before = png_bytes(out)
    captions.write_text("a red cat\na white boat\na green tree\n", encoding="utf-8")  # line 2 edited
    counting = CountingPipe(pipe)
    result = generate_images(make_config(captions, out, tiny_pipeline_dir), pipe=counting)
    assert (result.done, result.skipped) == (1, 2) and counting.calls == 1
    after = png_bytes(out)
    assert after["000000.png"] == before["000000.png"] and after["000002.png"] == before["000002.png"]
    assert read_metadata(out / "images" / "000001.png")["prompt"] == "a white boat"


def test_the_size_defaults_to_the_models_native_size(tmp_path, pipe):
    captions = tmp_path / "captions.txt"
    captions.write_text("a red cat\n", encoding="utf-8")
    config = DataGenerateConfig(captions=captions, model="unused", out=tmp_path / "out", steps=1,
                                max_sequence_length=16, progress=False)
    generate_images(config, pipe=pipe)
    meta = read_metadata(tmp_path / "out" / "images" / "000000.png")
    assert (meta["width"], meta["height"]) == (256, 256) == pipe.native_size()[::-1]


def _stray_png(out, name: str, record) -> None:
    from eligen.generate import save_png

    save_png(Image.new("RGB", (8, 8)), out / "images" / name, record)


def _plain_png(out, name: str) -> None:
    Image.new("RGB", (8, 8)).save(out / "images" / name)


@pytest.mark.parametrize("damage", [
    pytest.param(lambda out: _plain_png(out, "000007.png"), id="a PNG without a record under a later number"),
    pytest.param(lambda out: _stray_png(out, "000008.png", {"command": "generate", "layout": {}}),
                 id="another command's PNG"),
    pytest.param(lambda out: _stray_png(out, "000009.png", {"command": "data-generate", "prompt": "x", "seed": 9}),
                 id="a record without its index"),
    pytest.param(lambda out: _plain_png(out, "holiday.png"), id="a PNG of another name"),
])
def test_a_stray_png_in_the_images_folder_is_left_out_of_the_index(tmp_path, tiny_pipeline_dir, pipe, capsys,
                                                                     damage):
    captions = tmp_path / "captions.txt"
    captions.write_text("a red cat\na blue dog\n", encoding="utf-8")
    out = tmp_path / "out"
    generate_images(make_config(captions, out, tiny_pipeline_dir), pipe=pipe)
    damage(out)
    result = generate_images(make_config(captions, out, tiny_pipeline_dir), pipe=CountingPipe(pipe, fail_on=1))
    assert (result.done, result.skipped) == (0, 2)
    lines = [json.loads(line) for line in (out / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [line["index"] for line in lines] == [0, 1]
    assert "1 image(s) in" in capsys.readouterr().err


def test_a_shortened_captions_file_leaves_no_stale_lines_in_the_index(tmp_path, tiny_pipeline_dir, pipe):
    captions = tmp_path / "captions.txt"
    captions.write_text("a red cat\na blue dog\na green tree\n", encoding="utf-8")
    out = tmp_path / "out"
    generate_images(make_config(captions, out, tiny_pipeline_dir), pipe=pipe)
    captions.write_text("a red cat\n", encoding="utf-8")
    result = generate_images(make_config(captions, out, tiny_pipeline_dir), pipe=CountingPipe(pipe, fail_on=1))
    assert (result.done, result.skipped) == (0, 1)
    lines = [json.loads(line) for line in (out / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert lines == [{"index": 0, "image": "images/000000.png", "prompt": "a red cat", "seed": 0}]
