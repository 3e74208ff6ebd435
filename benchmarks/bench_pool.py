"""procpool.Pool side by side with multiprocessing.Pool, concurrent.futures, loky, mpire and pebble.

Scenarios (issues 2 and 5), every library measured in the same run, 2 workers by default:

1. start-up to first result: create a pool, run one trivial task, get its result;
2. tiny tasks ``x + 1``: the default ``map``; one ``apply_async``/``submit`` per item; procpool's
   ``imap``/``imap_unordered`` with default arguments;
3. ``apply`` round-trip latency p50/p99, next to a raw ``os.pipe`` round trip between two processes;
4. large numpy arrays (32 MiB float64) through ``map`` as arguments and as results, next to a
   single-thread memcpy; procpool.SharedArray (1 GiB) vs a small int, when it exists; 32 MiB
   ``bytes`` objects both ways (4d, 4e: pickle copies those into its stream);
5. memory: idle worker RSS for every pool; with ``--memory``, parent RSS growth during ``imap``
   over 10,000,000 items (procpool vs multiprocessing.Pool).

Each (library, scenario) runs in its own fresh subprocess with a hard timeout: a library that
hangs is reported as ``timeout``, and no library inherits threads or pools from another. Figures
are medians of repeats; ratios are against multiprocessing.Pool measured in the same run.

    python benchmarks/bench_pool.py            # full run, a few minutes on 2 cores
    python benchmarks/bench_pool.py --quick    # about a minute or two (CI)
    python benchmarks/bench_pool.py --memory   # adds the 10M-item imap memory scenario
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    LIBS,
    OTHERS,
    STANDIN_ENV,
    Targets,
    fmt,
    fmt_ratio,
    median,
    print_header,
    print_table,
    procpool_available,
    ratio,
    run_child,
)
from _pool_children import child_main  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
SCRIPT = os.path.abspath(__file__)

# ====================================================================== parent side


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.workers = args.workers
        self.targets = Targets()
        self.problems: list[str] = []
        have_pp = procpool_available()
        self.libs = [k for k in LIBS if k in args.libs and (k != "procpool" or have_pp)]
        self.pp = "procpool" in self.libs

    def child(self, spec: dict, timeout: float) -> dict:
        spec = {"workers": self.workers, **spec}
        res = run_child(SCRIPT, spec, timeout)
        if "error" in res:
            who = spec.get("lib", "-")
            self.problems.append(f"{spec['scenario']} / {who}: {res['error']}")
            if res.get("stderr") and (self.args.verbose or who == "procpool"):
                print(res["stderr"], file=sys.stderr)
        return res

    def rounds(self, specs: dict[str, dict], rounds: int, timeout: float) -> dict[str, dict]:
        """Run every spec ``rounds`` times, interleaved (A B C A B C ...), merging the samples.

        Interleaving spreads the shared machine's noise over all libraries instead of letting it
        land on whichever one happened to run during a noisy minute.
        """
        merged: dict[str, dict] = {}
        for _ in range(rounds):
            for key, spec in specs.items():
                if "error" in merged.get(key, {}):
                    continue  # a library that failed or hung once is not retried
                res = self.child(spec, timeout)
                if "error" in res:
                    merged[key] = res
                    continue
                into = merged.setdefault(key, {})
                for name, val in res.items():
                    if isinstance(val, list):
                        into.setdefault(name, []).extend(val)
                    else:
                        into[name] = val
        return merged

    def label(self, key: str) -> str:
        lab = LIBS[key].label
        if key == "procpool" and os.environ.get(STANDIN_ENV):
            lab += " [STAND-IN]"
        return lab

    def missing_pp_row(self, ncols: int) -> list[str]:
        return ["procpool.Pool", "not available (placeholder)"] + ["—"] * (ncols - 2)

    # ------------------------------------------------------------------ helpers

    def throughput_table(
        self, title: str, results: dict[str, dict], count: int, unit: str, extra: dict[str, dict]
    ) -> dict[str, float | None]:
        """Rows: library, median rate, samples, x mp; returns the median rates."""
        rates: dict[str, float | None] = {}
        rows = []
        for key, res in list(results.items()) + list(extra.items()):
            if "error" in res:
                rates[key] = None
                rows.append([self.label_of(key), res["error"], "—", "—"])
                continue
            s = res["samples_s"]
            rates[key] = count / median(s)
            rows.append(
                [
                    self.label_of(key),
                    fmt(rates[key], unit),
                    " ".join(fmt(count / x) for x in s),
                    "",
                ]
            )
        mp = rates.get("mp")
        for row, key in zip(rows, list(results) + list(extra), strict=True):
            if row[3] == "":
                row[3] = fmt_ratio(ratio(rates[key], mp))
        if not self.pp:
            rows.insert(0, self.missing_pp_row(4))
        print_table(title, ["library", f"median {unit}", "each repeat", "x mp"], rows)
        return rates

    def label_of(self, key: str) -> str:
        if key in LIBS:
            return self.label(key)
        names = {"pp": "procpool.Pool", "mp": "multiprocessing.Pool"}
        lib, _, rest = key.partition("_")
        for source, text in (("_list", "a list"), ("_gen", "a generator"), ("_range", "a range")):
            if rest.endswith(source) and lib in names:
                call = rest[: -len(source)]
                return f"{names[lib]}.{call} (defaults) over {text}"
        return {
            "pp_submit": "procpool.Pool.submit",
            "rawpipe": "raw os.pipe round trip, blocking reads (floor)",
            "rawpipe_spin": "raw os.pipe round trip, polling reads (floor)",
            "memcpy": "single-thread memcpy (numpy copy)",
            "pp_vary": "procpool.Pool, each map's buffers 4 KiB larger (not a target)",
            "mp_vary": "multiprocessing.Pool, each map's buffers 4 KiB larger",
        }[key]

    @staticmethod
    def paired(a: dict | None, b: dict | None) -> float | None:
        """*a*'s rate over *b*'s: the median of the ratios of samples taken at the same place
        (the same round, the same repeat within it: see rounds), each pair seconds apart;
        None if either failed."""
        if not a or not b or "error" in a or "error" in b:
            return None
        pairs = [tb / ta for ta, tb in zip(a["samples_s"], b["samples_s"], strict=False)]
        return median(pairs) if pairs else None

    def best_other(self, values: dict[str, float | None], higher: bool) -> tuple[str, float | None]:
        cands = [(k, v) for k, v in values.items() if k in OTHERS and v is not None]
        if not cands:
            return "-", None
        k, v = (max if higher else min)(cands, key=lambda kv: kv[1])
        return k, v

    def vs_best(self, values: dict[str, float | None], higher: bool) -> None:
        k, v = self.best_other(values, higher)
        pp = values.get("procpool")
        if pp is None or v is None:
            return
        what = "rate" if higher else "time"
        print(f"- procpool / best other ({LIBS[k].label}): {fmt_ratio(pp / v)} ({what} ratio)")

    # ------------------------------------------------------------------ scenarios

    def startup(self) -> None:
        reps = 3 if self.quick else 5
        cold: dict[str, list[float]] = {}
        warm: dict[str, list[float]] = {}
        close: dict[str, list[float]] = {}
        imp: dict[str, list[float]] = {}
        err: dict[str, str] = {}
        for _ in range(reps):  # interleave libraries so machine noise spreads over all of them
            for key in self.libs:
                res = self.child({"scenario": "startup", "lib": key}, 60)
                if "error" in res:
                    err[key] = res["error"]
                    continue
                cold.setdefault(key, []).append(res["cold_s"])
                warm.setdefault(key, []).append(res["warm_s"])
                close.setdefault(key, []).append(res["cold_close_s"])
                imp.setdefault(key, []).append(res["import_s"])
        med_cold = {k: median(v) for k, v in cold.items()}
        med_warm = {k: median(v) for k, v in warm.items()}
        rows = []
        for key in self.libs:
            if key not in cold:
                rows.append([self.label(key), err.get(key, "?"), "—", "—", "—", "—", "—"])
                continue
            rows.append(
                [
                    self.label(key),
                    fmt(med_cold[key], "s"),
                    " ".join(fmt(x, "s") for x in cold[key]),
                    fmt_ratio(ratio(med_cold[key], med_cold.get("mp"))),
                    fmt(med_warm[key], "s"),
                    fmt(median(close[key]), "s"),
                    fmt(median(imp[key]), "s"),
                ]
            )
        if not self.pp:
            rows.insert(0, self.missing_pp_row(7))
        print_table(
            f"1. Start-up to first result ({self.workers} workers; lower is better; "
            f"median of {reps} fresh processes)",
            [
                "library",
                "first pool",
                "each repeat",
                "÷ mp",
                "second pool",
                "close+join",
                "import (not counted)",
            ],
            rows,
        )
        pp, mp = med_cold.get("procpool"), med_cold.get("mp")
        self.vs_best(med_cold, higher=False)
        self.targets.check(
            "start-up <= 1.5x multiprocessing.Pool (fork)",
            ratio(pp, mp),
            "<=",
            1.5,
            fmt_ratio(ratio(pp, mp)),
        )

    def tiny(self) -> None:
        items = 10_000 if self.quick else 100_000
        rounds = 3
        # procpool's and mp's rows (the targets' and their extra rows) time 5 maps per child
        # process: one map of 100,000 x+1 takes ≈ 20 ms, and single samples of it spread by
        # ± 20 % on this machine (a target read 1.21x and 0.82x in two runs of the same code)
        reps = 1 if self.quick else 5
        to = 120 if self.quick else 300
        # every library maps the same list; procpool's range and generator paths, and imap over
        # a generator (an input no pool can size or cut ahead), are extra rows
        specs = {
            k: {
                "scenario": "map",
                "lib": k,
                "items": items,
                "repeats": reps if k in ("procpool", "mp") else 1,
                "input": "list",
            }
            for k in self.libs
        }
        names = list(specs)
        extra = [("procpool", "map", "range"), ("mp", "map", "gen")]
        for method in ("imap", "imap_unordered"):
            extra += [("procpool", method, "list"), ("procpool", method, "gen")]
        extra.append(("mp", "imap", "gen"))
        variants = {}
        for key, method, source in extra:
            if key in self.libs:
                variants[f"{'pp' if key == 'procpool' else key}_{method}_{source}"] = {
                    "scenario": "map",
                    "lib": key,
                    "method": method,
                    "items": items,
                    "repeats": reps,
                    "input": source,
                }
        # each round runs procpool's and mp's rows back to back, the other libraries after
        # (their chunksize of 1 takes ≈ 25 s each): the targets compare rows of one round,
        # seconds apart, on a machine whose speed drifts over minutes (see paired)
        first = {k: specs.pop(k) for k in ("procpool", "mp") if k in specs}
        specs = {**first, **variants, **specs}
        res = self.rounds(specs, rounds, to)
        rates = self.throughput_table(
            f"2a. Tiny tasks x+1: default map over a list of {items:,} items (higher is "
            f"better; {rounds} interleaved rounds, {reps} maps per round for procpool's and "
            "mp's rows, 1 for the others; extra rows: other inputs and calls, "
            "`gen` a generator)",
            {k: res[k] for k in names},
            items,
            "items/s",
            {k: v for k, v in res.items() if k not in names},
        )
        self.vs_best({k: rates.get(k) for k in self.libs}, higher=True)
        print(
            "- the targets below take the median of each round's ratio (rows run seconds "
            "apart), not the ratio of the medians above"
        )
        r = self.paired(res.get("procpool"), res.get("mp"))
        self.targets.check("default map >= 1x mp.map", r, ">=", 1.0, fmt_ratio(r))
        for method in ("imap", "imap_unordered"):
            for source, base in (("list", "mp"), ("gen", "mp_map_gen")):
                r = self.paired(res.get(f"pp_{method}_{source}"), res.get(base))
                self.targets.check(
                    f"{method} (defaults) >= 1x mp.map (defaults), both over a {source}",
                    r,
                    ">=",
                    1.0,
                    fmt_ratio(r),
                )

        items = 3_000 if self.quick else 20_000
        specs = {
            k: {"scenario": "per_item", "lib": k, "items": items, "repeats": 1} for k in self.libs
        }
        if self.pp:
            specs["pp_submit"] = {
                "scenario": "per_item",
                "lib": "procpool",
                "api": "submit",
                "items": items,
                "repeats": 1,
            }
        res = self.rounds(specs, rounds, to)
        rates = self.throughput_table(
            f"2b. One apply_async/submit per item, {items:,} x+1 tasks, then collect "
            f"(higher is better; {rounds} interleaved repeats)",
            {k: res[k] for k in self.libs},
            items,
            "tasks/s",
            {k: v for k, v in res.items() if k not in self.libs},
        )
        self.vs_best({k: rates.get(k) for k in self.libs}, higher=True)
        r = ratio(rates.get("procpool"), rates.get("mp"))
        self.targets.check("one apply_async per item >= 10x mp", r, ">=", 10.0, fmt_ratio(r))

    def latency(self) -> None:
        rounds = 3
        spec = {"calls": 500 if self.quick else 2000, "warmup": 200, "repeats": 1}
        specs = {k: {"scenario": "latency", "lib": k, **spec} for k in self.libs}
        specs["rawpipe"] = {"scenario": "rawpipe", **spec}
        specs["rawpipe_spin"] = {"scenario": "rawpipe", "spin": True, **spec}
        res = self.rounds(specs, rounds, 120)
        p50: dict[str, float | None] = {}
        p99: dict[str, float | None] = {}
        rows = []
        for key, r in res.items():
            if "error" in r:
                p50[key] = p99[key] = None
                rows.append([self.label_of(key), r["error"], "—", "—", "—", "—"])
                continue
            p50[key], p99[key] = median(r["p50_s"]), median(r["p99_s"])
            rows.append(
                [
                    self.label_of(key),
                    fmt(p50[key], "s"),
                    "",
                    fmt(p99[key], "s"),
                    "",
                    " ".join(fmt(x, "s") for x in r["p99_s"]),
                ]
            )
        for row, key in zip(rows, res, strict=False):
            if row[2] == "":
                row[2] = fmt_ratio(ratio(p50[key], p50.get("mp")))
                row[4] = fmt_ratio(ratio(p99[key], p99.get("mp")))
        if not self.pp:
            rows.insert(0, self.missing_pp_row(6))
        print_table(
            f"3. apply round trip, {spec['calls']} calls per repeat after {spec['warmup']} "
            f"warm-up, {rounds} interleaved repeats (lower is better; medians of the repeats' "
            "percentiles)",
            ["library", "p50", "÷ mp", "p99", "÷ mp", "p99 of each repeat"],
            rows,
        )
        self.vs_best({k: p50.get(k) for k in self.libs}, higher=False)
        pp50, pp99 = p50.get("procpool"), p99.get("procpool")
        r = ratio(pp50, p50.get("mp"))
        self.targets.check("apply p50 <= 1/3 of mp", r, "<=", 1 / 3, fmt_ratio(r))
        floors = [v for v in (p50.get("rawpipe"), p50.get("rawpipe_spin")) if v is not None]
        r = ratio(pp50, min(floors)) if floors else None  # the faster of the two pipes
        self.targets.check(
            "apply p50 within 3x of raw os.pipe round trip (the faster: blocking or polling)",
            r,
            "<=",
            3.0,
            fmt_ratio(r),
        )
        r = ratio(pp99, p99.get("mp"))
        self.targets.check("apply p99 <= 1/10 of mp", r, "<=", 0.1, fmt_ratio(r))
        _, best99 = self.best_other({k: p99.get(k) for k in self.libs}, higher=False)
        unmeasured = [k for k in OTHERS if p99.get(k) is None]
        r = None if unmeasured else ratio(pp99, best99)  # "every": all of them, or no verdict
        shown = f"not every pool ran ({', '.join(unmeasured)})" if unmeasured else fmt_ratio(r)
        self.targets.check("apply p99 below every other pool (÷ best other)", r, "<", 1.0, shown)

    def arrays(self) -> None:
        size = 32 * MiB
        count = 4 if self.quick else 8
        rounds = 3
        reps = 1 if self.quick else 2
        for kind, direction in (
            ("float64", "args"),
            ("float64", "results"),
            ("bytes", "args"),
            ("bytes", "results"),
        ):
            specs = {
                k: {
                    "scenario": "arrays",
                    "lib": k,
                    "direction": direction,
                    "kind": kind,
                    "nbytes": size,
                    "count": count,
                    "repeats": reps,
                }
                for k in self.libs
            }
            if kind == "float64":  # extra rows: a size that changes from map to map
                for key in ("procpool", "mp"):
                    if key in self.libs:
                        specs[f"{'pp' if key == 'procpool' else key}_vary"] = {
                            **specs[key],
                            "vary": True,
                        }
            # memcpy in every round too: the VM's memory speed drifts over minutes
            specs["memcpy"] = {"scenario": "memcpy", "nbytes": size, "repeats": 10}
            res = self.rounds(specs, rounds, 180)
            memcpy = res.pop("memcpy")
            mc = None if "error" in memcpy else memcpy["bytes"] / median(memcpy["samples_s"])
            rates: dict[str, float | None] = {}
            rows = []
            for key, r in res.items():
                if "error" in r:
                    rates[key] = None
                    rows.append([self.label_of(key), r["error"], "—", "—", "—"])
                    continue
                rates[key] = r["bytes"] / median(r["samples_s"])
                rows.append(
                    [
                        self.label_of(key),
                        fmt(rates[key], "B/s"),
                        " ".join(fmt(r["bytes"] / x, "B/s") for x in r["samples_s"]),
                        "",
                        f"{100 * rates[key] / mc:.1f} %" if mc else "—",
                    ]
                )
            for row, key in zip(rows, res, strict=False):
                if row[3] == "":  # (a changing size against mp's with a changing size)
                    base = rates.get("mp_vary" if key.endswith("_vary") else "mp")
                    row[3] = fmt_ratio(ratio(rates[key], base))
            rows.append([self.label_of("memcpy"), fmt(mc, "B/s"), "", "", "100 %"])
            if not self.pp:
                rows.insert(0, self.missing_pp_row(5))
            table = {("float64", "args"): "4a", ("float64", "results"): "4b"}.get(
                (kind, direction), "4d" if direction == "args" else "4e"
            )
            what = "float64 arrays" if kind == "float64" else "bytes objects"
            print_table(
                f"{table}. {count} {what} of 32 MiB "
                f"through map as {'arguments' if direction == 'args' else 'results'} "
                f"(higher is better; {rounds} interleaved rounds x {reps})",
                ["library", "median throughput", "each repeat", "x mp", "of memcpy"],
                rows,
            )
            self.vs_best({k: rates.get(k) for k in self.libs}, higher=True)
            if kind != "float64":  # (the targets are for arrays)
                continue
            pp = rates.get("procpool")
            r = ratio(pp, rates.get("mp"))
            self.targets.check(
                f"32 MiB arrays as {direction} >= 10x mp", r, ">=", 10.0, fmt_ratio(r)
            )
            r = ratio(pp, mc)
            self.targets.check(
                f"32 MiB arrays as {direction} >= 30% of memcpy",
                r,
                ">=",
                0.3,
                "—" if r is None else f"{100 * r:.1f} %",
            )
        self.shared_array()

    def shared_array(self) -> None:
        title = (
            "4c. procpool.SharedArray of 1 GiB passed to a task vs a small int "
            "(apply; the two kinds of call alternate)"
        )
        if not self.pp:
            print(f"### {title}\n\nnot available (procpool.Pool missing) — placeholder\n")
            self.targets.check(
                "SharedArray 1 GiB round trip within 2x of a small int",
                None,
                "<=",
                2.0,
                "not measured",
            )
            return
        calls = 50 if self.quick else 200
        res = self.child(
            {"scenario": "shared_array", "nbytes": GiB, "calls": calls, "warmup": 10}, 180
        )
        if "error" in res or "skipped" in res:
            why = res.get("skipped") or res.get("error")
            print(f"### {title}\n\nskipped: {why}\n")
            self.targets.check(
                "SharedArray 1 GiB round trip within 2x of a small int",
                None,
                "<=",
                2.0,
                f"not measured ({why})",
            )
            return
        t_int, t_sa = median(res["int"]), median(res["shared"])
        print_table(
            title,
            ["argument", "median round trip", "÷ small int"],
            [
                ["small int", fmt(t_int, "s"), "1.00x"],
                [f"1 GiB {res['type']}", fmt(t_sa, "s"), fmt_ratio(t_sa / t_int)],
            ],
        )
        self.targets.check(
            "SharedArray 1 GiB round trip within 2x of a small int",
            t_sa / t_int,
            "<=",
            2.0,
            fmt_ratio(t_sa / t_int),
        )

    def memory(self) -> None:
        rows = []
        each: dict[str, float | None] = {}
        private: dict[str, float | None] = {}
        for key in self.libs:
            r = self.child({"scenario": "idle_rss", "lib": key}, 60)
            if "error" in r:
                rows.append([self.label(key), r["error"], "—", "—", "—", "—", "—"])
                continue
            each[key] = median(r["rss"]) if r["rss"] else None
            private[key] = median(r["uss"]) if r.get("uss") else None
            rows.append(
                [
                    self.label(key),
                    str(r["procs"]),
                    fmt(median(r["rss"]) if r["rss"] else 0, "B"),
                    fmt(private[key] or 0, "B"),
                    fmt(sum(r["rss"]), "B"),
                    fmt(sum(r["pss"]), "B"),
                    fmt(r["parent_growth"], "B"),
                ]
            )
        if not self.pp:
            rows.insert(0, self.missing_pp_row(7))
        print_table(
            f"5a. Idle pool memory ({self.workers} workers; all descendant processes, "
            "including fork servers and resource trackers; private = USS, the pages no "
            "other process shares)",
            [
                "library",
                "processes",
                "median RSS each",
                "median private each",
                "total RSS",
                "total PSS",
                "parent RSS growth",
            ],
            rows,
        )
        r = ratio(each.get("procpool"), each.get("mp"))
        self.targets.check("idle worker RSS <= mp's", r, "<=", 1.0, fmt_ratio(r))
        r = ratio(private.get("procpool"), private.get("mp"))
        print(f"- private memory per idle worker (USS), procpool / mp: {fmt_ratio(r)} (no target)")
        rows = []
        each = {}
        for key in self.libs:
            r = self.child({"scenario": "idle_rss", "lib": key, "main_func": True}, 60)
            if "error" in r:
                rows.append([self.label(key), r["error"], "—", "—"])
                continue
            each[key] = median(r["rss"]) if r["rss"] else None
            rows.append([self.label(key), fmt(each[key] or 0, "B"), key, fmt(sum(r["pss"]), "B")])
        for row in rows:  # (÷ mp once mp's is known)
            if row[2] in each:
                row[2] = fmt_ratio(ratio(each[row[2]], each.get("mp")))
        print_table(
            f"5c. Idle worker memory after running a function defined in the main script "
            f"({self.workers} workers; 5a ran one of an importable module)",
            ["library", "median RSS each", "÷ mp", "total PSS"],
            rows,
        )
        if not self.args.memory:
            print("(5b. imap memory over 10,000,000 items: run with --memory)\n")
            return
        items = 1_000_000 if self.quick else 10_000_000
        rows = []
        for key, chunksize in (("procpool", None), ("mp", 1000)):
            if key not in self.libs:
                rows.append(self.missing_pp_row(5))
                continue
            r = self.child(
                {"scenario": "memory_imap", "lib": key, "items": items, "chunksize": chunksize}, 600
            )
            call = f"imap(f, gen){'' if chunksize is None else f', chunksize={chunksize}'}"
            if "error" in r:
                rows.append([self.label(key), call, r["error"], "—", "—"])
                continue
            rows.append(
                [
                    self.label(key),
                    call,
                    fmt(r["peak_rss"] - r["base_rss"], "B"),
                    fmt(r["peak_rss"], "B"),
                    fmt(items / r["elapsed_s"], "items/s"),
                ]
            )
        print_table(
            f"5b. Parent RSS growth during imap over {items:,} lazily generated items "
            "(lower is better)",
            ["library", "call", "peak RSS growth", "peak RSS", "rate"],
            rows,
        )

    def run(self) -> int:
        only = set(self.args.only) if self.args.only else None
        for name in ("startup", "tiny", "latency", "arrays", "memory"):
            if only is None or name in only:
                getattr(self, name)()
        self.targets.summary()
        if self.problems:
            print("### Problems (errors and timeouts)\n")
            for p in self.problems:
                print(f"- {p}")
            print()
        pp_problems = [p for p in self.problems if "procpool" in p or "shared_array" in p]
        return 1 if (self.args.strict and pp_problems) else 0


def main_inc(x: int) -> int:
    """``x + 1`` defined in the main script (a child's ``__main__`` is this file): scenario 5c,
    the idle worker after running a function of the main script, as most programs do."""
    return x + 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_main(json.loads(argv[1]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes (CI)")
    ap.add_argument("--memory", action="store_true", help="add the 10M-item imap memory run")
    ap.add_argument("--workers", type=int, default=2, help="pool size (default 2)")
    ap.add_argument(
        "--only",
        nargs="*",
        choices=["startup", "tiny", "latency", "arrays", "memory"],
        help="run only these scenarios",
    )
    ap.add_argument(
        "--libs",
        nargs="*",
        default=list(LIBS),
        choices=list(LIBS),
        help="libraries to measure (default: all)",
    )
    ap.add_argument(
        "--standin",
        action="store_true",
        help="fill procpool's rows with multiprocessing.Pool to test this harness "
        "(labelled STAND-IN; never publish these)",
    )
    ap.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when a procpool measurement fails or times out",
    )
    ap.add_argument("--verbose", action="store_true", help="print the stderr of failed children")
    args = ap.parse_args(argv)
    if args.standin:
        os.environ[STANDIN_ENV] = "1"
    print_header("procpool pool benchmarks (bench_pool.py)", ["benchmarks/bench_pool.py", *argv])
    t0 = time.perf_counter()
    rc = Runner(args).run()
    print(f"(bench_pool.py finished in {time.perf_counter() - t0:.0f} s)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
