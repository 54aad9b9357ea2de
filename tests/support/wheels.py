"""Make a small third-party package as a real wheel file, offline, so that
tests and benchmarks can install a dependency with ``pip install
--no-index --find-links`` and no network."""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile


def make_wheel(folder: str, name: str, version: str, module_source: str) -> str:
    """Write ``<name>-<version>-py3-none-any.whl`` into ``folder`` holding
    package ``name`` whose ``__init__.py`` is ``module_source``; return its path."""
    os.makedirs(folder, exist_ok=True)
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": module_source,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                            f"Summary: a test dependency\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: wheelmaker\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path
