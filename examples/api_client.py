"""Drive a running DreamBooth Studio over HTTP: photos -> a short training -> generate.

    python app.py &                                   # or a Space's URL
    python examples/api_client.py --url http://127.0.0.1:7860 --photos my_dog/ --out dog.png

Uses only the automation API (prepare_photos, start_training, training_status, list_adapters,
generate) through gradio_client, so it keeps working whatever the page layout becomes. Exits 0 when
an image was written, 1 with one line on stderr otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".avif"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="The app's address, e.g. http://127.0.0.1:7860")
    p.add_argument("--photos", required=True, type=Path, help="Folder with 5-20 photos of the subject")
    p.add_argument("--out", required=True, type=Path, help="Where to write the generated PNG")
    p.add_argument("--token", default="sks", help="Trigger token (default sks)")
    p.add_argument("--class-noun", default="dog", help="What the subject is (default dog)")
    p.add_argument("--subject-type", default="pet", choices=["person", "pet", "object", "style"])
    p.add_argument("--steps", type=int, default=20, help="Training steps (default 20: a quick trial)")
    p.add_argument("--num-class-images", type=int, default=4, help="Class images for prior preservation")
    p.add_argument("--timeout", type=float, default=3600, help="Seconds to wait for training")
    args = p.parse_args(argv)

    from gradio_client import Client, handle_file

    files = sorted(f for f in args.photos.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        print(f"error: no photos in {args.photos}", file=sys.stderr)
        return 1
    client = Client(args.url, verbose=False)
    report = client.predict(
        photos=[handle_file(str(f)) for f in files],
        token=args.token,
        class_noun=args.class_noun,
        api_name="/prepare_photos",
    )
    print(
        f"prepared {len(report['accepted'])} photos ({len(report['rejected'])} not used) as {report['dataset']}"
    )
    client.predict(
        dataset=report["dataset"],
        subject_type=args.subject_type,
        token=args.token,
        class_noun=args.class_noun,
        settings={"max_train_steps": args.steps, "num_class_images": args.num_class_images},
        api_name="/start_training",
    )
    end = time.monotonic() + args.timeout
    while True:
        snap = client.predict(api_name="/training_status")
        print(f"{snap['state']}: {snap.get('stage_label', '')} step {snap['step']}/{snap['total_steps']}")
        if snap["state"] not in ("running", "stopping"):
            break
        if time.monotonic() > end:
            print("error: training did not finish in time", file=sys.stderr)
            return 1
        time.sleep(2)
    if snap["state"] != "finished" or not snap.get("adapter_name"):
        print(f"error: training ended {snap['state']}: {snap.get('message')}", file=sys.stderr)
        return 1
    name = snap["adapter_name"]
    assert name in [a["name"] for a in client.predict(api_name="/list_adapters")]
    image = client.predict(
        prompt=f"a photo of {args.token} {args.class_noun}", adapter=name, seed=0, api_name="/generate"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(image, args.out)
    print(f"adapter {name}: image written to {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 - one line for the person at the terminal
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
