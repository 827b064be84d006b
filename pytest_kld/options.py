"""The one table of pytest-kld's settings. Everything else is derived from it: the pytest options
(``--kld-<name>=VALUE``) and ini keys (``kld_<name>``), the command line's flags
(``--<name> VALUE``), the ``@pytest.mark.kld`` keys, the thresholds of ``assert_kld`` and the
command line, and the defaults. No pytest, no mlx: imported by the plugin at startup.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    """One setting. ``kind`` is str, int or bool (a flag, off by default)."""

    name: str  # as on the command line, without a prefix: "top-k"
    kind: type
    default: object
    help: str
    choices: tuple = ()
    minimum: int | None = None
    marker: bool = False  # a @pytest.mark.kld key
    default_text: str | None = None  # shown when the default is None or depends on something

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def metavar(self) -> str:
        return self.name.split("-")[-1].upper()

    @property
    def shown_default(self) -> str:
        if self.default_text is not None:
            return self.default_text
        if self.kind is bool:
            return "off"
        return "none" if self.default is None else str(self.default)


OPTIONS: tuple[Option, ...] = (
    Option("reference", str, None, "reference model: a local MLX model directory or a hub id", marker=True,
           default_text="none; KLD tests error without one"),
    Option("revision", str, None, "hub revision (branch, tag or commit) of the reference", marker=True,
           default_text="the main branch"),
    Option("reference-cache", str, None, "a reference cache made elsewhere: an entry directory, a directory of "
           "exported entries, or a hub dataset repo id (REPO or REPO@REVISION); no reference weights are read",
           marker=True),
    Option("mode", str, "short", "corpus: short (bundled prompts), long (WikiText-2), file (--kld-dataset) or "
           "drift (the quant's own greedy continuations against the reference's)",
           choices=("short", "long", "file", "drift"), marker=True),
    Option("dataset", str, None, "a .txt, .jsonl or .parquet corpus file (sets mode to file)", marker=True),
    Option("drift-tokens", int, 64, "drift mode: tokens the reference generates greedily per prompt", minimum=1,
           marker=True),
    Option("top-k", int, 256, "log-probs kept per scored position in the reference cache", minimum=1, marker=True),
    Option("n-ctx", int, None, "tokens per chunk", minimum=2, marker=True,
           default_text="by mode: short 512, long 2048, file 512"),
    Option("n-chunks", int, None, "first N records (short, file) or at most N chunks (long)", minimum=1,
           marker=True, default_text="all; long 32"),
    Option("chunk-tokens", int, 512, "tokens per forward pass within a chunk (0: the whole chunk)", minimum=0,
           marker=True),
    Option("exec", str, "auto", "execution precision: auto, native or float32 (dequantised; fast on a CPU)",
           choices=("auto", "native", "float32"), marker=True),
    Option("vocab-backend", str, "auto", "where a reference build does the vocabulary-wide work (log-softmax, "
           "top-K, tail): numpy, mlx (on the GPU where there is one), or auto (numpy on a CPU; with a GPU both "
           "timed on the first piece, MLX kept when 1.5x faster); recorded in the cache, whose comparisons use the same", choices=("auto", "numpy", "mlx")),
    Option("cache-dir", str, None, "reference cache directory", default_text="$PYTEST_KLD_CACHE_DIR or the user cache"),
    Option("json", str, None, "write settings, versions and every result to this JSON file"),
    Option("markdown", str, None, "write the leaderboard as Markdown, e.g. $GITHUB_STEP_SUMMARY (appended to)"),
    Option("chart", str, None, "write a PNG chart of mean KLD against bits per weight"),
    Option("lock-timeout", int, 600, "seconds to wait for another process's reference build once it shows no "
           "sign of life", minimum=1),
    Option("rebuild", bool, False, "rebuild the reference cache once, even if a valid one exists"),
    Option("by-category", bool, False, "add mean KLD per corpus category to the leaderboard"),
    Option("no-chat-template", bool, False, "short mode: feed prompts as plain text, not through the chat template"),
    Option("trust-remote-code", bool, False, "allow models whose config names custom Python code"),
    Option("allow-shared-cache", bool, False, "use a cache directory that other users can write (they could "
           "plant entries)"),
    Option("baselines", str, None, "directory of the quants' recorded baselines: with it, each assert_kld also "
           "checks its quant against its baseline (paired, beyond noise and the baseline-fail tolerance)",
           default_text="<rootdir>/kld_baselines when that directory exists"),
    Option("update-baselines", bool, False, "record each assert_kld's result as its baseline (atomically), "
           "instead of checking against it"),
    Option("baseline-fail", str, "mean:5%,p99:10%", "how much worse than its baseline a quant may be, beyond "
           "noise, before it fails: FIGURE:VALUE[%],... (figures mean, median, p90, p95, p99, p99_9; "
           "%: relative, else nats)", marker=True),
    Option("full-hash", bool, False, "fingerprint weights by their full contents (sha256-full), not headers, sizes "
           "and a 4 MiB sample per file (sha256-sample, which can miss an edit of a few bytes); reads every byte"),
    Option("hosts", str, None, "build the reference cache over MLX's distributed engine (mlx.launch) on these "
           "hosts: an mlx.launch hostfile (JSON) or comma-separated IPs, the first being this machine; the reference "
           "is sharded by mlx-lm", default_text="none: this machine only"),
    Option("ranks", int, 1, "processes per host of a distributed reference build (2 and no hosts: two ranks "
           "on this machine)", minimum=1),
    Option("backend", str, None, "mlx.launch backend of a distributed reference build",
           choices=("ring", "jaccl", "jaccl-ring", "mpi"), default_text="the hostfile's, else ring"),
    Option("explain", bool, False, "when an assert_kld fails, measure which groups of tensors cause the quant's "
           "KLD (pytest-kld sensitivity at its defaults, stored beside the cache) and name the top ones in the "
           "message", marker=True),
    Option("shard-quants", bool, False, "run each compared model sharded over the same ranks too (a quant too "
           "large for one machine); by default quants run in this process"),
)
BY_DEST = {o.dest: o for o in OPTIONS}
# Sensitivity (pytest-kld sensitivity, --kld-explain): the width a group is put back at (0: the
# reference's own dtype) and the scored positions sampled; SmolLM2's 61 groups take ~10 min on
# 2 CPU cores at this budget (benchmarks/bench_sensitivity.py).
SENSITIVITY_BITS = 8
SENSITIVITY_BUDGET = 2048
EXPLAIN_TOP = 5  # groups a failing assert_kld's message names
MARKER_KEYS = frozenset(o.dest for o in OPTIONS if o.marker)


@dataclass(frozen=True)
class Threshold:
    name: str
    bound: str  # "upper": the figure must be at most the value; "lower": at least; "count"
    help: str


THRESHOLDS: tuple[Threshold, ...] = (
    Threshold("mean", "upper", "mean KLD"),
    Threshold("median", "upper", "median KLD"),
    Threshold("p90", "upper", "90th percentile of KLD"),
    Threshold("p95", "upper", "95th percentile of KLD"),
    Threshold("p99", "upper", "99th percentile of KLD"),
    Threshold("p99_9", "upper", "99.9th percentile of KLD"),
    Threshold("max", "upper", "largest KLD at any position"),
    Threshold("top1", "lower", "share of positions where both models' most likely token agree (0..1)"),
    Threshold("drift_match", "lower", "drift mode: mean number of generated tokens before the quant's own greedy "
              "continuation leaves the reference's (ties forgiven)"),
    Threshold("drift_kld", "upper", "drift mode: mean KLD along the reference's continuation"),
)
THRESHOLD_NAMES = tuple(t.name for t in THRESHOLDS)
NONFINITE_HELP = "positions with NaN or inf log-probs a model may have before it fails"


def one_of(choices) -> str:
    return ", ".join(choices[:-1]) + " or " + choices[-1]


def check(dest: str, value, label: str, *, marker: bool = False) -> str | None:
    """Why ``value`` is not valid for setting ``dest`` (one line starting with ``label``, e.g.
    ``--kld-top-k`` or ``@pytest.mark.kld: top_k``), or None if it is."""
    o = BY_DEST[dest]
    if value is None:
        return None
    if o.kind is int:
        integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        low = o.minimum if o.minimum is not None else -math.inf
        if marker and (not integral or value < low):
            return f"{label}={value!r} must be an integer of at least {o.minimum}"
        if not integral:
            return f"{label} {value!r}: must be a whole number"
        if value < low:
            return f"{label} must be at least {o.minimum}, got {value}"
    if o.choices and value not in o.choices:
        return f"{label}{'=' if marker else ' '}{value!r}: choose {one_of(o.choices)}"
    return None


def real_number(value) -> float | None:
    """``value`` as a float if it is a real number of any numeric type (int, float, Fraction,
    Decimal, numpy scalars; never bool or str), else None; inf when too large for a float."""
    real = isinstance(value, numbers.Real) or (
        isinstance(value, numbers.Number) and not isinstance(value, numbers.Complex)
    )
    if isinstance(value, bool) or not real:
        if type(value).__module__ != "numpy":  # numpy scalars that do not register
            return None
    try:
        return float(value)
    except OverflowError:
        return math.inf
    except (TypeError, ValueError):
        return None


def add_to_argparse(ap) -> None:
    """Every setting and threshold as a command-line flag (``--top-k 256``, ``--mean 0.1``)."""
    for o in OPTIONS:
        if o.name == "reference":
            continue  # a positional argument of its own
        text = f"{o.help} (default: {o.shown_default})".replace("%", "%%")  # argparse formats help with %
        if o.kind is bool:
            ap.add_argument(f"--{o.name}", dest=o.dest, action="store_true", default=False, help=text)
        else:
            ap.add_argument(f"--{o.name}", dest=o.dest, type=o.kind, default=o.default, metavar=o.metavar,
                            choices=o.choices or None, help=text)
    for t in THRESHOLDS:
        flag = t.name.replace("_", ".") if t.name.startswith("p") else t.name.replace("_", "-")  # --p99.9
        ap.add_argument(f"--{flag}", dest=t.name, type=float, default=None, metavar="X",
                        help=f"fail (exit 1) when {t.help} is {'above' if t.bound == 'upper' else 'below'} X")
    ap.add_argument("--nonfinite", type=int, default=0, metavar="N", help=f"{NONFINITE_HELP} (default: 0)")
