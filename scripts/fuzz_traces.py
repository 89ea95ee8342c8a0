"""Fuzz kvscope's trace reading by mutating the bytes of valid part files, for a fixed budget.

    python scripts/fuzz_traces.py --seconds 300 [--seed 1] [--save findings/]

Each execution takes one part of a small valid synthetic trace, mutates its bytes (bit flips,
interesting bytes, a deleted, duplicated or spliced chunk, truncation; the footer more often than
its share) and runs `kvscope inspect`; when inspect accepts the mutant, `sql` and `analyze` run on
it too. A finding is anything other than exit 0 or a one-line `kvscope: error:` with exit 2: an
exit 3 ("internal error"), an exception out of `main`, several error lines, an execution over
`--hang-seconds`, or the process dying (a native abort or segfault in a library: the loop runs in a
worker process that is restarted with the next seed, the mutant that killed it kept). Prints
executions, exit-code counts and findings (kind, command, first line), and exits 1 when there is a
finding.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from kvscope.cli.main import main as kvscope_main
from kvscope.trace.synth import SynthSpec, build_synthetic_trace

INTERESTING = (0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE)


def mutate(data: bytes, rng: random.Random, donor: bytes) -> bytes:
    raw = bytearray(data)
    n = len(raw)
    if n < 16:
        return bytes(raw)
    kind = rng.choice(["flip", "flip", "flip", "byte", "delete", "duplicate", "truncate", "splice", "footer"])
    if kind == "footer":  # the footer (schema, offsets, metadata) sits in the last part of the file
        lo = max(0, n - max(64, n // 8))
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(lo, n - 4)] ^= 1 << rng.randrange(8)
    elif kind == "flip":
        for _ in range(rng.randint(1, 16)):
            raw[rng.randrange(n)] ^= 1 << rng.randrange(8)
    elif kind == "byte":
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(n)] = rng.choice(INTERESTING)
    elif kind == "delete":
        start = rng.randrange(n)
        del raw[start:start + rng.randint(1, 64)]
    elif kind == "duplicate":
        start = rng.randrange(n)
        chunk = raw[start:start + rng.randint(1, 64)]
        at = rng.randrange(n)
        raw[at:at] = chunk
    elif kind == "truncate":
        del raw[rng.randrange(4, n):]
    else:  # splice a chunk of another part in
        start = rng.randrange(len(donor))
        chunk = donor[start:start + rng.randint(8, 256)]
        at = rng.randrange(n)
        raw[at:at + len(chunk)] = chunk
    return bytes(raw)


def run(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = kvscope_main(args)
        except BaseException as exc:  # noqa: BLE001 - anything out of main is a finding
            return -1, f"{type(exc).__name__}: {exc}"
    return code, err.getvalue()


def classify(code: int, err: str) -> str | None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    if code == -1:
        return "exception"
    if code == 3 or "internal error" in err:
        return "internal-error"
    if code not in (0, 2):
        return f"exit-{code}"
    if code == 2 and (len(lines) != 1 or not lines[0].startswith("kvscope: error: ")):
        return "not-one-line"
    return None


def fuzz(seconds: float, seed: int, hang_seconds: float, save: Path | None, current: Path | None = None) -> int:
    """The fuzz loop (in a worker process); `current` receives each mutant before it runs."""
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="kvscope-fuzz-"))
    try:
        base = build_synthetic_trace(work / "base", SynthSpec(num_layers=2, generations=2, steps=16))
        trace = work / "mutant"
        shutil.copytree(base, trace)
        parts = sorted(p.relative_to(trace) for p in trace.rglob("part-*.parquet"))
        originals = {p: (trace / p).read_bytes() for p in parts}
        codes: Counter[str] = Counter()
        findings: list[tuple[str, str, str, str]] = []
        executions = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            target = rng.choice(parts)
            donor = originals[rng.choice(parts)]
            mutant = mutate(originals[target], rng, donor)
            if rng.random() < 0.2:  # sometimes two mutations
                mutant = mutate(mutant, rng, donor)
            (trace / target).write_bytes(mutant)
            if current is not None:
                current.write_bytes(mutant)
                current.with_suffix(".name").write_text(str(target))
            commands = [["inspect", str(trace)]]
            for i, args in enumerate(commands):
                started = time.monotonic()
                code, err = run(args)
                executions += 1
                codes[f"{args[0]}:{code}"] += 1
                kind = classify(code, err)
                if time.monotonic() - started > hang_seconds:
                    kind = kind or "slow"
                if kind:
                    first = (err.strip().splitlines() or [""])[-1][:300]
                    findings.append((kind, args[0], str(target), first))
                    if save is not None:
                        save.mkdir(parents=True, exist_ok=True)
                        (save / f"{len(findings):04d}-{kind}-{target.name}").write_bytes(mutant)
                if i == 0 and code == 0:  # accepted: the readers behind it must cope too
                    commands += [["sql", str(trace), "SELECT count(*), sum(kv_bytes) FROM layers", "--format", "csv"],
                                 ["analyze", str(trace), "--format", "json"]]
            (trace / target).write_bytes(originals[target])
        print(f"executions: {executions} in {seconds:.0f} s (seed {seed})")
        print("exit codes: " + ", ".join(f"{k}={v}" for k, v in sorted(codes.items())))
        print(f"findings: {len(findings)}")
        for kind, command, part, line in findings[:50]:
            print(f"  {kind:15s} {command:8s} {part}: {line}")
        sys.stdout.flush()
        return 1 if findings else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def supervise(seconds: float, seed: int, hang_seconds: float, save: Path | None) -> int:
    """Run `fuzz` in worker processes for `seconds` in all; a worker that dies is a finding."""
    import subprocess

    deadline = time.monotonic() + seconds
    work = Path(tempfile.mkdtemp(prefix="kvscope-fuzz-current-"))
    current = work / "current.bin"
    total_exec, crashes, worst = 0, 0, 0
    try:
        while (left := deadline - time.monotonic()) > 5:
            cmd = [sys.executable, __file__, "--worker", "--seconds", f"{left:.1f}", "--seed", str(seed),
                   "--hang-seconds", str(hang_seconds), "--current", str(current)]
            if save is not None:
                cmd += ["--save", str(save)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            sys.stdout.write(result.stdout)
            for line in result.stdout.splitlines():
                if line.startswith("executions: "):
                    total_exec += int(line.split()[1])
            if result.returncode not in (0, 1):  # died: a native crash (the loop never got to print)
                crashes += 1
                name = current.with_suffix(".name").read_text() if current.with_suffix(".name").exists() else "?"
                reason = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1][:300]
                print(f"  native-crash    inspect  {name}: signal/exit {result.returncode}: {reason}")
                if save is not None and current.exists():
                    save.mkdir(parents=True, exist_ok=True)
                    (save / f"crash-{seed}-{Path(name).name}").write_bytes(current.read_bytes())
                seed += 1000  # go on with another sequence
            else:
                worst = max(worst, result.returncode)
        print(f"total: {total_exec} executions (worker restarts after a crash not counted), "
              f"{crashes} native crash(es)")
        return 1 if crashes or worst else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="Time budget.")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hang-seconds", type=float, default=20.0, help="An execution slower than this is a finding.")
    parser.add_argument("--save", type=Path, default=None, help="Write each finding's mutant part here.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--current", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return fuzz(args.seconds, args.seed, args.hang_seconds, args.save, args.current)
    return supervise(args.seconds, args.seed, args.hang_seconds, args.save)


if __name__ == "__main__":
    sys.exit(main())
