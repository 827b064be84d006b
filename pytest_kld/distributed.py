"""A reference build sharded over MLX's distributed engine: the parent's side.

A reference too large for one machine is split over processes or hosts by mlx-lm
(``sharded_load``: pipeline parallel where the model implements it, else tensor parallel) and
run by MLX's own launcher (``mlx.launch``, ring backend by default; JACCL or MPI where set up).
pytest-kld adds no distribution layer: it starts ``mlx.launch`` as a subprocess, with the rank
program :mod:`pytest_kld.shardrank` under the same Python, and waits.

What stays exactly as in a single-process build: the cache key (sharding is not part of it),
the lock (held by this process for the whole build), the format, and the atomic write. Rank 0
writes its arrays into a job directory ``.tmp-<entry>-shard-*`` beside the entry (never read by
anyone, removed by the next builder if this process dies); this process validates them as a
cache entry *before* renaming it into place (:func:`pytest_kld.reference._write_entry`'s
``check``). A rank that dies, a host that cannot be reached or a launch that ends without rank
0's result is one line (:class:`~pytest_kld.errors.CacheError`) and leaves no entry.
The manifest records the sharding (ranks, strategy, backend, hosts) as provenance only.

Rank 0 must run on this machine (``mlx.launch`` puts rank 0 on the first host listed): it proves
it by reading a random token from the job directory. The model directory and the Python
environment must exist at the same paths on every host, as ``mlx.launch`` itself requires.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from .errors import CacheError
from .options import DIST_BACKENDS

# The protocol with the rank program (pytest_kld.shardrank), through mlx.launch's relayed output
# and a job directory on this machine that rank 0 reads and writes.
PROGRESS = "pytest-kld-progress"  # stdout: "PROGRESS done total"
FAILED = "pytest-kld-rank-failed"  # stderr: "FAILED rank N: one line"
JOB = "job.json"  # written by the parent: what rank 0 does
RESULT = "result.json"  # written last by rank 0: its facts (the arrays beside it are whole)
ARRAYS = "arrays.safetensors"
_NODE_EXIT = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Interrupt): ")


@dataclass(frozen=True)
class Launch:
    """How to start the ranks. ``hosts``: an ``mlx.launch`` hostfile (JSON) or comma-separated
    IP addresses (None: this machine alone); ``ranks``: processes per host; ``backend``."""

    hosts: str | None = None
    ranks: int = 1
    backend: str = "ring"

    def __post_init__(self):
        if self.backend not in DIST_BACKENDS:
            raise CacheError(f"unknown distributed backend {self.backend!r}: choose one of {', '.join(DIST_BACKENDS)}")
        if int(self.ranks) < 1:
            raise CacheError(f"--kld-ranks must be at least 1, got {self.ranks}")

    @property
    def hostfile(self) -> Path | None:
        """The hostfile, when ``hosts`` names a file (anything else is a list of addresses)."""
        if self.hosts and Path(os.path.expanduser(self.hosts)).is_file():
            return Path(os.path.expanduser(self.hosts)).resolve()
        return None

    def host_names(self) -> list[str]:
        """The hosts, in rank order before repetition (for the manifest and messages)."""
        if self.hostfile is None:
            return [h.strip() for h in (self.hosts or "127.0.0.1").split(",") if h.strip()]
        hosts, _ = _read_hostfile(self.hostfile)
        return [str(h.get("ssh") or (h.get("ips") or ["?"])[0]) for h in hosts]

    def provenance(self) -> dict:
        names = self.host_names()
        return {"hosts": names, "ranks_per_host": int(self.ranks), "size": len(names) * int(self.ranks),
                "backend": self.backend}


def _read_hostfile(path: Path) -> tuple[list[dict], str | None]:
    """(hosts, backend or None) of an ``mlx.launch`` hostfile; one line if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        hosts = data["hosts"] if isinstance(data, dict) else data
        if not isinstance(hosts, list) or not all(isinstance(h, dict) for h in hosts):
            raise TypeError("'hosts' is not a list of objects")
        backend = data.get("backend") if isinstance(data, dict) else None
        return hosts, (str(backend) if backend else None)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CacheError(f"hostfile {path} is not an mlx.launch hostfile ({type(e).__name__}: {e}); "
                         "see `mlx.distributed_config --help` to write one") from None


def launch_from_settings(s: dict) -> Launch | None:
    """The launch asked for by settings (``hosts``, ``ranks``, ``backend``), or None for an
    ordinary single-process build (no hosts and one rank). The backend: ``backend`` if set, else
    the hostfile's (``mlx.distributed_config`` writes one), else ring."""
    hosts, ranks = s.get("hosts") or None, int(s.get("ranks") or 1)
    if hosts is None and ranks == 1:
        return None
    if ranks > 1 and hosts is not None and Path(os.path.expanduser(hosts)).is_file():
        raise CacheError(f"--kld-ranks={ranks} with the hostfile {hosts}: mlx.launch starts one rank per hostfile "
                         "entry; list a host once per rank there, or give IP addresses with --kld-ranks")
    if hosts is not None and not Path(os.path.expanduser(hosts)).is_file() and (
        hosts.endswith(".json") or "/" in hosts
    ):
        raise CacheError(f"--kld-hosts={hosts}: no such hostfile; give an mlx.launch hostfile (JSON) "
                         "or comma-separated IP addresses")
    backend = s.get("backend")
    if backend is None and hosts is not None and Path(os.path.expanduser(hosts)).is_file():
        backend = _read_hostfile(Path(os.path.expanduser(hosts)))[1]
    return Launch(hosts=hosts, ranks=ranks, backend=backend or "ring")


def launcher() -> list[str]:
    """``mlx.launch`` of this Python environment: the script installed beside ``sys.executable``,
    else its module run by this interpreter (never anything found on PATH or in the cwd)."""
    here = Path(sys.executable).parent
    for name in ("mlx.launch", "mlx.launch.exe"):
        if (here / name).is_file():
            return [sys.executable, str(here / name)]
    return [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]


def launch_command(launch: Launch, rank_args: list[str]) -> list[str]:
    """The ``mlx.launch`` command line that runs :mod:`pytest_kld.shardrank` on every rank."""
    where = ["--hostfile", str(launch.hostfile)] if launch.hostfile else ["--hosts", launch.hosts or "127.0.0.1"]
    env = []
    if launch.hosts is None and "OPENBLAS_NUM_THREADS" not in os.environ:
        # All ranks on this machine: OpenBLAS threads per rank that add up to its cores (measured:
        # two ranks of two threads each on two cores ran the passes 3.5x slower).
        env = ["--env", f"OPENBLAS_NUM_THREADS={max(1, (os.cpu_count() or 1) // int(launch.ranks))}"]
    if launch.backend == "ring":  # ports of our own, not mlx.launch's fixed 32323...: builds run side by side
        env += ["--starting-port", str(free_ports(4 * launch.provenance()["size"]))]  # 4: IPs per host
    if launch.hostfile is None:
        where += ["-n", str(int(launch.ranks))]
    return [*launcher(), *where, "--backend", launch.backend, *env,
            "--python", sys.executable, "--", "-m", "pytest_kld.shardrank", *rank_args]


def free_ports(count: int, tries: int = 50) -> int:
    """The first of ``count`` consecutive TCP ports that are free on this machine now (the ring
    backend listens on one per rank, counting up from ``--starting-port``)."""
    import random
    import socket

    for _ in range(tries):
        base = random.randrange(20000, 60000 - count)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise CacheError(f"no {count} consecutive free TCP ports found for the ring backend's ranks")


def sharded_pass(plan, launch: Launch, *, progress=None, trust_remote_code: bool = False) -> tuple[dict, dict]:
    """(arrays, manifest facts) of the reference of ``plan`` (a :class:`pytest_kld.cache.ReferencePlan`)
    built over the ranks of ``launch``: the same as :func:`pytest_kld.refpass.reference_pass`
    returns, plus ``distributed`` provenance. The caller holds the entry's lock; the job
    directory sits beside the entry (``.tmp-<entry>-shard-*``: removed by the next builder if
    this process dies)."""
    import dataclasses

    work = plan.entry.parent / f".tmp-{plan.entry.name}-shard-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    job = {"task": "build", "corpus": dataclasses.asdict(plan.corpus), "top_k": plan.settings.top_k,
           "name": plan.reference}
    arrays, facts = _job(work, job, plan.path, plan.exec, plan.settings.chunk_tokens, launch,
                         f"distributed build of {plan.reference}", progress, trust_remote_code)
    facts["distributed"] = {**launch.provenance(), **facts.get("distributed", {})}
    return arrays, facts


def sharded_compare(cache, path, name: str, exec_mode: str, chunk_tokens, launch: Launch, *,
                    progress=None, trust_remote_code: bool = False):
    """([per-position figures], exec used) of the model at ``path`` against ``cache``, the model
    sharded over the ranks of ``launch`` (as :func:`pytest_kld.compare._run` returns them)."""
    import tempfile
    from types import SimpleNamespace

    from .errors import ModelError
    from .forward import resolve_exec

    work = Path(tempfile.mkdtemp(prefix="pytest-kld-shard-"))
    job = {"task": "compare", "cache": str(Path(cache.path).resolve()), "key": cache.manifest["key"], "name": name}
    arrays, facts = _job(work, job, path, resolve_exec(exec_mode), chunk_tokens, launch,
                         f"distributed comparison of {name}", progress, trust_remote_code, made=True,
                         error=ModelError)
    part = SimpleNamespace(kl=arrays["kl"], top1=arrays["top1"].astype(bool), ref_target=arrays["ref_target"],
                           quant_target=arrays["quant_target"])
    return [part], facts["exec"]


def _job(work: Path, job: dict, model, exec_mode: str, chunk_tokens, launch: Launch, what: str, progress,
         trust_remote_code: bool, made: bool = False, error=CacheError) -> tuple[dict, dict]:
    """Run ``job`` on the ranks of ``launch`` with the job directory ``work`` (made here unless
    ``made``; removed in every case); rank 0's arrays and facts, or one line saying why not."""
    from . import reference as store

    if not made:
        work.mkdir(mode=0o700)
    try:
        token = secrets.token_hex(16)
        (work / JOB).write_text(json.dumps({**job, "token": token}), encoding="utf-8")
        rank_args = ["--model", str(Path(model).resolve()), "--exec", exec_mode,
                     "--chunk-tokens", str(chunk_tokens or 0), "--backend", launch.backend,
                     "--workdir", str(work), "--token", token]
        if trust_remote_code:
            rank_args.append("--trust-remote-code")
        failed, tail = _run(launch_command(launch, rank_args), progress)
        result = work / RESULT
        if failed or not result.is_file():
            raise error(_failure(what, launch, failed, tail, result.is_file()))
        from safetensors.numpy import load_file

        return load_file(str(work / ARRAYS)), json.loads(result.read_text(encoding="utf-8"))
    finally:
        store._remove(work)


def _run(cmd: list[str], progress) -> tuple[list[tuple[int, str]], list[str]]:
    """Run ``mlx.launch`` in a session of its own and wait. Returns the ranks that ended badly
    (rank, how) and the last lines of its stderr. ``mlx.launch`` exits 0 whatever its ranks did,
    so failures are read from its per-rank notices. Interrupted, the whole session is killed."""
    tail: deque[str] = deque(maxlen=40)
    failed: list[tuple[int, str]] = []
    # stdin stays an open pipe: mlx.launch polls it, and at EOF (/dev/null) it would spin.
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, text=True, errors="replace")

    def read_err():
        for line in proc.stderr:
            line = _ANSI.sub("", line).strip()
            if not line:
                continue
            m = _NODE_EXIT.search(line)
            if m:
                failed.append((int(m.group(1)), f"exited with code {m.group(2)}" if m.group(2) else "was killed"))
            tail.append(line)

    reader = threading.Thread(target=read_err, daemon=True)
    reader.start()
    try:
        for line in proc.stdout:
            parts = line.split()
            if len(parts) == 3 and parts[0] == PROGRESS and progress is not None:
                progress(int(parts[1]), int(parts[2]))
        proc.wait()
        reader.join(timeout=10)
    finally:
        _end_session(proc)
    firsts = [line for line in tail if line.startswith(FAILED)]
    return failed, firsts + [line for line in tail if not line.startswith(FAILED)]


def _end_session(proc: subprocess.Popen) -> None:
    """Kill whatever is left of the launch's own session (its local ranks), and reap it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        if proc.poll() is None:
            time.sleep(0.2)
    try:
        proc.stdin.close()
    except OSError:
        pass
    proc.wait()


def _failure(what: str, launch: Launch, failed, tail: list[str], have_result: bool) -> str:
    """One line: which rank failed and how, the ranks' own error if they gave one, what to do."""
    hosts = launch.host_names()
    per = int(launch.ranks)
    why = []
    own = next((line[len(FAILED):].strip() for line in tail if line.startswith(FAILED)), None)
    if own:
        why.append(own)
    told = {int(m.group(1)) for m in [re.match(r"rank (\d+):", own or "")] if m}
    for rank, how in [f for f in failed if f[0] not in told][:1]:
        host = hosts[rank // per] if rank // per < len(hosts) else "?"
        hint = " (255 is ssh's: is the host reachable, with keys set up?)" if how.endswith(" 255") else ""
        why.append(f"rank {rank} on {host} {how}{hint}")
    if not own:  # a rank's own traceback: its last "SomethingError: ..." line says what happened
        raised = next((line for line in reversed(tail) if _RAISED.match(line)), None)
        if raised:
            why.append(raised)
    if not why:
        last = next((line for line in reversed(tail) if "Traceback" not in line), None)
        why.append(last or ("the launch ended without rank 0's result" if not have_result else "a rank failed"))
    after = "no cache entry was written" if what.startswith("distributed build") else "no result"
    return f"{what} over {launch.provenance()['size']} ranks ({launch.backend}) failed: {'; '.join(why)}; {after}"
