"""A model name that points at nothing fails at once, naming the role: missing folders, bad hub ids, unknown or
unreachable hub repos (a fake hub on 127.0.0.1 stands in for huggingface.co), in the checker and in the trainer."""

from __future__ import annotations

import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import tiny
from conftest import listening_socket
from huggingface_hub import constants

from protege.model_source import ModelSourceError, check_model_source, looks_like_path

# (status, X-Error-Code) the fake hub answers for HEAD /<repo>/resolve/<revision>/config.json
HUB_ANSWERS = {
    "org/model/main": (200, None),
    "org/model/v9": (404, "RevisionNotFound"),
    "org/gated/main": (403, "GatedRepo"),
    "org/weights-only/main": (404, "EntryNotFound"),
    "org/broken/main": (500, None),
}


class FakeHub(BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:  # noqa: N802 (http.server's name)
        repo, _, rest = self.path.lstrip("/").partition("/resolve/")
        status, code = HUB_ANSWERS.get(f"{repo}/{rest.split('/')[0]}", (401, "RepoNotFound"))
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Repo-Commit", "0" * 40)
        self.send_header("ETag", '"abc"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Online mode against `endpoint`, with an empty hub cache; yields a function that points at an endpoint."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_ETAG_TIMEOUT", raising=False)
    return lambda endpoint: monkeypatch.setattr(constants, "ENDPOINT", endpoint)


@pytest.fixture
def fake_hub(online):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    online(f"http://127.0.0.1:{server.server_address[1]}")
    yield
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("name", "path_like"),
    [
        ("/abs/model", True),
        ("./model", True),
        ("../model", True),
        ("~/model", True),
        (".", True),
        ("a/b/c", True),
        ("folder/", True),
        ("C:\\models\\x", True),
        ("studnet", False),
        ("org/model", False),
    ],
)
def test_which_names_are_paths(name, path_like):
    assert looks_like_path(name) is path_like


@pytest.mark.parametrize(
    ("name", "role", "message"),
    [
        ("/abs/path/that/does/not/exist", "student", "the student model folder /abs/path/that/does/not/exist does "),
        ("./studnet", "teacher", "the teacher model folder ./studnet does not exist (looked for "),
        ("~/no-such-model-here", "student", "~ is not expanded here"),
        ("runs/a/checkpoint-9", "teacher", "the teacher model folder runs/a/checkpoint-9 does not exist"),
        ("my model", "student", "the student model 'my model' is neither a local folder nor a valid hub id"),
    ],
)
def test_missing_paths_and_bad_ids_fail_without_the_network(name, role, message):
    with pytest.raises(ModelSourceError) as caught:
        check_model_source(name, role)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_folders_and_files(tiny_paths, tmp_path):
    check_model_source(tiny_paths["student"], "student")  # a saved model: fine
    parent, child = os.path.split(tiny_paths["student"])
    check_model_source(parent, "student", {"subfolder": child})  # from_pretrained(parent, subfolder=child)
    with pytest.raises(ModelSourceError, match="the teacher model folder .* has no config.json"):
        check_model_source(str(tmp_path), "teacher")
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(ModelSourceError, match="the student model .*weights.bin is a file"):
        check_model_source(str(tmp_path / "weights.bin"), "student")


def test_offline_hub_name_is_looked_up_in_the_cache_only(monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelSourceError, match="'studnet' is neither a local folder nor in the hub cache, and HF_HUB"):
        check_model_source("studnet", "student", {"cache_dir": str(tmp_path)})
    snapshot = tmp_path / "models--org--cached" / "snapshots" / ("1" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--org--cached" / "refs").mkdir()
    (tmp_path / "models--org--cached" / "refs" / "main").write_text("1" * 40)
    check_model_source("org/cached", "teacher", {"cache_dir": str(tmp_path)})


def test_unreachable_hub_fails_in_a_second_not_after_retries(online, monkeypatch, tmp_path):
    from conftest import free_port

    online(f"http://127.0.0.1:{free_port()}")  # nothing listens: refused at once
    started = time.perf_counter()
    with pytest.raises(ModelSourceError) as caught:
        check_model_source("studnet", "student", {"cache_dir": str(tmp_path)})
    assert "'studnet' is neither a local folder nor in the hub cache, and the hub" in str(caught.value)
    assert "could not be reached" in str(caught.value) and time.perf_counter() - started < 5
    with listening_socket() as silent:  # accepts, never answers: the probe's timeout, not 5 retries
        online(f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
        started = time.perf_counter()
        with pytest.raises(ModelSourceError, match="could not be reached within 1 s"):
            check_model_source("org/slow", "teacher", {"cache_dir": str(tmp_path)})
        assert time.perf_counter() - started < 5


@pytest.mark.parametrize(
    ("name", "revision", "message"),
    [
        ("org/nothing", None, "the student model 'org/nothing' is neither a local folder nor in the hub cache, and the "
         "hub has no model 'org/nothing'"),
        ("org/gated", None, "the student model 'org/gated' is gated on the hub"),
        ("org/model", "v9", "the student model 'org/model' has no revision 'v9' on the hub"),
    ],
)  # fmt: skip
def test_hub_answers_are_named(fake_hub, tmp_path, name, revision, message):
    with pytest.raises(ModelSourceError) as caught:
        check_model_source(name, "student", {"cache_dir": str(tmp_path), "revision": revision})
    assert message in str(caught.value)


@pytest.mark.parametrize("name", ["org/model", "org/weights-only", "org/broken"])
def test_hub_models_that_exist_are_left_to_transformers(fake_hub, tmp_path, name):
    check_model_source(name, "student", {"cache_dir": str(tmp_path)})


def test_trainer_names_the_role(tiny_paths, tmp_path):
    from protege import DistillationTrainer

    args = tiny.config(tmp_path)
    with pytest.raises(ValueError, match="the student model folder /no/such/student does not exist"):
        DistillationTrainer(model="/no/such/student", teacher_model=tiny_paths["teacher"], args=args)
    with pytest.raises(ValueError, match="the teacher model folder /no/such/teacher does not exist"):
        DistillationTrainer(model=tiny_paths["student"], teacher_model="/no/such/teacher", args=args)
