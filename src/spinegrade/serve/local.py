"""One command for a local trial: a private Orthanc (DICOMweb on) plus ``spinegrade serve`` on it.

    SPINEGRADE_TOKEN=choose-one python -m spinegrade.serve.local RUN_DIR [--upload DICOM_DIR]

Orthanc keeps its data in ``--work/orthanc`` (so a restart finds the studies again) and listens on
loopback only; studies can be added with ``--upload`` or any DICOMweb/REST client. The worklist
is at http://127.0.0.1:8765/ (the token opens it). Stop with Ctrl-C; both stop.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from spinegrade.serve.orthanc import LocalOrthanc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--upload", type=Path, help="a folder of DICOM studies to put on the PACS")
    ap.add_argument("--work", type=Path, default=Path("spinegrade_local"))
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from spinegrade.serve.app import serve
    from spinegrade.serve.service import load_serve_config

    pacs = LocalOrthanc(args.work / "orthanc", password=_local_password(args.work))
    with pacs:
        if args.upload:
            print(f"uploaded {pacs.upload_folder(args.upload)} DICOM files to the local Orthanc")
        cfg = load_serve_config(
            pacs_url=pacs.dicomweb_url, pacs_user=pacs.user, pacs_password=pacs.password,
            work_dir=str(args.work / "serve"), port=args.port,
        )  # fmt: skip
        print(f"Orthanc (DICOMweb): {pacs.dicomweb_url}  worklist: http://127.0.0.1:{cfg.port}/")
        serve(args.run_dir, cfg)


def _local_password(work: Path) -> str:
    """A random password for the private Orthanc, made once and kept beside its data (0600)."""
    import secrets

    path = work / "orthanc.secret"
    if not path.is_file():
        work.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(16), encoding="utf-8")
        path.chmod(0o600)
    return path.read_text(encoding="utf-8").strip()


if __name__ == "__main__":
    main()
