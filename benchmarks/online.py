"""Online feedback under load: `POST /v1/feedback` while completions are served, a replica killed mid-stream, then a
night, then users forgotten and the store searched for what is left of them.

    python benchmarks/online.py --out benchmarks/results/online.json                 (the default night's store)
    python benchmarks/online.py --tiny --out /tmp/online.json --users 8 ...          (a tiny store built here)

Steps (every phase's wall time and the load average go in the JSON: the box is shared):
1. store: `--store DIR` (default: a finished DEFAULT-preset night) copied into a temporary folder, big files by hard
   link, small files, logs and the MLflow sqlite file copied (sqlite writes in place: a link would change DIR);
   DIR is never modified. A release from before online refits (no policy_tag / fit in its manifest) is replaced by
   one `latentpref personalize --store COPY` first (it migrates per-user folders into the policy table), timed.
   `--tiny`: the real nightly flow up to personalize on the tiny preset (benchmarks/generate.py:build_store).
2. `latentpref serve`'s app (pipelines/serve.py: `run`, ServeOptions as shipped except the settings in the JSON) on
   Ray Serve at 127.0.0.1, one replica.
3. baseline: `--completion-clients` threads send `--baseline-requests` completions (greedy, `--max-tokens`) for the
   benchmark's users, no feedback traffic: completion_p99_ms_without_feedback.
4. load: `--feedback-clients` threads send one feedback request (`--rows` rows) per user for `--users` users (half of
   them users of the store, half new `online-new-NNNN`), pacing `--feedback-interval-s` between requests, each with
   its own idempotency key (body or `Idempotency-Key` header, alternately), retried with the SAME key on a dropped
   connection / 5xx / 429 (Retry-After honoured); meanwhile the completion clients keep requesting completions.
   `--poll completions` (default): the completion clients poll the users whose feedback was answered and whose new
   fit they have not seen yet with completions, least recently polled first, other users otherwise.
   `--poll status`: a status client asks `POST /v1/users/status` every `--status-poll-s` which of those users are
   served a new online fit yet (`feedback_to_policy.to_status_*`), and the next free completion client requests a
   completion for such a user first, other users otherwise. When `--kill-at` of the feedback requests have been answered, the serving
   replica's process (pid from /health) gets SIGKILL; Serve starts a new one, and the `--resend-after-kill` requests
   answered last before the kill are sent again with the same key and rows (a client whose answer was lost in the
   kill; requests in flight during the restart wait in Serve's proxy, so few fail on their own). After the last
   feedback answer the
   completions go on until every feedback user was seen on a new policy or `--settle-s` passed.
5. a night: `latentpref personalize --store COPY` (server still up, no load); the server picks up its release.
6. forgetting: `--forget-cli` users with `latentpref forget`, `--forget-api` with `DELETE /v1/users/{id}` (server
   up); then everything is stopped and every file under the store copy (MLflow's folder is in it) is searched for
   each forgotten id's bytes and the bytes of each text only that user contributed.

Definitions (also under "definitions" in the JSON):
- feedback_to_policy: from the feedback's 2xx (client clock) to the moment the first completion for that user whose
  `personalization.user_artifact_version` is a fit of that feedback was SENT (a fit of request k = a version whose
  data hash is that of the user's train pairs + their stored feedback batches 1..j, j >= k, computed from the store:
  exact, order-independent); sending time excludes that completion's decoding and its queueing in the server (the
  policy is read when its batch starts). "..._to_response" variants run to that completion's answer (upper bound).
  A feedback never seen applied counts with the time until the end of the observation (censored, flagged).
  Under `--poll completions` the clients poll the waiting users with completions, so under a backlog the polling gap
  is part of this figure; under `--poll status`, a status poll (every --status-poll-s) and a free completion
  client are. "feedback_to_policy.outside_kill_window" keeps the requests whose wait does not overlap the kill
  window (below), as completion_p99_ms does; "feedback_to_policy_row_written" is the server's side without the
  polling gap: 2xx -> the online refit's row of a fit including the feedback written to the policy table (its
  `written_at`, every table version read).
- completion_p99_ms: completions of the feedback load, except those sent in the kill window (from the SIGKILL until
  the new replica has answered /health, plus 5 s): the kill's outage is reported apart (kill.*).
- lost_feedback: rows answered 2xx that are not in the store's committed feedback after the night.
- double_counted: committed feedback rows stored more than once (same user and texts) + per feedback user, how many
  more pairs the night's record / the policy row counts than the user's distinct rows in the store (train pairs +
  distinct feedback rows).
- forget_bytes_left: bytes of matches, in every file under the store copy after the purge, of a forgotten user's id
  or of a text only that user contributed (the texts of their pairs and feedback that no other user's pairs or
  feedback hold and that are not system texts: prompts and generated candidates). `forget_rows_left` is the same
  search on decoded tables (Parquet string columns, every version of every Lance table, latent-table keys), which
  compressed files hide from a byte search.
"""
from __future__ import annotations

import argparse
import collections
import http.client
import json
import logging
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve import HOST, Phases, _free_port  # noqa: E402  (benchmarks/serve.py: the serve load test's helpers)

log = logging.getLogger("benchmarks.online")
DEFAULT_STORE = "/tmp/clean/repo/latentpref-store"
KEYS = ("feedback_requests", "feedback_to_policy_p50_s", "feedback_to_policy_p99_s", "completion_p99_ms",
        "completion_p99_ms_without_feedback", "lost_feedback", "double_counted", "forget_bytes_left")
TARGETS = {"feedback_to_policy_p99_s": 5.0, "completion_p99_vs_without_feedback": 2.0, "lost_feedback": 0,
           "double_counted": 0, "forget_bytes_left": 0}
PROMPTS = ["The movie was", "I thought the acting", "This film is a", "The plot of this story", "Honestly, the ending",
           "What I liked most", "The director clearly", "Two hours of"]
COLS = ("user_id", "prompt", "chosen", "rejected", "weight")
LINK_MIN_BYTES = 4 << 20      # files at least this big are hard-linked (weights, checkpoints); the rest copied
KILL_GRACE_S = 5.0


# ---------------------------------------------------------------------------------------------------- helpers
def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def rnd(x, n=3):
    return None if x is None else round(x, n)


def copy_store(src: str, dst: str) -> dict:
    """`src` into `dst`: files >= LINK_MIN_BYTES hard-linked (store writes replace files, never edit them), every
    other file copied, and always copied: sqlite databases and logs (written in place). `locks`, `ray_train` left
    out."""
    counts = {"linked": 0, "copied": 0, "linked_bytes": 0, "copied_bytes": 0}

    def link(s, d):
        size = os.path.getsize(s)
        if size >= LINK_MIN_BYTES and not s.endswith((".db", ".db-wal", ".db-journal", ".log", ".sqlite")):
            try:
                os.link(s, d)
                counts["linked"] += 1
                counts["linked_bytes"] += size
                return
            except OSError:
                pass
        shutil.copy2(s, d)
        counts["copied"] += 1
        counts["copied_bytes"] += size
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("locks", "ray_train"), copy_function=link)
    return counts


class Http:
    """One keep-alive HTTP connection to the server (one per client thread)."""

    def __init__(self, port: int, timeout: float = 180.0):
        self.port, self.timeout = port, timeout
        self.conn = http.client.HTTPConnection(HOST, port, timeout=timeout)

    def reset(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass
        self.conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)

    def call(self, method: str, path: str, body: dict | None = None, headers: dict | None = None
             ) -> tuple[int, dict, dict]:
        """(status, JSON body, headers); a dropped connection raises (the caller resets and retries)."""
        data = None if body is None else json.dumps(body)
        hdrs = {"Content-Type": "application/json"} if body is not None else {}
        hdrs.update(headers or {})
        self.conn.request(method, path, data, hdrs)
        resp = self.conn.getresponse()
        raw = resp.read()
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            parsed = {"raw": raw[:300].decode("utf-8", "replace")}
        return resp.status, parsed, dict(resp.getheaders())


def health(port: int, timeout: float = 10.0) -> dict | None:
    try:
        status, body, _ = Http(port, timeout).call("GET", "/health")
        return body if status == 200 else None
    except Exception:
        return None


class LoadSampler:
    """The 1-minute load average every 2 s, labelled with the phase it was taken in."""

    def __init__(self):
        self.phase = "setup"
        self.samples: list[tuple[str, float]] = []
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self._stop.wait(2.0):
            self.samples.append((self.phase, os.getloadavg()[0]))

    def stop(self) -> dict:
        self._stop.set()
        out: dict = {}
        for phase, v in self.samples:
            out.setdefault(phase, []).append(v)
        return {k: {"mean": round(sum(v) / len(v), 2), "max": round(max(v), 2), "samples": len(v)}
                for k, v in out.items()}


def cli(args: list[str], log_path: str, timeout: float) -> tuple[int, float]:
    """Run `latentpref ARGS` (this interpreter), output to log_path; (exit code, seconds)."""
    t0 = time.perf_counter()
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)     # the store's own sqlite, as the server's DELETE uses
    with open(log_path, "ab") as fh:
        fh.write(f"$ latentpref {' '.join(args)}\n".encode())
        fh.flush()
        try:
            proc = subprocess.run([sys.executable, "-m", "latentpref.pipelines.cli", *args], stdout=fh,
                                  stderr=subprocess.STDOUT, timeout=timeout, env=env)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------- store
class StoreFacts:
    """What the benchmark reads from the store: release, train pairs, system texts, feedback material."""

    def __init__(self, root: str):
        import pyarrow as pa
        import pyarrow.compute as pc

        from latentpref.tasks.data.store import Store
        from latentpref.tasks.evaluate.serve_core import current_release, release_manifest
        self.store = Store(root)
        self.release = current_release(self.store)
        self.manifest = release_manifest(self.store, self.release)
        pairs = self.store.read_table(*self.manifest["pairs_path"])
        pairs = pairs.filter(pc.equal(pairs["split"], "train"))
        self.schema = pa.schema([("user_id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()),
                                 ("rejected", pa.string()), ("weight", pa.float32())])
        self.train = pairs.select(list(COLS)).cast(self.schema)     # as the night and the refitter read them
        self.all_pairs = self.store.read_table(*self.manifest["pairs_path"])
        users_dir = self.manifest["pairs_path"][:-1]
        self.store_users = sorted(set(self.store.read_table(*users_dir, "users.parquet")["user_id"].to_pylist()))
        pdir = next(d for d in self.store.listdir("data", "prompts")
                    if self.store.exists("data", "prompts", d, "prompts.parquet"))
        cdir = next(d for d in self.store.listdir("data", "candidates")
                    if self.store.exists("data", "candidates", d, "candidates.parquet"))
        prompts = self.store.read_table("data", "prompts", pdir, "prompts.parquet")
        cands = self.store.read_table("data", "candidates", cdir, "candidates.parquet")
        self.system_texts = set(t for t in prompts["prompt"].to_pylist() if t)
        if "reference" in prompts.column_names:
            self.system_texts.update(t for t in prompts["reference"].to_pylist() if t)
        self.system_texts.update(t for t in cands["text"].to_pylist() if t)
        by_pid = collections.defaultdict(list)
        for pid, text in zip(cands["prompt_id"].to_pylist(), cands["text"].to_pylist()):
            if text and text.strip():
                by_pid[pid].append(text)
        self.material = [(p, sorted(set(by_pid[pid]))) for pid, p in
                         zip(prompts["prompt_id"].to_pylist(), prompts["prompt"].to_pylist())
                         if p and len(set(by_pid[pid])) >= 2]
        self.min_pairs = int(self.manifest.get("min_pairs", 1))

    def train_rows(self, user_id: str):
        import pyarrow.compute as pc
        return self.train.filter(pc.equal(self.train["user_id"], user_id))


def make_rows(facts: StoreFacts, user_id: str, n: int, rng: random.Random, tag: str) -> list[dict]:
    """n feedback rows of the store's own prompts and candidates (they pass validation), distinct from each other
    and from the user's train pairs; the first row's chosen text is the user's own (a candidate + a unique note):
    the text only they contributed, which forgetting must remove."""
    have = set()
    t = facts.train_rows(user_id)
    for p, c, r in zip(t["prompt"].to_pylist(), t["chosen"].to_pylist(), t["rejected"].to_pylist()):
        have.add((p, c, r))
    rows = []
    while len(rows) < n:
        prompt, cands = facts.material[rng.randrange(len(facts.material))]
        chosen, rejected = rng.sample(cands, 2)
        if not rows:
            chosen = f"{chosen.rstrip()} Online note {tag} {rng.getrandbits(40):010x}."
        if (prompt, chosen, rejected) in have:
            continue
        have.add((prompt, chosen, rejected))
        rows.append({"user_id": user_id, "prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


# ---------------------------------------------------------------------------------------------------- load
class Load:
    """Shared state of the feedback and completion clients of one phase."""

    def __init__(self, port: int, pool: list[str], args):
        self.port, self.pool, self.args = port, pool, args
        self.lock = threading.Lock()
        self.completions: list[dict] = []     # user, t_send, t_recv, status, version, online, served
        self.feedback: list[dict] = []
        self.pending: dict[str, dict] = {}    # user -> {"t": 2xx time, "old": versions seen before, "polled": t}
        self.last_version: dict[str, str | None] = {}
        self.status_polls = 0
        self.status_ready_at: dict[str, float] = {}   # --poll status: when the status first named a new fit
        self.stop = threading.Event()
        self.counter = 0
        self.kill: dict = {}
        self.resent: list[dict] = []          # requests answered before the kill, sent again after it (same key)
        self.t0 = self.t_feedback_done = self.t_end = time.time()

    # completion clients ----------------------------------------------------------------------------------
    def pick_user(self, i: int) -> str:
        with self.lock:
            if self.args.poll == "status":        # a user whose new fit the status says is served, oldest first
                ready = [u for u, p in self.pending.items() if p.get("ready")]
                if ready:
                    user = min(ready, key=lambda u: self.pending[u]["t"])
                    # one completion per sighting: not asked about again (nor sent again) while it is in flight
                    self.pending[user].update(ready=False, sent=True)
                    return user
            elif self.pending:
                user = min(self.pending, key=lambda u: self.pending[u]["polled"])
                self.pending[user]["polled"] = time.time()
                return user
        return self.pool[i % len(self.pool)]

    def status_worker(self) -> None:
        """--poll status: every --status-poll-s, one POST /v1/users/status for the users waiting for a new fit; a user
        whose status names an online fit they did not have before the feedback is marked ready for a completion."""
        client = Http(self.port)
        while not self.stop.wait(self.args.status_poll_s):
            with self.lock:
                users = [u for u, p in self.pending.items() if not p.get("ready") and not p.get("sent")][:1000]
            if not users:
                continue
            try:
                status, out, _ = client.call("POST", "/v1/users/status", {"users": users})
            except Exception:
                client.reset()
                continue
            if status != 200:
                continue
            t_answer = time.time()
            with self.lock:
                self.status_polls += 1
                for entry in out["data"]:
                    pend = self.pending.get(entry["user"])
                    if pend is not None and entry["refitted_online"] \
                            and entry["user_artifact_version"] not in pend["old"]:
                        pend["ready"] = True
                        self.status_ready_at.setdefault(entry["user"], t_answer)

    def completion_worker(self, limit: int | None) -> None:
        client = Http(self.port)
        while not self.stop.is_set():
            with self.lock:
                if limit is not None and self.counter >= limit:
                    return
                i = self.counter
                self.counter += 1
            user = self.pick_user(i)
            body = {"model": "latentpref", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": self.args.max_tokens,
                    "temperature": 0, "user": user}
            t_send = time.time()
            try:
                status, out, _ = client.call("POST", "/v1/completions", body)
            except Exception as err:
                status, out = 0, {"error": repr(err)[:300]}
                client.reset()
            t_recv = time.time()
            rec = {"user": user, "t_send": t_send, "t_recv": t_recv, "status": status}
            if status == 200:
                p = out["personalization"]
                rec.update(version=p.get("user_artifact_version"), online=bool(p.get("refitted_online")),
                           served=p.get("served"), release=p.get("release"))
            else:
                rec["error"] = str(out)[:300]
            with self.lock:
                self.completions.append(rec)
                pend = self.pending.get(user)
                if status == 200:
                    if pend is not None and rec["online"] and rec["version"] not in pend["old"] \
                            and t_recv > pend["t"]:
                        del self.pending[user]          # (the exact resolution is made afterwards, from the store)
                        pend = None
                    self.last_version[user] = rec["version"]
                if pend is not None:
                    pend["sent"] = False                # not the new fit yet: the status client asks again
            if status != 200:
                time.sleep(0.2)

    # feedback clients ------------------------------------------------------------------------------------
    def send_feedback(self, client: Http, user: str, rows: list[dict], key: str, use_header: bool,
                      deadline: float) -> dict:
        rec = {"user": user, "key": key, "rows": rows, "attempts": 0, "statuses": [], "t_first_send": time.time(),
               "use_header": use_header}
        backoff = 0.5
        while True:
            rec["attempts"] += 1
            body = {"rows": rows} if use_header else {"rows": rows, "idempotency_key": key}
            headers = {"Idempotency-Key": key} if use_header else None
            try:
                status, out, hdrs = client.call("POST", "/v1/feedback", body, headers)
            except Exception as err:
                status, out, hdrs = 0, {"error": repr(err)[:300]}, {}
                client.reset()
            rec["statuses"].append(status)
            if status == 200:
                rec.update(t_2xx=time.time(), status=200, batch=out.get("batch"), accepted=out.get("accepted"),
                           already_stored=bool(out.get("already_stored")),
                           duplicate_of_stored=out.get("duplicate_of_stored"))
                return rec
            if status not in (0, 429, 500, 502, 503, 504) or time.monotonic() > deadline:
                rec.update(status=status, error=str(out)[:300])
                return rec
            if status == 429:
                wait = float(hdrs.get("Retry-After") or hdrs.get("retry-after") or 1.0)
            else:
                wait, backoff = backoff, min(backoff * 2, 4.0)
            time.sleep(wait)

    def feedback_worker(self, jobs: "collections.deque", on_answer) -> None:
        client = Http(self.port)
        while True:
            with self.lock:
                if not jobs:
                    return
                user, rows, key, use_header = jobs.popleft()
                old = {self.last_version.get(user)}
            rec = self.send_feedback(client, user, rows, key, use_header,
                                     deadline=time.monotonic() + self.args.retry_budget_s)
            with self.lock:
                self.feedback.append(rec)
                if rec.get("status") == 200:
                    self.pending[user] = {"t": rec["t_2xx"], "old": old, "polled": 0.0}
            on_answer()
            time.sleep(self.args.feedback_interval_s)


def run_completions_only(port: int, pool: list[str], args, n: int) -> dict:
    load = Load(port, pool, args)
    threads = [threading.Thread(target=load.completion_worker, args=(n,)) for _ in range(args.completion_clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = [1000 * (c["t_recv"] - c["t_send"]) for c in load.completions if c["status"] == 200]
    return {"requests": len(load.completions), "errors": sum(c["status"] != 200 for c in load.completions),
            "p50_ms": rnd(pct(lat, 0.5), 1), "p99_ms": rnd(pct(lat, 0.99), 1), "max_ms": rnd(max(lat, default=None), 1),
            "seconds": round(time.perf_counter() - t0, 1),
            "completions_per_s": round(len(lat) / (time.perf_counter() - t0), 2)}


def kill_replica(port: int, load: Load, restart_budget_s: float) -> None:
    """SIGKILL the serving replica's process (pid from /health), then wait for Serve's new replica to answer."""
    h = health(port)
    if h is None:
        load.kill["error"] = "no /health answer before the kill"
        return
    pid = h["pid"]
    with load.lock:
        resend = [f for f in load.feedback if f.get("status") == 200][-load.args.resend_after_kill:] \
            if load.args.resend_after_kill > 0 else []
    load.kill.update(pid=pid, at=time.time(), feedback_answered_before=sum(
        f.get("status") == 200 for f in load.feedback), health_before={k: h.get(k) for k in (
            "feedback_requests", "online_refits", "online_refit_pending", "online_refit_errors", "served")})
    os.kill(pid, signal.SIGKILL)
    log.info("killed replica process %d", pid)
    deadline = time.monotonic() + restart_budget_s
    while time.monotonic() < deadline:
        h = health(port, timeout=5.0)
        if h is not None and h.get("pid") != pid:
            load.kill.update(new_pid=h["pid"], restarted_at=time.time(),
                             restart_s=round(time.time() - load.kill["at"], 2))
            break
        time.sleep(0.5)
    else:
        load.kill["error"] = f"no new replica within {restart_budget_s:.0f}s"
        return
    # a client whose answer was lost in the kill sends the same request again, with the SAME idempotency key: the
    # last `resend_after_kill` requests answered before the kill, re-sent now (they must be stored once)
    client = Http(port)
    for f in resend:
        again = load.send_feedback(client, f["user"], f["rows"], f["key"], f["use_header"],
                                   deadline=time.monotonic() + load.args.retry_budget_s)
        load.resent.append({"status": again.get("status"), "already_stored": again.get("already_stored"),
                            "accepted": again.get("accepted"), "same_batch": again.get("batch") == f["batch"],
                            "attempts": again["attempts"]})


def run_feedback_load(port: int, pool: list[str], jobs: list[tuple], args) -> Load:
    load = Load(port, pool, args)
    queue = collections.deque(jobs)
    kill_after = max(1, int(round(args.kill_at * len(jobs)))) if args.kill_at > 0 else None
    killer: list[threading.Thread] = []

    def on_answer():
        with load.lock:
            answered = len(load.feedback)
            go = kill_after is not None and answered >= kill_after and not killer
            if go:
                killer.append(threading.Thread(target=kill_replica, args=(port, load, args.restart_budget_s)))
        if go:
            killer[0].start()

    comp = [threading.Thread(target=load.completion_worker, args=(None,)) for _ in range(args.completion_clients)]
    fb = [threading.Thread(target=load.feedback_worker, args=(queue, on_answer)) for _ in range(args.feedback_clients)]
    if args.poll == "status":
        comp.append(threading.Thread(target=load.status_worker))
    load.t0 = time.time()
    for t in comp + fb:
        t.start()
    for t in fb:
        t.join()
    load.t_feedback_done = time.time()
    if killer:
        killer[0].join(timeout=args.restart_budget_s + 30)
    deadline = time.monotonic() + args.settle_s
    while time.monotonic() < deadline:        # until every feedback user was seen on a new policy (bounded)
        with load.lock:
            if not load.pending:
                break
        time.sleep(0.5)
    load.stop.set()
    for t in comp:
        t.join(timeout=300)
    load.t_end = time.time()
    return load


# ---------------------------------------------------------------------------------------------------- analysis
def feedback_timing(facts: StoreFacts, load: Load) -> dict:
    """feedback_to_policy per answered request, resolved exactly from the store (see the module docstring)."""
    import pyarrow as pa

    from latentpref.tasks.data.validate import user_storage_key
    from latentpref.tasks.policy.store import user_data_hash
    store = facts.store
    by_user = collections.defaultdict(list)
    for f in load.feedback:
        if f.get("status") == 200:
            by_user[f["user"]].append(f)
    comps = collections.defaultdict(list)
    for c in load.completions:
        if c["status"] == 200 and c.get("version"):
            comps[c["user"]].append(c)
    to_send, to_recv, censored, naive, lost_in_kill = [], [], 0, [], 0
    spans = []     # (2xx, to_send) per request: which ones waited through the replica kill
    for user, reqs in by_user.items():
        reqs.sort(key=lambda f: f["t_2xx"])
        parts = [facts.train_rows(user)]
        hashes = []
        for f in reqs:
            path = ("feedback", f"user={user_storage_key(user)}", f"batch-{f['batch']}.parquet")
            if store.exists(*path):
                parts.append(store.read_table(*path).select(list(COLS)).cast(facts.schema))
            hashes.append(user_data_hash(pa.concat_tables(parts)))
        seen = sorted(comps.get(user, []), key=lambda c: c["t_send"])
        for k, f in enumerate(reqs):
            ok = set(hashes[k:])
            hit = next((c for c in seen if c["t_recv"] > f["t_2xx"] and c["version"].rsplit("-", 1)[-1] in ok), None)
            if hit is None:
                censored += 1
                lost_in_kill += f["t_2xx"] <= load.kill.get("at", -math.inf)
                to_send.append(load.t_end - f["t_2xx"])
                to_recv.append(load.t_end - f["t_2xx"])
                spans.append((f["t_2xx"], to_send[-1]))
                continue
            to_send.append(max(0.0, hit["t_send"] - f["t_2xx"]))
            spans.append((f["t_2xx"], to_send[-1]))
            to_recv.append(hit["t_recv"] - f["t_2xx"])
            # cross-check: the first online fit seen after the 2xx whatever its data (what a client would see)
            first = next((c for c in seen if c["t_recv"] > f["t_2xx"] and c["online"]), None)
            naive.append(first is hit)
    # the kill's share apart, as for completions: a request whose wait overlaps [SIGKILL, restarted + grace] waited
    # for a replica that was not there (the headline p50/p99 above keep every request)
    lo, hi = kill_window(load)
    clear = [d for t, d in spans if t + d < lo or t > hi]
    # --poll status: 2xx -> the first status answer naming a new online fit (what a client polling the status sees)
    to_status = [load.status_ready_at[u] - f["t_2xx"] for u, reqs in by_user.items() for f in reqs[:1]
                 if u in load.status_ready_at]
    return {"p50_s": rnd(pct(to_send, 0.5)), "p99_s": rnd(pct(to_send, 0.99)), "max_s": rnd(max(to_send, default=None)),
            "to_status_p50_s": rnd(pct(to_status, 0.5)), "to_status_p99_s": rnd(pct(to_status, 0.99)),
            "to_status_requests": len(to_status),
            "outside_kill_window": {"p50_s": rnd(pct(clear, 0.5)), "p99_s": rnd(pct(clear, 0.99)),
                                    "requests": len(clear), "waited_through_the_kill": len(spans) - len(clear)},
            "to_response_p50_s": rnd(pct(to_recv, 0.5)), "to_response_p99_s": rnd(pct(to_recv, 0.99)),
            "requests_timed": len(to_send), "status_polls": load.status_polls, "never_seen_applied": censored,
            "never_seen_applied_answered_before_the_kill": lost_in_kill,
            "first_online_fit_seen_was_this_feedbacks": sum(naive), "of": len(naive)}


def refit_rows(facts: StoreFacts) -> dict[tuple[str, str], float]:
    """(user, data hash) -> when the online refit's row was written (`written_at`, the server's clock), over every
    version of the served CLaP's policy table: read right after the load, before a night or a purge rewrites it."""
    import lance

    from latentpref.tasks.policy.table import PolicyTable
    table = PolicyTable(facts.store, facts.release.clap_version)
    ds = table.dataset()
    out: dict[tuple[str, str], float] = {}
    commits = []
    if ds is None:
        return out
    night = f"online-{facts.release.release_id}"
    for v in ds.versions():
        rows = lance.dataset(table.uri, version=v["version"], storage_options=facts.store.lance_options()).to_table(
            columns=["user_id", "manifest", "written_at"], filter=f"night = '{night}'")
        new = 0
        for u, m, w in zip(rows["user_id"].to_pylist(), rows["manifest"].to_pylist(), rows["written_at"].to_pylist()):
            key = (u, json.loads(m)["version"].rsplit("-", 1)[-1])
            if key not in out:
                out[key] = float(w)
                new += 1
        if new:
            commits.append(new)
    out[("", "_commits")] = commits       # users per online refit commit (popped by the caller)
    return out


def table_integrity(facts: StoreFacts, at=None) -> dict:
    """The served CLaP's policy table at `at` (latest: None): users with more than one row, and store users without
    a row (a replace must swap exactly the user's own row)."""
    from latentpref.tasks.policy.table import PolicyTable
    ds = PolicyTable(facts.store, facts.release.clap_version).dataset(at)
    if ds is None:
        return {"rows": 0}
    ids = collections.Counter(ds.to_table(columns=["user_id"])["user_id"].to_pylist())
    return {"version": ds.version, "rows": sum(ids.values()), "users": len(ids),
            "users_with_several_rows": sum(n > 1 for n in ids.values()),
            "store_users_without_a_row": sum(u not in ids for u in facts.store_users)}


def server_side_timing(facts: StoreFacts, load: Load, written: dict) -> dict:
    """feedback 2xx -> the online refit's row of a fit including it written to the policy table (no polling gap)."""
    import pyarrow as pa

    from latentpref.tasks.data.validate import user_storage_key
    from latentpref.tasks.policy.store import user_data_hash
    commits = written.pop(("", "_commits"), [])
    by_user = collections.defaultdict(list)
    for f in load.feedback:
        if f.get("status") == 200:
            by_user[f["user"]].append(f)
    delays, missing = [], 0
    for user, reqs in by_user.items():
        reqs.sort(key=lambda f: f["t_2xx"])
        parts, hashes = [facts.train_rows(user)], []
        for f in reqs:
            path = ("feedback", f"user={user_storage_key(user)}", f"batch-{f['batch']}.parquet")
            if facts.store.exists(*path):
                parts.append(facts.store.read_table(*path).select(list(COLS)).cast(facts.schema))
            hashes.append(user_data_hash(pa.concat_tables(parts)))
        for k, f in enumerate(reqs):
            times = [written[(user, h)] for h in hashes[k:] if (user, h) in written]
            if not times:
                missing += 1
                continue
            delays.append(max(0.0, min(times) - f["t_2xx"]))
    return {"p50_s": rnd(pct(delays, 0.5)), "p99_s": rnd(pct(delays, 0.99)), "max_s": rnd(max(delays, default=None)),
            "requests_with_an_online_row": len(delays), "requests_without": missing,
            "refit_commits": len(commits), "users_per_commit_mean": rnd(sum(commits) / len(commits), 1) if commits
            else None, "users_per_commit_max": max(commits, default=None)}


def kill_window(load: Load) -> tuple[float, float]:
    """[SIGKILL, new replica answering + KILL_GRACE_S]; an empty window when there was no kill."""
    lo = load.kill.get("at", math.inf)
    hi = load.kill.get("restarted_at", load.t_end) + KILL_GRACE_S if "at" in load.kill else -math.inf
    return lo, hi


def completion_figures(load: Load) -> dict:
    lo, hi = kill_window(load)
    ok = [c for c in load.completions if c["status"] == 200]
    outside = [1000 * (c["t_recv"] - c["t_send"]) for c in ok if not (lo - 0.0 <= c["t_send"] <= hi or
                                                                        c["t_send"] < lo < c["t_recv"])]
    everything = [1000 * (c["t_recv"] - c["t_send"]) for c in ok]
    errors = [c for c in load.completions if c["status"] != 200]
    return {"p99_ms": rnd(pct(outside, 0.99), 1), "p50_ms": rnd(pct(outside, 0.5), 1), "requests_measured": len(outside),
            "p99_ms_including_kill_window": rnd(pct(everything, 0.99), 1),
            "max_ms_including_kill_window": rnd(max(everything, default=None), 1),
            "requests": len(load.completions), "errors": len(errors),
            "errors_in_kill_window": sum(lo <= c["t_send"] <= hi or c["t_send"] < lo < c["t_recv"] for c in errors),
            "errors_outside_kill_window": sum(not (lo <= c["t_send"] <= hi or c["t_send"] < lo < c["t_recv"])
                                              for c in errors),
            "error_samples": sorted({f"{c['status']}: {c.get('error', '')[:160]}" for c in errors})[:5],
            "completions_per_s": round(len(ok) / max(load.t_end - load.t0, 1e-9), 2)}


def stored_feedback_checks(facts: StoreFacts, load: Load, feedback_users: list[str], night_release) -> dict:
    """lost_feedback, double_counted and how the night found the feedback users (call after the night)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from latentpref.tasks.data.ingest import read_feedback_store
    from latentpref.tasks.policy.table import PolicyTable
    store = facts.store
    fed = read_feedback_store(store)
    stored = collections.Counter()
    if fed is not None:
        for row in zip(*(fed[c].to_pylist() for c in ("user_id", "prompt", "chosen", "rejected"))):
            stored[row] += 1
    answered, unanswered_rows = set(), set()
    for f in load.feedback:
        keys = {(r["user_id"], r["prompt"], r["chosen"], r["rejected"]) for r in f["rows"]}
        (answered if f.get("status") == 200 else unanswered_rows).update(keys)
    lost = sorted(k for k in answered if k not in stored)
    dup_rows = sum(n - 1 for n in stored.values() if n > 1)
    # the night's records and the policy rows at its tag vs each user's distinct rows in the store
    manifest = store.read_json("serving", "releases", night_release.release_id, "_manifest.json")
    records = store.read_table(*manifest["records_path"])
    records = records.filter(pc.is_in(records["user_id"], value_set=pa.array(feedback_users, pa.string())))
    rec = {u: (s, n) for u, s, n in zip(records["user_id"].to_pylist(), records["status"].to_pylist(),
                                        records["n_pairs"].to_pylist())}
    rows_policy = PolicyTable(store, night_release.clap_version).manifests(feedback_users, night_release.policy_tag)
    distinct_fb = collections.Counter(k[0] for k in stored)
    over_night = over_policy = short = 0
    status = collections.Counter()
    mismatch = []
    for u in feedback_users:
        expected = facts.train_rows(u).num_rows + distinct_fb.get(u, 0)
        s, n_night = rec.get(u, (None, None))
        status[s or "missing"] += 1
        n_policy = (rows_policy.get(u) or {}).get("n_pairs")
        for n, which in ((n_night, "night"), (n_policy, "policy")):
            if n is None:
                continue
            if n > expected:
                over_night += (n - expected) if which == "night" else 0
                over_policy += (n - expected) if which == "policy" else 0
            elif n < expected:
                short += 1
            if n != expected and len(mismatch) < 5:
                mismatch.append({"user": u, which: n, "expected": expected})
    return {"lost_feedback": len(lost), "lost_samples": [list(k[:1]) for k in lost[:5]],
            "stored_duplicate_rows": dup_rows, "n_pairs_over_in_night_records": over_night,
            "n_pairs_over_in_policy_rows": over_policy, "n_pairs_short": short, "n_pairs_mismatch_samples": mismatch,
            "double_counted": dup_rows + max(over_night, over_policy),
            "answered_rows": len(answered), "rows_stored_without_a_2xx": sum(k in stored for k in unanswered_rows),
            "night_status_of_feedback_users": dict(status)}


# ---------------------------------------------------------------------------------------------------- forgetting
def own_texts(facts: StoreFacts, forgotten: list[str]) -> dict[str, dict]:
    """Per forgotten user (read before the purge): their texts no other user's pairs or feedback hold and that are
    not system texts, and the latent-table keys of those texts."""
    from latentpref.tasks.data.ingest import read_feedback_store
    from latentpref.tasks.policy.cache import text_key
    tables = [facts.all_pairs.select(["user_id", "prompt", "chosen", "rejected"])]
    fed = read_feedback_store(facts.store)
    if fed is not None:
        tables.append(fed.select(["user_id", "prompt", "chosen", "rejected"]))
    owners = collections.defaultdict(set)
    triples = collections.defaultdict(list)
    for t in tables:
        for u, p, c, r in zip(*(t[k].to_pylist() for k in ("user_id", "prompt", "chosen", "rejected"))):
            for text in (p, c, r):
                owners[text].add(u)
            triples[u].append((p, c, r))
    out = {}
    for u in forgotten:
        texts = {t for p, c, r in triples.get(u, []) for t in (p, c, r)
                 if t and t.strip() and owners[t] == {u} and t not in facts.system_texts}
        keys = set()
        for p, c, r in triples.get(u, []):
            if p in texts:
                keys.add(text_key(p))
            for resp in (c, r):
                if p in texts or resp in texts:
                    keys.add(text_key(p, resp))
            if {p, c, r} & texts:
                keys.add(text_key(p, c, r))
        out[u] = {"texts": sorted(texts), "keys": sorted(keys)}
    return out


def search_bytes(root: str, needles: dict[bytes, str], workdir: str) -> dict:
    """Every file under root: bytes of every match of every needle (grep -F narrows the files, Python counts)."""
    if not os.path.isdir(root):
        return {"bytes": 0, "matches": 0, "files": [], "by_folder": {}}
    pats = os.path.join(workdir, "needles.txt")
    with open(pats, "wb") as fh:
        for n in needles:
            lines = [ln for ln in n.split(b"\n") if ln]
            fh.write(max(lines, key=len) + b"\n")     # a file holding the needle holds its longest line
    proc = subprocess.run(["grep", "-r", "-l", "-a", "-F", "-f", pats, root], capture_output=True, timeout=1800)
    files = [p for p in proc.stdout.decode("utf-8", "surrogateescape").splitlines() if p]
    total = matches = 0
    hits = []
    for path in files:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        for n, label in needles.items():
            k = data.count(n)
            if k:
                total += k * len(n)
                matches += k
                hits.append({"file": os.path.relpath(path, root), "what": label, "matches": k, "bytes": k * len(n)})
    by_folder = collections.Counter()
    for h in hits:
        by_folder[f"{h['file'].split('/')[0]}: {h['what'].split(' #')[0]}"] += h["bytes"]
    return {"bytes": total, "matches": matches, "files": hits[:40], "files_with_matches": len({h["file"] for h in hits}),
            "by_folder": dict(by_folder)}


def search_tables(root: str, ids: set[str], texts: set[str], keys: set[str]) -> dict:
    """Decoded search: Parquet string columns (every file) and every version of every Lance table."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    wanted = pa.array(sorted(ids | texts | keys), pa.string())
    rows, where = 0, collections.Counter()

    def scan(tbl, label):
        nonlocal rows
        for name in tbl.column_names:
            col = tbl[name]
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                n = pc.sum(pc.is_in(col.cast(pa.string()), value_set=wanted)).as_py() or 0
                if n:
                    rows += n
                    where[label] += n
    lance_dirs = []
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath.endswith(".lance"):
            lance_dirs.append(dirpath)
            dirnames[:] = []
            continue
        for f in filenames:
            if f.endswith(".parquet"):
                try:
                    scan(pq.read_table(os.path.join(dirpath, f)), os.path.relpath(os.path.join(dirpath, f), root))
                except Exception:
                    pass
    import lance
    versions = 0
    for d in lance_dirs:
        try:
            ds = lance.dataset(d)
            for v in ds.versions():
                versions += 1
                old = lance.dataset(d, version=v["version"])
                cols = [f.name for f in old.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
                scan(old.to_table(columns=cols), f"{os.path.relpath(d, root)}@v{v['version']}")
        except Exception as err:
            where[f"{os.path.relpath(d, root)}: unreadable ({type(err).__name__})"] += 0
    return {"rows": rows, "where": dict(where.most_common(20)), "lance_tables": len(lance_dirs),
            "lance_versions_scanned": versions}


# ---------------------------------------------------------------------------------------------------- the run
def run(args, write) -> dict:
    import ray

    from latentpref.pipelines.serve import SERVE_READINESS_ENV, ServeOptions
    from latentpref.pipelines.serve import run as serve_run
    from latentpref.tasks.evaluate.serve_core import current_release, release_manifest
    tmp = tempfile.mkdtemp(prefix="bench-online-", dir=args.work)
    root = os.path.join(tmp, "store")
    logs = os.path.join(tmp, "logs")
    os.makedirs(logs)
    phase = Phases()
    sampler = LoadSampler()
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
               "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    setup: dict = {}
    cli_base: list[str] = []
    ray_session = None
    result: dict = {}
    try:
        # 1. the store ------------------------------------------------------------------------------------
        if args.tiny:
            sampler.phase = "store_build"
            from generate import STORE_OVERRIDES, build_store
            with phase("store_build"):
                build_store(root, args.tiny_users)
            overrides = [f"data.n_users={args.tiny_users}", *STORE_OVERRIDES]
            cli_base = ["--preset", "tiny", *[a for o in overrides for a in ("--set", o)]]
            setup["store"] = (f"built here: the real nightly flow up to personalize, tiny preset, {args.tiny_users} "
                              "simulated users (benchmarks/generate.py:build_store)")
        else:
            sampler.phase = "store_copy"
            with phase("store_copy"):
                setup["copy"] = copy_store(args.store, root)
            setup["store"] = f"{args.store} (copied: files >= {LINK_MIN_BYTES >> 20} MiB hard-linked, the rest copied)"
        cli_base = [*cli_base, "--store", root]
        from latentpref.tasks.data.store import Store
        release0 = current_release(Store(root))
        m0 = release_manifest(Store(root), release0)
        setup["release_at_start"] = {"release": release0.release_id, "online_refit_ready": bool(
            m0.get("policy_tag") and m0.get("fit"))}
        if not (m0.get("policy_tag") and m0.get("fit")):   # a release from before online refits: publish a new one
            sampler.phase = "first_personalize"
            with phase("first_personalize"):
                rc, secs = cli(["personalize", *cli_base], os.path.join(logs, "personalize-1.log"), args.night_timeout_s)
            setup["first_personalize"] = {"rc": rc, "seconds": round(secs, 1),
                                          "why": "release without policy_tag/fit (old format): one night publishes a "
                                                 "new one (users migrated into the policy table, mostly unchanged)"}
            if rc != 0:
                raise RuntimeError(f"latentpref personalize failed (rc {rc}); see {logs}/personalize-1.log")
            setup["first_personalize"]["users"] = _night_counts(Store(root))
        facts = StoreFacts(root)
        rng = random.Random(args.seed)
        n_existing = min(len(facts.store_users), int(round(args.users * args.existing_fraction)))
        existing = rng.sample(facts.store_users, n_existing)
        new = [f"online-new-{i:04d}" for i in range(1, args.users - n_existing + 1)]
        feedback_users = existing + new
        rows_per = max(args.rows, facts.min_pairs)
        run_tag = f"{int(time.time()) % 100000:05d}"
        jobs = []
        for i, u in enumerate(rng.sample(feedback_users, len(feedback_users))):
            jobs.append((u, make_rows(facts, u, rows_per, rng, run_tag), f"bench-{run_tag}-{u}-1", i % 2 == 1))
        setup.update(store_users=len(facts.store_users), release=facts.release.release_id,
                     clap_version=facts.release.clap_version, min_pairs=facts.min_pairs,
                     feedback_users_existing=len(existing), feedback_users_new=len(new))

        # 2. the server -----------------------------------------------------------------------------------
        sampler.phase = "deploy"
        for k, v in SERVE_READINESS_ENV.items():
            os.environ.setdefault(k, v)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        ray.init(address="local", num_cpus=args.ray_cpus, object_store_memory=256 * 1024 * 1024,
                 include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        try:
            ray_session = ray._private.worker._global_node.get_session_dir_path()
        except Exception:
            ray_session = None
        port = _free_port()
        options = ServeOptions(store=root, max_batch_size=max(args.completion_clients, 1), cache_users=1024,
                               reload_interval_s=args.reload_interval_s, max_tokens_cap=max(64, args.max_tokens),
                               cpus_per_replica=args.replica_cpus, refit_turns=not args.no_refit_turns)
        with phase("deploy"):
            serve_run(options, host=HOST, port=port, num_cpus=args.ray_cpus, blocking=False, start_budget_s=600)
        pool = feedback_users
        with phase("warm_up"):
            warm = run_completions_only(port, pool, args, 3 * args.completion_clients)

        # 3. baseline -------------------------------------------------------------------------------------
        sampler.phase = "baseline"
        with phase("baseline_completions"):
            base = run_completions_only(port, pool, args, args.baseline_requests)
        log.info("baseline: %s", base)

        # 4. feedback + completions + a replica killed ----------------------------------------------------
        integrity_before = table_integrity(facts)
        sampler.phase = "feedback_load"
        with phase("feedback_load"):
            load = run_feedback_load(port, pool, jobs, args)
        if args.dump_requests:    # every request of the load, for a closer look than the percentiles
            with open(args.dump_requests, "w") as out:
                json.dump({"t0": load.t0, "kill": load.kill, "status_ready_at": load.status_ready_at,
                           "feedback": [{k: v for k, v in f.items() if k != "rows"} for f in load.feedback],
                           "completions": load.completions}, out, default=str)
        h_after = health(port) or {}
        comp = completion_figures(load)
        timing = feedback_timing(facts, load)
        written = server_side_timing(facts, load, refit_rows(facts))
        integrity = {"before_load": integrity_before, "after_load": table_integrity(facts)}
        answered = [f for f in load.feedback if f.get("status") == 200]

        # 5. the night ------------------------------------------------------------------------------------
        sampler.phase = "night"
        with phase("night"):
            rc, secs = cli(["personalize", *cli_base], os.path.join(logs, "personalize-2.log"), args.night_timeout_s)
        night: dict = {"rc": rc, "seconds": round(secs, 1)}
        if rc != 0:
            raise RuntimeError(f"the night failed (rc {rc}); see {logs}/personalize-2.log")
        night_release = current_release(facts.store)
        night.update(release=night_release.release_id, users=_night_counts(facts.store))
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120:       # the server switches to the night's release
            h = health(port)
            if h is not None and h.get("release") == night_release.release_id:
                night["server_switched_s"] = round(time.monotonic() - t0, 1)
                break
            time.sleep(1.0)
        checks = stored_feedback_checks(facts, load, feedback_users, night_release)
        integrity["night_tag"] = table_integrity(facts, night_release.policy_tag)

        # 6. forgetting -----------------------------------------------------------------------------------
        sampler.phase = "forget"
        k_cli, k_api = args.forget_cli, args.forget_api
        half = (k_cli + k_api) // 2
        pick_existing = rng.sample(existing, min(len(existing), half))
        pick_new = rng.sample(new, min(len(new), k_cli + k_api - len(pick_existing)))
        forgotten = [u for pair in zip(pick_existing, pick_new) for u in pair] + \
            pick_existing[len(pick_new):] + pick_new[len(pick_existing):]
        by_cli, by_api = forgotten[:k_cli], forgotten[k_cli:k_cli + k_api]
        own = own_texts(facts, forgotten)
        forget: dict = {"cli": [], "api": []}
        with phase("forget_cli"):
            for i, u in enumerate(by_cli):
                path = os.path.join(logs, f"forget-{i}.log")
                rc, secs = cli(["forget", u, *cli_base], path, 900)
                entry = {"rc": rc, "seconds": round(secs, 1), "existing_user": u in existing}
                if rc != 0:
                    with open(path, "rb") as fh:
                        entry["error"] = fh.read().decode("utf-8", "replace").strip().splitlines()[-1][-300:]
                forget["cli"].append(entry)
        with phase("forget_api"):
            client = Http(port, timeout=900)
            for u in by_api:
                t = time.perf_counter()
                try:
                    status, out, _ = client.call("DELETE", f"/v1/users/{u}")
                except Exception as err:
                    status, out = repr(err)[:100], {}
                    client.reset()
                entry = {"status": status, "seconds": round(time.perf_counter() - t, 1), "existing_user": u in existing}
                if status not in (200, 202):
                    entry["error"] = str(out)[:300]
                forget["api"].append(entry)
        time.sleep(max(1.5, 2 * options.online_poll_s))     # tombstones reach the replica's cache
        still = 0
        client = Http(port)
        for u in forgotten:
            try:
                status, out, _ = client.call("POST", "/v1/completions", {"model": "latentpref", "prompt": PROMPTS[0],
                                                                          "max_tokens": 2, "temperature": 0, "user": u})
                still += status == 200 and out["personalization"]["served"] == "personalized"
            except Exception:
                client.reset()
        forget["still_personalized_after"] = still
        h_end = health(port) or {}

        # stop everything, then search ---------------------------------------------------------------------
        sampler.phase = "search"
        _stop_ray()
        with phase("search"):
            needles: dict[bytes, str] = {}
            for i, u in enumerate(forgotten):
                needles[u.encode()] = f"id of forgotten user #{i}"
                for t in own[u]["texts"]:
                    needles.setdefault(t.encode("utf-8", "surrogatepass"), f"own text of forgotten user #{i}")
            found = search_bytes(root, needles, tmp)
            tables = search_tables(root, set(forgotten), {t for u in forgotten for t in own[u]["texts"]},
                                   {k for u in forgotten for k in own[u]["keys"]})
            ray_logs = search_bytes(os.path.join(ray_session, "logs"), needles, tmp) if ray_session else None
        forget.update(users=len(forgotten), users_existing=len(pick_existing), users_new=len(pick_new),
                      own_texts=sum(len(own[u]["texts"]) for u in forgotten),
                      own_latent_keys=sum(len(own[u]["keys"]) for u in forgotten),
                      bytes_left=found["bytes"], matches_left=found["matches"], where=found["files"],
                      bytes_left_by_folder=found["by_folder"],
                      files_with_matches=found.get("files_with_matches", 0), rows_left=tables,
                      ray_session_logs_bytes_left=None if ray_logs is None else ray_logs["bytes"],
                      ray_session_logs_where=None if ray_logs is None else ray_logs["files"][:10])

        # the JSON -----------------------------------------------------------------------------------------
        retried = [f for f in load.feedback if f["attempts"] > 1]
        result = {
            "feedback_requests": len(load.feedback),
            "feedback_to_policy_p50_s": timing["p50_s"],
            "feedback_to_policy_p99_s": timing["p99_s"],
            "completion_p99_ms": comp["p99_ms"],
            "completion_p99_ms_without_feedback": base["p99_ms"],
            "lost_feedback": checks["lost_feedback"],
            "double_counted": checks["double_counted"],
            "forget_bytes_left": found["bytes"],
            "meets_target": {
                "feedback_to_policy_p99_s": timing["p99_s"] is not None and timing["p99_s"] <= 5.0,
                "completion_p99_ms": (comp["p99_ms"] is not None and base["p99_ms"] is not None
                                      and comp["p99_ms"] <= 2 * base["p99_ms"]),
                "lost_feedback": checks["lost_feedback"] == 0, "double_counted": checks["double_counted"] == 0,
                "forget_bytes_left": found["bytes"] == 0},
            "targets": TARGETS,
            "feedback": {"answered_2xx": len(answered), "failed": len(load.feedback) - len(answered),
                         "rows_per_request": rows_per, "rows_answered": checks["answered_rows"],
                         "retried_requests": len(retried), "retries": sum(f["attempts"] - 1 for f in load.feedback),
                         "retried_answered_already_stored": sum(f.get("already_stored", False) for f in retried),
                         "already_stored_answers": sum(f.get("already_stored", False) for f in answered),
                         "status_codes_seen": dict(collections.Counter(str(s) for f in load.feedback
                                                                       for s in f["statuses"])),
                         "failed_samples": [f.get("error") for f in load.feedback if f.get("status") != 200][:5],
                         "resent_after_kill": {"requests": len(load.resent),
                                               "answered_2xx": sum(r["status"] == 200 for r in load.resent),
                                               "answered_already_stored": sum(bool(r["already_stored"])
                                                                              for r in load.resent),
                                               "same_batch": sum(bool(r["same_batch"]) for r in load.resent),
                                               "rows_accepted_again": sum(r["accepted"] or 0 for r in load.resent
                                                                          if not r["already_stored"])},
                         "seconds": round(load.t_feedback_done - load.t0, 1),
                         "requests_per_s": round(len(load.feedback) / max(load.t_feedback_done - load.t0, 1e-9), 2)},
            "feedback_to_policy": timing,
            "feedback_to_policy_row_written": written,
            "completions": comp,
            "completions_without_feedback": {**base, "warm_up_before": warm},
            "kill": {**{k: v for k, v in load.kill.items() if k not in ("at", "restarted_at")},
                     "at_s_into_load": rnd(load.kill["at"] - load.t0, 1) if "at" in load.kill else None},
            "health_after_load": {k: h_after.get(k) for k in ("feedback_requests", "online_refits",
                                                              "online_refit_pending", "online_refit_errors",
                                                              "reloads", "served", "mean_batch_size", "pid")},
            "health_at_end": {k: h_end.get(k) for k in ("feedback_requests", "online_refits", "online_refit_errors",
                                                        "reloads", "release")},
            "night": {**night, "feedback_users": checks["night_status_of_feedback_users"]},
            "checks": checks,
            "policy_table": integrity,
            "forget": forget,
            "settings": {"users": args.users, "existing_fraction": args.existing_fraction,
                         "feedback_clients": args.feedback_clients, "completion_clients": args.completion_clients,
                         "feedback_interval_s": args.feedback_interval_s, "rows": rows_per,
                         "max_tokens": args.max_tokens, "decoding": "greedy", "replica_cpus": args.replica_cpus,
                         "ray_cpus": args.ray_cpus, "baseline_requests": args.baseline_requests,
                         "kill_at": args.kill_at, "resend_after_kill": args.resend_after_kill,
                         "settle_s": args.settle_s, "retry_budget_s": args.retry_budget_s,
                         "forget_cli": args.forget_cli, "forget_api": args.forget_api,
                         "serve_options": options.model_dump(exclude={"store"}), "tiny": args.tiny,
                         "seed": args.seed, "reduced": args.reduced_note, "poll": args.poll,
                         "status_poll_s": args.status_poll_s if args.poll == "status" else None,
                         "refit_turns": not args.no_refit_turns},
            "setup": {**setup, "phases": phase.out, "total_seconds": round(time.perf_counter() - phase.t0, 1),
                      "command": " ".join(sys.argv)},
            "definitions": {k: v for k, v in DEFINITIONS.items()},
        }
        machine.update(load_average_at_end=[round(x, 2) for x in os.getloadavg()],
                       load_average_1m_by_phase=sampler.stop(), versions=_versions())
        result["machine"] = machine
        write(result)
        return result
    finally:
        _stop_ray()
        if args.keep:
            log.info("kept %s", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


DEFINITIONS = {
    "feedback_to_policy": "feedback 2xx -> sending of the first completion for that user naming a fit that includes "
                          "the feedback (its decoding and server queueing excluded); *_to_response: to its answer. "
                          "How clients find the new fit is settings.poll: 'status' = POST /v1/users/status for the "
                          "waiting users every settings.status_poll_s, then a completion; 'completions' = completions "
                          "for the waiting users, least recently polled first",
    "feedback_to_policy_row_written": "feedback 2xx -> the policy-table row of an online refit including it written "
                                      "(server clock, same machine): the refit's own latency, no polling gap",
    "completion_p99_ms": "completions during the feedback load, the kill window (SIGKILL .. new replica answering "
                         f"+ {KILL_GRACE_S:.0f} s) left out; the window's figures are under completions.*",
    "lost_feedback": "rows answered 2xx that are not in the store's committed feedback after the night",
    "double_counted": "committed feedback rows stored twice + pairs the night's records / policy rows count beyond the "
                      "user's distinct rows in the store",
    "forget_bytes_left": "bytes of matches of forgotten ids and their own texts in every file under the store copy "
                         "(MLflow included) after the purge",
}


def _night_counts(store) -> dict:
    from latentpref.tasks.evaluate.serve_core import current_release
    release = current_release(store)
    m = store.read_json("serving", "releases", release.release_id, "_manifest.json")
    status = store.read_table(*m["records_path"])["status"].to_pylist()
    return dict(collections.Counter(status))


def _stop_ray() -> None:
    try:
        import ray
        if ray.is_initialized():
            from ray import serve
            try:
                serve.shutdown()
            except Exception:
                pass
            ray.shutdown()
    except Exception:
        pass


def _versions() -> dict:
    out = {}
    for name in ("ray", "torch", "lance", "pyarrow", "mlflow"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--store", default=DEFAULT_STORE, help="a finished night's store (copied; never modified)")
    p.add_argument("--tiny", action="store_true", help="build a tiny store here instead (quick smoke mode)")
    p.add_argument("--tiny-users", type=int, default=12, help="--tiny: simulated users of the built store")
    p.add_argument("--users", type=int, help="feedback users (default 200; --tiny 8)")
    p.add_argument("--existing-fraction", type=float, default=0.5, help="share of them that are store users")
    p.add_argument("--rows", type=int, default=4, help="rows per feedback request (at least the release's min_pairs)")
    p.add_argument("--feedback-clients", type=int, help="default 4 (--tiny 2)")
    p.add_argument("--completion-clients", type=int, help="default 8 (--tiny 2)")
    p.add_argument("--feedback-interval-s", type=float, default=1.0, help="each feedback client's pause between requests")
    p.add_argument("--baseline-requests", type=int, help="completions without feedback (default 160; --tiny 16)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--replica-cpus", type=float, help="CPUs (torch threads) of the replica (default 2; --tiny 1)")
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--reload-interval-s", type=float, default=2.0)
    p.add_argument("--poll", choices=("status", "completions"), default="completions",
                   help="how completion clients find a user's new fit: status (one POST /v1/users/status every "
                        "--status-poll-s for every waiting user, a completion once it names a new fit) or completions "
                        "(completions for the waiting users, least recently polled first)")
    p.add_argument("--status-poll-s", type=float, default=0.25)
    p.add_argument("--dump-requests", default=None, help="write every request of the load (times, versions) here")
    p.add_argument("--no-refit-turns", action="store_true",
                   help="ServeOptions.refit_turns=False: refits beside decode batches, not in turns (the comparison)")
    p.add_argument("--kill-at", type=float, default=0.4, help="kill the replica after this share of feedback answers "
                                                              "(0: no kill)")
    p.add_argument("--restart-budget-s", type=float, default=300.0)
    p.add_argument("--resend-after-kill", type=int, default=10,
                   help="re-send this many requests answered just before the kill, same idempotency key, once the new "
                        "replica answers (a client whose answer was lost): they must be stored once")
    p.add_argument("--retry-budget-s", type=float, default=300.0, help="how long a feedback request is retried")
    p.add_argument("--settle-s", type=float, help="after the last feedback answer: wait this long at most for every "
                                                  "user to be seen on a new policy (default 90; --tiny 30)")
    p.add_argument("--forget-cli", type=int, help="users forgotten with `latentpref forget` (default 10; --tiny 1)")
    p.add_argument("--forget-api", type=int, help="users forgotten with DELETE /v1/users/{id} (default 10; --tiny 1)")
    p.add_argument("--night-timeout-s", type=float, default=1800.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="folder for the temporary store (default: the system's temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--reduced-note", default=None, help="say in the JSON why counts were reduced, if they were")
    args = p.parse_args(argv)
    for name, full, tiny in (("users", 200, 8), ("feedback_clients", 4, 2), ("completion_clients", 8, 2),
                             ("baseline_requests", 160, 16), ("replica_cpus", 2.0, 1.0), ("settle_s", 90.0, 30.0),
                             ("forget_cli", 10, 1), ("forget_api", 10, 1)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    if args.users < 2 or args.forget_cli + args.forget_api > args.users:
        p.error("--users must be >= 2 and >= --forget-cli + --forget-api")
    for name, value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("TOKENIZERS_PARALLELISM", "false"),
                        ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"), ("RAY_DEDUP_LOGS", "1")):
        os.environ.setdefault(name, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    torch.set_num_threads(1)

    def write(result: dict) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)

    result = run(args, write)
    print(json.dumps({k: result[k] for k in KEYS} | {"meets_target": result["meets_target"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
