"""Build the zip to upload as a Gradescope autograder ("Zip file upload").

    python gradescope/build.py                 # writes _build/gradescope/autograder.zip
    python gradescope/build.py --out PATH.zip

The zip holds setup.sh and run_autograder at its root (where Gradescope looks for them)
and, under course/, what installs the package: pyproject.toml, README.md,
requirements.txt and transformer_book/ (the checks, the manifest of the shipped
exercises and the grader), as they are in this checkout.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
COURSE_FILES = ["pyproject.toml", "README.md", "requirements.txt"]


def build(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for script in ("setup.sh", "run_autograder"):
            info = zipfile.ZipInfo(script)
            info.external_attr = 0o100755 << 16  # executable, as Gradescope runs them
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, (HERE / script).read_bytes())
        for name in COURSE_FILES:
            archive.write(ROOT / name, f"course/{name}")
        for path in sorted((ROOT / "transformer_book").rglob("*.py")):
            archive.write(path, f"course/{path.relative_to(ROOT)}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "gradescope" / "autograder.zip")
    args = parser.parse_args(argv)
    print(f"wrote {build(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
