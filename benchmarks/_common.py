"""Shared helpers for the side-by-side benchmarks.

- statistics: ``median``, ``percentile``;
- machine and version information printed at the top of every run;
- ``run_child``: run one (library, scenario) measurement in a fresh subprocess with a hard
  timeout, so a hanging library is reported as ``timeout`` instead of hanging the benchmark, and
  every library starts from the same clean process (no threads or pools left by another library);
- ``LIBS``: one small adapter per pool library, so each scenario is written once;
- Markdown table printing and the PASS/MISS verdict for the targets from the issues.

Benchmarks print; they never assert on wall-clock time.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

RESULT_MARK = "@@BENCH-RESULT@@ "
STANDIN_ENV = "PROCPOOL_BENCH_STANDIN"

# ---------------------------------------------------------------- statistics


def median(xs: Sequence[float]) -> float:
    """The median of a non-empty sequence."""
    s = sorted(xs)
    n = len(s)
    if n == 0:
        raise ValueError("median of nothing")
    mid = n // 2
    return s[mid] if n % 2 else (s[mid - 1] + s[mid]) / 2


def percentile(xs: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), nearest-rank on the sorted samples."""
    s = sorted(xs)
    if not s:
        raise ValueError("percentile of nothing")
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


# ---------------------------------------------------------------- machine information


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def lib_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("procpool", "numpy", "loky", "mpire", "pebble", "faster-fifo"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
            if dist == "procpool":  # run from a source tree (PYTHONPATH=src)
                try:
                    import procpool

                    out[dist] = f"{procpool.__version__} (source tree)"
                except Exception:  # noqa: BLE001 - report, don't fail
                    pass
    return out


def git_revision() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not rev:
        return os.environ.get("PROCPOOL_BENCH_REV", "unknown")
    return f"{rev}{' + uncommitted src changes' if dirty else ''}"


def print_header(title: str, argv: Sequence[str]) -> None:
    """Print what was run, when, where and with which versions."""
    v = lib_versions()
    print(f"# {title}")
    print()
    print(f"- date: {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"- command: `python {' '.join(argv)}`")
    print(
        f"- machine: {os.cpu_count()} CPUs (nproc), {cpu_model()}, {platform.system()} "
        f"{platform.release()}"
    )
    print("- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    print(f"- procpool git revision: {git_revision()}")
    print(f"- procpool.Pool: {procpool_status()}")
    print()
    sys.stdout.flush()


# ---------------------------------------------------------------- running one measurement


def run_child(script: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run ``script --child <spec-json>`` in a new session; return its JSON result.

    On timeout the whole process group (the child and the pool's workers) is killed and
    ``{"error": "timeout"}`` comes back; on a crash, ``{"error": <last stderr line>}``.
    """
    # The child dumps every thread's stack and exits a few seconds before the hard kill, so a
    # hang is reported with where it hung.
    spec = {**spec, "_dump_after_s": max(1.0, timeout - 5)}
    cmd = [sys.executable, script, "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        return {"error": f"timeout ({timeout:.0f} s)"}
    finally:
        # Whatever the child left behind (orphaned workers) goes too.
        _kill_group(proc.pid)
    elapsed = time.perf_counter() - t0
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_MARK):
            res = json.loads(line[len(RESULT_MARK) :])
            res.setdefault("child_wall_s", elapsed)
            return res
    if "Timeout (" in err and "Thread 0x" in err:  # faulthandler's dump: the child hung
        return {"error": f"timeout ({timeout:.0f} s), stacks dumped", "stderr": err[-8000:]}
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else f"exit code {proc.returncode}, no output"
    return {"error": f"failed: {last[:160]}", "stderr": err[-4000:]}


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def child_watchdog(spec: dict[str, Any]) -> None:
    """Child side: dump all stacks to stderr and exit if the measurement runs too long."""
    import faulthandler

    faulthandler.dump_traceback_later(spec.get("_dump_after_s", 600), exit=True)


def emit_result(result: dict[str, Any]) -> None:
    """Child side: hand the measurement back to ``run_child``."""
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------- process memory


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process, from /proc (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pss_bytes(pid: int | str) -> int:
    """Proportional set size (shared pages divided among their users), 0 if unknown."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def uss_bytes(pid: int | str) -> int:
    """Unique set size: the pages only this process holds (private, clean or dirty), 0 if
    unknown -- what it costs beyond the pages it shares with its parent and siblings."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total


def descendants(pid: int) -> list[int]:
    """All live descendant pids of ``pid`` (workers, fork servers, resource trackers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


# ---------------------------------------------------------------- the libraries


def procpool_status() -> str:
    if os.environ.get(STANDIN_ENV):
        return "STAND-IN (multiprocessing.Pool under procpool's name; NOT procpool numbers)"
    try:
        import procpool
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"not available (import failed: {exc!r})"
    if not hasattr(procpool, "Pool"):
        return "not available (procpool has no Pool yet)"
    return f"available ({procpool.Pool!r})"


def procpool_available() -> bool:
    return procpool_status().startswith(("available", "STAND-IN"))


class Lib:
    """How one library does each basic operation; each scenario is written once over these."""

    key = ""
    label = ""

    def open(self, n: int) -> Any:
        raise NotImplementedError

    def close(self, pool: Any) -> None:
        raise NotImplementedError

    def map(self, pool: Any, fn: Callable, items: Iterable, **kw: Any) -> list:
        """The library's default map: no chunksize unless the scenario passes one."""
        raise NotImplementedError

    def submit(self, pool: Any, fn: Callable, arg: Any) -> Any:
        """One task, asynchronously (``apply_async`` or ``submit``)."""
        raise NotImplementedError

    def result(self, handle: Any, timeout: float = 60) -> Any:
        return handle.result(timeout)

    def apply(self, pool: Any, fn: Callable, arg: Any) -> Any:
        """One blocking round trip (``apply`` or ``submit().result()``)."""
        return self.result(self.submit(pool, fn, arg))


class _MpLike(Lib):
    """multiprocessing.Pool's API (procpool is a drop-in for it)."""

    def close(self, pool: Any) -> None:
        pool.close()
        pool.join()

    def map(self, pool: Any, fn: Callable, items: Iterable, **kw: Any) -> list:
        return pool.map(fn, items, **kw)

    def submit(self, pool: Any, fn: Callable, arg: Any) -> Any:
        return pool.apply_async(fn, (arg,))

    def result(self, handle: Any, timeout: float = 60) -> Any:
        return handle.get(timeout)

    def apply(self, pool: Any, fn: Callable, arg: Any) -> Any:
        return pool.apply(fn, (arg,))


class Procpool(_MpLike):
    key = "procpool"
    label = "procpool.Pool"

    def open(self, n: int) -> Any:
        if os.environ.get(STANDIN_ENV):
            import multiprocessing

            return multiprocessing.get_context("fork").Pool(n)
        import procpool

        return procpool.Pool(n)


class Multiprocessing(_MpLike):
    key = "mp"
    label = "multiprocessing.Pool (fork)"

    def open(self, n: int) -> Any:
        import multiprocessing

        return multiprocessing.get_context("fork").Pool(n)


class StdlibExecutor(Lib):
    key = "cf"
    label = "concurrent.futures PPE (fork)"

    def open(self, n: int) -> Any:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("fork"))

    def close(self, pool: Any) -> None:
        pool.shutdown(wait=True)

    def map(self, pool: Any, fn: Callable, items: Iterable, **kw: Any) -> list:
        return list(pool.map(fn, items, **kw))

    def submit(self, pool: Any, fn: Callable, arg: Any) -> Any:
        return pool.submit(fn, arg)


class Loky(StdlibExecutor):
    key = "loky"
    label = "loky reusable executor"

    def open(self, n: int) -> Any:
        import loky

        # reuse=False: a fresh executor every time (the start-up scenario opens two in a row).
        return loky.get_reusable_executor(max_workers=n, reuse=False)


class Mpire(_MpLike):  # apply_async/get/apply as multiprocessing's
    key = "mpire"
    label = "mpire WorkerPool (keep_alive)"

    def open(self, n: int) -> Any:
        from mpire import WorkerPool

        # keep_alive: otherwise mpire starts and stops its workers around every map call.
        return WorkerPool(n_jobs=n, keep_alive=True)

    def close(self, pool: Any) -> None:
        pool.stop_and_join()

    def map(self, pool: Any, fn: Callable, items: Iterable, **kw: Any) -> list:
        # Without this mpire concatenates numpy results into one big array (an extra copy).
        kw.setdefault("concatenate_numpy_output", False)
        return pool.map(fn, items, **kw)


class Pebble(Lib):
    key = "pebble"
    label = "pebble ProcessPool"

    def open(self, n: int) -> Any:
        from pebble import ProcessPool

        return ProcessPool(max_workers=n)

    def close(self, pool: Any) -> None:
        pool.close()
        pool.join()

    def map(self, pool: Any, fn: Callable, items: Iterable, **kw: Any) -> list:
        return list(pool.map(fn, items, **kw).result())

    def submit(self, pool: Any, fn: Callable, arg: Any) -> Any:
        return pool.schedule(fn, args=(arg,))


LIBS: dict[str, Lib] = {
    lib.key: lib
    for lib in (Procpool(), Multiprocessing(), StdlibExecutor(), Loky(), Mpire(), Pebble())
}
OTHERS = [k for k in LIBS if k != "procpool"]


# ---------------------------------------------------------------- printing


def fmt(x: float | None, unit: str = "") -> str:
    """A number with three significant figures and an SI prefix."""
    if x is None:
        return "—"
    ax = abs(x)
    for scale, prefix in (
        (1e9, "G"),
        (1e6, "M"),
        (1e3, "k"),
        (1, ""),
        (1e-3, "m"),
        (1e-6, "µ"),
        (1e-9, "n"),
    ):
        if ax >= scale:
            return f"{x / scale:.3g} {prefix}{unit}".rstrip()
    return f"{x:.3g} {unit}".rstrip()


def fmt_ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}x"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A Markdown table (pastes straight into docs/benchmarks.md)."""
    print(f"### {title}")
    print()
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    print()
    sys.stdout.flush()


class Targets:
    """Collects the PASS/MISS verdicts for the targets set in the issues."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def check(self, name: str, value: float | None, op: str, bound: float, shown: str) -> str:
        """Record ``value op bound`` (op is '<=', '>=' or '<'); ``shown`` is the measured figure."""
        if value is None:
            verdict = "n/a"
        elif op == "<=":
            verdict = "PASS" if value <= bound else "MISS"
        elif op == ">=":
            verdict = "PASS" if value >= bound else "MISS"
        elif op == "<":
            verdict = "PASS" if value < bound else "MISS"
        else:
            raise ValueError(op)
        self.rows.append((name, shown, verdict, ""))
        print(f"- target: {name}: measured {shown} -> **{verdict}**")
        sys.stdout.flush()
        return verdict

    def summary(self) -> None:
        if not self.rows:
            return
        print_table(
            "Targets (ratios vs multiprocessing.Pool measured in this run)",
            ["target", "measured", "verdict"],
            [(n, s, v) for n, s, v, _ in self.rows],
        )
