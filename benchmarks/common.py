"""What every benchmark records beside its numbers: machine, versions, commit."""

import datetime
import json
import os
import subprocess
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Measured peaks per GPU: device-to-device copy (bytes/s) and dense bf16 matmul (FLOP/s), as seen on
# the GPU machines (the H200's matmul peak measured 769-798 TFLOP/s).
GPU_PEAKS = {"H100": {"hbm_bytes_per_s": 3.0e12, "bf16_flops": 7.9e14},
             "H200": {"hbm_bytes_per_s": 4.3e12, "bf16_flops": 7.9e14}}


def gpu_peaks() -> dict:
    """The peaks of the GPU in use (the H100's for a GPU not in the table), with its short name."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    gpu = next((g for g in GPU_PEAKS if g in name), "H100")
    return {"gpu": gpu, **GPU_PEAKS[gpu]}


def environment() -> dict:
    import transformers
    import triton

    # The device machine gets the tree without its history: the caller passes the commit there.
    commit = os.environ.get("PAGEDLLM_GIT_COMMIT")
    if commit is None:
        run = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(RESULTS_DIR))
        commit = run.stdout.strip() if run.returncode == 0 else None
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "cpu": cpu_name(),
        "host_python_ms": host_python_ms(),
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "git_commit": commit, "date": datetime.date.today().isoformat(), "peaks": gpu_peaks(),
    }


def cpu_name() -> str | None:
    """The host's CPU (what host-bound figures, the server's above all, depend on), where Linux says."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def host_python_ms() -> float:
    """Milliseconds one core takes for a fixed piece of plain Python (dicts, tuples, strings), the
    best of five: hosts that name the same CPU differ (a served flood's fraction of the offline
    engine moved from ~0.75 to ~0.95 between two H100 hosts on one day), so results say which."""
    def work() -> int:
        table: dict[str, tuple] = {}
        for i in range(20_000):
            key = f"req-{i % 512}"
            table[key] = (i, key, [i, i + 1], table.get(key, (0,))[0] + 1)
        return len(table)

    times = []
    for _ in range(5):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return round(min(times) * 1e3, 3)


def package_versions(names: list[str]) -> dict[str, str | None]:
    """The installed versions of ``names`` (None where one is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def warm_up_gpu(seconds: float = 2.0) -> None:
    """Run matmuls until the GPU has left its idle clocks, so that the first rows are not slowed."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def write_result(name: str, payload: dict, out_dir: str | None = None) -> str:
    """benchmarks/results/<name>-<gpu>-<date>.json (and a copy under ``out_dir`` if given)."""
    env = payload["environment"]
    gpu = (env["gpu"] or "cpu").lower().replace("nvidia ", "").split()[0]
    filename = f"{name}-{gpu}-{env['date']}.json"
    paths = [os.path.join(RESULTS_DIR, filename)] + ([os.path.join(out_dir, filename)] if out_dir else [])
    for path in paths:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
    return paths[0]
