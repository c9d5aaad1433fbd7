"""Click-to-mask latency of `sam-jax annotate` in a real browser, and what embedding costs.

    python experiments/annotate_latency.py --images DIR [--clicks 50] [--checkpoint PATH]
        [--out experiments/results/annotate_latency]

Starts the real command (the bundled model unless --checkpoint), opens it in headless chromium
(Playwright) and clicks `--clicks` times at random places of the first images: each click is
one /api/predict call, the time measured in the page from the click's request to the mask
drawn (`window.lastClickMs`), so it includes the decode, the PNG encoding of the candidates,
the transfer and the canvas drawing. Then it opens the next images: the time to open an image
whose embedding the server computed in the background (while the annotator worked on the
previous one) against the embedding time itself. Writes a table (.txt), the numbers (.json)
and a screenshot of the tool (.png).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True)
    parser.add_argument("--clicks", type=int, default=50)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--port", type=int, default=8799)
    parser.add_argument("--out", default="experiments/results/annotate_latency")
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright

    out_dir = tempfile.mkdtemp(prefix="annotate-latency-")
    cmd = [sys.executable, "-m", "sam_jax", "annotate", args.images, "-o", out_dir,
           "--port", str(args.port), "-q"]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    server = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=REPO))
    url = f"http://127.0.0.1:{args.port}/"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "api/images", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        names = json.loads(urllib.request.urlopen(url + "api/images").read())["images"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                        args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            page.wait_for_function("document.getElementById('status').textContent"
                                   ".includes('objects')", timeout=300_000)
            box = page.locator("#overlay").bounding_box()
            w, h = page.evaluate("[overlay.width, overlay.height]")
            rng = np.random.default_rng(0)
            times = []
            for i in range(args.clicks + 3):  # the first 3 compile the decode's shapes
                if i % 4 == 0:
                    page.keyboard.press("Escape")  # a new object every 4 clicks
                x, y = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
                negative = i % 4 == 3  # every 4th click a background point
                with page.expect_response("**/api/predict"):
                    if negative:
                        page.keyboard.down("Shift")
                    page.mouse.click(box["x"] + x, box["y"] + y)
                    if negative:
                        page.keyboard.up("Shift")
                page.wait_for_function("window.lastClickMs !== undefined")
                page.wait_for_timeout(50)  # the drawing after the response
                ms = page.evaluate("window.lastClickMs")
                page.evaluate("window.lastClickMs = undefined")
                if i >= 3:
                    times.append(ms)
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            page.screenshot(path=args.out + ".png")
            opens = []
            for name in [n["name"] for n in names[1:4]]:
                time.sleep(3)  # the annotator works; the server embeds the next image
                t = time.perf_counter()
                info = page.evaluate(f"fetch('/api/open', {{method: 'POST', headers: "
                                     f"{{'Content-Type': 'application/json'}}, body: "
                                     f"JSON.stringify({{name: {json.dumps(name)}}})}})"
                                     f".then(r => r.json())")
                opens.append({"image": name, "open_seconds": time.perf_counter() - t,
                              "embed_seconds": info["embed_seconds"]})
            browser.close()
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(out_dir, ignore_errors=True)
    t = np.array(times)
    result = {"clicks": len(t), "median_ms": float(np.median(t)),
              "p95_ms": float(np.percentile(t, 95)), "max_ms": float(t.max()),
              "opens": opens, "checkpoint": args.checkpoint or "bundled"}
    lines = [f"sam-jax annotate, {result['checkpoint']} model, {len(t)} clicks in headless "
             "chromium on this machine",
             "| click to mask drawn | median | p95 | max |", "|---|---|---|---|",
             f"| ms | {result['median_ms']:.0f} | {result['p95_ms']:.0f} | "
             f"{result['max_ms']:.0f} |", "",
             "| next image | embedding (background) | open in the tool |", "|---|---|---|"]
    lines += [f"| {o['image']} | {o['embed_seconds']:.2f} s | {o['open_seconds']:.2f} s |"
              for o in opens]
    text = "\n".join(lines)
    print(text)
    with open(args.out + ".txt", "w") as f:
        f.write(text + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
