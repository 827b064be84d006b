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
    maximum: int | None = None  # said in the help text too
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


# Choice lists and per-mode defaults: the one home of each, read by the modules that use them.
MODES = ("short", "long", "file", "drift")  # corpus modes (corpus.py, the results schema)
N_CTX = {"short": 512, "long": 2048, "file": 512, "drift": 512}  # tokens per chunk by mode
N_CHUNKS_LONG = 32  # long mode reads at most this many WikiText-2 chunks by default
EXEC_MODES = ("auto", "native", "float32")  # forward.py
VOCAB_BACKENDS = ("auto", "numpy", "mlx")  # vocab.py
DIST_BACKENDS = ("ring", "jaccl", "jaccl-ring", "mpi")  # distributed.py: mlx.launch backends


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
           choices=MODES, marker=True),
    Option("dataset", str, None, "a .txt, .jsonl or .parquet corpus file (sets mode to file)", marker=True),
    Option("drift-tokens", int, 64, "drift mode: tokens the reference generates greedily per prompt (1..4096)",
           minimum=1, maximum=4096, marker=True),
    Option("top-k", int, 256, "log-probs kept per scored position in the reference cache (1..1048576; beyond the "
           "vocabulary: all of it)", minimum=1, maximum=1 << 20, marker=True),
    Option("n-ctx", int, None, "tokens per chunk (2..1048576)", minimum=2, maximum=1 << 20, marker=True,
           default_text="by mode: " + ", ".join(f"{m} {n}" for m, n in N_CTX.items() if m != "drift")),
    Option("n-chunks", int, None, "first N records (short, file) or at most N chunks (long) (1..1048576)", minimum=1,
           maximum=1 << 20, marker=True, default_text=f"all; long {N_CHUNKS_LONG}"),
    Option("chunk-tokens", int, 512, "tokens per forward pass within a chunk (0: the whole chunk; at most 1048576)",
           minimum=0, maximum=1 << 20, marker=True),
    Option("exec", str, "auto", "execution precision: auto, native or float32 (dequantised; fast on a CPU)",
           choices=EXEC_MODES, marker=True),
    Option("vocab-backend", str, "auto", "where a reference build does the vocabulary-wide work (log-softmax, "
           "top-K, tail): numpy, mlx (on the GPU where there is one), or auto (numpy on a CPU; with a GPU both "
           "timed on the first piece, MLX kept when 1.5x faster); recorded in the cache, whose comparisons use the same", choices=VOCAB_BACKENDS),
    Option("cache-dir", str, None, "reference cache directory", default_text="$PYTEST_KLD_CACHE_DIR or the user cache"),
    Option("json", str, None, "write settings, versions and every result to this JSON file"),
    Option("markdown", str, None, "write the leaderboard as Markdown, e.g. $GITHUB_STEP_SUMMARY (appended to)"),
    Option("chart", str, None, "write a PNG chart of mean KLD against bits per weight"),
    Option("lock-timeout", int, 600, "seconds to wait for another process's reference build once it shows no "
           "sign of life (1..604800, a week)", minimum=1, maximum=604800),
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
    Option("full-hash", bool, False, "re-read every byte of the weights for their sha256-full fingerprint now, "
           "trusting no remembered hash and no hub blob name (the same fingerprint; slower)"),
    Option("hosts", str, None, "build the reference cache over MLX's distributed engine (mlx.launch) on these "
           "hosts: an mlx.launch hostfile (JSON) or comma-separated IPs, the first being this machine; the reference "
           "is sharded by mlx-lm", default_text="none: this machine only"),
    Option("ranks", int, 1, "processes per host of a distributed reference build (2 and no hosts: two ranks "
           "on this machine; 1..256)", minimum=1, maximum=256),
    Option("backend", str, None, "mlx.launch backend of a distributed reference build",
           choices=DIST_BACKENDS, default_text="the hostfile's, else ring"),
    Option("explain", bool, False, "when a check fails (assert_kld, or compare's thresholds), measure which "
           "groups of tensors cause the quant's KLD (pytest-kld sensitivity at its defaults, stored beside the "
           "cache), name the top ones in the message and add them to the leaderboard", marker=True),
    Option("shard-quants", bool, False, "run each compared model sharded over the same ranks too (a quant too "
           "large for one machine); by default quants run in this process"),
)
BY_DEST = {o.dest: o for o in OPTIONS}


def default(dest: str):
    """The default of setting ``dest`` (``"top_k"``): what every module that needs one reads."""
    return BY_DEST[dest].default
# Sensitivity (pytest-kld sensitivity, --kld-explain): the width a group is put back at (0: the
# reference's own dtype) and the scored positions sampled; SmolLM2's whole ranking (61 groups)
# takes well under the ~10 min on 2 CPU cores the issue asks at this budget (README, measured with
# benchmarks/bench_sensitivity.py).
SENSITIVITY_BITS = 8
SENSITIVITY_BUDGET = 1024
EXPLAIN_TOP = 5  # groups a failing assert_kld's message names
MARKER_KEYS = frozenset(o.dest for o in OPTIONS if o.marker)


@dataclass(frozen=True)
class Figure:
    """One statistic of per-position KL(reference || quant) (or of a drift run): how it is computed,
    checked, shown and gated. A new figure is one more row of :data:`FIGURES`; everything else reads
    the table when it runs (stats, thresholds, ``assert_kld``, baselines, the leaderboard, the JSON)."""

    name: str
    help: str
    bound: str | None = "upper"  # a threshold: "upper" (at most), "lower" (at least); None: none
    percentile: float | None = None  # computed as this percentile of the finite positions (stats.py)
    fmt: str = "{:.4f}"  # how the terminal writes it
    heading: str | None = None  # its leaderboard column; None: not a column
    baseline: bool = False  # may be named in a baseline tolerance (paired, bootstrapped over chunks)

    @property
    def better(self) -> str:
        """"low" or "high": which end of the column the leaderboard marks best."""
        return "high" if self.bound == "lower" else "low"


FIGURES: tuple[Figure, ...] = (
    Figure("mean", "mean KLD", fmt="{:.5f}", heading="mean", baseline=True),
    Figure("median", "median KLD", percentile=50.0, fmt="{:.5f}", heading="median", baseline=True),
    Figure("p90", "90th percentile of KLD", percentile=90.0, baseline=True),
    Figure("p95", "95th percentile of KLD", percentile=95.0, heading="P95", baseline=True),
    Figure("p99", "99th percentile of KLD", percentile=99.0, heading="P99", baseline=True),
    Figure("p99_9", "99.9th percentile of KLD", percentile=99.9, baseline=True),
    Figure("max", "largest KLD at any position", heading="max"),
    Figure("top1", "share of positions where both models' most likely token agree (0..1)", bound="lower",
           fmt="{:.2%}", heading="top-1"),
    Figure("drift_match", "drift mode: mean number of generated tokens before the quant's own greedy "
           "continuation leaves the reference's (ties forgiven)", bound="lower", fmt="{:.1f}"),
    Figure("drift_kld", "drift mode: mean KLD along the reference's continuation"),
)


def figure(name: str) -> Figure | None:
    return next((f for f in FIGURES if f.name == name), None)


def thresholds() -> tuple[Figure, ...]:
    """The figures a threshold may name (``assert_kld(p99=...)``, ``--p99``), read from the table now."""
    return tuple(f for f in FIGURES if f.bound)


def threshold_names() -> tuple[str, ...]:
    return tuple(f.name for f in thresholds())


def percentiles() -> dict[str, float]:
    """``{name: percentile in percent}`` of the percentile figures (median included)."""
    return {f.name: f.percentile for f in FIGURES if f.percentile is not None}


def baseline_figures() -> tuple[str, ...]:
    """The figures a baseline tolerance may name: mean and the percentiles marked baseline-eligible."""
    return tuple(f.name for f in FIGURES if f.baseline)


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
        if o.maximum is not None and value > o.maximum:
            return f"{label} must be at most {o.maximum}, got {_short_int(value)}"
    if o.choices and value not in o.choices:
        return f"{label}{'=' if marker else ' '}{value!r}: choose {one_of(o.choices)}"
    return None


def _short_int(value: int) -> str:
    text = str(value)
    return text if len(text) <= 24 else f"{text[:12]}... ({len(text)} digits)"


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
    for t in thresholds():
        flag = t.name.replace("_", ".") if t.name.startswith("p") else t.name.replace("_", "-")  # --p99.9
        ap.add_argument(f"--{flag}", dest=t.name, type=float, default=None, metavar="X",
                        help=f"fail (exit 1) when {t.help} is {'above' if t.bound == 'upper' else 'below'} X")
    ap.add_argument("--nonfinite", type=int, default=0, metavar="N", help=f"{NONFINITE_HELP} (default: 0)")
