"""TeacherClient fetching the teacher's LM head (/lm_head/meta/, /lm_head/) from a server that fails: a 5xx, a download
cut mid-way once or every time. A cut download starts again from the first byte and a failed one leaves no file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fault_servers import HeadServer

from protege.teacher.client import TeacherClient, TeacherServerError
from protege.teacher.head import LMHead, load_head, save_head

pytest_plugins = ["fault_fixtures"]  # the raw_server and sleeps fixtures


@pytest.fixture
def served_head(tmp_path) -> tuple[Path, dict]:
    """A small LM head saved as the teacher server saves it, and its /lm_head/meta/ answer."""
    head = LMHead(torch.randn(40, 8, generator=torch.Generator().manual_seed(0)))
    path = tmp_path / "served" / "lm_head.safetensors"
    path.parent.mkdir()
    sha256 = save_head(head, path)
    return path, {**head.metadata(), "sha256": sha256, "bytes": path.stat().st_size}


def test_lm_head_meta_is_retried_after_a_5xx(raw_server, sleeps, served_head):
    server = raw_server(["503", "ok"], HeadServer, head_file=served_head[0], meta=served_head[1])
    client = TeacherClient(server.url, backoff=0.01, max_retries=2)
    assert client.lm_head_meta(required=True) == served_head[1]
    client.close()
    assert server.paths == ["/lm_head/meta/"] * 2 and sleeps == [0.01]


def test_lm_head_download_cut_mid_way_is_retried_from_the_start(raw_server, sleeps, served_head, tmp_path):
    head_file, meta = served_head
    server = raw_server(["ok", "cut", "ok"], HeadServer, head_file=head_file, meta=meta)
    client = TeacherClient(server.url, backoff=0.01, max_retries=2)
    head = client.lm_head(tmp_path / "cache")
    client.close()
    torch.testing.assert_close(head.weight, load_head(head_file).weight, rtol=0, atol=0)
    assert server.paths == ["/lm_head/meta/", "/lm_head/", "/lm_head/"] and sleeps == [0.01]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{meta['sha256']}.safetensors"]  # no partial file


def test_lm_head_download_cut_every_time_fails_naming_the_url_and_leaves_no_file(
    raw_server, sleeps, served_head, tmp_path
):
    server = raw_server(["ok", "cut"], HeadServer, head_file=served_head[0], meta=served_head[1])
    client = TeacherClient(server.url, backoff=0.01, max_retries=1)
    with pytest.raises(TeacherServerError) as error:
        client.lm_head(tmp_path / "cache")
    client.close()
    message = str(error.value)
    assert f"teacher server at {server.url}/lm_head/ failed after 2 attempts" in message
    assert "peer closed connection without sending complete message body" in message, message
    assert list((tmp_path / "cache").iterdir()) == []
