"""The one entry point: `uv run python -m benchmarks.run [--quick] [--only NAME ... | --all] [--device cpu|cuda]
[--out FILE]`.

Runs the sections, prints one Markdown table per measurement (after the machine), and adds this run to the
JSON file under a key of timestamp and machine, keeping the runs already there. `--quick --all` is CI's smoke
run: every section at tiny sizes, on made-up captions when the real Flickr30k file is absent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from benchmarks import (
    bench_cider,
    bench_compile,
    bench_ddp,
    bench_embeddings,
    bench_epoch,
    bench_extract,
    bench_finetune,
    bench_fit,
    bench_fit50,
    bench_generate,
    bench_latency,
    bench_probe,
    bench_quality,
    bench_scaling,
    bench_scst,
    bench_serve,
    bench_step,
    bench_store,
    bench_ttq,
)
from benchmarks.common import (
    ROOT,
    BenchmarkError,
    Context,
    Skipped,
    Table,
    quick_captions,
    require_data,
)
from pipeline.files import write_text_atomic

SECTIONS: dict[str, Callable[[Context], list[Table]]] = {
    "fit": bench_fit.run,
    "extract": bench_extract.run,
    "scaling": bench_scaling.run,
    "generate": bench_generate.run,
    "latency": bench_latency.run,
    "store": bench_store.run,
    "serve": bench_serve.run,
    "ddp": bench_ddp.run,
    "finetune": bench_finetune.run,
    "step": bench_step.run,
    "cider": bench_cider.run,
    "scst": bench_scst.run,
    "compile": bench_compile.run,
    "probe": bench_probe.run,
    "quality": bench_quality.run,
    "embeddings": bench_embeddings.run,
    "epoch": bench_epoch.run,
    "fit50": bench_fit50.run,
    "ttq": bench_ttq.run,
}
# run only when named (or with --all): minutes to an hour on a CPU, or sized for a GPU
OPT_IN = ("scst", "compile", "probe", "quality", "embeddings", "epoch", "fit50", "ttq")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine(device: torch.device) -> dict:
    import numpy
    import torchvision

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "cpu": cpu_model(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),  # PASSIVE unless set, as cli.py runs
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "host": platform.node(),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "worktree_dirty": bool(_git("status", "--porcelain", "--", "pipeline", "cli.py")),
        "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    return info


def machine_table(info: dict, started: str, quick: bool) -> str:
    gpu = f", GPU {info['gpu']}" if info["gpu"] else ""
    load = info.get("load_average_start")
    busy = ""
    if load and load[0] > info["cores"]:
        busy = " (above the core count: something else is running, timings are noisy)"
    load_line = f"- load average at start: {', '.join(f'{x:.2f}' for x in load)}{busy}\n" if load else ""
    return (
        f"## Benchmarks {started}{' (--quick)' if quick else ''}\n\n"
        f"- machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads, "
        f"OMP_WAIT_POLICY={info.get('omp_wait_policy')}), "
        f"{info['memory_gib']} GiB RAM{gpu}; device {info['device']}\n"
        f"- software: Python {info['python']}, torch {info['torch']}, torchvision {info['torchvision']}, "
        f"numpy {info['numpy']}\n"
        f"- code: commit {info['commit'] or '?'}{' + uncommitted changes' if info['worktree_dirty'] else ''}\n"
        + load_line
    )


def _clean(value: object) -> object:
    """JSON without NaN/inf (as null), numpy scalars as Python numbers, tuples as lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save(out: Path, key: str, entry: dict) -> None:
    """Add `entry` under runs[key], keeping every earlier run; written atomically."""
    data: dict = {"runs": {}}
    if out.exists():
        try:
            data = json.loads(out.read_text(encoding="utf-8"))
            if not isinstance(data.get("runs"), dict):
                raise ValueError("no 'runs' object")
        except (ValueError, OSError) as e:
            backup = out.with_name(f"{out.stem}.unreadable-{int(time.time())}{out.suffix}")
            out.rename(backup)
            print(f"warning: {out} was unreadable ({e}); moved to {backup}", file=sys.stderr)
            data = {"runs": {}}
    data["runs"][key] = _clean(entry)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(data, indent=1) + "\n")


@contextlib.contextmanager
def one_thread(enabled: bool) -> Iterator[None]:
    """--quick is a check, not a measurement: one torch thread (and OMP_NUM_THREADS=1 for the sections'
    subprocesses), which a CPU shared with other jobs does not stall as it stalls two (BENCHMARKS.md, ddp).
    Restored afterwards: the tests call main() in their own process."""
    if not enabled:
        yield
        return
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, about a step each: checks that it runs")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--only", nargs="+", choices=list(SECTIONS), metavar="NAME",
        help=f"{', '.join(SECTIONS)} ({', '.join(OPT_IN)}: only when named, or with --all)",
    )  # fmt: skip
    which.add_argument("--all", action="store_true", help="every section, the opt-in ones too")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.json", help="JSON results file")
    args = parser.parse_args(argv)

    synthetic = args.quick and quick_captions()
    try:
        if synthetic:
            print("note: the real Flickr30k captions are absent; --quick runs on made-up captions", file=sys.stderr)
        else:
            require_data()
        if args.device == "cuda" and not torch.cuda.is_available():
            raise BenchmarkError("--device cuda asked for, but torch sees no CUDA GPU")
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    device = torch.device(args.device)
    names = args.only or [name for name in SECTIONS if args.all or name not in OPT_IN]
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    info = machine(device)
    if args.quick:
        info["torch_threads"] = 1  # one_thread() below
    print(machine_table(info, started, args.quick), flush=True)

    entry: dict = {
        "started": started,
        "quick": args.quick,
        "synthetic_captions": synthetic,
        "argv": sys.argv[1:] if argv is None else argv,
        "machine": info,
        "sections": {},
    }
    failed, skipped = [], []
    t_all = time.perf_counter()
    with one_thread(args.quick), tempfile.TemporaryDirectory(prefix="captioner-bench-") as tmp:
        ctx = Context(device=device, quick=args.quick, workdir=Path(tmp))
        for name in names:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                tables = SECTIONS[name](ctx)
            except Skipped as e:
                skipped.append(name)
                entry["sections"][name] = {"skipped": str(e), "seconds": time.perf_counter() - t0}
                print(f"### {name}: skipped ({e})\n", flush=True)
                continue
            except Exception as e:  # one broken section must not lose the others' figures
                traceback.print_exc()
                failed.append(name)
                entry["sections"][name] = {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}
                print(f"### {name}: FAILED ({type(e).__name__}: {e})\n", flush=True)
                continue
            seconds = time.perf_counter() - t0
            entry["sections"][name] = {"seconds": seconds, "tables": [t.to_json() for t in tables]}
            for t in tables:
                print(t.markdown(), flush=True)
            print(f"({name}: {seconds:.0f} s)\n", flush=True)
    entry["seconds"] = time.perf_counter() - t_all
    entry["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    key = (
        f"{started} | {info['cpu']} x{info['cores']}"
        + (f" | {info['gpu']}" if info["gpu"] else "")
        + (" | quick" if args.quick else "")
    )
    save(args.out, key, entry)
    print(f"total {entry['seconds']:.0f} s; results added to {args.out} as {key!r}", flush=True)
    if skipped:
        print(f"skipped sections: {', '.join(skipped)}", file=sys.stderr)
    if failed:
        print(f"failed sections: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
