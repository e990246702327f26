#!/usr/bin/python3
"""Helpers for benches/e2e/run (stdlib only; run with /usr/bin/python3).

    harness.py ports N                      N loopback ports free for UDP and TCP
    harness.py zone TEMPLATE OUT            fill in the bench.test zone
    harness.py names N SUFFIX OUT           N unique random names under SUFFIX, dnsperf format
    harness.py report DIR OUT_JSON          medians, Markdown tables, raw JSON

The run script records, per measured run, one tab-separated line in DIR/runs.tsv (see
RUN_FIELDS) and keeps each dnsperf output under DIR/runs/; memory samples go to
DIR/memory.tsv (MEM_FIELDS); key=value facts about the run to DIR/meta.txt.
"""

import json
import os
import re
import secrets
import socket
import statistics
import sys

RUN_FIELDS = [
    "kind",  # fixed (-Q) | tput (no rate limit) | tputcap (the same, proxy CPU-capped) | warm
    "round",
    "scenario",
    "proxy",
    "dnsperf_out",  # file with dnsperf's output
    "proxy_ticks",  # utime+stime of the proxy process during the run, clock ticks
    "named_ticks",  # the same for BIND
    "dnsperf_ticks",  # dnsperf's own CPU (from bash's time), in clock ticks
    "proxy_exec_ns",  # on-CPU time of the proxy's threads (schedstat), a cross-check
    "proxy_wait_ns",  # time the proxy's threads were runnable but waiting for the CPU (noise)
    "proxy_slices",  # times the proxy's threads were scheduled in (schedstat), ~ wakeups
    "psi_cpu_some_us",  # system-wide CPU pressure (/proc/pressure/cpu some total)
    "cpu0_steal",  # /proc/stat steal ticks on the proxy CPU
    "cpu1_steal",  # the same on the load CPU
    "udp_rcvbuf_errors",  # host-wide UDP datagrams dropped on a full socket receive buffer
    "wall",  # seconds, from the first sample to the last
    "rc",  # dnsperf exit status
]
MEM_FIELDS = ["label", "cache_size", "step", "names_sent", "rss_kb", "dnsperf_out"]

SCENARIOS = ["hot", "fhot", "miss", "fmiss"]
SCENARIO_TITLES = {
    "hot": "hot (20 names, cache hits)",
    "fhot": "flattened hot (20 CNAME->A names, cache hits)",
    "miss": "miss (every name new, plain A)",
    "fmiss": "flattened miss (every name new, CNAME->A)",
}
PROXIES = ["flatdns", "dnsdist", "unbound", "echo", "floor"]


def cmd_ports(n):
    socks, ports = [], []
    for _ in range(200):
        if len(ports) == n:
            break
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 0))
        port = u.getsockname()[1]
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            t.bind(("127.0.0.1", port))
        except OSError:
            u.close()
            t.close()
            continue
        socks += [u, t]
        ports.append(port)
    for s in socks:
        s.close()
    if len(ports) != n:
        sys.exit("no free loopback ports")
    print(" ".join(map(str, ports)))


def cmd_zone(template, out):
    hot = "\n".join(f"h{i} IN A 192.0.2.{10 + i}" for i in range(20))
    flat = "\n".join(f"f{i} IN CNAME t{i}\nt{i} IN A 198.51.100.{10 + i}" for i in range(20))
    with open(template) as f:
        text = f.read()
    with open(out, "w") as f:
        f.write(text.replace("@HOT@", hot).replace("@FLAT@", flat))


def cmd_names(n, suffix, out):
    # 12 random hex digits (48 bits) per name: no repeats in practice, within a file or
    # across the files of one run, so every query is a cache miss everywhere.
    seen = set()
    with open(out, "w") as f:
        while len(seen) < n:
            label = secrets.token_hex(6)
            if label in seen:
                continue
            seen.add(label)
            f.write(f"{label}.{suffix} A\n")


# ------------------------------------------------------------------------------------------
# Report


def parse_dnsperf(path):
    r = {"sent": 0, "completed": 0, "lost": 0, "rcodes": {}, "qps": 0.0, "avg_latency_ms": None,
         "run_time": None, "timeouts": 0, "errors": []}
    try:
        text = open(path, errors="replace").read()
    except OSError:
        r["errors"].append("no dnsperf output")
        return r
    for key, pat in [("sent", r"Queries sent:\s+(\d+)"), ("completed", r"Queries completed:\s+(\d+)"),
                     ("lost", r"Queries lost:\s+(\d+)")]:
        m = re.search(pat, text)
        if m:
            r[key] = int(m.group(1))
    m = re.search(r"Queries per second:\s+([\d.]+)", text)
    if m:
        r["qps"] = float(m.group(1))
    m = re.search(r"Run time \(s\):\s+([\d.]+)", text)
    if m:
        r["run_time"] = float(m.group(1))
    m = re.search(r"Average Latency \(s\):\s+([\d.]+)", text)
    if m:
        r["avg_latency_ms"] = round(float(m.group(1)) * 1000, 3)
    m = re.search(r"Response codes:\s+(.*)", text)
    if m:
        for code, count in re.findall(r"([A-Z]+) (\d+) \(", m.group(1)):
            r["rcodes"][code] = int(count)
    # Anything dnsperf complains about; timeouts are counted (they are the "lost" queries).
    for line in text.splitlines():
        if line.startswith("[Timeout]"):
            r["timeouts"] += 1
        elif line.startswith(("Error", "Warning", "[Error]", "[Warning]")) and len(r["errors"]) < 5:
            r["errors"].append(line.strip())
    return r


def read_tsv(path, fields):
    rows = []
    if not os.path.exists(path):
        return rows
    for line in open(path):
        parts = line.rstrip("\n").split("\t")
        if len(parts) != len(fields):
            sys.exit(f"{path}: {len(parts)} fields where {len(fields)} were expected: {line!r}")
        rows.append(dict(zip(fields, parts)))
    return rows


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def cmd_report(d, out_json):
    meta = {}
    for line in open(os.path.join(d, "meta.txt")):
        if "=" in line:
            k, v = line.rstrip("\n").split("=", 1)
            meta[k] = v
    hz = int(meta.get("clk_tck", "100"))
    tick_us = 1e6 / hz
    qps_target = float(meta.get("qps", "15000"))

    runs = []
    warnings = []
    for row in read_tsv(os.path.join(d, "runs.tsv"), RUN_FIELDS):
        p = parse_dnsperf(row["dnsperf_out"])
        wall = float(row["wall"])
        # Rates over dnsperf's own run time: after it, dnsperf may sit out its 5 s timeout
        # waiting for lost queries, with the proxy idle.
        span = p["run_time"] or wall
        ticks = int(row["proxy_ticks"])

        def pct(t, over=span):
            return round(100 * int(t) / hz / over, 1) if over > 0 else None

        run = {
            "kind": row["kind"], "round": int(row["round"]), "scenario": row["scenario"],
            "proxy": row["proxy"], "dnsperf_rc": int(row["rc"]),
            "sent": p["sent"], "completed": p["completed"], "lost": p["lost"],
            "rcodes": p["rcodes"], "qps": p["qps"], "avg_latency_ms": p["avg_latency_ms"],
            "run_time_s": p["run_time"], "wall_s": wall,
            "proxy_cpu_ticks": ticks, "clk_tck": hz,
            "us_per_query": round(ticks * tick_us / p["completed"], 3) if p["completed"] else None,
            "proxy_cpu_pct": pct(ticks),
            "named_cpu_pct": pct(row["named_ticks"]),
            "dnsperf_cpu_pct": pct(row["dnsperf_ticks"], wall),
            "us_per_query_schedstat": round(int(row["proxy_exec_ns"]) / 1000 / p["completed"], 3)
            if p["completed"] else None,
            # How long the proxy's threads sat runnable without the CPU: work from elsewhere on
            # its core (its own threads queueing behind each other count too).
            "proxy_wait_pct": round(100 * int(row["proxy_wait_ns"]) / 1e9 / span, 1) if span > 0 else None,
            "proxy_slices_per_query": round(int(row["proxy_slices"]) / p["completed"], 3)
            if p["completed"] else None,
            "psi_cpu_some_pct": round(100 * int(row["psi_cpu_some_us"]) / 1e6 / wall, 1) if wall > 0 else None,
            "cpu0_steal_pct": pct(row["cpu0_steal"], wall),
            "cpu1_steal_pct": pct(row["cpu1_steal"], wall),
            "udp_rcvbuf_errors": int(row["udp_rcvbuf_errors"]),
            "dnsperf_timeouts": p["timeouts"], "dnsperf_messages": p["errors"],
        }
        if run["kind"] == "warm":
            continue
        runs.append(run)
        tag = f"{run['kind']} round {run['round']} {run['scenario']} {run['proxy']}"
        if run["dnsperf_rc"] != 0:
            warnings.append(f"{tag}: dnsperf exited with status {run['dnsperf_rc']}")
        if run["sent"] and run["lost"]:
            warnings.append(f"{tag}: {run['lost']} of {run['sent']} queries unanswered "
                            f"({100 * run['lost'] / run['sent']:.3f}%); UDP receive-buffer "
                            f"drops on the host during the run: {run['udp_rcvbuf_errors']}")
        elif run["udp_rcvbuf_errors"]:
            warnings.append(f"{tag}: {run['udp_rcvbuf_errors']} UDP receive-buffer drops on the host "
                            f"(not ours: every query was answered)")
        bad = {k: v for k, v in run["rcodes"].items() if k != "NOERROR"}
        if bad:
            warnings.append(f"{tag}: non-NOERROR answers {bad}")
        for m in run["dnsperf_messages"]:
            warnings.append(f"{tag}: dnsperf: {m}")
        if run["kind"] == "tputcap":
            # The quota is half a core: a proxy well under it was not the limit, or dnsperf
            # near its own core's end may have been.
            if (run["proxy_cpu_pct"] or 0) < 45:
                warnings.append(f"{tag}: proxy CPU {run['proxy_cpu_pct']}% under a 50% cap - not the limit")
            if (run["dnsperf_cpu_pct"] or 0) > 90:
                warnings.append(f"{tag}: dnsperf CPU {run['dnsperf_cpu_pct']}% - it may have set the pace")
        if run["kind"] == "fixed":
            if run["qps"] < 0.98 * qps_target:
                warnings.append(f"{tag}: achieved {run['qps']:.0f} q/s, below the offered {qps_target:.0f} "
                                f"(dnsperf CPU {run['dnsperf_cpu_pct']}%, system CPU pressure "
                                f"{run['psi_cpu_some_pct']}%, average latency {run['avg_latency_ms']} ms)")
            if (run["proxy_cpu_pct"] or 0) > 90:
                warnings.append(f"{tag}: proxy CPU {run['proxy_cpu_pct']}% - saturated at the offered load")
            if (run["named_cpu_pct"] or 0) > 70:
                warnings.append(f"{tag}: BIND CPU {run['named_cpu_pct']}% - close to saturating")
            if (run["named_cpu_pct"] or 0) + (run["dnsperf_cpu_pct"] or 0) > 85:
                warnings.append(f"{tag}: dnsperf + BIND use {run['named_cpu_pct'] + run['dnsperf_cpu_pct']:.0f}% of the load CPU")
            if (run["proxy_wait_pct"] or 0) > 30:
                warnings.append(f"{tag}: the proxy waited {run['proxy_wait_pct']}% of the run for its CPU (other work on it)")
            if (run["cpu0_steal_pct"] or 0) > 5:
                warnings.append(f"{tag}: {run['cpu0_steal_pct']}% steal on the proxy's CPU")

    proxies = [p for p in PROXIES if any(r["proxy"] == p for r in runs)]
    fixed = [r for r in runs if r["kind"] == "fixed"]
    summary = {}
    for s in SCENARIOS:
        for p in proxies:
            vals = [r["us_per_query"] for r in fixed if r["scenario"] == s and r["proxy"] == p
                    and r["us_per_query"] is not None]
            if not vals:
                continue
            answered = [100 * r["completed"] / r["sent"] for r in fixed
                        if r["scenario"] == s and r["proxy"] == p and r["sent"]]
            waits = [r["proxy_wait_pct"] for r in fixed if r["scenario"] == s and r["proxy"] == p
                     and r["proxy_wait_pct"] is not None]
            summary.setdefault(s, {})[p] = {
                "median_us_per_query": round(statistics.median(vals), 3),
                "min": min(vals), "max": max(vals), "rounds": len(vals),
                "min_answered_pct": round(min(answered), 3) if answered else None,
                "max_proxy_wait_pct": max(waits) if waits else None,
            }
    paired_ratios = {}  # unrounded, for the text
    for s, row in summary.items():
        if "flatdns" in row and "dnsdist" in row and row["dnsdist"]["median_us_per_query"]:
            row["flatdns_over_dnsdist"] = round(
                row["flatdns"]["median_us_per_query"] / row["dnsdist"]["median_us_per_query"], 3)
        # Each round runs every proxy within a few minutes, so a round's own ratio is free of
        # what moves the machine between rounds; the ratio of medians above can pair one
        # proxy's quiet round with the other's disturbed one.
        by_round = {}
        for r in fixed:
            if r["scenario"] == s and r["proxy"] in ("flatdns", "dnsdist") and r["us_per_query"]:
                by_round.setdefault(r["round"], {})[r["proxy"]] = r["us_per_query"]
        paired = [v["flatdns"] / v["dnsdist"] for _, v in sorted(by_round.items())
                  if len(v) == 2]
        if paired:
            paired_ratios[s] = paired
            row["flatdns_over_dnsdist_rounds"] = [round(x, 3) for x in paired]
            row["flatdns_over_dnsdist_rounds_median"] = round(statistics.median(paired), 3)
        if "flatdns" in row and "dnsdist" in summary.get("hot", {}) and s == "fhot":
            row["flatdns_over_dnsdist_hot"] = round(
                row["flatdns"]["median_us_per_query"] / summary["hot"]["dnsdist"]["median_us_per_query"], 3)

    # Throughput: per proxy, the round with the median queries/s (the lower middle one for
    # an even count), with the spread over rounds; and, on its own, the median over rounds
    # of the queries answered per proxy CPU-second (the proxy's capacity, which need not come
    # from the same round).
    def throughput(kind):
        by_proxy = {}
        for r in runs:
            if r["kind"] == kind:
                by_proxy.setdefault(r["proxy"], []).append(r)
        out = {}
        for p, rs in by_proxy.items():
            rs = sorted(rs, key=lambda r: r["qps"] or 0)
            med = dict(rs[(len(rs) - 1) // 2])
            med["rounds"] = len(rs)
            med["qps_min"], med["qps_max"] = rs[0]["qps"], rs[-1]["qps"]
            per_cpu_s = [r["completed"] / (r["proxy_cpu_ticks"] / r["clk_tck"])
                         for r in rs if r["proxy_cpu_ticks"] and r["clk_tck"]]
            med["per_cpu_s_median"] = round(statistics.median(per_cpu_s)) if per_cpu_s else None
            out[p] = med
        return out

    tput = throughput("tput")
    tput_capped = throughput("tputcap")

    mem_rows = read_tsv(os.path.join(d, "memory.tsv"), MEM_FIELDS)
    memory = {}
    for row in mem_rows:
        m = memory.setdefault(row["label"], {"cache_size": int(row["cache_size"]), "steps": []})
        step = {"step": row["step"], "names_sent": int(row["names_sent"]), "rss_kb": int(row["rss_kb"])}
        if row["dnsperf_out"] != "-":
            p = parse_dnsperf(row["dnsperf_out"])
            step.update({"sent": p["sent"], "completed": p["completed"], "lost": p["lost"],
                         "rcodes": p["rcodes"], "qps": p["qps"]})
            if p["lost"]:
                warnings.append(f"memory {row['label']} {row['step']}: {p['lost']} of {p['sent']} unanswered")
            bad = {k: v for k, v in p["rcodes"].items() if k != "NOERROR"}
            if bad:
                warnings.append(f"memory {row['label']} {row['step']}: non-NOERROR answers {bad}")
        m["steps"].append(step)
    for label, m in memory.items():
        steps = m["steps"]
        before = next((s["rss_kb"] for s in steps if s["step"] == "before"), None)
        after = next((s["rss_kb"] for s in steps if s["step"] == "settled"), steps[-1]["rss_kb"])
        answered = sum(s.get("rcodes", {}).get("NOERROR", 0) for s in steps)
        m["rss_before_kb"], m["rss_after_kb"], m["noerror_answers"] = before, after, answered
        if before is None:
            continue
        m["rss_growth_kb"] = after - before
        entries = min(answered, m["cache_size"])
        # Average over every entry (includes the cache's fixed overhead), and marginal: the
        # growth from the first quarter of the flood to the end over the entries added then.
        m["bytes_per_entry"] = round((after - before) * 1024 / entries, 1) if entries else None
        quarters = [s for s in steps if s["step"].startswith("after")]
        if len(quarters) >= 2:
            first, last = quarters[0], quarters[-1]
            added = min(last["names_sent"], m["cache_size"]) - min(first["names_sent"], m["cache_size"])
            m["rss_growth_after_first_quarter_kb"] = last["rss_kb"] - first["rss_kb"]
            m["marginal_bytes_per_entry"] = (round((last["rss_kb"] - first["rss_kb"]) * 1024 / added, 1)
                                             if added > 0 else None)
            m["names_after_first_quarter"] = last["names_sent"] - first["names_sent"]
    if "bounded" in memory and "full" in memory:
        b, f = memory["bounded"], memory["full"]
        bpe = f.get("marginal_bytes_per_entry") or f.get("bytes_per_entry")
        if bpe and "rss_growth_after_first_quarter_kb" in b:
            # Past the first quarter the bounded cache is full: without a bound, the rest of the
            # flood would have grown RSS by (names) x (bytes per entry).
            unbounded_kb = b["names_after_first_quarter"] * bpe / 1024
            b["unbounded_growth_estimate_kb"] = round(unbounded_kb)
            b["bound_holds"] = b["rss_growth_after_first_quarter_kb"] <= 0.1 * unbounded_kb
            if not b["bound_holds"]:
                warnings.append("memory: RSS kept growing past the cache bound under the flood")

    result = {"meta": meta, "summary": summary, "throughput": tput,
              "throughput_capped": tput_capped, "memory": memory,
              "runs": runs, "warnings": warnings, "logs": {}}
    # flatdns runs at --log-level warn: all of its output counts. The others log startup
    # chatter: keep what looks like a problem.
    problem = re.compile(r"warn|error|fail|fatal|crit|drop|refus|timeout|overload|quota", re.I)
    for name in sorted(os.listdir(d)):
        if name.endswith((".log", ".out")):
            lines = open(os.path.join(d, name), errors="replace").read().strip().splitlines()
            if not name.startswith("flatdns"):
                lines = [l for l in lines if problem.search(l) and "built with" not in l]
            if lines:
                result["logs"][name] = lines[-20:]

    # ---- Markdown
    out = []
    out.append(f"## flatdns end-to-end load comparison, {meta.get('date', '?')}")
    out.append("")
    out.append(f"Machine: nproc {meta.get('nproc')}, {meta.get('cpu_model')}, kernel {meta.get('kernel')}. "
               f"Proxy under test pinned to CPU {meta.get('proxy_cpu')}, dnsperf and BIND to CPU {meta.get('load_cpu')}.")
    out.append(f"flatdns {meta.get('flatdns_rev')} (binary {meta.get('flatdns_binary')}), dnsdist {meta.get('dnsdist_version')}, "
               f"Unbound {meta.get('unbound_version')}, BIND {meta.get('bind_version')}, "
               f"dnsperf {meta.get('dnsperf_version')}.")
    out.append(f"Offered load {meta.get('qps')} q/s for {meta.get('seconds')} s per run, "
               f"{meta.get('rounds')} interleaved round(s), medians. CPU = utime+stime of the proxy "
               f"process per answered query (clock tick {tick_us:.0f} us).")
    out.append("")
    hdr = "| scenario | " + " | ".join(f"{p} us/q" for p in proxies) + " | flatdns/dnsdist |"
    out.append(hdr)
    out.append("|---" * (len(proxies) + 2) + "|")
    spread_flag = False
    for s in SCENARIOS:
        if s not in summary:
            continue
        row = summary[s]
        cells = []
        for p in proxies:
            if p not in row:
                cells.append("-")
                continue
            c = row[p]
            wide = c["rounds"] > 1 and c["min"] > 0 and c["max"] / c["min"] > 1.25
            spread_flag = spread_flag or wide
            cells.append(fmt(c["median_us_per_query"], 2) + (" †" if wide else ""))
        # From the medians themselves: the stored ratios are rounded to 3 places, and rounding
        # those again to 2 could print 1.005 as 1.00.
        def med(p, scen=s):
            return summary.get(scen, {}).get(p, {}).get("median_us_per_query")
        ratio = (f"{med('flatdns') / med('dnsdist'):.2f}"
                 if "flatdns_over_dnsdist" in row and med("dnsdist") else "-")
        if s == "fhot" and "flatdns_over_dnsdist_hot" in row:
            ratio += f" ({med('flatdns') / med('dnsdist', 'hot'):.2f} vs dnsdist hot)"
        out.append(f"| {SCENARIO_TITLES[s]} | " + " | ".join(cells) + f" | {ratio} |")
    if "floor" in proxies:
        out.append("")
        out.append("floor: a C forwarder that does nothing but send each query upstream on a fresh "
                   "connected socket with a fresh random ID, as R2 requires and flatdns does for a miss "
                   "(no cache, so every scenario is a miss for it): the least a miss can cost under R2.")
        if "miss" in summary and "floor" in summary["miss"] and "dnsdist" in summary["miss"]:
            f, d = summary["miss"]["floor"], summary["miss"]["dnsdist"]
            out.append(f"floor/dnsdist on misses: {f['median_us_per_query'] / d['median_us_per_query']:.2f}.")
    rounds_ratios = [(s, paired_ratios[s]) for s in SCENARIOS if s in paired_ratios]
    if rounds_ratios and any(len(v) > 1 for _, v in rounds_ratios):
        out.append("")
        out.append("Round by round, flatdns's CPU per query over dnsdist's in the same round (each "
                   "round runs both within minutes, so what moves the machine between rounds "
                   "cancels): " + "; ".join(
                       f"{s} " + ", ".join(f"{x:.2f}" for x in v)
                       + f" (median {statistics.median(v):.2f}, flatdns cheaper in "
                       + f"{sum(x < 1 for x in v)} of {len(v)})"
                       for s, v in rounds_ratios) + ".")
    if spread_flag:
        out.append("")
        out.append("† the rounds differ by more than 25% (max/min): noise moved this median; see the spread.")
    out.append("")
    out.append("Spread over rounds: min-max us/q; lowest share of queries answered; most time the "
               "proxy waited for its CPU (others' work on CPU 0) in a run:")
    out.append("")
    out.append("| scenario | " + " | ".join(proxies) + " |")
    out.append("|---" * (len(proxies) + 1) + "|")
    for s in SCENARIOS:
        if s not in summary:
            continue
        row = summary[s]
        cells = []
        for p in proxies:
            if p not in row:
                cells.append("-")
                continue
            c = row[p]
            cells.append(f"{c['min']:.2f}-{c['max']:.2f}, {c['min_answered_pct']:.2f}%, "
                         f"wait {fmt(c['max_proxy_wait_pct'])}%")
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    def tput_table(out, t, kind):
        """Saturating runs of one kind, a row per proxy: the median round's figures, the
        range over rounds, and the queries lost over all of them."""
        out.append("| proxy | queries/s | range over rounds | lost | proxy CPU | dnsperf CPU | proxy us/q | queries per proxy CPU-second |")
        out.append("|---|---|---|---|---|---|---|---|")
        for p in proxies:
            if p not in t:
                continue
            r = t[p]
            lost = sum(x["lost"] for x in runs if x["kind"] == kind and x["proxy"] == p)
            out.append(f"| {p} | {r['qps'] or 0:.0f} | {r['qps_min'] or 0:.0f}-{r['qps_max'] or 0:.0f} "
                       f"({r['rounds']}) | {lost} over the rounds | {fmt(r['proxy_cpu_pct'], 0)}% | "
                       f"{fmt(r['dnsperf_cpu_pct'], 0)}% | {fmt(r['us_per_query'], 2)} | "
                       f"{fmt(r['per_cpu_s_median'], 0)} |")

    if tput:
        out.append("")
        out.append(f"Saturating throughput, hot scenario ({meta.get('tput_args')}, {meta.get('tput_seconds')} s; "
                   "the round with the median queries/s and the range over rounds; the last column "
                   "is its own median over rounds):")
        out.append("")
        tput_table(out, tput, "tput")
        if "flatdns" in tput and "dnsdist" in tput and tput["dnsdist"]["qps"]:
            out.append("")
            out.append(f"flatdns/dnsdist throughput: {tput['flatdns']['qps'] / tput['dnsdist']['qps']:.2f}")
        if any((r["proxy_cpu_pct"] or 0) < 90 for r in tput.values()):
            out.append("")
            out.append("A proxy below ~90% CPU was not the bottleneck: dnsperf (one core) was. Its "
                       "queries/s is then the load generator's limit against that proxy, and the last "
                       "column (answered / proxy CPU time, batched as at saturation) is the better "
                       "guide to the proxy's own capacity on one core.")
    if tput_capped:
        out.append("")
        out.append(f"Saturating throughput with the proxy held to half of its core ({meta.get('tput_cap')}; "
                   "the same runs otherwise): the proxy is the limit, so these queries/s are its own:")
        out.append("")
        tput_table(out, tput_capped, "tputcap")
        if "flatdns" in tput_capped and "dnsdist" in tput_capped and tput_capped["dnsdist"]["qps"]:
            out.append("")
            out.append(f"flatdns/dnsdist throughput, proxy held to half a core: "
                       f"{tput_capped['flatdns']['qps'] / tput_capped['dnsdist']['qps']:.2f}")
    elif tput and meta.get("tput_cap") == "unavailable":
        out.append("")
        out.append("No capped saturating runs: no writable cgroup CPU controller on this machine.")
    if memory:
        out.append("")
        out.append("Memory (flatdns, RSS from /proc/PID/status):")
        out.append("")
        for label, m in memory.items():
            steps = ", ".join(f"{s['names_sent']:,}: {s['rss_kb'] / 1024:.1f}"
                              for s in m["steps"] if s["step"].startswith("after"))
            sent = max(s["names_sent"] for s in m["steps"])
            line = (f"- `--cache-size {m['cache_size']:,}`, {sent:,} unique names sent "
                    f"({m['noerror_answers']:,} answered NOERROR): RSS {m['rss_before_kb'] / 1024:.1f} MB "
                    f"before, {m['rss_after_kb'] / 1024:.1f} MB after (growth "
                    f"{m.get('rss_growth_kb', 0) / 1024:.1f} MB)")
            if label == "full" and m.get("bytes_per_entry") is not None:
                line += (f"; {m['bytes_per_entry']:.0f} bytes per cached entry on average "
                         f"(growth / entries), {fmt(m.get('marginal_bytes_per_entry'), 0)} at the margin "
                         f"(from the first quarter to the end)")
            if label == "bounded" and "bound_holds" in m:
                line += (f"; from the first quarter to the end RSS grew "
                         f"{m['rss_growth_after_first_quarter_kb'] / 1024:.1f} MB where an unbounded "
                         f"cache would have grown about {m['unbounded_growth_estimate_kb'] / 1024:.0f} MB: "
                         f"the bound {'holds' if m['bound_holds'] else 'does NOT hold'}")
            out.append(line + ".")
            out.append(f"  - RSS after each quarter (names sent: MB): {steps}")
    # Over the fixed-rate runs, whose CPU figures the tables give: a saturating run loads the
    # machine itself, so its CPU pressure says nothing about other work.
    fixed_runs = [r for r in runs if r["kind"] == "fixed"]
    waits = sorted(r["proxy_wait_pct"] for r in fixed_runs if r["proxy_wait_pct"] is not None)
    if waits:
        out.append("")
        out.append(f"Noise, over the fixed-rate runs: the proxy under test sat runnable but waiting for CPU "
                   f"{meta.get('proxy_cpu')} for a median {statistics.median(waits):.1f}% (max {waits[-1]:.1f}%) of each run's time "
                   f"(schedstat run delay summed over its threads, so above 100% when several wait at "
                   f"once; its own threads queueing behind each other count too); "
                   f"system-wide CPU pressure (PSI some) median "
                   f"{statistics.median(r['psi_cpu_some_pct'] for r in fixed_runs):.0f}%. Load average "
                   f"{meta.get('loadavg_at_start')} at the start, {meta.get('loadavg_at_end')} at the end.")
    if warnings:
        out.append("")
        out.append(f"Warnings ({len(warnings)}):")
        out.append("")
        for w in warnings[:60]:
            out.append(f"- {w}")
        if len(warnings) > 60:
            out.append(f"- ... {len(warnings) - 60} more in the JSON")
    if not result["logs"]:
        out.append("")
        out.append("Server logs: flatdns (at --log-level warn) logged nothing; nothing in the others' "
                   "logs looks like a problem.")
    if result["logs"]:
        out.append("")
        out.append("Server logs (last lines: all of flatdns's, which logs warnings and errors only; the others' lines that look like problems):")
        for name, lines in result["logs"].items():
            out.append("")
            out.append(f"{name}:")
            out.append("```")
            out.extend(lines)
            out.append("```")
    text = "\n".join(out)
    print(text)
    result["markdown"] = text
    with open(out_json, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


def main():
    a = sys.argv[1:]
    if a[:1] == ["ports"] and len(a) == 2:
        cmd_ports(int(a[1]))
    elif a[:1] == ["zone"] and len(a) == 3:
        cmd_zone(a[1], a[2])
    elif a[:1] == ["names"] and len(a) == 4:
        cmd_names(int(a[1]), a[2], a[3])
    elif a[:1] == ["report"] and len(a) == 3:
        cmd_report(a[1], a[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
