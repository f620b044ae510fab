"""Build the wheel bundle that the offline GPU benchmark installs (bench/gpu_run.sh).

  python -m bench.bundle --python-version 3.12 --out .gpu-bundle

The GPU machine has Python, torch, pyarrow and a few big packages, but no diffusers, av or ray and no
package index, and one call may carry at most 64 MiB. So the bundle holds the project's dependencies
(versions from pyproject.toml) and everything they need that the GPU image does not provide, each
wheel repacked smaller:

- ray: no Java jars, no dashboard web client (the benchmark starts Ray with include_dashboard=False),
  no RLlib, Serve or Ray LLM (nothing in ray.init or Ray Data imports them); the symbol tables of its
  C++ binaries are stripped (never loaded at run time: only crash backtraces lose function names);
- every ELF file: DWARF debug sections stripped (av's Cython modules carry 20 MB of them);
- every wheel: recompressed with LZMA (zipfile's; 55 MiB in all, where deflate, even at level 9
  and with the same stripping, makes 71 MiB). pip reads wheels through Python's zipfile,
  which reads LZMA members (the tests install these bundles with pip), and the installer checks
  that the interpreter has the lzma module first.

Files of a wheel that are dropped or rewritten are removed from, or re-hashed in, its RECORD.
The bundle holds bundle-manifest.json (the wheels, what was dropped, what the image must provide)
and requirements.txt (what the installer resolves, offline, against the interpreter's packages).
"""
from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MANIFEST = "bundle-manifest.json"
REQUIREMENTS = "requirements.txt"
MAX_MIB = 60.0

# The project's dependencies that travel in the bundle (their version ranges are read from
# pyproject.toml). torch, pyarrow and numpy come from the GPU image; accelerate is optional for
# diffusers and needs torch, so it is left to the image too.
CARRIED = ("ray", "diffusers", "safetensors", "av")
# Module to import for each carried distribution (the installer checks they import from the bundle).
CARRIED_MODULES = {"ray": "ray", "diffusers": "diffusers", "safetensors": "safetensors", "av": "av"}

# Distributions the GPU image provides (its package list names them) and the bundle never holds:
# torch and pyarrow by design; numpy, pandas, pillow and hf-xet because they would not fit (with
# numpy, ~11 MB compressed, the bundle is over 60 MiB). Their own dependencies are not carried
# either. The installer checks each imports before installing anything, and pip's resolver then
# uses the image's versions, so nothing here shadows them. Distribution -> module.
PROVIDED = {"torch": "torch", "pyarrow": "pyarrow", "numpy": "numpy", "pandas": "pandas",
            "pillow": "PIL", "hf-xet": "hf_xet"}

# x86-64 Linux wheels, newest glibc first; pip matches each manylinux tag exactly, so all are named.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64",
             "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_5_x86_64", "manylinux1_x86_64")

# Members dropped per distribution (path prefixes inside the wheel), with the reason.
DROP = {
    "ray": {
        "ray/jars/": "Java workers only",
        "ray/dashboard/client/build/": "the dashboard's web UI; the benchmark runs include_dashboard=False",
        "ray/rllib/": "RLlib: imported only by itself and, lazily, by Ray Tune's registry",
        "ray/serve/": "Ray Serve: imported only lazily by Serve's dashboard handlers and ray.data.llm",
        "ray/llm/": "Ray LLM: imported only by ray.data.llm and ray.serve.llm",
    },
}
# strip(1) mode per distribution; every other ELF member gets --strip-debug (DWARF only).
STRIP = {"ray": "--strip-unneeded"}
COMPRESSION = zipfile.ZIP_LZMA


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bundle", description=__doc__.split("\n")[0])
    p.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                   help="the target interpreter's X.Y (default: this one's)")
    p.add_argument("--out", default=str(REPO / ".gpu-bundle"))
    p.add_argument("--cache", default=str(REPO / ".gpu-bundle-cache" / "repacked"),
                   help="repacked wheels, keyed by the source wheel's hash and this builder's source")
    p.add_argument("--max-mib", type=float, default=MAX_MIB)
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out).resolve()
    _check_out(out)
    requirements = carried_requirements(REPO / "pyproject.toml")
    with tempfile.TemporaryDirectory(prefix="vl-bundle-") as tmp:
        tmp = Path(tmp)
        report = resolve(requirements, args.python_version, tmp / "target")
        dists = closure(report, requirements, args.python_version)
        print(f"bundle: {len(dists)} distributions for Python {args.python_version}: "
              + ", ".join(f"{n}=={d['version']}" for n, d in sorted(dists.items())), flush=True)
        downloaded = download(dists, args.python_version, tmp / "download")
        staging = tmp / "bundle"
        staging.mkdir()
        wheels = repack_all(downloaded, staging, Path(args.cache), args.jobs)
        total = write_manifest(staging, wheels, requirements, args.python_version)
        _print_sizes(wheels, total)
        if total > args.max_mib * 2**20:
            print(f"bundle: {total / 2**20:.2f} MiB is over the {args.max_mib:g} MiB limit; "
                  f"nothing written to {out}", file=sys.stderr)
            return 1
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(staging), out)
    print(f"bundle: {out} ({total / 2**20:.2f} MiB, limit {args.max_mib:g} MiB) "
          f"in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


def _check_out(out: Path) -> None:
    """Refuse to replace a folder that is not an earlier bundle (it is deleted on success)."""
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
        sys.exit(f"bundle: --out {out} exists and is not a bundle (no {MANIFEST}); choose another folder")


def carried_requirements(pyproject: Path) -> list[str]:
    """The carried distributions' requirement lines, exactly as pyproject.toml pins them."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    picked = [d for d in deps if canonicalize_name(Requirement(d).name) in CARRIED]
    missing = set(CARRIED) - {canonicalize_name(Requirement(d).name) for d in picked}
    if missing:
        sys.exit(f"bundle: pyproject.toml no longer lists {', '.join(sorted(missing))}; update CARRIED")
    return picked


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        sys.exit(f"bundle: pip failed (exit {proc.returncode}); it needs a package index (PyPI) "
                 "to resolve and download the wheels")


def _target_args(python_version: str) -> list[str]:
    args = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    return args


def resolve(requirements: list[str], python_version: str, target: Path) -> dict:
    """pip's resolution of the requirements for the target interpreter, as its JSON report
    (names, versions, dependencies), from the index's metadata (nothing is installed)."""
    report = target.parent / "resolve-report.json"
    _pip("install", "--dry-run", "--quiet", "--ignore-installed", "--report", str(report),
         "--target", str(target), *_target_args(python_version), *requirements)
    return json.loads(report.read_text())


def _marker_env(python_version: str) -> dict:
    """Environment markers of the GPU machine's interpreter (x86-64 Linux CPython)."""
    from packaging.markers import default_environment

    env = default_environment()
    env.update(python_version=python_version, python_full_version=f"{python_version}.0",
               implementation_name="cpython", platform_python_implementation="CPython",
               sys_platform="linux", platform_system="Linux", platform_machine="x86_64", os_name="posix")
    return env


def closure(report: dict, requirements: list[str], python_version: str) -> dict[str, dict]:
    """The resolved distributions reachable from the requirements without passing through one the
    image provides: {name: {"version", "requires"}}."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    resolved = {canonicalize_name(i["metadata"]["name"]): i["metadata"] for i in report["install"]}
    env = _marker_env(python_version)
    todo = [Requirement(r) for r in requirements]
    seen: dict[str, set] = {}  # name -> extras already expanded
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in PROVIDED or (req.marker and not req.marker.evaluate({**env, "extra": ""})):
            continue
        extras = set(req.extras)
        if name in seen and extras <= seen[name]:
            continue
        seen[name] = seen.get(name, set()) | extras
        if name not in resolved:
            sys.exit(f"bundle: {name} is needed on Python {python_version} but pip's resolution "
                     "(whose markers follow the interpreter running pip) left it out; build with that Python")
        for line in resolved[name].get("requires_dist") or []:
            dep = Requirement(line)
            wanted = {""} | seen[name]
            if dep.marker is None or any(dep.marker.evaluate({**env, "extra": e}) for e in wanted):
                todo.append(Requirement(str(dep).split(";")[0]))  # marker already decided
    return {n: {"version": resolved[n]["version"], "requires": resolved[n].get("requires_dist") or []}
            for n in seen}


def download(dists: dict[str, dict], python_version: str, folder: Path) -> dict[str, Path]:
    """The wheel of each distribution at its resolved version: {name: path}."""
    from packaging.utils import canonicalize_name, parse_wheel_filename

    _pip("download", "--quiet", "--no-deps", "--dest", str(folder), *_target_args(python_version),
         *[f"{n}=={d['version']}" for n, d in sorted(dists.items())])
    found = {canonicalize_name(parse_wheel_filename(p.name)[0]): p for p in folder.glob("*.whl")}
    missing = set(dists) - set(found)
    if missing:
        sys.exit(f"bundle: pip download brought no wheel for {', '.join(sorted(missing))}")
    return {n: found[n] for n in dists}


def repack_all(wheels: dict[str, Path], dest: Path, cache: Path, jobs: int) -> list[dict]:
    """Repack every wheel into dest (largest first, in parallel); reuse cached results."""
    cache.mkdir(parents=True, exist_ok=True)
    for stale in cache.glob("*-*"):  # made by an earlier version of this file: never found again
        if stale.is_dir() and not stale.name.endswith(_builder_key()) and not stale.name.startswith("repack-"):
            shutil.rmtree(stale, ignore_errors=True)
    order = sorted(wheels.items(), key=lambda kv: -kv[1].stat().st_size)
    with ProcessPoolExecutor(max(1, jobs)) as pool:
        futures = [pool.submit(_repack_cached, name, str(src), str(cache)) for name, src in order]
        infos = [f.result() for f in futures]
    for info in infos:
        shutil.copyfile(info.pop("cached_path"), dest / info["file"])
    return infos


def _builder_key() -> str:
    """Changes with the repacking rules and code, so a cached repack never outlives what made it."""
    import inspect

    parts = [repr((DROP, STRIP, COMPRESSION))]
    parts += [inspect.getsource(f) for f in (repack, wheel_record, _copy_info, _strip, _rewrite_record, _record_hash)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _repack_cached(name: str, src: str, cache: str) -> dict:
    src_path = Path(src)
    digest = _sha256(src_path.read_bytes())
    entry = Path(cache) / f"{digest[:24]}-{_builder_key()}"
    meta = entry / "info.json"
    if not meta.exists():
        tmp = Path(tempfile.mkdtemp(prefix="repack-", dir=cache))
        info = repack(name, src_path, tmp / src_path.name)
        info.update(source_sha256=digest, source_bytes=src_path.stat().st_size)
        (tmp / "info.json").write_text(json.dumps(info, indent=1))
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)  # atomic: a half-written entry is never found
        print(f"  repacked {src_path.name}", flush=True)
    info = json.loads(meta.read_text())
    info["cached_path"] = str(entry / info["file"])
    return info


def repack(name: str, src: Path, dst: Path) -> dict:
    """Copy a wheel without its dropped members, with ELF files stripped, LZMA-compressed, and
    with its RECORD updated to match (dropped files removed, rewritten files re-hashed)."""
    drop = tuple(DROP.get(name, {}))
    strip_mode = STRIP.get(name, "--strip-debug")
    changed: dict[str, bytes | None] = {}  # member -> new content, or None when dropped
    dropped_bytes = stripped = 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", COMPRESSION) as zout:
        record = wheel_record(zin)
        signatures = (record + ".jws", record + ".p7s")  # would no longer match: dropped
        for info in zin.infolist():
            if info.filename == record:
                continue
            if info.filename.startswith(drop) or info.filename in signatures:
                changed[info.filename] = None
                dropped_bytes += info.file_size
                continue
            data = zin.read(info)
            if data[:4] == b"\x7fELF":
                smaller = _strip(data, strip_mode)
                if smaller is not None:
                    data, changed[info.filename] = smaller, smaller
                    stripped += 1
            zout.writestr(_copy_info(info), data)
        zout.writestr(_copy_info(zin.getinfo(record)), _rewrite_record(zin.read(record), changed))
    return {"name": name, "file": dst.name, "bytes": dst.stat().st_size, "sha256": _sha256(dst.read_bytes()),
            "dropped": {p: r for p, r in DROP.get(name, {}).items()},
            "dropped_files": sum(v is None for v in changed.values()),
            "dropped_uncompressed_bytes": dropped_bytes, "stripped_elf_files": stripped,
            "strip_mode": strip_mode}


def wheel_record(z: zipfile.ZipFile) -> str:
    """The wheel's own RECORD: in its top-level .dist-info (ray vendors packages whose dist-info
    folders, RECORDs included, sit deeper)."""
    (record,) = [n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/RECORD")]
    return record


def _copy_info(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    """Same name, date and permissions (ray's binaries must stay executable), new compression."""
    new = zipfile.ZipInfo(info.filename, info.date_time)
    new.external_attr, new.create_system = info.external_attr, info.create_system
    new.compress_type = COMPRESSION
    return new


def _strip(data: bytes, mode: str) -> bytes | None:
    """The ELF file without what ``strip MODE`` removes, or None when that saves nothing."""
    strip = shutil.which("strip")
    if strip is None:
        sys.exit("bundle: strip (binutils) is needed to shrink the wheels' ELF files")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "in"), os.path.join(tmp, "out")
        Path(src).write_bytes(data)
        subprocess.run([strip, mode, "-o", out, src], check=True, capture_output=True)
        new = Path(out).read_bytes()
    return new if len(new) < len(data) else None


def _rewrite_record(record: bytes, changed: dict[str, bytes | None]) -> bytes:
    rows = []
    for row in csv.reader(io.StringIO(record.decode())):
        if not row:
            continue
        path = row[0]
        if path in changed:
            if changed[path] is None:
                continue
            data = changed[path]
            row = [path, "sha256=" + _record_hash(data), str(len(data))]
        rows.append(row)
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue().encode()


def _record_hash(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifest(folder: Path, wheels: list[dict], requirements: list[str], python_version: str) -> int:
    """Write requirements.txt and the manifest; return the bundle's total size in bytes."""
    (folder / REQUIREMENTS).write_text("".join(r + "\n" for r in requirements))
    manifest = {
        "format": 1,
        "python_version": python_version,
        "platforms": list(PLATFORMS),
        "requirements": requirements,
        "carried_modules": CARRIED_MODULES,
        "provided": PROVIDED,
        "compression": "ZIP_LZMA",
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wheels": sorted(wheels, key=lambda w: w["file"]),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return sum(p.stat().st_size for p in folder.iterdir())


def _print_sizes(wheels: list[dict], total: int) -> None:
    print(f"\n{'MiB':>7} {'was':>7}  wheel", flush=True)
    for w in sorted(wheels, key=lambda w: -w["bytes"]):
        print(f"{w['bytes'] / 2**20:7.2f} {w['source_bytes'] / 2**20:7.2f}  {w['file']}")
    print(f"{total / 2**20:7.2f} {sum(w['source_bytes'] for w in wheels) / 2**20:7.2f}  total\n", flush=True)


if __name__ == "__main__":
    sys.exit(main())
