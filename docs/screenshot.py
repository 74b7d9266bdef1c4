"""How docs/serve.png was made: the `serve` page in headless Chromium (Debian's, driven by Playwright), with a photo
captioned and one word's attention shown.

    uv run python docs/screenshot.py --model cache/demo/model.pt --image cache/demo/images/shape_00433.jpg \
        --out docs/serve.png [--word 2] [--width 1200 --height 720] [--phone docs/serve_phone.png]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "cache" / "demo" / "model.pt")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "serve.png")
    parser.add_argument("--phone", type=Path, help="also a phone-width (390 px) screenshot, the whole page")
    parser.add_argument("--word", type=int, default=1, help="index of the word whose attention is shown")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--colors", type=int, default=0, help="palette size of the saved PNG (0: keep RGB)")
    args = parser.parse_args()

    import torch
    import uvicorn
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    from pipeline.captioner import Captioner
    from pipeline.serve import ServeConfig, bind, create_app

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("error: Chromium is not installed (Debian: apt-get install chromium)", file=sys.stderr)
        return 1
    captioner = Captioner.load(args.model, torch.device("cpu"))
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(captioner, ServeConfig(), args.model.name), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    shots = [(args.out, {"width": args.width, "height": args.height}, False)]
    if args.phone:
        shots.append((args.phone, {"width": 390, "height": 844}, True))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True)
            for path, viewport, full in shots:
                page = browser.new_page(viewport=viewport)
                page.goto(url)
                expect(page.locator("#model")).to_contain_text("epoch")
                page.set_input_files("#file", str(args.image))
                word = page.locator("#words .word").nth(args.word)
                expect(word).to_be_visible(timeout=60_000)
                word.hover()
                expect(page.locator("#overlay.on")).to_have_count(1)
                page.wait_for_timeout(400)  # the overlay's fade-in
                page.screenshot(path=str(path), full_page=full)
                page.close()
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    for path, _, _ in shots:
        if args.colors:
            with Image.open(path) as img:
                img.convert("RGB").quantize(args.colors, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        print(f"{path}: {path.stat().st_size / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
