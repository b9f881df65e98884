#!/usr/bin/python3
"""Checks that the runtime stage of deploy/Dockerfile installs every shared library the
programs need: ldd of each binary -> the Debian package that owns each library (dpkg -S) -> is
that package in the runtime stage's apt-get list, a dependency of one (Depends/Pre-Depends,
recursively, as apt would install them), or part of the base image (Priority: required)?

The image exited at once with "error while loading shared libraries: libcpp-httplib.so.0.11"
because nothing checked this. Usage: check_runtime_deps.py DOCKERFILE BINARY...
Prints 'N passed, M failed'; exits 1 on any missing package.
"""
import os
import re
import subprocess
import sys


def runtime_packages(dockerfile):
    """The packages apt-get installs in the runtime stage (the stage named `runtime`)."""
    text = open(dockerfile).read().replace("\\\n", " ")
    stages = re.split(r"^FROM\s+", text, flags=re.M)
    runtime = [s for s in stages if re.match(r"\S+\s+AS\s+runtime\b", s, re.I)]
    if not runtime:
        sys.exit(f"{dockerfile}: no stage named runtime")
    pkgs = set()
    for m in re.finditer(r"apt-get install ([^&;]*)", runtime[0]):
        pkgs |= {w for w in m.group(1).split() if not w.startswith("-")}
    return pkgs


def owners(paths):
    """path -> the installed package that owns it, in one dpkg -S call (merged /usr: each path
    is asked in both spellings, through its real path)."""
    spellings = {}
    for p in paths:
        real = os.path.realpath(p)
        for s in {p, real, real.replace("/usr/lib/", "/lib/", 1), real.replace("/lib/", "/usr/lib/", 1)}:
            spellings[s] = p
    r = subprocess.run(["dpkg", "-S", *spellings], capture_output=True, text=True)
    out = {}
    for line in r.stdout.splitlines():
        pkgs, _, path = line.partition(": ")
        if path in spellings:
            out[spellings[path]] = pkgs.split(",")[0].split(":")[0].strip()
    return out


def installed():
    """Every installed package -> (depends clauses, priority)."""
    fmt = "${Package}\t${Status}\t${Priority}\t${Depends}, ${Pre-Depends}\n"
    r = subprocess.run(["dpkg-query", "-W", "-f", fmt], capture_output=True, text=True)
    pkgs = {}
    for line in r.stdout.splitlines():
        name, status, priority, deps = (line.split("\t") + ["", "", ""])[:4]
        if status.endswith(" installed"):
            pkgs[name] = (deps, priority)
    return pkgs


def closure(listed, pkgs):
    """`listed` and everything they depend on, as installed here (of alternatives, the installed
    one)."""
    seen, todo = set(), list(listed)
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        for clause in pkgs.get(p, ("", ""))[0].split(","):
            alts = [a for a in (re.sub(r"[:(].*", "", a).strip() for a in clause.split("|")) if a]
            if alts:
                todo.append(next((a for a in alts if a in pkgs), alts[0]))
    return seen


def libraries(binary):
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        m = re.match(r"\s*(\S+) => (\S+)", line)
        if m and m.group(2) != "not":
            libs.append((m.group(1), m.group(2)))
        elif "not found" in line:
            libs.append((line.split()[0], None))
    return libs


def main():
    dockerfile, binaries = sys.argv[1], sys.argv[2:]
    listed = runtime_packages(dockerfile)
    pkgs = installed()
    unknown = sorted(p for p in listed if p not in pkgs)
    provided = closure(listed, pkgs) | {p for p, (_, prio) in pkgs.items() if prio == "required"}
    needed = []  # (binary, library name, path)
    failed = []
    if unknown:
        failed.append(f"runtime packages not installed here, cannot check: {unknown}")
    for b in binaries:
        for name, path in libraries(b):
            if path is None:
                failed.append(f"{os.path.basename(b)}: {name} not found on this machine")
            elif path.startswith(("/lib", "/usr/lib")):  # else the project's own, copied in
                needed.append((os.path.basename(b), name, path))
    owner = owners({p for _, _, p in needed})
    passed = 0
    for b, name, path in needed:
        pkg = owner.get(path)
        if pkg is None:
            failed.append(f"{b}: {name} ({path}) belongs to no package")
        elif pkg in provided:
            passed += 1
        else:
            failed.append(f"{b}: {name} comes from {pkg}, which the runtime stage does not install")
    for f in failed:
        print("FAIL:", f)
    print(f"{passed} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
