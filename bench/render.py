"""Rendering benchmark: headless chromium on the chat page while a markdown
answer streams at 300 chunks/s from the fake model server. Prints frames per
second during the stream, long tasks (over 50 ms) and how far rendering lags
behind the last delta. Loopback only; every wait is bounded.

    .venv/bin/python bench/render.py [--rate 300] [--repeat 40]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fake_llm import FakeLLM
from tests.live import running_site

SECTION = """## Section {i}

Some **bold** text, some `inline code`, and a [link](https://example.com/{i}).

- item one with *emphasis*
- item two

| a | b |
|---|---|
| {i} | {i} |

```python
def f{i}(x):
    return x * {i}
```

"""

OBSERVE = """() => {
    window.__bench = {frames: 0, long: []};
    new PerformanceObserver((list) => {
        for (const entry of list.getEntries()) window.__bench.long.push(entry.duration);
    }).observe({entryTypes: ["longtask"]});
    const tick = () => { window.__bench.frames++; requestAnimationFrame(tick); };
    requestAnimationFrame(tick);
}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=300, help="chunks per second")
    parser.add_argument("--repeat", type=int, default=40, help="markdown sections")
    args = parser.parse_args()
    prompt = "".join(SECTION.format(i=i) for i in range(args.repeat))
    # echo=raw streams the user's message back in 5-character chunks.
    model = f"fake:echo=raw,delay={1 / args.rate:.5f}"
    chunks = -(-len(prompt) // 5)

    fake = FakeLLM().start()
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_site(Path(tmp), fake.base_url, LOG_LEVEL="WARNING") as site,
    ):
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path="/usr/bin/chromium",
                    args=[
                        "--headless",
                        "--no-sandbox",
                        "--disable-gpu",
                        "--disable-background-networking",
                    ],
                )
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.goto(site.url() + "/accounts/signup/")
                page.fill("input[name=username]", "bench")
                page.fill("input[name=password1]", "correct horse battery staple")
                page.fill("input[name=password2]", "correct horse battery staple")
                page.click("button[type=submit]")
                page.wait_for_selector("#connection-status:has-text('connected')", timeout=15000)
                page.evaluate(
                    """(name) => {
                        const select = document.querySelector("#model");
                        select.add(new Option(name, name));
                        select.value = name;
                        select.dispatchEvent(new Event("change"));
                    }""",
                    model,
                )
                page.fill("#prompt", prompt)
                page.evaluate(OBSERVE)
                started = time.perf_counter()
                page.click("#send")
                page.wait_for_selector(
                    "article.message.assistant[data-status=complete]", timeout=120_000
                )
                ended = time.perf_counter()
                bench = page.evaluate("() => window.__bench")
                blocks = page.locator("article.message.assistant pre code").count()
                footer = page.locator("article.message.assistant footer").inner_text()
                browser.close()
        finally:
            fake.stop()
    seconds = ended - started
    long = bench["long"]
    print(f"{chunks} chunks ({len(prompt)} characters of markdown) at {args.rate:.0f}/s")
    alone = chunks / args.rate
    print(f"  stream to rendered end      {seconds:.2f} s (the model alone needs {alone:.2f} s)")
    print(f"  frames per second           {bench['frames'] / seconds:.0f}")
    print(f"  long tasks (>50 ms)         {len(long)}, longest {max(long, default=0):.0f} ms")
    print(f"  code blocks rendered        {blocks} of {args.repeat}")
    print(f"  the reply's footer          {' '.join(footer.split())}")


if __name__ == "__main__":
    main()
