#!/usr/bin/env python3
"""Writes the seed corpus in fuzz/corpus/<target>/: a few small, real and hostile messages.

Run from anywhere: python3 fuzz/make_corpus.py. The files are committed; re-running rewrites
them byte for byte. Inputs the fuzzer discovers go to fuzz/runs/ (not committed).
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def name(text):
    """Uncompressed wire form of a dotted name."""
    out = b""
    for label in text.strip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\x00"


def header(id_, flags, qd=1, an=0, ns=0, ar=0):
    return struct.pack(">HHHHHH", id_, flags, qd, an, ns, ar)


def question(qname, qtype=1, qclass=1):
    return (qname if isinstance(qname, bytes) else name(qname)) + struct.pack(">HH", qtype, qclass)


def opt(size=1232, ext=0, version=0, flags=0, options=b""):
    return b"\x00" + struct.pack(">HHBBHH", 41, size, ext, version, flags, len(options)) + options


def option(code, data):
    return struct.pack(">HH", code, len(data)) + data


def rr(owner, rtype, rdata, ttl=300, rclass=1):
    owner = owner if isinstance(owner, bytes) else name(owner)
    return owner + struct.pack(">HHIH", rtype, rclass, ttl, len(rdata)) + rdata


PTR_Q = b"\xc0\x0c"  # pointer to the question name
COOKIE = option(10, bytes(range(8)))
ECS = option(8, b"\x00\x01\x18\x00\xc0\x00\x02")


def query_seeds():
    q = {}
    www = question("www.example")
    q["plain-a"] = header(0x1234, 0x0100) + www
    q["edns-cookie"] = header(0x1235, 0x0100, ar=1) + www + opt(4096, options=COOKIE)
    q["edns-do-ecs"] = header(0x1236, 0x0110, ar=1) + question("www.example", 28) + opt(
        1232, flags=0x8000, options=ECS)
    q["edns-version1"] = header(0x1237, 0x0100, ar=1) + www + opt(version=1)
    q["edns-512"] = header(0x1238, 0x0100, ar=1) + question("big.example") + opt(512)
    q["edns-4096-big"] = header(0x1239, 0x0100, ar=1) + question("BiG.example") + opt(4096)
    q["big-no-edns"] = header(0x123A, 0x0100) + question("big.example")
    q["cache-hit-mixed-case"] = header(0x123B, 0x0000) + question("WWW.Example")
    q["any"] = header(0x123C, 0x0100) + question("www.example", 255)
    q["notify-opcode"] = header(0x123D, 0x2000) + question("www.example", 6)
    q["label-64"] = header(0x123E, 0x0100) + bytes([64]) + b"a" * 64 + b"\x00\x00\x01\x00\x01"
    q["name-over-255"] = header(0x123F, 0x0100) + (bytes([63]) + b"b" * 63) * 5 + b"\x00\x00\x01\x00\x01"
    q["pointer-in-question"] = header(0x1240, 0x0100) + b"\xc0\x0c\x00\x01\x00\x01"
    q["counts-over-data"] = header(0x1241, 0x0100, an=5, ar=3) + www
    q["lone-header"] = header(0x1242, 0x0100)
    q["short"] = header(0x1243, 0x0100)[:11]
    q["qr-set"] = header(0x1244, 0x8100) + www
    q["two-opts"] = header(0x1245, 0x0100, ar=2) + www + opt() + opt()
    q["opt-in-answer"] = header(0x1246, 0x0100, an=1) + www + opt()
    q["opt-cut-option"] = header(0x1247, 0x0100, ar=1) + www + b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x06\x00\x0a\x00\x08\x01\x02"
    q["qdcount-2"] = header(0x1248, 0x0100, qd=2) + www + www
    q["qdcount-0"] = header(0x1249, 0x0100, qd=0)
    return q


def a_answer(id_=0x1234, flags=0x8180, n=1, ttl=300, extra=b"", ar=0, qname="www.example"):
    body = b"".join(rr(PTR_Q, 1, bytes([192, 0, 2, i % 256]), ttl) for i in range(n))
    return header(id_, flags, an=n, ar=ar) + question(qname) + body + extra


def chain_reply(id_, links, finals, qtype=1, compress=True, extra_ans=b"", extra_count=0, ttl=300):
    """links: names from the question name to the last target; finals: rdatas at the last."""
    msg = header(id_, 0x8180, an=len(links) - 1 + len(finals) + extra_count) + question(links[0], qtype)
    offsets = {links[0]: 12}
    for owner, target in zip(links, links[1:]):
        own = struct.pack(">H", 0xC000 | offsets[owner]) if compress and owner in offsets else name(owner)
        start = len(msg) + len(own) + 10
        msg += rr(own, 5, name(target), ttl)
        offsets.setdefault(target, start)
    last = links[-1]
    own = struct.pack(">H", 0xC000 | offsets[last]) if compress and last in offsets else name(last)
    for rd in finals:
        msg += rr(own, qtype, rd, ttl)
    return msg + extra_ans


def reply_seeds():
    r = {}
    soa = name("example") + name("ns.example") + struct.pack(">IIIII", 1, 7200, 900, 1209600, 60)
    r["a-answer"] = a_answer()
    r["a-answer-edns"] = a_answer(ar=1, extra=opt(1232))
    r["a-answer-cookie-ecs"] = a_answer(ar=1, extra=opt(1232, options=COOKIE + ECS))
    r["chain"] = chain_reply(0x1234, ["www.example", "a.cdn.net", "b.edge.net"], [b"\xc6\x33\x64\x01"])
    r["nxdomain-soa"] = header(0x1234, 0x8183, ns=1) + question("www.example") + rr("example", 6, soa, 3600)
    r["nodata-soa"] = header(0x1234, 0x8180, ns=1) + question("www.example") + rr("example", 6, soa, 30)
    r["nxdomain-no-soa"] = header(0x1234, 0x8183) + question("www.example")
    r["referral"] = header(0x1234, 0x8100, ns=1) + question("www.example") + rr("example", 2, name("ns.example"), 86400)
    r["servfail"] = header(0x1234, 0x8182) + question("www.example")
    r["truncated"] = header(0x1234, 0x8380) + question("www.example")
    r["ttl-top-bit"] = a_answer(ttl=0x80000010)
    r["ttl-huge"] = a_answer(ttl=0x7FFFFFFF)
    r["big-100"] = a_answer(n=100)
    r["badvers"] = header(0x1234, 0x8180, ar=1) + question("www.example") + opt(1232, ext=1)
    r["opt-not-last-cookie"] = header(0x1234, 0x8180, an=1, ar=2) + question("www.example") + rr(PTR_Q, 1, b"\xc0\x00\x02\x01") + opt(options=COOKIE) + rr(PTR_Q, 16, b"\x02hi")
    r["two-opts-cookie"] = header(0x1234, 0x8180, an=1, ar=2) + question("www.example") + rr(PTR_Q, 1, b"\xc0\x00\x02\x01") + opt() + opt(options=COOKIE)
    r["pointer-loop"] = header(0x1234, 0x8180, an=1) + question("www.example") + b"\xc0\x1d" + b"\xc0\x1b" + struct.pack(">HHIH", 1, 1, 300, 4) + b"\x01\x02\x03\x04"
    r["label-64"] = header(0x1234, 0x8180, an=1) + question("www.example") + bytes([64]) + b"a" * 64 + b"\x00" + struct.pack(">HHIH", 1, 1, 300, 4) + b"\x01\x02\x03\x04"
    r["counts-over-data"] = header(0x1234, 0x8180, an=9, ns=9, ar=9) + question("www.example") + rr(PTR_Q, 1, b"\x01\x02\x03\x04")
    r["lone-header"] = header(0x1234, 0x8180, qd=0)
    r["wrong-id"] = a_answer(id_=0x4321)
    r["mixed-case-question"] = a_answer(qname="wWw.ExaMPLE")
    r["rdlen-over-data"] = header(0x1234, 0x8180, an=1) + question("www.example") + PTR_Q + struct.pack(">HHIH", 1, 1, 300, 400) + b"\x01\x02"
    return r


def flatten_seeds():
    f = {}
    v4 = [bytes([198, 51, 100, i]) for i in range(1, 4)]
    v6 = [bytes([0x20, 0x01, 0x0d, 0xb8] + [0] * 11 + [i]) for i in range(1, 3)]
    f["chain-1-hop"] = chain_reply(1, ["www.example", "www.cdn.net"], v4[:2])
    f["chain-3-hops"] = chain_reply(2, ["www.example", "a.cdn.net", "b.edge.net", "c.edge.net"], v4)
    f["chain-aaaa"] = chain_reply(3, ["www.example", "v6.cdn.net"], v6, qtype=28)
    f["chain-uncompressed"] = chain_reply(4, ["www.example", "a.cdn.net", "b.cdn.net"], v4[:1], compress=False)
    f["chain-mixed-case"] = chain_reply(5, ["WwW.ExAmple", "A.Cdn.NET"], v4[:1])
    f["chain-loop"] = chain_reply(6, ["www.example", "a.cdn.net", "www.example"], [])
    f["chain-12-hops"] = chain_reply(7, ["www.example"] + [f"h{i}.cdn.net" for i in range(12)], v4[:1])
    f["chain-11-hops"] = chain_reply(8, ["www.example"] + [f"h{i}.cdn.net" for i in range(11)], v4[:1])
    f["chain-partial"] = chain_reply(9, ["www.example", "a.cdn.net"], [])
    f["chain-top-bit-ttl"] = chain_reply(10, ["www.example", "a.cdn.net"], v4[:1], ttl=0x80000005)
    f["cname-beside-a"] = chain_reply(11, ["www.example", "a.cdn.net"], v4[:1], extra_ans=rr(PTR_Q, 1, b"\x0a\x00\x00\x01"), extra_count=1)
    f["unrelated-records"] = chain_reply(12, ["www.example", "a.cdn.net"], v4[:1], extra_ans=rr("evil.example", 1, b"\x0a\x00\x00\x02") + rr("a.cdn.net", 28, v6[0]), extra_count=2)
    # Final records before the CNAME (order in the answer section does not matter).
    body = rr("a.cdn.net", 1, v4[0], 60) + rr(PTR_Q, 5, name("a.cdn.net"), 600)
    f["reversed-order"] = header(13, 0x8180, an=2) + question("www.example") + body
    # CNAME rdata is a pointer to itself.
    own = header(14, 0x8180, an=1) + question("www.example") + PTR_Q + struct.pack(">HHIH", 5, 1, 300, 2)
    f["pointer-loop-in-target"] = own + struct.pack(">H", 0xC000 | len(own))
    own = header(15, 0x8180, an=1) + question("www.example") + PTR_Q + struct.pack(">HHIH", 5, 1, 300, 2)
    f["forward-pointer"] = own + struct.pack(">H", 0xC000 | (len(own) + 2)) + name("a.net")
    f["label-64-target"] = header(16, 0x8180, an=1) + question("www.example") + rr(PTR_Q, 5, bytes([64]) + b"a" * 64 + b"\x00")
    f["counts-over-data"] = chain_reply(17, ["www.example", "a.cdn.net"], v4[:1])[:-6]
    f["two-cnames"] = chain_reply(18, ["www.example", "a.cdn.net"], v4[:1], extra_ans=rr(PTR_Q, 5, name("b.cdn.net")), extra_count=1)
    f["cname-class-ch"] = header(19, 0x8180, an=2) + question("www.example") + rr(PTR_Q, 5, name("a.net"), rclass=3) + rr("a.net", 1, v4[0])
    return f


def write(target, seeds):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for k, v in seeds.items():
        with open(os.path.join(d, k), "wb") as fh:
            fh.write(v)


if __name__ == "__main__":
    write("query", query_seeds())
    write("reply", reply_seeds())
    write("flatten", flatten_seeds())
