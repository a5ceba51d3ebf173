"""The chat page in a real headless Chromium (Debian's chromium, driven by playwright):
sign in, ask for a recommendation, thumbs-down a card, see the next answer exclude it,
export the adapter, delete yourself. Screenshots go to results/chat-page/.

The gateway runs for real on loopback (uvicorn, in-process backend, the tiny model).
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import httpx
import pytest

from llmrec_serving.app import create_app, serve_in_thread
from llmrec_serving.config import load_serving_config
from llmrec_serving.services import build_services

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parent.parent / "results" / "chat-page"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 240_000  # a CPU shared with training jobs: generous, never a timed assert

playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
require_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).is_file(), reason="Debian's chromium is not installed (scripts/setup.sh)"
)


@pytest.fixture(scope="module")
def gateway(serving_world):
    cfg = load_serving_config(
        None,
        [
            *serving_world.overrides,
            "serve.backend=inprocess",
            "serve.explain_max_tokens=6",
            f"profile.url=sqlite:///{serving_world.tmp / 'page-profiles.db'}",
            f"fed.output_dir={serving_world.tmp / 'fed'}",
        ],
    )
    services = build_services(cfg)
    with serve_in_thread(create_app(services), "127.0.0.1", startup_timeout_s=600) as url:
        yield url, services


@pytest.fixture
def page(tmp_path):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh --user-data-dir
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            accept_downloads=True,
            viewport={"width": 1280, "height": 860},
        )
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context.new_page()
        finally:
            context.close()


def ask(page, message: str, answers_before: int) -> list[str]:
    """Send ``message`` and wait for the answer; returns the item ids of its cards."""
    cards_before = page.locator("[data-testid=card]").count()
    page.fill("[data-testid=ask]", message)
    page.click("[data-testid=send]")
    page.wait_for_selector(
        f"[data-role=assistant][data-done=true] >> nth={answers_before}", state="attached"
    )
    cards = page.locator("[data-testid=card]")
    return [cards.nth(i).get_attribute("data-item") for i in range(cards_before, cards.count())]


@require_chromium
def test_sign_in_chat_thumbs_down_export_delete(gateway, page, serving_world, tmp_path):
    url, services = gateway
    page.goto(url)
    page.fill("[data-testid=key]", "lrk_wrong")
    page.click("[data-testid=sign-in-button]")
    page.wait_for_selector("text=That key is not valid.")

    page.fill("[data-testid=key]", serving_world.keys["2"])
    page.click("[data-testid=sign-in-button]")
    page.wait_for_selector("[data-testid=who] >> text=signed in as 2")
    history = page.locator("[data-testid=history] li")
    assert history.count() == len(services.profiles.base_histories["2"])
    page.screenshot(path=SHOTS / "01-signed-in.png")

    first = ask(page, "recommend three movies", 0)
    assert len(first) == 3
    seen = set(services.profiles.base_histories["2"])
    assert all(i in services.catalog and i not in seen for i in first)
    card = page.locator(f"[data-testid=card][data-item='{first[0]}']")
    assert card.locator("h3").inner_text() == services.catalog.display(first[0])
    reason = card.locator(".reason").inner_text().strip()
    assert reason
    # the history items a reason names are not listed a second time beside it
    for because in card.locator(".because").all_inner_texts():
        listed = because.removeprefix("From your history: ").split(", ")
        assert not any(title in reason for title in listed), (reason, because)
    page.screenshot(path=SHOTS / "02-recommendation.png")

    card.locator("[data-action=down]").click()
    page.wait_for_selector(f"[data-testid=exclusions] li[data-item='{first[0]}']")
    assert card.get_attribute("data-feedback") == "down"
    page.screenshot(path=SHOTS / "03-thumbs-down.png")

    second = ask(page, "recommend three movies", 1)
    assert second and first[0] not in second
    page.screenshot(path=SHOTS / "04-next-answer-excludes-it.png")

    with page.expect_download() as download:
        page.click("[data-testid=export]")
    saved = tmp_path / "adapter.zip"
    download.value.save_as(saved)
    assert sorted(zipfile.ZipFile(saved).namelist()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
    ]
    page.wait_for_selector("[data-testid=status] >> text=downloaded")
    page.screenshot(path=SHOTS / "05-exported.png")

    page.once("dialog", lambda dialog: dialog.accept())
    page.click("[data-testid=delete]")
    page.wait_for_selector("[data-testid=sign-in-error] >> text=deleted")
    page.screenshot(path=SHOTS / "06-deleted.png")
    gone = httpx.get(
        f"{url}/v1/me/history", headers={"Authorization": f"Bearer {serving_world.keys['2']}"}
    )
    assert gone.status_code == 401
    assert serving_world.store.current("2") is None
