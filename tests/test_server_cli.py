"""`clipserve serve`: flags to settings, and one-line failures (no traceback) before anything is served."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_server_support import free_port

from clipserve.cli.main import build_parser, main
from clipserve.cli.serve import build_settings
from clipserve.registry import DEFAULT_MODEL


def parse(*argv: str):
    return build_settings(build_parser().parse_args(["serve", *argv]))


def test_flags_become_settings(tmp_path: Path) -> None:
    settings = parse(
        "--model", "/models/a=alpha", "--model", "ViT-B-16/laion2b_s34b_b88k", "--port", "9000",
        "--api-key", "k" * 20, "--state-dir", str(tmp_path), "--max-batch-size", "8", "--max-wait-ms", "3",
        "--allow-url-fetch", "--url-allow-host", "images.example.com", "--url-allow-host", "*.cdn.example.org",
        "--max-image-mb", "2", "--max-items", "10", "--rate-limit", "60", "--precision", "bf16", "--fast-decode",
    )
    assert [(m.source, m.alias) for m in settings.models] == [("/models/a", "alpha"), ("ViT-B-16/laion2b_s34b_b88k", None)]
    assert settings.host == "127.0.0.1" and settings.port == 9000
    assert settings.batching.max_batch_size == 8 and settings.batching.max_wait_ms == 3
    assert settings.batching.fast_decode and not parse().batching.fast_decode
    assert settings.fetch.enabled and settings.fetch.allowed_hosts == ("images.example.com", "*.cdn.example.org")
    assert settings.fetch.max_bytes == settings.limits.max_image_bytes == 2 * 2**20
    assert settings.limits.max_items == 10 and settings.auth.default_limits.rate_limit_rpm == 60
    assert parse().models[0].source == DEFAULT_MODEL


def one_line_error(capsys, argv: list[str], *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def test_default_model_unavailable_offline_says_what_to_pass(capsys, tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    line = one_line_error(capsys, ["serve", "--no-auth", "--state-dir", str(tmp_path), "--log-format", "text"],
                          DEFAULT_MODEL, "--model PATH", "make demo")
    assert line.startswith("clipserve serve: error:")


def test_bad_model_is_one_line(capsys, tmp_path: Path) -> None:
    one_line_error(capsys, ["serve", "--no-auth", "--model", str(tmp_path / "missing"), "--log-format", "text"],
                   "cannot load model", "missing")


def test_no_way_to_authenticate_is_refused(capsys, tmp_path: Path, tiny_checkpoint: Path) -> None:
    one_line_error(capsys, ["serve", "--model", str(tiny_checkpoint), "--state-dir", str(tmp_path), "--log-format",
                            "text"], "--api-key", "--no-auth")


def test_contradicting_flags_are_one_line(capsys, tmp_path: Path) -> None:
    one_line_error(capsys, ["serve", "--no-auth", "--api-key", "k" * 20, "--log-format", "text"], "contradict")
    one_line_error(capsys, ["serve", "--no-auth", "--allow-url-fetch", "--log-format", "text"], "allow-list")


@pytest.mark.parametrize("flag", ["--max-batch-size=0", "--port=-1", "--max-items=0"])
def test_bad_numbers_are_one_line(capsys, flag: str) -> None:
    one_line_error(capsys, ["serve", "--no-auth", flag, "--log-format", "text"])


def test_json_logs_carry_the_request_id() -> None:
    import json
    import logging

    from clipserve.api.logs import JsonFormatter, request_id

    token = request_id.set("req-7")
    try:
        record = logging.makeLogRecord({"name": "clipserve.access", "levelname": "INFO", "msg": "GET %s %d",
                                        "args": ("/health", 200), "status": 200})
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id.reset(token)
    assert line["message"] == "GET /health 200" and line["request_id"] == "req-7" and line["status"] == 200


@pytest.mark.slow
def test_sigterm_drains_a_request_in_flight_then_exits_cleanly(tiny_checkpoint: Path, tmp_path: Path) -> None:
    port = free_port()
    serve = [sys.executable, "-c", "from clipserve.cli.main import main; raise SystemExit(main())", "serve",
             "--model", f"{tiny_checkpoint}=tiny", "--precision", "fp32", "--port", str(port), "--api-key", "sigterm-test-key-1",
             "--state-dir", str(tmp_path / "state")]  # fmt: skip
    proc = subprocess.Popen(serve, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "server did not become ready"
                time.sleep(0.3)
        body = json.dumps({"model": "tiny", "input": ["a photo of a cat", "a dog"]}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sigterm-test-key-1\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body[:10])
            )
            time.sleep(0.5)  # the request is in flight: headers in, body still arriving
            proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            assert proc.poll() is None, "the server exited with a request in flight"
            conn.sendall(body[10:])
            response = b""
            while chunk := conn.recv(65536):
                response += chunk
        head, _, payload = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert [row["index"] for row in json.loads(payload)["data"]] == [0, 1]
        # uvicorn re-raises the signal once its graceful shutdown is done: supervisors see a SIGTERM exit
        assert proc.wait(timeout=60) == -signal.SIGTERM
        with pytest.raises(OSError):  # and nothing listens any more
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.communicate(timeout=30)[1]
    assert "Traceback" not in stderr, stderr
