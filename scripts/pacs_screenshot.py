"""What a radiologist sees in Orthanc after the node answered: docs/pacs-orthanc.png.

    .venv/bin/python scripts/pacs_screenshot.py --data ../shared/data/chest_xray [--out docs/pacs-orthanc.png]

Starts Debian's Orthanc and the DICOM node (the bundled model) on loopback, sends one real test
film as a DX with storescu, waits for the SR and the heatmap SC in its study, and takes Debian
Chromium screenshots of Orthanc Explorer's study page, the SR's content tree
(dcmtk's dsrdump) and the SC's preview, in one PNG.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from dicom_node import RunningNode, dx_films, storescu  # noqa: E402
from orthanc import Orthanc, free_port  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def _orthanc_id(pacs: Orthanc, uid: str, level: str) -> str:
    (match,) = [m for m in pacs.post("/tools/lookup", uid.encode()) if m["Type"] == level]
    return match["ID"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="Kaggle-layout root (a real test film is sent)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "pacs-orthanc.png")
    args = parser.parse_args(argv)
    from PIL import Image
    from playwright.sync_api import sync_playwright
    from pydicom import dcmread

    film_path = sorted((args.data / "test" / "PNEUMONIA").glob("*.jpeg"))[7]
    with tempfile.TemporaryDirectory(prefix="pneumoscan-shot-") as scratch:
        root = Path(scratch)
        (source,) = dx_films([(film_path.name, film_path.read_bytes())], 1, root / "films")
        study_uid = dcmread(source).StudyInstanceUID
        node_port = free_port()
        pacs = Orthanc(root / "orthanc", node_port)
        try:
            with RunningNode(pacs, root / "node", None) as node:
                storescu(node.port, source)
                deadline = time.monotonic() + 60
                while len(pacs.post("/tools/find", json.dumps(
                        {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}).encode())) < 2:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the results did not reach Orthanc")
                    time.sleep(0.2)
            # the source film too, as the PACS would hold it (storescu sent it to the node only)
            pacs.post("/instances", source.read_bytes())
            study = _orthanc_id(pacs, study_uid, "Study")
            instances = {i["MainDicomTags"].get("Modality") or pacs.get(f"/instances/{i['ID']}/simplified-tags")["Modality"]:
                         i["ID"] for i in pacs.get(f"/studies/{study}/instances")}
            base = f"http://127.0.0.1:{pacs.http}"
            shots = []
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
                page = browser.new_page(viewport={"width": 1100, "height": 520})
                page.goto(f"{base}/app/explorer.html#study?uuid={study}")
                page.wait_for_selector("text=pneumoscan - research use only", timeout=15000)
                time.sleep(0.5)
                shots.append(page.screenshot())
                # the SR's content tree as dcmtk prints it (concept names and values, as a viewer lists them)
                sr_path = root / "sr.dcm"
                sr_path.write_bytes(pacs.get_bytes(f"/instances/{instances['SR']}/file"))
                tree = subprocess.run(["dsrdump", str(sr_path)], capture_output=True, text=True, check=True).stdout
                page.set_viewport_size({"width": 760, "height": 560})
                page.set_content("<h3 style='font-family:sans-serif'>The SR, as dcmtk's dsrdump lists it</h3>"
                                 "<pre style='font-size:11px;white-space:pre-wrap'>" + html.escape(tree) + "</pre>")
                shots.append(page.screenshot())
                page.set_viewport_size({"width": 330, "height": 560})
                page.goto(f"{base}/instances/{instances['OT']}/preview")
                shots.append(page.screenshot())
                browser.close()
        finally:
            pacs.stop()
    study_shot, *below = [Image.open(io.BytesIO(shot)).convert("RGB") for shot in shots]
    width = max(study_shot.width, sum(i.width for i in below) + 10)
    sheet = Image.new("RGB", (width, study_shot.height + 10 + max(i.height for i in below)), "white")
    sheet.paste(study_shot, (0, 0))
    x = 0
    for image in below:  # the SR's text and the heatmap SC under the study's series
        sheet.paste(image, (x, study_shot.height + 10))
        x += image.width + 10
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
