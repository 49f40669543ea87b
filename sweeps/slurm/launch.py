"""Submit K SLURM jobs that each run one W&B sweep agent for one run on N GPUs.

    wandb sweep sweeps/aspp.yaml                  # prints ENTITY/PROJECT/SWEEP_ID
    python sweeps/slurm/launch.py submit ENTITY/PROJECT/SWEEP_ID --jobs 6 --gpus 1 --partition gpu \
        --setup 'source .venv/bin/activate'
    python sweeps/slurm/launch.py submit ENTITY/PROJECT/SWEEP_ID --jobs 6 --dry-run   # write, do not submit

`submit` renders sweeps/slurm/agent.sbatch into `<log-dir>/<sweep id>/agent.sbatch` and submits it K
times (a grid sweep needs one job per grid point; more jobs than points just find the sweep done).
`next-command` is what that script runs first: it prints, NUL-separated, either `wandb agent --count 1
SWEEP` (a fresh job) or, when this job's W&B directory already holds the parameters of the run its
agent took (a requeued job), the command that resumes that run: the agent's own command line for it,
with WANDB_RUN_ID and WANDB_RESUME=allow, so W&B continues the same run and `fit` finds its
deterministic run directory and `last.ckpt`.
"""
from __future__ import annotations

import argparse
import re
import shlex
import string
import subprocess
import sys
from pathlib import Path

import yaml

from deeplab_lit.cli import run
from deeplab_lit.errors import UserError

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "agent.sbatch"
REPO = HERE.parent.parent
SWEEP_PATH = re.compile(r"^(?:[\w.-]+/){0,2}[\w-]+$")  # SWEEP_ID, PROJECT/SWEEP_ID or ENTITY/PROJECT/SWEEP_ID
NO_SPACE = re.compile(r"^\S+$")


class SbatchTemplate(string.Template):
    """`%%{name}` placeholders: `$` is bash's, `%` alone is sbatch's (`%x-%j.out`)."""

    delimiter = "%%"


def render_sbatch(
    sweep: str,
    *,
    gpus: int = 1,
    cpus_per_gpu: int = 8,
    time: str = "24:00:00",
    partition: str | None = None,
    account: str | None = None,
    mem: str | None = None,
    extra_sbatch: tuple[str, ...] = (),
    setup: str = "",
    log_dir: str | Path = "runs/slurm",
    workdir: str | Path = REPO,
    program: str = "deeplab_lit.fit",
    signal_seconds: int = 180,
) -> str:
    """The job script for one agent of `sweep`, as submitted (also what the tests read)."""
    if not SWEEP_PATH.match(sweep):
        raise UserError(f"sweep '{sweep}' is not SWEEP_ID, PROJECT/SWEEP_ID or ENTITY/PROJECT/SWEEP_ID")
    if gpus < 1 or cpus_per_gpu < 1 or signal_seconds < 1:
        raise UserError("--gpus, --cpus-per-gpu and --signal-seconds must be positive")
    log_dir = Path(log_dir).resolve()
    for name, value in [("--log-dir", str(log_dir)), ("--time", time), ("--partition", partition),
                        ("--account", account), ("--mem", mem)]:
        if value is not None and not NO_SPACE.match(value):  # #SBATCH lines cannot quote
            raise UserError(f"{name} '{value}' must not be empty or contain spaces")
    optional = [f"#SBATCH --{key}={value}" for key, value in
                [("partition", partition), ("account", account), ("mem", mem)] if value]
    optional += [line if line.startswith("#SBATCH") else f"#SBATCH {line}" for line in extra_sbatch]
    return SbatchTemplate(TEMPLATE.read_text()).substitute(
        job_name=f"sweep-{sweep.rsplit('/', 1)[-1]}",
        gpus=gpus,
        cpus=gpus * cpus_per_gpu,
        time=time,
        log_dir=log_dir,
        signal_seconds=signal_seconds,
        optional_sbatch="\n".join(optional),
        workdir=shlex.quote(str(Path(workdir).resolve())),
        setup=setup,
        launcher=shlex.quote(str(Path(__file__).resolve())),
        sweep=sweep,
        program=shlex.quote(program),
    )


def next_command(sweep: str, wandb_dir: Path, program: str = "deeplab_lit.fit") -> list[str]:
    """`wandb agent --count 1 SWEEP`, or the command that resumes the run this job already took.

    The agent saves each run's parameters as `$WANDB_DIR/wandb/sweep-<id>/config-<run id>.yaml`
    before starting it; with one agent and one run per job, finding that file means the job was
    requeued mid-run. The resumed command is built by W&B's own `${args}` expansion, so it is
    byte for byte the command line the agent ran.
    """
    taken = sorted(Path(wandb_dir).glob("wandb/sweep-*/config-*.yaml"))
    if not taken:
        return ["wandb", "agent", "--count", "1", "--forward-signals", sweep]
    if len(taken) > 1:
        raise UserError(f"{wandb_dir}: {len(taken)} sweep runs in one job's W&B directory; expected one")
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    params_file = taken[0]
    params = yaml.safe_load(params_file.read_text()) or {}
    params.pop("wandb_version", None)
    args = create_sweep_command_args({"args": params})["args"]
    env = [
        f"WANDB_RUN_ID={params_file.stem.removeprefix('config-')}",
        "WANDB_RESUME=allow",
        f"WANDB_SWEEP_ID={params_file.parent.name.removeprefix('sweep-')}",
        f"WANDB_SWEEP_PARAM_PATH={params_file}",
    ]
    parts = sweep.split("/")
    if len(parts) == 3:
        env.append(f"WANDB_ENTITY={parts[0]}")
    if len(parts) >= 2:
        env.append(f"WANDB_PROJECT={parts[-2]}")
    return ["env", *env, "python", "-m", program, *args]


def submit(script: str, out_dir: Path, jobs: int, dry_run: bool) -> list[str]:
    """Write the script and `sbatch` it `jobs` times; returns the job ids (or the commands, dry)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "agent.sbatch"
    path.write_text(script)
    command = ["sbatch", "--parsable", str(path)]
    if dry_run:
        return [shlex.join(command)] * jobs
    ids = []
    for _ in range(jobs):
        try:
            result = subprocess.run(command, check=True, capture_output=True, text=True)
        except FileNotFoundError:
            raise UserError("sbatch not found: run this on a SLURM login node, or pass --dry-run") from None
        except subprocess.CalledProcessError as error:
            raise UserError(f"sbatch {path} failed: {error.stderr.strip().splitlines()[-1:]}") from None
        ids.append(result.stdout.strip().split(";")[0])
    return ids


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(prog="python sweeps/slurm/launch.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("submit", help="render the job script and submit it --jobs times")
    sub.add_argument("sweep", help="ENTITY/PROJECT/SWEEP_ID as printed by `wandb sweep`")
    sub.add_argument("--jobs", type=int, required=True, help="how many jobs (= runs) to submit")
    sub.add_argument("--gpus", type=int, default=1, help="GPUs per job, used by one DDP run (default 1)")
    sub.add_argument("--cpus-per-gpu", type=int, default=8)
    sub.add_argument("--time", default="24:00:00", help="per job; longer runs are requeued and resume")
    sub.add_argument("--partition")
    sub.add_argument("--account")
    sub.add_argument("--mem", help="e.g. 64G (default: the partition's)")
    sub.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                     help="extra #SBATCH option, e.g. --sbatch=--constraint=a100 (repeatable)")
    sub.add_argument("--setup", default="", help="shell line run before the agent, e.g. 'source .venv/bin/activate'")
    sub.add_argument("--log-dir", default="runs/slurm",
                     help="job logs and per-job W&B directories go under DIR/SWEEP_ID")
    sub.add_argument("--program", default="deeplab_lit.fit", help="the sweep's program (for resuming)")
    sub.add_argument("--signal-seconds", type=int, default=180, help="USR1 this long before the time limit")
    sub.add_argument("--dry-run", action="store_true", help="write the script, print the sbatch commands")
    nxt = commands.add_parser("next-command", help="(used by the job script) agent or resume command, NUL-separated")
    nxt.add_argument("--sweep", required=True)
    nxt.add_argument("--wandb-dir", required=True, type=Path)
    nxt.add_argument("--program", default="deeplab_lit.fit")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.command == "next-command":
        sys.stdout.write("".join(f"{part}\0" for part in next_command(args.sweep, args.wandb_dir, args.program)))
        return 0
    if args.jobs < 1:
        raise UserError("--jobs must be at least 1")
    out_dir = Path(args.log_dir) / args.sweep.rsplit("/", 1)[-1]
    script = render_sbatch(
        args.sweep, gpus=args.gpus, cpus_per_gpu=args.cpus_per_gpu, time=args.time, partition=args.partition,
        account=args.account, mem=args.mem, extra_sbatch=tuple(args.sbatch), setup=args.setup,
        log_dir=out_dir, program=args.program, signal_seconds=args.signal_seconds,
    )
    results = submit(script, out_dir, args.jobs, args.dry_run)
    print(f"{out_dir / 'agent.sbatch'}: {args.jobs} job(s) of one agent on {args.gpus} GPU(s)")
    for line in results:
        print(line if args.dry_run else f"submitted job {line}")
    return 0


if __name__ == "__main__":
    run(main)
