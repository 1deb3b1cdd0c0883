#!/usr/bin/env python3
"""Runs every own C++ file of a configured build tree through its compiler with
-fsyntax-only (front-end checks only: warnings such as clang's -Wthread-safety,
with the tree's -Werror), two files at a time, at low priority. Prints each
file's diagnostics; exit status 1 if any file fails. Files of tests/ and bench/
are checked only when they take locks themselves (they mention a Mutex or a
thread-safety annotation): the others are heavy to parse (LibTorch, gRPC) and
have nothing for the analysis, and the headers they include are checked with
the server's own files.

    scripts/syntax_check.py BUILD/compile_commands.json
"""
import concurrent.futures
import json
import os
import re
import shlex
import subprocess
import sys
import time


def syntax_only(entry):
    args = entry["arguments"] if "arguments" in entry else shlex.split(entry["command"])
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "-o":
            skip = True
        elif a != "-c":
            out.append(a)
    return ["nice", "-n", "19"] + out + ["-fsyntax-only"]


LOCKING = re.compile(r"Mutex|GUARDED_BY|LOCKS_REQUIRED|LOCKS_EXCLUDED|SCOPED_LOCKABLE")


def takes_locks_or_is_product(entry):
    path = os.path.abspath(os.path.join(entry["directory"], entry["file"]))
    parts = os.path.relpath(path, os.getcwd()).split(os.sep)
    if parts[0] not in ("tests", "bench"):
        return True
    with open(path, encoding="utf-8", errors="replace") as f:
        return LOCKING.search(f.read()) is not None


def main():
    db_path = sys.argv[1]
    build = os.path.dirname(os.path.abspath(db_path))
    entries = [e for e in json.load(open(db_path))
               if not os.path.abspath(e["file"]).startswith(build + os.sep)  # generated code
               and takes_locks_or_is_product(e)]
    start = time.time()

    def check(e):
        r = subprocess.run(syntax_only(e), cwd=e["directory"], capture_output=True, text=True)
        return e["file"], r.returncode, r.stderr

    bad = 0
    jobs = int(os.environ.get("SYNTAX_CHECK_JOBS", os.cpu_count() or 2))
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for f, rc, err in pool.map(check, entries):
            if err:
                sys.stderr.write(err)
            bad += rc != 0
    print(f"syntax-check: {len(entries)} files, {bad} failed, {time.time() - start:.0f}s",
          file=sys.stderr)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
