"""Chaos soak: OpenClaw-shaped sessions against a keeper-supervised sidecar while faults hit it, then a replay.

`python -m bench.chaos --json [--minutes 2 --sessions 8 --seed 0]` installs a generated tiny model in a
temporary root (`install-sidecar-only`, `start-sidecar --supervisor process`, as a user would), and for
`--minutes` drives `--sessions` concurrent clients, each a run of OpenClaw-shaped conversations (a
shared system prompt; every request ends with an internal-context message that the next request
drops; hidden memory `attention_state` on some turns), greedy (temperature 0). Meanwhile a fault loop
injects, at seeded random intervals:

- `kill9`: SIGKILL to the sidecar (`serve`), which its keeper starts again;
- `sigterm`: a stray SIGTERM to the sidecar, which its keeper starts again too;
- `read_only_state_dir`: the state dir and its folders made read-only (chmod), then restored;
- `full_disk_budget`: `start-sidecar --max-disk-bytes <tiny>` (a restart with a disk cache that holds
  nothing), then the budget restored the same way.

A client whose request fails waits until /health answers again (a deadline) and sends the same turn
again. At the end the sidecar is stopped with `stop-sidecar`, its state dir is checked for leftovers
(temporary files, chunks no manifest names, halves of a prefix record), and every conversation is
replayed turn by turn on a fresh fault-free sidecar of the same model: each answer must be equal, and
each δ-state equal within STATE_TOLERANCE (per layer, the norm and the largest magnitude from `GET
/v1/session`; the sha256 says whether it is bit for bit). A state rebuilt by a replay's chunked scan
is not bit for bit the one that token-by-token decoding wrote (≈ 1e-8 apart, measured); hidden
memory written at another place than a fault-free run writes it is ≈ 5e-6 apart (issue 22, F1). The
sidecar's RSS is sampled all along. Prints one JSON object; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from common.health import base_url, probe_health
from common.ports import free_port
from common.settings import SidecarSettings, load_settings
from installer.sidecar_client import Message, SidecarClient, SidecarError
from supervisors.process import ProcessSupervisor, live_children

MODEL_ID = "delta-mem-chaos"
FAULT_KINDS = ("kill9", "sigterm", "read_only_state_dir", "full_disk_budget")
RESTARTING_FAULTS = frozenset({"kill9", "sigterm", "full_disk_budget"})
# A disk cache this small holds no chunk at all: every write is refused or evicted at once.
TINY_DISK_BYTES = 4096
HEALTH_POLL_S = 0.2
MAX_ATTEMPTS = 6
CLI_TIMEOUT_S = 600.0
MB = 1024 * 1024
# How much higher the later sidecar processes may peak than the first ones and still count as flat.
RSS_SLACK = 0.10
# Two δ-states "agree" when each layer's norm and largest magnitude are this close (relative).
STATE_TOLERANCE = 1e-6
_WORDS = (
    "agent tool memory session file workspace policy channel message reply search config user context note "
    "plan task result error retry limit budget token model provider gateway plugin skill"
).split()


@dataclass(frozen=True)
class ChaosPlan:
    """How long, how many clients, how often faults come, and what each turn looks like."""

    minutes: float = 2.0
    sessions: int = 8
    turns_per_conversation: int = 12
    memory_every: int = 3
    max_tokens: int = 8
    system_words: int = 120
    fault_gap_s: tuple[float, float] = (4.0, 12.0)
    read_only_s: float = 3.0
    full_disk_s: float = 6.0
    health_deadline_s: float = 300.0
    rss_every_s: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Turn:
    """One completed turn: what was sent, what came back, the δ-state after it, and what it went through."""

    key: str
    index: int
    messages: tuple[Message, ...]
    attention_state: list[Any] | None
    answer: str
    state: list[dict[str, Any]]  # per layer: sha256, norm, max_abs
    attempts: int
    failures: tuple[str, ...]  # why the attempts before the last one failed
    restart_before: str | None  # the fault that last restarted the sidecar since this session's previous turn


@dataclass
class Tally:
    """What the clients and the fault loop counted (shared between threads, under `lock`)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    turns: list[Turn] = field(default_factory=list)
    conversations: int = 0
    retries: int = 0
    http_5xx: int = 0
    stream_errors: list[str] = field(default_factory=list)
    client_errors: list[str] = field(default_factory=list)
    abandoned_turns: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    restarts: int = 0  # faults that restarted the sidecar, so far
    last_restart: str | None = None  # the kind of the latest of them
    read_only: str | None = None  # how the state dir was made read-only, and whether writes were refused
    rss: list[tuple[float, int, int]] = field(default_factory=list)  # (seconds, pid, RSS bytes)


# --------------------------------------------------------------------------- a root, as a user makes it


def log(message: str) -> None:
    """A progress line on stderr (stdout carries the report)."""
    print(f"{time.strftime('%H:%M:%S')} chaos: {message}", file=sys.stderr, flush=True)


def cli(*args: str) -> str:
    """Run `delta-mem-mlx ARGS` in its own process (as a user would); its output, or RuntimeError."""
    done = subprocess.run(
        [sys.executable, "-m", "installer", *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"delta-mem-mlx {' '.join(args)} failed ({done.returncode}): {done.stdout}{done.stderr}")
    return done.stdout


@contextmanager
def installed_sidecars(roots: list[Path], model_dir: Path, adapter_dir: Path) -> Iterator[list[SidecarSettings]]:
    """Roots installed for the tiny model under the process keeper and started, side by side (their loads
    overlap); stopped and unregistered afterwards."""

    def install_and_start(root: Path) -> SidecarSettings:
        cli(
            "install-sidecar-only", "--root", str(root), "--preset", "custom", "--model-path", str(model_dir),
            "--adapter-path", str(adapter_dir), "--model-id", MODEL_ID, "--min-memory-gb", "1",
            "--port", str(free_port()), "--supervisor", "process", "--yes",
        )  # fmt: skip
        cli("start-sidecar", "--root", str(root))
        return load_settings(root)

    try:
        with ThreadPoolExecutor(len(roots)) as pool:
            yield list(pool.map(install_and_start, roots))
    finally:
        for root in roots:
            ProcessSupervisor(root).uninstall()


def client_for(settings: SidecarSettings) -> SidecarClient:
    """A client of this root's sidecar."""
    return SidecarClient(base_url(settings), settings.api_key, settings.model_id)


def serve_pid(root: Path) -> int | None:
    """The pid of the root's running `serve` (the keeper's live child), or None."""
    keeper = ProcessSupervisor(root).running_process()
    if keeper is None:
        return None
    live = live_children(keeper)
    return live[0].pid if live else None


def wait_healthy(root: Path, settings: SidecarSettings, deadline_s: float, not_pid: int | None = None) -> int:
    """Poll until a `serve` other than `not_pid` runs for the root and /health says ready; its pid."""
    deadline = time.monotonic() + deadline_s
    while True:
        pid = serve_pid(root)
        if pid is not None and pid != not_pid and probe_health(settings, timeout=5).ready:
            return pid
        if time.monotonic() > deadline:
            status = ProcessSupervisor(root).status()
            raise RuntimeError(f"the sidecar was not healthy again within {deadline_s:.0f} s ({status.detail})")
        time.sleep(HEALTH_POLL_S)


# --------------------------------------------------------------------------- the clients


class Clients:
    """The session clients: each runs conversations turn after turn until the time is up."""

    def __init__(self, plan: ChaosPlan, root: Path, settings: SidecarSettings, tally: Tally) -> None:
        self.plan = plan
        self.root = root
        self.settings = settings
        self.client = client_for(settings)
        self.tally = tally
        self.ready = threading.Event()  # cleared by the fault loop while the sidecar restarts
        self.ready.set()
        self.stop = threading.Event()
        self.system = Message("system", system_prompt(plan))

    def run(self, number: int) -> None:
        """Client `number`: conversations `chaos-<number>-<n>` until `stop`."""
        rng = random.Random(f"{self.plan.seed}:{number}")
        conversation = 0
        while not self.stop.is_set():
            key = f"chaos-{number}-{conversation}"
            with self.tally.lock:
                self.tally.conversations += 1
            self._converse(key, rng)
            conversation += 1

    def _converse(self, key: str, rng: random.Random) -> None:
        history = [self.system]
        restarts_seen = self.tally.restarts
        for index in range(self.plan.turns_per_conversation):
            if self.stop.is_set():
                return
            ask = Message("user", f"[{key}.{index}] " + " ".join(rng.choice(_WORDS) for _ in range(10)))
            context = Message("user", f"(internal context {index}: {rng.choice(_WORDS)} {rng.choice(_WORDS)})")
            memory = hidden_memory(key, index) if index % self.plan.memory_every == 0 else None
            messages = (*history, ask, context)
            done = self._with_retries(key, lambda: self._turn(key, messages, memory))
            if done is None:
                return
            (answer, states), failures = done
            restarts_now, last_restart = self.tally.restarts, self.tally.last_restart
            turn = Turn(
                key, index, messages, memory, answer, states, len(failures) + 1, failures,
                last_restart if restarts_now != restarts_seen else None,
            )  # fmt: skip
            restarts_seen = restarts_now
            with self.tally.lock:
                self.tally.turns.append(turn)
            # OpenClaw's next request drops the internal-context message and adds the answer.
            history += [ask, Message("assistant", answer)]

    def _turn(
        self, key: str, messages: tuple[Message, ...], memory: list[Any] | None
    ) -> tuple[str, list[dict[str, Any]]]:
        reply = self.client.chat(
            messages, key, delta=True, max_tokens=self.plan.max_tokens, seed=0, attention_state=memory
        )
        if reply.finish_reason is None:
            raise SidecarError("the answer stream had no finish_reason")
        return reply.text, state_digest(self.client, key)

    def _with_retries(self, key: str, attempt: Any) -> tuple[Any, tuple[str, ...]] | None:
        """`attempt()` until it works, waiting for a healthy sidecar between tries: its result and why the
        earlier tries failed; None: given up."""
        failures: list[str] = []
        for _ in range(MAX_ATTEMPTS):
            if not self.ready.wait(self.plan.health_deadline_s):
                break
            try:
                return attempt(), tuple(failures)
            except SidecarError as exc:
                failures.append(str(exc)[:160])
                if not self._count_failure(key, exc):
                    return None
            with self.tally.lock:
                self.tally.retries += 1
            try:
                wait_healthy(self.root, self.settings, self.plan.health_deadline_s)
            except RuntimeError as exc:
                self._note(self.tally.client_errors, f"{key}: {exc}")
                break
        with self.tally.lock:
            self.tally.abandoned_turns += 1
        return None

    def _count_failure(self, key: str, exc: SidecarError) -> bool:
        """Count a failed request; True when it is worth sending again (no answer, 5xx, a broken stream)."""
        status = exc.http_status
        if status is not None and status >= 500:
            with self.tally.lock:
                self.tally.http_5xx += 1
            self._note(self.tally.client_errors, f"{key}: {exc}")
            return True
        if status is not None:
            self._note(self.tally.client_errors, f"{key}: {exc}")
            return False
        if "failed while answering" in str(exc):
            self._note(self.tally.stream_errors, f"{key}: {exc}")
        return True

    def _note(self, where: list[str], line: str) -> None:
        with self.tally.lock:
            where.append(f"{time.strftime('%H:%M:%S')} {line}")


def system_prompt(plan: ChaosPlan) -> str:
    """The system prompt every conversation shares (so the shared prefix cache is in play)."""
    rng = random.Random(plan.seed)
    return "You are a careful agent. " + " ".join(rng.choice(_WORDS) for _ in range(plan.system_words))


def hidden_memory(key: str, index: int) -> list[Any]:
    """The `attention_state` of a turn that carries memory (an object and a plain string)."""
    return [{"text": f"{key} learned fact {index}.", "source": "chaos"}, f"Turn {index} note."]


def state_digest(client: SidecarClient, key: str) -> list[dict[str, Any]]:
    """Per layer, the sha256, norm and largest magnitude of a session's δ-state, from `GET /v1/session`."""
    layers = client.session_stats(key)["delta"]["delta_state"]
    return [{name: layer[name] for name in ("sha256", "norm", "max_abs")} for layer in layers]


def states_match(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Two sessions' δ-states agree: layer by layer bit for bit, or their norms and largest magnitudes
    within STATE_TOLERANCE (relative)."""
    return len(a) == len(b) and all(
        x["sha256"] == y["sha256"]
        or all(abs(x[n] - y[n]) <= STATE_TOLERANCE * max(abs(x[n]), abs(y[n]), 1e-12) for n in ("norm", "max_abs"))
        for x, y in zip(a, b)
    )


# --------------------------------------------------------------------------- the faults


class Faults:
    """The fault loop: one seeded random fault after another until the time is up."""

    def __init__(self, plan: ChaosPlan, root: Path, settings: SidecarSettings, clients: Clients, tally: Tally):
        self.plan = plan
        self.root = root
        self.settings = settings
        self.clients = clients
        self.tally = tally
        self.rng = random.Random(f"{plan.seed}:faults")
        self.errors: list[str] = []
        self._next: list[str] = []

    def run(self, until: float) -> None:
        """Inject faults until `until` (monotonic), each after a random gap."""
        while True:
            gap = self.rng.uniform(*self.plan.fault_gap_s)
            if time.monotonic() + gap >= until or self.clients.stop.wait(gap):
                return
            kind = self._next_kind()
            try:
                self.inject(kind)
            except (RuntimeError, OSError) as exc:
                self.errors.append(f"{kind}: {exc}")
                return

    def _next_kind(self) -> str:
        """Kinds come in shuffled rounds of all four: a short run sees each, and no more than four signals
        come in a row (five quick exits in a row would make the keeper give up, as it should)."""
        if not self._next:
            self._next = self.rng.sample(FAULT_KINDS, len(FAULT_KINDS))
        return self._next.pop()

    def inject(self, kind: str) -> None:
        """One fault of this kind, waited out until the sidecar is healthy again."""
        with self.tally.lock:
            self.tally.faults[kind] += 1
        log(f"fault: {kind}")
        if kind == "read_only_state_dir":
            self._read_only()
            return
        self.clients.ready.clear()
        try:
            if kind == "full_disk_budget":
                budget = load_settings(self.root).max_disk_bytes
                cli("start-sidecar", "--root", str(self.root), "--max-disk-bytes", str(TINY_DISK_BYTES))
                self._note_restart(kind)
                self.clients.ready.set()
                time.sleep(self.plan.full_disk_s)  # the sidecar serves with a full disk cache meanwhile
                self.clients.ready.clear()
                cli("start-sidecar", "--root", str(self.root), "--max-disk-bytes", str(budget))
            else:
                pid = serve_pid(self.root)
                if pid is None:
                    raise RuntimeError(f"no sidecar to signal: {ProcessSupervisor(self.root).status().detail}")
                os.kill(pid, signal.SIGKILL if kind == "kill9" else signal.SIGTERM)
                wait_healthy(self.root, self.settings, self.plan.health_deadline_s, not_pid=pid)
            self._note_restart(kind)
        finally:
            self.clients.ready.set()

    def _note_restart(self, kind: str) -> None:
        with self.tally.lock:
            self.tally.restarts += 1
            self.tally.last_restart = kind

    def _read_only(self) -> None:
        state_dir = Path(self.settings.state_dir or "")
        with read_only(state_dir) as method:
            enforced = _writes_refused(state_dir)
            with self.tally.lock:
                self.tally.read_only = f"{method} ({'writes refused' if enforced else 'writes NOT refused'})"
            time.sleep(self.plan.read_only_s)  # the sidecar serves with a read-only state dir meanwhile


@contextmanager
def read_only(folder: Path) -> Iterator[str]:
    """Make `folder` read-only for the sidecar, then restore it; yields how.

    chmod does not stop root, so as root the folder gets a read-only bind mount over itself
    (writes fail with EROFS, as on a read-only volume) when mounting is allowed; else chmod."""
    if os.geteuid() == 0 and _mount("--bind", str(folder), str(folder)):
        try:
            if _mount("-o", "remount,bind,ro", str(folder)):
                yield "read-only bind mount"
                return
        finally:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)
    folders = [folder, *(p for p in folder.rglob("*") if p.is_dir())]
    modes = {f: stat.S_IMODE(f.stat().st_mode) for f in folders}
    try:
        for f in folders:
            f.chmod(0o500)
        yield "chmod 0500"
    finally:
        for f, mode in modes.items():
            if f.exists():
                f.chmod(mode)


def _mount(*args: str) -> bool:
    """`mount ARGS` (an argument list, no shell); True when it worked."""
    try:
        return subprocess.run(["mount", *args], capture_output=True, check=False, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _writes_refused(folder: Path) -> bool:
    """True when this process cannot create a file in `folder`."""
    probe = folder / f".chaos-probe-{os.getpid()}"
    try:
        probe.touch()
    except OSError:
        return True
    probe.unlink()
    return False


# --------------------------------------------------------------------------- measures


def sample_rss(root: Path, tally: Tally, stop: threading.Event, every_s: float, started: float) -> None:
    """Sample the running sidecar's RSS every `every_s` seconds until `stop`."""
    while not stop.wait(every_s):
        pid = serve_pid(root)
        try:
            rss = psutil.Process(pid).memory_info().rss if pid else None
        except psutil.NoSuchProcess:
            rss = None
        if pid and rss:
            with tally.lock:
                tally.rss.append((round(time.monotonic() - started, 1), pid, rss))


def rss_report(samples: list[tuple[float, int, int]]) -> dict[str, Any]:
    """RSS over time (MB, per sample) and each sidecar process's peak: each restart warms up again, so
    RSS is flat when the later processes peak no higher than the first ones (within RSS_SLACK)."""
    peaks: dict[int, int] = {}
    for _, pid, rss in samples:
        peaks[pid] = max(rss, peaks.get(pid, 0))
    ordered = [round(peak / MB, 1) for peak in peaks.values()]  # dicts keep the order processes came in
    half = max(1, len(ordered) // 2)
    early, late = ordered[:half], ordered[half:] or ordered[:half]
    return {
        "samples": [[t, pid, round(rss / MB, 1)] for t, pid, rss in samples],
        "peak_per_process_mb": ordered,
        "early_processes_peak_mb": max(early, default=0.0),
        "late_processes_peak_mb": max(late, default=0.0),
        "flat": bool(ordered) and max(late) <= max(early) * (1 + RSS_SLACK),
    }


def leftover_files(state_dir: Path) -> list[str]:
    """What a clean stop should not leave: temporary files, chunks no manifest names, half prefix records."""
    if not state_dir.exists():
        return []
    found = [str(p.relative_to(state_dir)) for p in state_dir.rglob("*") if p.is_file() and _temporary(p.name)]
    sessions = state_dir / "kv" / "sessions"
    for folder in sorted(sessions.iterdir()) if sessions.is_dir() else []:
        named = _named_chunks(folder / "manifest.json")
        for chunk in folder.glob("*.safetensors"):
            if named is None or chunk.name not in named:
                found.append(str(chunk.relative_to(state_dir)))
    prefixes = state_dir / "kv" / "prefixes"
    if prefixes.is_dir():
        stems = {p.stem for p in prefixes.iterdir() if not _temporary(p.name)}
        for stem in sorted(stems):
            if not (prefixes / f"{stem}.json").exists() or not (prefixes / f"{stem}.safetensors").exists():
                found.append(f"kv/prefixes/{stem}.* (half a record)")
    return sorted(found)


def _temporary(name: str) -> bool:
    return name.startswith(".") or name.endswith(".tmp")


def _named_chunks(manifest: Path) -> set[str] | None:
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    return {c["file"] for c in data.get("chunks", []) if c.get("file")}


# --------------------------------------------------------------------------- the replay


def replay(client: SidecarClient, turns: list[Turn], max_tokens: int) -> list[dict[str, Any]]:
    """Send every conversation again, turn by turn, one at a time, on a fault-free sidecar; the differing turns."""
    differing: list[dict[str, Any]] = []
    for turn in sorted(turns, key=lambda t: (t.key, t.index)):
        reply = client.chat(
            turn.messages, f"replay-{turn.key}", delta=True, max_tokens=max_tokens, seed=0,
            attention_state=turn.attention_state,
        )  # fmt: skip
        states = state_digest(client, f"replay-{turn.key}")
        if reply.text != turn.answer or not states_match(states, turn.state):
            differing.append(
                {
                    "session": turn.key,
                    "turn": turn.index,
                    "answer_equal": reply.text == turn.answer,
                    "state_equal": states_match(states, turn.state),
                    "layers_not_bit_equal": sum(a["sha256"] != b["sha256"] for a, b in zip(states, turn.state)),
                    "memory_on_turn": turn.attention_state is not None,
                    "restart_before": turn.restart_before,
                    "attempts": turn.attempts,
                    "failures": list(turn.failures),
                    "chaos_answer": turn.answer,
                    "replay_answer": reply.text,
                }
            )
    return differing


# --------------------------------------------------------------------------- the command


def run(plan: ChaosPlan, work: Path) -> dict[str, Any]:
    """The whole soak in `work`: install, chaos, stop, leftovers, replay; the report."""
    from sidecar.testing.tiny_model import write_tiny_adapter, write_tiny_model

    model_dir = write_tiny_model(work / "model")
    adapter_dir = write_tiny_adapter(work / "adapter", model_dir)
    tally = Tally()
    started = time.monotonic()
    # The fault-free sidecar loads while the chaos runs; only the chaos sidecar is ever hit.
    root = work / "chaos"
    with installed_sidecars([root, work / "replay"], model_dir, adapter_dir) as (settings, replay_settings):
        log(f"both sidecars healthy after {time.monotonic() - started:.1f} s; the chaos starts")
        chaos_started = time.monotonic()
        clients = Clients(plan, root, settings, tally)
        faults = Faults(plan, root, settings, clients, tally)
        sampling = threading.Event()
        sampler = threading.Thread(
            target=sample_rss, args=(root, tally, sampling, plan.rss_every_s, chaos_started), name="rss", daemon=True
        )
        sampler.start()
        threads = [threading.Thread(target=clients.run, args=(n,), name=f"client-{n}") for n in range(plan.sessions)]
        for thread in threads:
            thread.start()
        faults.run(chaos_started + plan.minutes * 60)
        clients.stop.wait(max(0.0, chaos_started + plan.minutes * 60 - time.monotonic()))
        clients.stop.set()
        for thread in threads:
            thread.join()
        sampling.set()
        sampler.join()
        chaos_elapsed = time.monotonic() - chaos_started
        log(f"the chaos ended after {chaos_elapsed:.1f} s: {len(tally.turns)} turns, faults {dict(tally.faults)}")
        last_exit = ProcessSupervisor(root).status().last_exit
        cli("stop-sidecar", "--root", str(root))
        leftovers = leftover_files(Path(settings.state_dir or ""))
        differing = replay(client_for(replay_settings), tally.turns, plan.max_tokens)
        log(f"replayed {len(tally.turns)} turns: {len(differing)} differ")
    rss = rss_report(tally.rss)
    report = {
        "plan": asdict(plan),
        "turns": len(tally.turns),
        "conversations": tally.conversations,
        "faults": {kind: tally.faults[kind] for kind in FAULT_KINDS},
        "fault_errors": faults.errors,
        "read_only_state_dir": tally.read_only,
        "retries": tally.retries,
        "abandoned_turns": tally.abandoned_turns,
        "http_5xx": tally.http_5xx,
        "stream_errors": tally.stream_errors,
        "client_errors": tally.client_errors,
        "differing_turns": len(differing),
        "differing": differing,
        "turns_after_a_restart": sum(t.restart_before is not None for t in tally.turns),
        "leftover_files": leftovers,
        "last_exit": None if last_exit is None else asdict(last_exit),
        "rss": rss,
        "chaos_s": round(chaos_elapsed, 1),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    report["targets"] = {
        "no_differing_turns": not differing,
        "no_5xx": tally.http_5xx == 0,
        "no_leftover_files": not leftovers,
        "no_abandoned_turns": tally.abandoned_turns == 0 and not faults.errors,
        "rss_flat_after_warmup": rss["flat"],
    }
    return report


def main(argv: list[str] | None = None) -> int:
    """Run the chaos soak and print its JSON report; exit 1 when a target is missed."""
    args = _parser().parse_args(argv)
    plan = ChaosPlan(
        minutes=args.minutes,
        sessions=args.sessions,
        seed=args.seed,
        max_tokens=args.max_tokens,
        fault_gap_s=(args.fault_gap[0], args.fault_gap[1]),
    )
    with tempfile.TemporaryDirectory(prefix="delta-mem-chaos-") as tmp:
        report = run(plan, Path(tmp))
    print(json.dumps(report, indent=None if args.json else 2))
    return 0 if all(report["targets"].values()) else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="How long the faults and the clients run.")
    parser.add_argument("--sessions", type=int, default=8, help="Concurrent session clients.")
    parser.add_argument("--max-tokens", type=int, default=8, help="Tokens per answer.")
    parser.add_argument(
        "--fault-gap", type=float, nargs=2, default=(4.0, 12.0), metavar=("MIN", "MAX"),
        help="Seconds between the sidecar being healthy again and the next fault (uniform).",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="Seeds the prompts, the memory turns and the faults.")
    parser.add_argument("--json", action="store_true", help="One line of JSON.")
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
