"""ldmseg serve on a real Serve application (session Ray, loopback port): answers, determinism, the
PNG against the JSON, inpainting, and a corpus of bad requests that must all get their 4xx."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from urllib.parse import urlparse

import numpy as np
import pytest
import requests
from PIL import Image

from ldmseg.data.ids import decode_panoptic_png, id_to_rgb
from ldmseg.data.segments import segments_info

pytestmark = pytest.mark.ray


def png(array: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **options)
    return buf.getvalue()


def scene(seed: int = 0, h: int = 48, w: int = 64) -> np.ndarray:
    """(h, w, 3) uint8: flat rectangles on a background."""
    rng = np.random.default_rng(seed)
    image = np.full((h, w, 3), rng.integers(0, 255, 3), dtype=np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        image[y:y + h // 2, x:x + w // 2] = rng.integers(0, 255, 3)
    return image


def segment(url: str, data: bytes, **params) -> requests.Response:
    return requests.post(f"{url}/v1/segment", files={"image": ("x.png", data, "image/png")}, params=params, timeout=120)


def test_segment_answers_json_whose_png_holds_exactly_its_segments(served):
    url, info = served
    r = segment(url, png(scene(1)), seed=4, count_th=0.0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-request-id"] == body["request_id"]
    assert (body["width"], body["height"]) == (64, 48) and body["steps"] == info["sampling"]["steps"]
    ids = decode_panoptic_png(base64.b64decode(body["id_map_png"]))
    assert ids.shape == (48, 64)
    expected = [{k: s[k] for k in ("id", "area", "bbox")} for s in segments_info(ids)]
    assert [{k: s[k] for k in ("id", "area", "bbox")} for s in body["segments"]] == expected
    assert set(np.unique(ids)) - {0} == {s["id"] for s in body["segments"]}
    assert all(0.0 <= s["score"] <= 1.0 for s in body["segments"])


def test_same_seed_same_map_raw_body_and_png_answer(served):
    url, _ = served
    data = png(scene(2))
    first = segment(url, data, seed=9).json()
    again = requests.post(f"{url}/v1/segment", data=data, headers={"Content-Type": "image/png"},
                          params={"seed": 9}, timeout=120).json()
    assert first["id_map_png"] == again["id_map_png"]
    as_png = requests.post(f"{url}/v1/segment", data=data, params={"seed": 9}, timeout=120,
                           headers={"Content-Type": "image/png", "Accept": "image/png"})
    assert as_png.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(decode_panoptic_png(as_png.content),
                                  decode_panoptic_png(base64.b64decode(first["id_map_png"])))
    assert json.loads(as_png.headers["x-segments"]) == first["segments"]


def test_concurrent_requests_are_batched_and_keep_their_own_maps(served):
    from concurrent.futures import ThreadPoolExecutor

    url, _ = served
    images = [png(scene(s)) for s in range(6)]
    alone = [segment(url, d, seed=s).json()["id_map_png"] for s, d in enumerate(images)]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda sd: segment(url, sd[1], seed=sd[0]).json(), enumerate(images)))
    assert [t["id_map_png"] for t in together] == alone  # a map does not depend on its batch
    assert max(t["batch_size"] for t in together) > 1


def test_stability_scores_with_samples(served):
    url, _ = served
    body = segment(url, png(scene(3)), seed=1, samples=3, count_th=0.0).json()
    assert all(s["stability"] in (1 / 3, 2 / 3, 1.0) for s in body["segments"])


def test_inpainting_keeps_the_known_segments(served):
    url, _ = served
    image = scene(4)
    partial = np.zeros(image.shape[:2], dtype=np.int64)
    partial[:, :20] = 7  # one known segment on the left; the rest unknown
    r = requests.post(f"{url}/v1/inpaint", params={"seed": 2}, timeout=120,
                      files={"image": ("i.png", png(image), "image/png"),
                             "map": ("m.png", png(id_to_rgb(partial)), "image/png")})
    assert r.status_code == 200, r.text
    ids = decode_panoptic_png(base64.b64decode(r.json()["id_map_png"]))
    assert ids.shape == partial.shape
    assert len(np.unique(ids[:, :20])) == 1 and ids[0, 0] != 0  # the known region stays one segment


def test_model_info_health_and_page(served):
    url, info = served
    got = requests.get(f"{url}/v1/model", timeout=10).json()
    assert got["model"] == info["model"] and "ddim" in got["samplers"] and got["limits"]["max_steps"] == 100
    assert requests.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
    assert requests.get(f"{url}/readyz", timeout=10).status_code == 200
    page = requests.get(f"{url}/", timeout=10)
    assert page.status_code == 200 and "<canvas" in page.text and "http" not in page.text.split("<script>")[1]
    spec = requests.get(f"{url}/openapi.json", timeout=10).json()
    assert {"/v1/segment", "/v1/inpaint", "/v1/model", "/healthz", "/readyz"} <= set(spec["paths"])


def bad_requests(url: str) -> list[tuple[str, int, str, dict]]:
    """(what, expected status, expected error code, requests.request keyword arguments)."""
    good = png(scene(5))
    jpeg = png(scene(5), "JPEG", quality=90)
    ids = png(id_to_rgb(np.ones((48, 64), dtype=np.int64)))
    seg, inp = f"{url}/v1/segment", f"{url}/v1/inpaint"

    def up(data, name="x.png", ctype="image/png", **params):
        return {"method": "POST", "url": seg, "files": {"image": (name, data, ctype)}, "params": params}

    def inpaint(files, **params):
        return {"method": "POST", "url": inp, "files": files, "params": params}

    bomb = Image.new("L", (2100, 2100))
    return [
        ("not an image", 422, "not_an_image", up(b"hello, this is text")),
        ("zero bytes", 400, "empty", up(b"")),
        ("truncated PNG", 422, "truncated", up(good[: len(good) // 2])),
        ("truncated JPEG", 422, "truncated", up(jpeg[: len(jpeg) // 2], "x.jpg", "image/jpeg")),
        ("a GIF", 422, "unsupported_format", up(png(scene(5), "GIF"), "x.gif", "image/gif")),
        ("too many pixels", 413, "too_many_pixels", up(png(np.asarray(bomb)))),
        ("raw body, no content type", 415, "missing_content_type",
         {"method": "POST", "url": seg, "data": good, "headers": {"Content-Type": ""}}),
        ("raw body, wrong content type", 415, "unsupported_content_type",
         {"method": "POST", "url": seg, "data": good, "headers": {"Content-Type": "text/plain"}}),
        ("JSON body", 415, "unsupported_content_type", {"method": "POST", "url": seg, "json": {"image": "x"}}),
        ("multipart without image", 400, "missing_image",
         {"method": "POST", "url": seg, "files": {"seed": (None, "1")}}),
        ("multipart with another file", 400, "unexpected_file",
         {"method": "POST", "url": seg, "files": {"picture": ("x.png", good, "image/png")}}),
        ("broken multipart", 400, "missing_image",
         {"method": "POST", "url": seg, "data": b"--x\r\nnonsense",
          "headers": {"Content-Type": "multipart/form-data; boundary=x"}}),
        ("unknown sampler", 400, "unknown_sampler", up(good, sampler="magic")),
        ("steps 0", 400, "steps_out_of_range", up(good, steps=0)),
        ("steps 1000", 400, "steps_out_of_range", up(good, steps=1000)),
        ("steps not a number", 400, "bad_parameter", up(good, steps="ten")),
        ("negative seed", 400, "seed_out_of_range", up(good, seed=-1)),
        ("threshold above 1", 400, "threshold_out_of_range", up(good, count_th=2)),
        ("threshold nan", 400, "threshold_out_of_range", up(good, mask_th="nan")),
        ("samples 100", 400, "samples_out_of_range", up(good, samples=100)),
        ("unknown parameter", 400, "unknown_parameter", up(good, colour="red")),
        ("inpaint without map", 400, "missing_map", inpaint({"image": ("x.png", good, "image/png")})),
        ("inpaint map of another size", 422, "map_size_mismatch",
         inpaint({"image": ("x.png", good, "image/png"),
                  "map": ("m.png", png(id_to_rgb(np.ones((10, 10), dtype=np.int64))), "image/png")})),
        ("inpaint map not a PNG", 415, "map_not_png",
         inpaint({"image": ("x.png", good, "image/png"), "map": ("m.jpg", jpeg, "image/jpeg")})),
        ("inpaint map of mode I;16", 422, "unsupported_mode",
         inpaint({"image": ("x.png", good, "image/png"),
                  "map": ("m.png", png(np.ones((48, 64), dtype=np.uint16)), "image/png")})),
        ("inpaint with samples", 400, "samples_not_supported",
         inpaint({"image": ("x.png", good, "image/png"), "map": ("m.png", ids, "image/png")}, samples=2)),
        ("GET on a POST route", 405, "method_not_allowed", {"method": "GET", "url": seg}),
        ("unknown route", 404, "not_found", {"method": "GET", "url": f"{url}/v2/segment"}),
    ]


def test_every_bad_request_gets_its_4xx_and_the_server_stays_ready(served):
    url, _ = served
    corpus = bad_requests(url)
    assert len(corpus) >= 20
    got = {}
    for what, status, code, kwargs in corpus:
        r = requests.request(timeout=60, **kwargs)
        body = r.json()
        got[what] = (r.status_code, body.get("error"))
        assert body.get("request_id") == r.headers.get("x-request-id"), what
        assert body.get("detail"), what
    assert got == {what: (status, code) for what, status, code, _ in corpus}
    assert requests.get(f"{url}/readyz", timeout=10).status_code == 200


def test_an_oversized_upload_gets_413_within_a_second_without_sending_it(served):
    """The client declares 50 MB and sends 64 KB of it: the answer comes before the rest."""
    url, _ = served
    host = urlparse(url)
    with socket.create_connection((host.hostname, host.port), timeout=10) as sock:
        t0 = time.perf_counter()
        sock.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 50000000\r\n\r\n" + b"\0" * 65536)
        answer = ""
        while "request_too_large" not in answer and time.perf_counter() - t0 < 5:
            data = sock.recv(65536)
            if not data:
                break
            answer += data.decode("latin-1")
        elapsed = time.perf_counter() - t0
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    assert elapsed < 1.0 and "request_too_large" in answer
    # a chunked body without Content-Length is counted while it is read
    def chunks():
        for _ in range(40):
            yield b"\0" * 100_000

    r = requests.post(f"{url}/v1/segment", data=chunks(), headers={"Content-Type": "image/png"}, timeout=30)
    assert (r.status_code, r.json()["error"]) == (413, "request_too_large")
    assert requests.get(f"{url}/readyz", timeout=10).status_code == 200


def test_overload_answers_503_with_retry_after_and_slow_requests_504(served, tiny_model):
    """A second application with one slot and a one-request queue: a burst gets 503s; a request
    past its timeout gets 504 with a clear body; the main application stays ready."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from pipelines.serve import start

    url, _ = served
    start(tiny_model[0], port=urlparse(url).port, name="tight", route_prefix="/tight",
          overrides=["sampling.steps=100", "serve.max_batch_size=1", "serve.max_ongoing_requests=1",
                     "serve.max_queued_requests=1", "serve.request_timeout_s=0.5", "serve.max_steps=200",
                     "serve.retry_after_s=3"])
    try:
        data = png(scene(6, 240, 320))
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: requests.post(f"{url}/tight/v1/segment", data=data, timeout=60,
                                                            headers={"Content-Type": "image/png"}), range(8)))
        codes = sorted(r.status_code for r in answers)
        assert 503 in codes and set(codes) <= {200, 503, 504}, codes
        busy = next(r for r in answers if r.status_code == 503)
        assert busy.headers["retry-after"] == "3" and busy.json()["error"] == "overloaded"
        slow = requests.post(f"{url}/tight/v1/segment", data=data, params={"steps": 200, "samples": 8}, timeout=60,
                             headers={"Content-Type": "image/png"})
        assert (slow.status_code, slow.json()["error"]) == (504, "timeout")
        assert "serve.request_timeout_s" in slow.json()["detail"]
    finally:
        serve.delete("tight")
    assert requests.get(f"{url}/readyz", timeout=10).status_code == 200


def test_the_command_serves_until_ctrl_c_then_shuts_down(tiny_model, tmp_path):
    """``ldmseg serve`` in its own process (and its own local Ray): ready, answers, and Ctrl-C ends it with 0."""
    import os
    import signal
    import subprocess
    import sys

    from helpers_net import free_port
    from paths import REPO

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--model", tiny_model[0], "--port",
                             str(port), "sampling.steps=2"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=open(tmp_path / "serve.log", "wb"), text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or the model still loading
                pass
            assert time.time() < deadline, "not ready in 180 s"
            time.sleep(0.5)
        first = json.loads(proc.stdout.readline())
        assert first["url"] == f"http://127.0.0.1:{port}/" and first["model"] == tiny_model[0]
        assert segment(f"http://127.0.0.1:{port}", png(scene(7))).status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
