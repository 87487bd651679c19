"""DreamBooth Studio: the browser app.

    python app.py [--host 127.0.0.1] [--port 7860] [--data-dir DIR] [--base-model ID_OR_PATH]

Photos, training runs, adapters and generated images live under --data-dir. Nothing in it is
served by path: the page gets copies of what a handler returns, one user's only to that user (see
README "Who can do what"). Offline, the built-in `tiny-shapes` model (it knows simple coloured shapes) lets you try every step.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# No usage analytics calls from a personal app (and none can reach out from the test machines).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

MAX_UPLOAD = "40mb"  # a phone photo is 3-15 MB; anything far larger is not a photo to train on


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="app.py", description="DreamBooth Studio: train a LoRA of your subject in the browser."
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="Interface to listen on (0.0.0.0 to share on your network)."
    )
    p.add_argument("--port", type=int, default=7860, help="Port (default 7860).")
    p.add_argument(
        "--data-dir",
        default=None,
        help="Folder for photos, runs, adapters and images (default: $DREAMBOOTH_STUDIO_DATA, on a Space "
        "its persistent storage /data, else ./data).",
    )
    p.add_argument(
        "--auth",
        default=None,
        metavar="USER:PASSWORD[,USER:PASSWORD]",
        help="Require login with these accounts; each user gets their own photos, runs and adapters "
        "(default: $DREAMBOOTH_STUDIO_AUTH; on a Space, Hugging Face login is required anyway).",
    )
    p.add_argument(
        "--base-model",
        default="tiny-shapes",
        help="Default base model: a Hub id, a local diffusers folder, a .safetensors file, tiny-shapes "
        "(built in, knows simple coloured shapes) or tiny-sd15 (offline test model, produces noise).",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dreambooth_ui.access import AccessPolicy, TokenUsers, parse_auth
    from dreambooth_ui.layout import build_app
    from dreambooth_ui.space import detect
    from dreambooth_ui.studio import Studios

    try:
        auth = parse_auth(args.auth or os.environ.get("DREAMBOOTH_STUDIO_AUTH"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    deployment = detect(data_dir=args.data_dir)
    policy = AccessPolicy.from_env(deployment, auth)
    logging.getLogger("app").info(
        "data folder %s (%s)%s", deployment.data_dir, "persistent" if deployment.persistent else "ephemeral",
        f", Space {deployment.space_id}" if deployment.on_space else "",
    )  # fmt: skip
    studios = Studios(
        deployment.data_dir,
        policy=policy,
        token_users=TokenUsers() if deployment.on_space else None,
        base_model=args.base_model,
        deployment=deployment,
    )
    demo = build_app(studios, banner=deployment.banner)
    demo.launch(server_name=args.host, server_port=args.port, auth=auth or None, **launch_options(studios))
    return 0


def launch_options(studios) -> dict:
    """Safe serving defaults, shared with the tests that launch the app (a Studio or Studios)."""
    from gradio.utils import get_cache_folder, get_upload_folder
    from starlette.middleware import Middleware

    from dreambooth_ui.access import PrivateFiles
    from dreambooth_ui.layout import CSS

    exempt = (str(get_cache_folder()), str(get_upload_folder()))
    return dict(
        max_file_size=MAX_UPLOAD,
        # Gradio copies what handlers return into its cache only from allowed folders; the data
        # folder itself is never served by path (PrivateFiles refuses every such URL).
        allowed_paths=[str(studios.data_dir)],
        app_kwargs={"middleware": [Middleware(PrivateFiles, root=str(studios.data_dir), exempt=exempt)]},
        enable_monitoring=False,
        show_error=False,  # unexpected errors are logged; the page shows one sentence
        theme="soft",
        css=CSS,
        # Gradio's footer "Runs" opens its call history, not this app's Runs tab: left out so it
        # cannot be mistaken for it (the API docs and settings links stay).
        footer_links=["api", "gradio", "settings"],
    )


if __name__ == "__main__":
    sys.exit(main())
