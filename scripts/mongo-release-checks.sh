#!/usr/bin/env bash
# mongo-release-checks.sh: what a maintainer runs before a release (make release-checks), three
# checks of the service against a real MongoDB replica set failing in ways CI cannot make:
#
#   a. rollback: replication to the secondaries paused, a w:majority write is not acknowledged
#      and a majority read does not see it; a send through the service answers 503 (not 200);
#      then the primary is frozen, another is elected, and the old one, back, rolls the write
#      back. No sync, at any point, returns an entry that later disappears.
#   b. write concern errors and duplicate keys: inserts answer a write concern error (the
#      failCommand fail point), the same idempotent message is sent twice (the second finds
#      its own documents taken), and the service answers 503 rather than success; also with
#      replication paused, where the documents it collides with are not majority-committed.
#   c. an index build on 3,000,000 documents with a voting member down: the service started
#      with no index at all refuses sends with 503 until the unique (id, seq) index is built,
#      serves reads throughout, and the build ends without the stopped member (a commit
#      quorum of "majority", not the default "votingMembers").
#
# Each check prints PASS or FAIL with a one-line reason; the script exits 1 if one failed.
#
# It starts its own throwaway stack from docker-compose.yml (the three-member set rs0 with its
# keyFile, Redis, timeline built from this repository's Dockerfile), under its own compose
# project name (timeline-release-checks: its own containers, network and volumes, no port
# published, the repository's .env not read), with mongod's test commands enabled
# (--setParameter enableTestCommands=1, which configureFailPoint needs), and removes it all
# at the end, volumes included, whatever happens (KEEP=1 leaves it running to look around).
# The image it builds, timeline-release-checks:latest, stays (layers cached for next time).
#
# Needs: a Docker engine with the compose plugin 2.24 or newer (the override uses `!reset`),
# bash, about 10 GB of free disk (three copies of 3,000,000 documents and their oplogs) and
# the network to pull mongo:7.0 and redis:7.2 and build the image. Takes about 20 minutes,
# more on the first run (pulls, the image build).
#
# Not run by CI or `make test`: there is no Docker engine where this was written. It passes
# `bash -n`; its commands follow the MongoDB manual and the server's own test helpers, cited
# where used, but it has not been run, so the first run may need adjusting.
set -euo pipefail
cd "$(dirname "$0")/.."

PROJECT=timeline-release-checks
MEMBERS=(mongo mongo2 mongo3)
LOAD_DOCUMENTS=${LOAD_DOCUMENTS:-3000000}

command -v docker >/dev/null || { echo "mongo-release-checks: needs docker" >&2; exit 2; }
compose_version=$(docker compose version --short 2>/dev/null) || {
    echo "mongo-release-checks: needs the docker compose plugin" >&2; exit 2; }
IFS=. read -r major minor _ <<<"${compose_version#v}"
major=${major%%[!0-9]*} minor=${minor%%[!0-9]*}
if (( ${major:-0} < 2 || (${major:-0} == 2 && ${minor:-0} < 24) )); then
    echo "mongo-release-checks: needs docker compose 2.24 or newer, found $compose_version" >&2
    exit 2
fi

tmp=$(mktemp -d)
# Throwaway credentials, for this stack alone: the same in the environment (which compose
# prefers) and in the env file (so that the repository's .env is not read).
random() { head -c 18 /dev/urandom | base64 | tr '+/' 'xy'; }
export MONGO_ROOT_USERNAME=release
MONGO_ROOT_PASSWORD=$(random)
REDIS_PASSWORD=$(random)
export MONGO_ROOT_PASSWORD REDIS_PASSWORD
export TIMELINE_API_TOKEN="" WEB_CONCURRENCY=2
cat >"$tmp/env" <<EOF
MONGO_ROOT_USERNAME=$MONGO_ROOT_USERNAME
MONGO_ROOT_PASSWORD=$MONGO_ROOT_PASSWORD
REDIS_PASSWORD=$REDIS_PASSWORD
TIMELINE_API_TOKEN=
WEB_CONCURRENCY=2
EOF
# The members' command replaces the compose file's whole ("Merge Compose files",
# https://docs.docker.com/reference/compose-file/merge/): it is the compose file's plus the
# test commands (tests/test_deploy.py keeps the two equal). `!reset []`: no port published.
cat >"$tmp/override.yml" <<'EOF'
services:
  mongo:
    command: &mongod-test ["mongod", "--replSet", "rs0", "--bind_ip_all", "--keyFile", "/etc/mongo-keyfile/key", "--setParameter", "enableTestCommands=1"]
  mongo2:
    command: *mongod-test
  mongo3:
    command: *mongod-test
  timeline:
    image: timeline-release-checks:latest
    ports: !reset []
  proxy:
    ports: !reset []
EOF

compose() {
    docker compose -p "$PROJECT" --env-file "$tmp/env" -f docker-compose.yml -f "$tmp/override.yml" "$@"
}

cleanup() {
    if [ -n "${KEEP:-}" ]; then
        echo "KEEP=1: the stack is left running; remove it with:"
        echo "  docker compose -p $PROJECT --env-file $tmp/env -f docker-compose.yml -f $tmp/override.yml down -v"
        return
    fi
    echo "mongo-release-checks: removing the stack"
    compose unpause >/dev/null 2>&1 || true
    compose down -v --remove-orphans --timeout 10 >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- helpers -------------------------------------------------------------------------------

# msh MEMBER JS [NAME=VALUE...]: mongosh on that member (a direct connection: mongosh connects
# directly to a single host given without replicaSet), as root; NAME=VALUE are in process.env.
msh() {
    local member=$1 js=$2 envs=() pair
    shift 2
    for pair in "$@"; do envs+=(-e "$pair"); done
    compose exec -T ${envs[@]+"${envs[@]}"} "$member" mongosh --quiet --norc \
        -u "$MONGO_ROOT_USERNAME" -p "$MONGO_ROOT_PASSWORD" --authenticationDatabase admin \
        --eval "$js"
}

# The HTTP client, run inside the timeline container (its python; gunicorn on 127.0.0.1:8000).
# (read -d '', not $(cat <<...): bash 3.2 misparses some here-documents inside $(...).)
read -r -d '' PY_CLIENT <<'PY' || true
import json
import sys
import time
import urllib.error
import urllib.request

BASE = "http://127.0.0.1:8000"


def call(method, path, body=None):
    data = None if body is None else body.encode()
    request = urllib.request.Request(BASE + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=20) as reply:
            status, text = reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    except OSError as error:
        status, text = 0, repr(error)
    return status, text, time.monotonic() - started


def one_line(text):
    return " ".join(text.split())[:300]


def timeline(member):
    """Every entry sync returns for member, paged from the start: {sequence: message}."""
    entries, last = {}, 0
    while True:
        path = f"/timeline/sync?member={member}&last_read={last}&count=1000"
        status, text, _ = call("GET", path)
        if status != 200:
            raise RuntimeError(f"sync {member}: {status} {one_line(text)}")
        page = json.loads(text)
        for entry in page.get("entrySet", []):
            entries[int(entry["sequence"])] = entry["message"]
        if not page.get("entrySet") or int(page["entrySetLastSeq"]) >= int(page["latestSeq"]):
            return entries
        last = int(page["entrySetLastSeq"])


def holds(message, text):
    """The message (JSON text) holds this text as a whole string value."""
    return json.dumps(text) in message


def ledger_path(member):
    return f"/tmp/release-checks-{member}.jsonl"


def main(command, *args):
    if command == "req":  # req METHOD PATH [BODY] -> "STATUS SECONDS BODY"
        status, text, took = call(args[0], args[1], args[2] if len(args) > 2 else None)
        print(status, f"{took:.2f}", one_line(text))
    elif command == "healthz":  # healthz SECONDS: until gunicorn answers
        deadline = time.monotonic() + float(args[0])
        while call("GET", "/healthz")[0] != 200:
            if time.monotonic() > deadline:
                sys.exit("gunicorn did not answer /healthz")
            time.sleep(1)
    elif command == "record":  # record MEMBER: add what sync returns now to the ledger
        try:
            entries = timeline(args[0])
        except RuntimeError as error:
            print(f"not recorded: {error}")
            return
        with open(ledger_path(args[0]), "a") as ledger:
            for sequence, message in sorted(entries.items()):
                ledger.write(json.dumps([sequence, message]) + "\n")
        print(f"recorded {len(entries)} entries")
    elif command == "verify":  # verify MEMBER TEXT...: all ever recorded still there; no TEXT
        try:
            with open(ledger_path(args[0])) as ledger:
                seen = [tuple(json.loads(line)) for line in ledger]
        except FileNotFoundError:
            seen = []
        now = timeline(args[0])
        gone = sorted({(s, m) for s, m in seen if now.get(s) != m})
        shown = [t for t in args[1:] if any(holds(m, t) for m in [m for _, m in seen] + list(now.values()))]
        if gone or shown:
            print(f"entries once returned, now gone or changed: {gone[:5]}; never to be shown: {shown}")
            sys.exit(1)
        print(f"{len(set(seen))} entries returned at some point, every one still returned")
    elif command == "count":  # count MEMBER TEXT: entries holding TEXT
        print(sum(holds(m, args[1]) for m in timeline(args[0]).values()))
    elif command == "round":  # round SEND_TEXT: one look at everything, during the build
        reads = call("GET", "/readyz?for=reads")
        writes = call("GET", "/readyz")
        history = call("GET", "/timeline/history/single/rc-c1/rc-c2?count=10")
        sync = call("GET", "/timeline/sync?member=load-7&last_read=0&count=10")
        body = json.dumps({"from": "rc-c1", "to": "rc-c2", "message": {"text": args[0]}})
        send = call("POST", "/timeline/send", body)
        print(f"reads={reads[0]} writes={writes[0]} history={history[0]} "
              f"sync={sync[0]}:{sync[2]:.1f}s send={send[0]} | {one_line(send[1])[:120]}")
    else:
        sys.exit(f"unknown command {command}")


main(*sys.argv[1:])
PY
api() { compose exec -T timeline python -c "$PY_CLIENT" "$@"; }

# send FROM TO TEXT [CLIENT_MSG_ID]: "STATUS SECONDS BODY"
send() {
    local body="{\"from\":\"$1\",\"to\":\"$2\",\"message\":{\"text\":\"$3\"}"
    [ -z "${4:-}" ] || body+=",\"client_msg_id\":\"$4\""
    api req POST /timeline/send "$body}"
}

# wait_for SECONDS CMD...: until CMD succeeds (quietly); 1 when the time is up.
wait_for() {
    local limit=$1 start=$SECONDS
    shift
    until "$@" >/dev/null 2>&1; do
        (( SECONDS - start < limit )) || return 1
        sleep 2
    done
}

# The primary as the first of these members that answers sees it (a service name).
primary_of() {
    local member seen
    for member in "$@"; do
        seen=$(msh "$member" 'const h = db.hello(); print(h.isWritablePrimary ? h.me : (h.primary || ""))' 2>/dev/null) || continue
        seen=${seen%%:*}
        if [ -n "$seen" ]; then echo "$seen"; return 0; fi
    done
    return 1
}
is_primary() { [ "$(msh "$1" 'print(db.hello().isWritablePrimary)' 2>/dev/null)" = true ]; }
is_secondary() { [ "$(msh "$1" 'print(db.hello().secondary)' 2>/dev/null)" = true ]; }
# The members other than $1, on one line (bash 3.2 has no mapfile: macOS's).
others() { local m out=(); for m in "${MEMBERS[@]}"; do [ "$m" = "$1" ] || out+=("$m"); done; echo "${out[*]}"; }

# A w:3 write: every member has all the primary has (wtimeout: "Write Concern",
# https://www.mongodb.com/docs/manual/reference/write-concern/).
replicated() {
    local primary
    primary=$(primary_of "${MEMBERS[@]}") || return 1
    msh "$primary" '
        const r = db.getSiblingDB("release_checks").runCommand({
            insert: "barrier", documents: [{ at: new Date() }],
            writeConcern: { w: 3, wtimeout: Number(process.env.WAIT_MS) } });
        if (r.ok !== 1 || r.writeConcernError) { print(EJSON.stringify(r)); quit(1); }' \
        WAIT_MS="${1:-120000}"
}

# stop_replication MEMBER...: each stops fetching the oplog, as the server's own tests do
# (stopServerReplication, jstests/libs/write_concern_util.js: the stopReplProducer fail point,
# then waitForFailPoint until it is hit). Needs enableTestCommands ("configureFailPoint").
stop_replication() {
    local member
    for member in "$@"; do
        msh "$member" '
            const admin = db.getSiblingDB("admin");
            const r = admin.runCommand({ configureFailPoint: "stopReplProducer", mode: "alwaysOn" });
            if (r.ok !== 1) { print(EJSON.stringify(r)); quit(1); }
            admin.runCommand({ waitForFailPoint: "stopReplProducer",
                               timesEntered: Number(r.count) + 1, maxTimeMS: 30000 });'
    done
}
resume_replication() {
    local member
    for member in "$@"; do
        msh "$member" 'db.getSiblingDB("admin").runCommand({ configureFailPoint: "stopReplProducer", mode: "off" })' >/dev/null
    done
}

# fail_inserts MEMBER on|off: the service's inserts (appName "timeline", pymongo's appname)
# answer a write concern error, code 64 WriteConcernFailed with errInfo.wtimeout, as a w:majority
# wtimeout does; the write itself is applied ("The failCommand fail point", the server's wiki:
# https://github.com/mongodb/mongo/wiki/The-failCommand-fail-point; appName: SERVER-47195).
fail_inserts() {
    msh "$1" '
        const on = process.env.MODE === "on";
        const r = db.getSiblingDB("admin").runCommand(on ? {
            configureFailPoint: "failCommand", mode: "alwaysOn",
            data: { failCommands: ["insert"], appName: "timeline",
                    writeConcernError: { code: 64, codeName: "WriteConcernFailed",
                                         errmsg: "waiting for replication timed out (release check)",
                                         errInfo: { wtimeout: true } } } }
            : { configureFailPoint: "failCommand", mode: "off" });
        if (r.ok !== 1) { print(EJSON.stringify(r)); quit(1); }' MODE="$2" >/dev/null
}

# stored MEMBER TEXT: "LOCAL MAJORITY", the timeline documents holding TEXT on that member at
# read concern "local" and "majority" ("Read Concern", https://www.mongodb.com/docs/manual/reference/read-concern/).
stored() {
    msh "$1" '
        db.getMongo().setReadPref("primaryPreferred");
        const im = db.getSiblingDB("im");
        const query = { "message.text": process.env.TEXT };
        const count = (level) => ["chat_sync", "chat_history"].reduce(
            (n, c) => n + im[c].find(query).readConcern(level).toArray().length, 0);
        print(count("local") + " " + count("majority"));' TEXT="$2"
}

# Undo what a check that stopped midway may have left: a frozen or stopped container, fail
# points on. The next check then starts from a whole set (its first w:3 write waits for it).
restore_set() {
    local member
    compose unpause >/dev/null 2>&1 || true
    compose start "${MEMBERS[@]}" redis timeline >/dev/null 2>&1 || true
    for member in "${MEMBERS[@]}"; do
        msh "$member" '
            const admin = db.getSiblingDB("admin");
            for (const name of ["stopReplProducer", "failCommand"]) {
                admin.runCommand({ configureFailPoint: name, mode: "off" });
            }' >/dev/null 2>&1 || true
    done
}

CHECK=""
pass() { echo "PASS $CHECK: $*" | tee "$tmp/verdict"; exit 0; }
fail() { echo "FAIL $CHECK: $*" | tee "$tmp/verdict"; exit 1; }
note() { echo "  $CHECK: $*"; }
verdicts=()
failed=0
# run_check NAME FUNCTION: in a subshell with errexit; a step that fails unexpectedly is a FAIL.
run_check() {
    CHECK=$1
    rm -f "$tmp/verdict"
    echo
    echo "== $CHECK"
    restore_set
    local status
    set +e
    ( set -e; "$2" )
    status=$?
    set -e
    if [ ! -s "$tmp/verdict" ]; then
        echo "FAIL $CHECK: a step failed before the check could conclude (exit $status): see above" >"$tmp/verdict"
        cat "$tmp/verdict"
    fi
    [ "$status" -eq 0 ] || failed=$((failed + 1))
    verdicts+=("$(cat "$tmp/verdict")")
}

# --- a. rollback with replication stopped --------------------------------------------------

check_rollback() {
    local primary secondaries new_primary member out code took answer counts local_n majority_n
    local files waited=0 sent="" probe=probe-$RANDOM mark=refused-$RANDOM after=elected-$RANDOM
    # The probe's collection exists on every member before: only the document is rolled back.
    msh "$(primary_of "${MEMBERS[@]}")" 'db.getSiblingDB("release_checks").probe.insertOne({ _id: "seed" })' >/dev/null
    replicated
    primary=$(primary_of "${MEMBERS[@]}")
    read -r -a secondaries <<<"$(others "$primary")"
    note "primary $primary, secondaries ${secondaries[*]}"
    api record rc-b >/dev/null

    stop_replication "${secondaries[@]}"
    note "replication to ${secondaries[*]} paused (stopReplProducer)"
    # A w:majority write straight to the primary: applied there, never acknowledged.
    answer=$(msh "$primary" '
        let r;
        try {
            r = db.getSiblingDB("release_checks").runCommand({
                insert: "probe", documents: [{ _id: process.env.PROBE }],
                writeConcern: { w: "majority", wtimeout: 3000 } });
        } catch (e) { r = { thrown: e.codeName || e.name, code: e.code, message: e.message }; }
        const unacknowledged = Boolean(r.writeConcernError) || r.code === 64 ||
            /replication timed out|write concern/i.test(r.message || "");
        print(unacknowledged ? "unacknowledged" : "acknowledged " + EJSON.stringify(r));' PROBE="$probe")
    [ "$answer" = unacknowledged ] || fail "a w:majority write with replication paused was $answer"
    counts=$(msh "$primary" '
        const probe = db.getSiblingDB("release_checks").probe;
        const n = (level) => probe.find({ _id: process.env.PROBE }).readConcern(level).toArray().length;
        print(n("local") + " " + n("majority"));' PROBE="$probe")
    [ "$counts" = "1 0" ] || fail "the unacknowledged write read at local/majority: $counts (expected 1 0)"
    note "w:majority write not acknowledged (wtimeout); read at local: 1, at majority: 0"

    # The same through the service: a send must not succeed.
    out=$(send rc-a rc-b "$mark")
    read -r code took _ <<<"$out"
    note "send during the pause: $out"
    [ "$code" = 503 ] || fail "a send with replication paused answered $code in ${took}s, not 503"
    api record rc-b >/dev/null
    read -r local_n majority_n <<<"$(stored "$primary" "$mark")"
    note "its documents on the primary: $local_n at local, $majority_n at majority"
    [ "$majority_n" = 0 ] || fail "a majority read sees $majority_n documents of the refused send"
    api record rc-b >/dev/null

    # Freeze the primary; the secondaries elect one of theirs; thaw it: it rolls back.
    compose pause "$primary" >/dev/null
    note "$primary frozen (docker pause)"
    new_primary=""
    while [ -z "$new_primary" ]; do
        for member in "${secondaries[@]}"; do
            if is_primary "$member"; then new_primary=$member; fi
        done
        [ -n "$new_primary" ] && break
        (( waited < 90 )) || fail "no secondary was elected within 90 s of freezing $primary"
        sleep 2; waited=$((waited + 2))
    done
    note "$new_primary elected"
    resume_replication "${secondaries[@]}"
    for _ in $(seq 30); do
        out=$(send rc-a rc-b "$after") || out="0"
        read -r code _ <<<"$out"
        if [ "$code" = 200 ]; then sent=yes; break; fi
        sleep 2
    done
    [ -n "$sent" ] || fail "no send succeeded within 60 s of $new_primary's election: $out"
    api record rc-b >/dev/null
    compose unpause "$primary" >/dev/null
    note "$primary thawed"
    wait_for 180 is_secondary "$primary" || fail "$primary did not come back as a secondary within 180 s"
    replicated || fail "the set did not catch up after $primary came back"
    files=$(compose exec -T "$primary" sh -c 'find /data/db/rollback -name "removed.*.bson" 2>/dev/null | wc -l')
    # "Rollbacks During Replica Set Failover": <dbpath>/rollback/<collectionUUID>/removed.<timestamp>.bson
    # (https://www.mongodb.com/docs/manual/core/replica-set-rollbacks/).
    [ "$files" -gt 0 ] || fail "$primary wrote no rollback file: the unacknowledged write was not rolled back"
    for member in "${MEMBERS[@]}"; do
        counts=$(msh "$member" '
            db.getMongo().setReadPref("primaryPreferred");
            print(db.getSiblingDB("release_checks").probe.find({ _id: process.env.PROBE }).toArray().length);' PROBE="$probe")
        [ "$counts" = 0 ] || fail "the unacknowledged write is still on $member after the rollback"
        read -r local_n _ <<<"$(stored "$member" "$mark")"
        [ "$local_n" = 0 ] || fail "$local_n documents of the refused send are on $member after the rollback"
    done
    for _ in $(seq 30); do
        [ "$(api count rc-b "$after")" = 1 ] && break
        sleep 2
    done
    [ "$(api count rc-b "$after")" = 1 ] || fail "the send made after the election is not in rc-b's timeline once"
    out=$(api verify rc-b "$mark") || fail "sync: $out"
    pass "unacknowledged w:majority write, invisible at majority, rolled back by $primary ($files rollback file(s)); the send answered 503; $out"
}

# --- b. write concern errors on inserts, with duplicate keys -------------------------------

check_write_concern() {
    local primary secondaries out code first second third local_n majority_n n text
    local one=wce-one-$RANDOM two=wce-two-$RANDOM
    replicated
    primary=$(primary_of "${MEMBERS[@]}")
    read -r -a secondaries <<<"$(others "$primary")"

    # Round 1: every insert of the service answers a write concern error; replication runs.
    fail_inserts "$primary" on
    out=$(send rc-wa rc-wb "$one" "$one"); read -r first _ <<<"$out"; note "first send: $out"
    out=$(send rc-wa rc-wb "$one" "$one"); read -r second _ <<<"$out"; note "second send (its documents taken): $out"
    fail_inserts "$primary" off
    [ "$first" = 503 ] || fail "a send whose inserts answered a write concern error answered $first, not 503"
    if [ "$second" = 200 ]; then
        # Success is right only if what it found taken is majority-committed (it replicated).
        read -r _ majority_n <<<"$(stored "$primary" "$one")"
        [ "$majority_n" -gt 0 ] || fail "the repeated send answered 200 on documents no majority has"
        note "the repeated send answered 200: its documents are majority-committed ($majority_n)"
    elif [ "$second" != 503 ]; then
        fail "the repeated send answered $second"
    fi

    # Round 2: the same with replication paused, so the documents it collides with are on the
    # primary alone: the write concern fails for real, and the duplicates prove nothing.
    stop_replication "${secondaries[@]}"
    fail_inserts "$primary" on
    out=$(send rc-wa rc-wb "$two" "$two"); read -r first _ <<<"$out"; note "first send: $out"
    read -r local_n majority_n <<<"$(stored "$primary" "$two")"
    note "its documents on the primary: $local_n at local, $majority_n at majority"
    out=$(send rc-wa rc-wb "$two" "$two"); read -r second _ <<<"$out"; note "second send (its documents taken): $out"
    fail_inserts "$primary" off
    resume_replication "${secondaries[@]}"
    replicated
    [ "$first" = 503 ] || fail "with replication paused, a send answered $first, not 503"
    [ "$second" = 503 ] || fail "the repeated send answered $second on duplicates no majority has, not 503"

    # Once the writes replicate, the same requests succeed, each message stored once.
    for text in "$one" "$two"; do
        third=""
        for _ in $(seq 15); do
            out=$(send rc-wa rc-wb "$text" "$text"); read -r code _ <<<"$out"
            if [ "$code" = 200 ]; then third=200; break; fi
            sleep 2
        done
        [ "$third" = 200 ] || fail "after replication resumed, the retry of $text answered: $out"
        n=$(api count rc-wb "$text")
        [ "$n" = 1 ] || fail "$text is $n times in rc-wb's timeline, not once"
    done
    pass "503 on a write concern error, also for the repeated send finding its own writes taken (with replication paused: $local_n of its documents on the primary alone); each message stored once after retries"
}

# --- c. an index build on millions of documents with a voting member down -------------------

check_index_build() {
    local primary secondaries stopped started line state history_bad=0 reads_bad=0
    local early=0 late=0 rounds=0 ready_at="" ok_after=0 healthy_building="" health i=0
    local sync_bad=0 syncs=0 builds
    replicated
    primary=$(primary_of "${MEMBERS[@]}")
    read -r -a secondaries <<<"$(others "$primary")"
    compose stop timeline >/dev/null
    note "timeline stopped; dropping every index of im, loading $LOAD_DOCUMENTS documents into chat_sync"
    msh "$primary" '
        const im = db.getSiblingDB("im");
        im.getCollectionNames().forEach((c) => im[c].dropIndexes());
        const coll = im.chat_sync, total = Number(process.env.DOCS), ids = 30000, batch = 10000;
        const now = new Date();
        for (let start = 0; start < total; start += batch) {
            const docs = [];
            for (let i = start; i < Math.min(start + batch, total); i++) {
                docs.push({ id: "load-" + (i % ids), seq: NumberLong(Math.floor(i / ids) + 1),
                            message: { text: "load" }, created_at: now, mid: "" });
            }
            coll.insertMany(docs, { ordered: false });
        }
        print("chat_sync holds " + coll.estimatedDocumentCount() + " documents; indexes: " +
              coll.getIndexes().map((i) => i.name).join(","));' DOCS="$LOAD_DOCUMENTS"
    replicated 1800000 || fail "the loaded documents did not reach every member within 30 min"
    stopped=${secondaries[0]}
    compose stop "$stopped" >/dev/null
    note "$stopped (a voting member) stopped; starting timeline without its dependencies"
    compose up -d --no-deps timeline >/dev/null
    api healthz 120 || fail "timeline did not answer /healthz within 120 s"
    started=$SECONDS

    # One round every few seconds: the service's answers, then the unique indexes' state on
    # the primary ($indexStats lists a build in progress with building: true; listIndexes
    # lists it as if built: "listIndexes", https://www.mongodb.com/docs/manual/reference/command/listIndexes/).
    while (( SECONDS - started < 1800 )); do
        i=$((i + 1))
        line=$(api round "during-build-$i") || line="exec failed"
        state=$(msh "$primary" '
            const im = db.getSiblingDB("im");
            const state = (c) => {
                const found = im[c].aggregate([{ $indexStats: {} }]).toArray().find((s) =>
                    s.spec && s.spec.unique && JSON.stringify(s.key) === "{\"id\":1,\"seq\":1}");
                return !found ? "absent" : (found.building ? "building" : "ready");
            };
            print(state("chat_sync") + "/" + state("chat_history"));')
        health=$(docker inspect -f '{{.State.Health.Status}}' "$(compose ps -q timeline)" 2>/dev/null || echo "?")
        rounds=$((rounds + 1))
        case $line in *"reads=200 "*) ;; *) reads_bad=$((reads_bad + 1)) ;; esac
        case $line in *" history=200 "*) ;; *) history_bad=$((history_bad + 1)) ;; esac
        syncs=$((syncs + 1))
        case $line in *" sync=200:"*) ;; *) sync_bad=$((sync_bad + 1)) ;; esac
        if [ "$state" = ready/ready ]; then
            [ -n "$ready_at" ] || { ready_at=$SECONDS; note "unique indexes built after $((SECONDS - started)) s"; }
        elif [ "$health" = healthy ]; then
            healthy_building=yes
        fi
        if [ $(( rounds % 10 )) = 1 ] || [ -n "$ready_at" ]; then
            note "$((SECONDS - started))s indexes=$state container=$health $line"
        fi
        case $line in
            *" send=200 "*)
                # A copy written before the unique index is built could duplicate a sequence.
                [ -n "$ready_at" ] || early=$((early + 1))
                [ -z "$ready_at" ] || ok_after=$((ok_after + 1))
                ;;
            *)
                if [ -n "$ready_at" ] && (( SECONDS - ready_at > 30 )); then late=$((late + 1)); fi
                ;;
        esac
        (( ok_after < 3 )) || break
        (( late < 3 )) || break
        sleep 1
    done
    if [ -z "$ready_at" ]; then
        builds=$(msh "$primary" '
            print(EJSON.stringify(db.getSiblingDB("admin").aggregate([
                { $currentOp: {} }, { $match: { "command.createIndexes": { $exists: true } } },
            ]).toArray().map((o) => o.msg || o.command)));') || builds="?"
        compose start "$stopped" >/dev/null || true
        fail "the unique index was not built within 30 min with $stopped down (a commit quorum waiting for every voting member would hang); builds in progress: $builds"
    fi
    compose start "$stopped" >/dev/null || true
    (( early == 0 )) || fail "$early send(s) succeeded before the unique index was built"
    (( late == 0 )) || fail "sends still answered 503 more than 30 s after the unique index was built"
    (( ok_after >= 3 )) || fail "sends did not succeed after the unique index was built"
    (( reads_bad == 0 )) || fail "/readyz?for=reads was not 200 in $reads_bad of $rounds rounds"
    (( history_bad == 0 )) || fail "history reads failed in $history_bad of $rounds rounds"
    pass "built in $((ready_at - started)) s with $stopped down; sends 503 until then and 200 after; reads ready and history served throughout (syncs of chat_sync, a collection scan without the index: $((syncs - sync_bad))/$syncs answered 200; container healthy during the build: ${healthy_building:-not seen})"
}

# --- the run -------------------------------------------------------------------------------

echo "mongo-release-checks: building and starting the stack (project $PROJECT)"
compose up -d --build --wait --wait-timeout 900 timeline
echo "mongo-release-checks: rs0 is up, primary $(primary_of "${MEMBERS[@]}")"

run_check "a. rollback with replication stopped" check_rollback
run_check "b. write concern errors with duplicate keys" check_write_concern
run_check "c. index build on $LOAD_DOCUMENTS documents with a voting member down" check_index_build

echo
echo "== summary"
printf '%s\n' "${verdicts[@]}"
[ "$failed" -eq 0 ]
