"""The web chat page of `llava-next serve`, driven in a real browser (Debian's chromium through selenium).

Every answer the page shows is compared with the answer the API gives for the same request, made with the
openai client against the same server; every token cost with /v1/image_tokens and with the pipeline itself.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest

import llava_next
from serve_helpers import running_server

try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # said by the `driver` fixture, which skips (or fails on CI)
    webdriver = None

SHAPES = Path(__file__).resolve().parent.parent / "examples" / "shapes.png"
MODEL = "demo"
WAIT_S = 30


def _missing(what: str) -> None:
    message = f"the browser test needs {what}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI=true, so this is a failure, not a skip)")
    pytest.skip(message)


def wait_until_loaded(base_url: str) -> None:
    """The server answers as soon as it listens; /health says 200 once its model has loaded."""
    deadline = time.monotonic() + WAIT_S
    while api(base_url, "/health")[0] != 200:
        assert time.monotonic() < deadline, "the server did not load its model"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server():
    with running_server(MODEL) as base_url:
        wait_until_loaded(base_url)
        yield base_url


@pytest.fixture(scope="module")
def demo():
    return llava_next.load(MODEL)


@pytest.fixture(scope="module")
def driver():
    if webdriver is None:
        _missing("selenium: pip install selenium")
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        _missing("Chromium and its driver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield browser
    browser.quit()


@pytest.fixture
def page(driver, server):
    """The page, freshly loaded, with nothing kept from an earlier test (settings, key)."""
    driver.get(server + "/")
    driver.execute_script("localStorage.clear()")
    driver.get(server + "/")
    return driver


# -- the API, called directly ------------------------------------------------------------------------------------------

def api(base_url: str, path: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(base_url + path, data=None if body is None else json.dumps(body).encode(),
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=WAIT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def complete(base_url: str, messages: list[dict], max_tokens: int, key: str = "unused"):
    """The non-streamed answer (text, finish reason) the page's request must stream, greedy as the page's default."""
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key=key)
    response = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, top_p=1,
                                              max_tokens=max_tokens)
    return response.choices[0].message.content, response.choices[0].finish_reason


def user(text: str, image_urls: list[str] = ()) -> dict:
    """A user turn as the page sends it: the images of the turn first, then the text."""
    if not image_urls:
        return {"role": "user", "content": text}
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


# -- the page ----------------------------------------------------------------------------------------------------------

def wait(driver, condition, what: str):
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(lambda _: condition(), message=what)


def text_of(element) -> str:
    return element.get_property("textContent")


def set_field(driver, element_id: str, value) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def attach(driver, path: Path, count: int):
    """Attach a file through #file-input; return the attachment element once the server has answered for it."""
    driver.find_element(By.ID, "file-input").send_keys(str(path))
    attachments = wait(driver, lambda: len(driver.find_elements(By.CSS_SELECTOR, "#attachments .attachment")) == count
                       and driver.find_elements(By.CSS_SELECTOR, "#attachments .attachment"), f"{path.name} attached")
    item = attachments[-1]
    wait(driver, lambda: "counting" not in text_of(item.find_element(By.CSS_SELECTOR, ".token-cost")),
         f"the token cost of {path.name}")
    return item


def data_url(attachment) -> str:
    """The data URL the page read the file into (and sends)."""
    return attachment.find_element(By.TAG_NAME, "img").get_property("src")


def answers(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#messages .message.assistant")


def ask(driver, question: str) -> str:
    """Type a question, click Send, wait for the streamed answer to finish; return its text."""
    before = len(answers(driver))
    driver.find_element(By.ID, "prompt").send_keys(question)
    driver.find_element(By.ID, "send").click()
    return finished_answer(driver, before)


def finished_answer(driver, index: int) -> str:
    answer = wait(driver, lambda: len(answers(driver)) > index and answers(driver)[index], "an answer started")
    wait(driver, lambda: answer.get_attribute("data-done") == "true", "the answer's stream finished")
    return text_of(answer.find_element(By.CSS_SELECTOR, ".content"))


def screenshot(driver, tmp_path: Path, name: str) -> None:
    directory = Path(os.environ.get("LLAVA_NEXT_SCREENSHOT_DIR") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    assert driver.save_screenshot(str(path)), f"no screenshot written to {path}"
    print(f"screenshot: {path}")


# -- tests -------------------------------------------------------------------------------------------------------------

def test_image_cost_and_streamed_answers_equal_the_api(page, server, demo, tmp_path):
    driver = page
    status, models = api(server, "/v1/models")
    assert status == 200
    model_id = models["data"][0]["id"]
    wait(driver, lambda: driver.find_element(By.ID, "model-name").text == model_id, "the model name in the header")
    set_field(driver, "max-tokens", 24)

    item = attach(driver, SHAPES, 1)
    cost = text_of(item.find_element(By.CSS_SELECTOR, ".token-cost"))
    url = data_url(item)
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == SHAPES.read_bytes()
    status, counted = api(server, "/v1/image_tokens", {"image_url": {"url": url}})
    assert status == 200, counted
    assert counted["tokens"] == demo.image_tokens(str(SHAPES))
    assert [int(word) for word in cost.split() if word.isdigit()] == [counted["tokens"]], cost

    question = "What color is the circle?"
    answer = ask(driver, question)
    history = [user(question, [url])]
    expected, _ = complete(server, history, 24)
    assert expected.strip() and answer == expected
    turn = driver.find_elements(By.CSS_SELECTOR, "#messages .message.user")[-1]
    assert len(turn.find_elements(By.TAG_NAME, "img")) == 1 and question in text_of(turn)
    assert not driver.find_elements(By.CSS_SELECTOR, "#attachments .attachment")

    # The second turn sends the whole conversation, the image in the first turn.
    follow_up = "What color is the square?"
    answer = ask(driver, follow_up)
    history += [{"role": "assistant", "content": expected}, user(follow_up)]
    expected, _ = complete(server, history, 24)
    assert expected.strip() and answer == expected
    meta = text_of(answers(driver)[-1].find_element(By.CSS_SELECTOR, ".meta"))
    assert "tokens/s" in meta and "answer tokens" in meta, meta
    screenshot(driver, tmp_path, "chat.png")


def test_keyboard_finish_reason_and_new_chat(page, server):
    driver = page
    set_field(driver, "max-tokens", 3)
    prompt = driver.find_element(By.ID, "prompt")
    prompt.send_keys("yellow yellow")
    ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
    prompt.send_keys("yellow")
    assert prompt.get_property("value") == "yellow yellow\nyellow"
    assert not driver.find_elements(By.CSS_SELECTOR, "#messages .message")
    prompt.send_keys(Keys.ENTER)
    answer = finished_answer(driver, 0)
    first = [user("yellow yellow\nyellow")]
    expected, finish_reason = complete(server, first, 3)
    assert answer == expected and finish_reason == "length"
    assert answers(driver)[0].get_attribute("data-finish-reason") == "length"
    assert "max tokens" in text_of(answers(driver)[0].find_element(By.CSS_SELECTOR, ".meta"))
    assert prompt.get_property("value") == ""

    driver.find_element(By.ID, "new-chat").click()
    assert not driver.find_elements(By.CSS_SELECTOR, "#messages .message")
    # After New chat the next question goes alone; with the old turn kept the answer would differ.
    set_field(driver, "max-tokens", 12)
    question = "What color is the <b>circle</b>?"  # markup typed by a user is text, never HTML
    alone, _ = complete(server, [user(question)], 12)
    continued, _ = complete(server, first + [{"role": "assistant", "content": expected}, user(question)], 12)
    assert alone != continued, "pick questions whose answer depends on the earlier turn"
    assert ask(driver, question) == alone
    assert len(driver.find_elements(By.CSS_SELECTOR, "#messages .message")) == 2
    turn = driver.find_element(By.CSS_SELECTOR, "#messages .message.user")
    assert text_of(turn) == question and not turn.find_elements(By.TAG_NAME, "b")


def test_stop_keeps_what_arrived_and_the_page_stays_usable(page, server):
    driver = page
    set_field(driver, "max-tokens", 900)
    long_question = "yellow yellow yellow yellow yellow yellow yellow yellow"
    driver.find_element(By.ID, "prompt").send_keys(long_question)
    driver.find_element(By.ID, "send").click()
    answer = wait(driver, lambda: answers(driver) and answers(driver)[0], "an answer started")
    content = answer.find_element(By.CSS_SELECTOR, ".content")
    wait(driver, lambda: text_of(content).strip(), "the first words of the answer")
    stop = driver.find_element(By.ID, "stop")
    assert stop.is_displayed() and not driver.find_element(By.ID, "send").is_displayed()
    stop.click()
    wait(driver, lambda: answer.get_attribute("data-done") == "true", "the stopped answer marked done")
    partial = text_of(content)
    assert answer.get_attribute("data-finish-reason") == "aborted"
    assert driver.find_element(By.ID, "send").is_displayed() and not stop.is_displayed()

    full, finish_reason = complete(server, [user(long_question)], 900)
    assert finish_reason == "length", "the long answer must outlast the click on Stop"
    assert partial.strip() and full.startswith(partial) and len(partial) < len(full)

    # The next question is answered, after the stopped turn as it was kept.
    set_field(driver, "max-tokens", 12)
    question = "What color is the circle?"
    answer = ask(driver, question)
    expected, _ = complete(server, [user(long_question), {"role": "assistant", "content": partial}, user(question)], 12)
    assert answer == expected


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds a few bytes: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_refused_images_show_the_server_message_and_keep_the_draft(page, server, tmp_path):
    driver = page
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image at all")
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header_only(100_000, 100_000))
    draft = "What is in these pictures?"
    driver.find_element(By.ID, "prompt").send_keys(draft)

    urls = []
    for count, path in enumerate((broken, huge), start=1):
        item = attach(driver, path, count)
        urls.append(data_url(item))
        status, body = api(server, "/v1/image_tokens", {"image_url": {"url": urls[-1]}})
        assert 400 <= status < 500 and body["error"]["message"], body
        assert "invalid" in item.get_attribute("class").split()
        assert text_of(item.find_element(By.CSS_SELECTOR, ".error")) == body["error"]["message"]
        assert not any(word.isdigit() for word in text_of(item.find_element(By.CSS_SELECTOR, ".token-cost")).split())

    # Sending anyway: the server's message shows in the conversation, the draft and the images come back.
    driver.find_element(By.ID, "send").click()
    error = wait(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "#messages .message.error"), "the error")[0]
    status, body = api(server, "/v1/chat/completions", {"model": MODEL, "messages": [user(draft, urls)], "stream": True,
                                                        "temperature": 0, "top_p": 1, "max_tokens": 256})
    assert 400 <= status < 500, body
    assert text_of(error) == body["error"]["message"]
    assert not driver.find_elements(By.CSS_SELECTOR, "#messages .message.user, #messages .message.assistant")
    assert driver.find_element(By.ID, "prompt").get_property("value") == draft
    assert [data_url(item) for item in driver.find_elements(By.CSS_SELECTOR, "#attachments .attachment")] == urls
    screenshot(driver, tmp_path, "refused.png")

    for _ in urls:
        driver.find_element(By.CSS_SELECTOR, "#attachments .attachment .remove").click()
    assert not driver.find_elements(By.CSS_SELECTOR, "#attachments .attachment")


def test_drop_and_paste_attach_images(page, server):
    driver = page
    png = base64.b64encode(SHAPES.read_bytes()).decode()
    # A drop on the conversation and a paste into the prompt, each carrying shapes.png as a file.
    driver.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const transfer = () => {
          const data = new DataTransfer();
          data.items.add(new File([bytes], "shapes.png", {type: "image/png"}));
          return data;
        };
        document.getElementById("messages").dispatchEvent(
          new DragEvent("drop", {bubbles: true, cancelable: true, dataTransfer: transfer()}));
        document.getElementById("prompt").dispatchEvent(
          new ClipboardEvent("paste", {bubbles: true, cancelable: true, clipboardData: transfer()}));
    """, png)
    items = wait(driver, lambda: len(driver.find_elements(By.CSS_SELECTOR, "#attachments .attachment")) == 2
                 and driver.find_elements(By.CSS_SELECTOR, "#attachments .attachment"), "two attachments")
    status, counted = api(server, "/v1/image_tokens", {"image_url": {"url": "data:image/png;base64," + png}})
    assert status == 200, counted
    for item in items:
        assert data_url(item) == "data:image/png;base64," + png
        cost = item.find_element(By.CSS_SELECTOR, ".token-cost")
        wait(driver, lambda: str(counted["tokens"]) in text_of(cost).split(), "the token cost of a dropped image")


def test_api_key_asked_on_401_kept_and_sent(driver, tmp_path):
    key = "page-test-key"
    with running_server(MODEL, api_key=key) as server:
        driver.get(server + "/")
        driver.execute_script("localStorage.clear()")
        driver.get(server + "/")
        panel = driver.find_element(By.ID, "api-key-panel")
        wait(driver, panel.is_displayed, "the API key field, after /v1/models answered 401")
        set_field(driver, "max-tokens", 8)
        question = "What color is the circle?"
        driver.find_element(By.ID, "prompt").send_keys(question)
        driver.find_element(By.ID, "send").click()
        error = wait(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "#messages .message.error"), "the 401")[0]
        status, body = api(server, "/v1/chat/completions", {"model": MODEL, "messages": [user(question)]})
        assert status == 401 and text_of(error) == body["error"]["message"]
        assert driver.find_element(By.ID, "prompt").get_property("value") == question

        driver.find_element(By.ID, "api-key").send_keys(key)
        driver.find_element(By.ID, "save-api-key").click()
        assert not panel.is_displayed()
        assert driver.execute_script("return localStorage.getItem('llava-next.api-key')") == key
        wait(driver, lambda: driver.find_element(By.ID, "model-name").text == MODEL, "the model name, with the key")
        item = attach(driver, SHAPES, 1)
        url = data_url(item)
        status, counted = api(server, "/v1/image_tokens", {"image_url": {"url": url}}, key)
        assert status == 200 and str(counted["tokens"]) in text_of(item.find_element(By.CSS_SELECTOR, ".token-cost"))
        driver.find_element(By.ID, "send").click()
        answer = finished_answer(driver, 0)
        expected, _ = complete(server, [user(question, [url])], 8, key)
        assert answer == expected
