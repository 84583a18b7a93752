"""Entities, mask binarisation, layout files and their validation errors."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from eligen.entities import (
    DATA_URI_PREFIX,
    Entity,
    Layout,
    LayoutError,
    binarize_mask,
    layout_from_dict,
    layout_to_dict,
    load_layout,
    mask_to_png_data_uri,
    save_layout,
)
from families import oracles

SETTINGS = settings(max_examples=80, deadline=None)

# Hand-picked RGB pixels around the reference threshold: on iff mean(v * 2 / 255 - 1) > 0, i.e. sum(v) > 382.5.
RGB_PIXELS = [
    ((255, 0, 0), False),
    ((255, 255, 0), True),
    ((128, 128, 128), True),
    ((127, 127, 127), False),
    ((128, 127, 128), True),  # sum 383
    ((127, 128, 127), False),  # sum 382
    ((0, 0, 0), False),
    ((255, 255, 255), True),
]
RGB_ARRAY = np.array([[p for p, _ in RGB_PIXELS[:4]], [p for p, _ in RGB_PIXELS[4:]]], dtype=np.uint8)  # (2, 4, 3)
RGB_EXPECTED = np.array([[on for _, on in RGB_PIXELS[:4]], [on for _, on in RGB_PIXELS[4:]]])


def reference_rgb_rule(array: np.ndarray) -> np.ndarray:
    """The reference rule for 8-bit colour: mean over channels of (v * 2 / 255 - 1) > 0, in float64."""
    return (array.astype(np.float64) * 2.0 / 255.0 - 1.0).mean(axis=2) > 0


def assert_layout_error(exc: LayoutError, entity: int | None, field: str) -> None:
    assert isinstance(exc, ValueError)
    assert exc.entity == entity
    assert exc.field == field
    message = str(exc)
    if entity is None:
        assert message.startswith(f"field '{field}': "), message
        assert "entity" not in message.split(":")[0]
    else:
        assert message.startswith(f"entity {entity}, field '{field}': "), message
    assert len(message.split(": ", 1)[1]) > 5, "the error explains nothing"


def test_reference_rgb_rule_sanity():
    # The hand-written expectations agree with the float reference rule (guards the table above).
    assert np.array_equal(reference_rgb_rule(RGB_ARRAY), RGB_EXPECTED)


# ----------------------------------------------------------------------------------------------------------
# binarize_mask: PIL images
# ----------------------------------------------------------------------------------------------------------


def test_binarize_pil_mode_1():
    array = np.array([[True, False, True], [False, False, True]])
    image = Image.fromarray(array)
    assert image.mode == "1"
    out = binarize_mask(image)
    assert out.dtype == bool
    assert np.array_equal(out, array)


def test_binarize_pil_mode_L():
    image = Image.fromarray(np.array([[0, 127, 128, 255], [1, 200, 50, 129]], dtype=np.uint8))
    assert image.mode == "L"
    assert np.array_equal(binarize_mask(image), [[False, False, True, True], [False, True, False, True]])


def test_binarize_pil_mode_LA_alpha_varies_alpha_decides():
    lum = np.array([[255, 255, 0, 0]], dtype=np.uint8)
    alpha = np.array([[0, 255, 0, 200]], dtype=np.uint8)
    image = Image.fromarray(np.stack([lum, alpha], axis=-1))
    assert image.mode == "LA"
    assert np.array_equal(binarize_mask(image), [[False, True, False, True]])


@pytest.mark.parametrize("alpha_value", [0, 255])
def test_binarize_pil_mode_LA_constant_alpha_colour_decides(alpha_value):
    lum = np.array([[255, 127, 0, 128]], dtype=np.uint8)
    image = Image.fromarray(np.stack([lum, np.full_like(lum, alpha_value)], axis=-1))
    assert image.mode == "LA"
    assert np.array_equal(binarize_mask(image), [[True, False, False, True]])


def test_binarize_pil_mode_RGB():
    image = Image.fromarray(RGB_ARRAY)
    assert image.mode == "RGB"
    assert np.array_equal(binarize_mask(image), RGB_EXPECTED)


def test_binarize_pil_mode_RGBA_alpha_varies_alpha_decides():
    colour = np.full((2, 4, 3), 255, dtype=np.uint8)  # white everywhere: the colour would say "all on"
    alpha = np.array([[0, 255, 127, 128], [255, 0, 0, 255]], dtype=np.uint8)
    image = Image.fromarray(np.concatenate([colour, alpha[..., None]], axis=-1))
    assert image.mode == "RGBA"
    assert np.array_equal(binarize_mask(image), alpha >= 128)


@pytest.mark.parametrize("alpha_value", [0, 128, 255])
def test_binarize_pil_mode_RGBA_constant_alpha_colour_decides(alpha_value):
    alpha = np.full((2, 4, 1), alpha_value, dtype=np.uint8)
    image = Image.fromarray(np.concatenate([RGB_ARRAY, alpha], axis=-1))
    assert image.mode == "RGBA"
    assert np.array_equal(binarize_mask(image), RGB_EXPECTED)


def _palette_image(indices: list[int], colours: list[tuple[int, int, int]]) -> Image.Image:
    image = Image.new("P", (len(indices), 1))
    palette = [v for colour in colours for v in colour]
    image.putpalette(palette + [0] * (768 - len(palette)))
    image.putdata(indices)
    return image


def test_binarize_pil_mode_P_uses_palette_colours():
    # Indices 0..3 are black, white, red, yellow: the colours (not the indices) decide.
    image = _palette_image([0, 1, 2, 3, 1, 0], [(0, 0, 0), (255, 255, 255), (255, 0, 0), (255, 255, 0)])
    assert image.mode == "P"
    assert np.array_equal(binarize_mask(image), [[False, True, False, True, True, False]])


def test_binarize_pil_mode_P_with_transparency_png(tmp_path):
    # Index 0 is white but fully transparent, index 1 black and opaque: the varying alpha decides.
    image = _palette_image([0, 1, 1, 0], [(255, 255, 255), (0, 0, 0)])
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)
    with Image.open(path) as reread:
        assert reread.mode == "P"
        assert "transparency" in reread.info
        out = binarize_mask(reread)
    assert np.array_equal(out, [[False, True, True, False]])


def test_binarize_pil_16_bit_png(tmp_path):
    values = np.array([[0, 32767, 32768, 65535], [65535, 1000, 40000, 0]], dtype=np.uint16)
    path = tmp_path / "mask16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as image:
        assert image.mode == "I;16"
        out = binarize_mask(image)
    assert np.array_equal(out, values >= 32768)
    assert np.array_equal(binarize_mask(path), values >= 32768)


# ----------------------------------------------------------------------------------------------------------
# binarize_mask: numpy arrays
# ----------------------------------------------------------------------------------------------------------


def test_binarize_numpy_bool():
    array = np.array([[True, False], [False, True]])
    assert np.array_equal(binarize_mask(array), array)


def test_binarize_numpy_uint8():
    array = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    assert np.array_equal(binarize_mask(array), [[False, False, True, True]])


def test_binarize_numpy_uint8_zero_one_is_binary():
    # Documented single-channel behaviour (entities._binarize_integer): a mask holding only 0 and 1 is binary.
    # It departs from the reference's >= 128 rule, which would read such a mask as empty.
    array = np.array([[0, 1, 1, 0]], dtype=np.uint8)
    assert np.array_equal(binarize_mask(array), [[False, True, True, False]])


def test_binarize_numpy_uint16():
    array = np.array([[0, 32767, 32768, 65535]], dtype=np.uint16)
    assert np.array_equal(binarize_mask(array), [[False, False, True, True]])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_binarize_numpy_float(dtype):
    above_half = np.nextafter(dtype(0.5), dtype(1.0))
    array = np.array([[0.0, 0.5, above_half, 1.0], [0.25, 0.75, 0.4999, 0.5]], dtype=dtype)
    assert np.array_equal(binarize_mask(array), [[False, False, True, True], [False, True, False, False]])


def test_binarize_numpy_rgb_uint8_reference_rule():
    assert np.array_equal(binarize_mask(RGB_ARRAY), RGB_EXPECTED)


def test_binarize_numpy_rgba_uint8():
    alpha = np.array([[0, 255, 0, 255], [255, 255, 0, 0]], dtype=np.uint8)
    varying = np.concatenate([RGB_ARRAY, alpha[..., None]], axis=-1)
    assert np.array_equal(binarize_mask(varying), alpha >= 128)
    constant = np.concatenate([RGB_ARRAY, np.full((2, 4, 1), 255, dtype=np.uint8)], axis=-1)
    assert np.array_equal(binarize_mask(constant), RGB_EXPECTED)


rgb_arrays = hnp.arrays(
    np.uint8,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12).map(lambda s: (*s, 3)),
    elements=st.one_of(st.integers(0, 255), st.sampled_from([126, 127, 128, 129])),
)


@SETTINGS
@given(rgb_arrays, st.integers(0, 2**31 - 1))
def test_binarize_random_rgb_matches_float_reference(array, seed):
    # One bright value somewhere keeps this property off the documented "0/1 label map" case.
    rng = np.random.default_rng(seed)
    array = array.copy()
    array[rng.integers(array.shape[0]), rng.integers(array.shape[1]), rng.integers(3)] = 255
    out = binarize_mask(array)
    assert out.shape == array.shape[:2]
    assert np.array_equal(out, reference_rgb_rule(array))
    assert np.array_equal(binarize_mask(Image.fromarray(array)), reference_rgb_rule(array))


DARK_RGB = np.array([[[1, 1, 1], [0, 0, 0], [1, 0, 1]]], dtype=np.uint8)  # a 0/1 label map saved as RGB


def test_binarize_zero_one_colour_array_is_binary():
    # Documented: integer masks holding only 0 and 1 are binary label maps, for colour as for one channel
    # (the reference's 8-bit rule would read them as empty). A pixel is on when its channel mean is > 1/2.
    assert np.array_equal(binarize_mask(DARK_RGB), [[True, False, True]])


def test_binarize_zero_one_rgb_png_is_binary(tmp_path):
    path = tmp_path / "dark.png"
    Image.fromarray(DARK_RGB).save(path)
    assert np.array_equal(binarize_mask(path), [[True, False, True]])


@SETTINGS
@given(hnp.arrays(np.bool_, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40)))
def test_png_data_uri_round_trip(mask):
    uri = mask_to_png_data_uri(mask)
    assert uri.startswith(DATA_URI_PREFIX)
    out = binarize_mask(uri)
    assert out.shape == mask.shape
    assert np.array_equal(out, mask)


# ----------------------------------------------------------------------------------------------------------
# binarize_mask: torch tensors, paths and data URIs
# ----------------------------------------------------------------------------------------------------------

PATTERN = np.array([[True, False, True, True], [False, False, True, False]])


@pytest.mark.parametrize("make", [
    pytest.param(lambda: torch.from_numpy(PATTERN.astype(np.float32)), id="HW-float"),
    pytest.param(lambda: torch.from_numpy(PATTERN), id="HW-bool"),
    pytest.param(lambda: torch.from_numpy(PATTERN.astype(np.uint8) * 255)[None], id="1HW-uint8"),
    pytest.param(lambda: torch.from_numpy(PATTERN.astype(np.float32))[None, None], id="11HW-float"),
    pytest.param(lambda: torch.from_numpy(PATTERN.astype(np.float32)).to(torch.bfloat16), id="HW-bfloat16"),
    pytest.param(lambda: torch.from_numpy(PATTERN.astype(np.float32)).half()[None, None], id="11HW-float16"),
])
def test_binarize_torch_tensors(make):
    assert np.array_equal(binarize_mask(make()), PATTERN)


def test_binarize_torch_3HW_uses_rgb_rule():
    tensor = torch.from_numpy(RGB_ARRAY).permute(2, 0, 1).contiguous()
    assert tuple(tensor.shape) == (3, 2, 4)
    assert np.array_equal(binarize_mask(tensor), RGB_EXPECTED)
    assert np.array_equal(binarize_mask(tensor[None]), RGB_EXPECTED)


def test_binarize_torch_bfloat16_threshold():
    tensor = torch.tensor([[0.0, 0.5, 0.50390625, 1.0]], dtype=torch.bfloat16)  # all exactly representable
    assert np.array_equal(binarize_mask(tensor), [[False, False, True, True]])


def _write_png(path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def test_binarize_png_path_and_data_uri(tmp_path):
    array = np.array([[0, 255, 130, 10], [255, 0, 127, 128]], dtype=np.uint8)
    path = tmp_path / "mask.png"
    _write_png(path, array)
    expected = array >= 128
    assert np.array_equal(binarize_mask(path), expected)
    assert np.array_equal(binarize_mask(str(path)), expected)
    uri = DATA_URI_PREFIX + base64.b64encode(path.read_bytes()).decode("ascii")
    assert np.array_equal(binarize_mask(uri), expected)


# ----------------------------------------------------------------------------------------------------------
# binarize_mask: rejections
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    pytest.param(np.array([[0.0, 1.1]]), id="float-above-1"),
    pytest.param(np.array([[-0.1, 0.5]]), id="float-below-0"),
    pytest.param(np.array([[0.0, np.nan]]), id="float-nan"),
    pytest.param(np.array([[0.0, np.inf]]), id="float-inf"),
    pytest.param(torch.tensor([[0.0, 2.0]]), id="tensor-float-above-1"),
    pytest.param(torch.tensor([[0.0, float("nan")]], dtype=torch.bfloat16), id="tensor-bfloat16-nan"),
    pytest.param(np.zeros((1, 1, 1, 2, 2), dtype=np.uint8), id="numpy-5d"),
    pytest.param(torch.zeros(1, 1, 1, 2, 2), id="tensor-5d"),
    pytest.param(np.zeros((2, 2, 5), dtype=np.uint8), id="numpy-5-channels"),
    pytest.param(torch.zeros(5, 2, 2), id="tensor-5-channels"),
    pytest.param(np.zeros((4,), dtype=np.uint8), id="numpy-1d"),
    pytest.param(np.zeros((0, 4), dtype=bool), id="numpy-empty"),
    pytest.param(np.array([[-1, 0]], dtype=np.int16), id="negative-int"),
    pytest.param(np.array([[0, 70000]], dtype=np.int32), id="int-above-16-bit"),
    pytest.param(np.array([[1 + 1j, 0]]), id="complex-dtype"),
    pytest.param([[0, 1], [1, 0]], id="list"),
    pytest.param(3, id="int"),
    pytest.param({"mask": 1}, id="dict"),
    pytest.param(None, id="none"),
    pytest.param(b"\x89PNG", id="bytes"),
])
def test_binarize_rejects_with_layout_error(bad):
    with pytest.raises(LayoutError) as info:
        binarize_mask(bad, index=2)
    assert_layout_error(info.value, 2, "mask")
    with pytest.raises(LayoutError) as info:
        binarize_mask(bad)
    assert_layout_error(info.value, None, "mask")


def test_binarize_rejects_bad_data_uri():
    with pytest.raises(LayoutError) as info:
        binarize_mask(DATA_URI_PREFIX + "not*base64!", index=0)
    assert_layout_error(info.value, 0, "mask")


# ----------------------------------------------------------------------------------------------------------
# Box rasterisation: the pixel-centre rule
# ----------------------------------------------------------------------------------------------------------


def reference_box_mask(box, width: int, height: int) -> list[list[bool]]:
    x0, y0, x1, y1 = box
    return [[bool(x0 <= c + 0.5 < x1 and y0 <= r + 0.5 < y1) for c in range(width)] for r in range(height)]


coordinate = st.one_of(st.integers(-16, 64).map(lambda v: v / 2), st.floats(-8, 32, allow_nan=False))


@SETTINGS
@given(width=st.integers(1, 24), height=st.integers(1, 24), xs=st.tuples(coordinate, coordinate),
       ys=st.tuples(coordinate, coordinate))
def test_box_rasterize_matches_pixel_centre_reference(width, height, xs, ys):
    x0, x1 = sorted(xs)
    y0, y1 = sorted(ys)
    out = Entity("thing", box=(x0, y0, x1, y1)).rasterize(width, height)
    assert out.shape == (height, width)
    assert out.dtype == bool
    assert out.tolist() == reference_box_mask((x0, y0, x1, y1), width, height)


def test_box_rasterize_examples_and_clipping():
    out = Entity("thing", box=(1, 2, 3, 4)).rasterize(5, 6)
    expected = np.zeros((6, 5), dtype=bool)
    expected[2:4, 1:3] = True
    assert np.array_equal(out, expected)
    # Half-pixel edges: centres 0.5 and 1.5 lie in [0.5, 2.5); 2.5 does not (start inclusive, end exclusive).
    out = Entity("thing", box=(0.5, 0.5, 2.5, 2.5)).rasterize(4, 4)
    expected = np.zeros((4, 4), dtype=bool)
    expected[0:2, 0:2] = True
    assert np.array_equal(out, expected)
    # Partially outside: clipped to the image.
    out = Entity("thing", box=(-5, -5, 3, 3)).rasterize(8, 8)
    expected = np.zeros((8, 8), dtype=bool)
    expected[:3, :3] = True
    assert np.array_equal(out, expected)
    out = Entity("thing", box=(6, 5, 100, 100)).rasterize(8, 7)
    expected = np.zeros((7, 8), dtype=bool)
    expected[5:, 6:] = True
    assert np.array_equal(out, expected)


def test_polygon_rasterize_fills_the_inside():
    out = Entity("thing", polygon=[(2, 2), (14, 2), (14, 10), (2, 10)]).rasterize(16, 12)
    assert out.shape == (12, 16)
    assert out[6, 8] and out[3, 3] and out[9, 13]
    assert not out[0, 0] and not out[11, 15] and not out[6, 15] and not out[11, 8]


def test_mask_entity_rasterize_keeps_its_resolution():
    mask = np.zeros((7, 9), dtype=np.uint8)
    mask[2:5, 3:6] = 255
    out = Entity("thing", mask=mask).rasterize(64, 48)
    assert np.array_equal(out, mask >= 128)


# ----------------------------------------------------------------------------------------------------------
# Layout files
# ----------------------------------------------------------------------------------------------------------


def _mask_array() -> np.ndarray:
    mask = np.zeros((10, 13), dtype=np.uint8)  # deliberately not the output size
    mask[2:7, 4:11] = 255
    mask[0, 0] = 255
    return mask


def test_load_layout_resolves_mask_relative_to_the_file(tmp_path, monkeypatch):
    layout_dir = tmp_path / "layouts"
    (layout_dir / "masks").mkdir(parents=True)
    (tmp_path / "shared").mkdir()
    _write_png(layout_dir / "masks" / "dog.png", _mask_array())
    other = np.zeros((4, 4), dtype=np.uint8)
    other[1, 2] = 255
    _write_png(tmp_path / "shared" / "cat.png", other)
    data = {
        "prompt": "a park",
        "negative_prompt": "blurry",
        "width": 64,
        "height": 48,
        "seed": 7,
        "entities": [
            {"prompt": "a dog", "mask": "masks/dog.png"},
            {"prompt": "a red ball", "box": [4, 6, 20.5, 30]},
            {"prompt": "a kite", "polygon": [[30, 2], [60, 5], [45, 25]]},
            {"prompt": "a cat", "mask": "../shared/cat.png"},
        ],
    }
    path = layout_dir / "scene.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative to the JSON file, not to the working directory

    layout = load_layout(path)
    assert isinstance(layout, Layout)
    assert (layout.prompt, layout.negative_prompt, layout.width, layout.height, layout.seed) == (
        "a park", "blurry", 64, 48, 7)
    assert [e.prompt for e in layout.entities] == ["a dog", "a red ball", "a kite", "a cat"]
    dog, ball, kite, cat = layout.entities
    assert np.array_equal(dog.rasterize(64, 48), _mask_array() >= 128)
    assert np.array_equal(cat.rasterize(64, 48), other >= 128)
    assert [float(v) for v in ball.box] == [4, 6, 20.5, 30]
    assert np.array_equal(ball.rasterize(64, 48), np.array(reference_box_mask((4, 6, 20.5, 30), 64, 48)))
    assert [[float(x), float(y)] for x, y in kite.polygon] == [[30, 2], [60, 5], [45, 25]]
    assert [e.spatial_field for e in layout.entities] == ["mask", "box", "polygon", "mask"]


def _round_trip_layout(tmp_path) -> Layout:
    path = tmp_path / "dog.png"
    _write_png(path, _mask_array())
    rgba = np.zeros((9, 11, 4), dtype=np.uint8)
    rgba[..., :3] = 255
    rgba[3:8, 1:5, 3] = 255  # alpha varies: alpha decides
    return Layout(
        prompt="a park in autumn",
        width=64,
        height=48,
        negative_prompt="blurry, low quality",
        seed=1234,
        entities=[
            Entity("a dog", mask=str(path)),
            Entity("a red ball", box=(4.25, 6, 20.5, 30)),
            Entity("a kite", polygon=[(30, 2.5), (60, 5), (45, 25)]),
            Entity("a cat", mask=rgba),
            Entity("a bird", mask=Image.fromarray(_mask_array())),
            Entity("a bone", mask=torch.from_numpy(_mask_array() >= 128)),
        ],
    )


def test_layout_dict_round_trip_with_embedded_masks(tmp_path):
    layout = _round_trip_layout(tmp_path)
    layout.validate()
    data = layout_to_dict(layout)
    for entry in data["entities"]:
        if "mask" in entry:
            assert entry["mask"].startswith(DATA_URI_PREFIX)
    data = json.loads(json.dumps(data))  # must be plain JSON
    (tmp_path / "dog.png").unlink()  # the embedded copy must not need the file any more
    restored = layout_from_dict(data)
    assert (restored.prompt, restored.width, restored.height, restored.negative_prompt, restored.seed) == (
        "a park in autumn", 64, 48, "blurry, low quality", 1234)
    assert [e.prompt for e in restored.entities] == [e.prompt for e in layout.entities]
    assert [float(v) for v in restored.entities[1].box] == [4.25, 6, 20.5, 30]
    assert [[float(x), float(y)] for x, y in restored.entities[2].polygon] == [[30, 2.5], [60, 5], [45, 25]]
    assert [e.spatial_field for e in restored.entities] == ["mask", "box", "polygon", "mask", "mask", "mask"]
    originals = [
        _mask_array() >= 128,
        np.array(reference_box_mask((4.25, 6, 20.5, 30), 64, 48)),
        None,
        np.pad(np.ones((5, 4), dtype=bool), ((3, 1), (1, 6))),
        _mask_array() >= 128,
        _mask_array() >= 128,
    ]
    for i, (before, after) in enumerate(zip(layout.entities, restored.entities, strict=True)):
        if i == 0:
            continue  # the original's file is gone; compared through `originals` below
        assert np.array_equal(after.rasterize(64, 48), before.rasterize(64, 48)), f"entity {i}"
    for i, (after, original) in enumerate(zip(restored.entities, originals, strict=True)):
        if original is not None:
            assert np.array_equal(after.rasterize(64, 48), original), f"entity {i}"
    # A second round trip is a fixed point.
    assert layout_to_dict(restored) == data


def test_layout_to_dict_without_embedding_keeps_paths(tmp_path):
    layout = _round_trip_layout(tmp_path)
    data = layout_to_dict(layout, embed_masks=False)
    assert data["entities"][0]["mask"] == str(tmp_path / "dog.png")
    assert data["entities"][3]["mask"].startswith(DATA_URI_PREFIX)  # arrays have no path: always embedded


def test_save_and_load_layout_round_trip(tmp_path):
    layout = _round_trip_layout(tmp_path)
    out = tmp_path / "sub" / "saved.json"
    out.parent.mkdir()
    save_layout(layout, out)
    restored = load_layout(out)
    assert [e.prompt for e in restored.entities] == [e.prompt for e in layout.entities]
    for before, after in zip(layout.entities, restored.entities, strict=True):
        assert np.array_equal(after.rasterize(64, 48), before.rasterize(64, 48))


# ----------------------------------------------------------------------------------------------------------
# Bad layouts: one case per problem, each naming the entity index and the field
# ----------------------------------------------------------------------------------------------------------

GOOD_ENTITY = {"prompt": "a red square", "box": [4, 4, 20, 20]}


def _layout(second_entity) -> dict:
    return {"prompt": "a scene", "width": 64, "height": 48, "entities": [dict(GOOD_ENTITY), second_entity]}


BAD_ENTITIES = [
    ("missing-prompt", {"box": [0, 0, 8, 8]}, "prompt"),
    ("empty-prompt", {"prompt": "  ", "box": [0, 0, 8, 8]}, "prompt"),
    ("non-string-prompt", {"prompt": 5, "box": [0, 0, 8, 8]}, "prompt"),
    ("no-spatial-field", {"prompt": "a dog"}, "mask/box/polygon"),
    ("box-and-polygon", {"prompt": "a dog", "box": [0, 0, 8, 8], "polygon": [[0, 0], [8, 0], [8, 8]]},
     "mask/box/polygon"),
    ("box-and-mask", {"prompt": "a dog", "box": [0, 0, 8, 8], "mask": mask_to_png_data_uri(np.ones((4, 4), bool))},
     "mask/box/polygon"),
    ("box-x1-equals-x0", {"prompt": "a dog", "box": [10, 0, 10, 8]}, "box"),
    ("box-x1-below-x0", {"prompt": "a dog", "box": [10, 0, 5, 8]}, "box"),
    ("box-y1-equals-y0", {"prompt": "a dog", "box": [0, 10, 8, 10]}, "box"),
    ("box-y1-below-y0", {"prompt": "a dog", "box": [0, 10, 8, 3]}, "box"),
    ("box-right-of-image", {"prompt": "a dog", "box": [64, 0, 80, 8]}, "box"),
    ("box-below-image", {"prompt": "a dog", "box": [0, 48, 8, 60]}, "box"),
    ("box-left-of-image", {"prompt": "a dog", "box": [-10, 0, 0, 8]}, "box"),
    ("box-above-image", {"prompt": "a dog", "box": [0, -10, 8, 0]}, "box"),
    ("box-3-coordinates", {"prompt": "a dog", "box": [0, 0, 8]}, "box"),
    ("box-5-coordinates", {"prompt": "a dog", "box": [0, 0, 8, 8, 8]}, "box"),
    ("box-not-numbers", {"prompt": "a dog", "box": ["a", 0, 8, 8]}, "box"),
    ("box-string", {"prompt": "a dog", "box": "0,0,8,8"}, "box"),
    ("box-nan", {"prompt": "a dog", "box": [0, 0, float("nan"), 8]}, "box"),
    ("polygon-2-vertices", {"prompt": "a dog", "polygon": [[0, 0], [8, 8]]}, "polygon"),
    ("polygon-empty", {"prompt": "a dog", "polygon": []}, "polygon"),
    ("polygon-right-of-image", {"prompt": "a dog", "polygon": [[64, 0], [80, 0], [80, 10]]}, "polygon"),
    ("polygon-above-image", {"prompt": "a dog", "polygon": [[0, -9], [10, -9], [5, 0]]}, "polygon"),
    ("polygon-bad-vertex", {"prompt": "a dog", "polygon": [[0, 0], [8, 0], [8, 8, 1]]}, "polygon"),
    ("mask-not-a-string", {"prompt": "a dog", "mask": 5}, "mask"),
    ("mask-bad-data-uri", {"prompt": "a dog", "mask": DATA_URI_PREFIX + "AAAA"}, "mask"),
    ("unknown-entity-key", {"prompt": "a dog", "box": [0, 0, 8, 8], "colour": "red"}, "colour"),
]


@pytest.mark.parametrize(("entity", "field"), [pytest.param(e, f, id=i) for i, e, f in BAD_ENTITIES])
def test_bad_entity_names_index_and_field(entity, field):
    with pytest.raises(LayoutError) as info:
        layout_from_dict(_layout(entity))
    assert_layout_error(info.value, 1, field)
    assert "entity 1" in str(info.value) and f"'{field}'" in str(info.value)


def test_bad_entity_through_python_api():
    entities = [Entity("a", box=(0, 0, 8, 8)), Entity("b", box=(0, 0, 8, 8)), Entity("c", box=(9, 0, 9, 4))]
    layout = Layout(prompt="a scene", width=64, height=48, entities=entities)
    with pytest.raises(LayoutError) as info:
        layout.validate()
    assert_layout_error(info.value, 2, "box")


def test_entity_that_is_not_an_object():
    with pytest.raises(LayoutError) as info:
        layout_from_dict(_layout("a dog"))
    assert info.value.entity == 1
    assert str(info.value).startswith("entity 1: ")


@pytest.mark.parametrize("case", ["unreadable", "missing"])
def test_bad_mask_file_names_index_and_field(tmp_path, case):
    _write_png(tmp_path / "good.png", _mask_array())
    if case == "unreadable":
        (tmp_path / "bad.png").write_text("this is not a PNG\n", encoding="utf-8")
    data = _layout({"prompt": "a dog", "mask": "bad.png"})
    data["entities"][0] = {"prompt": "a cat", "mask": "good.png"}
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(LayoutError) as info:
        load_layout(path)
    assert_layout_error(info.value, 1, "mask")
    if case == "missing":
        assert "not found" in str(info.value)
    # The same through the Python API.
    entity = Entity("a dog", mask=tmp_path / "bad.png")
    with pytest.raises(LayoutError) as info:
        entity.validate(3, 64, 48)
    assert_layout_error(info.value, 3, "mask")


BAD_TOP_LEVEL = [
    ("unknown-key", {"colour": "red"}, "colour"),
    ("width-zero", {"width": 0}, "width"),
    ("width-negative", {"width": -64}, "width"),
    ("width-float", {"width": 64.5}, "width"),
    ("width-integral-float", {"width": 64.0}, "width"),
    ("width-string", {"width": "64"}, "width"),
    ("width-bool", {"width": True}, "width"),
    ("width-null", {"width": None}, "width"),
    ("height-zero", {"height": 0}, "height"),
    ("height-negative", {"height": -1}, "height"),
    ("height-float", {"height": 47.5}, "height"),
    ("height-string", {"height": "48"}, "height"),
    ("prompt-empty", {"prompt": "   "}, "prompt"),
    ("prompt-not-string", {"prompt": ["a", "b"]}, "prompt"),
    ("entities-object", {"entities": {"prompt": "a dog", "box": [0, 0, 8, 8]}}, "entities"),
    ("entities-string", {"entities": "a dog"}, "entities"),
    ("negative-prompt-not-string", {"negative_prompt": 3}, "negative_prompt"),
    ("seed-not-integer", {"seed": "7"}, "seed"),
]


@pytest.mark.parametrize(("change", "field"), [pytest.param(c, f, id=i) for i, c, f in BAD_TOP_LEVEL])
def test_bad_top_level_names_field(change, field):
    data = _layout(dict(GOOD_ENTITY))
    data.update(change)
    with pytest.raises(LayoutError) as info:
        layout_from_dict(data)
    assert_layout_error(info.value, None, field)


@pytest.mark.parametrize("missing", ["prompt", "width", "height"])
def test_missing_top_level_key_names_field(missing):
    data = _layout(dict(GOOD_ENTITY))
    del data[missing]
    with pytest.raises(LayoutError) as info:
        layout_from_dict(data)
    assert_layout_error(info.value, None, missing)


def test_layout_not_an_object_and_bad_files(tmp_path):
    with pytest.raises(LayoutError):
        layout_from_dict([GOOD_ENTITY])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(LayoutError):
        load_layout(bad)
    with pytest.raises(LayoutError):
        load_layout(tmp_path / "missing.json")


def test_layout_without_entities_is_valid():
    layout = layout_from_dict({"prompt": "a scene", "width": 64, "height": 48})
    assert layout.entities == []


# ----------------------------------------------------------------------------------------------------------
# Empty after rasterisation at the latent grid (needs the pipeline's VAE scale factor: 2 for tiny_pipe)
# ----------------------------------------------------------------------------------------------------------

SIZE = 32  # 32 x 32 pixels -> 16 x 16 latent pixels -> 8 x 8 tokens of 4 x 4 pixels


def reference_tokens(mask: np.ndarray, height: int, width: int, f: int) -> list[bool]:
    """The suite's token-cover oracle: NEAREST (as PIL samples) to the latent grid, then a token is covered iff any
    of its 2x2 latent pixels is."""
    return oracles.token_cover(np.asarray(mask, dtype=bool), height, width, f, 2)


# 32 -> 16 with PIL NEAREST samples the odd source rows/columns, so a 1-pixel box at an odd (row, col) survives and
# one on an even row or column vanishes; each test re-checks its premise with the reference rule first.
LANDING_PIXEL_BOXES = [(5, 5, 6, 6), (1, 1, 2, 2), (31, 31, 32, 32)]
MISSED_PIXEL_BOXES = [(4, 4, 5, 5), (0, 0, 1, 1), (30, 0, 31, 1), (1, 0, 2, 1)]


def _reference_lands(box) -> bool:
    return any(reference_tokens(np.array(reference_box_mask(box, SIZE, SIZE)), SIZE, SIZE, 2))


def test_tiny_pipe_scale_factor(tiny_pipe):
    assert tiny_pipe.vae_scale_factor == 2


@pytest.mark.parametrize(("mask", "field"), [
    pytest.param(Entity("x", box=(0.2, 0.2, 0.4, 0.4)).rasterize(SIZE, SIZE), "box", id="sub-pixel-box"),
    *[pytest.param(Entity("x", box=box).rasterize(SIZE, SIZE), "box", id=f"missed-1-pixel-box-{box[0]}-{box[1]}")
      for box in MISSED_PIXEL_BOXES],
    pytest.param(np.zeros((SIZE, SIZE), dtype=np.uint8), "mask", id="all-zero-mask"),
    pytest.param(np.zeros((5, 7), dtype=bool), "mask", id="all-false-small-mask"),
])
def test_entity_covering_no_token_is_rejected(tiny_pipe, mask, field):
    good = Entity("a", box=(0, 0, 16, 16)).rasterize(SIZE, SIZE)
    with pytest.raises(LayoutError) as info:
        tiny_pipe.entity_token_covers([good, good, mask], SIZE, SIZE, fields=["box", "box", field])
    assert_layout_error(info.value, 2, field)
    assert "entity 2" in str(info.value) and f"'{field}'" in str(info.value)


def test_entity_covering_no_token_default_field_is_mask(tiny_pipe):
    with pytest.raises(LayoutError) as info:
        tiny_pipe.entity_token_covers([np.zeros((SIZE, SIZE), dtype=bool)], SIZE, SIZE)
    assert_layout_error(info.value, 0, "mask")


def test_sub_pixel_box_passes_validation_but_not_the_latent_check():
    # The box is inside the image and non-degenerate, so only the pipeline's latent-grid check can catch it.
    Entity("x", box=(0.2, 0.2, 0.4, 0.4)).validate(0, SIZE, SIZE)
    assert not Entity("x", box=(0.2, 0.2, 0.4, 0.4)).rasterize(SIZE, SIZE).any()


@pytest.mark.parametrize("box", MISSED_PIXEL_BOXES)
def test_missed_pixel_box_premise(box):
    assert Entity("x", box=box).rasterize(SIZE, SIZE).sum() == 1
    assert not _reference_lands(box)


@pytest.mark.parametrize("box", LANDING_PIXEL_BOXES)
def test_one_pixel_box_that_nearest_lands_on_is_accepted(tiny_pipe, box):
    assert _reference_lands(box), "premise: the reference rule keeps this pixel"
    mask = Entity("x", box=box).rasterize(SIZE, SIZE)
    assert mask.sum() == 1
    covers = tiny_pipe.entity_token_covers([mask], SIZE, SIZE, fields=["box"])
    assert tuple(covers.shape) == (1, 1, 64)
    assert covers.dtype == torch.bool
    assert covers[0, 0].tolist() == reference_tokens(mask, SIZE, SIZE, 2)
    assert int(covers.sum()) == 1


def test_entity_token_covers_match_reference(tiny_pipe):
    rng = np.random.default_rng(0)
    masks = [rng.random((13, 21)) < 0.05, Entity("b", box=(3, 5, 17, 9)).rasterize(40, 24),
             (rng.random((40, 24, 3)) * 255).astype(np.uint8)]
    covers = tiny_pipe.entity_token_covers(masks, 24, 40)
    expected = [reference_tokens(masks[0], 24, 40, 2), reference_tokens(masks[1], 24, 40, 2),
                reference_tokens(reference_rgb_rule(masks[2]), 24, 40, 2)]
    assert tuple(covers.shape) == (1, 3, 6 * 10)
    assert covers[0].tolist() == expected


def test_rectangle_polygon_rasterises_like_the_box():
    from eligen.entities import box_to_mask, polygon_to_mask

    square = [(2, 1), (7, 1), (7, 6), (2, 6)]
    assert np.array_equal(polygon_to_mask(square, 10, 8), box_to_mask((2, 1, 7, 6), 10, 8))


@SETTINGS
@given(st.lists(st.tuples(st.integers(-4, 20), st.integers(-4, 20)), min_size=3, max_size=3), st.integers(0, 3))
def test_triangle_pixel_centres(vertices, jitter):
    """Pixel centres clearly inside a triangle are on, clearly outside are off (sign-of-cross-product reference)."""
    from eligen.entities import polygon_to_mask

    tri = [(x + 0.1 * jitter, y + 0.07 * jitter) for x, y in vertices]
    mask = polygon_to_mask(tri, 16, 16)
    for row in range(16):
        for col in range(16):
            px, py = col + 0.5, row + 0.5
            crosses = []
            for (xa, ya), (xb, yb) in zip(tri, tri[1:] + tri[:1], strict=True):
                length = max(((xb - xa) ** 2 + (yb - ya) ** 2) ** 0.5, 1e-9)
                crosses.append(((xb - xa) * (py - ya) - (yb - ya) * (px - xa)) / length)
            if all(c > 1e-6 for c in crosses) or all(c < -1e-6 for c in crosses):
                assert mask[row, col], (tri, row, col)
            elif any(c > 1e-6 for c in crosses) and any(c < -1e-6 for c in crosses):
                assert not mask[row, col], (tri, row, col)
