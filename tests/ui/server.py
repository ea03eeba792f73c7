"""`python app.py --demo` in a subprocess on a free port, for the browser and API tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """`python app.py --demo` on a free port, with its own outputs and models folders."""

    def __init__(self, workdir: Path, extra_args=(), demo: bool = True, env: dict | None = None):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.outputs = workdir / "outputs"
        self.models = Path(os.environ.get("KS_TEST_MODELS_DIR", workdir / "models"))
        self.log_path = workdir / "app.log"
        args = [sys.executable, str(ROOT / "app.py"), *(["--demo"] if demo else []), "--port", str(self.port),
                "--outputs-dir", str(self.outputs), "--models-dir", str(self.models), *extra_args]
        extra_env = env or {}
        env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        env.pop("KANDINSKY_STUDIO_ARGS", None)
        env.update(extra_env)
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(args, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        self._wait()

    def _wait(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(self.url + "gradio_api/info", timeout=2) as response:
                    if response.status == 200:
                        return
            except urllib.error.HTTPError:
                return  # it answers (with a login required)
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"app.py did not start within {STARTUP_TIMEOUT_S} s:\n{self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def owner_images(self) -> dict[str, list[Path]]:
        """Images per owner folder in the outputs dir, newest first."""
        result = {}
        if self.outputs.is_dir():
            for folder in self.outputs.iterdir():
                if folder.is_dir():
                    files = sorted(folder.glob("*.png"), key=lambda p: p.stat().st_mtime, reverse=True)
                    result[folder.name] = files
        return result

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.log.close()
