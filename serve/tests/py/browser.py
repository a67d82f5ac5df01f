"""The chat page in a real headless browser (Debian's chromium + chromium-driver, selenium):
type a question, watch the answer stream in, start a new conversation, ask again.

    python3 serve/tests/py/browser.py target/debug/vet-serve [screenshot.png]
"""

import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from server import Server

# Records every text the answer bubble shows, to see it grow piece by piece.
WATCH = """
window.__texts = [];
new MutationObserver(() => {
  const a = document.querySelectorAll('.msg.assistant');
  if (a.length) window.__texts.push(a[a.length - 1].textContent);
}).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
"""


def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,800"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def ask(d, question):
    box = d.find_element(By.ID, "q")
    box.send_keys(question)
    d.find_element(By.ID, "send").click()
    WebDriverWait(d, 60).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        and d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].get_attribute("data-state") != "streaming")
    last = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    assert last.get_attribute("data-state") == "done", last.text
    return last.text


def main(binary, shot):
    with Server(binary, "--default-max-tokens", "400") as s:
        d = browser()
        try:
            d.get(s.url + "/")
            assert d.find_element(By.ID, "model").text == "tiny"
            assert "not clinical advice" in d.find_element(By.CLASS_NAME, "note").text
            d.execute_script(WATCH)
            answer = ask(d, "How often should a puppy be vaccinated?")
            assert answer.strip(), "empty answer"
            texts = [t for t in d.execute_script("return window.__texts") if t]
            growing = sorted(set(texts), key=len)
            assert len(growing) >= 2, f"the answer did not stream: {texts}"
            assert all(answer.startswith(t) for t in growing), "shown text was rewritten"
            assert len(d.find_elements(By.CSS_SELECTOR, ".msg.user")) == 1
            ask(d, "And for an adult dog?")
            assert len(d.find_elements(By.CSS_SELECTOR, ".msg")) == 4
            d.save_screenshot(shot)
            d.find_element(By.ID, "new").click()
            assert d.find_elements(By.CSS_SELECTOR, ".msg") == [], "new conversation kept messages"
            ask(d, "What should a parrot eat?")
            assert len(d.find_elements(By.CSS_SELECTOR, ".msg")) == 2
        finally:
            d.quit()
    print(f"browser: ok (streamed answer, follow-up, new conversation); screenshot {shot}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "target/debug/vet-serve",
         sys.argv[2] if len(sys.argv) > 2 else "target/vet-serve-page.png")
