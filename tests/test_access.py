"""Login and per-user data: password login over HTTP (the API needs it), users kept apart, users not
allowed refused with a sentence; the Space's identities (OAuth session, Bearer Hub token) resolved."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from app_helpers import free_port
from conftest import write_photos

from dreambooth_ui.access import AccessDenied, AccessPolicy, TokenUsers, parse_auth, request_user
from dreambooth_ui.space import detect


def test_parse_auth_and_policies():
    assert parse_auth("alice:pw1, bob:p:w") == [("alice", "pw1"), ("bob", "p:w")]
    with pytest.raises(ValueError, match="auth: give accounts"):
        parse_auth("alice")
    local = AccessPolicy.from_env(detect(env={}), [], env={})
    assert not local.required and local.check(None) is None
    space = AccessPolicy.from_env(
        detect(env={"SPACE_ID": "alice/s", "SPACE_AUTHOR_NAME": "alice"}),
        [],
        env={"DREAMBOOTH_STUDIO_USERS": "bob"},
    )
    assert space.required and space.oauth and space.allowed == {"alice", "bob"}
    assert space.check("bob") == "bob"
    with pytest.raises(AccessDenied, match="Log in first"):
        space.check(None)
    with pytest.raises(AccessDenied, match="mallory may not use this app"):
        space.check("mallory")


def test_request_user_from_password_oauth_session_and_bearer_token():
    assert request_user(SimpleNamespace(username="alice")) == "alice"
    session = {"oauth_info": {"userinfo": {"preferred_username": "bob"}, "expires_at": time.time() + 60}}
    assert request_user(SimpleNamespace(username=None, session=session, headers={})) == "bob"
    expired = {"oauth_info": {"userinfo": {"preferred_username": "bob"}, "expires_at": time.time() - 1}}
    assert request_user(SimpleNamespace(username=None, session=expired, headers={})) is None

    calls = []

    def whoami(token):
        calls.append(token)
        if token != "hf_good":
            raise PermissionError("401")
        return "carol"

    users = TokenUsers(whoami)
    bearer = SimpleNamespace(username=None, session={}, headers={"x-hf-authorization": "Bearer hf_good"})
    assert request_user(bearer, users) == "carol"
    assert request_user(bearer, users) == "carol" and calls == ["hf_good"]  # remembered
    bad = SimpleNamespace(
        username=None, session={}, headers={"authorization": "Bearer hf_bad"}
    )  # plain header too
    assert request_user(bad, users) is None
    assert request_user(bearer, None) is None  # tokens are only accepted where a resolver is set


@pytest.fixture(scope="module")
def two_user_app(tmp_path_factory):
    import app
    from dreambooth_ui.layout import build_app
    from dreambooth_ui.studio import Studios

    data = tmp_path_factory.mktemp("shared-data")
    accounts = [("alice", "pw-a"), ("bob", "pw-b"), ("mallory", "pw-m")]
    policy = AccessPolicy(required=True, allowed=frozenset({"alice", "bob"}), oauth=False)
    studios = Studios(data, policy=policy, base_model="tiny-sd15")
    demo = build_app(studios)
    _, url, _ = demo.launch(
        server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True, auth=accounts,
        **app.launch_options(studios),
    )  # fmt: skip
    try:
        yield url, studios
    finally:
        demo.close()


def test_api_needs_login_and_users_are_kept_apart(two_user_app, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    url, studios = two_user_app
    with pytest.raises(Exception):  # noqa: B017 - gradio_client's own error for a login-protected app
        Client(url, verbose=False).predict(api_name="/list_adapters")

    alice = Client(url, auth=("alice", "pw-a"), verbose=False)
    bob = Client(url, auth=("bob", "pw-b"), verbose=False)
    photos = sorted(write_photos(tmp_path / "p", n=2).glob("*.jpg"))
    report = alice.predict(photos=[handle_file(str(p)) for p in photos], dataset="alice-dog", crop="center",
                           api_name="/prepare_photos")  # fmt: skip
    assert len(report["accepted"]) == 2
    assert (studios.user_dir("alice") / "datasets" / "alice-dog" / "report.json").is_file()
    assert studios.for_user("alice").list_datasets() == ["alice-dog"]
    assert studios.for_user("bob").list_datasets() == []
    # Bob cannot reach Alice's photo set by name, nor see her job.
    with pytest.raises(AppError, match="no prepared photo set called"):
        bob.predict(dataset="alice-dog", api_name="/start_training")
    assert bob.predict(api_name="/training_status")["state"] == "idle"

    mallory = Client(url, auth=("mallory", "pw-m"), verbose=False)
    with pytest.raises(AppError, match="mallory may not use this app"):
        mallory.predict(api_name="/list_adapters")
    assert not studios.user_dir("mallory").exists()


def test_one_gpu_one_training_across_users(tmp_path):
    from test_jobs import ScriptedTrainer

    from dreambooth_ui.studio import Studios, UserError
    from trainer_core.config import TrainConfig

    trainer = ScriptedTrainer(steps=3)
    policy = AccessPolicy(required=True, allowed=None, oauth=False)
    studios = Studios(tmp_path, policy=policy, train_fn=trainer)
    alice, bob = studios.for_user("alice"), studios.for_user("bob")
    config = TrainConfig(
        instance_dir="x", instance_prompt="a photo of sks dog", output_dir="unused", max_train_steps=3
    )
    alice.start_training(config)
    with pytest.raises(UserError, match="Another training job is using the GPU"):
        bob.start_training(config)
    with pytest.raises(UserError, match="Training is using the GPU"):
        bob.generate("a photo of a dog")
    assert bob.training_status()["state"] == "idle"
    trainer.release(3)
    assert alice.runner.wait(20)
    assert alice.training_status()["state"] == "finished"
    assert not studios.shared.gpu.locked()
    assert str(trainer.configs[0].output_dir).startswith(str(studios.user_dir("alice") / "runs"))


def test_restart_recovers_every_users_runs_at_boot(tmp_path):
    from test_jobs import _left_running

    from dreambooth_ui.studio import Studios

    _left_running(tmp_path / "users" / "alice" / "runs" / "r1", 3, with_checkpoint=True)
    _left_running(tmp_path / "users" / "bob" / "runs" / "r2", 1, with_checkpoint=False)
    studios = Studios(tmp_path, policy=AccessPolicy(required=True, allowed=None, oauth=False))
    # Nothing stays "running" after a restart, whether or not its user has come back yet.
    assert studios.for_user("alice").training_status()["state"] == "interrupted"
    assert studios.for_user("bob").training_status()["state"] == "lost"
    for user, run in (("alice", "r1"), ("bob", "r2")):
        # Folders from before one-to-one user folders (users/<name>) are moved to their new name.
        status = (studios.user_dir(user) / "runs" / run / "status.json").read_text()
        assert '"running"' not in status


def test_gradio_client_token_identifies_the_user_end_to_end(tmp_path):
    """`Client(url, token=...)` as the README tells Space users; whoami is a stand-in (no Hub here)."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    import app
    from dreambooth_ui.layout import build_app
    from dreambooth_ui.studio import Studios

    users = TokenUsers(lambda token: {"hf_carol": "carol"}[token])
    # (No login button: outside a Space, Gradio's OAuth mock needs a logged-in Hub account.)
    policy = AccessPolicy(required=True, allowed=frozenset({"carol"}), oauth=False)
    studios = Studios(tmp_path, policy=policy, token_users=users, base_model="tiny-sd15")
    demo = build_app(studios)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                            **app.launch_options(studios))  # fmt: skip
    try:
        assert Client(url, token="hf_carol", verbose=False).predict(api_name="/list_adapters") == []
        assert studios.user_dir("carol").is_dir()
        with pytest.raises(AppError, match="Log in first"):
            Client(url, verbose=False).predict(api_name="/list_adapters")
        with pytest.raises(AppError, match="Log in first"):
            Client(url, token="hf_unknown", verbose=False).predict(api_name="/list_adapters")
    finally:
        demo.close()


def test_app_starts_as_a_space_with_the_login_button(tmp_path):
    """On a Space the page has "Sign in with Hugging Face", which needs gradio's OAuth extras installed
    (authlib, itsdangerous); without them the Space would crash at start. Run as Spaces run it."""
    import os
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    port = free_port()
    env = {**os.environ, "SYSTEM": "spaces", "SPACE_ID": "alice/studio", "SPACE_AUTHOR_NAME": "alice",
           "OAUTH_CLIENT_ID": "id", "OAUTH_CLIENT_SECRET": "secret", "OAUTH_SCOPES": "openid profile",
           "OPENID_PROVIDER_URL": "https://huggingface.co", "DREAMBOOTH_STUDIO_PERSISTENT_DIR": str(tmp_path),
           "GRADIO_ANALYTICS_ENABLED": "False"}  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        page = None
        for _ in range(120):
            if proc.poll() is not None:
                break
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2).read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert page is not None, proc.communicate(timeout=10)[0][-3000:]
        assert "Sign in with Hugging Face" in page or "login_button" in page or "loginbutton" in page.lower()
    finally:
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
    assert f"data folder {tmp_path / 'dreambooth-studio'} (persistent), Space alice/studio" in log, log[
        -3000:
    ]
