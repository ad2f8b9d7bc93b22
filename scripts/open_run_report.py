"""Open a run report (reports/run_<run_id>.html) in headless Chromium: check that the browser renders
every section and decodes every embedded image, and save a screenshot.

    .venv/bin/python scripts/open_run_report.py WAREHOUSE/reports/run_<run_id>.html OUT.png [--chromium PATH]

Needs a Chromium binary (Debian: ``apt-get install chromium``); the tests do not, they parse the page.
Exits non-zero, naming what is missing, when a section or an image did not render.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# Without the networking flags Chromium tries Google's hosts at start-up, which a closed network refuses.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Runs in the page after load: each section title, and each image's decoded width (0: not decoded).
PROBE = """<script>window.addEventListener('load', () => {
  const out = document.createElement('pre'); out.id = 'probe';
  out.textContent = JSON.stringify({sections: [...document.querySelectorAll('h2')].map(h => h.textContent),
                                    widths: [...document.images].map(i => i.naturalWidth)});
  document.body.appendChild(out);});</script>"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path)
    parser.add_argument("screenshot", type=Path)
    parser.add_argument("--chromium", default="chromium")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lib.platform.run_report import SECTIONS

    with tempfile.TemporaryDirectory() as profile:
        probed = Path(profile) / "probed.html"
        probed.write_text(args.report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"),
                          encoding="utf-8")
        base = [args.chromium, *FLAGS, f"--user-data-dir={profile}"]
        dom = subprocess.run([*base, "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        subprocess.run([*base, f"--screenshot={args.screenshot.resolve()}", "--window-size=1000,1400",
                        args.report.resolve().as_uri()], capture_output=True, timeout=120, check=True)
    found = json.loads(dom.split('<pre id="probe">', 1)[1].split("</pre>", 1)[0].replace("&quot;", '"')
                       .replace("&amp;", "&").replace("&#39;", "'"))
    missing = [s.title for s in SECTIONS if s.title not in found["sections"]]
    undecoded = sum(1 for width in found["widths"] if width == 0)
    print(f"{len(found['sections'])} sections, {len(found['widths'])} images ({undecoded} not decoded); "
          f"screenshot {args.screenshot} ({args.screenshot.stat().st_size} bytes)")
    if missing or undecoded or not found["widths"]:
        print(f"missing sections: {missing}" if missing else "an image did not render", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
