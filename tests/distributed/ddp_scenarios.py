"""Run under torchrun by tests/distributed/test_distributed.py: several commands in one job, so that the suite pays for
one job's start-up (about ten seconds of imports on 2 cores) instead of one per case.

    torchrun --standalone --nproc-per-node 2 tests/distributed/ddp_scenarios.py PLAN.json RESULT.json

PLAN.json: {"commands": [{"name": ..., "args": [cli args], "before": {"copy": [SRC, DST]}}, ...]}. The script
makes the process group itself (gloo): `pipeline.distributed.session` then uses it and leaves it in place,
as for a user's script that calls fit. Each command runs through the CLI (`cli.py ARGS`, parsed by Typer,
errors printed by the CLI's boundary) with its stdout and stderr captured. Rank 0 writes RESULT.json: per
command, every rank's exit code, stdout, stderr and extract's status rounds; and what the collectives gave.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch.distributed as tdist  # noqa: E402
import typer  # noqa: E402

from cli import app  # noqa: E402
from pipeline.distributed import AgreedError, Dist, launched  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.extract import shared  # noqa: E402


def collectives(dist: Dist) -> dict:
    """The helpers on ranks that hold different amounts: what rank 0 sees."""
    r = dist.rank
    seqs = [[10 * r + i] * (i + r) for i in range(2 + r)]  # rank 0: 2 sequences, rank 1: 3, lengths 0..3
    out: dict = {"sequences": dist.gather_sequences(seqs, 5)}
    out["sum"] = dist.sum(1.5 * (r + 1), r)
    out["part"] = [dist.part(np.arange(7)).tolist()]
    out["decided"] = dist.decide(lambda: {"rank": dist.rank})
    for name, fn in (("decide_error", lambda: dist.decide(_fail)), ("check_error", lambda: dist.check(_fail_on_1))):
        try:
            fn()
        except AgreedError as e:
            out[name] = {"message": str(e), "quiet": e.quiet}
    return out


def _fail() -> None:
    raise UserError("rank 0 says no")


def _fail_on_1() -> None:
    if tdist.get_rank() == 1:
        raise UserError("rank 1's store is missing")


def main() -> None:
    plan_path, result_path = Path(sys.argv[1]), Path(sys.argv[2])
    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    launch = launched()
    assert launch is not None and launch.world > 1, "run me under torchrun"
    tdist.init_process_group("gloo")
    dist = Dist(launch.rank, launch.world, launch.local_rank, launch.local_world)
    # status rounds of 2 rows: with batches of 2, several rounds, and shares that end at different rounds
    shared.ROUND_ROWS.update(cpu=2, cuda=2)
    rounds = {"n": 0}
    original = shared.ShareWriter._round

    def counted(self) -> None:
        rounds["n"] += 1
        original(self)

    shared.ShareWriter._round = counted  # type: ignore[method-assign]
    command = typer.main.get_command(app)
    results: dict = {"collectives": collectives(dist), "commands": {}}
    for step in plan["commands"]:
        if dist.is_main and "copy" in step.get("before", {}):
            src, dst = step["before"]["copy"]
            shutil.copytree(src, dst)
        dist.barrier()
        out, err = io.StringIO(), io.StringIO()
        rounds["n"] = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = command.main(step["args"], prog_name="cli.py", standalone_mode=False)
        gathered: list = [None] * dist.world
        result = {"code": code or 0, "stdout": out.getvalue(), "stderr": err.getvalue(), "rounds": rounds["n"]}
        tdist.all_gather_object(gathered, result)
        results["commands"][step["name"]] = gathered
    if dist.is_main:
        result_path.write_text(json.dumps(results), encoding="utf-8")
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
