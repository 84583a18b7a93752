"""Hostile input, in one table: every case is a command line (or a call) and the clear message it must get, with
a non-zero exit and nothing loaded that need not be. Adding a case is one line. Plus property tests: any layout or
record gives a result or a message, never another exception."""

from __future__ import annotations

import json
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from eligen.cli import main
from eligen.data.vlm import OpenAIBackend, VLMError
from eligen.entities import LayoutError, layout_from_dict
from eligen.generate import checked_record, save_png

LAYOUT = "examples/tiny_two_shapes.json"
FAST = ["--steps", "1", "--no-progress"]


def write(tmp: Path, name: str, data: bytes | str) -> str:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def layout_with(tmp: Path, **changes) -> str:
    layout = json.loads(Path(LAYOUT).read_text())
    layout.update(changes)
    return write(tmp, "layout.json", json.dumps(layout))


def png_with_record(tmp: Path, record) -> str:
    path = tmp / "made.png"
    save_png(Image.new("RGB", (64, 64)), path, record)
    return str(path)


def huge_png(tmp: Path) -> str:
    """A valid PNG header declaring 9000 x 9000 pixels (a decompression bomb), with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 9000, 9000, 8, 2, 0, 0, 0)
    return write(tmp, "bomb.png", b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                 + chunk(b"IEND", b""))


def truncated_png(tmp: Path) -> str:
    path = tmp / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(path)
    data = path.read_bytes()
    return write(tmp, "cut.png", data[: len(data) // 2])


def data_uri(path: str, kind: str = "png") -> str:
    import base64

    return f"data:image/{kind};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def jpeg_mask_layout(tmp: Path) -> str:
    path = tmp / "mask.jpg"
    Image.fromarray(np.pad(np.full((20, 20), 255, np.uint8), 6)).save(path, format="JPEG")
    return layout_with(tmp, entities=[{"prompt": "a red circle", "mask": data_uri(str(path), "jpeg")}])


def model_with_defaults(tmp: Path, text: str) -> str:
    write(tmp, "m/model_index.json", '{"_class_name": "FluxPipeline"}')
    return str(Path(write(tmp, "m/eligen_defaults.json", text)).parent)


def layoutsam_rows(tmp: Path, **changes) -> str:
    row = {"global_caption": "a cat", "bbox_list": [[1, 2, 30, 40]], "region_captions": ["cat"],
           "detail_region_captions": ["a grey cat"], "width": 64, "height": 64, **changes}
    return write(tmp, "rows.jsonl", json.dumps(row) + "\n")


def mig_yaml(tmp: Path, boxes: str) -> str:
    return write(tmp, "mig/mig_bench_anno.yaml", f"a red cat on a mat:\n  coco_id: 7\n  a red cat: {boxes}\n")


def sd_folder(tmp: Path) -> str:
    return str(Path(write(tmp, "sd/model_index.json", '{"_class_name": "StableDiffusionPipeline"}')).parent)


def lora_file(tmp: Path, down: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor | None = None) -> str:
    state = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": down,
             "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": up}
    if alpha is not None:
        state["transformer.transformer_blocks.0.attn.to_q.alpha"] = alpha
    path = tmp / "lora.safetensors"
    save_file(state, str(path))
    return str(path)


def record() -> dict:
    from eligen.generate import read_metadata

    return read_metadata(REFERENCE_PNG)


REFERENCE_PNG = None  # filled by the fixture below: a real record to damage


@pytest.fixture(scope="module", autouse=True)
def reference_png(tmp_path_factory):
    global REFERENCE_PNG
    out = tmp_path_factory.mktemp("ref") / "ref.png"
    assert main(["generate", LAYOUT, "-o", str(out), *FAST]) == 0
    REFERENCE_PNG = out


def damaged(**changes) -> dict:
    rec = record()
    for path, value in changes.items():
        part, key = path.split("__")
        if value is KeyError:
            rec[part].pop(key)
        else:
            rec[part][key] = value
    return rec


CASES = [
    # (case, argv from tmp, message)
    ("model not a pipeline", lambda t: ["generate", LAYOUT, "-o", f"{t}/o.png", "--model", str(t)],
     "no model_index.json"),
    ("model of an unknown family", lambda t: ["generate", LAYOUT, "-o", f"{t}/o.png", "--model", sd_folder(t)],
     "StableDiffusionPipeline"),
    ("model not cached", lambda t: ["generate", LAYOUT, "-o", f"{t}/o.png", "--model", "nobody/nothing-here"],
     "cannot load the model nobody/nothing-here"),
    ("unknown device", lambda t: ["generate", LAYOUT, "-o", f"{t}/o.png", "--device", "tpu9"], "not a torch device"),
    ("no CUDA here", lambda t: ["generate", LAYOUT, "-o", f"{t}/o.png", "--device", "cuda"], "no CUDA device here"),
    ("NaN true CFG", lambda t: ["generate", LAYOUT, "-o", f"{t}/o.png", "--true-cfg", "nan"], "finite number"),
    ("inf guidance", lambda t: ["generate", LAYOUT, "-o", f"{t}/o.png", "--guidance", "inf"], "finite number"),
    ("seed below 0", lambda t: ["generate", LAYOUT, "-o", f"{t}/o.png", "--seed", "-1"], "--seed must be in"),
    ("seed above 2**64", lambda t: ["generate", LAYOUT, "-o", f"{t}/o.png", "--seed", str(2**64)],
     "--seed must be in"),
    ("boolean width", lambda t: ["generate", layout_with(t, width=True), "-o", f"{t}/o.png"], "positive integer"),
    ("boolean seed", lambda t: ["generate", layout_with(t, seed=False), "-o", f"{t}/o.png"], "must be an integer"),
    ("layout seed out of range", lambda t: ["generate", layout_with(t, seed=2**70), "-o", f"{t}/o.png"],
     "0 <= seed < 2**64"),
    ("non-UTF-8 layout", lambda t: ["generate", write(t, "l.json", b'{"prompt":\n "caf\xe9"}'), "-o", f"{t}/o.png"],
     "line 2, column 6: not UTF-8"),
    ("non-UTF-8 captions", lambda t: ["data", "generate", write(t, "c.txt", b"a cat\n\xff dog\n"), "--out",
                                      f"{t}/data"], "line 2, column 1: not UTF-8"),
    ("output is a folder", lambda t: ["generate", LAYOUT, "-o", str(t)], "is a folder"),
    ("unknown output format", lambda t: ["generate", LAYOUT, "-o", f"{t}/o.tiff"], "extension names the format"),
    ("--from a PNG without a record", lambda t: ["generate", "--from", write(t, "x.png", _plain_png()), "-o",
                                                 f"{t}/o.png"], "carries no eligen metadata"),
    ("--from a record without params", lambda t: ["generate", "--from", png_with_record(t, {"layout": {}}),
                                                  "-o", f"{t}/o.png"], "no 'params' object"),
    ("--from a record that is a list", lambda t: ["generate", "--from", png_with_record(t, [1, 2]), "-o",
                                                  f"{t}/o.png"], "not a record"),
    ("--from steps of the wrong type", lambda t: ["generate", "--from", png_with_record(t, damaged(params__steps="20")),
                                                  "-o", f"{t}/o.png"], "option 'steps' must be an integer"),
    ("--from a boolean true CFG", lambda t: ["generate", "--from", png_with_record(t, damaged(params__true_cfg=True)),
                                             "-o", f"{t}/o.png"], "option 'true_cfg' must be a number"),
    ("--from a layout without a prompt", lambda t: ["generate", "--from",
                                                    png_with_record(t, damaged(layout__prompt=KeyError)), "-o",
                                                    f"{t}/o.png"], "field 'prompt': is required"),
    ("--from an unknown command", lambda t: ["generate", "--from", png_with_record(t, {**record(), "command": "x"}),
                                             "-o", f"{t}/o.png"], "names no eligen command"),
    ("inpaint a decompression bomb", lambda t: ["inpaint", huge_png(t), LAYOUT, "-o", f"{t}/o.png"],
     "above the 64 MP eligen decodes"),
    ("inpaint a truncated image", lambda t: ["inpaint", truncated_png(t), LAYOUT, "-o", f"{t}/o.png"],
     "truncated or not an image"),
    ("entity image without --ip-adapter", lambda t: ["generate", layout_with(t, entities=[
        {"prompt": "a red circle", "box": [4, 6, 30, 32], "image": write(t, "ref.png", _plain_png())}]), "-o",
        f"{t}/o.png"], "entity 0, field 'image': a reference image needs an IP-Adapter"),
    ("truncated entity image", lambda t: ["generate", layout_with(t, entities=[
        {"prompt": "a red circle", "box": [4, 6, 30, 32], "image": truncated_png(t)}]), "-o", f"{t}/o.png"],
     "field 'image'"),
    ("negative image scale", lambda t: ["generate", layout_with(t, entities=[
        {"prompt": "a red circle", "box": [4, 6, 30, 32], "image_scale": -1}]), "-o", f"{t}/o.png"],
     "field 'image_scale'"),
    ("--ip-image a decompression bomb", lambda t: ["generate", LAYOUT, "-o", f"{t}/o.png", "--ip-image", huge_png(t),
                                                   "--ip-adapter", str(t)], "above the 64 MP eligen decodes"),
    ("--ip-adapter file that is not there", lambda t: ["generate", LAYOUT, "-o", f"{t}/o.png", "--ip-adapter",
                                                       f"{t}/ip.safetensors"], "--ip-adapter"),
    ("LoRA of rank 0", lambda t: ["lora", "info", lora_file(t, torch.zeros(0, 8), torch.zeros(8, 0))], "rank 0"),
    ("LoRA with a vector alpha", lambda t: ["lora", "info", lora_file(t, torch.ones(2, 8), torch.ones(8, 2),
                                                                      torch.ones(2))], "alpha is one number"),
    ("LoRA with NaN weights", lambda t: ["lora", "info", lora_file(t, torch.full((2, 8), float("nan")),
                                                                   torch.ones(8, 2))], "non-finite values"),
    ("LoRA convert to a folder", lambda t: ["lora", "convert", lora_file(t, torch.ones(2, 8), torch.ones(8, 2)),
                                            str(t), "--to", "kohya"], "is a folder"),
    ("IP-Adapter not cached", lambda t: ["generate", LAYOUT, "-o", f"{t}/o.png", "--ip-adapter", "nobody/no-ip"],
     "cannot load the IP-Adapter (or its CLIP image encoder) nobody/no-ip"),
    ("IP-Adapter that is a LoRA", lambda t: ["generate", LAYOUT, "-o", f"{t}/o.png", "--ip-adapter",
                                             lora_file(t, torch.ones(2, 8), torch.ones(8, 2))], "is not an IP-Adapter"),
    ("model a missing folder", lambda t: ["generate", LAYOUT, "-o", f"{t}/o.png", "--model", f"{t}/nothing"],
     "no such folder"),
    ("VLM not cached", lambda t: ["plan", "a cat", "-o", f"{t}/l.json", "--vlm", "transformers", "--model",
                                  "nobody/no-vlm"], "cannot load the VLM nobody/no-vlm"),
    ("--lora-scale 1e30", lambda t: ["generate", LAYOUT, "-o", f"{t}/o.png", "--lora", "x", "--lora-scale", "1e30"],
     "--lora-scale must be in"),
    ("--true-cfg 1e308", lambda t: ["generate", LAYOUT, "-o", f"{t}/o.png", "--true-cfg", "1e308"],
     "--true-cfg must be in"),
    ("--guidance 1e308", lambda t: ["generate", LAYOUT, "-o", f"{t}/o.png", "--guidance", "1e308"],
     "--guidance must be in"),
    ("--ip-scale 1e30", lambda t: ["generate", LAYOUT, "-o", f"{t}/o.png", "--ip-scale", "1e30"], "--ip-scale must be"),
    ("--ip-scale -1", lambda t: ["generate", LAYOUT, "-o", f"{t}/o.png", "--ip-scale", "-1"], "--ip-scale must be"),
    ("image scale 1e308", lambda t: ["generate", layout_with(t, entities=[
        {"prompt": "a red circle", "box": [4, 6, 30, 32], "image_scale": 1e308}]), "-o", f"{t}/o.png"],
     "field 'image_scale'"),
    ("LoRA with weights of 1e30", lambda t: ["lora", "info", lora_file(t, torch.full((2, 8), 1e30),
                                                                       torch.ones(8, 2))], "weights as large as 1e+30"),
    ("mask data URI of text", lambda t: ["generate", layout_with(t, entities=[
        {"prompt": "a red circle", "mask": "data:text/plain;base64,aGVsbG8="}]), "-o", f"{t}/o.png"],
     "an inline mask is data:image/<format>;base64,<data>"),
    ("mask data URI a decompression bomb", lambda t: ["generate", layout_with(t, entities=[
        {"prompt": "a red circle", "mask": data_uri(huge_png(t))}]), "-o", f"{t}/o.png"],
     "inline mask (data URI) is 9000x9000"),
    ("reference image data URI a decompression bomb", lambda t: ["generate", layout_with(t, entities=[
        {"prompt": "a red circle", "box": [4, 6, 30, 32], "image": data_uri(huge_png(t))}]), "-o", f"{t}/o.png"],
     "inline reference image (data URI) is 9000x9000"),
    ("bench shapes off the patch grid", lambda t: ["bench", "shapes", "--size", "18", "--n", "1", "-o", str(t)],
     "--size 18 is off the model's 4-pixel patch grid; use a multiple of 4 (e.g. 16 or 20)"),
    ("bench shapes to a file", lambda t: ["bench", "shapes", "-o", write(t, "report.txt", "mine")], "is a file"),
    ("bench shapes without CUDA", lambda t: ["bench", "shapes", "--device", "cuda", "-o", str(t)],
     "no CUDA device here"),
    ("bench shapes on an unknown device", lambda t: ["bench", "shapes", "--device", "foo", "-o", str(t)],
     "not a torch device"),
    ("malformed eligen_defaults.json", lambda t: ["generate", LAYOUT, "-o", f"{t}/o.png", "--model",
                                                  model_with_defaults(t, '{"steps": ')],
     "m/eligen_defaults.json is not a readable JSON object of model defaults"),
    ("eligen_defaults.json holding a list", lambda t: ["generate", LAYOUT, "-o", f"{t}/o.png", "--model",
                                                       model_with_defaults(t, "[20]")],
     "m/eligen_defaults.json must hold a JSON object"),
    ("layoutsam row with a NaN box", lambda t: ["bench", "layoutsam", "--data", layoutsam_rows(
        t, bbox_list="[[NaN, 2, 30, 40]]"), "-o", f"{t}/out"], "row 0, box 0: a box holds 4 finite numbers"),
    ("layoutsam row with a width of text", lambda t: ["bench", "layoutsam", "--data", layoutsam_rows(
        t, width="abc"), "-o", f"{t}/out"], "row 0: 'width' must be a positive number of pixels, got 'abc'"),
    ("layoutsam row with a box that is an object", lambda t: ["bench", "layoutsam", "--data", layoutsam_rows(
        t, bbox_list=[{"x": 1}]), "-o", f"{t}/out"], "row 0, box 0: a box is a list of 4 numbers"),
    ("cocomig box that is not a list", lambda t: ["bench", "cocomig", "--data", mig_yaml(t, "[5]"), "-o",
                                                  f"{t}/out"], "'a red cat': an instance has a list of boxes"),
    ("Grounding DINO not cached", lambda t: ["bench", "cocomig", "--data", mig_yaml(t, "[[0.1, 0.1, 0.6, 0.6]]"),
                                             "-o", f"{t}/out", "--detector", "nobody/no-dino", "--steps", "1"],
     "cannot load the Grounding DINO detector nobody/no-dino"),
    ("plan from an ftp server", lambda t: ["plan", "a cat", "-o", f"{t}/l.json", "--base-url", "ftp://127.0.0.1/v1"],
     "must be an http:// or https:// URL"),
    ("annotate from an ftp server", lambda t: ["data", "annotate", str(t), "--model", "m", "--base-url",
                                               "ftp://127.0.0.1/v1"], "must be an http:// or https:// URL"),
    ("plan to a folder", lambda t: ["plan", "a cat", "-o", str(t), "--base-url", "http://127.0.0.1:9/v1"],
     "is a folder"),
]


def _plain_png() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(("argv", "message"), [pytest.param(a, m, id=c) for c, a, m in CASES])
def test_hostile_command_lines(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main([*argv(tmp_path), *([] if argv(tmp_path)[0] in ("lora", "plan") else FAST[-1:])])
    err = capsys.readouterr().err
    assert code != 0 and message in err, err
    assert "Traceback" not in err


def test_a_reader_that_goes_away_is_no_error(tmp_path):
    import subprocess
    import sys

    lora = lora_file(tmp_path, torch.ones(2, 8), torch.ones(8, 2))
    child = subprocess.Popen([sys.executable, "-m", "eligen.cli", "lora", "info", lora], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    child.stdout.close()  # as `| head` does once it has its lines
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 0 and "Traceback" not in err, err


def test_a_size_off_the_patch_grid_is_told_and_recorded_as_rendered(tmp_path, capsys):
    from eligen.generate import read_metadata

    assert main(["generate", LAYOUT, "-o", str(tmp_path / "o.png"), "--width", "70", "--height", "70", *FAST]) == 0
    assert "70x70 is off the model's 4-pixel patch grid; rendering and recording 68x68" in capsys.readouterr().err
    meta = read_metadata(tmp_path / "o.png")
    assert Image.open(tmp_path / "o.png").size == (68, 68) == (meta["params"]["width"], meta["params"]["height"])
    assert (meta["layout"]["width"], meta["layout"]["height"]) == (68, 68)


# -- the VLM client: real deadlines, capped answers --------------------------------------------------------------


class Trickle(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        mode = self.server.mode
        if mode == "headers":  # the status line and headers one byte every 50 ms: no single read is slow
            try:
                for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 60:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        size = 6 * 2**20 if mode == "huge" else 10_000
        self.send_header("Content-Length", str(size))
        self.end_headers()
        try:
            if mode == "huge":
                self.wfile.write(b" " * size)
                return
            for _ in range(40):  # one byte every 50 ms: each read is quick, the whole answer is not
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass


@pytest.fixture
def trickle_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("mode", ["trickle", "headers"])
def test_a_trickling_answer_is_cut_off_at_the_deadline(trickle_server, mode):
    trickle_server.mode = mode
    backend = OpenAIBackend(f"http://127.0.0.1:{trickle_server.server_address[1]}/v1", "m", timeout=0.5)
    started = time.monotonic()
    with pytest.raises(VLMError, match=r"did not answer within 0\.5 s"):
        backend.ask("hello")
    assert time.monotonic() - started < 1.5


def test_a_huge_answer_is_refused_before_parsing(trickle_server):
    trickle_server.mode = "huge"
    backend = OpenAIBackend(f"http://127.0.0.1:{trickle_server.server_address[1]}/v1", "m", timeout=10)
    with pytest.raises(VLMError, match="more than 4 MiB"):
        backend.ask("hello")


# -- property tests: any input, a result or a message ------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
LAYOUTISH = st.fixed_dictionaries({}, optional={"prompt": JSON, "width": JSON, "height": JSON, "seed": JSON,
                                                "negative_prompt": JSON,
                                                "entities": st.lists(st.fixed_dictionaries(
                                                    {}, optional={"prompt": JSON, "box": JSON, "polygon": JSON,
                                                                  "mask": JSON}), max_size=3) | JSON})


@settings(max_examples=200, deadline=None)
@given(st.one_of(JSON, LAYOUTISH))
def test_any_layout_gives_a_layout_or_a_layout_error(data):
    try:
        layout_from_dict(data)
    except LayoutError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.one_of(JSON, st.fixed_dictionaries({"layout": JSON, "params": JSON})))
def test_any_record_gives_a_record_or_a_value_error(data):
    try:
        checked_record(data, Path("x.png"))
    except ValueError:
        pass


def test_a_size_that_cannot_fit_is_refused_before_any_work(tiny_pipe, monkeypatch):
    from eligen import Entity

    monkeypatch.setattr(tiny_pipe, "encode_prompt", lambda *a, **k: pytest.fail("started working"))
    with pytest.raises(ValueError, match=r"needs at least .* GiB on cpu but .* GiB are free"):
        tiny_pipe(prompt="a red circle", entities=[Entity("a dog", box=(0, 0, 64, 64))], height=16384,
                  width=16384, num_inference_steps=1)


def test_the_dense_mask_is_counted_with_the_float_copy_attention_makes(tiny_pipe, monkeypatch):
    # examples/flux_three_entities.json (1024x1024) on the shipped 64-pixel model reached 21.9 GB of RAM: 65,536
    # image tokens make a 4 GiB bool mask and a 16 GiB float one; with 18 GiB free it must be refused up front
    from eligen.pipelines import memory

    monkeypatch.setattr(memory, "free_memory", lambda device: 18 * 2**30)
    tiny_pipe.vae_scale_factor, scale = 2, tiny_pipe.vae_scale_factor
    try:
        with pytest.raises(ValueError, match=r"1024x1024 needs at least 2\d\.\d GiB"):
            memory.check_memory(tiny_pipe, 1, (1024, 1024), True, torch.device("cpu"))
        memory.check_memory(tiny_pipe, 1, (1024, 1024), False, torch.device("cpu"))  # segmented: no mask, fits
    finally:
        tiny_pipe.vae_scale_factor = scale


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_inference_steps": 0}, "num_inference_steps must be a whole number >= 1, got 0"),
    ({"num_inference_steps": -1}, "num_inference_steps must be a whole number >= 1, got -1"),
    ({"height": 0}, "height must be a whole number of pixels >= 4"),
    ({"height": -64}, "height must be a whole number of pixels >= 4"),
    ({"width": 2.5}, "width must be a whole number of pixels >= 4"),
])
def test_the_api_refuses_impossible_steps_and_sizes_by_name(tiny_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipe(prompt="a red circle", **{"height": 32, "width": 32, "num_inference_steps": 1, **kwargs},
                  output_type="latent")


def _half_mask(dtype, on) -> np.ndarray:
    mask = np.zeros((32, 32), dtype)
    mask[:16] = on
    return mask


@pytest.mark.parametrize(("kwargs", "message"), [
    pytest.param({"entity_prompt_embeds": [torch.zeros(1, 8, 7)], "entity_masks": [np.ones((32, 32), bool)]},
                 r"entity_prompt_embeds\[0\] is 7 wide but the prompt's embeddings are 32",
                 id="embeds of the wrong width"),
    pytest.param({"entity_prompts": ["a dog"], "entity_masks": [_half_mask(np.int64, 1000)]},
                 r"int64 mask values up to 1000 are ambiguous", id="an int64 0/1000 mask"),
    pytest.param({"true_cfg_scale": 1e308, "negative_prompt": ""}, r"true_cfg_scale must be at most 100",
                 id="true CFG 1e308"),
    pytest.param({"guidance_scale": -1e30}, r"guidance_scale must be at most 100 in magnitude", id="guidance -1e30"),
])
def test_the_api_names_entity_inputs_it_cannot_use(tiny_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipe(prompt="a red circle", height=32, width=32, num_inference_steps=1, output_type="latent", **kwargs)


def test_the_api_reads_masks_of_integer_types_it_can_tell(tiny_pipe):
    for mask in (_half_mask(np.int64, 1), _half_mask(np.uint16, 65535), _half_mask(np.int32, 255)):
        tiny_pipe(prompt="a red circle", entity_prompts=["a dog"], entity_masks=[mask], height=32, width=32,
                  num_inference_steps=1, output_type="latent")


@pytest.mark.parametrize(("argument", "value"), [
    ("true_cfg_scale", float("nan")), ("guidance_scale", float("inf")),
    ("latents", torch.full((1, 64, 16), float("nan"))), ("prompt_embeds", torch.full((1, 16, 32), float("inf"))),
])
def test_the_api_refuses_non_finite_numbers_by_name(tiny_pipe, argument, value):
    kwargs = {"prompt": "a red circle"} if argument != "prompt_embeds" else {"pooled_prompt_embeds": torch.zeros(1, 32)}
    with pytest.raises(ValueError, match=rf"{argument} holds NaN or inf"):
        tiny_pipe(**kwargs, **{argument: value}, height=32, width=32, num_inference_steps=1, output_type="latent")


# -- a full disk: the path that cannot be written and why, no partial file, the old file kept ---------------------


def full_disk(monkeypatch) -> None:
    """Every write of a file's contents is cut short by ENOSPC after its first bytes, as on a full disk."""
    import builtins
    import errno
    import io

    real_open = builtins.open

    class Full(io.FileIO):
        def write(self, data):
            super().write(bytes(data)[:4])
            raise OSError(errno.ENOSPC, "No space left on device")

    def opener(file, mode="r", *args, **kwargs):
        if any(m in mode for m in "wax") and isinstance(file, (str, Path)) and not str(file).startswith("/dev"):
            handle = Full(file, mode.replace("t", "").replace("b", "").replace("+", "") or "w")
            return handle if "b" in mode else io.TextIOWrapper(handle, encoding=kwargs.get("encoding") or "utf-8",
                                                               write_through=True)
        return real_open(file, mode, *args, **kwargs)

    def save_file(tensors, filename, metadata=None):  # safetensors writes from Rust, past Python's open
        from safetensors import SafetensorError

        Path(filename).write_bytes(b"\0")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(Path, "write_text", lambda self, data, encoding=None, **k: opener(self, "w").write(data))
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: opener(self, "wb").write(data))


class FakePlanner:
    def ask(self, question, images=()):
        return json.dumps({"caption": "a cat", "entities": [{"label": "a cat", "bbox_2d": [1, 1, 30, 30]}]})


FULL_DISK = [
    # (case, argv from tmp, the file that must stay as it was)
    ("generate a PNG", lambda t: ["generate", LAYOUT, "-o", f"{t}/o.png", *FAST], "o.png"),
    ("generate a JPEG", lambda t: ["generate", LAYOUT, "-o", f"{t}/o.jpg", *FAST], "o.jpg"),
    ("lora convert", lambda t: ["lora", "convert", lora_file(t, torch.ones(2, 8), torch.ones(8, 2)),
                                f"{t}/o.safetensors", "--to", "kohya"], "o.safetensors"),
    ("plan over a layout", None, "o.json"),
    ("data generate", lambda t: ["data", "generate", write(t, "c.txt", "a red circle\n"), "--out", f"{t}/dg",
                                 *FAST], "dg/images/000000.png"),
]


@pytest.mark.parametrize(("argv", "kept"), [pytest.param(a, k, id=c) for c, a, k in FULL_DISK])
def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, capsys, monkeypatch, argv, kept):
    from eligen.data import plan

    target = tmp_path / kept
    target.parent.mkdir(parents=True, exist_ok=True)
    old = b"the previous file, which must survive"
    target.write_bytes(old)
    if argv is None:
        monkeypatch.setattr(plan, "make_backend", lambda *a, **k: FakePlanner())
        argv = lambda t: ["plan", "a cat", "-o", f"{t}/o.json", "--base-url", "http://127.0.0.1:9/v1"]  # noqa: E731
    args = argv(tmp_path)
    full_disk(monkeypatch)
    code = main(args)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 2 and f"cannot write {target}" in err and "No space left on device" in err, err
    assert "Traceback" not in err and target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_a_port_that_cannot_be_had_fails_before_the_model_loads(capsys, monkeypatch):
    import socket

    from eligen.ui import server

    monkeypatch.setattr(server, "make_app", lambda *a, **k: pytest.fail("loaded the model first"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        assert main(["ui", "--port", str(port), "--no-open"]) != 0
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "choose another --port" in err, err
    assert time.monotonic() - started < 5


def test_a_jpeg_data_uri_mask_is_read_as_a_mask(tmp_path, capsys):
    from eligen.generate import read_metadata

    assert main(["generate", jpeg_mask_layout(tmp_path), "-o", str(tmp_path / "o.png"), *FAST]) == 0
    assert read_metadata(tmp_path / "o.png")["layout"]["entities"][0]["mask"].startswith("data:image/")


def _disk_full_at_the_first_checkpoint(monkeypatch) -> None:
    from eligen.train import trainer

    def save(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(trainer.torch, "save", save)


@pytest.mark.parametrize("fill", [full_disk, _disk_full_at_the_first_checkpoint], ids=["from the start",
                                                                                       "at the first checkpoint"])
def test_training_on_a_full_disk_names_the_folder_and_leaves_no_partial_checkpoint(tmp_path, capsys, monkeypatch,
                                                                                  tiny_pipeline_dir, fill):
    from eligen.tiny.toy_data import write_box_dataset

    data = write_box_dataset(tmp_path / "toy", 4, 32, 32, seed=1)
    run = tmp_path / "run"
    argv = ["train", "--model", str(tiny_pipeline_dir), "--dataset", str(data), "--output-dir", str(run),
            "--resolution", "32", "--rank", "4", "--max-steps", "2", "--batch-size", "2", "--checkpoint-every", "1",
            "--max-sequence-length", "16", "--no-progress"]
    fill(monkeypatch)
    code = main(argv)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 2 and f"cannot write {run}" in err and "Traceback" not in err, err
    assert not list(run.glob(".tmp-*")) and not list(run.glob("checkpoint-*"))


def test_the_api_inpaints_a_2x2_input_at_its_size(tiny_pipe):
    from eligen import Entity

    image = tiny_pipe(prompt="a red circle", image=Image.new("RGB", (2, 2), "white"), inpaint=True,
                      entities=[Entity("a dog", box=(0, 0, 1, 1))], num_inference_steps=1).images[0]
    assert image.size == (2, 2)
