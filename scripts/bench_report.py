#!/usr/bin/env python3
"""Turns the RESULT lines of scripts/bench.sh into the Markdown tables of the README."""
import statistics
import sys


def parse(path):
    rows = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if not parts or parts[0] != "RESULT":
                continue
            rows.append(dict(p.split("=", 1) for p in parts[1:] if "=" in p))
    return rows


def num(v, fmt="{:,.0f}"):
    try:
        return fmt.format(float(v))
    except (TypeError, ValueError):
        return "-"


def ms(us):
    try:
        return f"{float(us) / 1000:.2f}"
    except (TypeError, ValueError):
        return "-"


def targets(rows):
    """The target rows, one line per repeat, ratios within the repeat, and their medians."""
    reps = {}
    for r in rows:
        if r.get("label", "").startswith("target-") and "rep" in r:
            reps.setdefault(int(r["rep"]), {})[(r["label"], r["op"])] = r
    if not reps:
        return
    print("Targets (1 KiB at 32 connections over the Unix socket, default sidecar; 1 MiB "
          "octet-stream seal, bulk sidecar, 2 connections), each repeat run in turn:")
    print()
    print("| repeat | seal req/s | OpenBao encrypt req/s | seal ÷ OpenBao | seal p99 ms "
          "| open req/s | OpenBao decrypt req/s | open ÷ OpenBao | open p99 ms "
          "| 1 MiB seal MiB/s | openssl MiB/s | ÷ openssl |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    cols = {k: [] for k in ("seal_x", "seal_p99", "open_x", "open_p99", "bulk_x")}
    errors = 0
    for n in sorted(reps):
        rep = reps[n]
        cells = [str(n)]
        for op, x, p99 in (("seal", "seal_x", "seal_p99"), ("open", "open_x", "open_p99")):
            s = rep.get(("target-sidecar", op), {})
            b = rep.get(("target-openbao", op), {})
            errors += int(float(s.get("errors", 0))) + int(float(b.get("errors", 0)))
            try:
                ratio = float(s["rps"]) / float(b["rps"])
                latency = float(s["p99_us"]) / 1000
                cols[x].append(ratio)
                cols[p99].append(latency)
                ratio_s = f"{ratio:.1f}×"
            except (KeyError, ValueError, ZeroDivisionError):
                ratio_s = "-"
            cells += [num(s.get("rps")), num(b.get("rps")), ratio_s, ms(s.get("p99_us"))]
        bulk = rep.get(("target-bulk", "seal"), {})
        ossl = rep.get(("target-openssl", "aes-256-gcm"), {})
        errors += int(float(bulk.get("errors", 0)))
        try:
            bx = float(bulk["mib_s"]) / float(ossl["mib_s"])
            cols["bulk_x"].append(bx)
            bx_s = f"{bx:.2f}"
        except (KeyError, ValueError, ZeroDivisionError):
            bx_s = "-"
        cells += [num(bulk.get("mib_s")), num(ossl.get("mib_s")), bx_s]
        print("| " + " | ".join(cells) + " |")

    def med(k, fmt):
        return fmt.format(statistics.median(cols[k])) if cols[k] else "-"
    print(f"| **median of {len(reps)}** | | | **{med('seal_x', '{:.1f}×')}** | **{med('seal_p99', '{:.2f}')}** "
          f"| | | **{med('open_x', '{:.1f}×')}** | **{med('open_p99', '{:.2f}')}** "
          f"| | | **{med('bulk_x', '{:.2f}')}** |")
    print()
    print("Targets, judged on the medians: seal and open ≥ 10× OpenBao with p99 ≤ 1 ms; 1 MiB "
          "seal ≥ 0.70 of openssl's single-core figure, with the bulk deployment's settings (1 MiB "
          "socket sends and reads, a worker per core, two connections) and the generator on the "
          f"same two cores. Errors over the target rows: {errors}.")
    print()


def main():
    rows = parse(sys.argv[1])
    by = {}
    for r in rows:
        by[(r.get("label"), r.get("op"), r.get("size"), r.get("conns"))] = r

    targets(rows)

    matrix = [r for r in rows if r.get("label") == "sidecar-unix"]
    if matrix:
        print("| op | size | conns | sidecar unix req/s | p50 ms | p99 ms | p99.9 ms | CPU µs/req "
              "| sidecar TCP req/s | OpenBao req/s | OpenBao p99 ms | OpenBao CPU µs/req "
              "| unix ÷ OpenBao | TCP ÷ OpenBao |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for u in matrix:
            key = (u["op"], u["size"], u["conns"])
            t = by.get(("sidecar-tcp",) + key, {})
            b = by.get(("openbao",) + key, {})
            try:
                ratio_u = f"{float(u['rps']) / float(b['rps']):.1f}×"
                ratio_t = f"{float(t['rps']) / float(b['rps']):.1f}×"
            except (KeyError, ValueError, ZeroDivisionError):
                ratio_u = ratio_t = "-"
            print(f"| {u['op']} | {u['size']} B | {u['conns']} | {num(u['rps'])} | {ms(u['p50_us'])} "
                  f"| {ms(u['p99_us'])} | {ms(u['p999_us'])} | {num(u.get('server_cpu_us_per_op'), '{:.1f}')} "
                  f"| {num(t.get('rps'))} | {num(b.get('rps'))} | {ms(b.get('p99_us'))} "
                  f"| {num(b.get('server_cpu_us_per_op'), '{:.1f}')} | {ratio_u} | {ratio_t} |")
        errors = sum(int(float(r.get("errors", 0))) for r in rows if r.get("label") in
                     ("sidecar-unix", "sidecar-tcp", "openbao"))
        last_u = matrix[-1].get("server_peak_rss_kib")
        last_b = [r for r in rows if r.get("label") == "openbao"]
        peak_b = last_b[-1].get("server_peak_rss_kib") if last_b else None
        print()
        print(f"Errors over all rows: {errors}. Peak RSS: kms-sidecar {num(last_u)} KiB, "
              f"OpenBao {num(peak_b)} KiB.")
        print()

    one = [r for r in rows if r.get("label") == "sidecar-unix-allcores"]
    if one:
        print("With one worker per core (`worker_threads` = the core count), sharing every core "
              "with the generator:")
        print()
        print("| op | size | conns | req/s | p50 ms | p99 ms | p99.9 ms | CPU µs/req | OpenBao req/s (same conns) | ÷ OpenBao |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in one:
            b = by.get(("openbao", r["op"], r["size"], r["conns"]), {})
            try:
                ratio = f"{float(r['rps']) / float(b['rps']):.1f}×"
            except (KeyError, ValueError, ZeroDivisionError):
                ratio = "-"
            print(f"| {r['op']} | {r['size']} B | {r['conns']} | {num(r['rps'])} | {ms(r['p50_us'])} "
                  f"| {ms(r['p99_us'])} | {ms(r['p999_us'])} | {num(r.get('server_cpu_us_per_op'), '{:.1f}')} "
                  f"| {num(b.get('rps'))} | {ratio} |")
        print()

    ossl = [r for r in rows if r.get("label") == "openssl"]
    octets = [r for r in rows if r.get("label", "").startswith("sidecar-octets")]
    if ossl and octets:
        limit = float(ossl[0]["mib_s"])
        print("| 1 MiB over the Unix socket, octet-stream | socket send buffers, workers | conns | MiB/s "
              "| p50 ms | p99 ms | server CPU µs/req | ÷ openssl 16 KiB AES-256-GCM |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        print(f"| `openssl speed -evp aes-256-gcm -bytes 16384` (one core) | | | {limit:,.0f} "
              "| | | | 1.00 |")
        for r in octets:
            bufs = ("1 MiB sends and reads, a worker per core" if r["label"].endswith("-sndbuf")
                    else "kernel default")
            print(f"| {r['op']} | {bufs} | {r['conns']} | {num(r['mib_s'])} | {ms(r['p50_us'])} "
                  f"| {ms(r['p99_us'])} | {num(r.get('server_cpu_us_per_op'), '{:.0f}')} "
                  f"| {float(r['mib_s']) / limit:.2f} |")
        print()

    for r in rows:
        if r.get("label") == "soak":
            print(f"Soak: {num(r['requests'])} requests ({num(r['rps'])}/s), {r['errors']} errors, "
                  f"p99 {ms(r['p99_us'])} ms; RSS start {num(r['rss_start_kib'])} KiB, middle "
                  f"{num(r['rss_middle_kib'])} KiB, end {num(r['rss_end_kib'])} KiB "
                  f"(end ÷ middle {r['end_over_middle']}).")
            print()
        if r.get("label") == "tenants":
            print(f"Tenants: {num(r['count'])} tenants sealed once each in {r['seconds']} s "
                  f"({r['errors']} errors); RSS {float(r['rss_after_kib']) / 1024:.1f} MiB after "
                  f"(peak {float(r['rss_peak_kib']) / 1024:.1f} MiB, "
                  f"{float(r['rss_before_kib']) / 1024:.1f} MiB before).")
            print()
        if r.get("label") == "cold_start":
            print(f"Cold start to `/readyz` 200 (keyfile root, SQLite, {r['runs']} runs): median "
                  f"{r['median_ms']} ms (min {r['min_ms']}, max {r['max_ms']}).")
            print()


if __name__ == "__main__":
    main()
