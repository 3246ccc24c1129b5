"""Tampered bundles: the server refuses to start and says why, and nothing in a bundle runs.

The loader itself is tested file by file in tests/detector/test_bundle.py; here the *server*
(``create_app`` + lifespan, and once ``python -m service`` as a subprocess) meets broken and
malicious bundles. Each code-execution payload would ``touch`` a marker file if it were ever
unpickled or constructed: the tests first prove the payload is live (loading it unsafely does
create the marker), then that the server leaves no marker behind.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

import detector
import service
from detector.bundle import DETECTOR, FORMAT_VERSION, MANIFEST, PROFILE, WEIGHTS, BundleError
from detector.checkpoint import ModelSpec
from loadtest.server import server_env
from service.app import create_app
from service.config import Settings


class Payload:
    """Unpickling this runs ``touch marker`` (a reduce to os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def rehash(directory: Path, name: str) -> None:
    """Make the manifest agree with a replaced file, as a tamperer who can write it would."""
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["files"][name] = hashlib.sha256((directory / name).read_bytes()).hexdigest()
    (directory / MANIFEST).write_text(json.dumps(manifest))


def rewrite_skops(path: Path, schema: dict | None = None,
                  replace_member: tuple[str, bytes] | None = None) -> None:
    """Rewrite a skops zip with another schema.json and/or one member's bytes replaced."""
    with zipfile.ZipFile(path) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    if schema is not None:
        members["schema.json"] = json.dumps(schema).encode()
    if replace_member is not None:
        members[replace_member[0]] = replace_member[1]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def os_system_node(command: str) -> dict:
    """A skops schema node that, if constructed, calls os.system(command)."""
    text = {"__class__": "str", "__module__": "builtins", "__loader__": "JsonNode",
            "content": json.dumps(command), "is_json": True, "__id__": 1}
    args = {"__class__": "tuple", "__module__": "builtins", "__loader__": "TupleNode",
            "content": [text], "__id__": 2}
    return {"__class__": "system", "__module__": "os",
            "__loader__": "ConstructorFromReduceNode", "content": args, "__id__": 3}


# --- the damage, one function per case: (bundle copy, marker) -> what the error must say ------


def missing_file(bundle: Path, marker: Path) -> str:
    (bundle / PROFILE).unlink()
    return f"bundle file missing: .*{PROFILE}"


def hash_mismatch(bundle: Path, marker: Path) -> str:
    data = bytearray((bundle / WEIGHTS).read_bytes())
    data[-1] ^= 0x01
    (bundle / WEIGHTS).write_bytes(bytes(data))
    return f"{WEIGHTS} does not match its SHA-256"


def newer_format(bundle: Path, marker: Path) -> str:
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    return f"format version {FORMAT_VERSION + 1}, newer than this package supports"


def pickle_as_detector(bundle: Path, marker: Path) -> str:
    """A plain pickle with a reduce payload saved as detector.skops, hash updated."""
    (bundle / DETECTOR).write_bytes(pickle.dumps(Payload(marker)))
    rehash(bundle, DETECTOR)
    return f"{DETECTOR} is not a readable skops file"


def skops_calling_os_system(bundle: Path, marker: Path) -> str:
    """The real detector archive with a node that would construct os.system('touch ...')."""
    with zipfile.ZipFile(bundle / DETECTOR) as archive:
        schema = json.loads(archive.read("schema.json"))
    # the value of the detector's 'model' attribute becomes os.system('touch marker')
    schema["content"]["content"]["model"] = os_system_node(f"touch {shlex.quote(str(marker))}")
    rewrite_skops(bundle / DETECTOR, schema=schema)
    rehash(bundle, DETECTOR)
    return r"contains types outside the allow-list, refusing to load: \['os\.system'\]"


def skops_with_pickled_array(bundle: Path, marker: Path) -> str:
    """Every type in the schema trusted, but one .npy member is a pickled object array."""
    with zipfile.ZipFile(bundle / DETECTOR) as archive:
        member = next(n for n in archive.namelist() if n.endswith(".npy"))
    buf = io.BytesIO()
    np.save(buf, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    rewrite_skops(bundle / DETECTOR, replace_member=(member, buf.getvalue()))
    rehash(bundle, DETECTOR)
    return f"{DETECTOR} could not be loaded by skops.*allow_pickle=False"


def torch_pickle_as_weights(bundle: Path, marker: Path) -> str:
    """A torch.save file (a pickle) with a payload saved as weights.safetensors."""
    torch.save({"features.0.weight": Payload(marker)}, bundle / WEIGHTS)
    rehash(bundle, WEIGHTS)
    return f"{WEIGHTS} is not a readable safetensors file"


def weights_of_wrong_shape(bundle: Path, marker: Path) -> str:
    spec = ModelSpec.from_json(json.loads((bundle / MANIFEST).read_text())["model"])
    narrow = replace(spec, arch_kwargs={**spec.arch_kwargs, "width": 8}).build()
    save_file({k: v.contiguous() for k, v in narrow.state_dict().items()}, str(bundle / WEIGHTS))
    rehash(bundle, WEIGHTS)
    return f"weights in .*{WEIGHTS} do not fit the architecture.*wrong shape"


DAMAGE = [missing_file, hash_mismatch, newer_format, pickle_as_detector,
          skops_calling_os_system, skops_with_pickled_array, torch_pickle_as_weights,
          weights_of_wrong_shape]
PAYLOADS = [pickle_as_detector, skops_calling_os_system, skops_with_pickled_array,
            torch_pickle_as_weights]


@pytest.fixture
def broken(bundle_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the session's bundle to damage."""
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


def unsafe_load(damage: Callable[[Path, Path], str], bundle: Path) -> None:
    """Load the tampered file the unsafe way each format allows, to prove the payload runs."""
    path = bundle / (WEIGHTS if damage is torch_pickle_as_weights else DETECTOR)
    if damage is pickle_as_detector:
        pickle.loads(path.read_bytes())
    elif damage is skops_calling_os_system:
        sio.load(path, trusted=sio.get_untrusted_types(file=path))
    elif damage is skops_with_pickled_array:
        with zipfile.ZipFile(path) as archive:
            member = next(n for n in archive.namelist() if n.endswith(".npy"))
            np.load(io.BytesIO(archive.read(member)), allow_pickle=True)
    else:  # from bytes: torch would treat a *.safetensors path as safetensors
        torch.load(io.BytesIO(path.read_bytes()), weights_only=False)


@pytest.mark.parametrize("damage", PAYLOADS, ids=lambda f: f.__name__)
def test_payloads_are_live(damage: Callable[[Path, Path], str], broken: Path,
                           tmp_path: Path) -> None:
    """Without this, 'no marker' below would prove nothing."""
    marker = tmp_path / "pwned"
    damage(broken, marker)
    assert not marker.exists()
    unsafe_load(damage, broken)
    assert marker.exists()


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_server_refuses_a_broken_bundle(damage: Callable[[Path, Path], str], broken: Path,
                                        tmp_path: Path,
                                        make_settings: Callable[..., Settings]) -> None:
    marker = tmp_path / "pwned"
    expected = damage(broken, marker)
    app = create_app(make_settings(bundle=broken))
    with pytest.raises(BundleError, match=expected) as e, TestClient(app):
        pass  # the lifespan raises before the app serves anything
    message = str(e.value)
    assert message.startswith(f"cannot serve the model bundle at {broken}: ")
    assert "python -m training.fit_detector" in message
    assert app.state.service is None
    assert not marker.exists()


def test_real_server_refuses_a_payload_bundle(broken: Path, tmp_path: Path) -> None:
    """``python -m service`` on weights that are a torch pickle with a payload: status 2, the
    reason on stderr, no traceback, no marker, never listening."""
    marker = tmp_path / "pwned"
    expected = torch_pickle_as_weights(broken, marker)
    proc = subprocess.run([sys.executable, "-m", "service"], cwd=tmp_path,
                          env=server_env(broken, port=1),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "cannot serve the model bundle" in proc.stderr
    assert re.search(expected, proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr and "Uvicorn running" not in proc.stderr
    assert not marker.exists()


# --- nothing in detector/ or service/ can unpickle --------------------------------------------

UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib",
                      "marshal", "shelve"}


def calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    """(dotted name of the callee, call) for every call of a name or attribute chain."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts, f = [], node.func
            while isinstance(f, ast.Attribute):
                parts.append(f.attr)
                f = f.value
            if isinstance(f, ast.Name):
                found.append((".".join([f.id, *reversed(parts)]), node))
    return found


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_serving_code_never_unpickles() -> None:
    """No pickle-family import, no torch.load, np.load only with allow_pickle=False, skops
    only with an explicit allow-list, in any module the server runs."""
    files = sorted([*Path(detector.__file__).parent.glob("*.py"),
                    *Path(service.__file__).parent.glob("*.py")])
    assert len(files) >= 20
    skops_loads = 0
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = {n for n in names if n.split(".")[0] in UNPICKLING_MODULES}
            assert not bad, f"{path.name} imports {bad}"
        for name, call in calls(tree):
            assert not name.endswith(("torch.load", "jit.load", "torch.hub.load")), \
                f"{path.name}:{call.lineno} calls {name}"
            if name in ("np.load", "numpy.load"):
                flag = keyword(call, "allow_pickle")
                assert isinstance(flag, ast.Constant) and flag.value is False, \
                    f"{path.name}:{call.lineno}: np.load without allow_pickle=False"
            if name == "sio.load":
                skops_loads += 1
                trusted = keyword(call, "trusted")
                assert trusted is not None and not isinstance(trusted, ast.Constant), \
                    f"{path.name}:{call.lineno}: skops load without an explicit allow-list"
    assert skops_loads == 1  # detector.bundle.load_detector, and nowhere else
