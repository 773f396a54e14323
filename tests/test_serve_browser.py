"""The web page in a real browser: `python -m stepvideo_jax.serve` (the demo model) driven by Debian's
Chromium through Selenium, with the system's chromedriver (nothing is downloaded at run time).

The browser reaches only this machine: every host name but localhost resolves to nothing
(`--host-resolver-rules`) and every other request goes to a proxy on a closed local port, so the page
must work offline; the browser's network log then shows that it did not even try another host. On
that page: type a prompt, submit, watch the progress bar, get the video element; the served mp4 (the
download link) decodes to the config's frame count; the screenshot is not blank
(`STEPVIDEO_SCREENSHOT=<path>` also saves it: docs/web_page.png was written so); an invalid size shows
the CLI's message in the page; two submissions from two tabs both complete; a prompt outside the
demo's vocabulary shows its note.

Needs `chromium` and `chromium-driver` (apt; `.ci/run` installs them).
"""
import re
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
from PIL import Image

from stepvideo_jax.sampling import video_io
from tests.fixtures import PROJECT_ROOT
from tests.test_generate_cli import load_config

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_addresses(port: int) -> set[str]:
    """Addresses with a socket listening on `port` (/proc/net/tcp and tcp6: state 0A = LISTEN);
    IPv4 dotted, IPv6 as the kernel's hex."""
    found = set()
    for table in ("tcp", "tcp6"):
        path = pathlib.Path("/proc/net") / table
        for line in (path.read_text().splitlines()[1:] if path.exists() else []):
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]) if table == "tcp" else address)
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The entry point as a user starts it (no --host), on a free port; yields (url, output dir)."""
    out = tmp_path_factory.mktemp("serve")
    port = _free_port()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)   # one device, as a user runs it
    log_path = out / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "stepvideo_jax.serve", f"--port={port}",
                                 f"--output_dir={out / 'videos'}"], cwd=PROJECT_ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).read()
                break
            except OSError:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.5)
        yield {"url": url, "port": port, "log": log_path}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    assert not missing, (f"{missing} not found: the browser test needs Debian's chromium and chromium-driver "
                         "(apt-get install -y chromium chromium-driver; .ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="stepvideo_chromium_")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}", "--window-size=1280,1000",
                # offline: no name but localhost resolves, and anything else goes to a closed local port
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
                "--proxy-server=http://127.0.0.1:9"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _find(driver, css):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def _wait(condition, timeout=300, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _open(driver, url):
    driver.get(url)
    _wait(lambda: _find(driver, "#prompt textarea"), 120, "the page")


def _fill(driver, css, text):
    field = _find(driver, css)[0]
    field.clear()
    field.send_keys(str(text))


def _submit(driver):
    """Click Generate after the last video (if any) is noted; returns a waiter for the new one."""
    old = _video_src(driver)
    _find(driver, "#generate")[0].click()
    return lambda: (src := _video_src(driver)) and src != old and src


def _video_src(driver):
    """The video's absolute URL, read in the page in one step: Gradio replaces the element while it
    updates, so a found element can be gone by the time its attribute is asked for (stale reference)."""
    return driver.execute_script("const v = document.querySelector('#video video'); return v ? v.src : null;")


def _text(driver, css) -> str:
    """An element's rendered text, read in the page in one step (see _video_src)."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css)


def _status(driver) -> str:
    return _text(driver, "#status")


def _network_hosts(driver) -> set[str]:
    """Hosts of every http(s)/ws(s) request the browser sent or tried since the last call."""
    hosts = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            url = (message["params"].get("request") or {}).get("url") or message["params"].get("url", "")
            parsed = urllib.parse.urlparse(url)
            if parsed.scheme in ("http", "https", "ws", "wss"):
                hosts.add(parsed.hostname)
    return hosts


def _download(url, tmp_path, name) -> np.ndarray:
    path = tmp_path / name
    path.write_bytes(urllib.request.urlopen(url, timeout=60).read())
    return video_io.read_mp4(path)[0]


def test_the_page_generates_offline_and_serves_the_mp4(server, browser, tmp_path):
    config = load_config("demo")
    assert _listening_addresses(server["port"]) == {"127.0.0.1"}, "the default bind must be this machine only"
    _open(browser, server["url"])
    _fill(browser, "#prompt textarea", "a blue square moves up")
    waiter = _submit(browser)
    src = _wait(waiter, what="the video element")
    status = _status(browser)
    assert "time per phase" in status and "denoise" in status and "error" not in status, status
    links = browser.execute_script("return Array.from(document.querySelectorAll('#download a'), a => a.href);")
    assert links and links[0].endswith(".mp4"), links
    for i, url in enumerate({src, links[0]}):
        assert urllib.parse.urlparse(url).hostname in LOCAL_HOSTS, url
        frames = _download(url, tmp_path, f"page_{i}.mp4")
        assert frames.shape == (config.num_frames, config.height, config.width, 3)

    time.sleep(1.0)   # the video's first frame
    shot = tmp_path / "page.png"
    browser.save_screenshot(str(shot))
    pixels = np.asarray(Image.open(shot).convert("RGB"), np.float32)
    assert pixels.shape[0] >= 600 and pixels.shape[1] >= 1000, pixels.shape
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200, "blank screenshot"
    if os.environ.get("STEPVIDEO_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["STEPVIDEO_SCREENSHOT"])

    # the progress bar follows the denoising loop: a long run shows "denoise" and its step count
    steps = 1000   # the limit: long enough to be seen on a fast machine
    _fill(browser, "#steps input", steps)
    waiter = _submit(browser)
    seen = set()

    def progress_or_done():
        text = _text(browser, "#video")
        if "denoise" in text:
            seen.add(text.replace("\n", " "))
        return waiter()

    _wait(progress_or_done, what="the long run")
    print(f"progress seen in the page ({len(seen)} distinct texts), e.g. {sorted(seen)[:2]}")
    assert any(f"/{steps}" in text for text in seen), seen
    _fill(browser, "#steps input", config.num_steps)

    outside = _network_hosts(browser) - LOCAL_HOSTS
    assert not outside, f"the page tried to reach {sorted(outside)}"


def test_an_invalid_size_shows_the_cli_message_in_the_page(server, browser):
    _open(browser, server["url"])
    _fill(browser, "#height input", 30)
    _find(browser, "#generate")[0].click()
    status = _wait(lambda: "error" in _status(browser) and _status(browser), 120, "the error message")
    assert re.search(r"invalid video size: height=30 must be a positive multiple of \d+", status), status
    assert "Traceback" not in _text(browser, "body")
    assert _video_src(browser) is None


def test_two_tabs_submit_at_once_and_both_complete(server, browser, tmp_path):
    _open(browser, server["url"])
    first = browser.current_window_handle
    _fill(browser, "#prompt textarea", "a red circle grows")
    _fill(browser, "#seed input", 21)
    browser.switch_to.new_window("tab")
    second = browser.current_window_handle
    _open(browser, server["url"])
    _fill(browser, "#prompt textarea", "a purple hexagon dances")
    _fill(browser, "#seed input", 22)
    browser.switch_to.window(first)
    wait_first = _submit(browser)
    browser.switch_to.window(second)
    wait_second = _submit(browser)
    srcs = {}
    for handle, waiter in ((first, wait_first), (second, wait_second)):
        browser.switch_to.window(handle)
        srcs[handle] = _wait(waiter, what="both videos")
    assert srcs[first] != srcs[second]
    assert "seed21" in srcs[first] and "seed22" in srcs[second]
    assert "unknown words: purple, hexagon, dances" in _status(browser)
    for i, src in enumerate(srcs.values()):
        assert _download(src, tmp_path, f"tab_{i}.mp4").shape[0] == load_config("demo").num_frames
    assert not _network_hosts(browser) - LOCAL_HOSTS
