"""A real ComfyUI server for integration tests, from COMFYUI_DIR (skipped when it is unset, as in CI)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
SKIP_REASON = (
    "COMFYUI_DIR is not set: integration tests need a ComfyUI checkout and its Python "
    "(../shared/tools/setup_comfyui.sh prints COMFYUI_DIR and COMFYUI_PYTHON)"
)

TEST_NODES = Path(__file__).with_name("fp8_test_nodes.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    def __init__(self, base: Path, port: int, process: subprocess.Popen, log: Path) -> None:
        self.base = base
        self.port = port
        self.process = process
        self.log = log
        self.url = f"http://127.0.0.1:{port}"

    @property
    def models(self) -> Path:
        return self.base / "models"

    @property
    def output(self) -> Path:
        return self.base / "output"

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post_prompt(self, prompt: dict) -> tuple[str | None, dict]:
        """``(prompt_id, error)``: a prompt refused at validation comes back as its error body."""
        request = urllib.request.Request(
            self.url + "/prompt",
            data=json.dumps({"prompt": prompt}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())["prompt_id"], {}
        except urllib.error.HTTPError as error:
            return None, json.loads(error.read() or b"{}")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Run a prompt to the end; returns its history entry (status, outputs)."""
        prompt_id, error = self.post_prompt(prompt)
        assert prompt_id is not None, f"prompt refused: {error}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited; log:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")

    def log_text(self) -> str:
        return self.log.read_text()


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory) -> ComfyServer:
    if not COMFYUI_DIR:
        pytest.skip(SKIP_REASON)
    if os.environ.get("COMFYUI_NO_SERVER"):
        pytest.skip("COMFYUI_NO_SERVER is set: in-process checks only (this ComfyUI lacks its server's packages)")
    base = tmp_path_factory.mktemp("comfy_base")
    for folder in (
        "custom_nodes",
        "models/diffusion_models",
        "models/text_encoders",
        "models/loras",
        "output",
        "input",
    ):
        (base / folder).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "comfyui-fp8-quant").symlink_to(REPO, target_is_directory=True)
    (base / "custom_nodes" / "fp8_test_nodes.py").symlink_to(TEST_NODES)
    port = free_port()
    log = base / "comfyui.log"
    command = [
        COMFYUI_PYTHON,
        "main.py",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--base-directory",
        str(base),
        "--disable-auto-launch",
    ]
    if not torch.cuda.is_available():
        command.append("--cpu")
    with log.open("w") as handle:
        process = subprocess.Popen(command, cwd=COMFYUI_DIR, stdout=handle, stderr=subprocess.STDOUT)
    server = ComfyServer(base, port, process, log)
    deadline = time.monotonic() + 180
    while True:
        try:
            server.get("/object_info/LoadFP8DiT")
            break
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"ComfyUI did not start; log:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
    yield server
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def write_fixture(kind: str, path: Path) -> Path:
    return _run_fixtures(kind, str(path))


def write_comfy_quantized(fmt: str, source: Path, path: Path) -> Path:
    """``source``'s block linears quantized and saved by ComfyUI's own code in ComfyUI's format ``fmt``."""
    return _run_fixtures("comfy-quantize", fmt, str(source), str(path))


def _run_fixtures(*args: str) -> Path:
    script = Path(__file__).with_name("comfy_fixtures.py")
    env = dict(os.environ, COMFYUI_DIR=str(COMFYUI_DIR))
    subprocess.run([COMFYUI_PYTHON, str(script), *args], check=True, env=env, cwd=COMFYUI_DIR)
    return Path(args[-1])
