"""The console in a real headless Chromium (Selenium): runs list and filter, a run page whose
diagram and timeline update live while the run progresses, an approval refused to a person
not allowed and to nobody signed in, then given by the allowed person, and the run finishing.
Screenshots go to tests/artifacts/ (each step's, and each browser's last page when the test
ends, passed or failed). Skipped without Chromium, except under CI."""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dbutil import wait_for
from durapipe import App, Pipeline, fn, gate
from durapipe.web import create_console

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail("browser tests need chromium and chromedriver under CI; .ci/run installs them",
                    pytrace=False)
    pytest.skip("browser tests skipped: no chromium/chromedriver (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402

RELEASE = threading.Event()  # the slow step runs until the test lets it finish


def draft(state: dict[str, Any]) -> dict[str, Any]:
    return {"draft": f"about {state['topic']}"}


def research(state: dict[str, Any]) -> dict[str, Any]:
    RELEASE.wait(60)
    return {"notes": "three sources"}


def publish(state: dict[str, Any]) -> dict[str, Any]:
    return {"published": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served(make_app: Callable[..., App]) -> Iterator[tuple[App, str]]:
    import uvicorn

    app = make_app("web-browser")
    app.pipeline("review", fn(draft) >> fn(research) >> gate("legal", "Publish {topic}?", approvers=["alice"])
                 >> fn(publish), inputs=["topic"])
    app.pipeline("quick", fn(draft), inputs=["topic"])
    port = free_port()
    with app:
        console = create_console(app, token="alice:alice-secret,bob:bob-secret")
        server = uvicorn.Server(uvicorn.Config(console, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_for(lambda: server.started, what="the console to listen")
        try:
            yield app, f"http://127.0.0.1:{port}"
        finally:
            RELEASE.set()
            server.should_exit = True
            thread.join(10)


@pytest.fixture
def browser_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[[], WebDriver]]:
    drivers: list[WebDriver] = []

    def make() -> WebDriver:
        opts = webdriver.ChromeOptions()
        opts.binary_location = str(CHROMIUM)
        for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1400,1000",
                    f"--user-data-dir={tmp_path / f'profile-{len(drivers)}'}"):
            opts.add_argument(arg)
        driver = webdriver.Chrome(service=Service(executable_path=str(DRIVER)), options=opts)
        drivers.append(driver)
        return driver

    yield make
    for i, d in enumerate(drivers):
        try:  # what each browser showed last: the page to look at when the test failed
            shot(d, f"{request.node.name}-browser{i}-last")
        finally:
            d.quit()


def shot(driver: WebDriver, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def box_status(driver: WebDriver, path: str) -> str | None:
    # read in one script: the page's live refresh may replace the element between two calls
    return driver.execute_script(  # type: ignore[no-any-return]
        "const b = document.querySelector(`#live .box[data-path='${arguments[0]}']`);"
        "return b ? b.dataset.status : null;", path)


def bar_paths(driver: WebDriver) -> list[str]:
    return driver.execute_script(  # type: ignore[no-any-return]
        "return [...document.querySelectorAll('#live .tl-bar')].map(b => b.dataset.path);")


def sign_in(driver: WebDriver, base: str, token: str, then: str) -> None:
    driver.get(f"{base}/login?next={then}")
    driver.find_element(By.NAME, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()


def click_approve(driver: WebDriver) -> None:
    for _ in range(10):  # the live refresh may replace the button between finding and clicking it
        try:
            driver.find_element(By.CSS_SELECTOR, '.gate[data-gate="legal"] button.approve').click()
            return
        except StaleElementReferenceException:
            continue
    raise AssertionError("the approve button kept being replaced")


def test_console_in_a_browser(served: tuple[App, str], browser_factory: Callable[[], WebDriver]) -> None:
    app, base = served
    RELEASE.clear()
    Pipeline(app, app.registered("quick")).run({"topic": "warm-up"}, run_id="quick-1")
    handle = Pipeline(app, app.registered("review")).start({"topic": "durable AI"}, run_id="review-1")

    alice = browser_factory()
    alice.get(base + "/")
    links = [a.text for a in alice.find_elements(By.CSS_SELECTOR, "table.runs a")]
    assert links == ["review-1", "quick-1"]
    alice.find_element(By.NAME, "q").send_keys("warm-up")
    alice.find_element(By.CSS_SELECTOR, ".filters button").click()
    wait_for(lambda: [a.text for a in alice.find_elements(By.CSS_SELECTOR, "table.runs a")] == ["quick-1"],
             what="the filtered list")
    shot(alice, "01-runs-filtered")

    # the run page while the second step is in flight, then live as it moves on to the gate
    alice.get(base + "/runs/review-1")
    wait_for(lambda: box_status(alice, "0.1") == "RUNNING", what="the step in flight shown as running")
    assert box_status(alice, "0.0") == "SUCCESS" and box_status(alice, "0.2") == "PENDING"
    shot(alice, "02-run-step-in-flight")
    assert bar_paths(alice) == ["0.0"]
    RELEASE.set()
    wait_for(lambda: box_status(alice, "0.2") == "WAITING", what="the page to show the gate waiting, live")
    assert box_status(alice, "0.1") == "SUCCESS"
    assert bar_paths(alice)[:2] == ["0.0", "0.1"]  # the finished step's bar appeared, live
    shot(alice, "03-run-waiting-at-gate")

    # nobody signed in: refused, nothing changes
    anon = browser_factory()
    anon.get(base + "/runs/review-1")
    click_approve(anon)
    wait_for(lambda: "Sign in needed" in anon.page_source, what="the refusal page")
    shot(anon, "04-unauthenticated-refused")
    # bob is signed in but not an approver of this gate: refused, nothing changes
    bob = browser_factory()
    sign_in(bob, base, "bob-secret", "/runs/review-1")
    wait_for(lambda: bob.find_elements(By.CSS_SELECTOR, '.gate[data-gate="legal"]'), what="bob's run page")
    click_approve(bob)
    wait_for(lambda: "Refused" in bob.page_source, what="bob's refusal")
    assert "bob" in bob.find_element(By.CSS_SELECTOR, ".message").text
    shot(bob, "05-not-an-approver-refused")
    assert [g.gate for g in app.pending("review-1")] == ["legal"]
    assert handle.status().value == "PENDING"

    # alice may approve: the run finishes and her page shows it
    sign_in(alice, base, "alice-secret", "/runs/review-1")
    wait_for(lambda: alice.find_elements(By.CSS_SELECTOR, '.gate[data-gate="legal"]'), what="alice's run page")
    click_approve(alice)
    wait_for(lambda: "approved gate legal as alice" in alice.page_source, what="the approval note")
    wait_for(lambda: box_status(alice, "0.3") == "SUCCESS", what="the run to finish on the page")
    assert box_status(alice, "0.2") == "APPROVED"
    assert handle.result(timeout=30).state["published"] is True
    shot(alice, "06-approved-and-finished")
