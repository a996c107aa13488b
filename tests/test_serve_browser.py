"""The serve page in a real headless Chromium with a fake microphone playing a speech WAV: it
connects, streams, receives and plays audio, and shows its figures; a screenshot is kept in
test-artifacts/serve-page.png."""

import shutil
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import ServeProcess

pytest.importorskip("starlette")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.support.ui import Select  # noqa: E402

CHROMEDRIVER = "/usr/bin/chromedriver"
# a session that must end without an error says something first: two seconds of the looped sample (8000 samples,
# a sixth of a second at the page's 48 kHz, could fall in a pause, and the session then ended "no speech heard")
TALKED = "window.streamgenStats.sentSamples > 2 * window.streamgenStats.sampleRate"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture
def browser(tmp_path):
    if shutil.which("chromium") is None or not Path(CHROMEDRIVER).exists():
        pytest.skip("chromium and chromium-driver are not installed (scripts/test.sh installs them)")
    wav = resources.files("streamgen") / "assets" / "sample.wav"
    o = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}",
                "--autoplay-policy=no-user-gesture-required", "--disable-background-networking", "--no-first-run",
                "--window-size=900,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        o.add_argument(arg)
    driver = webdriver.Chrome(options=o, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def wait_for(driver, script: str, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.2)
    stats = driver.execute_script("return window.streamgenStats")
    raise AssertionError(f"timed out waiting for {what}; page stats: {stats}")


def test_page_talks_plays_and_shows_figures(browser, tmp_path):
    server = ServeProcess("--task", "resynthesis", "--status-every", "0")  # the shipped bundle
    try:
        browser.get(server.url + "/?task=resynthesis")
        wait_for(browser, "return window.streamgenStats && window.streamgenStats.state === 'ready'", 20, "the task list")
        assert browser.find_element("id", "task").get_attribute("value") == "resynthesis"
        # a bad option is refused with the server's message, and the page is ready again
        Select(browser.find_element("id", "task")).select_by_value("translation")
        k = browser.find_element("css selector", 'input[data-option="k"]')
        k.clear()
        k.send_keys("many")
        browser.find_element("id", "talk").click()
        wait_for(browser, "return window.streamgenStats.errors.length === 1 && window.streamgenStats.state === 'ready'", 20, "the refusal")
        assert "option k='many' is not a valid int" in browser.find_element("id", "error").text
        Select(browser.find_element("id", "task")).select_by_value("resynthesis")
        browser.find_element("id", "talk").click()
        wait_for(browser, "return window.streamgenStats.playedSamples > 16000", 40, "a second of played audio")
        browser.find_element("id", "talk").click()  # stop talking: the session flushes and ends
        wait_for(browser, "return window.streamgenStats.state === 'ended'", 30, "the session's end")
        time.sleep(0.5)  # one more render of the figures
        stats = browser.execute_script("return window.streamgenStats")
        assert len(stats["errors"]) == 1  # only the refusal above
        assert stats["sentSamples"] > 16000 and stats["receivedSamples"] > 16000
        assert 0 < stats["playedSamples"] <= stats["receivedSamples"]
        assert stats["firstAudioMs"] > 0 and stats["serverFirstAudioMs"] > 0
        assert stats["lagMs"] is not None
        shown = {k: browser.find_element("id", k).text for k in ("first-audio", "server-first-audio", "lag", "played")}
        assert all(v != "–" for v in shown.values()), shown
        assert shown["first-audio"].endswith("ms") and shown["played"].endswith("s")

        shot = tmp_path / "serve-page.png"
        assert browser.save_screenshot(str(shot))
        from PIL import Image

        img = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
        assert img.shape[0] > 400 and img.shape[1] > 400
        assert img.std() > 10  # not blank: text, figures and the level plot on the page
        assert (img < 100).mean() > 0.005  # dark pixels of text
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(shot, ARTIFACTS / "serve-page.png")
        m = server.metrics()
        assert m[("streamgen_sessions_ended_total", (("outcome", "ok"),))] == 1
        assert m[("streamgen_live_sessions", ())] == 0
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from streamgen.testing import random_bundle

    d = tmp_path_factory.mktemp("tiny")
    random_bundle(seed=1).save(d)
    return d


def ready(browser, server, query: str = "?task=resynthesis"):
    browser.get(server.url + "/" + query)
    wait_for(browser, "return window.streamgenStats && window.streamgenStats.state === 'ready'", 20, "the task list")


SLOW_MIC = """const ask = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
navigator.mediaDevices.getUserMedia = (c) => new Promise((ok, no) => setTimeout(() => ask(c).then(ok, no), arguments[0]));"""


def test_page_stop_while_connecting_records_nothing_and_a_session_ended_before_the_mic_stays_ended(browser, tiny):
    """Stop pressed while the page connected sent the start anyway and recorded; a session ended by the server
    (busy, idle) before the microphone's permission came recorded into nothing and left Stop hanging."""
    server = ServeProcess("--bundle", str(tiny), "--task", "resynthesis", "--status-every", "0", "--idle-timeout", "1")
    try:
        ready(browser, server)
        talk = browser.find_element("id", "talk")
        browser.execute_script("arguments[0].click(); arguments[0].click();", talk)  # Talk, then Stop at once
        time.sleep(3)
        stats = browser.execute_script("return window.streamgenStats")
        assert stats["state"] in ("ready", "ended") and stats["sentSamples"] == 0 and stats["errors"] == [], stats
        assert talk.text == "Talk" and talk.is_enabled()
        # Talk, Stop, Talk at once: one connection (a spare one's idle close had ended the live session)
        browser.execute_script("arguments[0].click(); arguments[0].click(); arguments[0].click();", talk)
        wait_for(browser, "return window.streamgenStats.state === 'talking' && window.streamgenStats.sentSamples > 8000", 20, "talking")
        time.sleep(3)  # past the server's idle timeout for a connection without a session
        assert server.metrics()[("streamgen_connections", ())] == 1
        assert browser.execute_script("return window.streamgenStats.state") == "talking"
        talk.click()
        wait_for(browser, "return window.streamgenStats.state === 'ended'", 30, "the session's end")

        browser.execute_script(SLOW_MIC, 5000)  # the permission takes far longer than the server's idle timeout
        talk.click()
        wait_for(browser, "return window.streamgenStats.state === 'ended'", 20, "the idle session's end")
        time.sleep(6)  # the permission has come by now
        stats = browser.execute_script("return window.streamgenStats")
        assert stats["state"] == "ended" and stats["sentSamples"] == 0, stats
        assert any("no input for 1 s" in e for e in stats["errors"]), stats["errors"]
        assert not browser.execute_script("return window.streamgenStats.errors.some(e => e.startsWith('the connection closed'))")
        assert talk.text == "Talk" and talk.is_enabled()
    finally:
        server.stop()


def test_page_opens_a_new_connection_when_told_and_shows_the_servers_defaults(browser, tiny):
    """At a connection's session limit every Talk was refused until the idle close; the page showed (and sent)
    the task's own defaults instead of the server's --opt."""
    server = ServeProcess("--bundle", str(tiny), "--task", "continuation", "--opt", "max_units=40", "--status-every", "0",
                          "--max-sessions-per-connection", "1")
    try:
        ready(browser, server, "")
        assert browser.find_element("css selector", 'input[data-option="max_units"]').get_attribute("value") == "40"
        Select(browser.find_element("id", "task")).select_by_value("resynthesis")
        talk = browser.find_element("id", "talk")
        for n in (1, 2):
            talk.click()
            wait_for(browser, f"return window.streamgenStats.state === 'talking' && {TALKED}", 20, f"session {n} talking")
            talk.click()
            wait_for(browser, f"return window.streamgenStats.state === 'ended' && window.streamgenStats.sessions === {n}", 30,
                     f"session {n}'s end")
        assert browser.execute_script("return window.streamgenStats.errors") == []
        m = server.metrics()
        assert m[("streamgen_sessions_ended_total", (("outcome", "ok"),))] == 2
        assert m[("streamgen_sessions_refused_total", (("reason", "connection_limit"),))] == 1  # then a new connection
    finally:
        server.stop()


FIREFOX_RATES = """const own = new AudioContext(), rate = own.sampleRate;
own.close();
const connect = AudioContext.prototype.createMediaStreamSource;
AudioContext.prototype.createMediaStreamSource = function (stream) {
  if (this.sampleRate !== rate) throw new DOMException("AudioContext.createMediaStreamSource: Connecting AudioNodes from "
    + "AudioContexts with different sample-rate is currently not supported.", "NotSupportedError");
  return connect.call(this, stream);
};
return rate;"""


def test_page_reads_the_microphone_at_the_browsers_own_rate(browser, tiny):
    """Firefox refuses to connect a microphone to an AudioContext of another rate than its own (NotSupportedError;
    Chromium resamples): the page opened its one context at 16 kHz, so on Firefox Talk only ever showed that error.
    Here Chromium is given Firefox's rule."""
    server = ServeProcess("--bundle", str(tiny), "--task", "resynthesis", "--status-every", "0")
    try:
        ready(browser, server)
        rate = browser.execute_script(FIREFOX_RATES)
        assert rate != 16000  # (else the rule would not tell the page's old way from the new)
        talk = browser.find_element("id", "talk")
        talk.click()
        wait_for(browser, "return window.streamgenStats.sentSamples > arguments[0] && window.streamgenStats.receivedSamples > 0"
                 .replace("arguments[0]", str(rate)), 20, "a second of speech sent and audio back")
        talk.click()
        wait_for(browser, "return window.streamgenStats.state === 'ended'", 30, "the session's end")
        stats = browser.execute_script("return window.streamgenStats")
        assert stats["errors"] == [] and stats["sampleRate"] == rate, stats
    finally:
        server.stop()


COUNT_CONTEXTS = """const Made = window.AudioContext;
window.contextsMade = 0;
window.AudioContext = class extends Made { constructor(...a) { super(...a); window.contextsMade += 1; } };"""


def test_talk_pressed_again_while_the_audio_opens_makes_one_pair_of_contexts(browser, tiny):
    """Each press while the first one's contexts were still loading their worklets made another pair that kept running."""
    server = ServeProcess("--bundle", str(tiny), "--task", "resynthesis", "--status-every", "0")
    try:
        ready(browser, server)
        browser.execute_script(COUNT_CONTEXTS)
        talk = browser.find_element("id", "talk")
        browser.execute_script("arguments[0].click(); arguments[0].click(); arguments[0].click();", talk)  # Talk, Stop, Talk
        wait_for(browser, f"return window.streamgenStats.state === 'talking' && {TALKED}", 20, "talking")
        talk.click()
        wait_for(browser, "return window.streamgenStats.state === 'ended'", 30, "the session's end")
        assert browser.execute_script("return window.contextsMade") == 2  # one to play, one to listen
        assert browser.execute_script("return window.streamgenStats.errors") == []
    finally:
        server.stop()
