"""The dashboard in a real headless Chromium (Debian's, driven by Selenium and
Debian's chromium-driver), against a running capstan daemon that
tests/dashboard.rs started.

Checks each page, the charts, the queries, the trace waterfall from a log
line, the deploy annotation, keyboard use and labels, the contrast of both
themes, that no console error happened and that the secret never appears in a
page or in any response the UI fetched. Prints the performance figures as
`FIGURE name value` lines and saves screenshots in the artifacts folder.

Usage: dashboard.py URL SECRET ARTIFACTS TOKEN
"""

import json
import os
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

URL, SECRET, ARTIFACTS, TOKEN = sys.argv[1:5]
os.makedirs(ARTIFACTS, exist_ok=True)
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL", what, flush=True)
    return cond


def figure(name, value, unit):
    print(f"FIGURE {name} {value:.1f} {unit}", flush=True)


def browser():
    o = webdriver.ChromeOptions()
    o.binary_location = "/usr/bin/chromium"
    for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1400,1000", "--no-first-run", "--disable-extensions"]:
        o.add_argument(a)
    o.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)
    d.set_page_load_timeout(60)
    d.execute_cdp_cmd("Network.enable", {})
    return d


def wait(d, cond, what, timeout=40):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        try:
            last = d.execute_script(cond)
            if last:
                return last
        except Exception as e:  # the page is loading
            last = e
        time.sleep(0.2)
    check(False, f"timed out waiting for {what} (last: {last})")
    return None


seen_requests = {}


def audit(d, where):
    """No console errors, no secret in the page or in any response fetched."""
    for entry in d.get_log("browser"):
        if entry["level"] == "SEVERE":
            check(False, f"console error on {where}: {entry['message']}")
    check(SECRET not in d.page_source, f"the secret is in the page {where}")
    for entry in d.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.responseReceived":
            seen_requests[msg["params"]["requestId"]] = msg["params"]["response"]["url"]
        if msg["method"] == "Network.loadingFinished":
            rid = msg["params"]["requestId"]
            url = seen_requests.get(rid, "?")
            try:
                body = d.execute_cdp_cmd("Network.getResponseBody", {"requestId": rid})
            except Exception:
                continue  # gone with its page
            check(SECRET not in body.get("body", ""), f"the secret is in the response of {url}")


def shot(d, name):
    d.save_screenshot(os.path.join(ARTIFACTS, name + ".png"))


def unnamed_controls(d):
    return d.execute_script("""
      const out = [];
      for (const e of document.querySelectorAll('input:not([type=hidden]), select, textarea, button')) {
        const named = e.getAttribute('aria-label') || e.labels?.length || e.textContent.trim() || e.title;
        if (!named) out.push(e.outerHTML.slice(0, 80));
      }
      return out;""")


def contrast(d):
    """Contrast ratios of the theme's text colours on its background."""
    return d.execute_script("""
      const rgb = c => { const x = document.createElement('div'); x.style.color = c; document.body.append(x);
        const v = getComputedStyle(x).color.match(/[\\d.]+/g).map(Number); x.remove(); return v; };
      const lum = ([r, g, b]) => { const f = v => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
        return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
      const ratio = (a, b) => { const [x, y] = [lum(rgb(a)), lum(rgb(b))].sort((p, q) => q - p); return (x + 0.05) / (y + 0.05); };
      const v = n => getComputedStyle(document.documentElement).getPropertyValue(n).trim();
      const out = {};
      for (const bg of ['--bg', '--panel']) for (const fg of ['--fg', '--dim', '--ok', '--bad', '--warn', '--accent'])
        out[fg + ' on ' + bg] = ratio(v(fg), v(bg));
      return out;""")


def main():
    d = browser()
    try:
        run(d)
    finally:
        d.quit()
    if failures:
        print(f"{len(failures)} checks failed", flush=True)
        sys.exit(1)
    print("all checks passed", flush=True)


def run(d):
    # -- Log in (the stack requires the token on loopback too).
    d.get(URL + "/explore?q=up")
    check("/login" in d.current_url, f"a browser without the token is sent to the login form ({d.current_url})")
    d.find_element(By.ID, "token").send_keys("not-the-token" + Keys.ENTER)
    check("not this daemon's token" in d.page_source, "a wrong token is refused with why")
    d.get_log("browser")  # the 401 of the refused form is expected
    d.find_element(By.ID, "token").send_keys(TOKEN + Keys.ENTER)
    # The form's answer redirects: wait for the navigation to end.
    end = time.time() + 20
    while not d.current_url.endswith("/explore?q=up") and time.time() < end:
        time.sleep(0.1)
    url = d.current_url
    check(url.endswith("/explore?q=up"), f"login goes back to the page asked for ({url})")
    cookies = d.execute_cdp_cmd("Network.getCookies", {"urls": [URL]})["cookies"]
    c = [c for c in cookies if c["name"] == "capstan_token"]
    check(c and c[0]["httpOnly"] and c[0]["sameSite"] == "Strict",
          f"the token is kept in an HttpOnly, SameSite=Strict cookie ({c})")
    audit(d, "login")

    # -- Overview: first paint and bytes (the daemon is warm, the browser cold).
    d.execute_cdp_cmd("Network.clearBrowserCache", {})
    d.get(URL + "/")
    wait(d, "return document.querySelectorAll('figure.chart[data-series]').length >= 6", "the overview's charts")
    paint = d.execute_script("return performance.getEntriesByName('first-contentful-paint')[0]?.startTime")
    transferred = d.execute_script("""
      const nav = performance.getEntriesByType('navigation')[0];
      return nav.transferSize + performance.getEntriesByType('resource').reduce((n, r) => n + r.transferSize, 0);""")
    check(paint is not None, "the overview has a first contentful paint")
    figure("overview_first_contentful_paint", paint or 0, "ms")
    figure("overview_transferred", (transferred or 0) / 1024, "KiB")
    text = d.find_element(By.ID, "main").text
    check("web" in text and "ready" in text, "the overview lists the services")
    check("Replicas" in text and "web-0" in text, "the overview lists the replicas")
    check("Recent events" in text, "the overview lists recent events")
    check(d.execute_script("return document.querySelector('figure.chart').dataset.series") not in (None, "0"),
          "the requests chart has series")
    # The deploy (the second `capstan up`) is marked on the charts; hovering says what it was.
    marks = wait(d, """
      const c = window.capstanCharts.find(c => c.opts.title.startsWith('Requests per second'));
      return c && (c.marks || []).filter(m => m.a.kind === 'updated').map(m => m.x);""", "a deploy annotation")
    if check(marks, "a deploy annotation is drawn on the requests chart"):
        canvas = d.execute_script(
            "return window.capstanCharts.find(c => c.opts.title.startsWith('Requests per second')).canvas")
        w = canvas.size["width"]
        h = canvas.size["height"]
        ActionChains(d).move_to_element_with_offset(canvas, int(marks[-1] - w / 2), int(h / 2 - 20)).perform()
        tip = wait(d, """const t = window.capstanCharts.find(c => c.opts.title.startsWith('Requests per second')).tip;
          return !t.hidden && t.textContent""", "the annotation's tooltip")
        check(tip and "updated" in tip and "revision 1 -> 2" in tip, f"hovering the mark says what happened ({tip})")
    check(not unnamed_controls(d), f"every control on the overview has a name: {unnamed_controls(d)}")
    shot(d, "overview")
    # Both themes: readable text everywhere.
    for theme in ["light", "dark"]:
        d.execute_script(f"document.documentElement.dataset.theme = '{theme}'")
        for pair, r in contrast(d).items():
            check(r >= 4.5, f"{theme} theme: contrast of {pair} is {r:.2f}, below 4.5")
    shot(d, "overview-dark")
    d.execute_script("document.documentElement.dataset.theme = 'light'")
    # The theme button cycles and is kept.
    d.find_element(By.ID, "theme").click()
    check(d.execute_script("return localStorage.getItem('capstan-theme')") == "dark", "the theme button picks dark")
    d.find_element(By.ID, "theme").click()
    d.find_element(By.ID, "theme").click()
    # Keyboard: Tab reaches the navigation's links in order.
    d.execute_script("document.querySelector('header a.brand').focus()")
    order = []
    for _ in range(6):
        ActionChains(d).send_keys(Keys.TAB).perform()
        order.append(d.execute_script("return document.activeElement.textContent.trim()"))
    check(order == ["Overview", "Metrics", "Logs", "Traces", "Alerts", "auto theme"],
          f"Tab goes through the navigation, then the theme button ({order})")
    audit(d, "overview")

    # -- Service page: revisions without environment values, charts, live logs.
    d.get(URL + "/service/web")
    wait(d, "return document.querySelectorAll('figure.chart[data-series]').length >= 5", "the service's charts")
    text = d.find_element(By.ID, "main").text
    check("environment.VERSION: changed" in text, "the revision history says the environment changed")
    check("Revisions" in text and "deploy" in text, "the service page lists revisions")
    wait(d, "return document.querySelectorAll('#service-logs li').length > 0", "the service's log lines")
    scaler = wait(d, """const c = window.capstanCharts.find(c => c.opts.title.startsWith('Autoscaler: each metric'));
      return c && c.series.map(s => s.name)""", "the autoscaler's chart")
    check(scaler and "rps" in scaler, f"the autoscaler's metric is charted against its target ({scaler})")
    check("Autoscaler" in text and "of 2–3 replicas wanted" in text, "the autoscaler's state is shown")
    shot(d, "service")
    check(not unnamed_controls(d), f"every control on the service page has a name: {unnamed_controls(d)}")
    audit(d, "service")

    # -- Explore: completion, a chart with the expected number of series, the table.
    d.get(URL + "/explore")
    box = d.find_element(By.ID, "query")
    box.send_keys("node_load")
    # The list follows each keystroke: wait for the one of the whole word.
    options = wait(d, """const v = [...document.querySelectorAll('#suggestions li')].map(e => e.textContent);
      return v.includes('node_load1') && v""", "metric completion")
    check(options and "node_load1" in options, f"metric names complete ({options})")
    box.send_keys(Keys.ENTER)  # accepts the first suggestion
    check(box.get_attribute("value") in ("node_load1", "node_load15", "node_load5"),
          f"Enter accepts a suggestion ({box.get_attribute('value')})")
    box.clear()
    box.send_keys('up{job="')
    values = wait(d, """const v = [...document.querySelectorAll('#suggestions li')].map(e => e.textContent);
      return v.includes('web') && v""", "label value completion")
    check(values and "capstan" in values and "web" in values, f"label values complete ({values})")
    box.send_keys(Keys.ESCAPE)
    box.clear()
    box.send_keys('{__name__=~"node_load1|node_load5|node_load15"}')
    box.send_keys(Keys.ENTER)
    n = wait(d, "return document.getElementById('status').dataset.series", "the query's result")
    check(n == "3", f"the chart has 3 series ({n})")
    check("node_load15" in d.current_url, f"the query is in the URL to share ({d.current_url})")
    d.find_element(By.ID, "tab-table").click()
    rows = wait(d, "return document.querySelectorAll('#result tbody tr').length", "the table")
    check(rows == 3, f"the table has 3 rows ({rows})")
    shot(d, "explore")
    # A wrong query says what is wrong, on the page (not in the console).
    d.get(URL + "/explore?q=rate(up[5m]")
    err = wait(d, "const s = document.getElementById('status'); return s.className === 'bad' && s.textContent",
               "the query's error")
    check(err and "parse" in err.lower(), f"a wrong query shows the parser's error ({err})")
    d.get_log("browser")  # the 400 of that query is the expected one
    # Histogram buckets as a heatmap.
    q = 'sum by (le) (rate(http_request_duration_seconds_bucket{job="capstan"}[1m]))'
    d.get(URL + "/explore?heatmap=1&q=" + q)
    wait(d, "return +document.getElementById('status').dataset.series > 1", "the bucket series")
    rows = d.execute_script("const c = window.capstanCharts.at(-1); return c.opts.heatmap && c.rows.length")
    check(rows and rows > 1, f"buckets draw as a heatmap ({rows} rows)")
    check(d.execute_script("return window.capstanCharts.at(-1).opts.unit") == "seconds", "the heatmap is in seconds")
    # The legend toggles series; dragging zooms.
    d.get(URL + '/explore?q={__name__=~"node_load1|node_load5|node_load15"}')
    wait(d, "return document.getElementById('status').dataset.series == '3'", "the three series")
    keys = d.find_elements(By.CSS_SELECTOR, "#result .legend button.key")
    keys[0].click()
    pressed = [k.get_attribute("aria-pressed") for k in d.find_elements(By.CSS_SELECTOR, "#result .legend button.key")]
    check(pressed == ["true", "false", "false"], f"clicking a legend entry shows only that series ({pressed})")
    canvas = d.find_element(By.CSS_SELECTOR, "#result canvas")
    w = canvas.size["width"]
    ActionChains(d).move_to_element_with_offset(canvas, int(w / 2 - 200), 0).click_and_hold() \
        .move_by_offset(150, 0).release().perform()
    wait(d, "return new URLSearchParams(location.search).get('end')", "the zoom")
    rng = d.execute_script("return new URLSearchParams(location.search).get('range')")
    check(rng in ("5m", "15m"), f"dragging over a quarter of an hour zooms in ({rng})")
    # 100 series over 1 h at 15 s (written by the test through remote_write).
    d.get(URL + "/explore?q=dashboard_bench_series&range=1h")
    n = wait(d, "return document.getElementById('status').dataset.series", "the 100-series chart")
    check(n == "100", f"the bench chart has 100 series ({n})")
    draws = []
    for _ in range(5):
        d.find_element(By.CSS_SELECTOR, "form.query button[type=submit]").click()
        time.sleep(0.5)
        wait(d, "return document.getElementById('status').dataset.series == '100'", "the redraw")
        draws.append(d.execute_script("return window.capstanChartDrawMs"))
        total = d.execute_script("return performance.getEntriesByName('capstan-chart').at(-1).duration")
    draws.sort()
    figure("chart_100_series_draw_median", draws[len(draws) // 2], "ms")
    figure("chart_100_series_query_and_draw_last", total, "ms")
    shot(d, "explore-100")
    check(not unnamed_controls(d), f"every control on explore has a name: {unnamed_controls(d)}")
    audit(d, "explore")

    # -- Logs: a LogQL query, its histogram, context, and a trace from a line.
    d.get(URL + '/logs?q=' + '{service="web"} |= "GET"')
    n = wait(d, "return +document.getElementById('status').dataset.lines", "matching log lines")
    check(n and n > 0, f"the LogQL query finds lines ({n})")
    lines = d.execute_script("return [...document.querySelectorAll('#log-lines > li .text')].map(e => e.textContent)")
    check(lines and all("GET" in x for x in lines), "every line shown matches the filter")
    wait(d, "return document.querySelector('#histogram figure.chart')?.dataset.series === '1'", "the histogram")
    d.find_element(By.CSS_SELECTOR, "#log-lines > li button.link").click()
    wait(d, "return document.querySelectorAll('li.context li').length > 0", "context lines")
    shot(d, "logs")
    audit(d, "logs")
    link = d.find_element(By.CSS_SELECTOR, "#log-lines > li a.trace")
    trace_id = link.get_attribute("href").rsplit("/", 1)[1]
    link.click()
    spans = wait(d, "return document.querySelectorAll('#waterfall button.span').length", "the trace waterfall")
    check(spans and spans >= 1, f"the waterfall shows the trace's spans ({spans})")
    detail = d.find_element(By.ID, "span-detail").text
    check("http" in detail.lower(), f"the span's attributes are shown ({detail[:200]})")
    check(trace_id in d.page_source, "the trace page names the trace")
    wait(d, "return document.querySelectorAll('#trace-logs li').length > 0", "the span's log lines")
    shot(d, "trace")
    audit(d, "trace")
    # Live tail: new lines arrive while the test's load runs.
    d.get(URL + '/logs?q=' + '{service="web"}')
    wait(d, "return document.getElementById('status').dataset.lines", "the logs page")
    d.find_element(By.ID, "live-tail").click()
    n = wait(d, "return document.querySelectorAll('#log-lines li').length", "live lines")
    check(n and n > 0, "live tail shows new lines")
    d.find_element(By.ID, "live-tail").click()
    audit(d, "live tail")

    # -- Traces search.
    d.get(URL + "/traces")
    rows = wait(d, "return document.querySelectorAll('#result tbody tr').length", "trace search results")
    check(rows and rows > 0, f"the trace search finds traces ({rows})")
    check(not unnamed_controls(d), f"every control on traces has a name: {unnamed_controls(d)}")
    audit(d, "traces")

    # -- Alerts: the firing alert with its annotations, and its history.
    d.get(URL + "/alerts")
    text = d.find_element(By.ID, "main").text
    check("DashboardTest" in text and "firing" in text, "the alerts page shows the firing alert")
    check("the dashboard test fires this" in text, "with its annotations")
    wait(d, "return [...document.querySelectorAll('#alert-history li')].some(l => l.textContent.includes('DashboardTest'))",
         "the alert history")
    shot(d, "alerts")
    audit(d, "alerts")


main()
