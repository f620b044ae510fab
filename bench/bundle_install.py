"""Install a bundle made by bench.bundle into an empty folder, offline, on the GPU machine.

  python3 -m bench.bundle_install BUNDLE SITE [--allow-missing torch]

Standard library only: it runs before anything from the bundle is installed. Steps, each printed:

1. the interpreter matches the bundle's Python version and can read LZMA wheels;
2. every distribution the bundle relies on the image for (torch, pyarrow, numpy...) imports;
3. pip resolves the bundle's requirements with no index, against this interpreter's own packages
   (pip install --dry-run --report): what the image already satisfies is left alone, so nothing
   installed here shadows the image's torch, pyarrow or numpy; what is missing comes from the
   bundle, and a requirement neither can meet stops here, before anything is written;
4. exactly those wheels are installed with --no-deps into SITE (emptied first);
5. with SITE first on the path, the carried packages import (from SITE when they were installed
   there) and the provided ones still import from the image.

Then run with PYTHONPATH=SITE (bench/gpu_run.sh does).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from importlib import metadata, util

MANIFEST = "bundle-manifest.json"
REQUIREMENTS = "requirements.txt"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.bundle_install", description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("site", help="target folder; emptied first")
    p.add_argument("--allow-missing", action="append", default=[], metavar="DIST",
                   help="a provided distribution that may be absent (tests on machines without it)")
    args = p.parse_args(argv)
    bundle, site = os.path.abspath(args.bundle), os.path.abspath(args.site)
    with open(os.path.join(bundle, MANIFEST)) as f:
        manifest = json.load(f)
    check_interpreter(manifest)
    check_provided(manifest["provided"], set(args.allow_missing))
    wheels = resolve(bundle)
    install(wheels, site)
    verify(site, manifest, set(args.allow_missing))
    return 0


def say(message: str) -> None:
    print(f"bundle_install: {message}", flush=True)


def fail(message: str) -> None:
    sys.exit(f"bundle_install: FAILED: {message}")


def check_interpreter(manifest: dict) -> None:
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    say(f"python {sys.version.split()[0]} at {sys.executable}; bundle built for {manifest['python_version']}")
    if here != manifest["python_version"]:
        fail(f"the bundle is for Python {manifest['python_version']}, this is {here}: "
             f"rebuild it with python -m bench.bundle --python-version {here}")
    if util.find_spec("lzma") is None:
        fail("this Python has no lzma module, and the bundle's wheels are LZMA-compressed")


def check_provided(provided: dict, allow_missing: set) -> None:
    """The distributions the bundle does not carry must be here already."""
    for dist, module in sorted(provided.items()):
        found = util.find_spec(module) is not None
        version = _version(dist) if found else None
        say(f"provided by this environment: {dist} {version or 'MISSING'}")
        if not found and dist not in allow_missing:
            fail(f"{dist} (import {module}) is not installed, and the bundle does not carry it")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "(version unknown)"


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    say("+ " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def resolve(bundle: str) -> list[str]:
    """The bundle's wheels that pip would install here: only what this environment lacks."""
    with tempfile.TemporaryDirectory(prefix="vl-resolve-") as tmp:
        report = os.path.join(tmp, "report.json")
        try:
            _pip("install", "--dry-run", "--quiet", "--no-index", "--find-links", bundle,
                 "--report", report, "-r", os.path.join(bundle, REQUIREMENTS))
        except subprocess.CalledProcessError:
            fail("pip cannot satisfy the requirements from this environment plus the bundle "
                 "(its message is above); nothing was installed")
        with open(report) as f:
            items = json.load(f)["install"]
    wheels = [urllib.request.url2pathname(urllib.parse.urlparse(i["download_info"]["url"]).path) for i in items]
    outside = [w for w in wheels if os.path.dirname(w) != bundle]
    if outside:
        fail(f"pip chose wheels outside the bundle: {outside}")
    say(f"{len(wheels)} wheels to install: " + ", ".join(sorted(os.path.basename(w) for w in wheels)))
    return wheels


def install(wheels: list[str], site: str) -> None:
    if os.path.exists(site):
        shutil.rmtree(site)
    os.makedirs(site)
    if wheels:  # the environment may already satisfy everything
        _pip("install", "--quiet", "--no-index", "--no-deps", "--no-compile", "--target", site, *wheels)


VERIFY = """
import importlib, json, sys
out = {}
for module in sys.argv[1:]:
    try:
        m = importlib.import_module(module)
        out[module] = {"file": getattr(m, "__file__", None), "version": getattr(m, "__version__", None)}
    except Exception as e:
        out[module] = {"error": f"{type(e).__name__}: {e}"}
print(json.dumps(out))
"""


def verify(site: str, manifest: dict, allow_missing: set) -> None:
    """Import everything in a fresh interpreter with SITE first on the path, as the benchmark will."""
    carried = sorted(manifest["carried_modules"].values())
    provided = sorted(m for d, m in manifest["provided"].items() if d not in allow_missing)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", VERIFY, *carried, *provided], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        fail(f"import check crashed:\n{proc.stderr[-3000:]}")
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    problems = []
    for module in carried + provided:
        info = found[module]
        where = info.get("file") or ""
        from_site = os.path.realpath(where).startswith(os.path.realpath(site) + os.sep)
        say(f"import {module}: {info.get('version') or ''} {info.get('error') or where}")
        if "error" in info:
            problems.append(f"{module} does not import: {info['error']}")
        elif module in provided and from_site:
            problems.append(f"{module} comes from {site}, shadowing the environment's own")
    if problems:
        fail("; ".join(problems))
    say(f"installed into {site}")


if __name__ == "__main__":
    sys.exit(main())
