"""The support console in headless Chromium (Debian's chromium and
chromium-driver, driven by selenium), logged in with a token scoped to one
tenant. Called by tests/tenants.rs; exits non-zero with a message on the
first check that fails.

usage: tenant_console.py BASE_URL TENANT_TOKEN OWN_QUEUED_ID OTHER_ID OWN_DELIVERED_ID
"""
import sys

from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC

from browser import Browser

base, token, own_queued, other_id, own_done = sys.argv[1:6]
# What the other tenant (beta) sent: none of it may appear.
OTHER = [other_id, "beta.example", "Beta ", "dave@dest.test"]

b = Browser(base, token)
driver, wait, check = b.driver, b.wait, b.check


def text(css):
    return wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, css))).text


def nothing_of_the_other(where, but=()):
    src = driver.page_source
    for mark in (m for m in OTHER if m not in but):
        check(mark not in src, f"{where}: nothing of the other tenant ({mark!r})")


def view(name):
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-view") == name)


try:
    driver.get(base + "/console/#/queue")
    wait.until(EC.visibility_of_element_located((By.ID, "token"))).send_keys(token)
    driver.find_element(By.ID, "login-button").click()
    view("queue")
    check(text("#scope") == "tenant acme", "the header names the tenant: " + text("#scope"))
    check(not driver.find_element(By.ID, "nav-dmarc").is_displayed(), "no DMARC page for a tenant")
    queue = text("#queue")
    check(own_queued in queue, "its queued message is listed")
    check(len(driver.find_elements(By.ID, "pause")) == 0, "no button to pause all delivery")
    routes = text("#routes")
    check("acme-relay" in routes and "\nup " not in routes, "only its own route: " + routes)
    nothing_of_the_other("queue")

    driver.get(base + "/console/#/message/" + own_done)
    check("delivered" in text("#events"), "its delivered message, with its events")
    driver.get(base + "/console/#/message/" + other_id)
    check("no message" in text("#error"), "the other tenant's message is not there")
    # (The error names the id asked for, nothing more.)
    nothing_of_the_other("the other's message", but=[other_id])

    driver.get(base + "/console/#/suppressions")
    view("suppressions")
    rows = driver.find_elements(By.CSS_SELECTOR, "#suppressions tbody tr")
    check(len(rows) == 1 and "gina@dest.test" in rows[0].text and "tenant acme" in rows[0].text,
          "its own suppression only: " + " | ".join(r.text for r in rows))

    driver.get(base + "/console/#/trace/frank@dest.test")
    view("trace")
    check(len(driver.find_elements(By.CSS_SELECTOR, "#events tbody tr")) == 0,
          "no events of the other tenant's recipient")
    nothing_of_the_other("trace")

    driver.get(base + "/console/#/")
    view("overview")
    check(text("#last-delivered") == "1", "the overview counts its own deliveries: " + text("#last-delivered"))
    nothing_of_the_other("overview")
finally:
    driver.quit()
