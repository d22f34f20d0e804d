"""A real ComfyUI server for integration tests, from COMFYUI_DIR.

Without COMFYUI_DIR the integration tests skip and say how to point them at a ComfyUI. With
FP8_REQUIRE_COMFYUI=1 (CI sets it) nothing may be skipped for want of ComfyUI, its server or a browser: a CI
machine that lost its ComfyUI fails instead of passing on skipped tests.
"""

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
REQUIRED = os.environ.get("FP8_REQUIRE_COMFYUI") == "1"
SKIP_REASON = "COMFYUI_DIR not set (see README: Test)"
ARTIFACTS = Path(__file__).with_name("artifacts")  # screenshots; ignored by git

TEST_NODES = Path(__file__).with_name("fp8_test_nodes.py")


def pytest_configure(config) -> None:
    if REQUIRED and not COMFYUI_DIR:
        raise pytest.UsageError(f"FP8_REQUIRE_COMFYUI=1 but {SKIP_REASON}")


def skip_unless_required(reason: str) -> None:
    """Skip, or fail where FP8_REQUIRE_COMFYUI=1 says this run must exercise everything."""
    if REQUIRED:
        pytest.fail(f"FP8_REQUIRE_COMFYUI=1: {reason}")
    pytest.skip(reason)


def comfyui_has(relative_path: str) -> bool:
    """Whether the ComfyUI under test has a file (features of newer versions, e.g. ``comfy/quant_ops.py``)."""
    return bool(COMFYUI_DIR) and (Path(COMFYUI_DIR) / relative_path).exists()


# ComfyUI 0.16 and later read .comfy_quant files (QuantizedTensor); older versions load them with their scales
# ignored, as the README says.
HAS_COMFY_QUANT = comfyui_has("comfy/quant_ops.py")
# Only said of a ComfyUI that is there: without one, the module's own skip (SKIP_REASON) is the true reason.
needs_comfy_quant = pytest.mark.skipif(
    bool(COMFYUI_DIR) and not HAS_COMFY_QUANT, reason="this ComfyUI predates .comfy_quant files (0.16)"
)


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

    def post(self, path: str, body: dict) -> None:
        """A POST with a JSON body and no answer to read (/free, /interrupt)."""
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30):
            pass

    def rss_bytes(self) -> int:
        """The server process's resident memory (Linux /proc)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Run a prompt to the end; returns its history entry (status, outputs)."""
        prompt_id, error = self.post_prompt(prompt)
        assert prompt_id is not None, f"prompt refused: {error}"
        return self.wait(prompt_id, timeout)

    def running(self, prompt_id: str) -> bool:
        """Whether ComfyUI has taken this prompt off its queue and is executing it (``/queue``)."""
        return any(item[1] == prompt_id for item in self.get("/queue")["queue_running"])

    def interrupt(self, prompt_id: str, timeout: float = 600) -> dict:
        """Interrupt a queued prompt once it runs; returns its history entry.

        ComfyUI clears its interrupt flag when a prompt starts executing, so an interrupt sent before that is lost
        (and one sent while the queue hands the prompt over can be). This waits until ``/queue`` lists the prompt
        as running, then repeats the interrupt until the prompt has finished: one of them lands after the reset.
        """
        deadline = time.monotonic() + timeout
        while not self.running(prompt_id):
            if self.finished(prompt_id) is not None:
                return self.finished(prompt_id)
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} did not start in {timeout}s")
            time.sleep(0.05)
        while (entry := self.finished(prompt_id)) is None:
            self.post("/interrupt", {"prompt_id": prompt_id})
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise TimeoutError(f"prompt {prompt_id} did not stop in {timeout}s")
            time.sleep(0.2)
        return entry

    def finished(self, prompt_id: str) -> dict | None:
        """The history entry of a prompt that has finished, else ``None``."""
        history = self.get(f"/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            return history[prompt_id]
        return None

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """The history entry of a queued prompt, once it has finished."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (entry := self.finished(prompt_id)) is not None:
                return entry
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
        skip_unless_required("COMFYUI_NO_SERVER is set: in-process checks only (no server packages)")
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
        # ComfyUI 0.30's default cache drops results under RAM pressure (a loaded CI machine re-executed cached
        # nodes); the classic cache keeps the last prompt's results, which is what the cache tests check.
        "--cache-classic",
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


def write_comfy_quantized(fmt: str, source: Path, path: Path) -> Path | None:
    """``source``'s block linears quantized and saved by ComfyUI's own code in ComfyUI's format ``fmt``; ``None``
    where the ComfyUI under test is older than that format (its tests then skip)."""
    try:
        return _run_fixtures("comfy-quantize", fmt, str(source), str(path))
    except subprocess.CalledProcessError as error:
        if error.returncode == FORMAT_UNKNOWN:
            return None
        raise


def needs_comfy_format(path: Path) -> None:
    """Skips a test whose fixture file the ComfyUI under test could not write (a format newer than it)."""
    if not path.is_file():
        pytest.skip(f"this ComfyUI cannot write {path.name}: its format is newer than this ComfyUI")


FORMAT_UNKNOWN = 3  # comfy_fixtures.py's exit status for a format the ComfyUI under test lacks


def _run_fixtures(*args: str) -> Path:
    script = Path(__file__).with_name("comfy_fixtures.py")
    env = dict(os.environ, COMFYUI_DIR=str(COMFYUI_DIR))
    subprocess.run([COMFYUI_PYTHON, str(script), *args], check=True, env=env, cwd=COMFYUI_DIR)
    return Path(args[-1])
