"""bench/server_process.py, the one way to start server.py as a subprocess: a server that cannot start
says why (its log's tail) instead of hanging until the start-up timeout."""
from __future__ import annotations

import pytest

from bench.server_process import ServerProcess, free_port


def test_a_server_that_exits_at_start_raises_with_its_log(tmp_path):
    srv = ServerProcess(["--no-such-flag"], tmp_path / "server.log", startup_timeout=120)
    with pytest.raises(RuntimeError, match="no-such-flag") as err, srv:
        pass
    assert "server exited (2)" in str(err.value) and srv.stop() == 2
    assert (tmp_path / "server.log").read_text().splitlines()[0] == " ".join(srv.cmd)


def test_port_and_url():
    port = free_port()
    srv = ServerProcess([], "unused.log", port=port)
    assert srv.url == f"http://127.0.0.1:{port}" and srv.cmd[-2:] == ["--port", str(port)]
    assert srv.stop() is None  # never started
