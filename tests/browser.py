"""What the console's browser tests share: headless Chromium (Debian's
chromium and chromium-driver, driven by selenium), a patient wait, a check
that stops at the first failure with the page's source, and the HTTP API
with a token. Imported by console_test.py and dmarc_console.py."""
import json, sys, urllib.request

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait


class Browser:
    def __init__(self, base, token):
        self.base, self.token = base, token
        opts = webdriver.ChromeOptions()
        opts.binary_location = "/usr/bin/chromium"
        for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
            opts.add_argument(a)
        self.driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
        # Views re-render after an action: an element found just before may be gone.
        self.wait = WebDriverWait(self.driver, 15, ignored_exceptions=(StaleElementReferenceException,))

    def check(self, cond, what):
        if not cond:
            print("FAILED:", what, file=sys.stderr)
            print(self.driver.page_source[:4000], file=sys.stderr)
            self.driver.quit()
            sys.exit(1)
        print("ok:", what)

    def api(self, path):
        req = urllib.request.Request(self.base + "/api/v1" + path,
                                     headers={"Authorization": "Bearer " + self.token})
        return json.load(urllib.request.urlopen(req))
