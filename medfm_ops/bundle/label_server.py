# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""
A real MONAI Label server serving segmentation bundles as they are written, and the check that one bundle serves:
the server's label names are the bundle's classes, and its answer on an image equals the bundle's own
``inference.json`` run offline with stock ``python -m monai.bundle run``.

The server runs from its own environment (MONAI Label pins numpy < 2; ``tools/monailabel_env.sh`` creates it): pass
that environment's python. It listens on 127.0.0.1 only, on a free port, every request is bounded in time, and it is
stopped (terminate, then kill its process group) whatever happens. The stock ``monaibundle`` sample app ships inside
the monailabel package and is copied out offline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

__all__ = ["LabelServer", "stock_label_app", "offline_bundle_inference", "bundle_label_names", "check_bundle_serves"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _multipart(fields: dict[str, str], files: dict[str, Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    for k, p in files.items():
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{p.name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n")  # fmt: skip
        parts.append(head.encode() + p.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def stock_label_app(label_python: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy MONAI Label's stock ``monaibundle`` sample app (shipped inside the package: no download) to
    ``dest/monaibundle`` and return that folder; bundles to serve go to its ``model/<name>``."""
    res = subprocess.run(
        [str(label_python), "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle", "--output", str(dest)],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    app = Path(dest) / "monaibundle"
    if not (app / "main.py").is_file():
        raise RuntimeError(f"MONAI Label's sample app was not copied to {app}:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return app


class LabelServer:
    """
    ``with LabelServer(python, app, ["site_expert"], studies, log) as server:`` starts MONAI Label on 127.0.0.1 (a
    free port) serving the app's ``model/<name>`` bundles, waits until ``/info/`` answers (``server.info``), and
    stops it on exit.

    Args:
        label_python: the MONAI Label environment's python.
        app: the app folder (:func:`stock_label_app`).
        models: bundle names under ``app/model`` to serve.
        studies: the datastore folder (images; ``labels/final`` for training).
        log_path: the server's output.
        ready_timeout: seconds to wait for ``/info/``. Defaults to 240.
    """

    def __init__(self, label_python: str | os.PathLike, app: str | os.PathLike, models: list[str],
                 studies: str | os.PathLike, log_path: str | os.PathLike, ready_timeout: float = 240.0) -> None:  # fmt: skip
        self.python, self.app, self.models, self.studies = str(label_python), Path(app), list(models), Path(studies)
        self.log_path, self.ready_timeout = Path(log_path), float(ready_timeout)
        self.base, self.info, self._proc = "", {}, None

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text()[-n:] if self.log_path.is_file() else ""

    def request(self, path: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 30) -> bytes:
        """GET (``data`` None) or POST ``path`` on this server; HTTP errors carry the server log's tail."""
        req = urllib.request.Request(f"{self.base}{path}", data=data, headers=headers or {},
                                     method="POST" if data is not None else "GET")  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (loopback only)
                return resp.read()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"MONAI Label {path} failed ({e.code}):\n{self.log_tail()}") from e

    def __enter__(self) -> LabelServer:
        port = _free_port()
        cmd = [self.python, "-m", "monailabel.main", "start_server", "--app", str(self.app), "--studies",
               str(self.studies), "--conf", "models", ",".join(self.models), "--conf", "zoo_source", "local",
               "--conf", "sam2", "false", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
        env = dict(os.environ, MONAI_LABEL_DATASTORE_AUTO_RELOAD="false", PYTHONUNBUFFERED="1")
        self.studies.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                          start_new_session=True)  # fmt: skip
        self.base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + self.ready_timeout
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"MONAI Label exited with {self._proc.returncode}:\n{self.log_tail()}")
                try:
                    self.info = json.loads(self.request("/info/", timeout=5))
                    return self
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    time.sleep(1.0)
            raise RuntimeError(f"MONAI Label not ready in {self.ready_timeout:.0f} s:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        """Terminate the server, then kill its process group if it does not exit within 30 s."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)  # the group this server started (start_new_session)
            self._proc.wait(timeout=30)

    def infer(self, model: str, image: str | os.PathLike, out: str | os.PathLike, timeout: float = 300) -> Path:
        """POST ``image`` to ``/infer/<model>`` (CPU) and write the label volume it returns to ``out``."""
        body, ctype = _multipart({"params": json.dumps({"device": "cpu"})}, {"file": Path(image)})
        data = self.request(f"/infer/{model}?output=image", body, {"Content-Type": ctype}, timeout=timeout)
        Path(out).write_bytes(data)
        return Path(out)


def offline_bundle_inference(bundle: str | os.PathLike, image: str | os.PathLike, out_dir: str | os.PathLike,
                             python: str | os.PathLike = sys.executable, timeout: float = 600) -> Path:  # fmt: skip
    """The label map of ``image`` by the bundle's own ``configs/inference.json`` under stock ``python -m monai.bundle
    run`` (``python``'s environment), written under ``out_dir``; returns its path."""
    out_dir = Path(out_dir)
    images = out_dir / "input"
    images.mkdir(parents=True, exist_ok=True)
    shutil.copy(image, images / Path(image).name)
    res = subprocess.run(
        [str(python), "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--bundle_root", ".",
         "--dataset_dir", str(images), "--output_dir", str(out_dir / "output")],
        cwd=bundle, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"{bundle}: configs/inference.json failed on {image}:\n{res.stderr[-3000:]}")
    found = sorted((out_dir / "output").rglob("*_seg.nii.gz"))
    if len(found) != 1:
        raise RuntimeError(f"{bundle}: expected one *_seg.nii.gz under {out_dir / 'output'}, found {found}.")
    return found[0]


def bundle_label_names(bundle: str | os.PathLike) -> dict[str, int]:
    """``{class name (lower case, as MONAI Label lists it): label value}`` from the bundle's
    ``configs/metadata.json`` output ``channel_def`` (background excluded)."""
    meta = json.loads((Path(bundle) / "configs" / "metadata.json").read_text())
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    return {str(v).lower(): int(k) for k, v in channels.items() if int(k) != 0}


def check_bundle_serves(bundle: str | os.PathLike, image: str | os.PathLike, work_dir: str | os.PathLike,
                        label_python: str | os.PathLike, name: str | None = None) -> dict[str, Any]:  # fmt: skip
    """
    Serve a copy of ``bundle`` (unchanged) in a real MONAI Label server, run ``/infer`` on ``image`` and compare with
    the bundle's offline ``inference.json``. Returns ``{"model", "server_labels", "bundle_labels", "labels_match",
    "shape", "input_shape", "affine_match", "labels_present", "agreement", "passed"}`` (``passed``: the label names
    match, the answer is on the input grid and agrees with the offline result on >= 99.9 % of the voxels).
    """
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    name = name or Path(bundle).name
    app = stock_label_app(label_python, work / "apps")
    shutil.copytree(bundle, app / "model" / name, dirs_exist_ok=True)  # served as written
    offline = np.asarray(nib.load(offline_bundle_inference(bundle, image, work / "offline")).dataobj)
    with LabelServer(label_python, app, [name], work / "studies", work / "server.log") as server:
        served_labels = server.info["models"][name]["labels"]
        pred = nib.load(server.infer(name, image, work / "served_seg.nii.gz"))
    seg, src = np.asarray(pred.dataobj), nib.load(str(image))
    expected = bundle_label_names(bundle)
    report = {"model": name, "image": str(image), "server_labels": served_labels, "bundle_labels": expected,
              "labels_match": served_labels == expected, "shape": list(seg.shape), "input_shape": list(src.shape[:3]),
              "affine_match": bool(np.allclose(pred.affine, src.affine, atol=1e-4)),
              "labels_present": sorted(int(v) for v in np.unique(seg)),
              "agreement": float((seg == offline).mean()) if seg.shape == offline.shape else 0.0}  # fmt: skip
    report["passed"] = bool(report["labels_match"] and report["shape"] == report["input_shape"]
                            and report["affine_match"] and report["agreement"] >= 0.999)  # fmt: skip
    return report
