"""The headline figures of each benchmark's JSON, for perf/report.py: ours, the reference and
the ratio.

A script that prints `"headline": [{"what", "ours", "reference", "ratio"}]` is shown as it says;
otherwise one reader per benchmark takes the fields the script prints.  A reader that does not
find its fields (a rewritten script) gives one row saying so instead of failing the page.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Row:
    what: str
    ours: str
    reference: str
    ratio: float | None         # ours / reference (for costs, reference / ours: above 1 is ours)
    ratio_text: str = ""        # instead of the ratio, e.g. "generator-capped"


def _k(pps: float) -> str:
    return f"{pps / 1e3:.1f} kpps"


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _med(x: Any) -> float | None:
    """A figure given plain or as a spread ({median, min, max})."""
    x = x.get("median") if isinstance(x, dict) else x
    return float(x) if isinstance(x, int | float) else None


def _rx_section(sec: str, s: dict) -> list[Row]:
    """rx_vs_testpmd.py's section: zero-loss rates (spreads) and cycles at fixed rates."""
    z = s["zero_loss"]
    tp, dp = _med(z["testpmd"]), _med(z["dataplane"])
    out = [Row(f"{sec}: zero-loss rate, dataplane vs testpmd rxonly", f"{dp / 1e6:.2f} Mpps",
               f"{tp / 1e6:.2f} Mpps", z.get("ratio"),
               "" if z.get("ratio") is not None else "testpmd generator-capped")]
    for k, row in s.get("cycles", {}).items():
        t = _med(row["testpmd"]["path_cycles_per_pkt"])
        w = _med(row["dataplane"]["worker_cycles_per_pkt"])
        path = _med(row["dataplane"]["path_cycles_per_pkt"])
        if t and w and path:
            at = "the maximum" if k == "max" else f"{k} Mpps"
            out.append(Row(f"{sec}: cycles per packet at {at}, worker / whole path vs testpmd "
                           "(lower is better)", f"{w:.0f} / {path:.0f}", f"{t:.0f}",
                           t / path))
    return out


def rx(r: dict) -> list[Row]:
    out = []
    for sec in ("memif", "af_xdp_veth", "pci"):
        s = r.get(sec)
        if not isinstance(s, dict):
            continue
        if "zero_loss" in s:
            out += _rx_section(sec, s)
            continue
        ours, ref = s["dataplane_mpps"], s["testpmd_mpps"]     # the script before issue 13
        out.append(Row(f"{sec}: rate, dataplane vs testpmd rxonly", f"{ours:.2f} Mpps",
                       f"{ref:.2f} Mpps", _div(ours, ref)))
        cyc, tcyc = s.get("dataplane_cycles_per_pkt"), s.get("testpmd_cycles_per_pkt")
        if cyc is not None and tcyc is not None:
            out.append(Row(f"{sec}: cycles per packet (lower is better)", f"{cyc:.0f}",
                           f"{tcyc:.0f}", _div(tcyc, cyc)))
    return out


def ceiling(r: dict) -> list[Row]:
    return [Row(f"descriptors/s, batch {x.get('batch') or 'all ready'}: Python vs C",
                f"{x['python_mdesc_s']:.1f} M/s", f"{x['c_mdesc_s']:.1f} M/s",
                _div(x["python_mdesc_s"], x["c_mdesc_s"])) for x in r["runs"]]


def _zero_loss(r: dict, ours_key: str, ref_key: str, what: str, ratio_key: str) -> Row:
    med = r["median_pps"]
    return Row(what, _k(med[ours_key]), _k(med[ref_key]), r.get(ratio_key),
               "generator-capped" if r.get("generator_capped") else "")


def consumers(r: dict) -> list[Row]:
    return [_zero_loss(r, "all", "base", "zero-loss rate, + capture + flow export vs "
                       "built-in consumers", "ratio_all_to_base")]


def exporter(r: dict) -> list[Row]:
    s = r["scrape"]
    rows = [_zero_loss(r, "scrape", "base", f"zero-loss rate, {r['hz']:g} Hz scrapes vs none "
                       f"({r['workers']} workers)", "ratio_scrape_to_base"),
            Row(f"scrape time ({s['count']} scrapes of {s['bytes']} bytes): median / p99",
                f"{s['median_ms']} / {s['p99_ms']} ms", "", None, "-")]
    spread, per_round = r.get("spread_pps"), r.get("ratio_per_round")
    if spread and per_round:    # results from before the alternating rounds have neither
        rows.append(Row("zero-loss rate over the rounds, min-max: scrapes / none",
                        f"{_k(spread['scrape']['min'])}-{_k(spread['scrape']['max'])}",
                        f"{_k(spread['base']['min'])}-{_k(spread['base']['max'])}", None,
                        "per round " + ", ".join(f"{x:.2f}" for x in per_round)))
    return rows


def ingest(r: dict) -> list[Row]:
    s = r["summary"]
    ref = max((n for n in ("recvmmsg", "tpacket_v3") if n in s), key=lambda n: s[n]["pps"])
    u = s["uring"]
    return [Row(f"pps, io_uring vs the better of recvmmsg and TPACKET_V3 ({ref})",
                _k(u["pps"]), _k(s[ref]["pps"]), _div(u["pps"], s[ref]["pps"])),
            Row(f"CPU per packet, io_uring vs {ref} (lower is better)",
                f"{u['cpu_ns_per_pkt']:.0f} ns", f"{s[ref]['cpu_ns_per_pkt']:.0f} ns",
                _div(s[ref]["cpu_ns_per_pkt"], u["cpu_ns_per_pkt"]))]


def transport(r: dict) -> list[Row]:
    out = []
    for size in ("64KB", "4KB"):
        row = r.get(size)
        if not isinstance(row, dict) or "iperf3" not in row:
            continue
        mode = max((m for m in row if m != "iperf3" and "gbps" in row[m]),
                   key=lambda m: row[m]["gbps"])
        out.append(Row(f"{size} batches: best mode ({mode}) vs iperf3",
                       f"{row[mode]['gbps']:.3f} GB/s", f"{row['iperf3']['gbps']:.3f} GB/s",
                       _div(row[mode]["gbps"], row["iperf3"]["gbps"])))
    return out


def mr_cache(r: dict) -> list[Row]:
    res = r["results"]
    order = sorted((k for k in res if isinstance(res[k], dict) and "cache_hit" in res[k]),
                   key=lambda k: (k != "1MB", res[k]["bytes"]))
    return [Row(f"{k}: cache hit vs fresh reg + dereg (cost, lower is better)",
                f"{res[k]['cache_hit']['median_us']:.2f} us",
                f"{res[k]['fresh_reg_dereg']['median_us']:.1f} us",
                _div(res[k]["fresh_reg_dereg"]["median_us"], res[k]["cache_hit"]["median_us"]))
            for k in order] + _floor_row(res)


def _floor_row(res: dict) -> list[Row]:
    """The 1 MB hit against the cheapest Python call (what emulation makes any hit cost)."""
    floor = res.get("python_call_floor")
    if not floor or "1MB" not in res:
        return []
    return [Row("1MB: cache hit vs one Python method call with a dict lookup (the floor)",
                f"{res['1MB']['cache_hit']['median_us']:.2f} us", f"{floor['median_us']:.2f} us",
                _div(floor["median_us"], res["1MB"]["cache_hit"]["median_us"]))]


def rdma(r: dict) -> list[Row]:
    res = r["results"]
    return [Row(f"{k} messages: ours vs ib_write_bw", f"{v['ours_bytes_per_s'] / 1e6:.1f} MB/s",
                f"{v['ib_write_bw_bytes_per_s'] / 1e6:.1f} MB/s", v["ratio"])
            for k, v in sorted(res.items(), key=lambda kv: -kv[1]["message_bytes"])]


READERS: dict[str, Callable[[dict], list[Row]]] = {
    "rx": rx, "ceiling": ceiling, "consumers": consumers, "exporter": exporter,
    "ingest": ingest, "transport": transport, "mr_cache": mr_cache, "rdma": rdma}


def _text(x: Any) -> str:
    return x if isinstance(x, str) else f"{x:g}" if isinstance(x, int | float) else str(x)


def rows_for(name: str, result: dict) -> list[Row]:
    """The rows of one benchmark's table, the headline first."""
    if isinstance(result.get("headline"), list):
        return [Row(str(h.get("what", "")), _text(h.get("ours", "")),
                    _text(h.get("reference", "")), h.get("ratio")
                    if isinstance(h.get("ratio"), int | float) else None,
                    "" if isinstance(h.get("ratio"), int | float) else _text(h.get("ratio", "")))
                for h in result["headline"]]
    try:
        rows = READERS[name](result)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return [Row(f"figures not recognised ({type(e).__name__}: {e}): see the stored JSON",
                    "", "", None, "-")]
    return rows or [Row("no figures in the stored JSON", "", "", None, "-")]
