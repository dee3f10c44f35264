"""The DMARC page of the support console in headless Chromium (Debian's
chromium and chromium-driver, driven by selenium). Called by tests/dmarc.rs
once herald holds the real reports of tests/data/dmarc; exits non-zero with
a message on the first check that fails.

usage: dmarc_console.py BASE_URL TOKEN
"""
import sys

from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC

from browser import Browser

base, token = sys.argv[1:3]

b = Browser(base, token)
driver, wait, check, api = b.driver, b.wait, b.check, b.api


try:
    driver.get(base + "/console/#/dmarc/5000d")
    wait.until(EC.visibility_of_element_located((By.ID, "token"))).send_keys(token)
    driver.find_element(By.ID, "login-button").click()
    try:
        section = wait.until(EC.presence_of_element_located(
            (By.CSS_SELECTOR, "section.dmarc-domain[data-domain='stalw.art']")))
    except Exception:
        check(False, "the page shows the domain (browser log: %s)" % driver.get_log("browser"))
    want = api("/dmarc?since=5000d")["domains"][0]
    check(section.find_element(By.CSS_SELECTOR, ".diagnosis").text == want["diagnosis"],
          "the page says the diagnosis of the API")
    bars = section.find_elements(By.CSS_SELECTOR, "svg.pass-chart rect.day")
    check(len(bars) == len(want["daily"]) and len(bars) >= 4, f"one bar per day ({len(bars)})")
    for bar, day in zip(bars, want["daily"]):
        check(bar.get_attribute("data-day") == day["day"]
              and float(bar.get_attribute("data-rate")) == float(day["pass_pct"]),
              f"bar of {day['day']} at {day['pass_pct']}%")
    rows = [r.text for r in section.find_elements(By.CSS_SELECTOR, "table[id='sources-stalw.art'] tbody tr")]
    check(any(r.startswith("herald 2a01:4f9:c011:b43c::1") for r in rows), "herald's own source listed")
    check(any(r.startswith("OTHER 50.223.129.194 3 0") for r in rows), "the other server listed apart")
    # Reporter names come from whoever sent a report: shown as text.
    check('"backschues.NET' in section.text, "a reporter name with a quote shown as text")
    try:
        driver.switch_to.alert
        check(False, "no script ran")
    except NoAlertPresentException:
        pass
    # A period without reports says how to get them.
    driver.get(base + "/console/#/dmarc/7d")
    check("No DMARC aggregate reports" in wait.until(
        EC.presence_of_element_located((By.ID, "no-reports"))).text, "an empty period explains itself")
finally:
    driver.quit()
