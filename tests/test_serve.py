"""`mllm serve` as users would use it: started as a command, talked to with the real `openai` client.

One server for the module (a tiny random model; fast), started with `--port 0` (the start line names the
port) and small limits so the bad-input cases are cheap to send. Greedy answers are checked against
`mllm chat` for the same image and prompt, and against themselves under load (16 clients x 4 requests,
batched together by the server). Every bad request gets a 4xx with a message and the server goes on.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from browser import artefact_dir, browser_page
from conftest import TINY_LM, TINY_TOWER
from helpers import subprocess_env
from PIL import Image

pytest.importorskip("fastapi", reason="mllm serve needs the `serve` extra (pip install -e '.[serve]')")
openai = pytest.importorskip("openai", reason="the API tests use the openai client (pip install -e '.[dev]')")

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "What color is the circle?",
    "How many shapes are there?",
    "Describe the image briefly.",
    "What shape is the blue object?",
    "Is the triangle pointing up or down?",
    "red",
    "What shape is it? triangle or square",
    "2",
]


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def scene(seed: int, size: int = 48) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """A saved tiny model (weights drawn wide enough that answers differ by prompt) and an image root."""
    from encoders.towers import TowerConfig
    from mllm.model import MultimodalLM, build_lm

    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    lm = build_lm(None, dict(TINY_LM, initializer_range=0.2), len(tokenizer))
    model = MultimodalLM.build(
        TowerConfig(type="clip", config=TINY_TOWER, select_layer=-1),
        "mlp2x_gelu",
        lm,
        tokenizer,
        template="chatml",
        max_length=128,
    )
    model.save_pretrained(root / "model")
    images = root / "images"
    images.mkdir()
    for k in range(2):
        scene(k).save(images / f"{k}.png")
    (root / "secret.png").write_bytes(png_bytes(scene(9)))  # beside the root, not under it
    return root


@pytest.fixture(scope="module")
def server(world):
    cmd = [
        sys.executable,
        "-m",
        "mllm.cli",
        "serve",
        "--model",
        str(world / "model"),
        "--name",
        "tiny",
        "--port",
        "0",
        "--image-root",
        str(world / "images"),
        "--max-image-bytes",
        "100000",
        "--max-body-bytes",
        "400000",
        "--max-batch",
        "16",
    ]
    # stderr to a file, not a pipe: a pipe that nobody reads fills up and stalls the server
    log = open(world / "serve.log", "w")
    proc = subprocess.Popen(
        cmd, env=subprocess_env(REPO), stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1
    )
    line = proc.stdout.readline()  # "serving 'tiny' at http://127.0.0.1:PORT (...)", once the socket is bound
    if "http://" not in line:
        proc.kill()
        pytest.fail(f"mllm serve did not start: {line!r}\n{(world / 'serve.log').read_text()[-3000:]}")
    url = line.split(" at ", 1)[1].split()[0]
    for _ in range(300):  # the socket is bound; the app answers once uvicorn runs
        try:
            urllib.request.urlopen(url + "/health", timeout=5).read()
            break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    yield url, line
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, prompt: str, image: str | None = None, stream: bool = False, **kw):
    content = (
        prompt
        if image is None
        else [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": prompt}]
    )
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], stream=stream, **kw
    )


def streamed(client, prompt: str, image: str | None = None, **kw) -> tuple[str, str | None]:
    text, finish = [], None
    for chunk in ask(client, prompt, image, stream=True, **kw):
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(text), finish


def post_raw(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(
        url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_binds_localhost_and_lists_its_model(server, client):
    from mllm.cli import build_parser

    assert build_parser().parse_args(["serve", "--model", "m"]).host == "127.0.0.1"
    assert server[1].startswith("serving 'tiny' at http://127.0.0.1:")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with urllib.request.urlopen(server[0] + "/") as r:  # the chat page, one file with no outside resources
        page = r.read().decode()
    assert "mllm chat" in page and not any(f'{a}="http' in page for a in ("src", "href"))


def test_greedy_answer_is_mllm_chats(world, client):
    """The same image and prompt, greedy: `mllm chat` prints exactly what the API returns, streamed or not,
    whether the image comes as a data URI or as a path under the image root."""
    image = world / "images" / "0.png"
    prompt = "What color is the circle?"
    chat = subprocess.run(
        [sys.executable, "-m", "mllm.cli", "chat", "--model", str(world / "model"), "--image", str(image),
         "--prompt", prompt, "--max-new-tokens", "16"],
        env=subprocess_env(REPO), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr[-2000:]
    expected = chat.stdout[:-1]  # `mllm chat` ends the answer with a newline
    assert expected.strip()
    via_uri = ask(client, prompt, data_uri(image.read_bytes()), temperature=0, max_tokens=16)
    assert via_uri.choices[0].message.content == expected
    assert via_uri.usage.completion_tokens <= 16 and via_uri.usage.prompt_tokens > 16  # image positions count
    assert streamed(client, prompt, data_uri(image.read_bytes()), temperature=0, max_tokens=16)[0] == expected
    via_path = ask(client, prompt, str(image), temperature=0, max_tokens=16)
    assert via_path.choices[0].message.content == expected
    via_file_url = ask(client, prompt, image.as_uri(), temperature=0, max_tokens=16)
    assert via_file_url.choices[0].message.content == expected


def test_max_tokens_stop_and_sampling(client):
    full = ask(client, PROMPTS[0], temperature=0, max_tokens=12)
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason in ("stop", "length")
    short = ask(client, PROMPTS[0], temperature=0, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert text.startswith(short.choices[0].message.content)
    cut = next(k for k in range(1, len(text)) if text[k].strip())  # a stop string from inside the answer
    stop = text[cut : cut + 2]
    stopped = ask(client, PROMPTS[0], temperature=0, max_tokens=12, stop=[stop])
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    assert streamed(client, PROMPTS[0], temperature=0, max_tokens=12, stop=stop) == (
        text[: text.index(stop)],
        "stop",
    )
    sampled = ask(client, PROMPTS[0], temperature=1.5, top_p=0.9, max_tokens=8)
    assert sampled.usage.completion_tokens <= 8
    chunks = list(
        ask(
            client,
            PROMPTS[1],
            stream=True,
            temperature=0,
            max_tokens=4,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].choices == []


def test_bad_requests_get_4xx_with_a_message_and_the_server_goes_on(world, server, client):
    url = server[0]
    big = png_bytes(scene(1, size=256))  # noise: about 197 KB of PNG, over --max-image-bytes 100000
    assert len(big) > 100_000
    cases = {
        "oversized image": (ask, (client, "hi", data_uri(big)), openai.BadRequestError, "bytes"),
        "non-image data URI": (ask, (client, "hi", data_uri(b"hello", "text/plain")), openai.BadRequestError, "not an image"),
        "undecodable image": (ask, (client, "hi", data_uri(b"not a png")), openai.BadRequestError, "cannot decode"),
        "path outside the root": (ask, (client, "hi", str(world / "secret.png")), openai.BadRequestError, "outside the image root"),
        "path escaping the root": (ask, (client, "hi", str(world / "images" / ".." / "secret.png")), openai.BadRequestError, "outside"),
        "a URL to fetch": (ask, (client, "hi", "http://example.com/a.png"), openai.BadRequestError, "does not fetch"),
        "unknown model": (
            lambda: client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}]),
            (), openai.NotFoundError, "does not exist",
        ),
        "too long a prompt": (ask, (client, "red " * 400), openai.BadRequestError, "maximum context length"),
        "image marker in text": (ask, (client, "<image> what?"), openai.BadRequestError, "<image>"),
        "two images": (
            lambda: client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": str(world / "images" / "0.png")}},
                {"type": "image_url", "image_url": {"url": str(world / "images" / "1.png")}}]}]),
            (), openai.BadRequestError, "at most 1",
        ),
        "n > 1": (ask, (client, "hi"), openai.BadRequestError, "n:"),
        "temperature out of range": (ask, (client, "hi"), openai.BadRequestError, "temperature"),
    }  # fmt: skip
    extra = {"n > 1": {"n": 2}, "temperature out of range": {"temperature": 3}}
    for name, (fn, args, exc, needle) in cases.items():
        with pytest.raises(exc) as e:
            fn(*args, **extra.get(name, {}))
        assert 400 <= e.value.status_code < 500 and needle in str(e.value), (name, str(e.value))
    status, body = post_raw(url, b'{"model": "tiny", "messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post_raw(url, b'["a list"]')
    assert status == 400 and "JSON object" in body["error"]["message"]
    status, body = post_raw(url, json.dumps({"model": "tiny", "messages": "hi"}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = post_raw(url, b"{" + b" " * 500_000 + b"}")  # over --max-body-bytes
    assert status == 413 and "limit" in body["error"]["message"]
    with pytest.raises(urllib.error.HTTPError) as nope:
        urllib.request.urlopen(url + "/v1/nope")
    assert nope.value.code == 404 and "Not Found" in json.loads(nope.value.read())["error"]["message"]
    ok = ask(client, PROMPTS[1], temperature=0, max_tokens=4)  # still serving
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_sixteen_clients_four_requests_each(world, server, client):
    """64 requests from 16 threads, streamed and not, with and without an image: every answer is the one
    the same request gets alone, and the server batched requests that arrived together."""
    images = [data_uri((world / "images" / f"{k}.png").read_bytes()) for k in range(2)]
    jobs = [(PROMPTS[k % len(PROMPTS)], images[k % 2] if k % 3 else None) for k in range(16)]
    alone = {job: ask(client, *job, temperature=0, max_tokens=10).choices[0].message.content for job in jobs}
    results: dict[tuple[int, int], str] = {}
    errors: list[BaseException] = []

    def work(c: int) -> None:
        try:
            mine = openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=300)
            for r in range(4):
                prompt, image = jobs[(c + r) % len(jobs)]
                if (c + r) % 2:
                    results[c, r] = streamed(mine, prompt, image, temperature=0, max_tokens=10)[0]
                else:
                    results[c, r] = (
                        ask(mine, prompt, image, temperature=0, max_tokens=10).choices[0].message.content
                    )
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    before = json.loads(urllib.request.urlopen(server[0] + "/health").read())
    threads = [threading.Thread(target=work, args=(c,)) for c in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[:3]
    assert len(results) == 64
    for (c, r), text in results.items():
        assert text == alone[jobs[(c + r) % len(jobs)]], (c, r)
    after = json.loads(urllib.request.urlopen(server[0] + "/health").read())
    assert after["requests"] - before["requests"] == 64
    assert after["batches"] - before["batches"] < 64 and after["largest_batch"] > 1  # requests were batched


def test_chat_page_answers_in_a_browser(world, server, client, tmp_path_factory):
    """The chat page in headless Chromium: attach an image, ask, the answer streams into the page, and it
    is the API's greedy answer to the same request."""
    image = world / "images" / "1.png"
    prompt = PROMPTS[3]
    expected = (
        ask(client, prompt, data_uri(image.read_bytes()), temperature=0, max_tokens=16)
        .choices[0]
        .message.content
    )
    with browser_page(1000, 700) as page:
        page.goto(server[0] + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
        page.fill("#max-tokens", "16")
        page.set_input_files("#image", str(image))
        page.wait_for_selector("#preview[src^='data:image/png']")
        page.fill("#prompt", prompt)
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-state=done]", timeout=60_000)
        shown = page.eval_on_selector(".msg.assistant", "el => el.textContent")
        page.screenshot(path=str(artefact_dir(tmp_path_factory) / "chat-page.png"))
        assert shown == expected and page.errors == []
        page.fill("#prompt", "<image> again")  # an error is shown in the page, and the page goes on
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-state=error]", timeout=60_000)
        assert "<image>" in page.inner_text(".msg.assistant.error")


def test_row_helpers():
    """The pieces a batch is made of: held-back text before a stop string, per-row sampling."""
    from mllm.serving.engine import RowSampling, held_back

    assert held_back("the answer is", 0, ["is it"]) == 2 and held_back("the answer", 0, ["is"]) == 0
    assert held_back("x <|e", 0, ["<|end|>", "\n\n"]) == 3 and held_back("ab", 2, ["b"]) == 0
    scores = torch.tensor([[0.1, 3.0, 2.9], [0.1, 3.0, 2.9]])
    out = RowSampling([0.0, 2.0], [1.0, 1.0])(None, scores)
    assert out[0].argmax() == 1 and torch.isinf(out[0]).sum() == 2  # greedy: its argmax alone
    assert torch.allclose(out[1], scores[1] / 2)  # sampled: its own temperature
    nucleus = RowSampling([1.0], [0.5])(None, torch.tensor([[5.0, 1.0, 0.0]]))
    assert torch.isinf(nucleus[0]).tolist() == [False, True, True]
