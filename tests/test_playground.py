"""The browser playground and `clipserve demo`: the page and its assets as the server serves them, and
end-to-end runs in headless Chromium against a real server on loopback with the trained digits model."""

from __future__ import annotations

import argparse
import http.server
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import httpx
import pytest
from browser import PHONE, chromium, open_page, screenshot
from fastapi.testclient import TestClient
from test_server_support import API_KEY, AUTH, encode, live_server, settings_for

from clipserve.api import create_app
from clipserve.api.playground import (
    ASSETS_PATH,
    CONTENT_SECURITY_POLICY,
    STATIC_DIR,
)
from clipserve.cli import demo
from clipserve.cli.main import CLIError
from clipserve.collections import CollectionStore, query_vector
from clipserve.io.fetch import FetchPolicy
from clipserve.train.digits import CLASSNAMES, TEMPLATES, load_split


def playground_client(tmp_path: Path, model, **overrides) -> TestClient:
    return TestClient(create_app(settings_for(tmp_path, **overrides), {"tiny": model}))


# -- the page and its assets ------------------------------------------------------------------------------


def test_page_is_public_and_says_what_the_server_offers(tmp_path: Path, tiny_model) -> None:
    with playground_client(tmp_path, tiny_model) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert 'data-auth="required"' in page.text and 'data-url-fetch="disabled"' in page.text
        assert client.get("/v1/models").status_code == 401  # the page is public, the API is not
    fetching = FetchPolicy(enabled=True, allowed_hosts=("images.example.org",))
    with playground_client(
        tmp_path / "open",
        tiny_model,
        fetch=fetching,
        auth=replace(settings_for(tmp_path).auth, api_keys=(), no_auth=True),
    ) as client:
        page = client.get("/").text
        assert 'data-auth="none"' in page and 'data-url-fetch="enabled"' in page


def test_assets_come_from_the_package_and_nothing_from_elsewhere(tmp_path: Path, tiny_model) -> None:
    page_assets = re.findall(r'(?:href|src)="(/[^"]+)"', (STATIC_DIR.parent / "index.html").read_text())
    assert sorted(page_assets) == [f"{ASSETS_PATH}/playground.css", f"{ASSETS_PATH}/playground.js"]
    with playground_client(tmp_path, tiny_model) as client:
        for path, kind in zip(sorted(page_assets), ("text/css", "text/javascript"), strict=True):
            response = client.get(path)
            assert response.status_code == 200 and response.headers["content-type"].startswith(kind), path
        assert client.get(f"{ASSETS_PATH}/missing.js").json()["error"]["type"] == "not_found_error"
    for asset in [STATIC_DIR.parent / "index.html", *STATIC_DIR.iterdir()]:
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", asset.read_text()), (
            f"external URL in {asset}"
        )


# -- clipserve demo -----------------------------------------------------------------------------------------


def test_demo_collection_is_filled_once_and_served(
    tmp_path: Path, digits_checkpoint: Path, digits_model
) -> None:
    store = CollectionStore(tmp_path / "collections")
    sources = demo.demo_sources()
    assert len(sources) == len(load_split("heldout").images) + len(demo.PHOTOS)
    first = demo.fill_demo_collection(store, digits_model, digits_checkpoint).count()
    assert first == len({s.data for s in sources})  # every distinct image, nothing skipped but duplicates
    assert demo.fill_demo_collection(store, digits_model, digits_checkpoint).count() == first  # reused as is

    app = demo.demo_app(digits_checkpoint, digits_model, store, API_KEY, tmp_path / "state")
    with TestClient(app) as client:
        assert 'data-auth="required"' in client.get("/").text
        (card,) = client.get("/v1/collections", headers=AUTH).json()["data"]
        assert (card["id"], card["items"]) == (demo.COLLECTION, first)
        assert [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]] == [demo.MODEL_ALIAS]
    store.close()


def test_demo_refuses_a_taken_port_in_one_line(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    demo.register(parser.add_subparsers())
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        args = parser.parse_args(["demo", "--port", str(port), "--cache", str(tmp_path)])
        with pytest.raises(CLIError, match=rf"cannot listen on 127\.0\.0\.1:{port}: .*pass another --port"):
            args.func(args)
    assert not any(tmp_path.iterdir())  # refused before training anything


# -- in the browser ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    url: str
    store: CollectionStore
    model: object  # the digits Model


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, digits_checkpoint: Path, digits_model, tiny_model
) -> Iterator[Served]:
    """The digits model (and the tiny one, to compare) behind a real server with the demo collection."""
    tmp = tmp_path_factory.mktemp("playground")
    store = CollectionStore(tmp / "collections")
    demo.fill_demo_collection(store, digits_model, digits_checkpoint)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLIPSERVE_COLLECTIONS", str(store.root))  # where the server's collection routes look
        # URL fetching on, for loopback only (the test-only override), so the page offers image URLs.
        fetching = FetchPolicy(enabled=True, allowed_hosts=("127.0.0.1",), allow_loopback=True)
        with live_server(
            settings_for(tmp, fetch=fetching), {"digits": digits_model, "tiny": tiny_model}
        ) as url:
            yield Served(url, store, digits_model)
    store.close()


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def digit(digits_model) -> tuple[bytes, int]:
    """A held-out digit (PNG) that the model classifies right with a clear margin, and its label."""
    heldout = load_split("heldout")
    probabilities = digits_model.classify(heldout.images[:40], CLASSNAMES, TEMPLATES)
    top2 = probabilities.topk(2, dim=1)
    for i, label in enumerate(heldout.labels[:40]):
        if top2.indices[i, 0] == label and top2.values[i, 0] - top2.values[i, 1] > 0.2:
            return encode(heldout.images[i]), label
    raise AssertionError("the digits model classifies none of the first 40 held-out digits clearly")


def use_key(page, key: str = API_KEY) -> None:
    from playwright.sync_api import expect

    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Use key").click()
    if key == API_KEY:
        expect(page.locator("#key-status")).to_have_text("Connected: 2 models (digits, tiny).")


def fill_digit_task(panel, digit: tuple[bytes, int]) -> None:
    panel.get_by_label("Image file").set_input_files(
        files=[{"name": "digit.png", "mimeType": "image/png", "buffer": digit[0]}]
    )
    panel.get_by_label("Candidate labels").fill(", ".join(CLASSNAMES))
    panel.get_by_label("Custom").check()
    panel.get_by_label("Templates, one per line").fill("\n".join(TEMPLATES))


@pytest.mark.slow
def test_classify_a_digit_ranks_its_label_first_and_the_snippet_reproduces_it(
    served: Served,
    browser,
    digit: tuple[bytes, int],
    artifacts_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from playwright.sync_api import expect

    with open_page(browser, served.url) as page:
        use_key(page)
        panel = page.locator("#panel-classify")
        fill_digit_task(panel, digit)
        panel.get_by_role("button", name="Classify", exact=True).click()
        rows = panel.locator(".ranking li")
        expect(rows).to_have_count(len(CLASSNAMES))
        expect(rows.first.locator(".label")).to_have_text(str(digit[1]))
        expect(rows.first.locator(".numbers")).to_have_text(re.compile(r"^\d+\.\d% · cos -?\d\.\d{3}$"))
        assert float(rows.first.locator(".bar > span").evaluate("e => parseFloat(e.style.width)")) > 20
        curl = page.locator("#snippet-curl").text_content()
        assert f"{served.url}/v1/classifications/upload" in curl and "-F 'files=@digit.png'" in curl
        assert (
            f"--form-string 'labels={digit[1]}'" in curl
            and "$CLIPSERVE_API_KEY" in curl
            and API_KEY not in curl
        )
        snippet = page.locator("#snippet-python").text_content()
        screenshot(page, artifacts_dir, "classify-desktop")

    # The Python snippet, run as it is shown, asks the server the same question and gets the same answer.
    (tmp_path / "digit.png").write_bytes(digit[0])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLIPSERVE_API_KEY", API_KEY)
    exec(compile(snippet, "snippet.py", "exec"), {})
    assert capsys.readouterr().out.splitlines()[0].split()[0] == str(digit[1])


@pytest.fixture
def image_host(tmp_path: Path, digit: tuple[bytes, int]) -> Iterator[str]:
    """A loopback web server with the digit at /digit.png; yields its URL."""
    (tmp_path / "digit.png").write_bytes(digit[0])
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/digit.png"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_classify_an_image_url_the_server_fetches(
    served: Served, browser, digit: tuple[bytes, int], image_host: str
) -> None:
    from playwright.sync_api import expect

    image_origin = image_host.removesuffix("/digit.png")
    with open_page(browser, served.url, also_allowed=(image_origin,)) as page:  # the browser shows a preview
        use_key(page)
        panel = page.locator("#panel-classify")
        fill_digit_task(panel, digit)
        panel.get_by_role("button", name="Clear image").click()
        panel.get_by_label("or an image URL").fill(image_host)
        panel.get_by_label("or an image URL").press("Tab")
        panel.get_by_role("button", name="Classify", exact=True).click()
        expect(panel.locator(".ranking li").first.locator(".label")).to_have_text(str(digit[1]))
        curl = page.locator("#snippet-curl").text_content()
        assert f"{served.url}/v1/classifications'" in curl and f'"input":"{image_host}"' in curl
        assert f'"input": "{image_host}"' in page.locator("#snippet-python").text_content()


@pytest.mark.slow
def test_search_by_image_text_and_similar_items(served: Served, browser, artifacts_dir: Path) -> None:
    from playwright.sync_api import expect

    astronaut = next(s for s in demo.demo_sources() if s.name == "scikit-image/astronaut.jpg")
    collection = served.store.open(demo.COLLECTION)
    query = "a handwritten 7"
    expected = collection.search(query_vector(served.model, collection.manifest, text=query), top_k=1)[0].item
    with open_page(browser, served.url) as page:
        use_key(page)
        page.get_by_role("tab", name="Search").click()
        panel = page.locator("#panel-search")
        expect(panel.get_by_label("Collection")).to_have_value(demo.COLLECTION)
        panel.get_by_label("Image file").set_input_files(
            files=[{"name": "astronaut.jpg", "mimeType": "image/jpeg", "buffer": astronaut.data}]
        )
        panel.get_by_role("button", name="Search", exact=True).click()
        cards = panel.locator("#search-results > li")
        expect(cards).to_have_count(12)
        expect(cards.first.locator(".title")).to_have_text(re.compile(r"^#\d+ scikit-image/astronaut\.jpg$"))
        expect(cards.first.locator(".score")).to_have_text("score 1.000")
        expect(cards.first.locator("dd").nth(1)).to_have_text("astronaut")
        astronaut_id = cards.first.get_attribute("data-item-id")

        fourth_id = cards.nth(3).get_attribute("data-item-id")
        cards.nth(3).locator(".thumb").click()  # similar to the fourth result: it comes first, at score 1
        expect(page.locator("#search-heading")).to_be_focused()
        expect(page.locator("#search-heading")).to_contain_text(f"Similar to #{fourth_id}")
        expect(cards.first).to_have_attribute("data-item-id", fourth_id)
        expect(cards.first.locator(".score")).to_have_text("score 1.000")
        assert fourth_id != astronaut_id

        panel.get_by_role("button", name="Clear image").click()
        panel.get_by_label("Search for").fill(query)
        panel.get_by_label("Search for").press("Enter")
        expect(page.locator("#search-heading")).to_contain_text(query)
        expect(cards.first).to_have_attribute("data-item-id", str(expected.id))
        expect(cards.first.locator("img")).to_have_attribute("src", expected.metadata["thumbnail"])
        screenshot(page, artifacts_dir, "search-desktop")


@pytest.mark.slow
def test_compare_two_models_side_by_side(served: Served, browser, digit: tuple[bytes, int]) -> None:
    from playwright.sync_api import expect

    with open_page(browser, served.url) as page:
        use_key(page)
        page.get_by_role("tab", name="Compare").click()
        panel = page.locator("#panel-compare")
        expect(panel.get_by_label("First model")).to_have_value("digits")
        expect(panel.get_by_label("Second model")).to_have_value("tiny")
        fill_digit_task(panel, digit)
        panel.get_by_role("button", name="Compare", exact=True).click()
        columns = panel.locator("#compare-results > .column")
        expect(columns.locator("h2")).to_have_text(["digits", "tiny"])
        expect(columns.nth(1).locator(".ranking li")).to_have_count(len(CLASSNAMES))
        expect(columns.nth(0).locator(".ranking li").first.locator(".label")).to_have_text(str(digit[1]))


@pytest.mark.slow
def test_a_bad_key_shows_the_server_message(served: Served, browser, digit: tuple[bytes, int]) -> None:
    from playwright.sync_api import expect

    bad = "cs-000000000000-not-a-key"
    refusal = httpx.get(f"{served.url}/v1/models", headers={"Authorization": f"Bearer {bad}"})
    assert refusal.status_code == 401
    with open_page(browser, served.url) as page:
        expect(page.locator("#key-status")).to_have_text("Enter an API key to start.")
        use_key(page, bad)
        expect(page.locator("#key-status")).to_have_text(f"Error 401: {refusal.json()['error']['message']}")
        panel = page.locator("#panel-classify")
        fill_digit_task(panel, digit)
        panel.get_by_role("button", name="Classify", exact=True).click()
        expect(panel.get_by_role("alert")).to_have_text(f"Error 401: {refusal.json()['error']['message']}")
        assert page.evaluate("sessionStorage.getItem('clipserve.apiKey')") == bad


@pytest.mark.slow
def test_phone_keyboard_and_servers_without_collections(
    served: Served, browser, digit: tuple[bytes, int], artifacts_dir: Path
) -> None:
    from playwright.sync_api import expect

    with open_page(browser, served.url, viewport=PHONE) as page:
        page.route(
            "**/v1/collections",
            lambda route: route.fulfill(
                status=404,
                json={
                    "error": {"message": "Not Found", "type": "not_found_error", "param": None, "code": None}
                },
            ),
        )
        use_key(page)
        panel = page.locator("#panel-classify")
        fill_digit_task(panel, digit)
        panel.get_by_role("button", name="Classify", exact=True).click()
        expect(panel.locator(".ranking")).to_be_in_viewport()  # the answer, below the form, is scrolled to
        assert (
            page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        )  # no sideways scrolling
        page.screenshot(path=str(artifacts_dir / "playground-classify-phone.png"))  # what the phone shows

        page.get_by_role("tab", name="Classify").focus()
        page.keyboard.press("ArrowRight")
        expect(page.get_by_role("tab", name="Search")).to_be_focused()
        expect(page.locator("#panel-search")).to_be_visible()
        expect(page.locator("#panel-classify")).to_be_hidden()
        expect(page.locator("#search-notice")).to_have_text(re.compile("no collections API"))

        page.unroute("**/v1/collections")
        page.route("**/v1/collections", lambda route: route.fulfill(json={"object": "list", "data": []}))
        use_key(page)  # connecting again reloads the collections
        expect(page.locator("#search-notice")).to_have_text(re.compile("no collections yet"))
        expect(page.get_by_label("Collection")).to_be_disabled()
        screenshot(page, artifacts_dir, "search-phone")
        page.get_by_role("tab", name="Search").press("End")
        expect(page.get_by_role("tab", name="Compare")).to_have_attribute("aria-selected", "true")
        page.keyboard.press("Home")
        expect(page.get_by_role("tab", name="Classify")).to_be_focused()
        expect(page.locator("#panel-classify")).to_be_visible()
