"""The dashboard in a real browser: headless Chromium through chromedriver (Debian's
chromium and chromium-driver), driven by selenium, against a running gpu-manager (the
test harness's simulated GPU with stand-in services; see tests/dashboard.rs, which
starts it and runs this script).

    python3 tests/browser/dashboard.py --url http://127.0.0.1:PORT --artifacts DIR [--token T]

Without --token it walks the page's whole life (services listed, a change through the
API shown live, a phase change by click, a refusal, the timeline, a narrow window);
with --token the daemon has api.token_file and the page must ask for it; with
--parking URL (cosyvoice's stand-in) vidi and cosyvoice park and drain, and the page
must show them parked and draining; with --proxy URL (the proxy's listen address) ollama
is proxied and stopped, and the page must show its proxy's traffic and its demand's
countdown after a request through it. Screenshots go to DIR. Exits non-zero on the first
failed check, saying what was expected.
"""

import argparse
import json
import os
import re
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

STATES = {"stopped", "starting", "ready", "unhealthy", "stopping", "preempted", "failed",
          "unknown", "parked", "draining"}
SERVICES = ["comfyui", "cosyvoice", "ollama", "vidi"]
CONVERGE_S = 30


class Check(Exception):
    pass


def post(url, path, token=None):
    """POSTs through the API: (status, JSON body)."""
    request = urllib.request.Request(url + path, method="POST")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def get(url, path):
    with urllib.request.urlopen(url + path, timeout=10) as response:
        return response.status, dict(response.headers), response.read()


def browser():
    options = Options()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for argument in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1600"]:
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver is Debian's; selenium must not try to fetch one.
    service = Service(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=options, service=service)


def wait_for(description, condition, timeout_s):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = condition()
            if last:
                return last
        except Exception as error:  # the page may be mid-render
            last = error
        time.sleep(0.05)
    raise Check(f"timed out after {timeout_s} s waiting for: {description} (last: {last!r})")


def click(driver, selector):
    """Clicks the element; retried if the page re-rendered it between finding and clicking."""
    def attempt():
        driver.find_element(By.CSS_SELECTOR, selector).click()
        return True
    wait_for(f"a click on {selector}", attempt, 5)


def page_states(driver):
    rows = driver.find_elements(By.CSS_SELECTOR, "#services tbody tr")
    return {row.get_attribute("data-service"): row.find_element(By.CSS_SELECTOR, ".state").text
            for row in rows}


def state_is(driver, service, state):
    return page_states(driver).get(service) == state


def counts_down(read, label, total_s):
    """Checks that the countdown `read` returns says `LABEL: m:ss left`, starts within
    10 s of `total_s` and moves on by itself (the page ticks it every second, between its
    2 s refreshes): its first and a later text."""
    first = read()
    wait_for(f"the {label} countdown to move", lambda: read() != first, 5)
    later = read()

    def seconds_left(text):
        shown = re.fullmatch(rf"{re.escape(label)}: (\d+):(\d\d) left", text)
        if not shown:
            raise Check(f"{label} and the time left as m:ss, got {text!r}")
        return int(shown[1]) * 60 + int(shown[2])
    if not total_s - 10 <= seconds_left(later) < seconds_left(first) <= total_s + 1:
        raise Check(f"{total_s} s counting down, got {first!r} then {later!r}")
    return first, later


class Run:
    def __init__(self, url, artifacts, token, config):
        self.url = url
        self.artifacts = artifacts
        self.token = token
        self.config = config
        self.driver = browser()

    def shot(self, name):
        path = os.path.join(self.artifacts, f"{name}.png")
        self.driver.save_screenshot(path)
        print(f"  screenshot {path}")

    def ok(self, text):
        print(f"PASS {text}")

    def open_page(self):
        self.driver.get(self.url + "/")
        wait_for("every service listed", lambda: sorted(page_states(self.driver)) == SERVICES, 10)
        wait_for("the event stream connected",
                 lambda: self.driver.find_element(By.ID, "connection").get_attribute("data-state") == "live", 10)

    def csp_violations(self):
        return [entry["message"] for entry in self.driver.get_log("browser")
                if "Content Security Policy" in entry["message"]]

    def untokened(self):
        d = self.driver
        status, headers, _ = get(self.url, "/")
        csp = headers.get("content-security-policy", "")
        if "script-src 'self'" not in csp or "unsafe-inline" in csp:
            raise Check(f"a strict Content-Security-Policy on the page, got {csp!r}")
        if "access-control-allow-origin" in {k.lower() for k in headers}:
            raise Check("no CORS header on the page")
        self.ok("the page is served with a strict CSP and no CORS header")

        self.open_page()
        states = page_states(d)
        if sorted(states) != SERVICES or not set(states.values()) <= STATES:
            raise Check(f"every service with a known state, got {states}")
        self.ok(f"every service listed with its state: {states}")
        self.shot("01-loaded")

        # A change through the API shows up within 1 s, without a reload.
        d.execute_script("window.__notReloaded = true;")
        code, body = post(self.url, "/gpu/prepare-phase/2")
        if code != 200:
            raise Check(f"POST /gpu/prepare-phase/2 answers 200, got {code}: {body}")
        answered = time.monotonic()
        wait_for("vidi ready on the page", lambda: state_is(d, "vidi", "ready"), 1.0)
        if not d.execute_script("return window.__notReloaded === true;"):
            raise Check("the page was reloaded")
        self.ok(f"vidi ready on the page {time.monotonic() - answered:.3f} s after the API answered, without a reload")
        self.shot("02-phase-2-by-api")

        # Clicking phase 3 performs the transition, and the page shows it.
        click(d, 'button[data-phase="3"]')
        wait_for("cosyvoice ready and vidi stopped on the page",
                 lambda: state_is(d, "cosyvoice", "ready") and state_is(d, "vidi", "stopped"), CONVERGE_S)
        wait_for("the control's progress ends converged",
                 lambda: "converged" in d.find_element(By.ID, "progress").text, CONVERGE_S)
        progress = d.find_element(By.ID, "progress").text
        for line in ["stop vidi", "vidi: ready -> stopping", "start cosyvoice", "cosyvoice: starting -> ready"]:
            if line not in progress:
                raise Check(f"the live progress shows {line!r}, got:\n{progress}")
        _, _, raw = get(self.url, "/gpu/status")
        status = json.loads(raw)
        if status["desired"]["phase"] != 3 or status["services"]["cosyvoice"]["state"] != "ready":
            raise Check(f"the daemon is in phase 3 with cosyvoice ready, got {status['desired']}")
        pressed = d.find_element(By.CSS_SELECTOR, 'button[data-phase="3"]').get_attribute("aria-pressed")
        if pressed != "true":
            raise Check("the phase 3 control shows it is the current phase")
        self.ok("clicking phase 3 ran the transition, with its live progress")
        self.shot("03-phase-3-by-click")

        # A refused request shows its message: Ollama cannot fit beside ComfyUI.
        click(d, 'button[data-phase="4"]')
        wait_for("comfyui ready", lambda: state_is(d, "comfyui", "ready"), CONVERGE_S)
        click(d, 'button[data-action="start"][data-service="ollama"]')
        refusal = d.find_element(By.ID, "refusal")
        wait_for("the refusal shown", lambda: refusal.is_displayed(), 10)
        text = refusal.text
        if "HTTP 409" not in text or "cannot_fit" not in text or "ollama cannot fit" not in text:
            raise Check(f"the 409 and its message on the page, got:\n{text}")
        self.ok(f"a 409 shows its message: {text.splitlines()[0]}")
        self.shot("04-refused")

        # The timeline has points, and the phase changes marked.
        wait_for("at least 3 timeline samples",
                 lambda: int(d.find_element(By.ID, "timeline").get_attribute("data-points")) >= 3, 10)
        areas = d.find_elements(By.CSS_SELECTOR, "#timeline polygon")
        marks = d.find_elements(By.CSS_SELECTOR, "#timeline .phase-mark")
        if not areas or not marks:
            raise Check(f"stacked areas and phase marks in the timeline, got {len(areas)} and {len(marks)}")
        points = d.find_element(By.ID, "timeline").get_attribute("data-points")
        self.ok(f"the timeline has {points} points, {len(areas)} areas, {len(marks)} phase marks")

        legend = d.find_element(By.ID, "vram-legend").text
        for label in ["comfyui 20480 MB", "external 1024 MB", "reserve", "free"]:
            if label not in legend:
                raise Check(f"{label!r} in the VRAM legend, got {legend!r}")
        log_rows = d.find_elements(By.CSS_SELECTOR, "#actions tbody tr")
        if len(log_rows) < 5:
            raise Check(f"the action log lists the actions taken, got {len(log_rows)} rows")
        self.ok(f"VRAM legend in MB and {len(log_rows)} actions in the log")
        self.shot("05-full")

        # Readable in a narrow window: nothing wider than the screen but the tables' scrollers.
        d.set_window_size(390, 1400)
        time.sleep(0.5)
        overflow = d.execute_script("return document.documentElement.scrollWidth - window.innerWidth;")
        if overflow > 1:
            raise Check(f"no horizontal scrolling of the page at 390 px, it overflows by {overflow} px")
        self.ok("a 390 px window does not scroll sideways")
        self.shot("06-narrow")

        # The daemon restarts (tests/dashboard.rs does it when asked): the page reconnects
        # its event stream by itself and follows the new daemon.
        badge = d.find_element(By.ID, "connection")
        if badge.get_attribute("data-connects") != "1":
            raise Check(f"one event-stream connection so far, got {badge.get_attribute('data-connects')}")
        print("RESTART-DAEMON", flush=True)
        if sys.stdin.readline().strip() != "restarted":
            raise Check("the daemon was restarted")
        wait_for("the event stream reconnected to the new daemon",
                 lambda: badge.get_attribute("data-connects") == "2" and badge.get_attribute("data-state") == "live",
                 15)
        code, body = post(self.url, "/gpu/prepare-phase/3")
        if code != 200:
            raise Check(f"phase 3 after the restart, got {code}: {body}")
        wait_for("cosyvoice ready after the restart", lambda: state_is(d, "cosyvoice", "ready"), 5)
        if not d.execute_script("return window.__notReloaded === true;"):
            raise Check("the page was reloaded")
        self.ok("after a daemon restart the page reconnected by itself and follows the new daemon")

        self.claims()
        self.config_line()

        violations = self.csp_violations()
        if violations:
            raise Check(f"no Content-Security-Policy violations, got {violations}")
        self.ok("no Content-Security-Policy violations in the console")

    def config_line(self):
        """The config line says when the config was loaded, and a refused reload's error
        until a reload succeeds."""
        d = self.driver
        line = d.find_element(By.ID, "config-line")
        if "generation 1" not in line.text or "loaded at" not in line.text:
            raise Check(f"the config line names the generation and when it was loaded, got {line.text!r}")
        with open(self.config, encoding="utf-8") as f:
            good = f.read()
        with open(self.config, "w", encoding="utf-8") as f:
            f.write(good + "not_a_key: 1\n")
        code, body = post(self.url, "/gpu/reload")
        if code != 422:
            raise Check(f"a reload of a config with an unknown key answers 422, got {code}: {body}")
        wait_for("the refused reload on the config line",
                 lambda: "last reload refused" in line.text and "not_a_key" in line.text, 2)
        if "refused" not in (line.get_attribute("class") or ""):
            raise Check(f"the refused config line is marked, got class {line.get_attribute('class')!r}")
        self.ok(f"a refused reload shows on the config line: {line.text}")
        self.shot("07-reload-refused")
        with open(self.config, "w", encoding="utf-8") as f:
            f.write(good)
        code, body = post(self.url, "/gpu/reload")
        if code != 200:
            raise Check(f"a reload of the good config answers 200, got {code}: {body}")
        wait_for("the config line clear again", lambda: "refused" not in line.text, 2)
        self.ok("a good reload clears the config line's error")

    def claims(self):
        """A claim shows its holder and a countdown that runs between refreshes."""
        d = self.driver
        code, body = post(self.url, "/gpu/service/cosyvoice/claim?holder=browser-check&ttl_s=120")
        if code != 200:
            raise Check(f"a claim on cosyvoice, got {code}: {body}")
        cell = lambda: d.find_element(By.CSS_SELECTOR, '#services tr[data-service="cosyvoice"] [data-cell="wanted"]')
        wait_for("cosyvoice claimed on the page", lambda: "browser-check:" in cell().text, 5)
        if not cell().text.startswith("claimed"):
            raise Check(f"the wanted cell says claimed, got {cell().text!r}")
        first, left = counts_down(lambda: cell().find_element(By.CSS_SELECTOR, ".claim").text,
                                  "browser-check", 120)
        self.shot("07-claimed")
        code, body = post(self.url, "/gpu/service/cosyvoice/release?holder=browser-check")
        if code != 200:
            raise Check(f"the release, got {code}: {body}")
        wait_for("the claim gone from the page", lambda: "browser-check" not in cell().text, 5)
        self.ok(f"a claim shows its holder and countdown ({first!r} then {left!r}) until released")

    def tokened(self):
        d = self.driver
        code, body = post(self.url, "/gpu/prepare-phase/2")
        if code != 401:
            raise Check(f"a POST without the token is refused with 401, got {code}: {body}")
        code, body = post(self.url, "/gpu/prepare-phase/2", self.token)
        if code != 200:
            raise Check(f"a POST with the token works, got {code}: {body}")
        self.ok("through the API, a POST without the token fails (401) and with it works")

        self.open_page()
        wait_for("vidi ready", lambda: state_is(d, "vidi", "ready"), 5)
        click(d, 'button[data-phase="3"]')
        form = d.find_element(By.ID, "token-form")
        wait_for("the page asks for the token", lambda: form.is_displayed(), 10)
        if "HTTP 401" not in d.find_element(By.ID, "refusal").text:
            raise Check("the 401 shown")
        if state_is(d, "cosyvoice", "ready"):
            raise Check("nothing changed without the token")
        self.ok("without a token the page's POST is refused and it asks for the token")
        self.shot("11-token-asked")

        d.find_element(By.ID, "token-input").send_keys(self.token)
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait_for("phase 3 done with the token",
                 lambda: state_is(d, "cosyvoice", "ready") and state_is(d, "vidi", "stopped"), CONVERGE_S)
        stored = d.execute_script(
            "return [sessionStorage.getItem('gpu-manager-token'), localStorage.length, document.cookie];")
        if stored != [self.token, 0, ""]:
            raise Check(f"the token kept in sessionStorage only, got {stored}")
        self.ok("with the token the page's POST works; the token is in sessionStorage only")
        self.shot("12-token-used")

    def parking(self, cosyvoice):
        """vidi parks for phase 3 and is resumed for phase 2; cosyvoice drains a job first."""
        d = self.driver
        self.open_page()
        for phase in (2, 3):
            code, body = post(self.url, f"/gpu/prepare-phase/{phase}")
            if code != 200:
                raise Check(f"phase {phase} answers 200, got {code}: {body}")
        wait_for("vidi parked on the page", lambda: state_is(d, "vidi", "parked"), 5)
        row = d.find_element(By.CSS_SELECTOR, '#services tr[data-service="vidi"]')
        cells = {cell: row.find_element(By.CSS_SELECTOR, f'[data-cell="{cell}"]').text
                 for cell in ("park", "residual")}
        if cells != {"park": "http", "residual": "512 MB"}:
            raise Check(f"vidi's park kind and residual in the table, got {cells}")
        badge = row.find_element(By.CSS_SELECTOR, ".state")
        if "state-parked" not in badge.get_attribute("class"):
            raise Check(f"the parked badge has its own style, got {badge.get_attribute('class')}")
        ready = d.find_element(By.CSS_SELECTOR, '#services tr[data-service="cosyvoice"] .state')
        looks = lambda e: (e.value_of_css_property("background-image"), e.value_of_css_property("border-top-style"))
        if looks(badge) == looks(ready):
            raise Check(f"parked looks other than ready by more than colour, both {looks(badge)}")
        wait_for("vidi's residual in the VRAM bar",
                 lambda: "vidi (parked) 512 MB" in d.find_element(By.ID, "vram-legend").text, 5)
        segment = d.find_element(By.CSS_SELECTOR, '#vram-bar [data-segment="vidi (parked)"]')
        if "parked-segment" not in segment.get_attribute("class"):
            raise Check("the parked residual is striped in the bar")
        wait_for("a park in the action log",
                 lambda: any(r.text.split()[1:3] == ["park", "vidi"]
                             for r in d.find_elements(By.CSS_SELECTOR, "#actions tbody tr")), 5)
        self.ok(f"vidi parked: its badge, park kind {cells['park']}, residual {cells['residual']}, "
                "striped in the VRAM bar, and its park in the action log")
        self.shot("21-parked")

        # A job in flight: cosyvoice drains before it parks for phase 2, and vidi resumes.
        request = urllib.request.Request(cosyvoice + "/job?ms=1500", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.status != 202:
                raise Check(f"the stand-in queued the job, got {response.status}")
        click(d, 'button[data-phase="2"]')
        wait_for("cosyvoice draining on the page", lambda: state_is(d, "cosyvoice", "draining"), 5)
        badge = d.find_element(By.CSS_SELECTOR, '#services tr[data-service="cosyvoice"] .state')
        if badge.value_of_css_property("border-top-style") != "dashed":
            raise Check("the draining badge is dashed")
        self.ok("cosyvoice shows draining (dashed) while its job runs")
        self.shot("22-draining")
        wait_for("cosyvoice parked and vidi resumed",
                 lambda: state_is(d, "cosyvoice", "parked") and state_is(d, "vidi", "ready"), CONVERGE_S)
        wait_for("the resume in the action log",
                 lambda: any(r.text.split()[1:3] == ["resume", "vidi"]
                             for r in d.find_elements(By.CSS_SELECTOR, "#actions tbody tr")), 5)
        self.ok("after the drain cosyvoice parked and vidi's resume is in the action log")
        self.shot("23-resumed")
        violations = self.csp_violations()
        if violations:
            raise Check(f"no Content-Security-Policy violations, got {violations}")

    def proxy(self, proxy_url):
        """ollama behind its proxy (stopped, a slow start, idle_ms 120 s): its proxy cell
        shows where consumers connect and its traffic; a streamed request through the proxy
        is seen waiting while ollama starts and in flight while it streams, and leaves a
        demand whose countdown runs between refreshes."""
        d = self.driver
        self.open_page()
        listen = proxy_url.split("://", 1)[1]
        cell = lambda: d.find_element(By.CSS_SELECTOR, '#services tr[data-service="ollama"] [data-cell="proxy"]')
        traffic = lambda: cell().find_element(By.CSS_SELECTOR, ".proxy-traffic")
        wait_for("ollama's proxy cell with its listen address, no traffic and no demand",
                 lambda: cell().text.splitlines() == [listen, "0 in flight · 0 waiting", "not demanded"], 5)
        others = {row.get_attribute("data-service"): row.find_element(By.CSS_SELECTOR, '[data-cell="proxy"]').text
                  for row in d.find_elements(By.CSS_SELECTOR, "#services tbody tr")
                  if row.get_attribute("data-service") != "ollama"}
        if set(others.values()) != {"-"}:
            raise Check(f"services without a proxy show -, got {others}")
        self.ok(f"ollama's proxy cell: {cell().text!r}; the others show -")
        self.shot("31-proxy-idle")

        # Waits while ollama starts (4 s), then streams 20 lines 300 ms apart.
        answer = {}

        def ask():
            try:
                with urllib.request.urlopen(proxy_url + "/stream?chunks=20&ms=300", timeout=60) as response:
                    answer["status"] = response.status
                    answer["body"] = response.read().decode()
            except Exception as error:  # reported below, with what the page showed
                answer["error"] = repr(error)
        asking = threading.Thread(target=ask)
        asking.start()
        wait_for("the request waiting on the page", lambda: traffic().get_attribute("data-waiting") == "1", 5)
        self.ok(f"the request is shown waiting while ollama starts: {traffic().text!r}")
        self.shot("32-proxy-waiting")
        wait_for("the request in flight on the page", lambda: traffic().get_attribute("data-in-flight") == "1", 10)
        demand = cell().find_element(By.CSS_SELECTOR, ".demand").text
        wanted = d.find_element(By.CSS_SELECTOR, '#services tr[data-service="ollama"] [data-cell="wanted"]').text
        if demand != "demanded while in use" or wanted != "demanded":
            raise Check(f"demanded while the request streams, got {demand!r} and wanted {wanted!r}")
        self.ok(f"the request is shown in flight while it streams: {traffic().text!r}, {demand!r}")
        self.shot("33-proxy-in-flight")
        asking.join(60)
        if answer.get("status") != 200 or "chunk 20 of 20" not in answer.get("body", ""):
            raise Check(f"the streamed request answered in full through the proxy, got {answer}")

        countdown = lambda: cell().find_element(By.CSS_SELECTOR, ".demand.countdown").text
        wait_for("the demand's countdown once the request ended", countdown, 10)
        first, later = counts_down(countdown, "demanded", 120)
        if traffic().text != "0 in flight · 0 waiting":
            raise Check(f"no traffic once the request ended, got {traffic().text!r}")
        self.ok(f"after the request the demand counts down ({first!r} then {later!r})")
        self.shot("34-proxy-demanded")
        violations = self.csp_violations()
        if violations:
            raise Check(f"no Content-Security-Policy violations, got {violations}")

    def close(self):
        self.driver.quit()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--token")
    parser.add_argument("--config", required=True, help="the daemon's config file, for the reload check")
    parser.add_argument("--parking", metavar="COSYVOICE_URL")
    parser.add_argument("--proxy", metavar="OLLAMA_PROXY_URL")
    args = parser.parse_args()
    os.makedirs(args.artifacts, exist_ok=True)
    run = Run(args.url, args.artifacts, args.token, args.config)
    try:
        if args.token:
            run.tokened()
        elif args.parking:
            run.parking(args.parking)
        elif args.proxy:
            run.proxy(args.proxy)
        else:
            run.untokened()
    except Check as failure:
        run.shot("failure")
        print(f"FAIL {failure}", file=sys.stderr)
        return 1
    finally:
        run.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
