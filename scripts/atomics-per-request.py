#!/usr/bin/env python3
"""Atomic read-modify-writes per request, from a callgrind profile.

On x86 a `lock`-prefixed instruction (or `xchg` with memory) costs about
20 cycles and drains the store buffer, where most instructions cost one;
instruction counts hide them (the waypoint's README, "Atomic
read-modify-writes"). callgrind counts how often each instruction ran when
run with `--dump-instr=yes`; this matches those addresses against each
object's disassembly and prints the atomic ones per request, per object
and per function.

Usage: atomics-per-request.py CALLGRIND_OUT REQUESTS [TOP]
  CALLGRIND_OUT: from `valgrind --tool=callgrind --dump-instr=yes`, zeroed
    (`callgrind_control -z`) before the load and dumped (`-d`) after it
  REQUESTS: the requests answered in between (wrk's "requests in")
Needs objdump and nm (binutils).
"""
import collections
import re
import subprocess
import sys

ATOMIC = re.compile(r"lock\b|xchg\s.*\(")


def name(token, table):
    """callgrind compresses repeated names to "(id)"; the first use spells it."""
    m = re.match(r"\((\d+)\)(?: (.*))?", token)
    if not m:
        return token
    if m.group(2) is not None:
        table[m.group(1)] = m.group(2)
    return table.get(m.group(1), token)


def executed(path):
    """(object, address) -> times run, the function of each, each function's lowest address."""
    objs, fns = {}, {}
    obj = fn = None
    addr = 0
    after_call = False
    runs, fn_of, lowest = collections.Counter(), {}, {}
    for line in open(path):
        line = line.rstrip("\n")
        if line.startswith("ob="):
            obj = name(line[3:], objs)
        elif line.startswith("cob="):
            name(line[4:], objs)
        elif line.startswith("fn="):
            fn = name(line[3:], fns)
        elif line.startswith("cfn="):
            name(line[4:], fns)
        elif line.startswith("calls="):
            after_call = True
        elif line and (line[0].isdigit() or line[0] in "+-*"):
            fields = line.split()
            a = fields[0]
            if a[0] == "+":
                addr += int(a[1:], 0)
            elif a[0] == "-":
                addr -= int(a[1:], 0)
            elif a != "*":
                addr = int(a, 16)
            # The line after `calls=` is the call's inclusive cost.
            if after_call:
                after_call = False
                continue
            if len(fields) > 2:
                runs[(obj, addr)] += int(fields[2])
                fn_of[(obj, addr)] = fn
                if (obj, fn) not in lowest or addr < lowest[(obj, fn)]:
                    lowest[(obj, fn)] = addr
    return runs, fn_of, lowest


def load_base(obj, lowest):
    """Where valgrind loaded `obj`: the offset most functions' entries agree on."""
    symbols = {}
    for flags in (["--defined-only"], ["-D", "--defined-only"]):
        out = subprocess.run(["nm", *flags, obj], capture_output=True, text=True).stdout
        for line in out.splitlines():
            f = line.split()
            if len(f) == 3:
                symbols[f[2]] = int(f[0], 16)
    votes = collections.Counter(
        a - symbols[fn] for (o, fn), a in lowest.items() if o == obj and fn in symbols
    )
    # A stripped PIE executable: valgrind's default load address.
    return votes.most_common(1)[0][0] if votes else 0x108000


def atomic_addresses(obj):
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", obj], capture_output=True, text=True).stdout
    found = set()
    for line in out.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\s+(.*)", line)
        if m and ATOMIC.match(m.group(2)):
            found.add(int(m.group(1), 16))
    return found


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    path, requests = sys.argv[1], int(sys.argv[2])
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 25
    runs, fn_of, lowest = executed(path)
    per_obj, per_fn = collections.Counter(), collections.Counter()
    for obj in sorted({o for o, _ in runs if o and o.startswith("/")}):
        base, atomic = load_base(obj, lowest), atomic_addresses(obj)
        for (o, a), n in runs.items():
            if o == obj and a - base in atomic:
                per_obj[obj] += n
                per_fn[fn_of[(o, a)]] += n
    print(f"{sum(per_obj.values()) / requests:8.1f}  atomic read-modify-writes per request")
    for obj, n in per_obj.most_common():
        print(f"{n / requests:8.1f}  {obj}")
    print()
    for fn, n in per_fn.most_common(top):
        print(f"{n / requests:8.1f}  {fn}")


if __name__ == "__main__":
    main()
