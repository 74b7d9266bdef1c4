"""Helpers for the extract safety tests: a cheap stand-in for the ResNet50 trunk, and a warm "zygote"
process that forks fresh `cli.py` processes in milliseconds instead of paying Python's and torch's start-up
(seconds on 2 cores) for each one, so that kill -9, Ctrl-C and file-size-limit runs are cheap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


class TinyTrunk(nn.Module):
    """Stands in for the ResNet50 trunk where a test is about the store, not the features: (B, 3, 224, 224)
    -> (B, 2048, 7, 7) (layer3: (B, 1024, 14, 14)), deterministic, different for different pictures, and ~1000x
    cheaper. `delay` seconds of sleep per batch stretch a run so that a test can act in the middle of it."""

    def __init__(self, delay: float = 0.0, layer: str = "layer4") -> None:
        super().__init__()
        from pipeline.encoder import FEATURE_SHAPES

        side, _, channels = FEATURE_SHAPES[layer]
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(channels, 3, generator=g))
        self.delay, self.pool = delay, 224 // side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        pooled = nn.functional.avg_pool2d(x.float(), self.pool)  # (B, 3, 7, 7)
        return torch.einsum("oc,bchw->bohw", self.proj, pooled)  # (B, 2048, 7, 7)


def fake_build_encoder(spec: str, layer: str = "layer4", delay: float = 0.0):
    """An encoder factory for `extract(cfg, encoder_factory=...)`: a TinyTrunk; provenance as `--weights none`."""
    from pipeline.encoder import WeightsInfo

    return TinyTrunk(delay, layer), WeightsInfo("none", "")


def fake_extract(delay: float = 0.0, trunk: Callable[[nn.Module], nn.Module] | None = None) -> Callable:
    """`pipeline.extract.extract` with a TinyTrunk as its encoder (`trunk` wraps it, to act on each batch): what
    a test puts in place of the real entry point, so that `cli.py extract` runs it."""
    from pipeline.extract import extract

    def factory(spec: str, layer: str = "layer4"):
        tiny, weights = fake_build_encoder(spec, layer, delay)
        return (trunk(tiny) if trunk else tiny), weights

    return partial(extract, encoder_factory=factory)


_ZYGOTE = r"""
import json, os, resource, signal, sys
from functools import partial
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import h5py, numpy, torch, torchvision.models  # noqa: F401  what every run imports, paid once here
import cli, pipeline.extract
from helpers_extract import fake_extract
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if "wait" in req:
        _, status = os.waitpid(req["wait"], 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
        continue
    pid = os.fork()
    if pid:
        print(json.dumps({"pid": pid}), flush=True)
        continue
    # The child: from here on, a `python cli.py ARGS` started from a terminal, in its own process group.
    if req["own_group"]:
        os.setpgid(0, 0)
    for fd, name, mode in ((0, os.devnull, os.O_RDONLY), (1, req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                           (2, req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        os.dup2(os.open(name, mode, 0o644), fd)
    if req.get("fsize") is not None:  # `ulimit -f`, SIGXFSZ ignored: writes past it fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if req.get("fake") is not None:
        pipeline.extract.extract = fake_extract(delay=req["fake"])
    sys.argv = ["cli.py", *req["args"]]
    if req["full_exit"]:
        cli.app(args=req["args"], prog_name="cli.py")  # exits through SystemExit: the normal interpreter exit
    try:
        cli.app(args=req["args"], prog_name="cli.py")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    # A quick exit: Python's finalisation in a forked child writes to every page it shares with the
    # zygote (reference counts) and takes seconds here. The atexit functions and C exit handlers (HDF5's
    # included) still run; objects are not deallocated one by one.
    import atexit, ctypes
    sys.stdout.flush(); sys.stderr.flush()
    atexit._run_exitfuncs()
    ctypes.CDLL(None).exit(code)
"""


class Run:
    def __init__(self, zygote: Zygote, pid: int, out: Path, err: Path) -> None:
        self.zygote, self.pid, self.out, self.err = zygote, pid, out, err
        self.code: int | None = None

    def wait(self) -> int:
        if self.code is None:
            self.code = self.zygote.ask({"wait": self.pid})["code"]
        return self.code

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 120) -> None:
        """Block until stdout shows `text` (a progress line, say): the run is then at that point."""
        deadline = time.monotonic() + timeout
        while not self.out.exists() or text not in self.stdout:
            if time.monotonic() > deadline or _gone(self.pid):
                raise AssertionError(f"no {text!r} in the output of {self.pid}:\n{self.stdout}\n{self.stderr}")
            time.sleep(0.02)

    def workers(self) -> list[int]:
        """Pids of this run's child processes (its DataLoader workers)."""
        return children(self.pid)


class Zygote:
    """`z.start(*args, fake=0.0, fsize=None)` forks a fresh `cli.py ARGS` process from a warm one and returns a
    `Run`; `fake` (seconds of delay a batch) replaces the ResNet50 by a TinyTrunk (None: the real one), `fsize`
    sets `ulimit -f`. `full_exit`: leave through Python's whole finalisation (2 s more here), where h5py
    objects that failed to close used to crash the process. `own_group`: a process group of its own, as a
    terminal gives a command (for Ctrl-C); without it, in the zygote's group (when its group leader dies,
    a process group with a stopped member is sent SIGHUP and SIGCONT, which a test may need to avoid)."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-c", _ZYGOTE, str(ROOT)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", line
        self.count = 0

    def ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(
        self,
        *args: str | Path,
        fake: float | None = 0.0,
        fsize: int | None = None,
        full_exit: bool = False,
        own_group: bool = True,
    ) -> Run:
        self.count += 1
        out, err = self.workdir / f"run{self.count}.out", self.workdir / f"run{self.count}.err"
        for stale in (out, err):  # the child creates them: never read an older run's output
            stale.unlink(missing_ok=True)
        req = {"args": [str(a) for a in args], "out": str(out), "err": str(err), "fake": fake, "fsize": fsize}
        req["full_exit"], req["own_group"] = full_exit, own_group
        return Run(self, self.ask(req)["pid"], out, err)

    def run(self, *args: str | Path, **kwargs) -> Run:
        r = self.start(*args, **kwargs)
        r.wait()
        return r

    def close(self) -> None:
        self.proc.kill()  # its own exit would be a full finalisation: seconds for nothing
        self.proc.wait(timeout=60)
        self.proc.stdin.close()
        self.proc.stdout.close()


def _gone(pid: int) -> bool:
    """True when `pid` has exited (gone, or a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def children(pid: int) -> list[int]:
    """Live child processes of `pid`, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            out.append(int(entry))
    return out


def wait_gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
